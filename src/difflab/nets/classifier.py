"""A time-conditioned noisy classifier network ``(x_t, t) -> logits of p_phi(y | x_t, t)``.

The encoder half of the U-Net (seed 004; Dhariwal & Nichol 2021 use the same): residual blocks
that read the timestep embedding ``MLP(PE(1000 t))`` by FiLM, halving the resolution between
levels, then GroupNorm, SiLU, a global average pool and a linear read-out to the class logits.
It is called as ``classifier(x_t, t)`` with ``t`` the diffusion time in ``[0, 1]`` of the schedule
it was trained on, which is what :class:`~difflab.gaussian.guidance.ClassifierGuidance` passes;
the ``classifier`` recipe trains it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from difflab.nets.embeddings import TimestepEmbedding
from difflab.nets.unet import Downsample, ResBlock, group_norm


class NoisyClassifier(nn.Module):
    """``(x_t, t) -> (B, num_classes)`` logits of ``p_phi(y | x_t, t)`` (see the module docstring).

    Args:
        in_channels: channels of ``x_t``.
        num_classes: number of classes ``K``.
        channels, channel_mults, num_res_blocks, dropout: width of the first level, one width
            multiplier per resolution level, residual blocks per level, dropout inside them.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        channels: int = 32,
        channel_mults: Sequence[int] = (1, 2),
        num_res_blocks: int = 1,
        dropout: float = 0.0,
    ):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"a classifier needs at least 2 classes, got {num_classes}")
        emb_dim = 4 * channels
        self.time = TimestepEmbedding(emb_dim, freq_dim=channels + channels % 2)
        self.conv_in = nn.Conv2d(in_channels, channels, 3, padding=1)
        blocks: list[nn.Module] = []
        ch = channels
        for level, mult in enumerate(channel_mults):
            for _ in range(num_res_blocks):
                blocks.append(ResBlock(ch, channels * mult, emb_dim, dropout))
                ch = channels * mult
            if level < len(channel_mults) - 1:
                blocks.append(Downsample(ch))
        self.blocks = nn.ModuleList(blocks)
        self.norm_out = group_norm(ch)
        self.head = nn.Linear(ch, num_classes)
        self.num_classes = num_classes

    def forward(self, x_t: Tensor, t: Tensor) -> Tensor:
        """Class logits ``(B, K)`` for ``x_t`` ``(B, C, H, W)`` at diffusion times ``t``
        (``(B,)`` or a scalar, in ``[0, 1]``)."""
        t = t.reshape(-1).expand(x_t.shape[0])
        emb_act = F.silu(self.time((1000.0 * t).to(x_t.dtype)))
        h = self.conv_in(x_t)
        for block in self.blocks:
            h = block(h, emb_act) if isinstance(block, ResBlock) else block(h)
        return self.head(F.silu(self.norm_out(h)).mean(dim=(2, 3)))
