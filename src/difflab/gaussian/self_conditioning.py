"""Self-conditioning (Chen, Zhang & Hinton 2023, "Analog Bits", Sec. 3; seed 003): the network
also reads a previous estimate of the data, ``x0_hat = f(x_t, x0_prev, t)``, with
``x0_prev = 0`` meaning "no estimate".

Two wrappers of a :class:`~difflab.gaussian.parameterization.DenoiserFn` put the previous
estimate into ``cond["self_cond"]`` (a network built for self-conditioning reads it as extra
input channels or features; zeros when absent):

- :class:`SelfConditionedTraining`, for the objectives: per call (one training batch) with
  probability 1/2 the estimate is zeros; otherwise the network first estimates
  ``x0_prev = f(x_t, 0, t)`` from the same ``x_t`` without gradient (stop-gradient) and the
  call that is trained reads it (Chen et al.'s Algorithm 1, one coin per batch, so the half of
  the batches without the extra pass cost nothing more).
- :class:`SelfConditioned`, for the samplers: each network evaluation reads the data estimate
  of the evaluation before it (zeros on the first) and keeps its own. For one-call-per-step
  samplers (ancestral, DDIM, multistep DPM-Solver++/UniPC/iPNDM) that is the previous step's
  estimate; for solvers with several evaluations per step (Heun/EDM, singlestep DPM-Solver,
  RK) the intermediate evaluation reads the step's first one and the next step reads the
  intermediate one: always the most recent estimate, at the closest noise level seen so far.
  It holds that estimate, so one instance serves one sampling run: :func:`restart` forgets it
  before the next run. Placed innermost (directly around the network's denoiser), under
  classifier-free guidance's batch ``[x_t; x_t]``, the conditional and unconditional rows each
  keep their own estimate, and under classifier guidance the estimate kept is the network's
  own (unguided) one: the network always reads what it was trained to read, its own output.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from difflab.gaussian.parameterization import AlphaSigma, DenoiserFn, Prediction


class SelfConditionedTraining:
    """Self-conditioning while training (module docstring): per call, ``cond["self_cond"]`` is
    zeros with probability 1/2, else the stop-gradient estimate ``f(x_t, 0, t)`` of the same
    ``x_t``. The coin is drawn from ``generator`` (the objective's), so a seeded run is
    reproducible; :attr:`used` counts the calls that read an estimate."""

    def __init__(self, denoiser: DenoiserFn, generator: torch.Generator | None = None):
        self.denoiser, self.schedule = denoiser, denoiser.schedule
        self.generator = generator
        self.used = 0

    @property
    def prediction(self) -> str:
        """The wrapped denoiser's parameterization (the objectives read it)."""
        return self.denoiser.prediction  # type: ignore[attr-defined]

    def __call__(
        self,
        x_t: Tensor,
        t: Tensor,
        cond: dict[str, Any] | None = None,
        *,
        alpha_sigma: AlphaSigma | None = None,
    ) -> Prediction:
        device = x_t.device if self.generator is None else self.generator.device
        coin = torch.rand((), generator=self.generator, device=device)
        estimate = torch.zeros_like(x_t)
        if bool(coin < 0.5):
            self.used += 1
            with torch.no_grad():
                first = self.denoiser(x_t, t, {**(cond or {}), "self_cond": estimate},
                                      alpha_sigma=alpha_sigma)  # fmt: skip
                estimate = first.x0.detach()
        return self.denoiser(x_t, t, {**(cond or {}), "self_cond": estimate},
                             alpha_sigma=alpha_sigma)  # fmt: skip


class SelfConditioned:
    """Self-conditioning while sampling (module docstring): each call passes the data estimate
    of the previous call (zeros on the first, or after :func:`restart`) to the network as
    ``cond["self_cond"]`` and keeps the new one."""

    def __init__(self, denoiser: DenoiserFn):
        self.denoiser, self.schedule = denoiser, denoiser.schedule
        self.previous: Tensor | None = None

    def __call__(
        self,
        x_t: Tensor,
        t: Tensor,
        cond: dict[str, Any] | None = None,
        *,
        alpha_sigma: AlphaSigma | None = None,
    ) -> Prediction:
        previous = torch.zeros_like(x_t) if self.previous is None else self.previous
        if previous.shape != x_t.shape:
            raise ValueError(
                f"a self-conditioned denoiser kept an estimate of shape {tuple(previous.shape)} "
                f"and was called on {tuple(x_t.shape)}: restart() it before each sampling run"
            )
        pred = self.denoiser(x_t, t, {**(cond or {}), "self_cond": previous},
                             alpha_sigma=alpha_sigma)  # fmt: skip
        self.previous = pred.x0
        return pred


def restart(denoiser: DenoiserFn) -> DenoiserFn:
    """``denoiser`` with every :class:`SelfConditioned` in its chain of wrappers (each wrapper's
    ``.denoiser``) made to forget its estimate, ready for a new sampling run."""
    inner: Any = denoiser
    while inner is not None:
        if isinstance(inner, SelfConditioned):
            inner.previous = None
        inner = getattr(inner, "denoiser", None)
    return denoiser
