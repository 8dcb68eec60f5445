"""Langevin dynamics and annealed Langevin sampling (seeds 002 and 004; Song & Ermon 2019).

Langevin dynamics samples ``p`` from its score alone (seed 002):

    x <- x + delta grad log p(x) + sqrt(2 delta) z,    z ~ N(0, I),

which converges to ``p`` as ``delta -> 0`` and the number of steps grows. Song & Ermon (2019,
Algorithm 1) write the same step with ``alpha = 2 delta``: ``x <- x + (alpha/2) s + sqrt(alpha) z``.

Annealed Langevin dynamics runs it on the noised data ``p_sigma = p * N(0, sigma^2 I)`` at noise
levels ``sigma_1 < ... < sigma_N`` (the VE variable ``x~ = x_0 + sigma eps``, docs/design.md), from
``sigma_N`` down to ``sigma_1``, ``T`` steps per level, with Song & Ermon's step size

    alpha_i = eps * sigma_i^2 / sigma_1^2        (their ``sigma_L`` is our smallest, ``sigma_1``),

so that ``alpha_i / sigma_i^2`` (the step relative to the width of ``p_sigma_i``) is the same at
every level; ``eps`` is the step at the smallest level. After the last level an optional final
denoising step (Song & Ermon 2020, "NCSNv2"; Jolicoeur-Martineau et al. 2021) returns Tweedie's
estimate ``E[x_0 | x~] = x~ + sigma_1^2 grad log p_sigma_1(x~)``.

A *score function* here is ``score(x~, sigma, cond) -> grad log p_sigma(x~)`` with ``sigma`` a
``(B,)`` tensor; any :class:`~difflab.gaussian.parameterization.DenoiserFn` becomes one through
:func:`score_from_denoiser`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from difflab.gaussian.grid import Callback, Grid
from difflab.gaussian.parameterization import DenoiserFn
from difflab.gaussian.schedules import Schedule, broadcast

#: ``score(x~, sigma, cond) -> grad log p_sigma(x~)``, ``sigma`` of shape ``(B,)``.
ScoreFn = Callable[..., Tensor]


def langevin_step(x: Tensor, score: Tensor, step_size: Tensor | float, noise: Tensor) -> Tensor:
    """``x + delta score + sqrt(2 delta) noise`` with ``delta = step_size`` (a float or a tensor
    broadcasting against ``x``) and ``noise ~ N(0, I)``."""
    if isinstance(step_size, Tensor):
        return x + step_size * score + (2.0 * step_size).sqrt() * noise
    return x + step_size * score + math.sqrt(2.0 * step_size) * noise


def score_from_denoiser(denoiser: DenoiserFn) -> ScoreFn:
    """The noise-conditional score of a denoiser in the VE variable ``x~ = x_t / alpha``:

        grad_x~ log p_sigma(x~) = alpha(t) grad_x log q_t(alpha x~) = -eps_hat / sigma,

    at the time ``t`` with ``sigma_ve(t) = sigma`` (``schedule.t_of_sigma_ve``); ``sigma`` must
    lie in the schedule's range of positive noise levels (see :func:`check_noise_levels`)."""
    schedule = denoiser.schedule

    def score(x: Tensor, sigma: Tensor, cond: dict[str, Any] | None = None) -> Tensor:
        t = schedule.t_of_sigma_ve(sigma.to(torch.float64))
        alpha, _ = schedule.alpha_sigma(t)
        pred = denoiser(broadcast(alpha, x) * x, t, cond)
        return -pred.eps / broadcast(sigma, x)

    return score


def check_noise_levels(schedule: Schedule, sigmas: Tensor) -> Tensor:
    """Return the times ``t_i`` (float64, CPU) at which ``schedule`` has the VE noise levels
    ``sigmas``, or raise ``ValueError`` if some level is not one of its positive levels (for
    :class:`~difflab.gaussian.schedules.VESchedule`, ``t = 0`` is the data, so ``sigma_min``
    itself is not a level: choose a smaller ``sigma_min``)."""
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64).cpu()
    t = schedule.t_of_sigma_ve(sigmas)
    back = schedule.sigma_ve(t)
    bad = ~((t > 0) & torch.isclose(back, sigmas, rtol=1e-6, atol=0.0))
    if bool(bad.any()):
        lo, hi = schedule.sigma_ve(torch.tensor([1e-9, 1.0], dtype=torch.float64)).tolist()
        raise ValueError(
            f"noise level sigma={float(sigmas[bad][0]):.6g} is outside the schedule's positive "
            f"noise levels (about {lo:.4g} to {hi:.4g}, sigma_ve at t in (0, 1])"
        )
    return t


def geometric_sigmas(sigma_min: float, sigma_max: float, n: int) -> Tensor:
    """``n`` noise levels ``sigma_1 = sigma_min < ... < sigma_n = sigma_max`` in geometric
    progression (NCSN), float64."""
    if not 0 < sigma_min < sigma_max or n < 2:
        raise ValueError("geometric_sigmas needs 0 < sigma_min < sigma_max and n >= 2")
    return torch.linspace(math.log(sigma_min), math.log(sigma_max), n, dtype=torch.float64).exp()


def _as_score(score: ScoreFn | DenoiserFn, sigmas: Tensor) -> ScoreFn:
    if hasattr(score, "schedule"):
        check_noise_levels(score.schedule, sigmas)
        return score_from_denoiser(score)
    return score


@torch.inference_mode()
def annealed_langevin(
    score: ScoreFn | DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    steps_per_level: int = 100,
    eps: float = 2e-5,
    denoise: bool = True,
    cond: dict[str, Any] | None = None,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """Annealed Langevin dynamics (Song & Ermon 2019, Algorithm 1; module docstring).

    Args:
        score: a score function ``(x~, sigma, cond) -> grad log p_sigma(x~)`` or a denoiser
            (anything with a ``schedule``; :func:`score_from_denoiser`).
        x: the starting point in the VE variable, e.g. ``sigma_N * randn`` (or uniform noise).
        sigmas: increasing noise levels ``sigma_1 < ... < sigma_N``.
        steps_per_level: ``T``, Langevin steps at each level (``N T`` score evaluations).
        eps: the step ``alpha_1`` at the smallest level; ``alpha_i = eps sigma_i^2 / sigma_1^2``
            (defaults ``T = 100``, ``eps = 2e-5``: Song & Ermon's CIFAR-10 setting).
        denoise: finish with ``x + sigma_1^2 score(x, sigma_1)`` (one more evaluation).
        callback: ``callback(i, sigma_i, x, x0_hat)`` after the ``T`` steps of each level ``i``
            (counted from the largest, ``i = 0``), with ``x0_hat = x + sigma_i^2 score``.

    Returns the samples.
    """
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64).detach().cpu()
    if sigmas.ndim != 1 or len(sigmas) < 1 or not bool((sigmas[1:] > sigmas[:-1]).all()):
        raise ValueError("sigmas must be a 1-D increasing sequence sigma_1 < ... < sigma_N")
    if steps_per_level < 1 or eps <= 0:
        raise ValueError("annealed_langevin needs steps_per_level >= 1 and eps > 0")
    fn = _as_score(score, sigmas)
    batch = x.shape[0]
    levels = sigmas.to(x.device)
    # Langevin step delta_i = alpha_i / 2 in the seed's convention.
    deltas = 0.5 * eps * (sigmas / sigmas[0]) ** 2
    for i, k in enumerate(reversed(range(len(sigmas)))):
        sigma = levels[k].expand(batch)
        for _ in range(steps_per_level):
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = langevin_step(x, fn(x, sigma, cond), float(deltas[k]), noise)
        if callback is not None:
            callback(i, float(sigmas[k]), x, x + broadcast(sigma**2, x) * fn(x, sigma, cond))
    if denoise:
        sigma = levels[0].expand(batch)
        x = x + broadcast(sigma**2, x) * fn(x, sigma, cond)
    return x


def annealed_langevin_sampler(
    denoiser: DenoiserFn,
    x: Tensor,
    ts: Tensor,
    *,
    cond: dict[str, Any] | None = None,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    steps_per_level: int = 100,
    eps: float = 2e-5,
) -> Tensor:
    """:func:`annealed_langevin` under the sampler contract: the levels are the VE noise levels
    ``sigma_ve(t)`` of the positive times of ``ts`` (geometric for a VE schedule), ``x`` is the
    noise at ``ts[0]`` (rescaled to the VE variable, ``x / alpha(ts[0])``), the final denoising
    step lands on ``t = 0``, and ``callback(i, t_i, x_{t_i}, x0_hat)`` reports each level in the
    schedule's variable ``x_t = alpha(t) x~``."""
    grid = Grid(denoiser.schedule, ts)
    sigmas = grid.schedule.sigma_ve(grid.ts[:-1]).flip(0)
    report = None
    if callback is not None:

        def report(i: int, sigma: float, x_ve: Tensor, x0: Tensor) -> None:
            callback(i, grid.t[i], grid.alpha[i] * x_ve, x0)

    return annealed_langevin(
        denoiser,
        x / grid.alpha[0],
        sigmas,
        steps_per_level=steps_per_level,
        eps=eps,
        denoise=True,
        cond=cond,
        generator=generator,
        callback=report,
    )
