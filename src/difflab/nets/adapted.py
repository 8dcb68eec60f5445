"""An autoregressive :class:`~difflab.nets.transformer.TextTransformer` read as a masked diffusion
denoiser: the network of adaptation (Gong et al. 2024, "Scaling diffusion language models via
adaptation from autoregressive models", Algorithm 1 in seed 000).

Two changes turn the AR model into an MDLM denoiser without new weights:

- the shift: the network reads ``<bos> x_t^1 .. x_t^L`` and the logits of ``x_0^i`` are its
  output at position ``i - 1`` (where the AR model predicted token ``i``); the output after the
  last token is dropped. With a causal mask and no masked token this is the AR model's
  next-token logits exactly.
- attention-mask annealing: in training, each forward call draws an ``(L + 1, L + 1)`` mask that
  keeps every causal edge ``j <= i`` and opens each future edge ``j > i`` with probability
  ``min(1, s / S)``, ``s`` the calls so far (the buffer ``anneal_step``, saved with the weights)
  and ``S = anneal_steps``; from ``s = S`` on it is fully bidirectional, as the network is in
  evaluation mode (sampling, likelihood).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from difflab.nets.transformer import TextTransformer


def annealed_mask(size: int, fraction: float, generator: torch.Generator | None = None,
                  device: Any = None) -> Tensor:  # fmt: skip
    """``(size, size)`` bool: query ``i`` attends to key ``j`` if ``j <= i``, or (a future key)
    with probability ``fraction``, one draw per edge."""
    causal = torch.ones(size, size, dtype=torch.bool, device=device).tril()
    if fraction <= 0:
        return causal
    opened = torch.rand(size, size, generator=generator, device=device) < fraction
    return causal | opened


class ShiftedTransformer(TextTransformer):
    """``forward(x_t (B, L), t, cond) -> logits (B, L, V)`` of ``x_0`` through an AR
    transformer of context ``L + 1`` (module docstring). ``bos_id``: the token read before
    ``x_t``; ``anneal_steps``: training calls until the mask is bidirectional. Its parameters
    are the AR model's (``load_state_dict`` of an AR run's weights with ``strict=False`` leaves
    only ``anneal_step`` at zero)."""

    def __init__(self, vocab_size: int, length: int, *, bos_id: int, anneal_steps: int,
                 **options: Any):  # fmt: skip
        super().__init__(vocab_size, length + 1, causal=True, time_conditioning=False, **options)
        self.bos_id, self.anneal_steps = bos_id, anneal_steps
        self.register_buffer("anneal_step", torch.zeros((), dtype=torch.long))

    @property
    def mask_fraction(self) -> float:
        """The probability ``min(1, s / S)`` that a future edge is open now."""
        return min(1.0, int(self.anneal_step) / max(self.anneal_steps, 1))

    def attention_mask(self, size: int, generator: torch.Generator | None = None) -> Tensor:
        """The mask of the next call: annealed in training (advancing ``anneal_step``),
        bidirectional in evaluation."""
        device = self.embed.weight.device
        if not self.training:
            return torch.ones(size, size, dtype=torch.bool, device=device)
        fraction = 1.0 if self.anneal_steps == 0 else self.mask_fraction
        self.anneal_step += 1
        return annealed_mask(size, fraction, generator, device)

    def forward(  # type: ignore[override]
        self,
        x_t: Tensor,
        t: Tensor | None = None,
        cond: Tensor | None = None,
        attn_mask: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Logits of ``x_0`` at every position of ``x_t``: ``attn_mask`` over ``<bos> x_t``
        (default: :meth:`attention_mask`, drawn with ``generator``)."""
        inputs = torch.cat([torch.full_like(x_t[:, :1], self.bos_id), x_t], dim=1)
        if attn_mask is None:
            attn_mask = self.attention_mask(inputs.shape[1], generator)
        return super().forward(inputs, t, cond, attn_mask=attn_mask)[:, :-1]
