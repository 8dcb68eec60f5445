"""Samplers: stateless functions that turn noise into data with any denoiser.

Every sampler has the signature (docs/design.md, "Sampler")::

    sampler(denoiser, x, ts, *, cond=None, generator=None, callback=None, **options) -> Tensor

- ``denoiser`` is any :class:`~difflab.gaussian.parameterization.DenoiserFn` (a trained
  ``Denoiser``, a guidance wrapper, an exact oracle, or a plain function wrapped in
  ``Denoiser(fn, schedule, prediction)``); it is called as
  ``denoiser(x_t, t, cond, alpha_sigma=(alpha(t), sigma(t)))`` with ``t`` a ``(B,)`` float64
  tensor on ``x``'s device and the schedule values that the sampler computed once for its
  whole grid (0-d tensors of ``x``'s dtype), so the denoiser need not evaluate its schedule.
- ``x`` is the starting noise at ``ts[0]``, already scaled to the prior (``Schedule.prior_std``).
- ``ts`` is a strictly decreasing sequence of times in ``[0, 1]`` ending with exactly 0, e.g.
  :meth:`Schedule.timesteps`, :func:`karras_times` or :func:`log_snr_times`. ``n = len(ts) - 1``
  steps are taken; the step into ``t = 0`` returns the denoiser's data estimate ``x0`` at the
  previous time, so the output carries no residual noise (:func:`ipndm` and :func:`lms`, which
  integrate the ODE in ``sigma_ve``, regular at 0, take a multistep step there instead).
- ``generator`` (on ``x``'s device) drives every random draw, so runs are reproducible.
- ``callback(i, t, x_t, x0)`` is called once per step ``i = 0..n-1`` with the time ``t`` (a
  float) at which the denoiser was evaluated first in that step, the state ``x_t`` there and
  the denoiser's data estimate ``x0``.

All step coefficients are computed once, in float64 on the host, before the loop; the loop only
calls the denoiser and combines tensors with Python-float weights, so it never synchronises
with the device. Samplers run under ``torch.inference_mode()`` and keep no state between calls.

Notation (docs/design.md): ``x_t = alpha_t x_0 + sigma_t eps``; ``sigma_ve = sigma / alpha``; the
exponential integrators use the half log-SNR ``ell = log(alpha / sigma) = lambda / 2`` and
``h = ell_s - ell_t > 0`` for a step from ``t`` down to ``s`` (Lu et al. 2022).
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple, Protocol

import numpy as np
import torch
from torch import Tensor

from difflab.gaussian.grid import Callback, Grid
from difflab.gaussian.langevin import annealed_langevin_sampler
from difflab.gaussian.parameterization import AlphaSigma, DenoiserFn, Prediction
from difflab.gaussian.process import posterior_coefficients, transition_coefficients
from difflab.gaussian.schedules import Schedule
from difflab.gaussian.sde import predictor_corrector, probability_flow, reverse_sde


class Sampler(Protocol):
    """The sampler contract (see the module docstring)."""

    def __call__(
        self,
        denoiser: DenoiserFn,
        x: Tensor,
        ts: Tensor | Sequence[float],
        *,
        cond: dict[str, Any] | None = None,
        generator: torch.Generator | None = None,
        callback: Callback | None = None,
        **options: Any,
    ) -> Tensor: ...


# ================================================================================================
# Time grids
# ================================================================================================


def karras_times(
    schedule: Schedule,
    n: int,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    rho: float = 7.0,
) -> Tensor:
    """``n`` steps with noise levels spaced as in Karras et al. (2022), eq. 5, then ``t = 0``.

    ``sigma_i = (sigma_max^(1/rho) + i / (n - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho``
    for ``i = 0..n-1`` in ``sigma_ve = sigma / alpha``, mapped to times by the schedule, and a
    final 0. Defaults: ``sigma_max = sigma_ve(1)``; ``sigma_min = sigma_ve(1 / T)`` for a
    discrete schedule of ``T`` steps, else EDM's 0.002 or ``sigma_ve(0.001)`` if larger (a VE
    schedule's own minimum). Returns ``n + 1`` float64 times.
    """
    lo, hi = _sigma_range(schedule, n, sigma_min, sigma_max)
    if rho <= 0:
        raise ValueError(f"rho must be positive, got {rho}")
    ramp = torch.linspace(0.0, 1.0, n, dtype=torch.float64)
    sigmas = (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
    return _times_of_sigmas(schedule, sigmas)


def log_snr_times(
    schedule: Schedule, n: int, sigma_min: float | None = None, sigma_max: float | None = None
) -> Tensor:
    """``n`` steps uniform in log-SNR (``lambda = -2 log sigma_ve``) between ``sigma_max`` and
    ``sigma_min``, then ``t = 0`` (the DPM-Solver spacing; Karras spacing as ``rho -> inf``).
    Same defaults as :func:`karras_times`; returns ``n + 1`` float64 times."""
    lo, hi = _sigma_range(schedule, n, sigma_min, sigma_max)
    sigmas = torch.logspace(math.log10(hi), math.log10(lo), n, dtype=torch.float64)
    return _times_of_sigmas(schedule, sigmas)


GRIDS: tuple[str, ...] = ("trailing", "leading", "linspace", "karras", "log-snr")
"""The sampling grids :func:`time_grid` builds by name."""


def time_grid(schedule: Schedule, steps: int, grid: str = "trailing") -> Tensor:
    """The ``steps + 1`` decreasing float64 sampling times, ending with 0, of the grid named
    ``grid`` (:data:`GRIDS`): ``trailing``, ``leading`` or ``linspace`` steps of the schedule's
    own grid (:meth:`Schedule.timesteps`), ``karras`` (:func:`karras_times`, ``rho = 7`` in
    ``sigma_ve``) or ``log-snr`` (:func:`log_snr_times`, uniform in ``lambda``). Raises
    ``ValueError`` for any other name."""
    if grid in ("trailing", "leading", "linspace"):
        return schedule.timesteps(steps, grid)  # type: ignore[arg-type]
    if grid == "karras":
        return karras_times(schedule, steps)
    if grid == "log-snr":
        return log_snr_times(schedule, steps)
    raise ValueError(f"unknown time grid {grid!r}: choose one of {', '.join(GRIDS)}")


def _sigma_range(
    schedule: Schedule, n: int, sigma_min: float | None, sigma_max: float | None
) -> tuple[float, float]:
    if n < 1:
        raise ValueError(f"the number of sampling steps must be at least 1, got {n}")
    if sigma_max is None:
        sigma_max = float(schedule.sigma_ve(torch.ones((), dtype=torch.float64)))
    if sigma_min is None:  # the first grid step, or EDM's 0.002 within a continuous schedule
        t_min = 1.0 / schedule.T if schedule.T is not None else 1e-3
        sigma_min = float(schedule.sigma_ve(torch.tensor(t_min, dtype=torch.float64)))
        if schedule.T is None:
            sigma_min = max(sigma_min, 0.002)
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min} and {sigma_max}")
    return sigma_min, sigma_max


def _times_of_sigmas(schedule: Schedule, sigmas: Tensor) -> Tensor:
    ts = schedule.t_of_sigma_ve(sigmas).to(torch.float64).clamp(0.0, 1.0)
    reached = schedule.sigma_ve(ts).to(torch.float64)
    if not bool(torch.allclose(reached, sigmas, rtol=1e-6, atol=0.0)):
        top = float(schedule.sigma_ve(ts.new_ones(())))
        raise ValueError(
            f"noise levels {float(sigmas.min()):.3g}..{float(sigmas.max()):.3g} lie outside the "
            f"schedule's range (its largest is sigma_ve(1) = {top:.3g})"
        )
    if len(ts) > 1 and not bool((ts[:-1] > ts[1:]).all()):
        raise ValueError("the noise levels map to repeated times: use fewer steps")
    return torch.cat([ts, torch.zeros(1, dtype=torch.float64)])


# ================================================================================================
# Shared machinery
# ================================================================================================


def _values_at(schedule: Schedule, t: list[float]) -> tuple[list[float], list[float]]:
    """``(alpha(t), sigma(t))`` at extra evaluation times, as float64 lists."""
    alpha, sigma = schedule.alpha_sigma(torch.tensor(t, dtype=torch.float64))
    return alpha.to(torch.float64).tolist(), sigma.to(torch.float64).tolist()


class _At(NamedTuple):
    """One evaluation point of the denoiser: ``t`` as a ``(B,)`` float64 tensor and the
    schedule's ``(alpha(t), sigma(t))`` as 0-d tensors of ``x``'s dtype, all on ``x``'s device."""

    t: Tensor
    alpha_sigma: AlphaSigma


def _evaluation_points(
    times: list[float], alphas: list[float], sigmas: list[float], x: Tensor
) -> list[_At]:
    """Each time with its schedule values (already computed on the host, float64), copied to
    ``x``'s device in one transfer, so that the denoiser never re-evaluates the schedule."""
    table = torch.tensor([times, alphas, sigmas], dtype=torch.float64).to(x.device)
    ts = table[0, :, None].expand(len(times), x.shape[0]).unbind()
    alphas_x, sigmas_x = table[1:].to(x.dtype).unbind()
    levels = zip(alphas_x.unbind(), sigmas_x.unbind(), strict=True)
    return [_At(t, level) for t, level in zip(ts, levels, strict=True)]


def _denoise(denoiser: DenoiserFn, x: Tensor, at: _At, cond: dict[str, Any] | None) -> Prediction:
    return denoiser(x, at.t, cond, alpha_sigma=at.alpha_sigma)


def _noise(x: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def _combine(scale: float, base: Tensor, *terms: tuple[float, Tensor]) -> Tensor:
    """``scale * base + sum_j w_j t_j`` with one kernel per term (a fresh tensor, added into)."""
    out = base.mul(scale)
    for weight, term in terms:
        out.add_(term, alpha=weight)
    return out


def _phi(k: int, z: float) -> float:
    """``phi_k(z) = sum_{j>=0} z^j / (j + k)!`` (so ``phi_0 = e^z``, ``phi_1 = (e^z - 1) / z``,
    ``phi_{k+1} = (phi_k - 1/k!) / z``); a series near 0 avoids cancellation."""
    if abs(z) < 0.1:
        return sum(z**j / math.factorial(j + k) for j in range(14))
    value = math.exp(z)
    for j in range(k):
        value = (value - 1.0 / math.factorial(j)) / z
    return value


def _check_choice(name: str, value: Any, allowed: Sequence[Any]) -> None:
    if value not in allowed:
        choices = ", ".join(repr(a) for a in allowed)
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


# ================================================================================================
# DDPM and DDIM (seed 001; Ho et al. 2020; Song et al. 2021)
# ================================================================================================


@torch.inference_mode()
def ddpm(
    denoiser: DenoiserFn,
    x: Tensor,
    ts: Tensor | Sequence[float],
    *,
    cond: dict[str, Any] | None = None,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    variance: Literal["beta", "beta_tilde"] = "beta_tilde",
) -> Tensor:
    """DDPM ancestral sampling over any decreasing times (Ho et al. 2020, Algorithm 2).

    From ``t`` to ``s < t``: ``x_s = c_xt x_t + c_x0 x0_hat + sqrt(v) z`` with the posterior
    mean of ``q(x_s | x_t, x_0 = x0_hat)`` (``process.posterior_coefficients``) and variance
    ``v = sigma_{s,t}^2`` (``"beta_tilde"``, the posterior variance) or ``v = sigma_{t|s}^2``
    (``"beta"``, the forward transition variance, ``beta_t`` on the full grid). No noise is
    added on the step into ``t = 0``, which returns ``x0_hat``.
    """
    _check_choice("variance", variance, ("beta", "beta_tilde"))
    g = Grid(denoiser.schedule, ts)
    s, t = g.ts[1:], g.ts[:-1]
    c_xt, c_x0, var = posterior_coefficients(g.schedule, s, t)
    if variance == "beta":
        var = transition_coefficients(g.schedule, s, t)[1]
    c_xt, c_x0, std = c_xt.tolist(), c_x0.tolist(), var.sqrt().tolist()
    times = _evaluation_points(g.t[:-1], g.alpha[:-1], g.sigma[:-1], x)
    for i in range(g.n):
        pred = _denoise(denoiser, x, times[i], cond)
        if callback is not None:
            callback(i, g.t[i], x, pred.x0)
        if i == g.n - 1:
            return pred.x0
        x = _combine(c_xt[i], x, (c_x0[i], pred.x0), (std[i], _noise(x, generator)))
    raise AssertionError("unreachable")


@torch.inference_mode()
def ddim(
    denoiser: DenoiserFn,
    x: Tensor,
    ts: Tensor | Sequence[float],
    *,
    cond: dict[str, Any] | None = None,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    eta: float = 0.0,
) -> Tensor:
    """DDIM (Song et al. 2021, eq. 12) for any ``eta in [0, 1]`` and any times.

    ``x_s = alpha_s x0_hat + sqrt(sigma_s^2 - c^2) eps_hat + c z`` with
    ``c^2 = eta^2 sigma_{s,t}^2`` (the posterior variance, Song et al. eq. 16). ``eta = 0`` is
    deterministic (the probability-flow ODE by Euler in ``sigma_ve``); ``eta = 1`` is DDPM with
    ``variance="beta_tilde"``.
    """
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must lie in [0, 1], got {eta}")
    g = Grid(denoiser.schedule, ts)
    post_var = posterior_coefficients(g.schedule, g.ts[1:], g.ts[:-1])[2]
    noise_var = eta**2 * post_var
    c_eps = (g.sigma_t[1:] ** 2 - noise_var).clamp(min=0.0).sqrt().tolist()
    std = noise_var.sqrt().tolist()
    times = _evaluation_points(g.t[:-1], g.alpha[:-1], g.sigma[:-1], x)
    for i in range(g.n):
        pred = _denoise(denoiser, x, times[i], cond)
        if callback is not None:
            callback(i, g.t[i], x, pred.x0)
        if i == g.n - 1:
            return pred.x0
        noise = [(std[i], _noise(x, generator))] if eta > 0 else []
        x = _combine(g.alpha[i + 1], pred.x0, (c_eps[i], pred.eps), *noise)
    raise AssertionError("unreachable")


# ================================================================================================
# EDM samplers in sigma_ve (Karras et al. 2022)
# ================================================================================================


def _edm(
    denoiser: DenoiserFn,
    x: Tensor,
    ts: Tensor | Sequence[float],
    cond: dict[str, Any] | None,
    generator: torch.Generator | None,
    callback: Callback | None,
    second_order: bool,
    s_churn: float,
    s_tmin: float,
    s_tmax: float,
    s_noise: float,
) -> Tensor:
    """Karras et al. (2022), Algorithm 2, on ``y = x / alpha`` with noise level ``sigma_ve``.

    Churn: ``gamma_i = min(s_churn / n, sqrt(2) - 1)`` where ``s_tmin <= sigma_i <= s_tmax``
    (else 0), ``sigma_hat = sigma_i (1 + gamma_i)`` (capped at ``sigma_ve(1)``, the largest level
    a schedule has), ``y_hat = y_i + sqrt(sigma_hat^2 - sigma_i^2) s_noise z``. Then with
    ``d = eps_hat(y_hat, sigma_hat)``, Euler: ``y_{i+1} = y_hat + (sigma_{i+1} - sigma_hat) d``;
    Heun averages ``d`` with ``d' = eps_hat(y_{i+1}, sigma_{i+1})`` unless ``sigma_{i+1} = 0``.
    """
    if s_churn < 0 or s_noise < 0:
        raise ValueError("s_churn and s_noise must be non-negative")
    g = Grid(denoiser.schedule, ts)
    schedule = g.schedule
    sig = (g.sigma_t / g.alpha_t).tolist()
    sigma_top = float(schedule.sigma_ve(torch.ones((), dtype=torch.float64))) if s_churn else 0.0
    gamma = [
        min(s_churn / g.n, math.sqrt(2) - 1) if s_tmin <= sig[i] <= s_tmax else 0.0
        for i in range(g.n)
    ]
    sig_hat = [min(sig[i] * (1 + gamma[i]), max(sig[i], sigma_top)) for i in range(g.n)]
    churned = [sig_hat[i] > sig[i] for i in range(g.n)]
    t_hat = [
        float(schedule.t_of_sigma_ve(torch.tensor(sig_hat[i], dtype=torch.float64)))
        if churned[i]
        else g.t[i]
        for i in range(g.n)
    ]
    alpha_hat, sigma_hat = (
        _values_at(schedule, t_hat) if any(churned) else (g.alpha[:-1], g.sigma[:-1])
    )
    # evaluations at t_hat_i, then at t_{i+1}
    times = _evaluation_points(
        t_hat + g.t[1:-1], alpha_hat + g.alpha[1:-1], sigma_hat + g.sigma[1:-1], x
    )
    for i in range(g.n):
        if churned[i]:
            extra = math.sqrt(sig_hat[i] ** 2 - sig[i] ** 2) * s_noise
            x = _combine(alpha_hat[i] / g.alpha[i], x, (alpha_hat[i] * extra, _noise(x, generator)))
        pred = _denoise(denoiser, x, times[i], cond)
        if callback is not None:
            callback(i, t_hat[i], x, pred.x0)
        if i == g.n - 1:
            return pred.x0
        scale = g.alpha[i + 1] / alpha_hat[i]
        step = g.alpha[i + 1] * (sig[i + 1] - sig_hat[i])
        x_next = _combine(scale, x, (step, pred.eps))
        if second_order:
            eps_next = _denoise(denoiser, x_next, times[g.n + i], cond).eps
            x_next = _combine(scale, x, (0.5 * step, pred.eps), (0.5 * step, eps_next))
        x = x_next
    raise AssertionError("unreachable")


@torch.inference_mode()
def euler(
    denoiser: DenoiserFn,
    x: Tensor,
    ts: Tensor | Sequence[float],
    *,
    cond: dict[str, Any] | None = None,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = math.inf,
    s_noise: float = 1.0,
) -> Tensor:
    """Euler on the probability-flow ODE ``dy / dsigma_ve = eps_hat`` (``y = x / alpha``),
    with optional EDM churn (Karras et al. 2022, Algorithm 2 without its second-order
    correction). 1 NFE per step. Without churn it is the same map as ``ddim(eta=0)`` (Karras et
    al. 2022, Sec. 4): DDIM is Euler's method in ``(y, sigma_ve)``.
    """
    return _edm(denoiser, x, ts, cond, generator, callback, False, s_churn, s_tmin, s_tmax, s_noise)


@torch.inference_mode()
def heun(
    denoiser: DenoiserFn,
    x: Tensor,
    ts: Tensor | Sequence[float],
    *,
    cond: dict[str, Any] | None = None,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = math.inf,
    s_noise: float = 1.0,
) -> Tensor:
    """EDM's second-order Heun sampler with optional churn (Karras et al. 2022, Algorithm 2).

    2 NFE per step except the last (Euler into ``sigma = 0``): ``2n - 1`` in all. Use it with
    :func:`karras_times`. Churn re-noises to ``sigma_hat = sigma_i (1 + gamma_i)`` first; with
    ``s_churn = 0`` it is deterministic.
    """
    return _edm(denoiser, x, ts, cond, generator, callback, True, s_churn, s_tmin, s_tmax, s_noise)


# ================================================================================================
# DPM-Solver: exponential integrators in the half log-SNR (Lu et al. 2022a, 2022b)
# ================================================================================================
#
# With data prediction x0_hat, the probability-flow ODE solution from t to s is exactly
#     x_s = (sigma_s / sigma_t) x_t + alpha_s int_0^h e^{-(h-u)} x0_hat(ell_t + u) du,
# and with noise prediction eps_hat
#     x_s = (alpha_s / alpha_t) x_t - sigma_s int_0^h e^{h-u} eps_hat(ell_t + u) du.
# Expanding the prediction m(ell_t + u) = sum_k m^(k) u^k / k! gives the coefficients
# int_0^h e^{-(h-u)} u^k / k! du = h^{k+1} phi_{k+1}(-h) (data) and h^{k+1} phi_{k+1}(h) (noise).


class _ExpStep(NamedTuple):
    """A step of ``h`` in ``ell`` from ``t`` to ``s``: ``x_s ~ A x_t + C1 m_t + C2 m'_t``, ``m``
    the noise or data prediction and ``m' = dm / d ell`` (the comment above); for data
    ``A = sigma_s / sigma_t``, ``C_k = alpha_s h^k phi_k(-h)``, for noise
    ``A = alpha_s / alpha_t``, ``C_k = -sigma_s h^k phi_k(h)``."""

    A: float
    C1: float
    C2: float
    h: float

    def first_order(self, x: Tensor, m: Tensor, *terms: tuple[float, Tensor]) -> Tensor:
        """``A x_t + C1 m_t`` (DPM-Solver-1, i.e. DDIM), plus any further weighted ``terms``."""
        return _combine(self.A, x, (self.C1, m), *terms)

    def second_order(self, x: Tensor, m: Tensor, d: Tensor, dh: float) -> Tensor:
        """``A x_t + C1 m_t + C2 m'_t`` with the slope ``m'_t ~ d / dh`` taken from the change
        ``d = m(u) - m_t`` of the prediction over ``dh`` in ``ell``."""
        return _combine(self.A, x, (self.C1, m), (self.C2 / dh, d))


def _exp_step(
    prediction: str, g: Grid, i: int, alpha_s: float, sigma_s: float, h: float
) -> _ExpStep:
    """The :class:`_ExpStep` of ``h`` in ``ell`` from ``t_i`` to the time where the schedule is
    ``(alpha_s, sigma_s)``."""
    if prediction == "data":
        C1, C2 = alpha_s * h * _phi(1, -h), alpha_s * h**2 * _phi(2, -h)
        return _ExpStep(sigma_s / g.sigma[i], C1, C2, h)
    C1, C2 = -sigma_s * h * _phi(1, h), -sigma_s * h**2 * _phi(2, h)
    return _ExpStep(alpha_s / g.alpha[i], C1, C2, h)


class _Stage(NamedTuple):
    """An intermediate point of a singlestep solver: the sub-step to it from ``t_i``, and the
    denoiser's evaluation point there."""

    step: _ExpStep
    at: _At


def _stages(g: Grid, prediction: str, r: float, x: Tensor) -> list[_Stage]:
    """The :class:`_Stage` at ``ell_i + r (ell_{i+1} - ell_i)`` of each step ``t_i -> t_{i+1}``
    but the last (which lands on ``x0_hat``), mapped to a time by the schedule."""
    steps = range(g.n - 1)
    if not steps:
        return []
    log_snr = [2.0 * (g.ell[i] + r * (g.ell[i + 1] - g.ell[i])) for i in steps]
    t = g.schedule.t_of_log_snr(torch.tensor(log_snr, dtype=torch.float64))
    t = t.to(torch.float64).tolist()
    alpha, sigma = _values_at(g.schedule, t)
    points = _evaluation_points(t, alpha, sigma, x)
    return [
        _Stage(_exp_step(prediction, g, i, a, s, math.log(a / s) - g.ell[i]), at)
        for i, (a, s, at) in enumerate(zip(alpha, sigma, points, strict=True))
    ]


@torch.inference_mode()
def dpm_solver(
    denoiser: DenoiserFn,
    x: Tensor,
    ts: Tensor | Sequence[float],
    *,
    cond: dict[str, Any] | None = None,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    order: int = 2,
    prediction: Literal["noise", "data"] = "noise",
) -> Tensor:
    """Singlestep DPM-Solver-1/2/3 (Lu et al. 2022a, Algorithms 1 and 2; ``prediction="data"``
    gives DPM-Solver++(1S/2S/3S), Lu et al. 2022b, with the same stage structure).

    Each step of ``h`` in ``ell`` evaluates the denoiser at ``ell_t + r h`` for the stages
    ``r = 1/2`` (order 2) or ``r = 1/3, 2/3`` (order 3) and combines, with ``m`` the
    noise or data prediction and ``D_r = m(u_r) - m_t``:

    - order 1: ``x_s = A x_t + C1 m_t`` (= DDIM with ``eta = 0``)
    - order 2: ``u = A' x_t + C1' m_t`` at ``r = 1/2``, then
      ``x_s = A x_t + C1 m_t + C1 / (2 r) D_r``
    - order 3: ``u_1 = A' x_t + C1' m_t`` at ``r_1 = 1/3``;
      ``u_2 = A'' x_t + C1'' m_t + C2'' D_{r_1} / (r_1 h)`` at ``r_2 = 2/3``; then
      ``x_s = A x_t + C1 m_t + C2 D_{r_2} / (r_2 h)`` (``D_r / (r h)`` estimates ``m'``;
      ``r_2 = 2/3`` cancels the error of the ``m''`` term)

    with ``A, C1, C2`` those of :class:`_ExpStep` for the whole step (primed: for the sub-step
    to the stage). ``order`` NFE per step, 1 for the last step into ``t = 0``:
    ``order (n - 1) + 1`` in all.
    """
    _check_choice("order", order, (1, 2, 3))
    _check_choice("prediction", prediction, ("noise", "data"))
    g = Grid(denoiser.schedule, ts)
    ratios = {1: (), 2: (0.5,), 3: (1.0 / 3.0, 2.0 / 3.0)}[order]
    steps = [
        _exp_step(prediction, g, i, g.alpha[i + 1], g.sigma[i + 1], g.ell[i + 1] - g.ell[i])
        for i in range(g.n - 1)
    ]
    stages = [_stages(g, prediction, r, x) for r in ratios]
    times = _evaluation_points(g.t[:-1], g.alpha[:-1], g.sigma[:-1], x)

    def model(pred: Prediction) -> Tensor:  # m, the noise or the data prediction
        return pred.x0 if prediction == "data" else pred.eps

    def model_at(x: Tensor, at: _At) -> Tensor:
        return model(_denoise(denoiser, x, at, cond))

    for i in range(g.n):
        pred = _denoise(denoiser, x, times[i], cond)
        if callback is not None:
            callback(i, g.t[i], x, pred.x0)
        if i == g.n - 1:
            return pred.x0
        m, step = model(pred), steps[i]
        if order == 1:
            x = step.first_order(x, m)
        elif order == 2:  # a first-order step to the midpoint; its change of m corrects
            mid = stages[0][i]
            d = model_at(mid.step.first_order(x, m), mid.at) - m
            x = step.first_order(x, m, (step.C1 / (2 * ratios[0]), d))
        else:  # each stage's change of m is the slope for the next
            first, second = stages[0][i], stages[1][i]
            d1 = model_at(first.step.first_order(x, m), first.at) - m
            d2 = model_at(second.step.second_order(x, m, d1, first.step.h), second.at) - m
            x = step.second_order(x, m, d2, second.step.h)
    raise AssertionError("unreachable")


def _interpolation_weights(nodes: list[float], h: float, sde: bool) -> list[float]:
    """Weights ``w_j`` with ``int_0^h k(u) P(u) du = sum_j w_j m_j`` for the polynomial ``P``
    through ``(r_j h, m_j)``: the exponential quadrature of the data prediction over one step.

    The kernel is ``k(u) = e^{-(h-u)}`` for the ODE and ``2 e^{-2(h-u)}`` for the SDE, whose
    moments are ``int_0^h k(u) (u/h)^k du = k! h phi_{k+1}(-h)`` and ``k! 2h phi_{k+1}(-2h)``;
    then ``w = V^{-T} mu`` with the Vandermonde matrix ``V_jk = r_j^k``. With the single node
    ``r = 0`` this is ``1 - e^{-h}`` (``1 - e^{-2h}``): DDIM's (the first-order SDE) step.
    """
    moments = [
        math.factorial(k) * (2 * h * _phi(k + 1, -2 * h) if sde else h * _phi(k + 1, -h))
        for k in range(len(nodes))
    ]
    vandermonde = np.vander(np.asarray(nodes, dtype=np.float64), increasing=True)
    return np.linalg.solve(vandermonde.T, np.asarray(moments)).tolist()


def _past_nodes(g: Grid, i: int, k: int) -> list[float]:
    """The last ``k`` times ``t_i, t_{i-1}, ...`` as nodes ``r_j = (ell_{i-j} - ell_i) / h`` of
    the step ``t_i -> t_{i+1}`` of ``h = ell_{i+1} - ell_i`` (``r_0 = 0``, then negative)."""
    h = g.ell[i + 1] - g.ell[i]
    return [(g.ell[i - j] - g.ell[i]) / h for j in range(k)]


class _MultistepStep(NamedTuple):
    """One step of a multistep solver over the latest data estimates ``m_0, m_1, ...`` (most
    recent first): ``x_s = A x_t + sum_j w_j m_j``, plus ``std z`` with ``z ~ N(0, I)`` when
    ``std`` is given (an SDE step)."""

    A: float
    weights: list[float]
    std: float | None = None

    def __call__(
        self, x: Tensor, history: list[Tensor], generator: torch.Generator | None = None
    ) -> Tensor:
        noise = [] if self.std is None else [(self.std, _noise(x, generator))]
        return _combine(self.A, x, *zip(self.weights, history, strict=True), *noise)


def _dpmpp_step(g: Grid, i: int, order: int, sde: bool) -> _MultistepStep:
    """DPM-Solver++'s step ``t_i -> t_{i+1}`` over ``k = min(order, i + 1)`` data estimates
    (fewer while the history fills): the paper's 2M at ``k = 2``, the exact interpolant
    otherwise (:func:`dpm_solver_pp`)."""
    h, k = g.ell[i + 1] - g.ell[i], min(order, i + 1)
    if k == 2:  # m -> m_0 + h / (2 h_0) (m_0 - m_1), held constant over the step
        c0 = _interpolation_weights([0.0], h, sde)[0]
        half = c0 * h / (2 * (g.ell[i] - g.ell[i - 1]))
        w = [c0 + half, -half]
    else:
        w = _interpolation_weights(_past_nodes(g, i, k), h, sde)
    weights = [g.alpha[i + 1] * v for v in w]
    if not sde:
        return _MultistepStep(g.sigma[i + 1] / g.sigma[i], weights)
    decay = math.exp(g.ell[i] - g.ell[i + 1])  # e^{-h}
    std = g.sigma[i + 1] * math.sqrt(1 - decay**2)
    return _MultistepStep(g.sigma[i + 1] / g.sigma[i] * decay, weights, std)


@torch.inference_mode()
def dpm_solver_pp(
    denoiser: DenoiserFn,
    x: Tensor,
    ts: Tensor | Sequence[float],
    *,
    cond: dict[str, Any] | None = None,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    order: int = 2,
    sde: bool = False,
) -> Tensor:
    """Multistep DPM-Solver++ with data prediction: 2M, 3M and the SDE variants (Lu et al.
    2022b). One NFE per step; the first steps use lower orders until enough history exists.

    With ``m_j`` the data estimates at the last times (``m_0`` current), ``h_j`` the previous
    steps in ``ell`` and ``h`` the current one:

    - ODE: ``x_s = (sigma_s / sigma_t) x_t + alpha_s int_0^h e^{-(h-u)} m(ell_t + u) du``
    - 2M (the paper's Algorithm 2): ``m -> m_0 + h / (2 h_0) (m_0 - m_1)`` (constant), so the
      integral is ``(1 - e^{-h}) (m_0 + h / (2 h_0) (m_0 - m_1))``;
    - 3M: ``m`` is the quadratic through ``m_0, m_1, m_2``, integrated exactly
      (:func:`_interpolation_weights`).
    - ``sde=True`` solves the reverse SDE instead (Lu et al. 2022b, Appendix; 2M-SDE):
      ``x_s = (sigma_s / sigma_t) e^{-h} x_t + alpha_s int_0^h 2 e^{-2(h-u)} m du
      + sigma_s sqrt(1 - e^{-2h}) z``, with ``m`` approximated in the same ways.

    The step into ``t = 0`` returns the current data estimate.
    """
    _check_choice("order", order, (1, 2, 3))
    g = Grid(denoiser.schedule, ts)
    steps = [_dpmpp_step(g, i, order, sde) for i in range(g.n - 1)]
    times = _evaluation_points(g.t[:-1], g.alpha[:-1], g.sigma[:-1], x)
    history: list[Tensor] = []  # m_i, m_{i-1}, ... (most recent first)
    for i in range(g.n):
        pred = _denoise(denoiser, x, times[i], cond)
        if callback is not None:
            callback(i, g.t[i], x, pred.x0)
        if i == g.n - 1:
            return pred.x0
        history = [pred.x0, *history[: order - 1]]
        x = steps[i](x, history, generator)
    raise AssertionError("unreachable")


# Adams-Bashforth coefficients of a uniform step, newest slope first (order 1 to 4).
_ADAMS_BASHFORTH: dict[int, tuple[float, ...]] = {
    1: (1.0,),
    2: (3 / 2, -1 / 2),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}


def _ipndm_step(g: Grid, i: int, order: int) -> _MultistepStep:
    """iPNDM's step ``t_i -> t_{i+1}`` over the last ``k = min(order, i + 1)`` noise estimates:
    ``y_{i+1} = y_i + (s_{i+1} - s_i) sum_j b_j eps_{i-j}`` in ``y = x / alpha`` and
    ``s = sigma_ve``, i.e. ``x_{i+1} = (alpha_{i+1} / alpha_i) x_i + alpha_{i+1} (s_{i+1} - s_i)
    sum_j b_j eps_{i-j}``."""
    s, s_next = g.sigma[i] / g.alpha[i], g.sigma[i + 1] / g.alpha[i + 1]
    scale = g.alpha[i + 1] * (s_next - s)
    b = _ADAMS_BASHFORTH[min(order, i + 1)]
    return _MultistepStep(g.alpha[i + 1] / g.alpha[i], [scale * w for w in b])


@torch.inference_mode()
def ipndm(
    denoiser: DenoiserFn,
    x: Tensor,
    ts: Tensor | Sequence[float],
    *,
    cond: dict[str, Any] | None = None,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    order: int = 4,
) -> Tensor:
    """Improved pseudo-numerical sampler iPNDM (Zhang & Chen 2023, Appendix; the linear
    multistep half of Liu et al.'s PNDM 2022): Adams-Bashforth on the probability-flow ODE
    ``dy / d sigma_ve = eps_hat`` (``y = x / alpha``), one NFE per step.

    Step ``i`` uses the last ``k = min(order, i + 1)`` noise estimates with the coefficients of
    a uniform step, ``b = (1)``, ``(3, -1) / 2``, ``(23, -16, 5) / 12``,
    ``(55, -59, 37, -9) / 24``, whatever the grid (so the start warms up from Euler, i.e. DDIM,
    without extra evaluations). On a grid uniform in ``sigma_ve`` the steps after the warm-up
    are of order ``k``; on any smooth non-uniform grid the fixed coefficients leave an
    ``O(h^3)`` local error, so the method converges at order 2. Its strength is the few-step
    regime: extrapolating the slope with uniform-step weights over the very unequal steps of a
    Karras grid damps the large early steps (docs/BENCHMARKS.md, "every budget"). The step
    into ``sigma_ve = 0`` is a step like the others (at order 1 it is the jump to ``x0_hat``).
    """
    _check_choice("order", order, (1, 2, 3, 4))
    g = Grid(denoiser.schedule, ts)
    steps = [_ipndm_step(g, i, order) for i in range(g.n)]
    times = _evaluation_points(g.t[:-1], g.alpha[:-1], g.sigma[:-1], x)
    history: list[Tensor] = []  # eps_i, eps_{i-1}, ... (most recent first)
    for i in range(g.n):
        pred = _denoise(denoiser, x, times[i], cond)
        if callback is not None:
            callback(i, g.t[i], x, pred.x0)
        history = [pred.eps, *history[: order - 1]]
        x = steps[i](x, history)
    return x


def _adams_weights(nodes: list[float]) -> list[float]:
    """Weights ``w_j`` with ``int_0^1 P(u) du = sum_j w_j m_j`` for the polynomial ``P`` through
    ``(r_j, m_j)``: ``w = V^{-T} mu`` with ``V_jk = r_j^k`` and the moments ``mu_k = 1 / (k + 1)``
    (the variable-step Adams quadrature; at the nodes ``0, -1, -2, ...`` the classical
    Adams-Bashforth coefficients, at ``1, 0, -1, ...`` Adams-Moulton's)."""
    moments = [1.0 / (k + 1) for k in range(len(nodes))]
    vandermonde = np.vander(np.asarray(nodes, dtype=np.float64), increasing=True)
    return np.linalg.solve(vandermonde.T, np.asarray(moments)).tolist()


class _LMSStep(NamedTuple):
    """The linear multistep solver's step ``t_i -> t_{i+1}``: the Adams-Bashforth predictor over
    the last ``k = min(order, i + 1)`` noise estimates and the Adams-Moulton corrector that
    redoes it once the estimate at ``t_{i+1}`` is known (``None`` on the step into ``t = 0``)."""

    predictor: _MultistepStep
    corrector: _MultistepStep | None


def _lms_step(g: Grid, i: int, order: int) -> _LMSStep:
    s = [g.sigma[j] / g.alpha[j] for j in range(max(0, i - order + 1), i + 2)][::-1]
    h = s[0] - s[1]  # s_{i+1} - s_i; s = [s_{i+1}, s_i, s_{i-1}, ...]
    past = [(v - s[1]) / h for v in s[1:]]  # r = 0, then the earlier nodes (positive: h < 0)
    A, scale = g.alpha[i + 1] / g.alpha[i], g.alpha[i + 1] * h
    predictor = _MultistepStep(A, [scale * w for w in _adams_weights(past)])
    if i == g.n - 1:
        return _LMSStep(predictor, None)
    corrector = _MultistepStep(A, [scale * w for w in _adams_weights([1.0, *past])])
    return _LMSStep(predictor, corrector)


@torch.inference_mode()
def lms(
    denoiser: DenoiserFn,
    x: Tensor,
    ts: Tensor | Sequence[float],
    *,
    cond: dict[str, Any] | None = None,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    order: int = 4,
    corrector: bool = True,
) -> Tensor:
    """Linear multistep on the probability-flow ODE ``dy / d sigma_ve = eps_hat``
    (``y = x / alpha``), with the exact variable-step Adams coefficients; one NFE per step.

    The predictor integrates the polynomial through the last ``k = min(order, i + 1)`` noise
    estimates over the step (Adams-Bashforth; k-diffusion's ``sample_lms`` when
    ``corrector=False``). With ``corrector=True`` the denoiser's estimate at the predicted
    ``y~_{i+1}`` also redoes the step through the polynomial that includes it (Adams-Moulton,
    one order higher), the corrected state continues and the estimate is reused as if taken
    there: UniPC's predictor-corrector scheme (Zhao et al. 2023) for this ODE, where the
    exponential factor is 1. Every step, the last into ``sigma_ve = 0`` too, is a multistep
    step (the ODE in ``sigma_ve`` is regular there), so no step jumps to ``x0_hat``.
    """
    _check_choice("order", order, (1, 2, 3, 4))
    _check_choice("corrector", corrector, (True, False))
    g = Grid(denoiser.schedule, ts)
    steps = [_lms_step(g, i, order) for i in range(g.n)]
    times = _evaluation_points(g.t[:-1], g.alpha[:-1], g.sigma[:-1], x)
    history: list[Tensor] = []  # eps_{i-1}, eps_{i-2}, ... (most recent first)
    x_start = x  # x_{i-1}, where the step to x_i started
    for i in range(g.n):
        pred = _denoise(denoiser, x, times[i], cond)  # at the predicted x~_i
        if callback is not None:
            callback(i, g.t[i], x, pred.x0)
        if corrector and i > 0:
            x = steps[i - 1].corrector(x_start, [pred.eps, *history])
        history = [pred.eps, *history[: order - 1]]
        x_start, x = x, steps[i].predictor(x, history)
    return x


class _UniPCStep(NamedTuple):
    """UniPC's step ``t_i -> t_{i+1}``: the predictor UniP-p over the last
    ``p = min(order, i + 1)`` data estimates, and the corrector UniC-p that redoes it once the
    estimate at ``t_{i+1}`` is known. Each is the exponential quadrature
    (:func:`_interpolation_weights`) of the polynomial through its estimates: the corrector's
    adds the node ``r = 1``."""

    predictor: _MultistepStep
    corrector: _MultistepStep


def _unipc_step(g: Grid, i: int, order: int, bh2: bool) -> _UniPCStep:
    h, past = g.ell[i + 1] - g.ell[i], _past_nodes(g, i, order)
    A, alpha_s = g.sigma[i + 1] / g.sigma[i], g.alpha[i + 1]
    predictor = _interpolation_weights(past, h, False)
    corrector = _interpolation_weights([1.0, *past], h, False)
    if bh2:  # the linear interpolants' slope weighed by B(h) / 2 = (1 - e^{-h}) / 2
        c0 = _interpolation_weights([0.0], h, False)[0]
        if order == 2:  # DPM-Solver++(2M)'s step
            half = -c0 / (2 * past[1])  # c0 h / (2 h_0)
            predictor = [c0 + half, -half]
        if order == 1:  # the trapezoid's weights
            corrector = [c0 / 2, c0 / 2]
    return _UniPCStep(
        _MultistepStep(A, [alpha_s * w for w in predictor]),
        _MultistepStep(A, [alpha_s * w for w in corrector]),
    )


@torch.inference_mode()
def unipc(
    denoiser: DenoiserFn,
    x: Tensor,
    ts: Tensor | Sequence[float],
    *,
    cond: dict[str, Any] | None = None,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    order: int = 2,
    lower_order_final: bool = False,
    bh2: bool = False,
) -> Tensor:
    """UniPC with data prediction (Zhao et al. 2023): a multistep predictor of order ``p`` and a
    corrector that raises it to ``p + 1`` at no extra NFE.

    Step ``t_{i-1} -> t_i``: the predictor integrates the polynomial through the last ``p``
    data estimates (UniP-p); the denoiser is evaluated at the predicted ``x~_i``, giving
    ``m_i``; the corrector (UniC-p) redoes the step with the polynomial through ``m_i`` and the
    same ``p`` estimates, and the corrected ``x_i`` continues while ``m_i`` is reused as if
    evaluated there. The coefficients solve UniPC's order conditions exactly (the system
    ``R_p a_p = g_p / B(h)``), which makes the choice of ``B(h)`` immaterial, and are the
    exponential quadratures of :func:`_interpolation_weights`. No correction is needed after
    the last evaluation, whose data estimate is returned.

    Two options of UniPC's reference implementation (diffusers' ``UniPCMultistepScheduler``,
    ``solver_type="bh2"``, whose outputs these reproduce to 1e-14, tests/test_diffusers_parity):

    - ``lower_order_final=True``: the predictor of step ``t_i -> t_{i+1}`` uses
      ``p = min(order, i + 1, n - i)`` estimates, so the last steps of an ``n``-step grid fall
      back to lower orders (the corrector follows its predictor). It damps the large last steps
      of a few-step trailing grid (docs/BENCHMARKS.md: at 5 calls on ``vp``). The order-2
      predictor into the last evaluation, which no corrector follows, leaves an ``O(h^3)``
      local error where the data estimate hardly changes any more (small ``sigma``): on the
      oracle ``order=3`` still converges at order 4 (tests/test_samplers).
    - ``bh2=True``: where the interpolant is linear (the predictor through two estimates, the
      corrector of ``order=1``) its slope is weighed by ``B(h) / 2`` with
      ``B(h) = 1 - e^{-h}`` instead of the exact ``int_0^h e^{-(h-u)} (u / h) du``: the
      predictor is then DPM-Solver++(2M)'s step and the corrector the trapezoid
      ``(1 - e^{-h}) (m_0 + m_1) / 2``. The difference is ``O(h^3)`` per step, so the order
      is unchanged; the exact weights are the default.
    """
    _check_choice("order", order, (1, 2, 3))
    _check_choice("lower_order_final", lower_order_final, (True, False))
    _check_choice("bh2", bh2, (True, False))
    g = Grid(denoiser.schedule, ts)
    orders = [min(order, i + 1, g.n - i if lower_order_final else order) for i in range(g.n - 1)]
    steps = [_unipc_step(g, i, orders[i], bh2) for i in range(g.n - 1)]
    times = _evaluation_points(g.t[:-1], g.alpha[:-1], g.sigma[:-1], x)
    history: list[Tensor] = []  # m_{i-1}, m_{i-2}, ... (most recent first)
    x_start = x  # x_{i-1}, where the step to x_i started
    for i in range(g.n):
        pred = _denoise(denoiser, x, times[i], cond)  # m_i, at the predicted x~_i
        if callback is not None:
            callback(i, g.t[i], x, pred.x0)
        if i == g.n - 1:
            return pred.x0
        if i > 0:  # UniC: redo the step t_{i-1} -> t_i through m_i as well
            x = steps[i - 1].corrector(x_start, [pred.x0, *history[: orders[i - 1]]])
        history = [pred.x0, *history[: order - 1]]
        x_start, x = x, steps[i].predictor(x, history[: orders[i]])  # UniP: predict x~_{i+1}
    raise AssertionError("unreachable")


# ================================================================================================
# Registry
# ================================================================================================

SAMPLERS: dict[str, Callable[..., Tensor]] = {}
"""Every sampler by name; each value follows the :class:`Sampler` contract."""

DESCRIPTIONS: dict[str, str] = {}
"""One line per entry of :data:`SAMPLERS`, for ``difflab sample --list``."""


def _register(name: str, description: str, fn: Callable[..., Tensor], **preset: Any) -> None:
    SAMPLERS[name] = functools.partial(fn, **preset) if preset else fn
    DESCRIPTIONS[name] = description


_register("ddpm", "DDPM ancestral; variance=beta_tilde|beta; 1 NFE/step", ddpm)
_register("ddim", "DDIM; eta in [0, 1] (0: deterministic); 1 NFE/step", ddim)
_register("euler", "Euler on the probability-flow ODE in sigma; s_churn...; 1 NFE/step", euler)
_register("heun", "EDM Heun, 2nd order; s_churn, s_tmin, s_tmax, s_noise; 2 NFE/step", heun)
_register(
    "dpm_solver", "singlestep DPM-Solver; order=1|2|3, prediction=noise|data; order NFE/step",
    dpm_solver,
)  # fmt: skip
_register("dpmpp_2m", "DPM-Solver++(2M), multistep 2nd order; 1 NFE/step", dpm_solver_pp, order=2)
_register("dpmpp_3m", "DPM-Solver++(3M), multistep 3rd order; 1 NFE/step", dpm_solver_pp, order=3)
_register(
    "dpmpp_2m_sde", "DPM-Solver++(2M) SDE, stochastic; 1 NFE/step", dpm_solver_pp, order=2, sde=True
)
_register("ipndm", "iPNDM, Adams-Bashforth in sigma_ve; order=1..4; 1 NFE/step", ipndm)
_register("lms", "linear multistep in sigma_ve, order=1..4, corrector; 1 NFE/step", lms)
_register("unipc", "UniPC predictor-corrector; order=1|2|3 (accuracy order+1); 1 NFE/step", unipc)
_register("reverse_sde", "reverse-time SDE, Euler-Maruyama (Song et al. 2021); 1 NFE/step",
          reverse_sde)  # fmt: skip
_register("pf_ode_rk4", "probability-flow ODE by RK4 in log-SNR; 4 NFE/step", probability_flow)
_register("pc", "predictor-corrector, Langevin corrector; snr, corrector_steps",
          predictor_corrector)  # fmt: skip
_register("annealed_langevin", "annealed Langevin over the levels of ts; steps_per_level, eps",
          annealed_langevin_sampler)  # fmt: skip


def sampler_options(name: str) -> dict[str, Any]:
    """The options sampler ``name`` takes, with their defaults: the keyword arguments of its
    function beyond the contract's ``cond``, ``generator`` and ``callback``, less those its
    registration fixes (``order`` and ``sde`` of ``dpmpp_2m_sde``), e.g. ``{"eta": 0.0}`` for
    ``ddim`` and ``{}`` for ``dpmpp_2m_sde``. Raises ``ValueError`` for a name not in
    :data:`SAMPLERS`."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}: choose one of {', '.join(SAMPLERS)}")
    fn = SAMPLERS[name]
    fixed = fn.keywords if isinstance(fn, functools.partial) else {}
    return {
        p.name: p.default
        for p in inspect.signature(fn).parameters.values()
        if p.kind is p.KEYWORD_ONLY and p.name not in ("cond", "generator", "callback", *fixed)
    }
