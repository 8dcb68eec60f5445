"""Speculative decoding with a diffusion drafter: a small masked diffusion LM proposes ``G``
tokens, a larger autoregressive model scores them in one pass and keeps a prefix of them, and the
output has exactly the autoregressive model's law (seed 000, "Can we combine autoregressive LLMs
and diffusion LMs?"; Leviathan et al. 2023, Chen et al. 2023 for the acceptance rule).

One round, after the tokens ``x_<1`` emitted so far:

1. The drafter proposes ``d_1 .. d_G`` with ``d_i ~ q_i(. | x_<1, d_<i)``, where ``q_i`` is its
   ``x_theta`` at position ``i`` (SUBS) after temperature and top-p, read off a window of the
   last tokens followed by masks. Two drafter modes make ``q_i`` the drafter's true probability
   of the proposal given the tokens before it: ``steps = G`` unmasks left to right, one position
   per network call (``q_i`` reads ``d_<i``); ``steps = 1`` fills all ``G`` positions in one
   parallel call (``q_i`` reads only ``x_<1``, a function of the past all the same). Any other
   unmasking order draws ``d_i`` given later proposals, and the rule below would no longer be
   exact, so it is refused.
2. The target reads the pending token and ``d_1 .. d_G`` in one cached call: ``p_1 .. p_{G+1}``,
   after the same temperature and top-p.
3. ``d_i`` is accepted with probability ``min(1, p_i(d_i) / q_i(d_i))``; the first rejected
   position ``k`` is drawn from ``norm(max(0, p_k - q_k))``; after ``G`` acceptances a bonus
   token is drawn from ``p_{G+1}``. Each emitted token then has law ``p`` given the tokens
   before it: ``q(v) min(1, p(v)/q(v)) + (1 - sum_u min(q(u), p(u))) norm(max(0, p - q))(v)
   = p(v)``.

A batch advances in step: every row emits ``k_min + 1`` tokens, ``k_min`` the fewest
acceptances over the rows (rows that accepted more keep their first ``k_min + 1`` accepted
drafts; the cut depends only on the other rows, which are independent of this one, so each row
still has the target's law). With ``temperature = 0`` both laws are point masses and the output
is the target's greedy text token for token.

The target is a :class:`~difflab.discrete.autoregressive.CausalTokenModel` with a key/value cache
(rolled back past the rejected drafts by resetting ``cache.length``); the drafter is any
:data:`~difflab.discrete.samplers.TokenDenoiser` of a
:class:`~difflab.discrete.process.MaskedProcess`.
Long passages are made in the windows of
:func:`~difflab.discrete.autoregressive.autoregressive_sample`, so the law is that sampler's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from difflab.discrete.autoregressive import CausalTokenModel
from difflab.discrete.process import MaskedProcess
from difflab.discrete.samplers import (
    DiscreteSamples,
    TokenDenoiser,
    adjust_log_probs,
    sample_categorical,
    truncate_at_eos,
)


@dataclass(frozen=True)
class SpeculativeSamples(DiscreteSamples):
    """:class:`DiscreteSamples` with the drafting record, summed over rows: ``drafted``
    proposals scored by the target, ``accepted`` of them accepted by the rule (before the cut to
    ``k_min``), ``rounds`` target calls that verified drafts. ``nfe`` counts target calls,
    ``drafter_nfe`` drafter calls."""

    drafter_nfe: int
    drafted: int
    accepted: int
    rounds: int

    @property
    def acceptance_rate(self) -> float:
        """Accepted proposals per proposal."""
        return self.accepted / max(self.drafted, 1)


def check_draft_steps(draft_length: int, draft_steps: int) -> None:
    """Refuse drafter modes whose proposal probabilities are not the drafter's true conditionals:
    only ``draft_steps = 1`` (one parallel step) and ``draft_steps = draft_length`` (left to
    right, one token per step) are exact."""
    if draft_length < 1:
        raise ValueError(f"the draft length must be at least 1, got {draft_length}")
    if draft_steps not in (1, draft_length):
        raise ValueError(
            f"draft steps must be 1 (one parallel step) or the draft length {draft_length} (left "
            f"to right, one token per step), got {draft_steps}: with other step counts the "
            "drafter's probability of its proposal given the tokens before it is unknown, and "
            "speculative decoding would not be exact"
        )


@torch.inference_mode()
def speculative_sample(
    target: CausalTokenModel,
    drafter: TokenDenoiser,
    process: MaskedProcess,
    shape: tuple[int, int],
    *,
    context_length: int,
    block_length: int,
    drafter_context: int,
    draft_length: int,
    draft_steps: int,
    prompt: Tensor | None = None,
    bos_id: int | None = None,
    temperature: float = 1.0,
    top_p: float | None = None,
    eos_id: int | None = None,
    pad_id: int | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> SpeculativeSamples:
    """``shape = (B, length)`` tokens after the optional ``(B, P)`` ``prompt`` with the law of
    :func:`~difflab.discrete.autoregressive.autoregressive_sample` for ``target`` (same windows
    of ``context_length`` tokens with ``block_length`` new ones, ``bos_id``, temperature, top-p,
    EOS and padding), drafted ``draft_length`` tokens at a time by ``drafter`` in
    ``draft_steps`` calls (1 or ``draft_length``: :func:`check_draft_steps`), which reads at
    most ``drafter_context`` tokens."""
    check_draft_steps(draft_length, draft_steps)
    if not isinstance(process, MaskedProcess):
        raise ValueError("the drafter must be a masked diffusion model (MDLM)")
    if drafter_context <= draft_length:
        raise ValueError(f"the drafter's context ({drafter_context}) must exceed the draft length")
    B, length = shape
    if not 0 < block_length <= context_length:
        raise ValueError("need 0 < block_length <= context_length")
    out = torch.zeros(B, 0, dtype=torch.long, device=device) if prompt is None else prompt
    if out.shape[1] > length:
        raise ValueError(f"the prompt ({out.shape[1]} tokens) is longer than the sequence")
    if bos_id is None and out.shape[1] == 0:
        raise ValueError("without bos_id, give a prompt of at least one token")
    fill = eos_id if pad_id is None else pad_id
    ended = torch.zeros(B, dtype=torch.bool, device=out.device)
    draft = _Drafter(drafter, process, drafter_context, draft_steps, temperature, top_p, generator)
    record = _Record()
    while out.shape[1] < length and not (eos_id is not None and bool(ended.all())):
        done = out.shape[1]
        new = min(length - done, max(block_length, context_length - done))
        keep = min(done, context_length - new)
        window = out[:, done - keep :]
        if bos_id is not None:
            window = torch.cat([out.new_full((B, 1), bos_id), window], dim=1)
        out, ended = _speculate_window(
            target, draft, out, window, new, draft_length, ended, temperature, top_p, eos_id,
            fill, generator, record,
        )  # fmt: skip
    lengths = torch.full((B,), length, device=out.device)
    if eos_id is not None:
        out = torch.nn.functional.pad(out, (0, length - out.shape[1]), value=fill)
        out, lengths = truncate_at_eos(out, eos_id, pad_id)
    return SpeculativeSamples(out, lengths, record.nfe, draft.nfe, record.drafted,
                              record.accepted, record.rounds)  # fmt: skip


@dataclass
class _Record:
    nfe: int = 0
    drafted: int = 0
    accepted: int = 0
    rounds: int = 0


class _Drafter:
    """``q`` and proposals of the masked drafter for the ``g`` positions after ``context``."""

    def __init__(
        self,
        model: TokenDenoiser,
        process: MaskedProcess,
        context: int,
        steps: int,
        temperature: float,
        top_p: float | None,
        generator: torch.Generator | None,
    ):
        self.model, self.process, self.context, self.steps = model, process, context, steps
        self.temperature, self.top_p, self.generator = temperature, top_p, generator
        self.nfe = 0

    def __call__(self, context: Tensor, g: int) -> tuple[Tensor, Tensor]:
        """``(drafts (B, g), log q (B, g, V))``: the drafter reads the last
        ``drafter_context - g`` tokens of ``context`` and ``g`` masks, and fills the masks left
        to right one per call (``steps > 1``) or all in one call. The network is called at
        ``t`` = the masked fraction of its window (a time-agnostic MDLM ignores it)."""
        B = context.shape[0]
        keep = min(context.shape[1], self.context - g)
        mask = context.new_full((B, g), self.process.mask_id)
        x = torch.cat([context[:, context.shape[1] - keep :], mask], dim=1)
        drafts, log_q = [], []
        for i in range(g if self.steps > 1 else 1):
            masked = g - i
            t = torch.full((B,), masked / x.shape[1], dtype=torch.float32, device=x.device)
            logits = self.model(x, t, None)[:, keep + i :].float()  # the masked positions
            self.nfe += 1
            log_probs = self.process.x0_log_probs(logits, x[:, keep + i :])
            log_probs = adjust_log_probs(log_probs, self.temperature, self.top_p)
            if self.steps == 1:
                return sample_categorical(log_probs, self.generator), log_probs
            token = sample_categorical(log_probs[:, 0], self.generator)
            x[:, keep + i] = token
            drafts.append(token)
            log_q.append(log_probs[:, 0])
        return torch.stack(drafts, 1), torch.stack(log_q, 1)


def _speculate_window(
    target: CausalTokenModel,
    draft: _Drafter,
    out: Tensor,
    window: Tensor,
    new: int,
    draft_length: int,
    ended: Tensor,
    temperature: float,
    top_p: float | None,
    eos_id: int | None,
    fill: int | None,
    generator: torch.Generator | None,
    record: _Record,
) -> tuple[Tensor, Tensor]:
    """``out`` followed by up to ``new`` tokens drawn after ``window`` (the target's view), with
    one cache: the rounds of the module docstring. Returns ``(out, ended)``."""
    B = window.shape[0]
    cache = target.new_cache(B, window.shape[1] + new)
    if window.shape[1] > 1:
        target(window[:, :-1], cache=cache)
        record.nfe += 1
    pending = window[:, -1]  # the last token read, not yet in the cache
    emitted = 0
    while emitted < new and not (eos_id is not None and bool(ended.all())):
        g = min(draft_length, new - emitted - 1)
        start = cache.length
        if g > 0:
            drafts, log_q = draft(out, g)
        else:
            drafts, log_q = out.new_zeros(B, 0), None
        logits = target(torch.cat([pending[:, None], drafts], dim=1), cache=cache)
        record.nfe += 1
        log_p = adjust_log_probs(logits.float().log_softmax(-1), temperature, top_p)
        tokens, accepted = _verify(drafts, log_p, log_q, generator)
        n = tokens.shape[1]
        if g > 0:
            record.rounds += 1
            record.drafted += B * g
            record.accepted += int(accepted.sum())
        cache.length = start + n  # the pending token and the n - 1 drafts kept
        if eos_id is not None:
            tokens, ended = _after_eos(tokens, ended, eos_id, fill)
        out = torch.cat([out, tokens], dim=1)
        pending = tokens[:, -1]
        emitted += n
    return out, ended


def _verify(
    drafts: Tensor, log_p: Tensor, log_q: Tensor | None, generator: torch.Generator | None
) -> tuple[Tensor, Tensor]:
    """``(tokens (B, k_min + 1), accepted (B,))``: the acceptance rule on ``drafts (B, g)``
    with target ``log_p (B, g + 1, V)`` and drafter ``log_q (B, g, V)``."""
    B, g = drafts.shape
    if g == 0:
        return sample_categorical(log_p[:, 0], generator)[:, None], drafts.new_zeros(B)
    p_d = log_p[:, :g].gather(-1, drafts[..., None]).squeeze(-1).double()
    q_d = log_q.gather(-1, drafts[..., None]).squeeze(-1).double()
    u = torch.rand(B, g, generator=generator, device=drafts.device, dtype=torch.float64)
    accept = u < (p_d - q_d).exp()  # q_d > 0: the draft was drawn from q
    accepted = accept.long().cumprod(1).sum(1)  # acceptances before the first rejection
    k = int(accepted.min())
    if k == g:  # every row accepted every draft: the bonus token from p_{G+1}
        last = sample_categorical(log_p[:, g], generator)
    else:
        p, q = log_p[:, k].double().exp(), log_q[:, k].double().exp()
        residual = (p - q).clamp_min(0.0)
        residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p)
        resampled = sample_categorical(residual.log(), generator)
        last = torch.where(accepted > k, drafts[:, k], resampled)
    return torch.cat([drafts[:, :k], last[:, None]], dim=1), accepted


def _after_eos(
    tokens: Tensor, ended: Tensor, eos_id: int, fill: int | None
) -> tuple[Tensor, Tensor]:
    """Tokens after a row's first EOS become ``fill``; ``ended`` is updated."""
    is_eos = tokens == eos_id
    before = is_eos.long().cumsum(1) - is_eos.long() > 0
    tokens = torch.where(ended[:, None] | before, fill, tokens)
    return tokens, ended | is_eos.any(1)
