"""Closed forms of the Gaussian forward process ``x_t = alpha(t) x_0 + sigma(t) eps``.

For ``0 <= s < t <= 1`` write ``alpha_{t|s} = alpha_t / alpha_s`` and
``sigma_{t|s}^2 = sigma_t^2 - alpha_{t|s}^2 sigma_s^2`` (Kingma et al. 2021). Then

- transition ``q(x_t | x_s) = N(alpha_{t|s} x_s, sigma_{t|s}^2 I)``; for consecutive DDPM steps
  ``alpha_{t|s}^2 = 1 - beta_t`` and ``sigma_{t|s}^2 = beta_t`` (seed 001),
- marginal ``q(x_t | x_0) = N(alpha_t x_0, sigma_t^2 I)``,
- posterior ``q(x_s | x_t, x_0) = N(mu, sigma_{s,t}^2 I)`` with
  ``mu = (alpha_{t|s} sigma_s^2 / sigma_t^2) x_t + (alpha_s sigma_{t|s}^2 / sigma_t^2) x_0`` and
  ``sigma_{s,t}^2 = sigma_{t|s}^2 sigma_s^2 / sigma_t^2`` (DDPM's beta-tilde, seed 001),
- prior ``p(x_1) = N(0, prior_std^2 I)``.

All times are ``(B,)`` tensors (or scalars) and results broadcast against ``x``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from difflab.gaussian.schedules import Schedule, broadcast


@dataclass(frozen=True)
class Gaussian:
    """An isotropic Gaussian ``N(mean, var I)``; ``var`` broadcasts against ``mean``."""

    mean: Tensor
    var: Tensor

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        noise = torch.randn(
            self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype
        )
        return self.mean + self.var.sqrt() * noise


def _as(t: Tensor | float, like: Tensor) -> Tensor:
    return torch.as_tensor(t, dtype=torch.float64, device=like.device)


def marginal(schedule: Schedule, x0: Tensor, t: Tensor | float) -> Gaussian:
    """``q(x_t | x_0) = N(alpha_t x_0, sigma_t^2 I)``."""
    alpha, sigma = schedule.alpha_sigma(_as(t, x0))
    return Gaussian(broadcast(alpha, x0) * x0, broadcast(sigma**2, x0))


def q_sample(schedule: Schedule, x0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
    """Reparameterised draw ``x_t = alpha_t x_0 + sigma_t eps``."""
    alpha, sigma = schedule.alpha_sigma(_as(t, x0))
    return broadcast(alpha, x0) * x0 + broadcast(sigma, x0) * eps


def transition_coefficients(
    schedule: Schedule, s: Tensor | float, t: Tensor | float
) -> tuple[Tensor, Tensor]:
    """``(alpha_{t|s}, sigma_{t|s}^2)`` for ``s < t`` in float64."""
    s = torch.as_tensor(s, dtype=torch.float64)
    t = torch.as_tensor(t, dtype=torch.float64)
    a_s, s_s = schedule.alpha_sigma(s)
    a_t, s_t = schedule.alpha_sigma(t)
    a_ts = a_t / a_s
    return a_ts, (s_t**2 - a_ts**2 * s_s**2).clamp(min=0.0)


def transition(schedule: Schedule, x_s: Tensor, s: Tensor | float, t: Tensor | float) -> Gaussian:
    """``q(x_t | x_s) = N(alpha_{t|s} x_s, sigma_{t|s}^2 I)``: one DDPM step at ``t = s + 1/T``."""
    a_ts, var = transition_coefficients(schedule, _as(s, x_s), _as(t, x_s))
    return Gaussian(broadcast(a_ts, x_s) * x_s, broadcast(var, x_s))


def posterior_coefficients(
    schedule: Schedule, s: Tensor | float, t: Tensor | float
) -> tuple[Tensor, Tensor, Tensor]:
    """``(c_xt, c_x0, var)`` with ``q(x_s | x_t, x_0) = N(c_xt x_t + c_x0 x_0, var I)``, float64.

    At ``s = 0`` the posterior is the point mass at ``x_0`` (``c_xt = 0, c_x0 = 1, var = 0``).
    """
    s = torch.as_tensor(s, dtype=torch.float64)
    t = torch.as_tensor(t, dtype=torch.float64)
    a_s, s_s = schedule.alpha_sigma(s)
    a_t, s_t = schedule.alpha_sigma(t)
    a_ts = a_t / a_s
    var_ts = (s_t**2 - a_ts**2 * s_s**2).clamp(min=0.0)
    c_xt = a_ts * s_s**2 / s_t**2
    c_x0 = a_s * var_ts / s_t**2
    var = var_ts * s_s**2 / s_t**2
    return c_xt, c_x0, var


def posterior(
    schedule: Schedule, x_t: Tensor, x0: Tensor, s: Tensor | float, t: Tensor | float
) -> Gaussian:
    """``q(x_s | x_t, x_0)``: mean ``c_xt x_t + c_x0 x_0`` and variance beta-tilde (see module)."""
    c_xt, c_x0, var = posterior_coefficients(schedule, _as(s, x_t), _as(t, x_t))
    mean = broadcast(c_xt, x_t) * x_t + broadcast(c_x0, x_t) * x0
    return Gaussian(mean, broadcast(var, x_t))


def prior(schedule: Schedule, shape: tuple[int, ...], **tensor_kwargs) -> Gaussian:
    """``p(x_1) = N(0, prior_std^2 I)`` (``N(0, I)`` for VP schedules)."""
    mean = torch.zeros(shape, **tensor_kwargs)
    return Gaussian(mean, torch.full((), schedule.prior_std**2, **tensor_kwargs))
