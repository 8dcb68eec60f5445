"""Conditioning embeddings shared by every denoising network: noise level and class label.

A network sees the noise level as ``c_noise`` (a float ``(B,)`` tensor; the
:class:`~difflab.gaussian.parameterization.Denoiser` passes ``c_noise = 1000 t``, so it spans
``0..1000`` on the DDPM timestep scale). It is encoded with the transformer's sinusoidal position
encoding (seed 004, "Timestep embedding"; Vaswani et al. 2017, used for time by Ho et al. 2020)

    PE(c, 2i) = sin(c / 10000^(2i/d)),    PE(c, 2i+1) = cos(c / 10000^(2i/d)),

stored as ``[sin(c w_0..w_{d/2-1}), cos(c w_0..w_{d/2-1})]`` (the same features, sines first) and
then mapped by a two-layer MLP. A class label is a learned vector *added* to the time embedding
(seed 004, "Class conditioning: in practice mostly summed to the timestep embedding"); the table
has ``num_classes + 1`` rows, the last being the NULL class that classifier-free guidance trains
on dropped labels and samples with as the unconditional branch (Ho & Salimans 2022; seed 002).
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
from torch import Tensor, nn


def check_sizes(positive: dict[str, Any], non_negative: dict[str, Any] | None = None) -> None:
    """Raise a ValueError naming the first size in ``positive`` that is not a positive integer,
    or in ``non_negative`` that is not a non-negative one (a count that may be zero)."""
    for names, low in ((positive, 1), (non_negative or {}, 0)):
        for name, value in names.items():
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
                kind = "a positive" if low else "a non-negative"
                raise ValueError(f"{name} must be {kind} integer, got {value!r}")


def sinusoidal_embedding(c_noise: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """``(B,) -> (B, dim)``: ``[sin(c w_i), cos(c w_i)]`` with ``w_i = max_period^(-i/(dim/2))``.

    Computed in float32 whatever the input dtype (bf16 cannot resolve ``c = 999`` from ``1000``).
    ``dim`` must be even.
    """
    if dim % 2:
        raise ValueError(f"sinusoidal embedding dimension must be even, got {dim}")
    half = dim // 2
    freqs = torch.exp(
        torch.arange(half, device=c_noise.device, dtype=torch.float32)
        * (-math.log(max_period) / half)
    )
    angles = c_noise.to(torch.float32)[:, None] * freqs[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class TimestepEmbedding(nn.Module):
    """``c_noise -> MLP(PE(c_noise))``: sinusoidal features of width ``freq_dim``, then
    ``Linear -> SiLU -> Linear`` to width ``dim``."""

    def __init__(self, dim: int, freq_dim: int = 256):
        super().__init__()
        check_sizes({"embedding width": dim, "frequency features": freq_dim})
        if freq_dim % 2:
            raise ValueError(f"the sinusoidal embedding needs an even width, got {freq_dim}")
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, c_noise: Tensor) -> Tensor:
        features = sinusoidal_embedding(c_noise, self.freq_dim)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


class ClassEmbedding(nn.Module):
    """A learned vector per class, plus the NULL class at index ``null_class == num_classes``.

    ``forward(None, batch_size)`` embeds the NULL class for the whole batch (the unconditional
    model of classifier-free guidance).
    """

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        check_sizes({"num_classes": num_classes})
        self.num_classes = num_classes
        self.table = nn.Embedding(num_classes + 1, dim)

    @property
    def null_class(self) -> int:
        """Index of the reserved unconditional (NULL) label."""
        return self.num_classes

    def forward(self, labels: Tensor | None, batch_size: int) -> Tensor:
        if labels is None:
            return self.table.weight[self.null_class].expand(batch_size, -1)
        return self.table(labels)


class ConditionEmbedding(nn.Module):
    """The vector every block of a network is conditioned on:
    ``e = MLP(PE(c_noise)) + E[y]`` with ``E[null_class]`` when no label is given, plus, with a
    ``context_dim``, ``W mean(context)``: the mean of the real context tokens (zero for a context
    with none), so that a caption also reaches every block directly, as Imagen adds its pooled
    text embedding to the timestep embedding (Saharia et al. 2022).

    A scalar ``c_noise`` is broadcast to the batch. ``class_labels`` is a ``(B,)`` integer tensor
    with entries in ``0..num_classes`` (``num_classes`` is the NULL class).
    """

    def __init__(
        self,
        dim: int,
        num_classes: int | None = None,
        freq_dim: int = 256,
        context_dim: int | None = None,
    ):
        super().__init__()
        self.time = TimestepEmbedding(dim, freq_dim)
        self.label = ClassEmbedding(num_classes, dim) if num_classes is not None else None
        self.context = nn.Linear(context_dim, dim) if context_dim is not None else None

    @property
    def null_class(self) -> int | None:
        """NULL label index (``num_classes``), or ``None`` for an unconditional network."""
        return None if self.label is None else self.label.null_class

    def forward(
        self,
        c_noise: Tensor,
        class_labels: Tensor | None,
        batch_size: int,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
    ) -> Tensor:
        emb = self.time(c_noise.reshape(-1).expand(batch_size))
        if self.context is not None and context is not None:
            real = torch.ones(context.shape[:2], device=context.device, dtype=context.dtype)
            if context_mask is not None:
                real = context_mask.to(context.dtype)
            pooled = (context * real[..., None]).sum(1) / real.sum(1, keepdim=True).clamp(min=1)
            emb = emb + self.context(pooled)
        if self.label is not None:
            emb = emb + self.label(class_labels, batch_size)
        elif class_labels is not None:
            raise ValueError(
                "class_labels were given to a network built without num_classes; "
                "build it with num_classes=K or pass class_labels=None"
            )
        return emb


def self_conditioned_input(x: Tensor, self_cond: Tensor | None, self_condition: bool,
                           dim: int = 1) -> Tensor:  # fmt: skip
    """The input of a network built with ``self_condition``: ``[x, x0_prev]`` concatenated along
    ``dim`` (channels of an image, features of a vector), with ``x0_prev = 0`` ("no estimate",
    Chen et al. 2023) when ``self_cond`` is ``None``; ``x`` itself for a network built without,
    which refuses a ``self_cond``."""
    if not self_condition:
        if self_cond is not None:
            raise ValueError("self_cond was given to a network built without self_condition")
        return x
    if self_cond is None:
        return torch.cat([x, torch.zeros_like(x)], dim)
    if self_cond.shape != x.shape:
        raise ValueError(f"self_cond must have x's shape {tuple(x.shape)}, "
                         f"got {tuple(self_cond.shape)}")  # fmt: skip
    return torch.cat([x, self_cond.to(x.dtype)], dim)
