"""Tab 5, a diffusion language model writing a passage step by step (seeds 003, 004).

One window of the run's context is sampled from the prior (all ``<mask>`` for the masked
process) by a token sampler of :data:`~difflab.discrete.samplers.TOKEN_SAMPLERS` over the grid
``t_i = 1 - i / steps``, with its ``callback(i, t, x_t, x0)`` recording the state ``x_t`` and
the estimate ``x0 = argmax p_theta(x_0 | x_t)`` at every step. The page marks for each step

- ``revealed``: positions that were noise (``<mask>``) before the step and hold a token after it,
- ``corrected``: positions that held a token and hold another after the step (the uniform and
  hybrid processes redraw placed tokens; the masked process never does),
- ``remasked``: positions still masked after the step whose estimate the sampler had, and
  did not keep (the confidence samplers, ``remask`` and ``confidence``, predict every masked
  position and keep only the most confident: the rest are remasked),

and the fraction of masked positions beside ``1 - alpha(t)``, its expected value under the
forward process (MDLM's ``alpha_t``, :meth:`~difflab.discrete.process.TokenProcess.alpha`).
"""

from __future__ import annotations

import html
from dataclasses import dataclass

import torch
from torch import Tensor

from difflab.discrete.samplers import (
    TOKEN_SAMPLERS,
    confidence_sample,
    semi_autoregressive_sample,
    uniform_times,
)
from difflab.errors import UserError

#: The most steps the tab runs.
MAX_STEPS = 1000


@dataclass
class Unmasking:
    """``states[i]`` and ``estimates[i]`` (``(L,)`` token ids) at step ``i``, then the final
    tokens as both; ``times[i]`` the step's time; the expected masked fraction
    ``1 - alpha(t_i)``; ``mask_id`` (``None`` for processes without one); ``remasks``: whether
    the sampler proposes every masked token and remasks those it does not keep."""

    states: list[Tensor]
    estimates: list[Tensor]
    times: list[float]
    expected_masked: list[float]
    mask_id: int | None
    remasks: bool


def unmasking(model, sampler: str, steps: int, seed: int = 0) -> Unmasking:
    """Sample one passage of the context of the loaded text run ``model`` with ``sampler`` in
    ``steps`` steps, recording every step (module docstring)."""
    if model.process is None:
        raise UserError("this is an autoregressive run: it writes token by token, without "
                        "diffusion steps to show")  # fmt: skip
    if sampler not in TOKEN_SAMPLERS or TOKEN_SAMPLERS[sampler] is semi_autoregressive_sample:
        names = [n for n, f in TOKEN_SAMPLERS.items() if f is not semi_autoregressive_sample]
        raise UserError(f"the tab samples one window: choose a sampler of {', '.join(names)}")
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
        raise UserError(f"the step count must be a whole number in 1..{MAX_STEPS}, got {steps!r}")
    states, estimates, times = [], [], []

    def record(i: int, t: float, x_t: Tensor, x0: Tensor) -> None:
        states.append(x_t[0].cpu().clone())
        estimates.append(x0[0].cpu().clone())
        times.append(float(t))

    gen = torch.Generator(model.device).manual_seed(seed)
    try:
        out = TOKEN_SAMPLERS[sampler](model.net, model.process, (1, model.context),
                                      uniform_times(steps), generator=gen, device=model.device,
                                      callback=record)  # fmt: skip
    except ValueError as e:
        raise UserError(f"sampler {sampler}: {e}") from None
    final = out.tokens[0].cpu()
    states.append(final)
    estimates.append(final)
    times.append(0.0)
    expected = (1 - model.process.alpha(torch.tensor(times, dtype=torch.float64))).tolist()
    fn = TOKEN_SAMPLERS[sampler]
    remasks = getattr(fn, "func", fn) is confidence_sample
    return Unmasking(states, estimates, times, expected, model.process.mask_id, remasks)


def step_marks(run: Unmasking, index: int) -> dict[str, Tensor]:
    """Boolean ``(L,)`` masks of the positions ``revealed``, ``corrected`` and ``remasked`` by
    the step that ends at frame ``index`` (module docstring; all false at frame 0)."""
    after = run.states[index]
    if index == 0:
        none = torch.zeros_like(after, dtype=torch.bool)
        return {"revealed": none, "corrected": none, "remasked": none}
    before = run.states[index - 1]
    mask = run.mask_id
    was_noise = before == mask if mask is not None else torch.zeros_like(before, dtype=torch.bool)
    is_noise = after == mask if mask is not None else torch.zeros_like(after, dtype=torch.bool)
    return {
        "revealed": was_noise & ~is_noise,
        "corrected": ~was_noise & (after != before),
        "remasked": was_noise & is_noise & run.remasks,
    }


def masked_fraction(run: Unmasking, index: int) -> float:
    """The fraction of positions holding ``<mask>`` at frame ``index`` (0 without a mask)."""
    if run.mask_id is None:
        return 0.0
    return float((run.states[index] == run.mask_id).double().mean())


def passage_html(run: Unmasking, index: int, tokenizer) -> str:
    """Frame ``index`` as HTML: revealed tokens on green, corrected ones on orange, masked
    positions as their current estimate in grey italics (underlined where remasked)."""
    marks = step_marks(run, index)
    state, estimate = run.states[index], run.estimates[index]
    spans = []
    for j, token in enumerate(state.tolist()):
        masked = run.mask_id is not None and token == run.mask_id
        shown = tokenizer.decode([estimate[j]] if masked else [token]) or "·"
        text = html.escape(shown).replace("\n", "↵")
        if masked:
            style = "color:#999;font-style:italic"
            if bool(marks["remasked"][j]):
                style += ";text-decoration:underline dotted #c60"
            kind = "masked"
        elif bool(marks["revealed"][j]):
            style, kind = "background:#bde5b1", "revealed"
        elif bool(marks["corrected"][j]):
            style, kind = "background:#f7c58f", "corrected"
        else:
            style, kind = "", "kept"
        spans.append(f'<span class="tok {kind}" style="{style}">{text}</span>')
    return ('<div id="passage" style="font-family:monospace;white-space:pre-wrap;'
            f'line-height:1.6">{"".join(spans)}</div>')  # fmt: skip
