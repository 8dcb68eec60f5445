"""Diffusion Transformer with adaLN-Zero conditioning (Peebles & Xie 2023; seed 002, "DiT").

``x_t (B, C, H, W)`` is cut into ``p x p`` patches, each linearly embedded to a token of width
``width`` plus a fixed 2-D sin-cos position embedding (half the features encode the row, half the
column, each with the sinusoidal encoding of :func:`~difflab.nets.embeddings.sinusoidal_embedding`).
Each block conditions on ``e = MLP(PE(c_noise)) + E[y]`` through adaptive layer norm:

    (b1, s1, g1, b2, s2, g2) = Linear(SiLU(e))
    h <- h + g1 * Attn(LN(h) (1 + s1) + b1)
    h <- h + CrossAttn(LN(h), context)          (only with a ``context_dim``: text conditioning)
    h <- h + g2 * MLP(LN(h) (1 + s2) + b2)

with the modulation layers initialised to zero ("adaLN-Zero"), and the cross-attention's output
projection too, so every block starts as the identity on its residual stream ``h``. Text enters
through the cross-attention between the two modulated sub-layers, where each patch token reads
the text-encoder states (as in PixArt-alpha; the noise level and a class still enter through
``e``). A final adaLN-modulated linear layer, also zero-initialised, maps each token back to a
``p x p x C_out`` patch; the network outputs exactly ``0`` at initialisation. Attention runs in
PyTorch's fused ``scaled_dot_product_attention`` (:mod:`difflab.nets.attention`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from difflab.nets.attention import CrossAttention, SelfAttention, check_context, check_heads
from difflab.nets.embeddings import (
    ConditionEmbedding,
    check_sizes,
    self_conditioned_input,
    sinusoidal_embedding,
)


def sincos_position_embedding(rows: int, cols: int, dim: int) -> Tensor:
    """``(rows * cols, dim)``: ``[PE_{dim/2}(row), PE_{dim/2}(col)]`` in row-major token order."""
    if dim % 4:
        raise ValueError(f"2-D sin-cos position embedding needs a width divisible by 4, got {dim}")
    row = torch.arange(rows, dtype=torch.float32).repeat_interleave(cols)
    col = torch.arange(cols, dtype=torch.float32).repeat(rows)
    return torch.cat([sinusoidal_embedding(row, dim // 2), sinusoidal_embedding(col, dim // 2)], 1)


def unpatchify(tokens: Tensor, p: int, height: int, width: int) -> Tensor:
    """``(B, (H/p)(W/p), p p C) -> (B, C, H, W)``: row-major tokens, each a flattened
    ``(row in patch, column in patch, channel)`` patch, put back in place (the inverse of the
    patch embedding's cut into ``p x p`` patches)."""
    batch, _, features = tokens.shape
    channels = features // (p * p)
    patches = tokens.view(batch, height // p, width // p, p, p, channels)
    return patches.permute(0, 5, 1, 3, 2, 4).reshape(batch, channels, height, width)


def _modulate(h: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """``h (1 + scale) + shift`` with per-sample ``(B, D)`` modulation broadcast over tokens."""
    return torch.addcmul(shift[:, None], h, 1.0 + scale[:, None])


class DiTBlock(nn.Module):
    """Pre-norm transformer block with adaLN-Zero modulation of self-attention and MLP, and a
    cross-attention to ``context`` between them when ``context_dim`` is given."""

    def __init__(
        self, width: int, num_heads: int, mlp_ratio: float = 4.0, context_dim: int | None = None
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(width, num_heads)
        self.cross = None
        if context_dim is not None:
            self.norm_cross = nn.LayerNorm(width, eps=1e-6)
            self.cross = CrossAttention(width, context_dim, num_heads)
            nn.init.zeros_(self.cross.out.weight)
            nn.init.zeros_(self.cross.out.bias)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, width)
        )
        self.ada_ln = nn.Linear(width, 6 * width)
        nn.init.zeros_(self.ada_ln.weight)
        nn.init.zeros_(self.ada_ln.bias)

    def forward(
        self,
        h: Tensor,
        emb_act: Tensor,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
    ) -> Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada_ln(emb_act).chunk(6, dim=1)
        h = h + gate1[:, None] * self.attn(_modulate(self.norm1(h), shift1, scale1))
        if self.cross is not None:
            h = h + self.cross(self.norm_cross(h), context, context_mask)
        return h + gate2[:, None] * self.mlp(_modulate(self.norm2(h), shift2, scale2))


class DiT(nn.Module):
    """Diffusion Transformer ``forward(x, c_noise, class_labels=None, context=None,
    context_mask=None)`` of ``x``'s shape (with ``out_channels`` channels).

    Args:
        in_channels: channels of ``x_t``.
        image_size: the side the position-embedding table is precomputed for (other sizes
            divisible by ``patch_size`` run too, with the embedding computed on the fly).
        patch_size: side ``p`` of the square patches (tokens = ``(H / p) * (W / p)``).
        width: token width (divisible by ``4`` and by ``num_heads``).
        depth: number of transformer blocks.
        num_heads: attention heads.
        num_classes: enables ``class_labels``; index ``num_classes`` is the NULL class, used when
            ``class_labels`` is ``None``.
        out_channels: channels of the prediction (default ``in_channels``).
        mlp_ratio: hidden width of each block's MLP relative to ``width``.
        context_dim: width of the cross-attention ``context`` tokens (text conditioning).
        pooled_context: also add the mean of the context tokens to the conditioning vector
            (:class:`~difflab.nets.embeddings.ConditionEmbedding`).
        self_condition: also read ``self_cond``, a previous estimate of ``x_0`` of ``x``'s
            shape, as ``in_channels`` more input channels of each patch (zeros when not given:
            no estimate; Chen et al. 2023, :mod:`difflab.gaussian.self_conditioning`).
    """

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        patch_size: int = 2,
        width: int = 128,
        depth: int = 6,
        num_heads: int = 4,
        num_classes: int | None = None,
        out_channels: int | None = None,
        mlp_ratio: float = 4.0,
        context_dim: int | None = None,
        pooled_context: bool = False,
        self_condition: bool = False,
    ):
        super().__init__()
        check_sizes(
            {"in_channels": in_channels, "image_size": image_size, "patch_size": patch_size,
             "width": width} | ({} if out_channels is None else {"out_channels": out_channels})
            | ({} if context_dim is None else {"context_dim": context_dim}),
            {"depth": depth},
        )  # fmt: skip
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not divisible by patch_size {patch_size}")
        if width % 4:
            raise ValueError(
                f"width {width} is not divisible by 4, which the 2-D sin-cos position embedding "
                "needs (half the features per axis, each half sines and cosines)"
            )
        check_heads(width, num_heads)
        if not mlp_ratio > 0 or int(width * mlp_ratio) < 1:
            raise ValueError(f"mlp_ratio {mlp_ratio} leaves the MLP of width {width} no features")
        self.in_channels = in_channels
        self.out_channels = out_channels or in_channels
        self.patch_size = patch_size
        self.context_dim = context_dim
        self.self_condition = self_condition
        self.embed = ConditionEmbedding(
            width, num_classes, context_dim=context_dim if pooled_context else None
        )
        inputs = in_channels * (2 if self_condition else 1)
        self.patch_embed = nn.Conv2d(inputs, width, patch_size, stride=patch_size)
        self.grid = image_size // patch_size
        self.register_buffer(
            "pos_embed", sincos_position_embedding(self.grid, self.grid, width), persistent=False
        )
        self.blocks = nn.ModuleList(
            DiTBlock(width, num_heads, mlp_ratio, context_dim) for _ in range(depth)
        )
        self.norm_out = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.ada_ln_out = nn.Linear(width, 2 * width)
        self.proj_out = nn.Linear(width, patch_size * patch_size * self.out_channels)
        for layer in (self.ada_ln_out, self.proj_out):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

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
        context_mask: Tensor | None = None,
        self_cond: Tensor | None = None,
    ) -> Tensor:
        """Predict from ``x`` ``(B, in_channels, H, W)`` at noise level ``c_noise`` ``(B,)``;
        ``class_labels`` ``(B,)`` int; ``context`` ``(B, L, context_dim)`` with optional
        ``context_mask`` ``(B, L)`` bool (``True`` = real token); ``self_cond`` of ``x``'s
        shape."""
        self._check_inputs(x, context, context_mask)
        x = self_conditioned_input(x, self_cond, self.self_condition)
        p = self.patch_size
        batch, _, height, width = x.shape
        rows, cols = height // p, width // p
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)  # one token per p x p patch
        pos = self.pos_embed
        if (rows, cols) != (self.grid, self.grid):
            pos = sincos_position_embedding(rows, cols, tokens.shape[-1]).to(tokens.device)
        h = tokens + pos.to(tokens.dtype)
        emb_act = F.silu(self.embed(c_noise, class_labels, batch, context, context_mask))
        for block in self.blocks:
            h = block(h, emb_act, context, context_mask)
        shift, scale = self.ada_ln_out(emb_act).chunk(2, dim=1)
        return unpatchify(self.proj_out(_modulate(self.norm_out(h), shift, scale)), p,
                          height, width)  # fmt: skip

    def _check_inputs(self, x: Tensor, context: Tensor | None, context_mask: Tensor | None) -> None:
        p = self.patch_size
        if x.ndim != 4 or x.shape[1] != self.in_channels or x.shape[-1] % p or x.shape[-2] % p:
            raise ValueError(
                f"expected x of shape (B, {self.in_channels}, H, W) with H and W divisible by "
                f"patch_size {p}, got {tuple(x.shape)}"
            )
        check_context(context, context_mask, self.context_dim)
