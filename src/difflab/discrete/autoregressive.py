"""Autoregressive sampling of a causal token model with a key/value cache: the baseline of
discrete diffusion (seed 003), ``p(x) = prod_i p(x_i | x_<i)``.

The model is any :class:`CausalTokenModel` (a causal
:class:`~difflab.nets.transformer.TextTransformer`): ``model(x, cond=cond, cache=cache)`` gives
next-token logits for the tokens ``x`` placed after the ``cache.length`` tokens already cached,
and appends their keys and values. After the prompt is prefilled in one call, each new token runs
through the network alone, reading the keys and values cached for the tokens before it, which
gives the same logits as recomputing the whole prefix.

Each token is drawn from ``softmax(logits)`` after temperature and top-p
(:func:`~difflab.discrete.samplers.adjust_log_probs`) by Gumbel-max
(:func:`~difflab.discrete.samplers.sample_categorical`), as the diffusion samplers draw tokens.
Sampling runs under ``torch.inference_mode()`` and draws every random number from
``generator``.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import Tensor

from difflab.discrete.samplers import (
    DiscreteSamples,
    adjust_log_probs,
    sample_categorical,
    truncate_at_eos,
)

EOS_CHECK_EVERY = 16
"""Sampling stops once every row has emitted EOS, checked this often (a host synchronisation)."""


class CausalTokenModel(Protocol):
    """``model(x (B, T), cond=..., cache=...) -> next-token logits (B, T, V)``, appending to
    ``cache``; ``new_cache(batch_size, capacity)`` makes an empty cache."""

    def __call__(self, x: Tensor, *, cond: Any = None, cache: Any = None) -> Tensor: ...

    def new_cache(self, batch_size: int, capacity: int) -> Any: ...


@torch.inference_mode()
def autoregressive_sample(
    model: CausalTokenModel,
    shape: tuple[int, int],
    *,
    context_length: int,
    block_length: int,
    prompt: Tensor | None = None,
    bos_id: int | None = None,
    temperature: float = 1.0,
    top_p: float | None = None,
    cond: Any = None,
    eos_id: int | None = None,
    pad_id: int | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> DiscreteSamples:
    """Token-by-token sampling ``x_i ~ p(x_i | x_<i)`` of ``shape = (B, length)`` tokens after the
    optional ``(B, P)`` ``prompt``, which they start with.

    Sequences longer than ``context_length`` are generated in windows, as
    :func:`~difflab.discrete.samplers.semi_autoregressive_sample` does: the first window fills
    the context; each later one re-reads the last ``context_length - block_length`` tokens and
    adds ``block_length`` new ones. With ``bos_id`` every window starts with that token (as the
    model was trained; the model's context then holds ``context_length + 1`` tokens), otherwise
    the first window needs a prompt of at least one token.

    With ``eos_id`` a row ends at its first EOS after the prompt (kept) and is filled with
    ``pad_id`` (default ``eos_id``) after it; sampling stops once every row has ended (checked
    every :data:`EOS_CHECK_EVERY` tokens). ``nfe`` counts the network calls, one per token
    sampled.
    """
    B, length = shape
    if not 0 < block_length <= context_length:
        raise ValueError("need 0 < block_length <= context_length")
    out = torch.zeros(B, 0, dtype=torch.long, device=device) if prompt is None else prompt
    given = out.shape[1]
    if given > length:
        raise ValueError(f"the prompt ({given} tokens) is longer than the sequence ({length})")
    if bos_id is None and given == 0:
        raise ValueError("without bos_id, give a prompt of at least one token")
    fill = eos_id if pad_id is None else pad_id
    ended = torch.zeros(B, dtype=torch.bool, device=out.device)
    nfe = 0
    while out.shape[1] < length and not (eos_id is not None and bool(ended.all())):
        done = out.shape[1]
        new = min(length - done, max(block_length, context_length - done))
        keep = min(done, context_length - new)
        window = out[:, done - keep :]
        if bos_id is not None:
            window = torch.cat([out.new_full((B, 1), bos_id), window], dim=1)
        tokens, ended = _sample_window(
            model, window, new, ended, temperature, top_p, cond, eos_id, fill, generator
        )
        out = torch.cat([out, tokens], dim=1)
        nfe += tokens.shape[1]
    if eos_id is None:
        return DiscreteSamples(out, torch.full((B,), length, device=out.device), nfe)
    out = torch.nn.functional.pad(out, (0, length - out.shape[1]), value=fill)
    tokens, lengths = truncate_at_eos(out, eos_id, pad_id)
    return DiscreteSamples(tokens, lengths, nfe)


def _sample_window(
    model: CausalTokenModel,
    window: Tensor,
    new: int,
    ended: Tensor,
    temperature: float,
    top_p: float | None,
    cond: Any,
    eos_id: int | None,
    fill: int | None,
    generator: torch.Generator | None,
) -> tuple[Tensor, Tensor]:
    """Up to ``new`` tokens after ``window``, with one cache: ``(tokens (B, n), ended)``. Rows
    that have ``ended`` get ``fill``; fewer than ``new`` come back when every row has ended."""
    cache = model.new_cache(window.shape[0], window.shape[1] + new)
    logits = model(window, cond=cond, cache=cache)[:, -1]
    tokens: list[Tensor] = []
    while True:
        token = _next_token(logits, temperature, top_p, generator)
        if eos_id is not None:
            token = torch.where(ended, fill, token)
            ended = ended | (token == eos_id)
        tokens.append(token)
        if len(tokens) == new or _all_ended(ended, len(tokens), eos_id):
            return torch.stack(tokens, dim=1), ended
        logits = model(token[:, None], cond=cond, cache=cache)[:, -1]


def _next_token(
    logits: Tensor, temperature: float, top_p: float | None, generator: torch.Generator | None
) -> Tensor:
    """One token per row from ``softmax(logits)`` after temperature and top-p."""
    log_probs = adjust_log_probs(logits.float().log_softmax(-1), temperature, top_p)
    return sample_categorical(log_probs, generator)


def _all_ended(ended: Tensor, count: int, eos_id: int | None) -> bool:
    """Whether every row has ended, looked at (a host synchronisation) every
    :data:`EOS_CHECK_EVERY` tokens."""
    return eos_id is not None and count % EOS_CHECK_EVERY == 0 and bool(ended.all())
