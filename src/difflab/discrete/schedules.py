"""Schedules of token processes: ``alpha(t)``, the probability that a token is still clean at ``t``.

A discrete (token) process keeps each token with probability ``alpha(t)`` and otherwise replaces
it by noise (a mask, a uniform token or a mix; see :mod:`difflab.discrete.process`). Time is
continuous, ``t in [0, 1]``, with ``alpha(0) = 1`` (the data) and ``alpha`` decreasing to about 0
at ``t = 1``. Every schedule also gives ``alpha'(t) = d alpha / dt`` (which is ``<= 0``), which the
continuous-time bounds weight by (MDLM: ``alpha'_t / (1 - alpha_t)``; seed 000, "Masked diffusion
loss").

The names follow MDLM (Sahoo et al. 2024), whose schedules are written through the "total noise"
``sigma(t) = -log alpha(t)``:

- :class:`LogLinearSchedule`: ``sigma(t) = -log(1 - (1 - eps) t)``, so
  ``alpha(t) = 1 - (1 - eps) t`` (linear in ``alpha``; ``eps`` keeps ``sigma(1)`` finite,
  ``alpha(1) = eps``).
- :class:`LinearSchedule`: ``sigma(t) = sigma_max t``, so ``alpha(t) = exp(-sigma_max t)``.
- :class:`CosineSchedule`: ``alpha(t) = eps + (1 - eps) cos(pi t / 2)``.
- :class:`DiscreteTimeSchedule`: D3PM's ``T`` steps, ``alpha`` at ``t = k / T`` equal to
  ``alpha_bar_k = prod_{j <= k} (1 - beta_j)`` (docs/design.md notation), linear in between.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
from torch import Tensor


class TokenSchedule(ABC):
    """``alpha(t)``: probability that a token has not been corrupted by time ``t in [0, 1]``."""

    #: Number of steps of a discrete-time (D3PM) schedule, ``None`` for a continuous one.
    T: int | None = None
    _config: dict

    @abstractmethod
    def alpha(self, t: Tensor) -> Tensor:
        """``alpha(t)`` elementwise, in the dtype of ``t`` (pass float64 for exact work)."""

    @abstractmethod
    def alpha_prime(self, t: Tensor) -> Tensor:
        """``d alpha / dt`` elementwise (``<= 0``)."""

    def config(self) -> dict:
        """A JSON-serialisable description from which :func:`make_token_schedule` rebuilds it."""
        return dict(self._config)


class LogLinearSchedule(TokenSchedule):
    """MDLM's log-linear schedule: ``alpha(t) = 1 - (1 - eps) t``, ``alpha' = -(1 - eps)``.

    With it the MDLM weight ``alpha'_t / (1 - alpha_t) = -1 / t`` for every ``eps``.
    """

    def __init__(self, eps: float = 1e-3):
        if not 0.0 <= eps < 1.0:
            raise ValueError(f"eps must lie in [0, 1), got {eps}")
        self.eps = float(eps)
        self._config = {"kind": "log-linear", "eps": self.eps}

    def alpha(self, t: Tensor) -> Tensor:
        return 1.0 - (1.0 - self.eps) * _float(t)

    def alpha_prime(self, t: Tensor) -> Tensor:
        return torch.full_like(_float(t), -(1.0 - self.eps))


class LinearSchedule(TokenSchedule):
    """MDLM's linear schedule: total noise linear in ``t``, ``alpha(t) = exp(-sigma_max t)``."""

    def __init__(self, sigma_max: float = 10.0):
        if sigma_max <= 0:
            raise ValueError(f"sigma_max must be positive, got {sigma_max}")
        self.sigma_max = float(sigma_max)
        self._config = {"kind": "linear", "sigma_max": self.sigma_max}

    def alpha(self, t: Tensor) -> Tensor:
        return torch.exp(-self.sigma_max * _float(t))

    def alpha_prime(self, t: Tensor) -> Tensor:
        return -self.sigma_max * torch.exp(-self.sigma_max * _float(t))


class CosineSchedule(TokenSchedule):
    """MDLM's cosine schedule: ``alpha(t) = eps + (1 - eps) cos(pi t / 2)``."""

    def __init__(self, eps: float = 1e-3):
        if not 0.0 <= eps < 1.0:
            raise ValueError(f"eps must lie in [0, 1), got {eps}")
        self.eps = float(eps)
        self._config = {"kind": "cosine", "eps": self.eps}

    def alpha(self, t: Tensor) -> Tensor:
        return self.eps + (1.0 - self.eps) * torch.cos(0.5 * math.pi * _float(t))

    def alpha_prime(self, t: Tensor) -> Tensor:
        return -(1.0 - self.eps) * 0.5 * math.pi * torch.sin(0.5 * math.pi * _float(t))


class DiscreteTimeSchedule(TokenSchedule):
    """D3PM's ``T`` steps (Austin et al. 2021): ``alpha(k / T) = alpha_bar_k = prod (1 - beta_j)``.

    Step ``k`` of the Markov chain keeps a token with probability ``1 - beta_k`` (and otherwise
    redraws it from the process's noise), so the cumulative product of the one-step matrices
    ``Q_1 ... Q_k`` has the closed form of the process at ``alpha_bar_k``. Between grid points
    ``alpha`` is linear in ``t`` (``alpha'`` is constant on ``((k - 1) / T, k / T]``), so the
    continuous-time tools also accept this schedule.
    """

    def __init__(self, betas: Tensor, config: dict | None = None):
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.ndim != 1 or len(betas) < 1:
            raise ValueError("betas must be a non-empty 1-D sequence")
        if not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError("every beta must lie in (0, 1]")
        self.T = len(betas)
        self.betas = betas
        self.alpha_bar = torch.cat(
            [torch.ones(1, dtype=torch.float64), torch.cumprod(1 - betas, 0)]
        )
        self._config = config or {"kind": "discrete", "betas": betas.tolist()}

    @classmethod
    def absorbing(cls, T: int = 1000) -> DiscreteTimeSchedule:
        """D3PM absorbing: ``beta_k = 1 / (T - k + 1)``, so ``alpha_bar_k = 1 - k / T``."""
        k = torch.arange(1, T + 1, dtype=torch.float64)
        return cls(1.0 / (T - k + 1), {"kind": "d3pm-absorbing", "T": T})

    @classmethod
    def cosine(cls, T: int = 1000, s: float = 0.008) -> DiscreteTimeSchedule:
        """D3PM uniform: ``alpha_bar_k = f(k/T) / f(0)``, ``f(u) = cos((u + s) / (1 + s) pi / 2)``
        (Austin et al. use the cosine schedule of Nichol & Dhariwal for the uniform process;
        ``beta_T`` is capped at 0.999 so ``alpha_bar_T > 0``)."""
        u = torch.arange(T + 1, dtype=torch.float64) / T
        f = torch.cos((u + s) / (1 + s) * math.pi / 2)
        betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
        return cls(betas, {"kind": "d3pm-cosine", "T": T, "s": s})

    def _segment(self, t: Tensor) -> tuple[Tensor, Tensor]:
        pos = _float(t).clamp(0.0, 1.0) * self.T
        hi = torch.ceil(pos).clamp(1, self.T).long()
        return hi, pos - (hi - 1)

    def alpha(self, t: Tensor) -> Tensor:
        hi, frac = self._segment(t)
        ab = self.alpha_bar.to(device=t.device, dtype=_float(t).dtype)
        return ab[hi - 1] + frac * (ab[hi] - ab[hi - 1])

    def alpha_prime(self, t: Tensor) -> Tensor:
        hi, _ = self._segment(t)
        ab = self.alpha_bar.to(device=t.device, dtype=_float(t).dtype)
        return (ab[hi] - ab[hi - 1]) * self.T


def _float(t: Tensor | float) -> Tensor:
    t = torch.as_tensor(t)
    return t if t.is_floating_point() else t.to(torch.get_default_dtype())


TOKEN_SCHEDULES: dict[str, Callable[..., TokenSchedule]] = {
    "log-linear": LogLinearSchedule,
    "linear": LinearSchedule,
    "cosine": CosineSchedule,
    "d3pm-absorbing": DiscreteTimeSchedule.absorbing,
    "d3pm-cosine": DiscreteTimeSchedule.cosine,
}


def make_token_schedule(kind: str, **kwargs) -> TokenSchedule:
    """Build a token schedule by name: ``log-linear`` (``eps``), ``linear`` (``sigma_max``),
    ``cosine`` (``eps``), ``d3pm-absorbing`` (``T``), ``d3pm-cosine`` (``T``, ``s``) or
    ``discrete`` (``betas``)."""
    if kind == "discrete":
        return DiscreteTimeSchedule(torch.tensor(kwargs["betas"], dtype=torch.float64))
    if kind not in TOKEN_SCHEDULES:
        names = ", ".join(TOKEN_SCHEDULES)
        raise ValueError(f"unknown token schedule {kind!r}: choose one of {names}")
    try:
        return TOKEN_SCHEDULES[kind](**kwargs)
    except TypeError as e:
        raise ValueError(f"bad options for token schedule {kind!r}: {e}") from None


def token_schedule_from_config(cfg: dict) -> TokenSchedule:
    """Inverse of :meth:`TokenSchedule.config`."""
    cfg = dict(cfg)
    return make_token_schedule(cfg.pop("kind"), **cfg)
