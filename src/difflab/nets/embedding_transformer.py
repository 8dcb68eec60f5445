"""The network of continuous diffusion on word embeddings (Diffusion-LM, Li et al. 2022; seed 000).

:class:`EmbeddingDiffusionNet` holds the two learned parts of the model, trained end to end:

- the word embedding ``E (V, d)``: the embedding step ``q_phi(x_0 | w) = N(E(w), sigma_0^2 I)``
  and the rounding step ``p_theta(w_i | x_0,i) = softmax(x_0,i E^T)`` (the rounding logits
  share ``E``, as in Diffusion-LM);
- the denoiser :class:`EmbeddingTransformer`: a bidirectional transformer over the ``L`` noisy
  vectors ``x_t (B, L, d)`` that predicts, per position, a ``d``-vector (``x_0`` by default),
  built from the blocks of :mod:`difflab.nets.transformer` (rotary positions, adaLN-Zero on
  the time embedding ``MLP(PE(c_noise))``).

With self-conditioning (Chen et al. 2023, seed 003) the denoiser also reads a previous estimate
``x0_prev (B, L, d)``: the input projection takes ``[x_t; x0_prev]`` (``2d`` features); without
it, it takes ``x_t`` alone and the network is the plain one.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from difflab.nets.embeddings import ConditionEmbedding, self_conditioned_input
from difflab.nets.transformer import TextBlock, _modulate, _Modulation, rotary_angles


class EmbeddingTransformer(nn.Module):
    """``forward(x_t (B, L, d), c_noise (B,), self_cond=None) -> (B, L, d)``.

    Args:
        dim: ``d``, the size of a word vector.
        length: the most positions it reads (longer inputs are refused).
        width, depth, num_heads, mlp_ratio, dropout: the transformer (``width / num_heads``
            even).
        self_condition: also read ``self_cond``, a previous estimate of ``x_0`` (zeros when
            ``None``).
        out_dim: the size of each output vector (empty: ``dim``).
    """

    def __init__(
        self,
        dim: int,
        length: int,
        width: int = 128,
        depth: int = 4,
        num_heads: int = 4,
        mlp_ratio: float = 4,
        dropout: float = 0.0,
        self_condition: bool = False,
        out_dim: int | None = None,
    ):
        super().__init__()
        self.dim, self.length, self.width = dim, length, width
        self.num_heads = num_heads
        self.self_condition = self_condition
        self.proj_in = nn.Linear(dim * (2 if self_condition else 1), width)
        self.condition = ConditionEmbedding(width)
        self.blocks = nn.ModuleList(
            TextBlock(width, num_heads, mlp_ratio, dropout, causal=False, conditioned=True)
            for _ in range(depth)
        )
        self.norm_out = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.ada_ln_out = _Modulation(width, 2, conditioned=True)
        self.proj_out = nn.Linear(width, out_dim or dim)
        for layer in [self.proj_in, self.proj_out] + [
            m for b in self.blocks for m in (b.attn.qkv, b.attn.out, b.mlp[0], b.mlp[2])
        ]:
            nn.init.normal_(layer.weight, std=0.02)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)

    def forward(self, x_t: Tensor, c_noise: Tensor, self_cond: Tensor | None = None) -> Tensor:
        batch, tokens, _ = x_t.shape
        if tokens > self.length:
            raise ValueError(f"input has {tokens} positions; this model's context is {self.length}")
        h = self.proj_in(self_conditioned_input(x_t, self_cond, self.self_condition, -1))
        c_noise = torch.as_tensor(c_noise, dtype=h.dtype, device=h.device)
        emb_act = nn.functional.silu(self.condition(c_noise, None, batch))
        positions = torch.arange(tokens, device=h.device)
        cos, sin = rotary_angles(positions, self.width // self.num_heads)
        for block in self.blocks:
            h = block(h, emb_act, cos, sin)
        shift, scale = self.ada_ln_out(emb_act)
        return self.proj_out(_modulate(self.norm_out(h), shift, scale))


class EmbeddingDiffusionNet(nn.Module):
    """The word embedding ``E`` (``embed``, ``N(0, 1)`` at initialisation as in Diffusion-LM)
    and the denoiser (``denoiser``); ``forward`` is the denoiser's, so a
    :class:`~difflab.gaussian.parameterization.Denoiser` can wrap this module."""

    def __init__(
        self,
        vocab_size: int,
        dim: int,
        length: int,
        self_condition: bool = False,
        **transformer: object,
    ):
        super().__init__()
        self.vocab_size = vocab_size
        self.self_condition = self_condition
        self.embed = nn.Embedding(vocab_size, dim)
        nn.init.normal_(self.embed.weight, std=1.0)
        self.denoiser = EmbeddingTransformer(
            dim,
            length,
            self_condition=self_condition,
            **transformer,  # type: ignore[arg-type]
        )

    def forward(self, x_t: Tensor, c_noise: Tensor, self_cond: Tensor | None = None) -> Tensor:
        return self.denoiser(x_t, c_noise, self_cond)

    def rounding_logits(self, x0: Tensor) -> Tensor:
        """``(B, L, V)`` logits of ``p_theta(w_i | x_0,i) = softmax(x_0,i E^T)``."""
        return x0 @ self.embed.weight.T


class NoisyTokenClassifier(nn.Module):
    """``forward(x_t (B, L, d), c_noise (B,)) -> (B, L, V)`` logits of ``p_phi(w_i | x_t, t)``,
    the word at each position read from the noisy latents: the classifier of Diffusion-LM's
    control (seed 000), an :class:`EmbeddingTransformer` whose outputs are ``V`` logits."""

    def __init__(self, vocab_size: int, dim: int, length: int, **transformer: object):
        super().__init__()
        self.vocab_size = vocab_size
        self.body = EmbeddingTransformer(dim, length, out_dim=vocab_size, **transformer)  # type: ignore[arg-type]

    def forward(self, x_t: Tensor, c_noise: Tensor) -> Tensor:
        return self.body(x_t, c_noise)
