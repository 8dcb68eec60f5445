"""Progressive distillation (Salimans & Ho 2022; seed 004, Algorithm 2; seed 002): a student
that takes one DDIM step where its teacher takes two.

Notation (docs/design.md): ``z_t = alpha_t x + sigma_t eps``. DDIM with ``eta = 0`` from ``t`` to
``s < t`` with the data estimate ``x_hat`` of ``z_t`` is

    z_s = alpha_s x_hat + (sigma_s / sigma_t) (z_t - alpha_t x_hat).

The teacher samples on a grid ``t_0 > t_1 > ... > t_2N = 0`` of ``2N`` steps; the student on
every other point, ``t_0 > t_2 > ... > t_2N`` (``N`` steps). For a student step from
``t = t_2k`` to ``t'' = t_2k+2`` through the teacher's ``t' = t_2k+1``, Algorithm 2's target is
the data estimate that makes one student DDIM step land where the teacher's two land:

    z_t'  = alpha_t'  x_eta(z_t)  + (sigma_t'  / sigma_t ) (z_t  - alpha_t  x_eta(z_t)),
    z_t'' = alpha_t'' x_eta(z_t') + (sigma_t'' / sigma_t') (z_t' - alpha_t' x_eta(z_t')),
    x~    = (z_t'' - (sigma_t'' / sigma_t) z_t) / (alpha_t'' - (sigma_t'' / sigma_t) alpha_t)

(solve ``z_t'' = alpha_t'' x~ + (sigma_t'' / sigma_t)(z_t - alpha_t x~)`` for ``x~``). The
student's loss is ``w(lambda_t) ||x~ - x_theta(z_t)||^2 / D`` in data space, whatever its
parameterization, with the weight of Salimans & Ho (Sec. 4): ``"truncated-snr"``,
``w = max(alpha^2 / sigma^2, 1)``, or ``"v"``, the MSE of ``v = alpha eps - sigma x`` at fixed
``z_t``: ``w = (alpha^2 + sigma^2)^2 / sigma^2`` (``1 + SNR`` for VP schedules).

The teacher is any :class:`~difflab.gaussian.parameterization.DenoiserFn` (a guided one too:
guided distillation with the guidance scale fixed), read through its ``x0`` and ``eps``, so any
parameterization of the teacher works; the student should predict ``x0``, ``v`` or ``flow``
(``eps`` cannot express ``x`` where ``alpha -> 0``, the first step from pure noise).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from difflab.gaussian.parameterization import DenoiserFn, Prediction
from difflab.gaussian.schedules import broadcast

DISTILL_WEIGHTINGS: tuple[str, ...] = ("truncated-snr", "v")
#: The parameterizations a student may have (Salimans & Ho 2022, Sec. 4; the velocity of a
#: flow, ``eps - x`` on the linear path, is bounded where ``eps`` prediction is not).
STUDENT_PREDICTIONS: tuple[str, ...] = ("x0", "v", "flow")


def ddim_step(pred: Prediction, alpha_s: Tensor, sigma_s: Tensor) -> Tensor:
    """DDIM (``eta = 0``) from ``pred.x_t`` to the time with ``(alpha_s, sigma_s)``:
    ``z_s = alpha_s x_hat + sigma_s eps_hat``, where ``eps_hat = (z_t - alpha_t x_hat) /
    sigma_t`` (the same for every parameterization, as the Prediction holds both)."""
    x = pred.x_t
    return broadcast(alpha_s, x) * pred.x0 + broadcast(sigma_s, x) * pred.eps


def progressive_target(
    teacher: DenoiserFn,
    z_t: Tensor,
    times: tuple[Tensor, Tensor, Tensor],
    cond: dict[str, Any] | None = None,
) -> Tensor:
    """Algorithm 2's ``x~`` for ``z_t`` at ``times = (t, t', t'')`` (each ``(B,)`` float64,
    ``t > t' > t''``): two teacher DDIM steps ``t -> t' -> t''``, then the data estimate that
    takes ``z_t`` to the same ``z_t''`` in one DDIM step (module docstring)."""
    schedule = teacher.schedule
    (a_t, s_t), (a_1, s_1), (a_2, s_2) = (schedule.alpha_sigma(t) for t in times)
    z_1 = ddim_step(teacher(z_t, times[0], cond), a_1, s_1)
    z_2 = ddim_step(teacher(z_1, times[1], cond), a_2, s_2)
    ratio = s_2 / s_t
    return (z_2 - broadcast(ratio, z_t) * z_t) / broadcast(a_2 - ratio * a_t, z_t)


def distillation_weight(alpha: Tensor, sigma: Tensor, weighting: str) -> Tensor:
    """``w(lambda_t)`` in front of ``||x~ - x_theta||^2 / D``: ``"truncated-snr"``,
    ``max(alpha^2 / sigma^2, 1)``, or ``"v"``, ``(alpha^2 + sigma^2)^2 / sigma^2``."""
    if weighting == "truncated-snr":
        return (alpha**2 / sigma**2).clamp(min=1.0)
    if weighting == "v":
        return (alpha**2 + sigma**2) ** 2 / sigma**2
    raise ValueError(f"unknown weighting {weighting!r}: choose one of {DISTILL_WEIGHTINGS}")


def progressive_loss(
    student: DenoiserFn,
    teacher: DenoiserFn,
    x0: Tensor,
    teacher_times: Tensor,
    cond: dict[str, Any] | None = None,
    *,
    weighting: str = "truncated-snr",
    generator: torch.Generator | None = None,
    reduction: str = "mean",
) -> Tensor:
    """The loss of one batch of Algorithm 2: for each example a student step ``k`` uniform in
    ``0..N-1`` of the teacher's grid ``teacher_times`` (``2N + 1`` decreasing times ending with
    0), ``eps ~ N(0, I)``, ``z_t = alpha_t x + sigma_t eps`` at ``t = t_2k``, the target
    :func:`progressive_target` through ``t_2k+1`` to ``t_2k+2`` (no gradient), and
    ``w(lambda_t) ||x~ - x_theta(z_t)||^2 / D`` (:func:`distillation_weight`); the batch mean
    (``reduction="mean"``) or the per-example losses (``"none"``)."""
    grid = torch.as_tensor(teacher_times, dtype=torch.float64)
    if grid.ndim != 1 or len(grid) < 3 or len(grid) % 2 == 0:
        raise ValueError("the teacher's grid must hold 2N + 1 times (N >= 1 student steps)")
    n = (len(grid) - 1) // 2
    k = torch.randint(n, (x0.shape[0],), generator=generator, device=x0.device)
    grid = grid.to(x0.device)
    t, t_mid, t_next = grid[2 * k], grid[2 * k + 1], grid[2 * k + 2]
    eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    alpha, sigma = student.schedule.alpha_sigma(t)
    z_t = broadcast(alpha, x0) * x0 + broadcast(sigma, x0) * eps
    with torch.no_grad():
        target = progressive_target(teacher, z_t, (t, t_mid, t_next), cond)
    x_hat = student(z_t, t, cond).x0
    dtype = torch.promote_types(x0.dtype, torch.float32)
    per_example = (x_hat.to(dtype) - target.to(dtype)).square().flatten(1).mean(1)
    per_example = per_example * distillation_weight(alpha, sigma, weighting).to(dtype)
    return per_example.mean() if reduction == "mean" else per_example
