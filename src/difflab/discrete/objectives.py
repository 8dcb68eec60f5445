"""Training objectives of discrete diffusion: continuous-time NELBOs (MDLM, UDLM, GIDD; for the
masked process also in its mask-count form) and D3PM.

A denoiser is any callable ``model(x_t, t, cond) -> logits (B, L, V)``; the process turns the
logits into ``log x_theta = log p_theta(x_0 | x_t)`` (:meth:`TokenProcess.x0_log_probs`, e.g. SUBS
for the masked process). Every objective returns a :class:`DiscreteLoss` whose ``token_nelbo`` is
an unbiased per-token estimate of the negative ELBO in nats, so that

- nats per token ``= token_nelbo.sum() / num_tokens``; bits per token: divide by ``ln 2``;
  bits per character: multiply bits per token by tokens per character;
- the perplexity bound is ``exp(nats per token)``.

``loss_mask`` (``(B, L)``, true for real tokens) removes padding: padded positions carry no loss
and no gradient. They are still corrupted and shown to the network like any token, so a network
that must not *look* at padding has to be told where it is (for example through ``cond``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from difflab.discrete.process import MaskedProcess, TokenProcess
from difflab.discrete.samplers import TokenDenoiser


@dataclass(frozen=True)
class DiscreteLoss:
    """What an objective returns.

    ``loss``: differentiable scalar to minimise, the mean over counted tokens of the training
    objective. ``token_nelbo``: ``(B, L)`` detached NELBO estimate per token in nats (zero where
    ``loss_mask`` is false). ``num_tokens``: number of counted tokens (float scalar). ``t``: the
    ``(B,)`` times used.
    """

    loss: Tensor
    token_nelbo: Tensor
    num_tokens: Tensor
    t: Tensor

    @property
    def nats_per_token(self) -> Tensor:
        """NELBO per counted token in nats (bits: divide by ``ln 2``; perplexity bound: ``exp``)."""
        return self.token_nelbo.sum() / self.num_tokens


def draw_times(
    batch_size: int,
    *,
    stratified: bool = True,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Times in ``(0, 1]`` for a batch, float32 ``(B,)``.

    Stratified (MDLM's low-discrepancy sampler, VDM): ``t_b = 1 - ((u + b / B) mod 1)`` for one
    ``u ~ U[0, 1)``, so the batch covers ``[0, 1]`` evenly, one time per stratum of width
    ``1 / B``, and each ``t_b`` is still uniform. ``t = 0`` is excluded (nothing is corrupted
    there).
    """
    if stratified:
        u = torch.rand((), generator=generator, device=device, dtype=torch.float64)
        offsets = torch.arange(batch_size, device=device, dtype=torch.float64) / batch_size
        frac = torch.remainder(u + offsets, 1.0)
    else:
        frac = torch.rand(batch_size, generator=generator, device=device, dtype=torch.float64)
    return (1.0 - frac).to(torch.float32)


def continuous_time_loss(
    model: TokenDenoiser,
    process: TokenProcess,
    x0: Tensor,
    *,
    loss_mask: Tensor | None = None,
    cond: Any = None,
    t: Tensor | None = None,
    stratified: bool = True,
    generator: torch.Generator | None = None,
) -> DiscreteLoss:
    """The continuous-time NELBO of ``process`` (MDLM, UDLM or the GIDD hybrid):

        -log p(x_0) <= E_{t ~ U(0, 1], x_t ~ q_t(. | x_0)} [ sum_i l_t(x_t^i, x_0^i) ]
                       + sum_i KL(q_1(. | x_0^i) || pi_1),

    with ``l_t`` the process's :meth:`~TokenProcess.loss_rate`: for the masked process MDLM's
    ``-alpha'_t / (1 - alpha_t) log x_theta(x_0)`` at masked tokens (SUBS), for the uniform process
    seed 003's UDLM integrand, for the hybrid its GIDD generalisation. One ``t`` per sequence
    (stratified over the batch unless ``t`` is given); one network call.
    """
    B = x0.shape[0]
    if t is None:
        t = draw_times(B, stratified=stratified, generator=generator, device=x0.device)
    x_t = process.sample(x0, t, generator)
    log_x0 = process.x0_log_probs(model(x_t, t, cond).float(), x_t)
    nelbo = process.loss_rate(log_x0, x_t, x0, t) + process.prior_kl(x0).to(log_x0.dtype)
    return _reduce(nelbo, nelbo, loss_mask, t)


def mask_count_loss(
    model: TokenDenoiser,
    process: MaskedProcess,
    x0: Tensor,
    *,
    loss_mask: Tensor | None = None,
    cond: Any = None,
    stratified: bool = True,
    generator: torch.Generator | None = None,
) -> DiscreteLoss:
    """The masked process's NELBO drawn through the number of masked tokens (its any-order form;
    Ou et al. 2024, LLaDA), for a denoiser ``x_theta`` that does not read ``t``:

        -log p(x_0) <= sum_{l=1}^{n} (1 / l) E_{|M| = l} [ sum_{i in M} -log x_theta(x_0^i | x^M) ]
                     = E_{l ~ U{1..n}, |M| = l} [ (n / l) sum_{i in M} -log x_theta(x_0^i | x^M) ],

    with ``M`` a uniformly random set of ``l`` of the row's ``n`` counted tokens and ``x^M`` the
    row with ``M`` masked. It is :func:`continuous_time_loss`'s bound for every schedule: given
    ``t`` the number masked is Binomial(n, 1 - alpha_t), and
    ``int_0^1 C(n, l) (1 - alpha_t)^(l - 1) alpha_t^(n - l) (-alpha'_t) dt = 1 / l``. Drawing
    ``l`` (stratified over the batch unless ``stratified`` is off) instead of ``t`` removes the
    binomial spread of the count and the unbounded weight ``-alpha'_t / (1 - alpha_t)`` near
    ``t = 0``: a row's estimate is ``n`` times the mean NLL of its masked tokens. Uncounted
    (padding) positions are masked with probability ``l / n`` each. The network is called with
    ``t = l / n``, the masked fraction (the log-linear time with that expected fraction); for a
    network that reads ``t`` this is a different bound from the one its samplers use.
    """
    if not isinstance(process, MaskedProcess):
        raise ValueError("mask_count_loss needs the masked process")
    B, L = x0.shape
    keep = torch.ones_like(x0, dtype=torch.bool) if loss_mask is None else loss_mask.bool()
    n = keep.sum(1).clamp_min(1).double()
    times = draw_times(B, stratified=stratified, generator=generator, device=x0.device)
    frac = 1.0 - times.double()  # in [0, 1)
    count = torch.minimum(torch.floor(frac * n) + 1, n)
    rank = torch.rand(B, L, generator=generator, device=x0.device).masked_fill(~keep, 2.0)
    rank = rank.argsort(1).argsort(1)  # counted tokens first, in random order
    coin = torch.rand(B, L, generator=generator, device=x0.device, dtype=torch.float64)
    masked = torch.where(keep, rank < count[:, None], coin < (count / n)[:, None])
    x_t = x0.masked_fill(masked, process.mask_id)
    t = (count / n).float()
    log_x0 = process.x0_log_probs(model(x_t, t, cond).float(), x_t)
    nll = -log_x0.gather(-1, x0.unsqueeze(-1)).squeeze(-1)
    weight = (n / count).to(nll.dtype)[:, None]
    nelbo = torch.where(masked, weight * nll, torch.zeros_like(nll))
    return _reduce(nelbo, nelbo, loss_mask, t)


def d3pm_loss(
    model: TokenDenoiser,
    process: TokenProcess,
    x0: Tensor,
    num_steps: int | None = None,
    *,
    ce_weight: float = 0.01,
    loss_mask: Tensor | None = None,
    cond: Any = None,
    generator: torch.Generator | None = None,
) -> DiscreteLoss:
    """D3PM's hybrid loss in discrete time ``k = 1..T`` (Austin et al. 2021; seed 003):

        L_lambda = L_vb + lambda E_q[-log x_theta(x_0 | x_k)],
        L_vb = E_k [ T KL(q(x_{k-1} | x_k, x_0) || p_theta(x_{k-1} | x_k)) ]
               + KL(q(x_T | x_0) || pi)

    on the grid ``t_k = k / T`` of the process's schedule (a :class:`DiscreteTimeSchedule` gives
    D3PM's own betas), with ``p_theta(x_{k-1} | x_k) = sum_x q(x_{k-1} | x_k, x) x_theta(x)`` and
    the ``k = 1`` term equal to ``-log x_theta(x_0 | x_1)`` (D3PM's ``L_0``). ``k`` is drawn
    stratified over the batch. ``token_nelbo`` is the ``L_vb`` estimate; ``loss`` adds
    ``ce_weight`` (D3PM's ``lambda``) times the cross-entropy. ``num_steps`` defaults to the
    ``T`` of a :class:`DiscreteTimeSchedule`.
    """
    if num_steps is None:
        num_steps = process.schedule.T
        if num_steps is None:
            raise ValueError("give num_steps: the process's schedule is continuous")
    if num_steps < 1:
        raise ValueError(f"num_steps must be at least 1, got {num_steps}")
    B = x0.shape[0]
    frac = 1.0 - draw_times(B, generator=generator, device=x0.device).double()  # in [0, 1)
    k = torch.floor(frac * num_steps).clamp(max=num_steps - 1) + 1
    t, s = k / num_steps, (k - 1) / num_steps
    x_t = process.sample(x0, t, generator)
    log_x0 = process.x0_log_probs(model(x_t, t.float(), cond).float(), x_t)
    kl = process.reverse_kl(log_x0, x_t, x0, s, t)
    nelbo = num_steps * kl + process.prior_kl(x0).to(kl.dtype)
    ce = -log_x0.gather(-1, x0.unsqueeze(-1)).squeeze(-1)
    return _reduce(nelbo + ce_weight * ce, nelbo, loss_mask, t.float())


def _reduce(objective: Tensor, nelbo: Tensor, loss_mask: Tensor | None, t: Tensor) -> DiscreteLoss:
    if loss_mask is None:
        keep = torch.ones_like(nelbo, dtype=torch.bool)
    else:
        if loss_mask.shape != nelbo.shape:
            raise ValueError(f"loss_mask must have shape {tuple(nelbo.shape)}")
        keep = loss_mask.bool()
    zero = torch.zeros_like(objective)
    objective = torch.where(keep, objective, zero)
    count = keep.sum().to(objective.dtype)
    loss = objective.sum() / count.clamp_min(1.0)
    token_nelbo = torch.where(keep, nelbo, torch.zeros_like(nelbo)).detach()
    return DiscreteLoss(loss=loss, token_nelbo=token_nelbo, num_tokens=count, t=t)
