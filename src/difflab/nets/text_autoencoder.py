"""The networks of latent text diffusion (LD4LG, Lovelace et al. 2023; PLANNER, Zhang et al. 2023;
TEncDM, Shabalin et al. 2024; COSMOS, Meshchaninov et al. 2025; seeds 000 and 003).

:class:`TextAutoencoder` maps a row of ``L`` tokens to a FIXED number ``K`` of latent vectors of
width ``d`` (``K`` divides ``L``; ``g = L / K`` tokens per latent) and back, non-autoregressively:

- the encoder embeds the tokens, mixes them with bidirectional transformer blocks over the whole
  row, and pools each run of ``g`` consecutive positions into one latent by a learned linear map
  of their concatenated features, layer-normalised without affine parameters:
  ``z_k = LN(W [h_{g(k-1)+1}; ..; h_{gk}])``, so every latent vector has mean 0 and standard
  deviation 1 over its ``d`` coordinates (the diffusion model sees latents of one known size
  whatever the training did to the encoder);
- the decoder unpools each latent into ``g`` position features (``W'`` z_k split in ``g``),
  mixes them with bidirectional blocks over the row and turns every position into logits over
  the vocabulary at once: ``p(w_i | z) = softmax(W_out h_i)``.

Each latent thus starts from its own ``g`` tokens (a code the two linear maps learn in a few
hundred steps) and the blocks let it carry context of the whole row. Learned queries
cross-attending to the row (a Perceiver-style encoder) were tried first: at this library's sizes
they stayed at the unigram loss for hundreds of steps, the pooled code did not. The blocks are
those of :mod:`difflab.nets.transformer` (rotary positions, adaLN-Zero modulation from learned
constants: no condition vector).

:class:`LatentTextNet` holds the frozen autoencoder, the stored latent scale ``s`` (the
diffusion model's data is ``z_0 = s z``, unit standard deviation on the training rows) and the
denoiser, an :class:`~difflab.nets.embedding_transformer.EmbeddingTransformer` over the ``K``
noisy latents (``forward(z_t, c_noise, self_cond=None)``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from difflab.nets.embedding_transformer import EmbeddingTransformer
from difflab.nets.transformer import TextBlock, rotary_angles


class _Stack(nn.Module):
    """``depth`` unconditioned bidirectional :class:`TextBlock` s over a sequence, then a layer
    norm."""

    def __init__(self, width: int, depth: int, num_heads: int, mlp_ratio: float, dropout: float):
        super().__init__()
        self.head_dim = width // num_heads
        self.blocks = nn.ModuleList(
            TextBlock(width, num_heads, mlp_ratio, dropout, causal=False, conditioned=False)
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(width, eps=1e-6)

    def forward(self, h: Tensor) -> Tensor:
        cos, sin = rotary_angles(torch.arange(h.shape[1], device=h.device), self.head_dim)
        for block in self.blocks:
            h = block(h, None, cos, sin)
        return self.norm(h)


class TextAutoencoder(nn.Module):
    """``encode(tokens (B, L)) -> z (B, K, d)``, ``decode(z) -> logits (B, L, V)``.

    Args:
        vocab_size: ``V``.
        length: ``L``, the tokens of a row (a row of another length is refused).
        latents: ``K``, the latent vectors of a row, a divisor of ``L``.
        dim: ``d``, the width of a latent vector (at least 2: it is layer-normalised).
        width, depth, num_heads, mlp_ratio, dropout: each of the two transformers (``depth``
            blocks each; ``width / num_heads`` even).
    """

    def __init__(
        self,
        vocab_size: int,
        length: int,
        latents: int,
        dim: int,
        width: int = 128,
        depth: int = 2,
        num_heads: int = 4,
        mlp_ratio: float = 4,
        dropout: float = 0.0,
    ):
        super().__init__()
        if dim < 2:
            raise ValueError(f"a latent vector needs at least 2 coordinates, got {dim}")
        if length % latents:
            raise ValueError(f"{latents} latents must divide the row's {length} tokens")
        self.vocab_size, self.length, self.latents, self.dim = vocab_size, length, latents, dim
        self.group, self.width = length // latents, width
        self.embed = nn.Embedding(vocab_size, width)
        self.encoder = _Stack(width, depth, num_heads, mlp_ratio, dropout)
        self.to_latent = nn.Linear(self.group * width, dim)
        self.latent_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.from_latent = nn.Linear(dim, self.group * width)
        self.decoder = _Stack(width, depth, num_heads, mlp_ratio, dropout)
        self.to_logits = nn.Linear(width, vocab_size)

    def encode(self, tokens: Tensor) -> Tensor:
        """``z_k = LN(W [h_{g(k-1)+1}; ..; h_{gk}])``, ``(B, K, d)``, each of mean 0, std 1."""
        batch, length = tokens.shape
        if length != self.length:
            raise ValueError(f"rows have {length} tokens; this autoencoder reads {self.length}")
        h = self.encoder(self.embed(tokens)).reshape(batch, self.latents, -1)
        return self.latent_norm(self.to_latent(h))

    def decode(self, z: Tensor) -> Tensor:
        """Logits ``(B, L, V)`` of every position of the row given its latents ``z (B, K, d)``."""
        if z.shape[1:] != (self.latents, self.dim):
            raise ValueError(f"latents of shape {tuple(z.shape[1:])}; this decoder reads "
                             f"{(self.latents, self.dim)}")  # fmt: skip
        h = self.from_latent(z).reshape(z.shape[0], self.length, self.width)
        return self.to_logits(self.decoder(h))


class LatentTextNet(nn.Module):
    """The autoencoder (frozen once trained), the latent scale ``s`` (a buffer, stored with the
    weights) and the denoiser of ``z_0 = s z``; ``forward`` is the denoiser's, so a
    :class:`~difflab.gaussian.parameterization.Denoiser` can wrap this module."""

    def __init__(self, autoencoder: TextAutoencoder, denoiser: EmbeddingTransformer):
        super().__init__()
        if (denoiser.dim, denoiser.length) != (autoencoder.dim, autoencoder.latents):
            raise ValueError("the denoiser must read the autoencoder's K latents of width d")
        self.autoencoder, self.denoiser = autoencoder, denoiser
        self.register_buffer("latent_scale", torch.ones((), dtype=torch.float32))

    @property
    def embed(self) -> nn.Embedding:
        """The autoencoder's token embedding (where the network's weights live)."""
        return self.autoencoder.embed

    @property
    def self_condition(self) -> bool:
        return self.denoiser.self_condition

    def forward(self, z_t: Tensor, c_noise: Tensor, self_cond: Tensor | None = None) -> Tensor:
        return self.denoiser(z_t, c_noise, self_cond)

    def data_latents(self, tokens: Tensor) -> Tensor:
        """``z_0 = s E(tokens)``, the diffusion model's data."""
        return self.latent_scale * self.autoencoder.encode(tokens)

    def decode(self, z0: Tensor) -> Tensor:
        """Logits ``(B, L, V)`` of the rows whose data latents are ``z0 = s z``."""
        return self.autoencoder.decode(z0 / self.latent_scale)
