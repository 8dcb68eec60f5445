"""Consistency models (Song et al. 2023, "Consistency Models"; seed 004 gives its Algorithm 2,
consistency distillation; Song & Dhariwal 2023, "Improved Techniques for Training Consistency
Models"): one network evaluation maps any point of a probability-flow ODE trajectory to the
trajectory's origin.

Notation (docs/design.md): ``x_t = alpha_t x_0 + sigma_t eps``; consistency models are written
in the VE variable ``x~ = x_t / alpha_t = x_0 + sigma eps`` with ``sigma = sigma_ve = sigma_t /
alpha_t``. The PF-ODE in it is ``dx~ / dsigma = eps_hat(x~, sigma) = (x~ - D(x~, sigma)) /
sigma`` (``D`` the denoiser's data estimate). The consistency function ``f(x~_sigma, sigma) =
x~_sigma_min`` is the ODE's flow map down to the smallest level ``sigma_min``.

**Boundary parameterization** (Song et al. 2023, Sec. 3 and Appendix C), with ``s_d =
sigma_data``::

    f(x~, sigma) = c_skip(sigma) x~ + c_out(sigma) F(x~, sigma),
    c_skip = s_d^2 / ((sigma - sigma_min)^2 + s_d^2),
    c_out  = (sigma - sigma_min) s_d / sqrt(s_d^2 + sigma^2),

so ``c_skip(sigma_min) = 1`` and ``c_out(sigma_min) = 0``: ``f(x~, sigma_min) = x~`` exactly,
whatever the network. ``F`` is read from any denoiser ``D`` (a network under any
parameterization of ``parameterization.py``) through EDM's preconditioning, ``F = (D -
c_skip^EDM x~) / c_out^EDM`` (:func:`~difflab.gaussian.parameterization.edm_preconditioning`):
for an ``edm`` denoiser that is its network's output, as in Song et al., and for any other the
output it implies. Since ``c_skip -> c_skip^EDM`` and ``c_out -> c_out^EDM`` for ``sigma >>
sigma_min``, a student initialised with a teacher's weights starts at ``f ~ D`` there
(:class:`ConsistencyFunction`).

**Consistency distillation** (Algorithm 2): on the Karras grid ``sigma_1 = sigma_min < ... <
sigma_N = sigma_max`` (``sigma_i = (sigma_min^(1/rho) + (i-1)/(N-1) (sigma_max^(1/rho) -
sigma_min^(1/rho)))^rho``), draw ``n`` uniform in ``1..N-1`` and ``x~_{n+1} = x_0 + sigma_{n+1}
z``, take one step of the teacher's ODE down to ``sigma_n`` (:func:`ode_step`: Heun or Euler,
i.e. DDIM), and minimise ``||f_theta(x~_{n+1}, sigma_{n+1}) - f_theta-(x^~_n, sigma_n)||^2 / D``
(:func:`consistency_distillation_loss` with ``loss="l2"``), where ``theta-`` is an EMA of
``theta`` with rate ``mu`` (the target network, updated after each optimiser step by the
caller). With ``loss="ict"`` the same distillation takes consistency training's level
distribution, weighting and distance below (Song & Dhariwal's improvements, made for training,
carried over to distillation): on digits it reaches in 3,500 steps a 4-call sample quality that
the squared distance does not (docs/BENCHMARKS.md).

**Consistency training** (improved, Song & Dhariwal 2023): no teacher; the ODE step is replaced
by the same noise at the lower level, ``x~_n = x_0 + sigma_n z``, the target is the student
itself without gradient (``mu = 0``), the level index is drawn with ``p(n) ∝ erf((ln
sigma_{n+1} - P_mean) / (sqrt2 P_std)) - erf((ln sigma_n - P_mean) / (sqrt2 P_std))`` (a
discretised log-normal, ``P_mean = -1.1``, ``P_std = 2``), each term is weighted by
``lambda(sigma_n) = 1 / (sigma_{n+1} - sigma_n)`` and compared by the pseudo-Huber distance
``d(a, b) = sqrt(||a - b||^2 + c^2) - c`` with ``c = 0.00054 sqrt(D)`` (``||.||`` the Euclidean
norm over all ``D`` dimensions, as in the paper) (:func:`consistency_training_loss`); the grid
has ``N(k) = min(s_0 2^floor(k / K'), s_1) + 1`` levels at step ``k`` of ``K``, ``K' =
floor(K / (log2(s_1 / s_0) + 1))``, ``s_0 = 10``, ``s_1 = 1280`` (:func:`training_levels`).

**Multistep sampling** (Song et al. 2023, Algorithm 1): ``x = f(x~_T, sigma_max)``, then for each
further level ``tau``: ``x~ = x + sqrt(tau^2 - sigma_min^2) z``, ``x = f(x~, tau)``
(:func:`consistency_sampler`, on the levels of :func:`multistep_times`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor

from difflab.gaussian.grid import Callback, Grid
from difflab.gaussian.parameterization import AlphaSigma, DenoiserFn, Prediction
from difflab.gaussian.samplers import karras_times
from difflab.gaussian.schedules import Schedule, broadcast

#: Song & Dhariwal (2023)'s discretised log-normal of the training levels, their doubling
#: schedule of the number of levels, and the pseudo-Huber constant per sqrt(dimension).
P_MEAN, P_STD = -1.1, 2.0
LEVELS_START, LEVELS_END = 10, 1280
HUBER_C = 0.00054
#: The teacher's ODE step of consistency distillation: Heun (2 evaluations) or DDIM (Euler).
SOLVERS: tuple[str, ...] = ("heun", "ddim")


def boundary_coefficients(
    sigma: Tensor, sigma_min: float, sigma_data: float
) -> tuple[Tensor, Tensor]:
    """``(c_skip, c_out)`` of the boundary parameterization at ``sigma = sigma_ve`` (module
    docstring): ``c_skip = s_d^2 / ((sigma - sigma_min)^2 + s_d^2)``, ``c_out = (sigma -
    sigma_min) s_d / sqrt(s_d^2 + sigma^2)``."""
    shifted = sigma - sigma_min
    c_skip = sigma_data**2 / (shifted**2 + sigma_data**2)
    c_out = shifted * sigma_data / (sigma_data**2 + sigma**2).sqrt()
    return c_skip, c_out


class ConsistencyFunction:
    """``f(x~, sigma) = c_skip x~ + c_out F`` of a denoiser (module docstring), itself a
    :class:`~difflab.gaussian.parameterization.DenoiserFn`: called at ``(x_t, t)`` it returns a
    Prediction whose data estimate ``x0`` is ``f(x_t / alpha_t, sigma_ve(t))``, so the
    thresholding wrapper and the sampler callbacks apply to it. ``F = (D - c_skip^EDM x~) /
    c_out^EDM`` with ``D`` the wrapped denoiser's ``x0``; at ``sigma = sigma_min`` the output is
    ``x~`` whatever ``D`` is."""

    def __init__(self, denoiser: DenoiserFn, sigma_min: float, sigma_data: float = 0.5):
        if not sigma_min > 0 or not sigma_data > 0:
            raise ValueError("a consistency function needs sigma_min > 0 and sigma_data > 0")
        self.denoiser = denoiser
        self.schedule: Schedule = denoiser.schedule
        self.sigma_min, self.sigma_data = float(sigma_min), float(sigma_data)

    def __call__(
        self,
        x_t: Tensor,
        t: Tensor,
        cond: dict[str, Any] | None = None,
        *,
        alpha_sigma: AlphaSigma | None = None,
    ) -> Prediction:
        t = t.expand(x_t.shape[0]) if t.ndim == 0 else t
        alpha, sigma_t = self.schedule.alpha_sigma(t.to(torch.float64))
        sigma = sigma_t / alpha
        x_ve = x_t / broadcast(alpha, x_t).to(x_t.dtype)
        c_skip, c_out = boundary_coefficients(sigma, self.sigma_min, self.sigma_data)
        edm_skip = self.sigma_data**2 / (sigma**2 + self.sigma_data**2)
        edm_out = sigma * self.sigma_data / (sigma**2 + self.sigma_data**2).sqrt()
        d = self.denoiser(x_t, t, cond, alpha_sigma=alpha_sigma).x0
        # f = c_skip x~ + (c_out / c_out^EDM) (D - c_skip^EDM x~), exactly x~ where c_out = 0
        ratio = torch.where(c_out == 0, 0.0, c_out / edm_out)  # also where sigma = 0
        ratio = broadcast(ratio.to(x_t.dtype), x_t)
        skip = broadcast(c_skip.to(x_t.dtype), x_t)
        f = skip * x_ve + ratio * (d - broadcast(edm_skip.to(x_t.dtype), x_t) * x_ve)
        return Prediction(x_t, broadcast(alpha.to(x_t.dtype), x_t),
                          broadcast(sigma_t.to(x_t.dtype), x_t), x0=f)  # fmt: skip


def karras_levels(
    schedule: Schedule, n: int, sigma_min: float, sigma_max: float, rho: float = 7.0
) -> Tensor:
    """The increasing times ``t_1 < ... < t_n`` of the ``n`` Karras levels ``sigma_1 =
    sigma_min < ... < sigma_n = sigma_max`` (module docstring) on ``schedule`` (float64, ``(n,)``).
    Raises ``ValueError`` when the levels leave the schedule's range."""
    if n < 2:
        raise ValueError(f"a consistency grid needs at least 2 levels, got {n}")
    return karras_times(schedule, n, sigma_min, sigma_max, rho)[:-1].flip(0)


def multistep_times(
    schedule: Schedule, steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0
) -> Tensor:
    """The sampling times of ``steps``-step consistency sampling: ``steps`` levels from
    ``sigma_max`` down, Karras-spaced as the first ``steps`` of ``steps + 1`` levels between
    ``sigma_max`` and ``sigma_min`` (the last, ``sigma_min``, where ``f`` is the identity, is
    left out), then 0: ``[t(sigma_max)]`` and 0 for one step."""
    return torch.cat([karras_times(schedule, steps + 1, sigma_min, sigma_max, rho)[:-2],
                      torch.zeros(1, dtype=torch.float64)])  # fmt: skip


def ode_step(
    teacher: DenoiserFn,
    x_t: Tensor,
    t: Tensor,
    s: Tensor,
    cond: dict[str, Any] | None = None,
    *,
    solver: Literal["heun", "ddim"] = "heun",
) -> Tensor:
    """One step of the teacher's probability-flow ODE from ``t`` down to ``s`` (each ``(B,)``
    float64, per example), in ``x~`` (Karras et al. 2022, Algorithm 1):
    ``x~_s = x~_t + (sigma_s - sigma_t) eps_hat(x_t, t)`` (``"ddim"``, Euler in ``sigma_ve``,
    the same map as DDIM with ``eta = 0``), then for ``"heun"`` the average of the slopes at both
    ends, ``x~_s = x~_t + (sigma_s - sigma_t) (eps_hat_t + eps_hat_s) / 2``. Returns ``x_s =
    alpha_s x~_s``."""
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}: choose one of {SOLVERS}")
    schedule = teacher.schedule
    (a_t, s_t), (a_s, s_s) = schedule.alpha_sigma(t), schedule.alpha_sigma(s)
    step = broadcast((s_s / a_s - s_t / a_t).to(x_t.dtype), x_t)
    a_t, a_s = broadcast(a_t.to(x_t.dtype), x_t), broadcast(a_s.to(x_t.dtype), x_t)
    x_ve = x_t / a_t
    slope = teacher(x_t, t, cond).eps
    euler = x_ve + step * slope
    if solver == "ddim":
        return a_s * euler
    slope_s = teacher(a_s * euler, s, cond).eps
    return a_s * (x_ve + step * 0.5 * (slope + slope_s))


def _noisy(x0: Tensor, t: Tensor, z: Tensor, schedule: Schedule) -> Tensor:
    """``x_t = alpha_t x_0 + sigma_t z`` at per-example times ``t``."""
    alpha, sigma = schedule.alpha_sigma(t)
    return broadcast(alpha.to(x0.dtype), x0) * x0 + broadcast(sigma.to(x0.dtype), x0) * z


#: The losses of consistency distillation: the improved one (``ict``) and Algorithm 2's.
DISTILLATION_LOSSES = ("ict", "l2")


def consistency_distillation_loss(
    student: DenoiserFn,
    target: DenoiserFn,
    step: Callable[..., Tensor],
    x0: Tensor,
    times: Tensor,
    cond: dict[str, Any] | None = None,
    *,
    loss: Literal["ict", "l2"] = "ict",
    generator: torch.Generator | None = None,
    reduction: Literal["mean", "none"] = "mean",
) -> Tensor:
    """The loss of one batch of consistency distillation (module docstring): ``student`` and
    ``target`` are consistency functions (``f_theta``, ``f_theta-``: DenoiserFns whose ``x0``
    is ``f``), ``step(x_t, t, s, cond)`` the teacher's ODE step (:func:`ode_step`, or an exact
    flow map), ``times`` the increasing times of the ``N`` levels (:func:`karras_levels`). Per
    example, with ``loss="l2"`` (Algorithm 2; ``n`` uniform) ``||f_theta(x_{t_{n+1}}) -
    f_theta-(x^_{t_n})||^2 / D``, with ``loss="ict"`` (``n ~ p(n)``,
    :func:`level_probabilities`) ``d(f_theta(x_{t_{n+1}}), f_theta-(x^_{t_n})) / (sigma_{n+1}
    - sigma_n)`` (:func:`pseudo_huber`); the batch mean or, with ``reduction="none"``, the
    ``(B,)`` values."""
    times = torch.as_tensor(times, dtype=torch.float64).to(x0.device)
    sigmas = student.schedule.sigma_ve(times).to(torch.float64)
    if loss == "ict":
        n = torch.multinomial(level_probabilities(sigmas), x0.shape[0], replacement=True,
                              generator=generator)  # fmt: skip
    else:
        n = torch.randint(len(times) - 1, (x0.shape[0],), generator=generator, device=x0.device)
    t, s = times[n + 1], times[n]
    z = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    x_t = _noisy(x0, t, z, student.schedule)
    with torch.no_grad():
        x_s = step(x_t, t, s, cond)
        goal = target(x_s, s, cond).x0
    dtype = torch.promote_types(x0.dtype, torch.float32)
    f, goal = student(x_t, t, cond).x0.to(dtype), goal.to(dtype)
    if loss == "ict":
        per_example = _weighted_pseudo_huber(f, goal, sigmas, n)
    else:
        per_example = (f - goal).square().flatten(1).mean(1)
    return per_example.mean() if reduction == "mean" else per_example


def training_levels(step: int, total: int, start: int = LEVELS_START, end: int = LEVELS_END) -> int:
    """``N(k) = min(s_0 2^floor(k / K'), s_1) + 1`` levels at step ``k = step`` of ``K = total``,
    ``K' = floor(K / (log2(s_1 / s_0) + 1))`` (Song & Dhariwal 2023, eq. 6; at least 1)."""
    if not 1 <= start <= end:
        raise ValueError(f"need 1 <= levels_start <= levels_end, got {start} and {end}")
    per_doubling = max(1, math.floor(total / (math.log2(end / start) + 1)))
    return min(start * 2 ** (step // per_doubling), end) + 1


def level_probabilities(sigmas: Tensor, p_mean: float = P_MEAN, p_std: float = P_STD) -> Tensor:
    """``p(n) ∝ erf((ln sigma_{n+1} - P_mean) / (sqrt2 P_std)) - erf((ln sigma_n - P_mean) /
    (sqrt2 P_std))`` for ``n = 1..N-1`` of the increasing ``sigmas`` (``(N - 1,)``, sums to 1)."""
    cdf = torch.erf((sigmas.log() - p_mean) / (math.sqrt(2.0) * p_std))
    mass = (cdf[1:] - cdf[:-1]).clamp(min=0.0)
    return mass / mass.sum()


def pseudo_huber(a: Tensor, b: Tensor, c: float | None = None) -> Tensor:
    """``sqrt(||a - b||^2 + c^2) - c`` per example, ``||.||`` the Euclidean norm over all ``D``
    dimensions, ``c = 0.00054 sqrt(D)`` by default (Song & Dhariwal 2023, Sec. 3.3)."""
    dim = a[0].numel()
    c = HUBER_C * math.sqrt(dim) if c is None else c
    return ((a - b).square().flatten(1).sum(1) + c**2).sqrt() - c


def consistency_training_loss(
    student: DenoiserFn,
    x0: Tensor,
    times: Tensor,
    cond: dict[str, Any] | None = None,
    *,
    p_mean: float = P_MEAN,
    p_std: float = P_STD,
    huber_c: float | None = None,
    generator: torch.Generator | None = None,
    reduction: Literal["mean", "none"] = "mean",
) -> Tensor:
    """The loss of one batch of improved consistency training (module docstring): levels
    ``n ~ p(n)`` (:func:`level_probabilities`) on the increasing ``times`` of the ``N`` levels,
    one ``z`` for both ends, the target ``f_theta(x_0 + sigma_n z, sigma_n)`` without gradient,
    per example ``d(f_theta(x_0 + sigma_{n+1} z, sigma_{n+1}), target) / (sigma_{n+1} -
    sigma_n)`` (:func:`pseudo_huber`, ``huber_c`` its ``c``); the batch mean or the ``(B,)``
    values."""
    schedule = student.schedule
    times = torch.as_tensor(times, dtype=torch.float64).to(x0.device)
    sigmas = schedule.sigma_ve(times).to(torch.float64)
    p = level_probabilities(sigmas, p_mean, p_std)
    n = torch.multinomial(p, x0.shape[0], replacement=True, generator=generator)
    t, s = times[n + 1], times[n]
    z = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    with torch.no_grad():
        goal = student(_noisy(x0, s, z, schedule), s, cond).x0
    dtype = torch.promote_types(x0.dtype, torch.float32)
    f = student(_noisy(x0, t, z, schedule), t, cond).x0.to(dtype)
    per_example = _weighted_pseudo_huber(f, goal.to(dtype), sigmas, n, huber_c)
    return per_example.mean() if reduction == "mean" else per_example


def _weighted_pseudo_huber(
    f: Tensor, goal: Tensor, sigmas: Tensor, n: Tensor, c: float | None = None
) -> Tensor:
    """``d(f, goal) / (sigma_{n+1} - sigma_n)`` per example (:func:`pseudo_huber`)."""
    return pseudo_huber(f, goal, c) / (sigmas[n + 1] - sigmas[n]).to(f.dtype)


@torch.inference_mode()
def consistency_sampler(
    denoiser: DenoiserFn,
    x: Tensor,
    ts: Tensor,
    *,
    cond: dict[str, Any] | None = None,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    sigma_min: float = 0.0,
) -> Tensor:
    """Multistep consistency sampling (Song et al. 2023, Algorithm 1) on the sampler contract
    of ``samplers.py``: ``denoiser`` a consistency function (its ``x0`` is ``f``), ``x`` the
    noise at ``ts[0]``, ``ts = t(tau_0) > t(tau_1) > ... > t(tau_{K-1}) > 0`` (e.g.
    :func:`multistep_times`): ``x_0 = f(x, tau_0)``, then for ``k = 1..K-1``
    ``x~ = x_0 + sqrt(tau_k^2 - sigma_min^2) z``, ``x_0 = f(alpha_k x~, tau_k)``. ``K``
    evaluations; ``callback(k, t_k, x_t, x0)`` sees each."""
    g = Grid(denoiser.schedule, ts)
    levels = [s / a for a, s in zip(g.alpha[:-1], g.sigma[:-1], strict=True)]
    if min(levels) ** 2 < sigma_min**2:
        raise ValueError(f"the sampling levels must lie above sigma_min = {sigma_min:g}")
    times = g.on(x)
    x0 = x
    for k in range(g.n):
        if k > 0:
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            extra = math.sqrt(levels[k] ** 2 - sigma_min**2)
            x = g.alpha[k] * (x0 + extra * noise)
        x0 = denoiser(x, times[k], cond).x0
        if callback is not None:
            callback(k, g.t[k], x, x0)
    return x0
