"""EDM (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models"):
its log-normal noise-level distribution and its loss weighting. Its schedule is
:class:`~difflab.gaussian.schedules.EDMSchedule`.

The preconditioning itself is a parameterization of the denoiser,
``Denoiser(net, schedule, prediction="edm", sigma_data=0.5)``
(:func:`~difflab.gaussian.parameterization.edm_preconditioning`), so it works with every schedule,
sampler and guidance wrapper. EDM writes everything in the VE variable ``x~ = x_t / alpha =
x_0 + sigma eps`` with ``sigma = sigma_ve`` (docs/design.md); its training loss (Table 1) is

    L = E_{sigma, x_0, eps} lambda(sigma) ||D(x_0 + sigma eps; sigma) - x_0||^2 / D_dim,
    ln sigma ~ N(P_mean, P_std^2),
    lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2,

with ``P_mean = -1.2``, ``P_std = 1.2``. Since ``lambda c_out^2 = 1``, for the EDM
parameterization this is the plain MSE of the network's output ``F`` against its target
``(x_0 - c_skip x~) / c_out``. Karras et al. sum over the dimensions; difflab averages over them
(``D_dim``), like every other objective. :func:`edm_loss` accepts any denoiser (eps, x0, v,
score or edm), since it only reads ``D = x0_hat``.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from difflab.gaussian.parameterization import DenoiserFn
from difflab.gaussian.schedules import broadcast

#: Karras et al.'s training distribution of ``ln sigma`` and their ``sigma_data``.
P_MEAN, P_STD, SIGMA_DATA = -1.2, 1.2, 0.5


def edm_weight(sigma: Tensor, sigma_data: float = SIGMA_DATA) -> Tensor:
    """``lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 = 1 / c_out^2``."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def sample_edm_sigma(
    n: int,
    *,
    p_mean: float = P_MEAN,
    p_std: float = P_STD,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """``n`` training noise levels with ``ln sigma ~ N(p_mean, p_std^2)``, float64 ``(n,)``."""
    z = torch.randn(n, generator=generator, device=device, dtype=torch.float64)
    return torch.exp(p_mean + p_std * z)


#: Floor on training times, so that a level below a schedule's range maps to its smallest positive
#: level and not to the data at ``t = 0`` (where ``sigma = 0`` and the weight is infinite).
_T_FLOOR = 1e-9


def edm_loss(
    denoiser: DenoiserFn,
    x0: Tensor,
    cond: dict[str, Any] | None = None,
    generator: torch.Generator | None = None,
    *,
    p_mean: float = P_MEAN,
    p_std: float = P_STD,
    sigma_data: float | None = None,
    reduction: Literal["mean", "none"] = "mean",
) -> Tensor:
    """EDM's loss (module docstring) of ``denoiser`` on the batch ``x0``.

    Each example draws ``ln sigma ~ N(p_mean, p_std^2)`` and ``eps ~ N(0, I)``; ``sigma`` becomes
    the time ``t`` with ``sigma_ve(t) = sigma`` (clamped to the schedule's positive levels; the
    weight uses the level actually applied, ``sigma_ve(t)``), and the denoiser sees
    ``x_t = alpha(t) (x_0 + sigma eps)``. ``sigma_data`` defaults to the denoiser's own (an EDM
    :class:`~difflab.gaussian.parameterization.Denoiser`), else 0.5. Returns the batch mean, or
    the per-example ``lambda(sigma) ||D - x_0||^2 / D_dim`` with ``reduction="none"``.
    """
    if reduction not in ("mean", "none"):
        raise ValueError(f"unknown reduction {reduction!r}: choose 'mean' or 'none'")
    if sigma_data is None:
        sigma_data = getattr(denoiser, "sigma_data", SIGMA_DATA)
    schedule = denoiser.schedule
    sigma = sample_edm_sigma(
        x0.shape[0], p_mean=p_mean, p_std=p_std, generator=generator, device=x0.device
    )
    t = schedule.t_of_sigma_ve(sigma).clamp(min=_T_FLOOR)
    alpha, sigma_t = schedule.alpha_sigma(t)
    sigma = sigma_t / alpha
    eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    x_t = broadcast(alpha, x0) * x0 + broadcast(sigma_t, x0) * eps
    dtype = torch.promote_types(x0.dtype, torch.float32)
    error = denoiser(x_t, t, cond).x0.to(dtype) - x0.to(dtype)
    per_example = edm_weight(sigma, sigma_data).to(dtype) * error.square().flatten(1).mean(1)
    return per_example.mean() if reduction == "mean" else per_example
