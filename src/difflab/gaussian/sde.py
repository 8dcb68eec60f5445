"""Score SDEs (Song et al. 2021; seeds 000 and 004): forward SDE, reverse-time SDE, probability
flow ODE and predictor-corrector sampling, all over one difflab :class:`Schedule`.

Every schedule ``x_t = alpha(t) x_0 + sigma(t) eps`` is the marginal of exactly one linear SDE
(Kingma et al. 2021, appendix; Song et al. 2021, eq. 29):

    dx = f(t) x dt + g(t) dw,    f(t) = d log alpha / dt,
                                 g(t)^2 = d sigma^2 / dt - 2 f(t) sigma^2 = -sigma^2 d lambda / dt,

so that ``q(x_t | x_0) = N(alpha(t) x_0, sigma(t)^2 I)`` holds at every ``t``.
:class:`ForwardSDE` computes ``f`` and ``g`` by differentiating the schedule's own curves, so a
VP SDE agrees with its difflab schedule by construction. The three SDEs of Song et al.:

- **VP**: ``alpha^2 + sigma^2 = 1``, ``f = -beta(t) / 2``, ``g^2 = beta(t)``. Any VP schedule
  (DDPM betas, cosine, any log-SNR curve); :func:`~difflab.gaussian.schedules.vp_linear` is theirs,
  ``beta(t) = beta_min + t (beta_max - beta_min)``.
- **sub-VP**: ``f = -beta(t) / 2``, ``g^2 = beta(t) (1 - exp(-2 int_0^t beta))``; its marginal
  is ``alpha = exp(-B/2)``, ``sigma = 1 - exp(-B)``, ``B(t) = int_0^t beta``
  (:class:`~difflab.gaussian.schedules.SubVPSchedule`).
- **VE**: ``alpha = 1``, ``f = 0``, ``g^2 = d sigma^2 / dt``; for
  :class:`~difflab.gaussian.schedules.VESchedule`, ``g^2 = 2 sigma^2 log(sigma_max / sigma_min)``.
  Its ``sigma(0) = 0`` is a jump from ``sigma(0+) = sigma_min``: the process on ``(0, 1]`` is the
  SDE started from ``x_0 + sigma_min eps``.

The reverse-time SDE (Anderson 1982) and the probability-flow ODE read the score
``grad log q_t(x) = Prediction.score = -eps_hat / sigma`` from any
:class:`~difflab.gaussian.parameterization.DenoiserFn`:

    dx = [f x - g^2 score] dt + g dw_bar,      dx/dt = f x - g^2 score / 2;

the ODE is integrated in the log-SNR, where it is the same for every schedule
(:func:`probability_flow_velocity`).

The samplers here follow the difflab contract ``sampler(denoiser, x, ts, *, cond, generator,
callback, **opts)``: ``x`` is the starting noise at ``ts[0]``, ``ts`` a decreasing float64 grid
ending with 0. The step onto ``t = 0`` returns the denoiser's ``E[x_0 | x_t]`` at the last
positive time (Tweedie's formula, the "denoising" step of Song et al. 2021, App. G), so the result
carries no residual noise; steps between positive times are those named in each docstring.
``callback(i, t_i, x_{t_i}, x0_hat)`` is called once per step ``i`` with the time (a float), the
state the step starts from and the denoiser's estimate there.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from difflab.gaussian.grid import Callback, Grid
from difflab.gaussian.langevin import langevin_step
from difflab.gaussian.parameterization import DenoiserFn, Prediction
from difflab.gaussian.process import Gaussian, marginal
from difflab.gaussian.schedules import Schedule, broadcast

# --------------------------------------------------------------------------------------------
# Forward SDE
# --------------------------------------------------------------------------------------------


class ForwardSDE:
    """The linear SDE ``dx = f(t) x dt + g(t) dw`` whose marginals are ``schedule``'s (module
    docstring). Times are ``(B,)`` tensors (or scalars); results are float64."""

    def __init__(self, schedule: Schedule):
        self.schedule = schedule

    def coefficients(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """``(f(t), g(t)^2)`` with ``f = alpha' / alpha`` and ``g^2 = 2 sigma (sigma' - f sigma)``,
        from the derivatives of the schedule's own curves (automatic differentiation, also
        inside ``torch.inference_mode``), for ``t > 0``: at ``t = 0`` a VP schedule's
        ``sigma' = inf`` and ``g^2`` is not computed (NaN)."""
        with torch.inference_mode(False), torch.enable_grad():
            t = torch.as_tensor(t, dtype=torch.float64).detach().clone().requires_grad_(True)
            alpha, sigma = self.schedule.alpha_sigma(t)
            d_alpha, d_sigma = (_derivative(y, t) for y in (alpha, sigma))
        f = d_alpha / alpha.detach()
        sigma = sigma.detach()
        return f, 2.0 * sigma * (d_sigma - f * sigma)

    def drift(self, x: Tensor, t: Tensor) -> Tensor:
        """``f(x, t) = f(t) x``."""
        f, _ = self.coefficients(t)
        return broadcast(f, x) * x

    def diffusion(self, t: Tensor) -> Tensor:
        """``g(t)``."""
        return self.coefficients(t)[1].clamp(min=0.0).sqrt()

    def marginal(self, x0: Tensor, t: Tensor | float) -> Gaussian:
        """``q(x_t | x_0) = N(alpha_t x_0, sigma_t^2 I)``, the closed-form solution of the SDE."""
        return marginal(self.schedule, x0, t)

    def probability_flow_drift(self, pred: Prediction, t: Tensor) -> Tensor:
        """Velocity of the probability-flow ODE at ``pred.x_t``: ``f x - g^2 score / 2``."""
        f, g2 = self.coefficients(t)
        x = pred.x_t
        return broadcast(f, x) * x - 0.5 * broadcast(g2, x) * pred.score


def _derivative(y: Tensor, t: Tensor) -> Tensor:
    """``dy/dt`` of an elementwise function of ``t`` (zero where ``y`` does not depend on ``t``)."""
    if not y.requires_grad:
        return torch.zeros_like(y)
    (grad,) = torch.autograd.grad(y.sum(), t, retain_graph=True, allow_unused=True)
    return torch.zeros_like(y) if grad is None else grad


# --------------------------------------------------------------------------------------------
# Samplers
# --------------------------------------------------------------------------------------------


def _randn(x: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


class _EulerMaruyama:
    """Euler-Maruyama steps of the reverse-time SDE on a grid, from ``t_i`` down to ``t_{i+1}``
    (Song et al. 2021, eq. 6), with ``h = t_i - t_{i+1}`` and ``f``, ``g^2`` at ``t_i``
    (:meth:`ForwardSDE.coefficients`, computed once on the host):

        x <- x - [f x - g^2 score] h + g sqrt(h) z,    z ~ N(0, I).
    """

    def __init__(self, grid: Grid):
        f, g2 = ForwardSDE(grid.schedule).coefficients(grid.ts[:-1])
        self.f, self.g2 = f.tolist(), g2.tolist()
        self.h = (grid.ts[:-1] - grid.ts[1:]).tolist()

    def __call__(self, i: int, pred: Prediction, generator: torch.Generator | None) -> Tensor:
        x, f, g2, h = pred.x_t, self.f[i], self.g2[i], self.h[i]
        drift = f * x - g2 * pred.score
        return x - h * drift + (g2 * h) ** 0.5 * _randn(x, generator)


@torch.inference_mode()
def reverse_sde(
    denoiser: DenoiserFn,
    x: Tensor,
    ts: Tensor,
    *,
    cond: dict[str, Any] | None = None,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """The reverse-time SDE by Euler-Maruyama (Song et al. 2021, eq. 6), one NFE per step:

        x_s = x_t - [f(t) x_t - g(t)^2 score(x_t, t)] (t - s) + g(t) sqrt(t - s) z,   z ~ N(0, I),

    for consecutive ``t > s > 0`` of ``ts``; the last step returns ``x0_hat(x_t)``."""
    grid = Grid(denoiser.schedule, ts)
    step, times = _EulerMaruyama(grid), grid.on(x)
    for i in range(grid.n):
        pred = denoiser(x, times[i], cond)
        if callback is not None:
            callback(i, grid.t[i], x, pred.x0)
        if i == grid.n - 1:
            return pred.x0
        x = step(i, pred, generator)
    raise AssertionError("unreachable")


def probability_flow_velocity(pred: Prediction) -> Tensor:
    """The probability-flow ODE in the VE variable ``x~ = x_t / alpha`` and the log-SNR
    ``lambda = -2 log sigma_ve``, at the point ``pred`` was computed at:

        dx~ / d lambda = -sigma_ve eps_hat / 2.

    This is Karras et al.'s ``dx~ / d sigma = eps_hat`` (2022, eq. 4) with ``d sigma / d lambda =
    -sigma / 2``, and the same ODE as ``dx/dt = f x - g^2 score / 2``
    (:meth:`ForwardSDE.probability_flow_drift`) after the change of variables ``x = alpha x~``,
    ``dlambda/dt = -g^2 / sigma^2``; unlike that form it involves no derivative of the
    schedule, so it is smooth in ``lambda`` for every schedule (a discrete schedule's ``f`` and
    ``g`` jump at each grid point ``i / T``)."""
    return -0.5 * (pred.sigma / pred.alpha) * pred.eps


@torch.inference_mode()
def probability_flow(
    denoiser: DenoiserFn,
    x: Tensor,
    ts: Tensor,
    *,
    cond: dict[str, Any] | None = None,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """The probability-flow ODE (Song et al. 2021, eq. 13) by the classical fourth-order
    Runge-Kutta method in the log-SNR (:func:`probability_flow_velocity`): a step from ``t`` to
    ``s`` is one RK4 step from ``lambda(t)`` to ``lambda(s)``, with the middle stages at
    ``(lambda(t) + lambda(s)) / 2`` (4 NFE per step); the last step returns ``x0_hat(x_t)``
    (1 NFE). Deterministic: ``generator`` is accepted for the contract and unused."""
    del generator
    grid = Grid(denoiser.schedule, ts)
    schedule, times, alphas = grid.schedule, grid.on(x), grid.alpha
    lam = schedule.log_snr(grid.ts[:-1])
    t_mid = schedule.t_of_log_snr(0.5 * (lam[:-1] + lam[1:])).to(torch.float64)
    alpha_mid = schedule.alpha_sigma(t_mid)[0].to(torch.float64).tolist()
    t_mid_d, steps = t_mid.to(x.device), (lam[1:] - lam[:-1]).tolist()

    def velocity(y: Tensor, t: Tensor, alpha: float) -> Tensor:
        return probability_flow_velocity(denoiser(alpha * y, t.expand(x.shape[0]), cond))

    for i in range(grid.n):
        pred = denoiser(x, times[i], cond)
        if callback is not None:
            callback(i, grid.t[i], x, pred.x0)
        if i == grid.n - 1:
            return pred.x0
        h, y = steps[i], x / alphas[i]
        k1 = probability_flow_velocity(pred)
        k2 = velocity(y + 0.5 * h * k1, t_mid_d[i], alpha_mid[i])
        k3 = velocity(y + 0.5 * h * k2, t_mid_d[i], alpha_mid[i])
        k4 = velocity(y + h * k3, times[i + 1], alphas[i + 1])
        x = alphas[i + 1] * (y + h / 6.0 * (k1 + 2.0 * k2 + 2.0 * k3 + k4))
    raise AssertionError("unreachable")


def langevin_corrector_step(
    x: Tensor, score: Tensor, snr: float, generator: torch.Generator | None = None
) -> Tensor:
    """One Langevin corrector step of Song et al. (2021, Sec. 4.2 and App. G):

        eps = 2 (r ||z|| / ||score||)^2,   x <- x + eps score + sqrt(2 eps) z,   z ~ N(0, I),

    with ``r = snr``; as in their code, ``||z||`` and ``||score||`` are the per-example norms
    averaged over the batch (one step size for the batch). Per-example norms would be unstable in
    low dimension, where ``||score||`` of an example near a mode is close to 0. ``r`` is the ratio
    of the step's drift to its noise, ``||eps score|| / ||sqrt(2 eps) z||``, in batch average.
    The VP factor ``alpha_i = 1 - beta_i`` of their VP corrector is taken as 1 for every schedule
    (it is within ``beta_max / N`` of 1 on their grid). A score that is zero on the whole batch
    (e.g. a zero-initialised network) carries no information, and the step size is then 0."""
    z = _randn(x, generator)
    z_norm = z.flatten(1).norm(dim=1).mean()
    s_norm = score.flatten(1).norm(dim=1).mean()
    ratio = snr * z_norm / s_norm.clamp(min=torch.finfo(x.dtype).tiny)
    return langevin_step(x, score, torch.where(s_norm > 0, 2.0 * ratio**2, 0.0), z)


@torch.inference_mode()
def predictor_corrector(
    denoiser: DenoiserFn,
    x: Tensor,
    ts: Tensor,
    *,
    cond: dict[str, Any] | None = None,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    snr: float = 0.16,
    corrector_steps: int = 1,
) -> Tensor:
    """Predictor-corrector sampling (Song et al. 2021, Algorithm 1): for each consecutive pair
    ``t > s`` of ``ts``, the predictor is one Euler-Maruyama step of the reverse SDE from ``t`` to
    ``s`` (as :func:`reverse_sde`); then, if ``s > 0``, ``corrector_steps`` Langevin steps
    (:func:`langevin_corrector_step`, signal-to-noise ratio ``snr``) target ``q_s``. The last step
    returns ``x0_hat``. NFE: ``(n - 1)(1 + corrector_steps) + 1`` for ``n`` steps. ``snr = 0.16``
    is Song et al.'s value for VE on CIFAR-10."""
    if snr <= 0 or corrector_steps < 0:
        raise ValueError("predictor_corrector needs snr > 0 and corrector_steps >= 0")
    grid = Grid(denoiser.schedule, ts)
    step, times = _EulerMaruyama(grid), grid.on(x)
    for i in range(grid.n):
        pred = denoiser(x, times[i], cond)
        if callback is not None:
            callback(i, grid.t[i], x, pred.x0)
        if i == grid.n - 1:
            return pred.x0
        x = step(i, pred, generator)
        for _ in range(corrector_steps):
            score = denoiser(x, times[i + 1], cond).score
            x = langevin_corrector_step(x, score, snr, generator)
    raise AssertionError("unreachable")
