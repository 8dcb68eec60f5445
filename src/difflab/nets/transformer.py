"""Text transformer: the bidirectional denoiser of discrete diffusion and, causal, its
autoregressive baseline (seed 003; the DiT-style backbone of MDLM, Sahoo et al. 2024).

Tokens are embedded, pass ``depth`` pre-norm blocks with rotary position embeddings and
adaLN-Zero modulation, and a final modulated layer norm feeds the output head:

    (b1, s1, g1, b2, s2, g2) = Linear(SiLU(e))                  (zero-initialised)
    h <- h + g1 * Attn(RoPE; LN(h) (1 + s1) + b1)
    h <- h + g2 * MLP(LN(h) (1 + s2) + b2)
    logits = W_out (LN(h) (1 + s) + b)

``e = MLP(PE(1000 t)) + E[y]`` is the condition vector of :mod:`difflab.nets.embeddings`
(time ``t in [0, 1]`` on the DDPM timestep scale, plus an optional class label). With
``time_conditioning=False`` (as MDLM trains its time-agnostic model) and no classes there is no
condition vector; the six modulation vectors are then learned constants, still zero-initialised,
so the network is an ordinary pre-norm transformer whose blocks start as the identity.

Rotary position embeddings (Su et al. 2021) rotate each query and key feature pair ``i`` at
position ``m`` by the angle ``m theta_i`` with ``theta_i = 10000^(-2i/d)``; the score
``<R_m q, R_n k> = <q, R_{n-m} k>`` then depends on the positions only through ``n - m``.
Attention runs in PyTorch's ``F.scaled_dot_product_attention`` (fused kernels where the device has
them; no flash-attn dependency).

With ``causal=True`` each position attends only to itself and the past, ``forward(x)`` gives
next-token logits, and ``forward(x, cache=cache)`` appends to a key/value cache
(:meth:`TextTransformer.new_cache`), as :mod:`difflab.discrete.autoregressive` samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from difflab.nets.embeddings import ClassEmbedding, ConditionEmbedding

ROPE_BASE = 10000.0


def rotary_angles(
    positions: Tensor, head_dim: int, base: float = ROPE_BASE
) -> tuple[Tensor, Tensor]:
    """``(cos, sin)`` of ``m theta_i``, each ``(len(positions), head_dim)`` in float32, laid out
    for :func:`apply_rotary` (the ``head_dim / 2`` frequencies repeated for both halves)."""
    if head_dim % 2:
        raise ValueError(f"rotary embeddings need an even head dimension, got {head_dim}")
    inv_freq = base ** (
        -torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim
    )
    angles = positions.to(torch.float32)[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate feature pairs ``(x_i, x_{i + d/2})`` of ``x (..., L, d)`` by the angles of
    ``cos, sin (L, d)``: ``x cos + rotate_half(x) sin`` with ``rotate_half(x) = (-x_2, x_1)``."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


def _modulate(h: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """``h (1 + scale) + shift`` with ``(B or 1, D)`` modulation broadcast over tokens."""
    return torch.addcmul(shift[:, None], h, 1.0 + scale[:, None])


@dataclass
class KVCache:
    """Keys and values of the tokens seen so far, per layer ``(B, heads, capacity, head_dim)``;
    ``length`` tokens are filled. Made by :meth:`TextTransformer.new_cache`."""

    keys: list[Tensor]
    values: list[Tensor]
    length: int = 0

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]


class RotarySelfAttention(nn.Module):
    """Multi-head self-attention with rotary queries and keys, optionally causal, optionally
    appending to and reading from one layer of a :class:`KVCache`."""

    def __init__(self, width: int, num_heads: int, dropout: float, causal: bool):
        super().__init__()
        if num_heads < 1 or width % num_heads:
            raise ValueError(f"width {width} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.dropout = dropout
        self.causal = causal
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.out = nn.Linear(width, width)

    def forward(
        self,
        h: Tensor,
        cos: Tensor,
        sin: Tensor,
        cache: tuple[Tensor, Tensor] | None = None,
        start: int = 0,
        attn_mask: Tensor | tuple[Tensor, Tensor] | None = None,
        queries: int | None = None,
    ) -> Tensor:
        """The outputs of all tokens of ``h``, or of its first ``queries`` only (all of them
        still read as keys and values)."""
        batch, tokens, width = h.shape
        qkv = self.qkv(h).view(batch, tokens, 3, self.num_heads, width // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        if queries is not None:
            q = q[:, :, :queries]
        q = apply_rotary(q, cos[: q.shape[2]], sin[: q.shape[2]])
        k = apply_rotary(k, cos, sin)
        if isinstance(attn_mask, tuple):
            if cache is not None:
                raise ValueError("a two-stream mask is for training, without a cache")
            out = self._two_streams(q, k, v, attn_mask)
            return self.out(out.transpose(1, 2).reshape(batch, q.shape[2], width))
        if queries is not None and attn_mask is not None:
            attn_mask = attn_mask[:queries]
        mask, is_causal = None, self.causal
        if cache is not None:
            keys, values = cache
            keys[:, :, start : start + tokens] = k
            values[:, :, start : start + tokens] = v
            k, v = keys[:, :, : start + tokens], values[:, :, : start + tokens]
            is_causal = False
            if tokens > 1 and self.causal:  # new query i at position start + i sees 0..start + i
                query_pos = torch.arange(start, start + tokens, device=h.device)
                mask = torch.arange(start + tokens, device=h.device)[None, :] <= query_pos[:, None]
        if attn_mask is not None:
            mask, is_causal = attn_mask, False
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=is_causal,
        )
        return self.out(out.transpose(1, 2).reshape(batch, q.shape[2], width))

    def _two_streams(self, q: Tensor, k: Tensor, v: Tensor, masks: tuple[Tensor, Tensor]) -> Tensor:
        """Attention over a sequence ``[a, b]`` in which no query of ``b`` reads a key of ``a``
        (block diffusion's ``[x_t, x_0]``), for the first ``q.shape[2]`` queries: ``first``
        (bool ``(La, La + Lb)``) masks the queries of ``a`` over all keys, ``second`` (bool
        ``(Lb, Lb)``) those of ``b`` over the keys of ``b``. Two calls, the second without the
        ``La`` keys it cannot see: for ``La = Lb = L``, ``3 L^2`` scores where one dense
        ``(2L, 2L)`` mask costs ``4 L^2``."""
        (first, second), dropout = masks, self.dropout if self.training else 0.0
        split = first.shape[0]
        out = F.scaled_dot_product_attention(
            q[:, :, :split], k, v, attn_mask=first[: q.shape[2]], dropout_p=dropout
        )
        if q.shape[2] <= split:
            return out
        rest = F.scaled_dot_product_attention(
            q[:, :, split:],
            k[:, :, split:],
            v[:, :, split:],
            attn_mask=second[: q.shape[2] - split],
            dropout_p=dropout,
        )
        return torch.cat([out, rest], dim=2)


class TextBlock(nn.Module):
    """Pre-norm block with adaLN-Zero modulation from the condition vector, or from learned
    constants when the network has no condition."""

    def __init__(
        self,
        width: int,
        num_heads: int,
        mlp_ratio: float,
        dropout: float,
        causal: bool,
        conditioned: bool,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = RotarySelfAttention(width, num_heads, dropout, causal)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, width)
        )
        self.drop = nn.Dropout(dropout)
        self.ada_ln = _Modulation(width, 6, conditioned)

    def forward(
        self,
        h: Tensor,
        emb_act: Tensor | None,
        cos: Tensor,
        sin: Tensor,
        cache: tuple[Tensor, Tensor] | None = None,
        start: int = 0,
        attn_mask: Tensor | tuple[Tensor, Tensor] | None = None,
        queries: int | None = None,
    ) -> Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada_ln(emb_act)
        h_in = _modulate(self.norm1(h), shift1, scale1)
        attn = self.attn(h_in, cos, sin, cache, start, attn_mask, queries)
        h = h[:, : attn.shape[1]] + gate1[:, None] * self.drop(attn)
        return h + gate2[:, None] * self.drop(self.mlp(_modulate(self.norm2(h), shift2, scale2)))


class _Modulation(nn.Module):
    """``count`` modulation vectors of width ``width``: ``Linear(SiLU(e))`` when conditioned,
    else learned constants; zero at initialisation either way."""

    def __init__(self, width: int, count: int, conditioned: bool):
        super().__init__()
        self.count = count
        if conditioned:
            self.linear = nn.Linear(width, count * width)
            nn.init.zeros_(self.linear.weight)
            nn.init.zeros_(self.linear.bias)
        else:
            self.constant = nn.Parameter(torch.zeros(1, count * width))

    def forward(self, emb_act: Tensor | None) -> tuple[Tensor, ...]:
        values = self.constant if emb_act is None else self.linear(emb_act)
        return values.chunk(self.count, dim=1)


class TextTransformer(nn.Module):
    """Transformer over token ids: ``forward(x_t (B, L), t (B,) or scalar in [0, 1], cond=None)
    -> logits (B, L, vocab_size)``.

    Args:
        vocab_size: number of token ids (special tokens included).
        length: the context length it is trained for; longer inputs are refused.
        width, depth, num_heads, mlp_ratio: transformer size (``width / num_heads`` even).
        dropout: on attention weights and on each residual branch, in training mode.
        causal: autoregressive model (each position sees only the past; ``t`` is not used).
        time_conditioning: condition on ``t`` through adaLN; default ``not causal``.
            ``False`` makes the output independent of ``t`` (MDLM's time-agnostic denoiser).
        num_classes: enables ``cond``, a ``(B,)`` label in ``0..num_classes``; ``num_classes``
            (also used when ``cond`` is ``None``) is the NULL label of classifier-free guidance.
        tie_embeddings: output head shares the token embedding matrix; otherwise a separate,
            zero-initialised head (uniform logits at initialisation).
    """

    def __init__(
        self,
        vocab_size: int,
        length: int,
        width: int = 256,
        depth: int = 6,
        num_heads: int = 4,
        mlp_ratio: float = 4,
        dropout: float = 0.0,
        causal: bool = False,
        time_conditioning: bool | None = None,
        num_classes: int | None = None,
        tie_embeddings: bool = False,
    ):
        super().__init__()
        if time_conditioning is None:
            time_conditioning = not causal
        if causal and time_conditioning:
            raise ValueError("a causal (autoregressive) TextTransformer takes no time input")
        self.vocab_size = vocab_size
        self.length = length
        self.width = width
        self.num_heads = num_heads
        self.causal = causal
        self.time_conditioning = time_conditioning
        self.num_classes = num_classes
        self.embed = nn.Embedding(vocab_size, width)
        if time_conditioning:
            self.condition: nn.Module | None = ConditionEmbedding(width, num_classes)
        elif num_classes is not None:
            self.condition = ClassEmbedding(num_classes, width)
        else:
            self.condition = None
        conditioned = self.condition is not None
        self.blocks = nn.ModuleList(
            TextBlock(width, num_heads, mlp_ratio, dropout, causal, conditioned)
            for _ in range(depth)
        )
        self.norm_out = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.ada_ln_out = _Modulation(width, 2, conditioned)
        self.head = None if tie_embeddings else nn.Linear(width, vocab_size)
        self._init_weights()

    def _init_weights(self) -> None:
        """GPT-2 style ``N(0, 0.02)`` for the embedding and the blocks' projections; the
        modulation (and an untied head) stay at zero."""
        nn.init.normal_(self.embed.weight, std=0.02)
        for block in self.blocks:
            for layer in (block.attn.qkv, block.attn.out, block.mlp[0], block.mlp[2]):
                nn.init.normal_(layer.weight, std=0.02)
                if layer.bias is not None:
                    nn.init.zeros_(layer.bias)
        if self.head is not None:
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    @property
    def null_class(self) -> int | None:
        """The NULL label (``num_classes``), or ``None`` for an unconditional network."""
        return self.num_classes

    def new_cache(self, batch_size: int, capacity: int | None = None) -> KVCache:
        """An empty key/value cache for ``batch_size`` rows of up to ``capacity`` tokens
        (default: the context length), on the model's device and dtype."""
        capacity = self.length if capacity is None else capacity
        if capacity < 1:
            raise ValueError(f"cache capacity must be at least 1, got {capacity}")
        if capacity > self.length:
            raise ValueError(
                f"a cache of {capacity} tokens exceeds the context length {self.length}"
            )
        weight = self.embed.weight
        shape = (batch_size, self.num_heads, capacity, self.width // self.num_heads)
        return KVCache(
            keys=[weight.new_zeros(shape) for _ in self.blocks],
            values=[weight.new_zeros(shape) for _ in self.blocks],
        )

    def _condition(self, t: Tensor | None, cond: Tensor | None, batch: int) -> Tensor | None:
        """``SiLU(e)`` for the modulation layers, or ``None`` when unconditioned."""
        if cond is not None and self.num_classes is None:
            raise ValueError("cond was given to a TextTransformer built without num_classes")
        if self.time_conditioning:
            if t is None:
                raise ValueError("this TextTransformer is time-conditioned: pass t in [0, 1]")
            t = torch.as_tensor(t, dtype=torch.float32, device=self.embed.weight.device)
            return F.silu(self.condition(1000.0 * t, cond, batch))
        if self.condition is not None:
            return F.silu(self.condition(cond, batch))
        return None

    def forward(
        self,
        x_t: Tensor,
        t: Tensor | None = None,
        cond: Tensor | None = None,
        cache: KVCache | None = None,
        attn_mask: Tensor | tuple[Tensor, Tensor] | None = None,
        positions: Tensor | None = None,
        outputs: int | None = None,
    ) -> Tensor:
        """Logits ``(B, L, vocab_size)`` for tokens ``x_t (B, L)``.

        Causal models give next-token logits (position ``i`` predicts token ``i + 1``). A
        ``cache`` holds the keys and values of tokens already read: ``x_t`` then holds the
        tokens after the ``cache.length`` cached, at positions ``cache.length ..``, which see
        the cached ones and (causal) the new ones before them or (bidirectional) all new ones,
        and their keys and values are appended. ``attn_mask`` (bool ``(L, keys)``, true where
        a query may attend, or the pair of masks of two streams: ``RotarySelfAttention.
        _two_streams``) replaces that pattern; ``positions`` (``(L,)``, without a cache) places
        the tokens for the rotary embeddings (default ``0..L-1``): block diffusion's two
        streams (:mod:`difflab.discrete.block`) read ``[x_t, x_0]`` at the same positions.
        ``outputs``: the logits of the first ``outputs`` tokens only, ``(B, outputs, V)``; the
        last layer then computes its queries and MLP for those alone (the others are read as
        its keys and values; the two streams need the logits of ``x_t`` only).
        """
        batch, tokens = x_t.shape
        start = 0
        if positions is not None:
            if cache is not None or positions.shape != (tokens,):
                raise ValueError("positions are one per token, and not given with a cache")
            if int(positions.max()) >= self.length:
                raise ValueError(f"positions reach {int(positions.max())}; context {self.length}")
        elif cache is not None:
            start = cache.length
            if start + tokens > cache.capacity:
                raise ValueError(f"cache holds {cache.capacity} tokens, asked for {start + tokens}")
        elif tokens > self.length:
            raise ValueError(f"input has {tokens} tokens; this model's context is {self.length}")
        h = self.embed(x_t)
        emb_act = self._condition(t, cond, batch)
        if positions is None:
            positions = torch.arange(start, start + tokens, device=x_t.device)
        cos, sin = rotary_angles(positions, self.width // self.num_heads)
        if outputs is not None and (cache is not None or not 0 < outputs <= tokens):
            raise ValueError(f"outputs must be in 1..{tokens} and not given with a cache")
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            layer_cache = None if cache is None else (cache.keys[i], cache.values[i])
            queries = outputs if i == last else None
            h = block(h, emb_act, cos, sin, layer_cache, start, attn_mask, queries)
        if cache is not None:
            cache.length += tokens
        shift, scale = self.ada_ln_out(emb_act)
        h = _modulate(self.norm_out(h), shift, scale)
        return F.linear(h, self.embed.weight) if self.head is None else self.head(h)
