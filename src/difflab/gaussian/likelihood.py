"""Exact log-likelihood through the probability-flow ODE (Song et al. 2021, Sec. 4.3 and App. D.2;
Chen et al. 2018; Grathwohl et al. 2019), in nats and in bits per dimension.

**The ODE.** In the VE variable ``x~ = x_t / alpha = x_0 + sigma eps`` (``sigma = sigma_ve``,
docs/design.md) the probability-flow ODE of every schedule is the same (Karras et al. 2022, eq. 4):
``dx~ / d sigma = (x~ - D(x~; sigma)) / sigma = eps_hat``. Written in the log-SNR
``lambda = -2 log sigma``,

    dx~ / d lambda = v(x~, lambda) = -sigma eps_hat(x~, sigma) / 2,

and the density along a solution obeys ``d log p_lambda(x~(lambda)) / d lambda = -div v``.
Only the end points depend on the schedule: the data is placed at ``sigma_min``
(``t_0 = t(sigma_min)``, ``x_{t_0} = x``), and the prior is ``p(x_1) = N(0, prior_std^2 I)`` at
the schedule's first sampling time ``t_1`` (``Schedule.timesteps``: ``t = 1`` for every schedule
but the linear path of rectified flow, whose ``lambda(1) = -inf``; there ``t_1 = 0.999``, where
its ``alpha^2 + sigma^2 = 0.998`` is the prior's variance to 0.2%, the same approximation that
a VP schedule's ``alpha(1) > 0`` makes). With ``x~_0 = x / alpha(t_0)`` integrated to ``x~_1`` at
``lambda_1 = lambda(t_1)``:

    log p_{t_0}(x) = log N(alpha(t_1) x~_1; 0, prior_std^2 I) + D log(alpha(t_1) / alpha(t_0))
                     + int_{lambda_0}^{lambda_1} div v(x~(lambda), lambda) d lambda,

(the middle term is the change of variables between ``x_t`` and ``x~``). This is the density of
the model's marginal at ``sigma_min``, which tends to the model's data density as
``sigma_min -> 0``; the default ``1e-3`` is an eighth of an 8-bit bin on ``[-1, 1]`` and, for
Song et al.'s VP SDE, is their ``t = 1e-5``.

**Integration.** Fixed-step classical Runge-Kutta (RK4) in ``lambda`` on ``n_steps`` equal steps
from ``lambda_0`` to ``lambda_1`` (4 evaluations per step), integrating ``x~`` and the log-density
change together (:func:`~difflab.gaussian.sde.probability_flow_velocity`; the sampler
:func:`~difflab.gaussian.sde.probability_flow` takes the same steps on its own grid). Equal steps
in log-SNR put as many steps in each octave of noise, whatever the schedule.

**Divergence.** Hutchinson's estimator ``div v = E_z[z^T (dv/dx~) z]`` with ``n_probes`` probes
``z`` (Rademacher, entries +-1, or standard Gaussian), drawn once per call and kept for the whole
trajectory (FFJORD), each ``z^T (dv/dx~)`` one vector-Jacobian product. The estimate of
``log p`` is unbiased for the discretised ODE; its variance is that of the probes' quadratic form
of ``int dv/dx~ d lambda`` (zero for a diagonal Jacobian with Rademacher probes).

**Bits per dimension** (:func:`ode_bits_per_dim`). Data on the 8-bit grid
``x = 2 k / 255 - 1`` (``bins = 256`` levels in ``[-1, 1]``, spacing ``w = 2 / (bins - 1)``) is
dequantised uniformly over the bin around each level, ``x_u = x + w (u - 1/2)``,
``u ~ U[0, 1)^D``. Since ``P(k) = int_bin p >= w^D exp(E_u log p(x_u))`` (Jensen),

    bits/dim = -log p(x_u) / (D ln 2) - log2 w = -log p(x_u) / (D ln 2) + log2((bins - 1) / 2)

is, in expectation over ``u``, an upper bound on ``-log2 P(k) / D`` (for 8 bits the offset is
``log2 127.5 = 6.994``).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import Tensor

from difflab.gaussian.langevin import check_noise_levels
from difflab.gaussian.parameterization import DenoiserFn
from difflab.gaussian.sde import probability_flow_velocity

Probe = Literal["rademacher", "gaussian"]


def _probes(x: Tensor, n: int, kind: Probe, generator: torch.Generator | None) -> Tensor:
    shape = (n, *x.shape)
    if kind == "gaussian":
        return torch.randn(shape, generator=generator, device=x.device, dtype=x.dtype)
    if kind == "rademacher":
        bits = torch.randint(0, 2, shape, generator=generator, device=x.device)
        return (2 * bits - 1).to(x.dtype)
    raise ValueError(f"unknown probe {kind!r}: choose 'rademacher' or 'gaussian'")


def ode_log_likelihood(
    denoiser: DenoiserFn,
    x: Tensor,
    cond: dict[str, Any] | None = None,
    *,
    n_steps: int = 100,
    n_probes: int = 1,
    probe: Probe = "rademacher",
    sigma_min: float = 1e-3,
    generator: torch.Generator | None = None,
) -> Tensor:
    """``log p_{t_0}(x)`` in nats per example, float64 ``(B,)`` (module docstring).

    Args:
        denoiser: any denoiser; its schedule gives ``t(sigma)``, ``alpha(t)`` and the prior.
        x: the points, ``(B, ...)``, placed at the noise level ``sigma_min``.
        n_steps: RK4 steps in log-SNR (``4 n_steps`` evaluations, each with ``n_probes``
            vector-Jacobian products).
        n_probes: Hutchinson probes per example, fixed along the trajectory.
        probe: ``"rademacher"`` or ``"gaussian"``.
        sigma_min: the VE noise level of the data end; must be a positive level of the schedule.
        generator: draws the probes.

    An evaluation: nothing is propagated to the denoiser's parameters; put a network in
    ``eval()`` mode first (dropout would make the velocity random).
    """
    if n_steps < 1 or n_probes < 1:
        raise ValueError("ode_log_likelihood needs n_steps >= 1 and n_probes >= 1")
    schedule = denoiser.schedule
    t0 = float(check_noise_levels(schedule, torch.tensor([sigma_min]))[0])
    lam0 = -2.0 * math.log(sigma_min)
    lam1 = float(schedule.log_snr(schedule.timesteps(1)[0]))  # lambda(t_1): the prior's time
    if not lam1 < lam0:
        raise ValueError(f"sigma_min={sigma_min} is not below the schedule's sigma_ve(1)")
    h = (lam1 - lam0) / n_steps
    # lambda at every RK4 stage (step starts, midpoints, the end), its time and alpha.
    lams = lam0 + h * torch.arange(2 * n_steps + 1, dtype=torch.float64) / 2
    ts = schedule.t_of_log_snr(lams).clamp(min=t0)
    alphas = schedule.alpha_sigma(ts)[0].to(torch.float64).tolist()
    batch, dim = x.shape[0], x[0].numel()
    ts_d = ts.to(x.device)

    def velocity(y: Tensor, j: int) -> tuple[Tensor, Tensor]:
        """``v`` and the Hutchinson divergence at stage ``j`` of the half-step grid."""
        y = y.detach().requires_grad_(True)
        t = ts_d[j].expand(batch)
        v = probability_flow_velocity(denoiser(alphas[j] * y, t, cond))
        div = torch.zeros(batch, dtype=torch.float64, device=x.device)
        for k in range(n_probes):
            (vjp,) = torch.autograd.grad(v, y, z[k], retain_graph=k < n_probes - 1)
            div = div + (vjp * z[k]).flatten(1).sum(1).to(torch.float64)
        return v.detach(), div / n_probes

    with torch.inference_mode(False), torch.enable_grad():
        y = x.detach().clone() / alphas[0]
        z = _probes(y, n_probes, probe, generator)
        change = torch.zeros(batch, dtype=torch.float64, device=x.device)
        for i in range(n_steps):
            j = 2 * i
            k1, d1 = velocity(y, j)
            k2, d2 = velocity(y + 0.5 * h * k1, j + 1)
            k3, d3 = velocity(y + 0.5 * h * k2, j + 1)
            k4, d4 = velocity(y + h * k3, j + 2)
            y = y + h / 6.0 * (k1 + 2.0 * k2 + 2.0 * k3 + k4)
            change = change + h / 6.0 * (d1 + 2.0 * d2 + 2.0 * d3 + d4)
        x1 = alphas[-1] * y.to(torch.float64)
    var = schedule.prior_std**2
    log_prior = -0.5 * (x1.flatten(1).square().sum(1) / var + dim * math.log(2 * math.pi * var))
    return log_prior + dim * math.log(alphas[-1] / alphas[0]) + change


def ode_bits_per_dim(
    denoiser: DenoiserFn,
    x: Tensor,
    cond: dict[str, Any] | None = None,
    *,
    n_steps: int = 100,
    n_probes: int = 1,
    probe: Probe = "rademacher",
    sigma_min: float = 1e-3,
    bins: int = 256,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Bits per dimension of data on the ``bins``-level grid of ``[-1, 1]``, float64 ``(B,)``:
    ``-log p(x + w (u - 1/2)) / (D ln 2) + log2((bins - 1) / 2)`` with ``w = 2 / (bins - 1)`` and
    one uniform dequantisation ``u`` per example (module docstring); ``generator`` draws ``u``
    and the probes. Other arguments as :func:`ode_log_likelihood`."""
    if bins < 2:
        raise ValueError(f"bins must be at least 2, got {bins}")
    width = 2.0 / (bins - 1)
    u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    log_p = ode_log_likelihood(
        denoiser,
        x + width * (u - 0.5),
        cond,
        n_steps=n_steps,
        n_probes=n_probes,
        probe=probe,
        sigma_min=sigma_min,
        generator=generator,
    )
    dim = x[0].numel()
    return -log_p / (dim * math.log(2.0)) - math.log2(width)
