"""Tab 2, the score field and sampling (seeds 000, 002, 004) on 2-D data.

The denoiser is either the exact oracle of a known 2-D mixture or a trained 2-D model; either
way it is a :class:`~difflab.gaussian.parameterization.DenoiserFn`, and the page reads
everything through it:

- the score field ``grad log q_t(x) = -eps_hat(x, t) / sigma_t`` (``Prediction.score``) at a
  grid of points, drawn as arrows of ``sigma_t grad log q_t = -eps_hat`` (bounded at every
  ``t``),
- trajectories of any sampler of :data:`~difflab.gaussian.samplers.SAMPLERS`: the state
  ``x_t`` at the start of every step (the sampler's ``callback``) and the sample it returns,
- the error against the exact endpoint: the probability-flow ODE solved from the same noise by
  EDM's second-order Heun method with :data:`REFERENCE_STEPS` steps (``heun``; within about
  ``1e-3`` of DDIM's 1,000-step solution on the tab's mixtures, and stable on schedules that end
  at zero SNR, where RK4 in log-SNR is not), and, for a mixture, the
  mean data log-density ``log p(x_0)`` of the samples beside its exact value ``E log p(x_0)``
  (Monte Carlo over :data:`DENSITY_DRAWS` exact draws).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from matplotlib.figure import Figure
from torch import Tensor

from difflab.errors import UserError
from difflab.explore.data import arrows, density_contours, grid_points, new_figure
from difflab.gaussian.oracles import GaussianMixtureOracle
from difflab.gaussian.parameterization import DenoiserFn
from difflab.gaussian.samplers import SAMPLERS, time_grid

#: The samplers whose output is a function of the starting noise alone (no draws inside); the
#: tab compares them path by path with the exact ODE solution (tests check this list).
DETERMINISTIC = ("ddim", "euler", "heun", "dpm_solver", "dpmpp_2m", "dpmpp_3m", "unipc",
                 "ipndm", "lms", "pf_ode_rk4")  # fmt: skip
#: Steps of the reference probability-flow ODE solve (Heun, 2 evaluations a step).
REFERENCE_STEPS = 200
#: Exact draws of the Monte Carlo estimate of ``E log p(x_0)``.
DENSITY_DRAWS = 20_000
#: The most steps the tab runs (the slider's end).
MAX_STEPS = 200
#: Langevin steps per noise level of ``annealed_langevin`` in the tab (its default is 100).
LANGEVIN_STEPS = 10


@dataclass
class Trajectories:
    """Sampler paths: ``paths`` ``(steps + 1, N, 2)`` (the states at each step's start, then
    the samples), the ``reference`` endpoints of the exact ODE and the numbers shown."""

    paths: Tensor
    reference: Tensor
    numbers: dict[str, float]


def score_field(denoiser: DenoiserFn, t: float, limit: float = 3.0, n: int = 17):
    """``(points, score)``: the ``n x n`` grid of ``[-limit, limit]^2`` and
    ``grad log q_t = -eps_hat / sigma_t`` there, both ``(n^2, 2)`` float64."""
    points = grid_points(limit, n)
    with torch.inference_mode():
        pred = denoiser(points, torch.full((len(points),), t, dtype=torch.float64))
    return points, pred.score.double()


def starting_noise(denoiser: DenoiserFn, n: int, seed: int) -> Tensor:
    """``n`` draws of the prior ``N(0, prior_std^2 I)`` in 2-D, float64, from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, generator=gen, dtype=torch.float64) * denoiser.schedule.prior_std


def trajectories(
    denoiser: DenoiserFn,
    sampler: str,
    steps: int,
    *,
    n: int = 64,
    seed: int = 0,
    oracle: GaussianMixtureOracle | None = None,
) -> Trajectories:
    """Run ``sampler`` for ``steps`` steps of the trailing grid from ``n`` prior draws and
    record its path; compare with the exact ODE endpoints (see the module docstring). The
    numbers: ``endpoint_error`` (mean distance to the ODE solution, deterministic samplers),
    ``endpoint_spread`` (the same for the stochastic ones: how far their noise moves them),
    ``log_density`` and ``exact_log_density`` (``oracle`` given), and ``nfe``."""
    if sampler not in SAMPLERS:
        raise UserError(f"unknown sampler {sampler!r}: choose one of {', '.join(SAMPLERS)}")
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
        raise UserError(f"the step count must be a whole number in 1..{MAX_STEPS}, got {steps!r}")
    try:
        ts = time_grid(denoiser.schedule, steps)
    except ValueError as e:
        raise UserError(str(e)) from None
    x = starting_noise(denoiser, n, seed)
    states: list[Tensor] = []
    calls = [0]

    def counted(x_t: Tensor, t: Tensor, cond=None, **kwargs):
        calls[0] += 1
        return denoiser(x_t, t, cond, **kwargs)

    counted.schedule = denoiser.schedule  # type: ignore[attr-defined]
    options = {"steps_per_level": LANGEVIN_STEPS} if sampler == "annealed_langevin" else {}
    out = SAMPLERS[sampler](counted, x, ts, generator=torch.Generator().manual_seed(seed + 1),
                            callback=lambda i, t, x_t, x0: states.append(x_t.clone()),
                            **options)  # fmt: skip
    reference = reference_endpoints(denoiser, n, seed)
    distance = float((out - reference).norm(dim=1).mean())
    key = "endpoint_error" if sampler in DETERMINISTIC else "endpoint_spread"
    numbers = {key: distance, "nfe": float(calls[0])}
    if oracle is not None:
        numbers["log_density"] = float(oracle.log_prob(out).mean())
        numbers["exact_log_density"] = exact_log_density(oracle)
    return Trajectories(torch.stack([*states, out]), reference, numbers)


def reference_endpoints(denoiser: DenoiserFn, n: int, seed: int) -> Tensor:
    """The probability-flow ODE's samples from :func:`starting_noise` (Heun,
    :data:`REFERENCE_STEPS` steps, or all ``T`` of a discrete schedule with fewer): the exact
    endpoint every deterministic sampler tends to."""
    return _reference(denoiser, n, seed)


@functools.lru_cache(maxsize=16)
def _reference(denoiser: DenoiserFn, n: int, seed: int) -> Tensor:
    T = denoiser.schedule.T  # a discrete schedule has no finer grid than its own T steps
    ts = time_grid(denoiser.schedule, REFERENCE_STEPS if T is None else min(T, REFERENCE_STEPS))
    return SAMPLERS["heun"](denoiser, starting_noise(denoiser, n, seed), ts)


@functools.lru_cache(maxsize=16)
def exact_log_density(oracle: GaussianMixtureOracle) -> float:
    """``E log p(x_0)`` of the mixture, by Monte Carlo over :data:`DENSITY_DRAWS` exact draws
    (seeded; its standard error is below 0.01 nats for the tab's mixtures)."""
    gen = torch.Generator().manual_seed(0)
    return float(oracle.log_prob(oracle.sample(DENSITY_DRAWS, gen)).mean())


def score_figure(
    denoiser: DenoiserFn,
    t: float,
    run: Trajectories,
    sampler: str,
    oracle: GaussianMixtureOracle | None = None,
    limit: float = 3.0,
) -> Figure:
    """Left: the score field at ``t`` as arrows of ``sigma_t grad log q_t`` over ``q_t``'s
    exact contours (mixtures); right: the sampler's paths, their samples and the exact ODE
    endpoints."""
    fig = new_figure(10, 4.4)
    left, right = fig.subplots(1, 2)
    sigma = float(denoiser.schedule.alpha_sigma(torch.tensor(t, dtype=torch.float64))[1])
    points, score = score_field(denoiser, t, limit)
    if oracle is not None:
        density_contours(left, oracle, t, limit)
        density_contours(right, oracle, 0.0, limit, cmap="Greys")
    field = sigma * score
    arrows(left, points, field, "tab:red", float(field.norm(dim=1).max()))
    left.set_title(f"score field at t = {t:.2f} (arrows: sigma_t grad log q_t)", fontsize=9)
    paths = run.paths.numpy()
    for i in range(paths.shape[1]):
        right.plot(paths[:, i, 0], paths[:, i, 1], color="tab:blue", lw=0.6, alpha=0.5)
    right.plot(paths[0, :, 0], paths[0, :, 1], ".", color="gray", ms=3, label="start x_1")
    right.plot(paths[-1, :, 0], paths[-1, :, 1], ".", color="tab:blue", ms=5, label="samples")
    right.plot(run.reference[:, 0], run.reference[:, 1], "x", color="black", ms=4,
               label="exact ODE endpoint")  # fmt: skip
    right.set_title(f"{sampler}, {len(paths) - 1} steps", fontsize=9)
    right.legend(fontsize=7, loc="upper right")
    for ax in (left, right):
        ax.set_xlim(-limit, limit)
        ax.set_ylim(-limit, limit)
        ax.set_aspect("equal")
    return fig
