"""The autoencoder of latent diffusion (Rombach et al. 2022, "High-Resolution Image Synthesis with
Latent Diffusion Models"; seeds 002 and 004: "compress images into a low dimensional latent
space").

A convolutional encoder maps an image ``x`` ``(N, C, H, W)`` to the parameters of a diagonal
Gaussian posterior ``q(z | x) = N(mu(x), diag(sigma(x)^2))`` over latents ``z`` of shape
``(N, latent_channels, H / f, W / f)``, ``f = 2 ** (len(channel_mults) - 1)`` (4 by default:
32x32x3 glyphs -> 8x8x4); a convolutional decoder maps ``z`` back to an image. Both are stacks of
residual blocks ``h + conv(SiLU(GN(conv(SiLU(GN(h))))))`` with a strided convolution (encoder)
or a nearest-neighbour upsampling and convolution (decoder) between levels.

Training (``recipes/autoencoder.py``) minimises, per image,

    L = ( ||x - D(z)||_p^p + beta * KL(q(z | x) || N(0, I)) ) / (C H W),  z ~ q(z | x),

``p`` 1 or 2, with the KL term in closed form (:meth:`DiagonalGaussian.kl`) and a small
``beta`` (1e-6 in the paper's KL-regularised f=4 models), so the latent is close to
deterministic and only weakly pulled toward the unit Gaussian; its scale is then fixed by the
measured ``1 / std`` (the latent scale of the latent recipe).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from difflab.nets.embeddings import check_sizes
from difflab.nets.unet import group_norm

#: log sigma^2 is clamped to this range (as in the paper's code: it keeps exp() finite early on).
LOGVAR_RANGE = (-30.0, 20.0)


@dataclass
class DiagonalGaussian:
    """``N(mean, diag(exp(logvar)))`` per example: ``mean`` and ``logvar`` ``(N, ...)``."""

    mean: Tensor
    logvar: Tensor

    @property
    def std(self) -> Tensor:
        return torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """``z = mean + std * eps``, ``eps ~ N(0, I)`` (reparameterised: differentiable)."""
        eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device,
                          dtype=self.mean.dtype)  # fmt: skip
        return self.mean + self.std * eps

    def kl(self) -> Tensor:
        """``KL(N(mu, sigma^2) || N(0, 1))`` summed over each example's dimensions, ``(N,)``:
        ``0.5 * sum(mu^2 + sigma^2 - 1 - log sigma^2)``."""
        terms = self.mean.square() + self.logvar.exp() - 1.0 - self.logvar
        return 0.5 * terms.flatten(1).sum(dim=1)


class ResidualBlock(nn.Module):
    """``skip(h) + conv(SiLU(GN(conv(SiLU(GN(h))))))``; ``skip`` is a 1x1 convolution when the
    width changes, else the identity."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.branch = nn.Sequential(
            group_norm(in_channels),
            nn.SiLU(),
            nn.Conv2d(in_channels, out_channels, 3, padding=1),
            group_norm(out_channels),
            nn.SiLU(),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        same = in_channels == out_channels
        self.skip = nn.Identity() if same else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, h: Tensor) -> Tensor:
        return self.skip(h) + self.branch(h)


class Upsample(nn.Module):
    """Nearest-neighbour upsampling by 2, then a 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, h: Tensor) -> Tensor:
        return self.conv(F.interpolate(h, scale_factor=2.0, mode="nearest"))


class Autoencoder(nn.Module):
    """KL-regularised convolutional autoencoder (see the module docstring).

    ``in_channels``: image channels; ``channels`` and ``channel_mults``: the width of each
    level (``len(channel_mults) - 1`` halvings of the resolution); ``num_res_blocks``: residual
    blocks per level; ``latent_channels``: channels of ``z``.
    """

    def __init__(
        self,
        in_channels: int = 3,
        channels: int = 32,
        channel_mults: Sequence[int] = (1, 2, 2),
        num_res_blocks: int = 1,
        latent_channels: int = 4,
    ):
        super().__init__()
        check_sizes(
            {
                "in_channels": in_channels,
                "channels": channels,
                "num_res_blocks": num_res_blocks,
                "latent_channels": latent_channels,
                **{f"channel_mults[{i}]": m for i, m in enumerate(channel_mults)},
            }
        )
        if not channel_mults:
            raise ValueError("channel_mults must list at least one level")
        widths = [channels * m for m in channel_mults]
        self.factor = 2 ** (len(widths) - 1)
        self.latent_channels = latent_channels

        encoder: list[nn.Module] = [nn.Conv2d(in_channels, widths[0], 3, padding=1)]
        width = widths[0]
        for level, out in enumerate(widths):
            for _ in range(num_res_blocks):
                encoder.append(ResidualBlock(width, out))
                width = out
            if level < len(widths) - 1:
                encoder.append(nn.Conv2d(width, width, 3, stride=2, padding=1))
        encoder += [ResidualBlock(width, width), group_norm(width), nn.SiLU(),
                    nn.Conv2d(width, 2 * latent_channels, 3, padding=1)]  # fmt: skip
        self.encoder = nn.Sequential(*encoder)

        decoder: list[nn.Module] = [nn.Conv2d(latent_channels, width, 3, padding=1),
                                    ResidualBlock(width, width)]  # fmt: skip
        for level, out in reversed(list(enumerate(widths))):
            for _ in range(num_res_blocks):
                decoder.append(ResidualBlock(width, out))
                width = out
            if level > 0:
                decoder.append(Upsample(width))
        decoder += [group_norm(width), nn.SiLU(), nn.Conv2d(width, in_channels, 3, padding=1)]
        self.decoder = nn.Sequential(*decoder)

    def latent_shape(self, image_shape: Sequence[int]) -> tuple[int, int, int]:
        """``(latent_channels, H / f, W / f)`` of images ``(C, H, W)``; a side that ``f`` does
        not divide is a ValueError."""
        _, height, width = image_shape
        if height % self.factor or width % self.factor:
            raise ValueError(f"images of {height}x{width} pixels cannot be downsampled by "
                             f"{self.factor}: their sides must be multiples of it")  # fmt: skip
        return (self.latent_channels, height // self.factor, width // self.factor)

    def encode(self, x: Tensor) -> DiagonalGaussian:
        """The posterior ``q(z | x)`` of images ``x`` ``(N, C, H, W)``."""
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return DiagonalGaussian(mean, logvar.clamp(*LOGVAR_RANGE))

    def decode(self, z: Tensor) -> Tensor:
        """Images ``(N, C, H, W)`` (unbounded; clamp to ``[-1, 1]`` to show them) of latents."""
        return self.decoder(z)

    def forward(self, x: Tensor) -> Tensor:
        """The reconstruction ``D(mu(x))`` through the posterior mean."""
        return self.decode(self.encode(x).mean)


def psnr(x: Tensor, reconstruction: Tensor) -> Tensor:
    """Peak signal-to-noise ratio per image ``(N,)`` in dB of images in ``[-1, 1]`` (peak-to-peak
    range 2): ``10 log10(2^2 / MSE)``, the reconstruction clamped to ``[-1, 1]`` first."""
    mse = (reconstruction.clamp(-1, 1) - x).square().flatten(1).mean(dim=1)
    return 10.0 * torch.log10(4.0 / mse.clamp_min(1e-12))
