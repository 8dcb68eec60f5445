"""The denoising U-Net (Ronneberger et al. 2015, as adapted by Ho et al. 2020 and Dhariwal &
Nichol 2021; seeds 001, 002 and 004, "Unet denoiser").

An image-to-image network ``(x_t, c_noise, cond) -> prediction`` of ``x_t``'s shape:

- a convolutional encoder of residual blocks that halves the resolution between levels, a middle
  block (residual, attention, residual) at the lowest resolution, and a decoder that mirrors the
  encoder and concatenates the encoder's activations (skip connections) before every block;
- every residual block reads the conditioning vector ``e = MLP(PE(c_noise)) + E[y]``
  (:mod:`difflab.nets.embeddings`) as a scale and shift of its second normalisation (FiLM,
  ``h <- GN(h) (1 + s(e)) + b(e)``);
- attention blocks (self-attention, plus cross-attention to ``context`` when the network has a
  ``context_dim``, for text conditioning) at the chosen resolutions and in the middle;
- ``cond_channels > 0``: a low-resolution image is bilinearly upsampled to ``x_t``'s size and
  concatenated on channels (cascaded super-resolution, Saharia et al. 2021; seed 004);
- the last convolution of every residual branch, the attention output projections and the final
  convolution start at zero, so every residual branch starts at zero (Ho et al. 2020) and the
  network outputs exactly ``0`` at initialisation.

Tensors may be in either memory format; with ``model.to(memory_format=torch.channels_last)`` and
channels-last inputs, the attention blocks read and write their token view without a copy.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from difflab.nets.attention import CrossAttention, SelfAttention, check_context, check_heads
from difflab.nets.embeddings import ConditionEmbedding, check_sizes, self_conditioned_input


def _levels(
    image_size: int,
    channel_mults: Sequence[int],
    attn_resolutions: Sequence[int],
    channels: int,
    num_heads: int,
) -> list[int]:
    """The resolution of each level, after checking that the levels, the attention resolutions
    and the heads fit together (a ValueError in one sentence otherwise)."""
    if not channel_mults:
        raise ValueError("channel_mults must list at least one level")
    check_sizes({f"channel_mults[{i}]": m for i, m in enumerate(channel_mults)})
    factor = 2 ** (len(channel_mults) - 1)
    if image_size % factor:
        raise ValueError(
            f"image_size {image_size} is not divisible by 2**(len(channel_mults)-1) = {factor}"
        )
    resolutions = [image_size // 2**level for level in range(len(channel_mults))]
    if unknown := sorted(set(attn_resolutions) - set(resolutions)):
        raise ValueError(
            f"attn_resolutions {unknown} match no level; with image_size={image_size} and "
            f"{len(channel_mults)} levels the resolutions are {resolutions}"
        )
    # Attention runs at the chosen levels and in the middle block (the last level's width).
    attention_levels = {len(channel_mults) - 1} | {resolutions.index(r) for r in attn_resolutions}
    for level in sorted(attention_levels):
        check_heads(channels * channel_mults[level], num_heads)
    return resolutions


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with the most groups ``g <= 32`` that divide ``channels`` and keep ``>= 4``
    channels per group (one group, i.e. LayerNorm over ``(C, H, W)``, for fewer than 8)."""
    limit = min(32, max(1, channels // 4))
    groups = max(g for g in range(1, limit + 1) if channels % g == 0)
    return nn.GroupNorm(groups, channels)


def _same_memory_format(y: Tensor, like: Tensor) -> Tensor:
    """``y`` in ``like``'s memory format (a no-op when it already is)."""
    channels_last = like.is_contiguous(memory_format=torch.channels_last)
    return y.contiguous(
        memory_format=torch.channels_last if channels_last else torch.contiguous_format
    )


class ResBlock(nn.Module):
    """``x -> skip(x) + conv2(dropout(SiLU(GN(h) (1 + s) + b)))`` with
    ``h = conv1(SiLU(GN(x)))`` and ``(s, b) = Linear(SiLU(e))``; ``conv2`` starts at zero."""

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int, dropout: float):
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.film = nn.Linear(emb_dim, 2 * out_channels)
        self.norm2 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = (
            nn.Conv2d(in_channels, out_channels, 1)
            if in_channels != out_channels
            else nn.Identity()
        )

    def forward(self, x: Tensor, emb_act: Tensor) -> Tensor:
        """``emb_act = SiLU(e)``, shape ``(B, emb_dim)``, computed once per network call."""
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.film(emb_act)[:, :, None, None].chunk(2, dim=1)
        h = F.silu(torch.addcmul(shift, self.norm2(h), 1.0 + scale))
        return self.skip(x) + self.conv2(self.dropout(h))


class AttentionBlock(nn.Module):
    """Attention over the ``H * W`` pixels as tokens of width ``C``:
    ``t <- t + SelfAttn(LN(t))``, then ``t <- t + CrossAttn(LN(t), context)`` when
    ``context_dim`` is set. Both output projections start at zero."""

    def __init__(self, channels: int, num_heads: int, context_dim: int | None):
        super().__init__()
        self.norm = nn.LayerNorm(channels)
        self.self_attn = SelfAttention(channels, num_heads)
        nn.init.zeros_(self.self_attn.out.weight)
        nn.init.zeros_(self.self_attn.out.bias)
        if context_dim is None:
            self.cross_norm, self.cross_attn = None, None
        else:
            self.cross_norm = nn.LayerNorm(channels)
            self.cross_attn = CrossAttention(channels, context_dim, num_heads)
            nn.init.zeros_(self.cross_attn.out.weight)
            nn.init.zeros_(self.cross_attn.out.bias)

    def forward(self, x: Tensor, context: Tensor | None, context_mask: Tensor | None) -> Tensor:
        batch, channels, height, width = x.shape
        tokens = x.permute(0, 2, 3, 1).reshape(batch, height * width, channels)
        tokens = tokens + self.self_attn(self.norm(tokens))
        if self.cross_attn is not None:
            tokens = tokens + self.cross_attn(self.cross_norm(tokens), context, context_mask)
        out = tokens.view(batch, height, width, channels).permute(0, 3, 1, 2)
        return _same_memory_format(out, x)


class Downsample(nn.Module):
    """Halve the resolution with a stride-2 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour upsampling, then a 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Stage(nn.Module):
    """One step of the U-Net: an optional residual block, then optional attention, then optional
    resampling."""

    def __init__(
        self,
        res: ResBlock | None,
        attn: AttentionBlock | None = None,
        resample: nn.Module | None = None,
    ):
        super().__init__()
        self.res, self.attn, self.resample = res, attn, resample

    def forward(
        self, h: Tensor, emb_act: Tensor, context: Tensor | None, context_mask: Tensor | None
    ) -> Tensor:
        if self.res is not None:
            h = self.res(h, emb_act)
        if self.attn is not None:
            h = self.attn(h, context, context_mask)
        if self.resample is not None:
            h = self.resample(h)
        return h


class UNet(nn.Module):
    """Denoising U-Net; ``forward(x, c_noise, ...)`` returns a tensor of ``x``'s shape
    (with ``out_channels`` channels).

    Args:
        in_channels: channels of ``x_t``.
        out_channels: channels of the prediction (default ``in_channels``).
        channels: width of the first level; level ``i`` has ``channels * channel_mults[i]``.
        channel_mults: one entry per resolution level; the resolution halves between levels, so
            inputs need sides divisible by ``2 ** (len(channel_mults) - 1)``.
        num_res_blocks: residual blocks per level in the encoder (the decoder has one more).
        attn_resolutions: resolutions (at ``image_size`` input) whose levels get attention blocks;
            the middle block always has one.
        image_size: the side the network is built for (only used to place attention blocks;
            other sizes divisible by ``2 ** (len(channel_mults) - 1)`` run too).
        num_classes: enables ``class_labels``; index ``num_classes`` is the NULL class, used when
            ``class_labels`` is ``None``.
        dropout: dropout rate inside residual blocks.
        num_heads: attention heads (must divide every level's width).
        cond_channels: channels of the low-resolution conditioning image ``low_res``.
        context_dim: width of the cross-attention ``context`` tokens.
        pooled_context: also add the mean of the context tokens to the conditioning vector
            (:class:`~difflab.nets.embeddings.ConditionEmbedding`).
        self_condition: also read ``self_cond``, a previous estimate of ``x_0`` of ``x``'s
            shape, as ``in_channels`` more input channels (zeros when not given: no estimate;
            Chen et al. 2023, :mod:`difflab.gaussian.self_conditioning`).
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int | None = None,
        channels: int = 64,
        channel_mults: Sequence[int] = (1, 2),
        num_res_blocks: int = 2,
        attn_resolutions: Sequence[int] = (4,),
        image_size: int = 8,
        num_classes: int | None = None,
        dropout: float = 0.0,
        num_heads: int = 4,
        cond_channels: int = 0,
        context_dim: int | None = None,
        pooled_context: bool = False,
        self_condition: bool = False,
    ):
        super().__init__()
        check_sizes(
            {"in_channels": in_channels, "channels": channels, "image_size": image_size}
            | ({} if out_channels is None else {"out_channels": out_channels})
            | ({} if context_dim is None else {"context_dim": context_dim}),
            {"num_res_blocks": num_res_blocks, "cond_channels": cond_channels},
        )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        resolutions = _levels(image_size, channel_mults, attn_resolutions, channels, num_heads)
        factor = 2 ** (len(channel_mults) - 1)
        self.in_channels = in_channels
        self.out_channels = out_channels or in_channels
        self.cond_channels = cond_channels
        self.context_dim = context_dim
        self.self_condition = self_condition
        self.factor = factor
        emb_dim = 4 * channels
        pooled = context_dim if pooled_context else None
        self.embed = ConditionEmbedding(emb_dim, num_classes, channels + channels % 2, pooled)

        def res(cin: int, cout: int) -> ResBlock:
            return ResBlock(cin, cout, emb_dim, dropout)

        def attn(ch: int, resolution: int) -> AttentionBlock | None:
            if resolution not in attn_resolutions:
                return None
            return AttentionBlock(ch, num_heads, context_dim)

        inputs = in_channels * (2 if self_condition else 1) + cond_channels
        self.conv_in = nn.Conv2d(inputs, channels, 3, padding=1)
        ch, skip_channels = channels, [channels]
        down: list[Stage] = []
        for level, (mult, resolution) in enumerate(zip(channel_mults, resolutions, strict=True)):
            for _ in range(num_res_blocks):
                down.append(Stage(res(ch, channels * mult), attn(channels * mult, resolution)))
                ch = channels * mult
                skip_channels.append(ch)
            if level < len(channel_mults) - 1:
                down.append(Stage(None, None, Downsample(ch)))
                skip_channels.append(ch)
        self.down = nn.ModuleList(down)
        self.mid = nn.ModuleList(
            [Stage(res(ch, ch), AttentionBlock(ch, num_heads, context_dim)), Stage(res(ch, ch))]
        )
        up: list[Stage] = []
        for level in reversed(range(len(channel_mults))):
            cout = channels * channel_mults[level]
            for i in range(num_res_blocks + 1):
                last = i == num_res_blocks and level > 0
                up.append(
                    Stage(
                        res(ch + skip_channels.pop(), cout),
                        attn(cout, resolutions[level]),
                        Upsample(cout) if last else None,
                    )
                )
                ch = cout
        self.up = nn.ModuleList(up)
        self.norm_out = group_norm(ch)
        self.conv_out = nn.Conv2d(ch, self.out_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    @property
    def null_class(self) -> int | None:
        """Index of the NULL (unconditional) label, ``num_classes``; ``None`` if unconditional."""
        return self.embed.null_class

    def forward(
        self,
        x: Tensor,
        c_noise: Tensor,
        class_labels: Tensor | None = None,
        context: Tensor | None = None,
        low_res: Tensor | None = None,
        context_mask: Tensor | None = None,
        self_cond: Tensor | None = None,
    ) -> Tensor:
        """Predict from ``x`` ``(B, in_channels, H, W)`` at noise level ``c_noise`` ``(B,)``.

        ``class_labels`` ``(B,)`` int; ``context`` ``(B, L, context_dim)`` with optional
        ``context_mask`` ``(B, L)`` bool (``True`` = real token); ``low_res``
        ``(B, cond_channels, h, w)`` with ``h <= H``, ``w <= W``; ``self_cond`` of ``x``'s shape.
        """
        self._check_inputs(x, context, low_res, context_mask)
        x = self_conditioned_input(x, self_cond, self.self_condition)
        if low_res is not None:
            if low_res.shape[-2:] != x.shape[-2:]:
                low_res = F.interpolate(
                    low_res, size=x.shape[-2:], mode="bilinear", align_corners=False
                )
            x = torch.cat([x, low_res.to(x.dtype)], dim=1)
        emb_act = F.silu(self.embed(c_noise, class_labels, x.shape[0], context, context_mask))
        h = self.conv_in(x)
        skips = [h]
        for stage in self.down:
            h = stage(h, emb_act, context, context_mask)
            skips.append(h)
        for stage in self.mid:
            h = stage(h, emb_act, context, context_mask)
        for stage in self.up:
            h = stage(torch.cat([h, skips.pop()], dim=1), emb_act, context, context_mask)
        return self.conv_out(F.silu(self.norm_out(h)))

    def _check_inputs(
        self,
        x: Tensor,
        context: Tensor | None,
        low_res: Tensor | None,
        context_mask: Tensor | None,
    ) -> None:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"expected x of shape (B, {self.in_channels}, H, W), got {tuple(x.shape)}"
            )
        if x.shape[-1] % self.factor or x.shape[-2] % self.factor:
            raise ValueError(
                f"image sides {tuple(x.shape[-2:])} must be divisible by {self.factor}"
            )
        if (low_res is None) != (self.cond_channels == 0):
            raise ValueError(
                "low_res is required exactly when the network has cond_channels > 0 "
                f"(cond_channels={self.cond_channels}, low_res given: {low_res is not None})"
            )
        if low_res is not None and (
            low_res.ndim != 4
            or low_res.shape[1] != self.cond_channels
            or low_res.shape[-2] > x.shape[-2]
            or low_res.shape[-1] > x.shape[-1]
        ):
            raise ValueError(
                f"low_res must be (B, {self.cond_channels}, h, w) no larger than x's "
                f"{tuple(x.shape[-2:])}, got {tuple(low_res.shape)}"
            )
        check_context(context, context_mask, self.context_dim)
