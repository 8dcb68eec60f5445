"""Text conditioning for images: a small caption encoder and the denoising network (U-Net or DiT)
that cross-attends to its states (seed 004: "more complex conditioning ... pass through cross
attention blocks")."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class TextEncoder(nn.Module):
    """``tokens (B, L) -> (states (B, L, dim), mask (B, L))`` for captions of at most
    ``max_tokens`` ids below ``vocab_size`` padded with ``pad``: word plus learned position
    embeddings, ``depth`` pre-norm transformer layers attending to the real words only, and a
    final LayerNorm. ``mask`` is ``True`` at real words; the cross-attention ignores the rest, so
    the empty caption conditions on nothing."""

    def __init__(
        self,
        vocab_size: int,
        max_tokens: int,
        dim: int = 64,
        depth: int = 2,
        num_heads: int = 4,
        pad: int = 0,
    ):
        super().__init__()
        if dim < 1 or depth < 1 or num_heads < 1 or dim % num_heads:
            raise ValueError(f"the text encoder's width {dim} must be a positive multiple of "
                             f"its {num_heads} heads, with depth >= 1")  # fmt: skip
        self.pad = pad
        self.words = nn.Embedding(vocab_size, dim, padding_idx=pad)
        self.positions = nn.Parameter(torch.randn(max_tokens, dim) * 0.02)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(
                dim,
                num_heads,
                dim_feedforward=2 * dim,
                dropout=0.0,
                batch_first=True,
                norm_first=True,
            )
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        mask = tokens != self.pad
        # A caption without words would leave its attention rows empty (0/0): let those attend
        # everywhere; the U-Net's cross-attention ignores them anyway.
        ignore = ~mask & mask.any(dim=1, keepdim=True)
        h = self.words(tokens) + self.positions[: tokens.shape[1]]
        for layer in self.layers:
            h = layer(h, src_key_padding_mask=ignore)
        return self.norm(h), mask


class TextConditionedNet(nn.Module):
    """The denoising network ``(x_t, c_noise, tokens) -> prediction``: ``net`` (a U-Net or a DiT
    built with a ``context_dim``) cross-attending to the :class:`TextEncoder` states of
    ``tokens``, trained jointly with it."""

    def __init__(self, encoder: TextEncoder, net: nn.Module):
        super().__init__()
        self.encoder, self.net = encoder, net
        self.register_load_state_dict_pre_hook(_rename_unet)

    def forward(self, x: Tensor, c_noise: Tensor, tokens: Tensor) -> Tensor:
        context, mask = self.encoder(tokens)
        return self.net(x, c_noise, context=context, context_mask=mask)


def _rename_unet(module: nn.Module, state_dict: dict[str, Tensor], prefix: str, *_: object) -> None:
    """difflab 0.2 named the network ``unet`` (text-to-digit only had U-Nets): read those keys
    as ``net``."""
    for key in [k for k in state_dict if k.startswith(prefix + "unet.")]:
        state_dict[prefix + "net." + key[len(prefix) + 5 :]] = state_dict.pop(key)
