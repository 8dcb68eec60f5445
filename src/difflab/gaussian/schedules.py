"""Noise schedules: maps from time to ``(alpha(t), sigma(t))`` in ``x_t = alpha x_0 + sigma eps``.

Every schedule in difflab is a continuous curve on ``t in [0, 1]`` with ``t = 0`` the data
(``alpha = 1, sigma = 0``) and ``t = 1`` the prior. Discrete-time schedules (DDPM betas,
seed 001) are the same object: step ``i in 1..T`` sits at ``t = i / T`` and the curve between grid
points interpolates ``log alpha_bar`` linearly, so it is exact on the grid and monotone between.

Every schedule of the library lives here, and :data:`SCHEDULES` names them: DDPM betas, VP curves
given by their log-SNR, Song et al.'s VP, sub-VP and VE SDEs (whose dynamics are in ``sde.py``)
and Karras et al.'s EDM schedule (its training distribution and loss are in ``edm.py``). This is
the bottom of ``gaussian/``: it imports nothing from the package.

Notation (docs/design.md): ``alpha_bar_i = prod_{s<=i} (1 - beta_s)``; in continuous time
``alpha(t)``, ``sigma(t)``, ``lambda(t) = log(alpha^2 / sigma^2)`` (the log signal-to-noise ratio,
seed 002) and the VE noise level ``sigma_ve = sigma / alpha``.
"""

from __future__ import annotations

import inspect
import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor

Spacing = Literal["linspace", "leading", "trailing"]


def broadcast(a: Tensor, x: Tensor) -> Tensor:
    """Reshape a per-sample ``(B,)`` or scalar tensor (a schedule value such as ``alpha(t)``) to
    broadcast against ``x`` of ``(B, ...)``, in ``x``'s dtype and on its device."""
    a = a.to(dtype=x.dtype, device=x.device)
    if a.ndim == 0:
        return a
    return a.reshape(a.shape[0], *([1] * (x.ndim - 1)))


class Schedule(ABC):
    """A forward process ``q(x_t | x_0) = N(alpha(t) x_0, sigma(t)^2 I)`` on ``t in [0, 1]``."""

    #: Number of training steps for a discrete-time schedule, ``None`` for a continuous one.
    T: int | None = None

    @abstractmethod
    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``(alpha(t), sigma(t))`` elementwise, in float64-safe precision of ``t``."""

    @abstractmethod
    def t_of_log_snr(self, log_snr: Tensor) -> Tensor:
        """Inverse of ``lambda(t)``: the time at which the log-SNR equals ``log_snr``."""

    def derivatives(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """``(d alpha / dt, d sigma / dt)`` at ``t``, float64: by automatic differentiation of
        :meth:`alpha_sigma` (also inside ``torch.inference_mode``), unless a schedule knows them
        in closed form. A discrete schedule's curve is piecewise smooth in ``t``; at a grid
        point ``i / T`` this is one of its one-sided derivatives."""
        with torch.inference_mode(False), torch.enable_grad():
            t_ = torch.as_tensor(t, dtype=torch.float64).detach().clone().requires_grad_(True)
            alpha, sigma = self.alpha_sigma(t_)
            grads = [
                torch.autograd.grad(y.sum(), t_, retain_graph=True, allow_unused=True)[0]
                if y.requires_grad
                else None
                for y in (alpha, sigma)
            ]
        d_alpha, d_sigma = (torch.zeros_like(t_) if g is None else g for g in grads)
        return d_alpha.detach(), d_sigma.detach()

    def log_snr(self, t: Tensor) -> Tensor:
        """``lambda(t) = log(alpha(t)^2 / sigma(t)^2)``; ``+inf`` at ``t = 0``."""
        alpha, sigma = self.alpha_sigma(t)
        return 2.0 * (torch.log(alpha) - torch.log(sigma))

    def sigma_ve(self, t: Tensor) -> Tensor:
        """VE/EDM noise level ``sigma(t) / alpha(t)`` of the rescaled variable ``x_t / alpha``."""
        alpha, sigma = self.alpha_sigma(t)
        return sigma / alpha

    def t_of_sigma_ve(self, sigma_ve: Tensor) -> Tensor:
        """Time at which ``sigma / alpha == sigma_ve`` (``lambda = -2 log sigma_ve``)."""
        return self.t_of_log_snr(-2.0 * torch.log(sigma_ve))

    @property
    def prior_std(self) -> float:
        """Standard deviation of the prior ``p(x_1)``: ``sqrt(alpha(1)^2 + sigma(1)^2)``.

        For unit-variance data this is the marginal std of ``x_1``: 1 for VP schedules,
        ``~sigma_max`` for VE ones.
        """
        alpha, sigma = self.alpha_sigma(torch.ones((), dtype=torch.float64))
        return float(torch.sqrt(alpha**2 + sigma**2))

    def timesteps(self, n: int, spacing: Spacing = "trailing") -> Tensor:
        """Decreasing sampling times ``t_0 = start > ... > t_{n-1} > t_n = 0`` (float64, n + 1).

        The sampling schedule is independent of the training schedule. For a discrete schedule
        of ``T`` steps the first ``n`` entries are grid points ``i / T`` (``i in 1..T``) chosen as
        in DDIM / diffusers, written here with 1-based ``i``:

        - ``trailing``: ``i = round(T - k T / n)``, ``k = 0..n-1``: starts at ``T``.
        - ``leading``: ``i = 1 + k (T // n)``: ends at ``i = 1``, starts below ``T``.
        - ``linspace``: ``round(linspace(T, 1, n))``: contains both ``T`` and ``1``.

        For a continuous schedule, ``n`` equal steps in ``t`` from 1 (``spacing`` only decides
        whether the grid is ``linspace(1, 0, n + 1)``, which every spacing gives here).
        The last entry is always exactly 0: the sampler's final step lands on the data.
        """
        if n < 1:
            raise ValueError(f"the number of sampling steps must be at least 1, got {n}")
        if self.T is None:
            return torch.linspace(1.0, 0.0, n + 1, dtype=torch.float64)
        T = self.T
        if n > T:
            raise ValueError(f"cannot take {n} sampling steps on a schedule of {T} steps")
        k = torch.arange(n, dtype=torch.float64)
        if spacing == "trailing":
            i = torch.round(T - k * T / n)
        elif spacing == "leading":
            i = 1 + (n - 1 - k) * (T // n)
        elif spacing == "linspace":  # ties round half to even, exactly as diffusers does
            i = torch.round(torch.linspace(0.0, T - 1.0, n, dtype=torch.float64)).flip(0) + 1
        else:
            raise ValueError(f"unknown spacing {spacing!r}: use linspace, leading or trailing")
        return torch.cat([i / T, torch.zeros(1, dtype=torch.float64)])

    def config(self) -> dict:
        """A JSON-serialisable description from which :func:`make_schedule` rebuilds it."""
        return dict(self._config)

    _config: dict


# --------------------------------------------------------------------------------------------
# Discrete time: betas
# --------------------------------------------------------------------------------------------


class DiscreteSchedule(Schedule):
    """DDPM schedule from betas ``beta_1..beta_T`` (seed 001): ``alpha_bar_i = prod (1 - beta_s)``.

    ``t = i / T``; ``log alpha_bar`` is linear in ``t`` between grid points, with
    ``alpha_bar(0) = 1``, so ``alpha(t) = sqrt(alpha_bar(t))``, ``sigma = sqrt(1 - alpha_bar)``.
    """

    def __init__(self, betas: Tensor, config: dict | None = None):
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.ndim != 1 or len(betas) < 1:
            raise ValueError("betas must be a non-empty 1-D sequence")
        if not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError("every beta must lie in (0, 1)")
        self.T = len(betas)
        self.betas = betas
        self.alphas = 1.0 - betas
        self.alpha_bar = torch.cumprod(self.alphas, 0)
        # log alpha_bar on the grid i = 0..T (alpha_bar_0 = 1), decreasing.
        self._log_ab = torch.cat([torch.zeros(1, dtype=torch.float64), torch.log(self.alpha_bar)])
        # (log alpha_bar_i, its slope to i + 1) per device, made once
        self._log_ab_on: dict[torch.device, tuple[Tensor, Tensor]] = {}
        self._config = config or {"kind": "discrete", "betas": betas.tolist()}

    def _grid_on(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """``log alpha_bar_i`` (``i = 0..T``) and the slopes ``la_{i+1} - la_i`` (``i < T``) on
        ``device``, copied once, then reused."""
        if device not in self._log_ab_on:
            la = self._log_ab.to(device)
            self._log_ab_on[device] = (la, la[1:] - la[:-1])
        return self._log_ab_on[device]

    def _log_alpha_bar(self, t: Tensor) -> Tensor:
        pos = t.to(torch.float64).clamp(0.0, 1.0) * self.T
        lo = pos.floor().clamp(max=self.T - 1).long()
        la, slope = self._grid_on(t.device)
        return la[lo] + (pos - lo) * slope[lo]

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        log_ab = self._log_alpha_bar(t)
        alpha = torch.exp(0.5 * log_ab)
        sigma = torch.sqrt(-torch.expm1(log_ab))
        return alpha.to(_float(t)), sigma.to(_float(t))

    def t_of_log_snr(self, log_snr: Tensor) -> Tensor:
        # alpha_bar = sigmoid(lambda); invert the piecewise-linear log alpha_bar(t).
        target = torch.nn.functional.logsigmoid(log_snr.to(torch.float64))
        la = self._grid_on(log_snr.device)[0]
        # la is decreasing: search on its negation.
        idx = torch.searchsorted(-la, -target.clamp(min=la[-1], max=0.0)).clamp(1, self.T)
        lo, hi = la[idx - 1], la[idx]
        frac = (target.clamp(min=la[-1], max=0.0) - lo) / (hi - lo)
        return ((idx - 1 + frac) / self.T).to(_float(log_snr))


def linear_beta(
    T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02
) -> DiscreteSchedule:
    """DDPM's linear schedule (Ho et al. 2020): ``beta_i`` evenly spaced in ``[start, end]``."""
    betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
    cfg = {"kind": "linear", "T": T, "beta_start": beta_start, "beta_end": beta_end}
    return DiscreteSchedule(betas, cfg)


def cosine_beta(T: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> DiscreteSchedule:
    """Nichol & Dhariwal (2021): ``alpha_bar(t) = f(t)/f(0)``, ``f(t) = cos^2((t+s)/(1+s) pi/2)``.

    ``beta_i = min(1 - alpha_bar(i/T) / alpha_bar((i-1)/T), max_beta)``.
    """
    i = torch.arange(T + 1, dtype=torch.float64) / T
    f = torch.cos((i + s) / (1 + s) * math.pi / 2) ** 2
    betas = (1 - f[1:] / f[:-1]).clamp(max=max_beta)
    cfg = {"kind": "cosine", "T": T, "s": s, "max_beta": max_beta}
    return DiscreteSchedule(betas, cfg)


def constant_beta(T: int = 100, beta: float = 0.03) -> DiscreteSchedule:
    """Seed 001's example: ``beta_i = beta`` for every step."""
    cfg = {"kind": "constant", "T": T, "beta": beta}
    return DiscreteSchedule(torch.full((T,), beta, dtype=torch.float64), cfg)


# --------------------------------------------------------------------------------------------
# Continuous time: a variance-preserving schedule given by its log-SNR curve
# --------------------------------------------------------------------------------------------


class LogSNRSchedule(Schedule):
    """Variance-preserving schedule given by ``lambda(t)`` (seed 002: "any logSNR(t)").

    ``alpha^2 = sigmoid(lambda)``, ``sigma^2 = sigmoid(-lambda)``, so ``alpha^2 + sigma^2 = 1``.
    ``shift`` adds a constant to the curve, ``lambda'(t) = lambda(t) + shift`` (Hoogeboom et al.
    2023 use ``shift = 2 log(64 / d)`` for resolution ``d``). ``lambda`` must decrease in ``t``;
    its inverse is found by bisection unless ``inverse`` is given. ``t = 0`` is the data exactly.
    """

    def __init__(
        self,
        log_snr_fn: Callable[[Tensor], Tensor],
        inverse: Callable[[Tensor], Tensor] | None = None,
        shift: float = 0.0,
        config: dict | None = None,
    ):
        self._fn = log_snr_fn
        self._inverse = inverse
        self.shift = float(shift)
        self._config = config or {"kind": "logsnr-custom", "shift": shift}

    def log_snr(self, t: Tensor) -> Tensor:
        lam = self._fn(t.to(torch.float64)) + self.shift
        return torch.where(t == 0, torch.full_like(lam, math.inf), lam).to(_float(t))

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        lam = self.log_snr(t.to(torch.float64))
        alpha = torch.sqrt(torch.sigmoid(lam))
        sigma = torch.sqrt(torch.sigmoid(-lam))
        return alpha.to(_float(t)), sigma.to(_float(t))

    def t_of_log_snr(self, log_snr: Tensor) -> Tensor:
        lam = log_snr.to(torch.float64) - self.shift
        if self._inverse is not None:
            return self._inverse(lam).clamp(0.0, 1.0).to(_float(log_snr))
        lo = torch.zeros_like(lam)
        hi = torch.ones_like(lam)
        for _ in range(60):  # bisection to float64 resolution on [0, 1]
            mid = 0.5 * (lo + hi)
            above = self._fn(mid) > lam
            lo = torch.where(above, mid, lo)
            hi = torch.where(above, hi, mid)
        return (0.5 * (lo + hi)).to(_float(log_snr))


def cosine_logsnr(
    shift: float = 0.0, log_snr_min: float = -15.0, log_snr_max: float = 15.0
) -> LogSNRSchedule:
    """Continuous cosine schedule, ``lambda(t) = -2 log tan(pi t / 2)`` clipped to a range.

    Clipping follows Hoogeboom et al. (2023): ``t`` is mapped affinely so that ``lambda(0+) =
    log_snr_max`` and ``lambda(1) = log_snr_min`` (``alpha(1) > 0``, finite everywhere).
    """
    t_min = math.atan(math.exp(-0.5 * log_snr_max)) * 2 / math.pi
    t_max = math.atan(math.exp(-0.5 * log_snr_min)) * 2 / math.pi

    def fn(t: Tensor) -> Tensor:
        return -2.0 * torch.log(torch.tan(math.pi / 2 * (t_min + t * (t_max - t_min))))

    def inverse(lam: Tensor) -> Tensor:
        return (torch.atan(torch.exp(-0.5 * lam)) * 2 / math.pi - t_min) / (t_max - t_min)

    cfg = {"kind": "cosine-logsnr", "shift": shift, "log_snr_min": log_snr_min,
           "log_snr_max": log_snr_max}  # fmt: skip
    return LogSNRSchedule(fn, inverse, shift, cfg)


def linear_logsnr(
    shift: float = 0.0, log_snr_min: float = -10.0, log_snr_max: float = 10.0
) -> LogSNRSchedule:
    """``lambda(t)`` linear from ``log_snr_max`` at ``t = 0+`` to ``log_snr_min`` at ``t = 1``."""

    def fn(t: Tensor) -> Tensor:
        return log_snr_max + t * (log_snr_min - log_snr_max)

    def inverse(lam: Tensor) -> Tensor:
        return (lam - log_snr_max) / (log_snr_min - log_snr_max)

    cfg = {"kind": "linear-logsnr", "shift": shift, "log_snr_min": log_snr_min,
           "log_snr_max": log_snr_max}  # fmt: skip
    return LogSNRSchedule(fn, inverse, shift, cfg)


def sqrt_logsnr(shift: float = 0.0, s: float = 1e-4, log_snr_min: float = -15.0) -> LogSNRSchedule:
    """Diffusion-LM's ``sqrt`` schedule (Li et al. 2022), ``alpha(t)^2 = 1 - sqrt(u + s)``: it
    adds much noise at once (``lambda(0+) = log((1 - sqrt(s)) / sqrt(s)) ~ 4.6`` for the default
    ``s``), which text embeddings need, since a little noise does not change the nearest word.

    In log-SNR, ``lambda(u) = log((1 - sqrt(u + s)) / sqrt(u + s))``, with ``u = t u_max`` so that
    ``lambda(1) = log_snr_min`` (``alpha(1) > 0``); its inverse is closed:
    ``sqrt(u + s) = sigmoid(-lambda)``, ``u = sigmoid(-lambda)^2 - s``. ``t = 0`` is the data.
    """
    u_max = torch.sigmoid(torch.tensor(-log_snr_min, dtype=torch.float64)).item() ** 2 - s

    def fn(t: Tensor) -> Tensor:
        root = torch.sqrt(t * u_max + s)
        return torch.log1p(-root) - torch.log(root)

    def inverse(lam: Tensor) -> Tensor:
        return (torch.sigmoid(-lam) ** 2 - s) / u_max

    cfg = {"kind": "sqrt", "shift": shift, "s": s, "log_snr_min": log_snr_min}
    return LogSNRSchedule(fn, inverse, shift, cfg)


# --------------------------------------------------------------------------------------------
# Variance exploding
# --------------------------------------------------------------------------------------------


class VESchedule(Schedule):
    """Variance-exploding (NCSN / score SDE): ``alpha = 1``, ``sigma(t) = s_min (s_max/s_min)^t``.

    ``sigma(0) = 0`` by convention (the data), so a sampler's last step denoises completely.
    """

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0):
        if not 0 < sigma_min < sigma_max:
            raise ValueError("VE schedule needs 0 < sigma_min < sigma_max")
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self._config = {"kind": "ve", "sigma_min": sigma_min, "sigma_max": sigma_max}

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        t64 = t.to(torch.float64)
        sigma = self.sigma_min * (self.sigma_max / self.sigma_min) ** t64
        sigma = torch.where(t64 == 0, torch.zeros_like(sigma), sigma)
        return torch.ones_like(sigma).to(_float(t)), sigma.to(_float(t))

    def t_of_log_snr(self, log_snr: Tensor) -> Tensor:
        sigma = torch.exp(-0.5 * log_snr.to(torch.float64))
        t = torch.log(sigma / self.sigma_min) / math.log(self.sigma_max / self.sigma_min)
        return t.clamp(0.0, 1.0).to(_float(log_snr))


# --------------------------------------------------------------------------------------------
# Song et al.'s score SDEs (2021): VP with linear beta(t), and sub-VP
# --------------------------------------------------------------------------------------------


def _beta_integral(t: Tensor, beta_min: float, beta_max: float) -> Tensor:
    """``B(t) = int_0^t beta = beta_min t + (beta_max - beta_min) t^2 / 2``."""
    return beta_min * t + 0.5 * (beta_max - beta_min) * t**2


def _t_of_beta_integral(b: Tensor, beta_min: float, beta_max: float) -> Tensor:
    """Inverse of :func:`_beta_integral` on ``t >= 0`` (the root of the quadratic, written as
    ``2 B / (beta_min + sqrt(beta_min^2 + 2 (beta_max - beta_min) B))`` to avoid cancellation)."""
    return 2.0 * b / (beta_min + torch.sqrt(beta_min**2 + 2.0 * (beta_max - beta_min) * b))


def _check_betas(beta_min: float, beta_max: float) -> None:
    if not 0 < beta_min <= beta_max:
        raise ValueError(f"need 0 < beta_min <= beta_max, got {beta_min} and {beta_max}")


def vp_linear(beta_min: float = 0.1, beta_max: float = 20.0) -> LogSNRSchedule:
    """Song et al.'s VP SDE, ``beta(t) = beta_min + t (beta_max - beta_min)``, as a VP schedule:
    ``alpha^2 = exp(-B(t))``, so ``lambda(t) = -log(exp(B(t)) - 1)`` and
    ``B = log(1 + exp(-lambda))`` inverts it. With the defaults, DDPM's linear betas
    ``linspace(1e-4, 0.02, 1000)`` are ``beta(t) / T`` on a grid of ``T = 1000`` steps: this is
    their continuous-time limit (``log alpha_bar`` agrees to ``O(1 / T)``)."""
    _check_betas(beta_min, beta_max)

    def fn(t: Tensor) -> Tensor:
        return -torch.log(torch.expm1(_beta_integral(t, beta_min, beta_max)))

    def inverse(lam: Tensor) -> Tensor:
        return _t_of_beta_integral(torch.nn.functional.softplus(-lam), beta_min, beta_max)

    cfg = {"kind": "vp-linear", "beta_min": beta_min, "beta_max": beta_max}
    return LogSNRSchedule(fn, inverse, 0.0, cfg)


class SubVPSchedule(Schedule):
    """Marginals of Song et al.'s sub-VP SDE: ``alpha = exp(-B/2)``, ``sigma = 1 - exp(-B)`` with
    ``B(t) = beta_min t + (beta_max - beta_min) t^2 / 2``; ``sigma^2 <= 1 - alpha^2`` (hence
    "sub"). ``lambda = -B - 2 log(1 - exp(-B))``; with ``c = exp(-lambda)`` the inverse is
    ``exp(B) = 1 + c/2 + sqrt(c + c^2/4)`` (the root in ``B > 0`` of a quadratic in ``exp(-B)``).
    """

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0):
        _check_betas(beta_min, beta_max)
        self.beta_min, self.beta_max = float(beta_min), float(beta_max)
        self._config = {"kind": "sub-vp", "beta_min": beta_min, "beta_max": beta_max}

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        b = _beta_integral(t.to(torch.float64), self.beta_min, self.beta_max)
        return torch.exp(-0.5 * b).to(_float(t)), (-torch.expm1(-b)).to(_float(t))

    def t_of_log_snr(self, log_snr: Tensor) -> Tensor:
        c = torch.exp(-log_snr.to(torch.float64))
        b = torch.log(1.0 + 0.5 * c + torch.sqrt(c + 0.25 * c**2))
        t = _t_of_beta_integral(b, self.beta_min, self.beta_max).clamp(0.0, 1.0)
        return t.to(_float(log_snr))


# --------------------------------------------------------------------------------------------
# EDM (Karras et al. 2022)
# --------------------------------------------------------------------------------------------


class EDMSchedule(Schedule):
    """EDM's VE process with Karras time: ``alpha = 1``, ``sigma(t) = sigma_max t^rho``.

    ``sigma`` is continuous and increasing on ``[0, 1]`` with ``sigma(0) = 0`` (the data), so every
    level in ``(0, sigma_max]`` is a time (training with log-normal levels, ``edm.py``, needs
    that; :class:`VESchedule` starts at ``sigma_min``). ``sigma_min`` only shapes the sampling
    grid: :meth:`timesteps` is Karras et al.'s (eq. 5)

        sigma_i = (sigma_max^(1/rho) + i / (n - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho,

    ``i = 0..n-1``, then ``sigma_n = 0``; in time, ``t_i`` falls linearly from 1 to
    ``(sigma_min / sigma_max)^(1/rho)``. Defaults: ``sigma_min = 0.002``, ``sigma_max = 80``,
    ``rho = 7``.
    """

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0):
        if not 0 < sigma_min < sigma_max or rho <= 0:
            raise ValueError("EDM schedule needs 0 < sigma_min < sigma_max and rho > 0")
        self.sigma_min, self.sigma_max, self.rho = float(sigma_min), float(sigma_max), float(rho)
        self._config = {"kind": "edm", "sigma_min": sigma_min, "sigma_max": sigma_max, "rho": rho}

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        sigma = self.sigma_max * t.to(torch.float64).clamp(0.0, 1.0) ** self.rho
        return torch.ones_like(sigma).to(_float(t)), sigma.to(_float(t))

    def t_of_log_snr(self, log_snr: Tensor) -> Tensor:
        sigma = torch.exp(-0.5 * log_snr.to(torch.float64))
        t = (sigma / self.sigma_max) ** (1.0 / self.rho)
        return t.clamp(0.0, 1.0).to(_float(log_snr))

    def timesteps(self, n: int, spacing: Spacing = "trailing") -> Tensor:
        """Karras et al.'s ``n`` noise levels as times, then 0 (``n + 1`` float64 entries);
        ``spacing`` is ignored (a continuous schedule)."""
        del spacing
        if n < 1:
            raise ValueError(f"the number of sampling steps must be at least 1, got {n}")
        t_min = (self.sigma_min / self.sigma_max) ** (1.0 / self.rho)
        ts = 1.0 + torch.linspace(0.0, 1.0, n, dtype=torch.float64) * (t_min - 1.0)
        return torch.cat([ts, torch.zeros(1, dtype=torch.float64)])


# --------------------------------------------------------------------------------------------
# The linear path of flow matching / rectified flow
# --------------------------------------------------------------------------------------------


class LinearPathSchedule(Schedule):
    """The straight path between data and noise, ``x_t = (1 - t) x_0 + t eps``: ``alpha = 1 - t``,
    ``sigma = t`` (rectified flow, Liu et al. 2023; the conditional optimal-transport path of
    flow matching with ``sigma_min = 0``, Lipman et al. 2023; seed 000 points to both).

    ``lambda(t) = 2 log((1 - t) / t)``, inverted by ``t = 1 / (1 + exp(lambda / 2))``. Neither
    VP nor VE: ``alpha^2 + sigma^2 = 1 - 2 t (1 - t)`` dips to 1/2 at ``t = 1/2``. At ``t = 1``
    the path is pure noise, ``alpha = 0`` (``lambda = -inf``, ``sigma_ve = inf``): there
    ``x_0 = x_t - t u`` and ``eps = x_t + (1 - t) u`` follow from a velocity prediction ``u``
    (parameterization.py) without dividing by ``alpha``, and DDIM's step from ``t`` to ``s``,
    ``x_s = (1 - s) x0_hat + s eps_hat = x_t + (s - t) u``, is exactly Euler's method on the flow
    ODE ``dx/dt = u``. Samplers that work in ``x / alpha`` or in the log-SNR need
    ``alpha > 0``, so the time grids of this schedule start at :attr:`T_MAX` (a continuous
    schedule's grid otherwise starts at 1): ``alpha = 1e-3``, a start whose missing data
    component is below the data's quantisation.
    """

    #: Where sampling grids start: ``alpha(T_MAX) = 1e-3``, ``lambda = 2 log(1e-3 / 0.999)``.
    T_MAX = 0.999

    def __init__(self) -> None:
        self._config = {"kind": "rectified-flow"}

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        t64 = t.to(torch.float64)
        return (1.0 - t64).to(_float(t)), t64.to(_float(t))

    def derivatives(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """``(d alpha / dt, d sigma / dt) = (-1, 1)`` everywhere (float64)."""
        ones = torch.ones_like(torch.as_tensor(t, dtype=torch.float64))
        return -ones, ones

    def t_of_log_snr(self, log_snr: Tensor) -> Tensor:
        t = torch.sigmoid(-0.5 * log_snr.to(torch.float64))
        return t.clamp(0.0, 1.0).to(_float(log_snr))

    def timesteps(self, n: int, spacing: Spacing = "trailing") -> Tensor:
        """``n`` equal steps in ``t`` from :attr:`T_MAX` to 0 (``n + 1`` float64 entries);
        ``spacing`` is ignored (a continuous schedule)."""
        del spacing
        if n < 1:
            raise ValueError(f"the number of sampling steps must be at least 1, got {n}")
        return torch.linspace(self.T_MAX, 0.0, n + 1, dtype=torch.float64)


def _float(t: Tensor) -> torch.dtype:
    return t.dtype if t.is_floating_point() else torch.get_default_dtype()


# --------------------------------------------------------------------------------------------
# The registry: every schedule by name, with the parameters its factory takes
# --------------------------------------------------------------------------------------------

SCHEDULES: dict[str, Callable[..., Schedule]] = {
    "linear": linear_beta,
    "cosine": cosine_beta,
    "constant": constant_beta,
    "cosine-logsnr": cosine_logsnr,
    "linear-logsnr": linear_logsnr,
    "sqrt": sqrt_logsnr,
    "vp-linear": vp_linear,
    "sub-vp": SubVPSchedule,
    "ve": VESchedule,
    "edm": EDMSchedule,
    "rectified-flow": LinearPathSchedule,
}
"""Schedule factories by name: discrete ``linear``, ``cosine``, ``constant`` (``T`` steps),
continuous VP ``cosine-logsnr``, ``linear-logsnr`` (``shift``), Diffusion-LM's ``sqrt``, Song et
al.'s ``vp-linear``, ``sub-vp`` and ``ve``, Karras et al.'s ``edm``, and the linear path
``rectified-flow`` of flow matching. :func:`schedule_parameters` lists what each takes."""


def _known(kind: str) -> Callable[..., Schedule]:
    if kind not in SCHEDULES:
        raise ValueError(f"unknown schedule {kind!r}: choose one of {', '.join(SCHEDULES)}")
    return SCHEDULES[kind]


def schedule_parameters(kind: str) -> dict[str, Any]:
    """The keyword parameters of the schedule ``kind`` with their defaults, in the order of its
    factory's signature, e.g. ``{"T": 1000, "beta_start": 1e-4, "beta_end": 0.02}`` for
    ``linear``. Raises ``ValueError`` for a name not in :data:`SCHEDULES`."""
    params = inspect.signature(_known(kind)).parameters.values()
    return {p.name: p.default for p in params}


def make_schedule(kind: str, **params: Any) -> Schedule:
    """The schedule ``SCHEDULES[kind](**params)``; any parameter left out takes its default.

    Raises ``ValueError`` (one line, listing the choices) for an unknown name or a parameter
    the schedule does not take (:func:`schedule_parameters`)."""
    factory, allowed = _known(kind), schedule_parameters(kind)
    unknown = [name for name in params if name not in allowed]
    if unknown:
        raise ValueError(
            f"schedule {kind!r} takes no parameter {', '.join(unknown)}: "
            f"its parameters are {', '.join(allowed) or 'none'}"
        )
    return factory(**params)


def schedule_from_config(cfg: dict) -> Schedule:
    """Inverse of :meth:`Schedule.config`: ``{"kind": name, **params}`` for a schedule of
    :data:`SCHEDULES`, or ``{"kind": "discrete", "betas": [...]}`` for a
    :class:`DiscreteSchedule` built from its betas."""
    cfg = dict(cfg)
    kind = cfg.pop("kind")
    if kind == "discrete":
        return DiscreteSchedule(torch.tensor(cfg["betas"], dtype=torch.float64))
    return make_schedule(kind, **cfg)
