"""Rectified flow's reflow (Liu et al. 2023; seed 000 points to it): straighten the paths of a
trained flow by retraining it on the noise-sample pairs it generates, and measure how straight
the paths are.

On the linear path ``x_t = (1 - t) x_0 + t eps`` a flow trained on independent pairs
``(x_0 ~ data, eps ~ N(0, I))`` has curved ODE trajectories wherever straight lines between the
pairs cross. Reflow draws ``eps``, integrates the trained flow's ODE ``dx/dt = u(x, t)`` from
``t = 1`` (in practice 0.999) to 0 to get ``x_0 = Phi(eps)`` (:func:`reflow_pairs`), and trains
again with the flow-matching loss on these coupled pairs (``loss_fn(..., eps=eps)`` of
``objectives.py``): the marginals stay those of the data while the coupling becomes
deterministic, so the new paths cross less and fewer Euler steps follow them.

Straightness (Liu et al. 2023, eq. 5), for a trajectory from ``t_0`` to ``t_n`` with velocity
``u`` and chord ``c = (x_t0 - x_tn) / (t_0 - t_n)``:

    S = 1 / (t_0 - t_n) int ||u(x_t, t) - c||^2 / D dt,

zero exactly for straight paths traversed at constant speed (where one Euler step is exact).
:func:`straightness` estimates it per example on the Euler trajectory of a grid.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from difflab.gaussian.parameterization import DenoiserFn
from difflab.gaussian.samplers import ddim


def velocity(denoiser: DenoiserFn, x_t: Tensor, t: Tensor, cond: dict[str, Any] | None) -> Tensor:
    """The flow ODE's velocity ``u = alpha' x0_hat + sigma' eps_hat`` of any denoiser at
    ``(x_t, t)`` (``t`` a ``(B,)`` float64 tensor)."""
    return denoiser(x_t, t, cond).velocity(*denoiser.schedule.derivatives(t))


@torch.inference_mode()
def reflow_pairs(
    denoiser: DenoiserFn, noise: Tensor, steps: int, cond: dict[str, Any] | None = None
) -> Tensor:
    """``x_0 = Phi(noise)``: ``steps`` Euler steps of the flow ODE over the schedule's own
    sampling grid (DDIM with ``eta = 0``, the same map on the linear path). On the linear path
    that grid starts at ``LinearPathSchedule.T_MAX = 0.999`` rather than at ``alpha = 0``, where
    guidance and thresholding (which convert through ``x_0 = (x_t - sigma eps) / alpha``) are
    undefined; the noise stands for ``x_1``, a start ``1e-3 x_0`` away from the exact one."""
    return ddim(denoiser, noise, denoiser.schedule.timesteps(steps), cond=cond)


@torch.inference_mode()
def straightness(
    denoiser: DenoiserFn, x: Tensor, ts: Tensor, cond: dict[str, Any] | None = None
) -> Tensor:
    """Per-example straightness ``S`` (module docstring) of the Euler trajectories from ``x``
    at ``ts[0]`` over the grid ``ts`` (decreasing, ending with 0): with ``u_i`` the velocity at
    step ``i``, ``c = (x_t0 - x_tn) / (t_0 - t_n)`` and ``dt_i = t_i - t_i+1``,
    ``S = sum_i dt_i ||u_i - c||^2 / D / (t_0 - t_n)``. Returns ``(B,)``."""
    ts = torch.as_tensor(ts, dtype=torch.float64)
    start, velocities = x, []
    for t, s in zip(ts[:-1].tolist(), ts[1:].tolist(), strict=True):
        u = velocity(denoiser, x, torch.full((len(x),), t, dtype=torch.float64, device=x.device),
                     cond)  # fmt: skip
        velocities.append(u)
        x = x + (s - t) * u
    span = float(ts[0] - ts[-1])
    chord = (start - x) / span
    dts = (ts[:-1] - ts[1:]).tolist()
    total = sum(dt * (u - chord).square().flatten(1).mean(1) for dt, u in
                zip(dts, velocities, strict=True))  # fmt: skip
    return total / span
