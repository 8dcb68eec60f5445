"""Parameterizations: what the network predicts, and exact conversions among eps, x_0, v, score.

With ``x_t = alpha x_0 + sigma eps`` (any schedule, VP or not):

- ``eps``:   ``x_0 = (x_t - sigma eps) / alpha``
- ``x0``:    ``eps = (x_t - alpha x_0) / sigma``
- ``v``:     ``v = alpha eps - sigma x_0`` (Salimans & Ho 2022), so
  ``x_0 = (alpha x_t - sigma v) / (alpha^2 + sigma^2)`` and
  ``eps = (sigma x_t + alpha v) / (alpha^2 + sigma^2)``
- ``score``: ``grad log q(x_t) = -eps / sigma`` (seed 002: the predicted noise is a scaled score)
- ``flow``: the velocity of the path, ``u = dx_t / dt = alpha' x_0 + sigma' eps`` (flow matching,
  Lipman et al. 2023; rectified flow, Liu et al. 2023; ``u = eps - x_0`` on the linear path
  ``alpha = 1 - t, sigma = t``). With ``det = alpha sigma' - sigma alpha'`` (``= 1`` on the
  linear path) it converts exactly: ``x_0 = (sigma' x_t - sigma u) / det`` and
  ``eps = (alpha u - alpha' x_t) / det`` (:meth:`Prediction.from_velocity`,
  :meth:`Prediction.velocity`). It needs the schedule's derivatives at ``t``
  (:meth:`Schedule.derivatives`), so like ``edm`` it is a kind of network output for
  :class:`Denoiser`, not a form of :class:`Prediction`
- ``edm``: Karras et al. (2022)'s preconditioning, ``x_0 = c_skip x~ + c_out F(c_in x~, c_noise)``
  in the VE variable ``x~ = x_t / alpha`` (:func:`edm_preconditioning`); a kind of network
  output for :class:`Denoiser`, not a form of :class:`Prediction`

A :class:`Denoiser` couples a network with a schedule and a parameterization and returns a
:class:`Prediction`, from which every sampler reads whichever form it needs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, Protocol

import torch
from torch import Tensor

from difflab.gaussian.schedules import Schedule, broadcast

Kind = Literal["eps", "x0", "v", "score"]
KINDS: tuple[str, ...] = ("eps", "x0", "v", "score")
#: What a :class:`Denoiser`'s network may output: a raw prediction of one of :data:`KINDS`,
#: ``"flow"``, the velocity ``u = dx_t / dt`` of the path, or ``"edm"``, the output ``F`` of
#: Karras et al.'s preconditioning (:func:`edm_preconditioning`).
PREDICTIONS: tuple[str, ...] = (*KINDS, "flow", "edm")


class Prediction:
    """A denoiser's answer at ``x_t``: the data estimate ``x0`` and the noise estimate ``eps``.

    It holds what the denoiser produced (``x0``, ``eps`` or both); the other is derived from
    ``x_t = alpha x0 + sigma eps`` on first use and kept, so a sampler that reads only one form
    pays for no conversion. ``alpha`` and ``sigma`` broadcast to ``x_t``; ``v`` and ``score``
    are derived.
    """

    __slots__ = ("_eps", "_x0", "alpha", "sigma", "x_t")

    def __init__(
        self,
        x_t: Tensor,
        alpha: Tensor,
        sigma: Tensor,
        x0: Tensor | None = None,
        eps: Tensor | None = None,
    ):
        if x0 is None and eps is None:
            raise ValueError("a Prediction needs x0, eps or both")
        self.x_t, self.alpha, self.sigma = x_t, alpha, sigma
        self._x0, self._eps = x0, eps

    @property
    def x0(self) -> Tensor:
        """The data estimate; ``(x_t - sigma eps) / alpha`` if the denoiser gave ``eps``."""
        if self._x0 is None:  # one fresh tensor, two passes
            self._x0 = torch.addcmul(self.x_t, self.sigma, self._eps, value=-1).div_(self.alpha)
        return self._x0

    @property
    def eps(self) -> Tensor:
        """The noise estimate; ``(x_t - alpha x0) / sigma`` if the denoiser gave ``x0``."""
        if self._eps is None:
            self._eps = torch.addcmul(self.x_t, self.alpha, self._x0, value=-1).div_(self.sigma)
        return self._eps

    @property
    def given(self) -> Literal["x0", "eps"]:
        """The form the denoiser produced (``"eps"`` when it gave both): combining predictions
        at the same ``x_t`` linearly (guidance) in this form needs no conversion."""
        return "eps" if self._eps is not None else "x0"

    @property
    def v(self) -> Tensor:
        """``v = alpha eps - sigma x_0``."""
        return self.alpha * self.eps - self.sigma * self.x0

    @property
    def score(self) -> Tensor:
        """``grad_x log q_t(x) = -eps / sigma``."""
        return -self.eps / self.sigma

    def as_kind(self, kind: Kind) -> Tensor:
        """The prediction in parameterization ``kind``."""
        if kind not in KINDS:
            raise ValueError(f"unknown parameterization {kind!r}: choose one of {KINDS}")
        return getattr(self, kind)

    @classmethod
    def from_output(
        cls, kind: Kind, out: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor
    ) -> Prediction:
        """A raw prediction of the given ``kind`` as a Prediction (exact conversions)."""
        alpha, sigma = broadcast(alpha, x_t), broadcast(sigma, x_t)
        if kind == "eps":
            return cls(x_t, alpha, sigma, eps=out)
        if kind == "x0":
            return cls(x_t, alpha, sigma, x0=out)
        if kind == "v":
            norm = alpha**2 + sigma**2
            x0 = (alpha * x_t - sigma * out) / norm
            return cls(x_t, alpha, sigma, x0=x0, eps=(sigma * x_t + alpha * out) / norm)
        if kind == "score":
            return cls(x_t, alpha, sigma, eps=-sigma * out)
        raise ValueError(f"unknown parameterization {kind!r}: choose one of {KINDS}")

    @classmethod
    def from_velocity(
        cls, u: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor, d_alpha: Tensor,
        d_sigma: Tensor,
    ) -> Prediction:  # fmt: skip
        """A velocity ``u = alpha' x_0 + sigma' eps`` as a Prediction: the solution of the two
        linear equations ``x_t = alpha x_0 + sigma eps`` and ``u = alpha' x_0 + sigma' eps``,
        ``x_0 = (sigma' x_t - sigma u) / det``, ``eps = (alpha u - alpha' x_t) / det`` with
        ``det = alpha sigma' - sigma alpha'`` (no division by ``alpha``: finite at ``alpha = 0``).
        ``d_alpha``, ``d_sigma`` are the schedule's derivatives at ``t`` (per sample or 0-d)."""
        alpha, sigma = broadcast(alpha, x_t), broadcast(sigma, x_t)
        d_alpha, d_sigma = broadcast(d_alpha, x_t), broadcast(d_sigma, x_t)
        det = alpha * d_sigma - sigma * d_alpha
        x0 = (d_sigma * x_t - sigma * u) / det
        return cls(x_t, alpha, sigma, x0=x0, eps=(alpha * u - d_alpha * x_t) / det)

    def velocity(self, d_alpha: Tensor, d_sigma: Tensor) -> Tensor:
        """``u = alpha' x_0 + sigma' eps``, the velocity of the path at ``x_t``, for the
        schedule's derivatives ``d_alpha``, ``d_sigma`` at ``t``."""
        return broadcast(d_alpha, self.x_t) * self.x0 + broadcast(d_sigma, self.x_t) * self.eps

    def with_x0(self, x0: Tensor) -> Prediction:
        """The same point with a replaced data estimate; ``eps`` follows from it (used by
        thresholding, which edits ``x_0`` and must keep ``x_t = alpha x0 + sigma eps``)."""
        return Prediction(self.x_t, self.alpha, self.sigma, x0=x0)

    def with_eps(self, eps: Tensor) -> Prediction:
        """The same point with a replaced noise estimate; ``x0`` follows from it (guidance)."""
        return Prediction(self.x_t, self.alpha, self.sigma, eps=eps)


def target(kind: Kind, x0: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """The regression target of a network of parameterization ``kind`` for ``(x_0, eps)``."""
    alpha, sigma = broadcast(alpha, x0), broadcast(sigma, x0)
    if kind == "eps":
        return eps
    if kind == "x0":
        return x0
    if kind == "v":
        return alpha * eps - sigma * x0
    if kind == "score":
        return -eps / sigma
    raise ValueError(f"unknown parameterization {kind!r}: choose one of {KINDS}")


def velocity_target(x0: Tensor, eps: Tensor, d_alpha: Tensor, d_sigma: Tensor) -> Tensor:
    """The regression target of a ``flow`` network for ``(x_0, eps)``: ``u = alpha' x_0 +
    sigma' eps`` (``eps - x_0`` on the linear path)."""
    return broadcast(d_alpha, x0) * x0 + broadcast(d_sigma, x0) * eps


AlphaSigma = tuple[Tensor, Tensor]
"""``(alpha(t), sigma(t))``, each broadcastable to ``x_t`` (0-d when shared by the batch)."""


class DenoiserFn(Protocol):
    """What every sampler accepts: a schedule and ``(x_t, t, cond) -> Prediction``.

    :class:`Denoiser`, the guidance and thresholding wrappers and the exact oracles all satisfy it.
    ``t`` is a ``(B,)`` tensor of times in ``[0, 1]``. ``alpha_sigma``, when given, is the
    schedule's ``(alpha(t), sigma(t))`` at those times, computed once for a whole sampling grid
    by the caller: a denoiser may use it instead of evaluating its schedule again, and a wrapper
    passes it on.
    """

    schedule: Schedule

    def __call__(
        self,
        x_t: Tensor,
        t: Tensor,
        cond: dict[str, Any] | None = None,
        *,
        alpha_sigma: AlphaSigma | None = None,
    ) -> Prediction: ...


def edm_preconditioning(
    sigma_ve: Tensor, sigma_data: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """EDM's ``(c_skip, c_out, c_in, c_noise)`` at the noise level ``sigma = sigma_ve`` (Karras et
    al. 2022, Table 1, with ``s_d = sigma_data``):

        c_skip = s_d^2 / (sigma^2 + s_d^2),     c_out = sigma s_d / sqrt(sigma^2 + s_d^2),
        c_in = 1 / sqrt(sigma^2 + s_d^2),       c_noise = log(sigma) / 4,

    so that ``D(x~; sigma) = c_skip x~ + c_out F(c_in x~, c_noise)`` for ``x~ = x_0 + sigma eps``:
    for data of std ``s_d`` the network's input ``c_in x~`` and its regression target
    ``(x_0 - c_skip x~) / c_out`` both have unit variance.
    """
    total = sigma_ve**2 + sigma_data**2
    c_in = total.rsqrt()
    return sigma_data**2 / total, sigma_ve * sigma_data * c_in, c_in, sigma_ve.log() / 4.0


class Denoiser:
    """A network (or any function) plus its schedule and parameterization.

    ``net(x_t, c_noise, **cond)`` returns a raw prediction of kind ``prediction``;
    ``c_noise = 1000 t`` (the DDPM timestep scale, so sinusoidal embeddings see integers on the
    training grid).

    ``prediction="flow"``: the network's output is the velocity ``u = alpha' x_0 + sigma' eps``
    at ``t``, converted with the schedule's derivatives there (:meth:`Prediction.from_velocity`).

    ``prediction="edm"`` is EDM's preconditioning (:func:`edm_preconditioning`, ``sigma_data``):
    the network is called as ``net(c_in x_t / alpha, c_noise, **cond)`` with
    ``c_noise = log(sigma_ve) / 4`` and its output ``F`` gives ``x0 = c_skip x_t / alpha + c_out F``
    (``x_t / alpha = x_0 + sigma_ve eps`` is the VE variable, so this works with every schedule).
    """

    def __init__(
        self,
        net: Callable[..., Tensor],
        schedule: Schedule,
        prediction: Kind | Literal["flow", "edm"] = "eps",
        sigma_data: float = 0.5,
    ):
        if prediction not in PREDICTIONS:
            raise ValueError(
                f"unknown parameterization {prediction!r}: choose one of {PREDICTIONS}"
            )
        self.net = net
        self.schedule = schedule
        self.prediction: Kind | Literal["flow", "edm"] = prediction
        self.sigma_data = float(sigma_data)

    def __call__(
        self,
        x_t: Tensor,
        t: Tensor,
        cond: dict[str, Any] | None = None,
        *,
        alpha_sigma: AlphaSigma | None = None,
    ) -> Prediction:
        t = t.expand(x_t.shape[0]) if t.ndim == 0 else t
        alpha, sigma = alpha_sigma or self.schedule.alpha_sigma(t.to(torch.float64))
        if self.prediction == "edm":
            c_skip, c_out, c_in, c_noise = edm_preconditioning(sigma / alpha, self.sigma_data)
            x_ve = x_t / broadcast(alpha, x_t)
            c_noise = c_noise.to(x_t.dtype).expand(t.shape)  # (B,) as for every network
            out = self.net(broadcast(c_in, x_t) * x_ve, c_noise, **(cond or {}))
            x0 = broadcast(c_skip, x_t) * x_ve + broadcast(c_out, x_t) * out
            return Prediction.from_output("x0", x0, x_t, alpha, sigma)
        out = self.net(x_t, (1000.0 * t).to(x_t.dtype), **(cond or {}))
        if self.prediction == "flow":
            d_alpha, d_sigma = self.schedule.derivatives(t.to(torch.float64))
            return Prediction.from_velocity(out, x_t, alpha, sigma, d_alpha, d_sigma)
        return Prediction.from_output(self.prediction, out, x_t, alpha, sigma)
