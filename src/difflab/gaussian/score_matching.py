"""Denoising score matching over noise levels: the NCSN objective (seeds 002 and 004; Vincent
2011; Song & Ermon 2019, eq. 5-6).

A noise-conditional score network ``s_theta(x~, sigma)`` is trained at noise levels
``sigma_1 < ... < sigma_N`` (geometric, :func:`~difflab.gaussian.langevin.geometric_sigmas`) on
``x~ = x_0 + sigma eps`` (the VE variable of docs/design.md). Vincent's identity replaces the
intractable ``grad log p_sigma(x~)`` by ``grad_x~ log N(x~; x_0, sigma^2 I) = -eps / sigma``, and
the weight ``lambda(sigma) = sigma^2`` makes every level's loss of order one:

    L(theta) = E_i E_{x_0, eps} sigma_i^2 ||s_theta(x~, sigma_i) + eps / sigma_i||^2 / D,
    x~ = x_0 + sigma_i eps,

with ``i`` uniform in ``1..N`` and ``D`` the dimensions of one example. With
``eps_hat = -sigma s_theta`` (seed 002: "reparameterizing the score to absorb ``-sigma_i``") it
is ``E ||eps_hat - eps||^2 / D``. Song & Ermon write ``1/2`` and sum over the ``D`` dimensions;
difflab averages over dimensions like every other objective (:mod:`difflab.gaussian.objectives`),
which rescales the loss by ``2 / D`` and moves no minimiser.

The network is any :class:`~difflab.gaussian.parameterization.Denoiser` (or ``DenoiserFn``): the
level ``sigma_i`` is the time ``t_i`` with ``sigma_ve(t_i) = sigma_i`` and the network sees
``x_t = alpha(t_i) x~``. With a VE schedule (``alpha = 1``) and ``prediction="score"`` this is
exactly NCSN's ``s_theta(x~, sigma_i)``, conditioned on ``sigma_i`` through ``c_noise = 1000
t_i``; the levels must be positive levels of the schedule (for ``VESchedule``, choose
``sigma_min`` below ``sigma_1``). Sampling: :func:`~difflab.gaussian.langevin.annealed_langevin`.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from difflab.gaussian.langevin import check_noise_levels
from difflab.gaussian.parameterization import DenoiserFn
from difflab.gaussian.schedules import broadcast


def ncsn_loss(
    denoiser: DenoiserFn,
    x0: Tensor,
    cond: dict[str, Any] | None = None,
    generator: torch.Generator | None = None,
    *,
    sigmas: Tensor,
    reduction: Literal["mean", "none"] = "mean",
) -> Tensor:
    """The NCSN denoising score matching loss (module docstring) of ``denoiser`` on ``x0``.

    Each example draws its level ``i`` uniformly from the ``N`` entries of ``sigmas`` (increasing,
    float64, all positive levels of ``denoiser.schedule``) and ``eps ~ N(0, I)``. Returns the batch
    mean, or the per-example losses ``sigma_i^2 ||s + eps / sigma_i||^2 / D`` with
    ``reduction="none"``.
    """
    if reduction not in ("mean", "none"):
        raise ValueError(f"unknown reduction {reduction!r}: choose 'mean' or 'none'")
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
    if sigmas.ndim != 1 or not bool((sigmas[1:] > sigmas[:-1]).all()):
        raise ValueError("sigmas must be a 1-D increasing sequence sigma_1 < ... < sigma_N")
    times = check_noise_levels(denoiser.schedule, sigmas).to(x0.device)
    level = torch.randint(len(sigmas), (x0.shape[0],), generator=generator, device=x0.device)
    t = times[level]
    sigma = sigmas.to(x0.device)[level]
    eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    alpha, _ = denoiser.schedule.alpha_sigma(t)
    x_t = broadcast(alpha, x0) * (x0 + broadcast(sigma, x0) * eps)
    # sigma s_theta(x~, sigma) = sigma alpha grad log q_t(x_t) = -eps_hat (sigma_t = alpha sigma).
    dtype = torch.promote_types(x0.dtype, torch.float32)
    eps_hat = denoiser(x_t, t, cond).eps.to(dtype)
    per_example = (eps.to(dtype) - eps_hat).square().flatten(1).mean(1)
    return per_example.mean() if reduction == "mean" else per_example
