"""Samplers of discrete diffusion: ancestral (MDLM/D3PM/UDLM/GIDD), confidence-based (LLaDA),
semi-autoregressive blocks, with prompts/infilling, temperature, nucleus and guidance.

Every sampler has the signature (docs/design.md, "Sampler")::

    sampler(model, process, shape, times, *, cond=None, generator=None, callback=None, **options)
        -> DiscreteSamples

- ``model`` is any :data:`TokenDenoiser` ``model(x_t, t, cond) -> logits (B, L, V)`` with ``x_t``
  long ``(B, L)`` and ``t`` float32 ``(B,)``; the process turns logits into
  ``log x_theta = log p_theta(x_0 | x_t)`` (:meth:`TokenProcess.x0_log_probs`).
- ``times`` is a strictly decreasing 1-D grid from ``t = 1`` (the prior, where sampling starts)
  to ``t = 0``, e.g. :func:`uniform_times`; ``n = len(times) - 1`` steps ``t_i -> t_{i+1}``.
- ``generator`` drives every random draw (categorical draws by Gumbel-max in float64: float32
  Gumbel noise cannot reach the tail and acts like a lower temperature).
- ``callback(i, t, x_t, x0)`` is called once per step ``i = 0..n-1``, as by the Gaussian samplers
  (:mod:`difflab.gaussian.samplers`), with the time ``t = t_i``, the state ``x_t`` there and the
  current estimate of the clean tokens ``x0 = argmax x_theta`` (given tokens kept).

Samplers run under ``torch.inference_mode()``, keep no state between calls and never synchronise
with the host inside the step loop. :data:`TOKEN_SAMPLERS` names them.

Prompts and infilling: positions where ``fixed_mask`` is true hold ``fixed_tokens`` from start to
end and are never noised (for the masked process the denoiser sees them as clean tokens, which
conditions it exactly; uniform/hybrid denoisers cannot tell them from noisy ones). Variable
length: with ``eos_id`` every sequence is cut after its first EOS and the rest filled with
``pad_id``.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from difflab.discrete.process import TokenProcess

TokenDenoiser = Callable[[Tensor, Tensor, Any], Tensor]
"""``model(x_t (B, L) long, t (B,) float32, cond) -> logits (B, L, V)``."""

Callback = Callable[[int, float, Tensor, Tensor], None]
"""``callback(i, t, x_t, x0)``: step index, time, current state, current clean-token estimate."""

Confidence = Literal["prob", "margin", "entropy", "random"]


@dataclass(frozen=True)
class DiscreteSamples:
    """Sampler output: ``tokens`` ``(B, L)``; ``lengths`` ``(B,)`` (up to and including the first
    EOS when ``eos_id`` was given, else ``L``); ``nfe`` the number of network calls."""

    tokens: Tensor
    lengths: Tensor
    nfe: int


def uniform_times(steps: int) -> Tensor:
    """The grid ``t_i = 1 - i / steps``, ``i = 0..steps``: float64 ``(steps + 1,)`` from 1 to 0."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    return torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------


def sample_categorical(log_probs: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Draw from ``softmax(log_probs)`` over the last axis by Gumbel-max, in float64."""
    u = torch.rand(
        log_probs.shape, generator=generator, device=log_probs.device, dtype=torch.float64
    )
    gumbel = -torch.log(-torch.log(u))
    return (log_probs.to(torch.float64) + gumbel).argmax(-1)


def adjust_log_probs(
    log_probs: Tensor, temperature: float = 1.0, top_p: float | None = None
) -> Tensor:
    """Temperature and nucleus (top-p, Holtzman et al. 2020) on normalised log-probabilities.

    ``temperature = 0`` is greedy (a point mass on the argmax); otherwise ``p^(1/T)``
    renormalised. Top-p keeps the smallest set of most likely tokens whose mass reaches ``top_p``
    (always at least one) and renormalises.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be non-negative, got {temperature}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must lie in (0, 1], got {top_p}")
    if temperature == 0:
        best = log_probs.argmax(-1, keepdim=True)
        greedy = torch.full_like(log_probs, -math.inf)
        return greedy.scatter(-1, best, 0.0)
    if temperature != 1.0:
        log_probs = (log_probs / temperature).log_softmax(-1)
    if top_p is not None and top_p < 1.0:
        sorted_lp, order = log_probs.sort(-1, descending=True)
        probs = sorted_lp.exp()
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        log_probs = log_probs.masked_fill(drop, -math.inf).log_softmax(-1)
    return log_probs


def truncate_at_eos(
    tokens: Tensor, eos_id: int, pad_id: int | None = None
) -> tuple[Tensor, Tensor]:
    """Keep each sequence up to and including its first ``eos_id``; fill the rest with ``pad_id``
    (default ``eos_id``). Returns ``(tokens, lengths)``; a sequence without EOS keeps length L."""
    pad = eos_id if pad_id is None else pad_id
    L = tokens.shape[-1]
    is_eos = tokens == eos_id
    first = is_eos.to(torch.int8).argmax(-1)
    lengths = torch.where(is_eos.any(-1), first + 1, torch.full_like(first, L))
    positions = torch.arange(L, device=tokens.device)
    keep = positions < lengths.unsqueeze(-1)
    return torch.where(keep, tokens, torch.full_like(tokens, pad)), lengths


def prompt_to_fixed(prompt: Tensor, length: int) -> tuple[Tensor, Tensor]:
    """``(fixed_tokens, fixed_mask)`` of shape ``(B, length)`` for a ``(B, P)`` prefix prompt."""
    batch, given = prompt.shape
    if given > length:
        raise ValueError(f"the prompt ({given} tokens) is longer than the sequence ({length})")
    tokens = torch.zeros(batch, length, dtype=torch.long, device=prompt.device)
    tokens[:, :given] = prompt
    mask = torch.zeros(batch, length, dtype=torch.bool, device=prompt.device)
    mask[:, :given] = True
    return tokens, mask


def classifier_free_guidance(model: TokenDenoiser, scale: float, null_cond: Any) -> TokenDenoiser:
    """Classifier-free guidance for discrete diffusion: a denoiser returning

        log p_w(x_0 | x_t, c) = (1 + w) log p(x_0 | x_t, c) - w log p(x_0 | x_t, null)

    (renormalised by the process), i.e. ``p_c^(1+w) / p_u^w`` per token, with ``w = scale``
    (``w = 0``: the conditional model). The conditional and unconditional predictions come
    from one network call on the doubled batch ``[x_t; x_t]`` with conditions ``[cond; null]``.
    ``cond`` and ``null_cond`` are tensors with the batch first (``null_cond`` broadcasts to
    ``cond``'s shape, e.g. a 0-d "no class" label) or dicts of such tensors. The model must have
    been trained with conditioning dropout (the null condition) for ``p(x_0 | x_t, null)``.
    """

    def guided(x_t: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        if cond is None:
            raise ValueError("classifier-free guidance needs a condition")
        B = x_t.shape[0]
        t = t.expand(B) if t.ndim == 0 else t
        both = _stack_conditions(cond, null_cond)
        logits = model(torch.cat([x_t, x_t]), torch.cat([t, t]), both).float()
        log_c, log_u = logits.log_softmax(-1).split(B)
        # -inf - (-inf) is undefined: compare through a floor; impossible tokens stay impossible.
        floor = -1e4
        return log_c + scale * (log_c.clamp_min(floor) - log_u.clamp_min(floor))

    return guided


# --------------------------------------------------------------------------------------------
# Samplers
# --------------------------------------------------------------------------------------------


@torch.inference_mode()
def ancestral_sample(
    model: TokenDenoiser,
    process: TokenProcess,
    shape: tuple[int, int],
    times: Tensor | Sequence[float],
    *,
    cond: Any = None,
    fixed_tokens: Tensor | None = None,
    fixed_mask: Tensor | None = None,
    temperature: float = 1.0,
    top_p: float | None = None,
    cache: bool = True,
    eos_id: int | None = None,
    pad_id: int | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    callback: Callback | None = None,
) -> DiscreteSamples:
    """Ancestral sampling ``z_s ~ p_theta(z_s | z_t)`` from ``t = t_i`` to ``s = t_{i+1}`` over
    the grid ``times``, from the prior at ``t = 1`` to ``t = 0``.

    The reverse is the process's ``p(z_s | z_t) = sum_x q(z_s | z_t, x) x_theta(x)``
    (:meth:`TokenProcess.reverse_probs`), factorised over tokens, with temperature and top-p
    applied to ``x_theta``.

    Masked process (MDLM): a masked token is unmasked between ``t`` and ``s`` with probability
    ``(alpha_s - alpha_t) / (1 - alpha_t)`` whatever the network says, and then takes a value
    drawn from ``x_theta``. So the step at which each token is unmasked is drawn up front
    (:func:`_unmasking_steps`: the same law; one host synchronisation before the loop), and with
    ``cache=True`` the network runs only at steps where some token of the batch is unmasked. At
    every other step no token can change, so the output of a call would go unused (MDLM's cache
    skips the call when nothing changed since the last one and reuses that output; here the call
    is not even needed; the callback reports the last estimate). The random numbers drawn are the
    same with and without the cache, so the samples are identical for the same generator state,
    for any denoiser (time-conditioned or not); only ``nfe`` changes. The saving is largest for
    small batches and many steps (at most one call per token).

    Uniform and hybrid processes (D3PM/UDLM/GIDD): every step redraws every free token from the
    reverse, so tokens already placed can be corrected; ``cache`` does not apply.
    """
    grid = _time_grid(times)
    ts = grid.tolist()
    x, fixed, fixed_tokens = _initial_state(
        process, shape, fixed_tokens, fixed_mask, generator, device
    )
    if process.absorbing:
        unmask_at, moves = _unmasking_steps(process, grid, fixed, generator)
    else:
        unmask_at, moves = None, [True] * (len(ts) - 1)
    log_x0, nfe = None, 0
    for i, (t, s) in enumerate(itertools.pairwise(ts)):
        if moves[i] or not cache:
            log_x0 = adjust_log_probs(_x0_log_probs(model, process, x, t, cond), temperature, top_p)
            nfe += 1
        if callback is not None:
            callback(i, t, x, _x0_estimate(x, log_x0, fixed))
        if not moves[i]:
            continue
        if process.absorbing:
            x = _unmask_step(x, log_x0, unmask_at == i, generator)
        else:
            x = _reverse_step(process, x, log_x0, t, s, fixed, fixed_tokens, generator)
    return _finish(x, nfe, eos_id, pad_id)


@torch.inference_mode()
def confidence_sample(
    model: TokenDenoiser,
    process: TokenProcess,
    shape: tuple[int, int],
    times: Tensor | Sequence[float],
    *,
    confidence: Confidence = "prob",
    cond: Any = None,
    fixed_tokens: Tensor | None = None,
    fixed_mask: Tensor | None = None,
    temperature: float = 1.0,
    top_p: float | None = None,
    eos_id: int | None = None,
    pad_id: int | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    callback: Callback | None = None,
) -> DiscreteSamples:
    """Confidence-based unmasking (MaskGIT; LLaDA's "low-confidence remasking"), masked process.

    At each step every masked token gets a candidate ``~ x_theta`` (after temperature/top-p) and
    a confidence computed from the model's own ``x_theta`` (before temperature, as in LLaDA, so
    that greedy decoding still ranks positions); the ``n_i`` most confident candidates are kept
    and the rest stay masked (LLaDA phrases this as predicting all masks and remasking the least
    confident). ``n_i`` follows the schedule deterministically: after step ``i``,
    ``round(m alpha(t_{i+1}))`` of the ``m`` initially masked tokens of each sequence are
    unmasked.

    Confidence: ``prob`` (probability of the candidate: LLaDA's low-confidence remasking),
    ``margin`` (top-1 minus top-2 probability), ``entropy`` (negative entropy of ``x_theta``) or
    ``random`` (LLaDA's random remasking). With one token per step, an order that depends only
    on the state (``margin``, ``entropy``, ``random``) is exact any-order sampling of
    ``p_theta``; ``prob`` ranks by the drawn candidate itself and so favours likely tokens: a
    deliberate, biased trade of diversity for quality.
    """
    if not process.absorbing:
        raise ValueError("confidence-based unmasking needs the masked (absorbing) process")
    if confidence not in ("prob", "margin", "entropy", "random"):
        raise ValueError(f"unknown confidence {confidence!r}: prob, margin, entropy or random")
    grid = _time_grid(times)
    ts = grid.tolist()
    x, fixed, _ = _initial_state(process, shape, fixed_tokens, fixed_mask, generator, device)
    quota = _unmasking_quota(process, grid, fixed)
    for i, t in enumerate(ts[:-1]):
        raw = _x0_log_probs(model, process, x, t, cond)
        log_x0 = adjust_log_probs(raw, temperature, top_p)
        if callback is not None:
            callback(i, t, x, _x0_estimate(x, log_x0, fixed))
        candidate = sample_categorical(log_x0, generator)
        score = _confidence(confidence, raw, candidate, generator)
        x = _keep_most_confident(x, candidate, score, quota[i], process.mask_id)
    return _finish(x, len(ts) - 1, eos_id, pad_id)


@torch.inference_mode()
def semi_autoregressive_sample(
    model: TokenDenoiser,
    process: TokenProcess,
    shape: tuple[int, int],
    times: Tensor | Sequence[float],
    *,
    context_length: int,
    block_length: int,
    sampler: Callable[..., DiscreteSamples] = ancestral_sample,
    prompt: Tensor | None = None,
    eos_id: int | None = None,
    pad_id: int | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    **options: Any,
) -> DiscreteSamples:
    """Semi-autoregressive generation (MDLM) of sequences longer than the model's context.

    The first window fills the context (after the optional ``(B, P)`` prompt); after that each
    window holds the last ``context_length - block_length`` tokens generated so far, given and
    never noised, and ``block_length`` new positions that ``sampler`` (:func:`ancestral_sample`
    or :func:`confidence_sample`; ``options`` go to it, e.g. ``temperature``, ``cache``,
    ``cond``, ``callback``) generates over the grid ``times``. Every network call sees exactly
    ``min(context_length, length)`` tokens.
    """
    B, length = shape
    if not 0 < block_length <= context_length:
        raise ValueError("need 0 < block_length <= context_length")
    if prompt is not None:
        out = prompt
        device = prompt.device
    else:
        out = torch.zeros(B, 0, dtype=torch.long, device=device)
    if out.shape[1] > length:
        raise ValueError(
            f"the prompt ({out.shape[1]} tokens) is longer than the sequence ({length})"
        )
    nfe = 0
    while out.shape[1] < length:
        done = out.shape[1]
        new = min(length - done, max(block_length, context_length - done))
        keep = min(done, context_length - new)
        window = torch.cat([out[:, done - keep :], out.new_zeros(B, new)], dim=1)
        given = torch.zeros_like(window, dtype=torch.bool)
        given[:, :keep] = True
        result = sampler(
            model,
            process,
            (B, keep + new),
            times,
            fixed_tokens=window,
            fixed_mask=given,
            generator=generator,
            device=device,
            **options,
        )
        out = torch.cat([out, result.tokens[:, keep:]], dim=1)
        nfe += result.nfe
    return _finish(out, nfe, eos_id, pad_id)


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------

TOKEN_SAMPLERS: dict[str, Callable[..., DiscreteSamples]] = {}
"""Every token sampler by name (the text recipe's ``sample.sampler``); each follows the contract
of the module docstring (``semi-ar`` also needs ``context_length`` and ``block_length``)."""

TOKEN_SAMPLER_DESCRIPTIONS: dict[str, str] = {}
"""One line per entry of :data:`TOKEN_SAMPLERS`, for ``difflab sample --list``."""


def _register(
    name: str, description: str, fn: Callable[..., DiscreteSamples], **preset: Any
) -> None:
    TOKEN_SAMPLERS[name] = functools.partial(fn, **preset) if preset else fn
    TOKEN_SAMPLER_DESCRIPTIONS[name] = description


_register(
    "ancestral", "ancestral sampling z_s ~ p(z_s | z_t), one network call per step (any process)",
    ancestral_sample, cache=False,
)  # fmt: skip
_register(
    "cached", "ancestral, skipping the network at steps where no token can change; same samples "
    "as ancestral for the same seed (masked process; identical to ancestral otherwise)",
    ancestral_sample, cache=True,
)  # fmt: skip
_register(
    "confidence", "predict every masked token, keep the most confident ones by the margin "
    "between its two likeliest values (MaskGIT-style; masked process)",
    confidence_sample, confidence="margin",
)  # fmt: skip
_register(
    "remask", "LLaDA's low-confidence remasking: keep the most probable predictions, remask "
    "the rest (masked process)",
    confidence_sample, confidence="prob",
)  # fmt: skip
_register(
    "semi-ar", "semi-autoregressive windows of block_length new tokens (cached ancestral "
    "inside), for lengths beyond the model's context_length",
    semi_autoregressive_sample,
)  # fmt: skip


# --------------------------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------------------------


def _time_grid(times: Tensor | Sequence[float]) -> Tensor:
    """``times`` as float64 on the host, checked: 1-D, strictly decreasing from 1 to 0."""
    grid = torch.as_tensor(times, dtype=torch.float64).cpu()
    if (
        grid.ndim != 1
        or len(grid) < 2
        or grid[0] != 1.0
        or grid[-1] != 0.0
        or not bool((grid.diff() < 0).all())
    ):
        raise ValueError(
            "times must be a strictly decreasing 1-D grid from 1 to 0, e.g. uniform_times(steps)"
        )
    return grid


def _initial_state(
    process: TokenProcess,
    shape: tuple[int, int],
    fixed_tokens: Tensor | None,
    fixed_mask: Tensor | None,
    generator: torch.Generator | None,
    device: torch.device | str | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(x_1, fixed_mask, fixed_tokens)``: prior draws, with given tokens in place."""
    if (fixed_tokens is None) != (fixed_mask is None):
        raise ValueError("give both fixed_tokens and fixed_mask, or neither")
    if fixed_tokens is not None:
        if tuple(fixed_tokens.shape) != tuple(shape) or fixed_mask.shape != fixed_tokens.shape:
            raise ValueError(f"fixed_tokens and fixed_mask must have shape {tuple(shape)}")
        device = fixed_tokens.device
        fixed = fixed_mask.to(device=device, dtype=torch.bool)
    else:
        fixed = torch.zeros(shape, dtype=torch.bool, device=device)
        fixed_tokens = torch.zeros(shape, dtype=torch.long, device=device)
    x = process.sample_prior(tuple(shape), generator, fixed.device)
    return torch.where(fixed, fixed_tokens, x), fixed, fixed_tokens


def _x0_log_probs(
    model: TokenDenoiser, process: TokenProcess, x_t: Tensor, t: float, cond: Any
) -> Tensor:
    """``log x_theta = log p_theta(x_0 | x_t)`` ``(B, L, V)``: one network call at time ``t``."""
    t_vec = torch.full((x_t.shape[0],), t, dtype=torch.float32, device=x_t.device)
    return process.x0_log_probs(model(x_t, t_vec, cond).float(), x_t)


def _x0_estimate(x_t: Tensor, log_x0: Tensor | None, fixed: Tensor) -> Tensor:
    """The clean-token estimate of the callback: ``argmax x_theta`` at free positions, ``x_t`` at
    given ones (``x_t`` itself before the first network call, which the cache may postpone)."""
    if log_x0 is None:
        return x_t
    return torch.where(fixed, x_t, log_x0.argmax(-1))


def _unmasking_steps(
    process: TokenProcess, grid: Tensor, fixed: Tensor, generator: torch.Generator | None
) -> tuple[Tensor, list[bool]]:
    """``(unmask_at, moves)``: the step in which each token of the masked process is unmasked
    (``-1`` for given tokens), and per step whether any token is.

    One ``u ~ U(0, 1]`` per token, inverted through the grid's ``alpha``: step ``i`` iff
    ``alpha(t_i) < u <= alpha(t_{i+1})`` (``alpha(t_n)`` taken as 1, so every token is unmasked
    by the end), with probability ``alpha(t_{i+1}) - alpha(t_i)``: the ancestral law, where a
    token masked at ``t`` is unmasked by ``s`` with probability
    ``(alpha_s - alpha_t) / (1 - alpha_t)``. ``moves`` costs one host synchronisation.
    """
    alphas_after = process.alpha(grid[1:]).to(fixed.device)
    alphas_after[-1] = 1.0
    u = 1.0 - torch.rand(fixed.shape, generator=generator, device=fixed.device, dtype=torch.float64)
    unmask_at = torch.where(fixed, -1, torch.searchsorted(alphas_after, u))
    counts = torch.bincount((unmask_at + 1).flatten(), minlength=len(grid))[1:]
    return unmask_at, (counts > 0).tolist()


def _unmask_step(
    x: Tensor, log_x0: Tensor, unmasking: Tensor, generator: torch.Generator | None
) -> Tensor:
    """The masked tokens ``unmasking`` in this step take a value drawn from ``x_theta``."""
    return torch.where(unmasking, sample_categorical(log_x0, generator), x)


def _reverse_step(
    process: TokenProcess,
    x: Tensor,
    log_x0: Tensor,
    t: float,
    s: float,
    fixed: Tensor,
    fixed_tokens: Tensor,
    generator: torch.Generator | None,
) -> Tensor:
    """Every free token redrawn from ``p_theta(z_s | z_t) = sum_x q(z_s | z_t, x) x_theta(x)``."""
    probs = process.reverse_probs(log_x0.to(torch.float64).exp(), x, s, t)
    return torch.where(fixed, fixed_tokens, sample_categorical(torch.log(probs), generator))


def _unmasking_quota(process: TokenProcess, grid: Tensor, fixed: Tensor) -> Tensor:
    """``(n, B)`` tokens each row unmasks per step, so that ``round(m alpha(t_{i+1}))`` of its
    ``m`` initially masked tokens are unmasked after step ``i`` (``alpha(t_n)`` taken as 1)."""
    alphas = process.alpha(grid).to(fixed.device)
    alphas[-1] = 1.0
    initially_masked = (~fixed).sum(-1).to(torch.float64)
    return torch.round(alphas.unsqueeze(1) * initially_masked).long().diff(dim=0)


def _keep_most_confident(
    x: Tensor, candidate: Tensor, score: Tensor, count: Tensor, mask_id: int
) -> Tensor:
    """Unmask, in each row, the ``count`` masked positions of highest ``score`` to their
    ``candidate`` (ties: leftmost first)."""
    masked = x == mask_id
    score = torch.where(masked, score, -math.inf)
    order = score.argsort(dim=-1, descending=True, stable=True)
    positions = torch.arange(x.shape[1], device=x.device).expand_as(x)
    rank = torch.empty_like(order).scatter_(-1, order, positions)
    return torch.where(masked & (rank < count.unsqueeze(-1)), candidate, x)


def _confidence(
    kind: Confidence, log_x0: Tensor, candidate: Tensor, generator: torch.Generator | None
) -> Tensor:
    if kind == "prob":
        return log_x0.gather(-1, candidate.unsqueeze(-1)).squeeze(-1).exp().to(torch.float64)
    if kind == "margin":
        top2 = log_x0.topk(2, dim=-1).values.exp()
        return (top2[..., 0] - top2[..., 1]).to(torch.float64)
    if kind == "entropy":
        return torch.xlogy(log_x0.exp(), log_x0.exp()).sum(-1).to(torch.float64)
    return torch.rand(
        candidate.shape, generator=generator, device=candidate.device, dtype=torch.float64
    )


def _stack_conditions(cond: Any, null: Any) -> Any:
    if isinstance(cond, dict):
        return {key: _stack_conditions(value, null[key]) for key, value in cond.items()}
    if not isinstance(cond, Tensor):
        raise TypeError("classifier-free guidance needs cond as a tensor or a dict of tensors")
    null = torch.as_tensor(null, device=cond.device, dtype=cond.dtype).expand_as(cond)
    return torch.cat([cond, null])


def _finish(x: Tensor, nfe: int, eos_id: int | None, pad_id: int | None) -> DiscreteSamples:
    if eos_id is None:
        lengths = torch.full((x.shape[0],), x.shape[1], dtype=torch.long, device=x.device)
        return DiscreteSamples(x, lengths, nfe)
    tokens, lengths = truncate_at_eos(x, eos_id, pad_id)
    return DiscreteSamples(tokens, lengths, nfe)
