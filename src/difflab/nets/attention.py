"""Multi-head scaled dot-product attention over token sequences ``(B, N, dim)``.

Each head computes ``softmax(Q K^T / sqrt(d)) V`` with ``d = dim / num_heads`` (Vaswani et al.
2017); the heads are concatenated and mixed by an output projection. The softmax product runs in
PyTorch's fused ``F.scaled_dot_product_attention`` (flash / memory-efficient kernels where the
device has them). Self-attention lets every pixel or patch see every other (the U-Net's
self-attention blocks, seed 004; DiT, seed 002); cross-attention lets them read a conditioning
sequence such as text-encoder states (seed 004, "more complex conditioning ... pass through cross
attention blocks"; Rombach et al. 2022).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from difflab.nets.embeddings import check_sizes


def check_heads(dim: int, num_heads: int) -> None:
    """Raise a ValueError unless ``num_heads >= 1`` heads split the width ``dim`` evenly."""
    check_sizes({"attention width": dim, "num_heads": num_heads})
    if dim % num_heads:
        raise ValueError(f"num_heads={num_heads} does not divide the attention width {dim}")


def check_context(context: Tensor | None, mask: Tensor | None, context_dim: int | None) -> None:
    """Raise a ValueError unless ``context`` ``(B, L, context_dim)`` is given exactly when the
    network has a ``context_dim``, and a ``mask`` only with a context."""
    if (context is None) != (context_dim is None):
        raise ValueError(
            "context is required exactly when the network has a context_dim "
            f"(context_dim={context_dim}, context given: {context is not None})"
        )
    if context is not None and (context.ndim != 3 or context.shape[-1] != context_dim):
        raise ValueError(f"context must be (B, L, {context_dim}), got {tuple(context.shape)}")
    if mask is not None and context is None:
        raise ValueError("context_mask was given without context")


def _merge_heads(out: Tensor) -> Tensor:
    """``(B, heads, N, d) -> (B, N, heads * d)``."""
    batch, heads, tokens, head_dim = out.shape
    return out.transpose(1, 2).reshape(batch, tokens, heads * head_dim)


class SelfAttention(nn.Module):
    """``x -> W_o [softmax(Q_h K_h^T / sqrt(d)) V_h]_h`` with ``Q, K, V`` from one fused
    projection of ``x``."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        check_heads(dim, num_heads)
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).view(batch, tokens, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        return self.out(_merge_heads(F.scaled_dot_product_attention(q, k, v)))


class CrossAttention(nn.Module):
    """Queries from ``x`` ``(B, N, dim)``, keys and values from ``context`` ``(B, L, context_dim)``.

    ``context_mask`` ``(B, L)`` bool marks the real context tokens (``True``; the Hugging Face
    ``attention_mask`` convention); padded tokens get zero attention weight, so they have no
    effect on the output. A sample with no real token attends to nothing and its output is
    exactly zero.
    """

    def __init__(self, dim: int, context_dim: int, num_heads: int):
        super().__init__()
        check_heads(dim, num_heads)
        check_sizes({"context_dim": context_dim})
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(context_dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: Tensor, context: Tensor, context_mask: Tensor | None = None) -> Tensor:
        batch, tokens, dim = x.shape
        heads, head_dim = self.num_heads, dim // self.num_heads
        q = self.q(x).view(batch, tokens, heads, head_dim).transpose(1, 2)
        kv = self.kv(context).view(batch, context.shape[1], 2, heads, head_dim)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)
        if context_mask is None:
            return self.out(_merge_heads(F.scaled_dot_product_attention(q, k, v)))
        if context_mask.shape != context.shape[:2] or context_mask.dtype != torch.bool:
            raise ValueError(
                f"context_mask must be a bool tensor of shape {tuple(context.shape[:2])}, "
                f"got {context_mask.dtype} of shape {tuple(context_mask.shape)}"
            )
        # An all-padding row would make the softmax 0/0; let it attend everywhere, then zero it.
        has_tokens = context_mask.any(dim=1)
        keep = context_mask | ~has_tokens[:, None]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])
        return self.out(_merge_heads(out)) * has_tokens[:, None, None]
