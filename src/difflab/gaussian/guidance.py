"""Guidance and thresholding: wrappers that take a denoiser and return a denoiser.

Every wrapper here satisfies :class:`~difflab.gaussian.parameterization.DenoiserFn` (a
``schedule`` and ``__call__(x_t, t, cond) -> Prediction``), so every sampler runs them, and they
compose: ``DynamicThresholding(ClassifierFreeGuidance(denoiser, 3.0, null_label=10))``.

Notation (docs/design.md): ``x_t = alpha_t x_0 + sigma_t eps``; the score is
``grad log q_t(x_t) = -eps / sigma`` (seed 002), so a change of score ``delta`` is a change of
noise estimate ``-sigma delta``.

- **Classifier-free guidance** (Ho & Salimans 2022; seeds 000, 002, 004). With the conditional
  and unconditional noise estimates ``eps_c`` and ``eps_u`` of one network trained with
  conditioning dropout, ``grad log p_gamma(x_t | y) = (1 - gamma) grad log p(x_t) + gamma grad
  log p(x_t | y)`` becomes ``eps = (1 - gamma) eps_u + gamma eps_c`` (seeds 000 and 004, the
  "gamma" convention, ``gamma = 1`` is conditional sampling) or, with ``gamma = 1 + w``,
  ``eps = (1 + w) eps_c - w eps_u`` (seed 002, the "w" convention, ``w = 0`` is conditional).
- **Classifier guidance** (Dhariwal & Nichol 2021, Algorithm 2; seeds 000, 002, 004):
  ``grad log p(x_t) + s grad log p(y | x_t)`` becomes ``eps = eps_u - s sigma grad_x log
  p_phi(y | x_t, t)`` with a classifier ``p_phi`` trained on noisy inputs.
- **Thresholding** of the data estimate (Saharia et al. 2022, Imagen; seed 002): static clipping
  ``x_0 <- clip(x_0, -1, 1)`` and dynamic thresholding ``s = max(1, quantile(|x_0|, p))`` per
  sample, ``x_0 <- clip(x_0, -s, s) / s``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from difflab.gaussian.parameterization import AlphaSigma, DenoiserFn, Prediction

Convention = Literal["w", "gamma"]
CONVENTIONS: tuple[str, ...] = ("w", "gamma")

NoisyClassifierFn = Callable[[Tensor, Tensor], Tensor]
"""``classifier(x_t, t) -> (B, K)`` logits (or log-probabilities) of ``p(y | x_t, t)``; ``t`` is
the ``(B,)`` diffusion time of the denoiser's schedule. It must be differentiable in ``x_t``."""


class ClassifierFreeGuidance:
    """``eps = eps_c + (gamma - 1) (eps_c - eps_u)``: the guided denoiser of Ho & Salimans (2022).

    Args:
        denoiser: a conditional denoiser that also knows the null condition (trained with
            conditioning dropout, ``diffusion.cond_drop``).
        scale: ``w`` (convention ``"w"``: ``eps = (1 + w) eps_c - w eps_u``, ``w = 0`` is
            conditional sampling) or ``gamma`` (convention ``"gamma"``:
            ``eps = (1 - gamma) eps_u + gamma eps_c``, ``gamma = 1`` is conditional sampling).
        convention: ``"w"`` (seed 002) or ``"gamma"`` (seeds 000 and 004).
        null_label: the null class label; shorthand for ``null_cond={"class_labels": null_label}``.
        null_cond: the value each named entry of ``cond`` takes in the unconditional pass (e.g.
            the tokens of the empty caption), per example ``(B, ...)`` or one row ``(1, ...)`` /
            a scalar broadcast over the batch. Entries of ``cond`` not named here (e.g. a
            low-resolution image) go unchanged to both passes.

    The conditional and unconditional passes run as one network call on the batch
    ``[x_t; x_t]`` with conditions ``[cond; null]``. The combination is taken in the form the
    denoiser gave (``eps`` or ``x0``): its weights ``gamma`` and ``1 - gamma`` sum to one, so
    the same combination of the other form is what ``x_t = alpha x0 + sigma eps`` gives.
    """

    def __init__(
        self,
        denoiser: DenoiserFn,
        scale: float,
        *,
        convention: Convention = "w",
        null_label: int | None = None,
        null_cond: Mapping[str, Tensor | int | float] | None = None,
    ):
        if convention not in CONVENTIONS:
            raise ValueError(f"unknown guidance convention {convention!r}: choose 'w' or 'gamma'")
        if (null_label is None) == (null_cond is None):
            raise ValueError("give exactly one of null_label and null_cond")
        self.denoiser = denoiser
        self.schedule = denoiser.schedule
        self.scale = float(scale)
        self.convention: Convention = convention
        self.null_cond: dict[str, Tensor | int | float] = (
            {"class_labels": null_label} if null_cond is None else dict(null_cond)
        )
        if not self.null_cond:
            raise ValueError("null_cond must name at least one conditioning entry")

    @property
    def gamma(self) -> float:
        """The weight of the conditional estimate: ``gamma``, or ``1 + w`` in convention "w"."""
        return self.scale + 1.0 if self.convention == "w" else self.scale

    def __call__(
        self,
        x_t: Tensor,
        t: Tensor,
        cond: dict[str, Any] | None = None,
        *,
        alpha_sigma: AlphaSigma | None = None,
    ) -> Prediction:
        if not cond or any(key not in cond for key in self.null_cond):
            raise ValueError(
                "classifier-free guidance needs the condition "
                f"{sorted(self.null_cond)} in cond, got {sorted(cond or {})}"
            )
        B = x_t.shape[0]
        if alpha_sigma is not None:
            alpha_sigma = (_twice(alpha_sigma[0], B, "alpha"), _twice(alpha_sigma[1], B, "sigma"))
        both = self.denoiser(
            torch.cat([x_t, x_t]),
            _twice(t, B, "t"),
            self._paired_cond(cond, B),
            alpha_sigma=alpha_sigma,
        )
        # x0 and eps are affine in each other at the same x_t, so combining the form the
        # denoiser gave is exact for both; the other is derived only if a sampler asks for it
        form = both.given
        out = getattr(both, form)
        guided = out[:B] + (self.gamma - 1.0) * (out[:B] - out[B:])
        alpha, sigma = _first_half(both.alpha, B), _first_half(both.sigma, B)
        return Prediction(x_t, alpha, sigma, **{form: guided})

    def _paired_cond(self, cond: dict[str, Any], B: int) -> dict[str, Any]:
        """``cond`` for the batch ``[x_t; x_t]``: ``[cond; null]`` on the named entries,
        ``[value; value]`` on the other per-example tensors, anything else shared."""
        paired: dict[str, Any] = {}
        for key, value in cond.items():
            if key in self.null_cond:
                mine = _per_example(torch.as_tensor(value), B, key)
                null = torch.as_tensor(self.null_cond[key], dtype=mine.dtype, device=mine.device)
                paired[key] = torch.cat([mine, _per_example(null, B, key)])
            elif isinstance(value, Tensor) and value.ndim > 0 and value.shape[0] == B:
                paired[key] = torch.cat([value, value])
            else:
                paired[key] = value
        return paired


def likelihood_gradient(
    log_likelihood: Callable[[Tensor, Tensor], Tensor], x_t: Tensor, t: Tensor
) -> Tensor:
    """``grad_x sum_i log_likelihood(x, t)_i`` at ``x = x_t`` (``x_t``'s shape): ``log_likelihood``
    maps ``(x_t, t)`` to one log-likelihood ``log p(y | x_t, t)`` per row. The gradient is taken
    with autograd inside the samplers' ``torch.inference_mode``: ``x_t`` and ``t`` are cloned out
    of it into ordinary tensors first."""
    t = t.expand(x_t.shape[0]) if t.ndim == 0 else t
    with torch.inference_mode(False), torch.enable_grad():
        x = x_t.detach().clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(log_likelihood(x, t.detach().clone()).sum(), x)
    return grad


class ClassifierGuidance:
    """``eps = eps_hat - s sigma grad_x log p_phi(y | x_t, t)`` (Dhariwal & Nichol 2021).

    The target labels ``y`` are ``cond["class_labels"]``. The wrapped denoiser is called with
    them replaced by ``null_label`` when one is given (the unconditional branch of a model
    trained with conditioning dropout), removed when ``null_label`` is ``None`` (an
    unconditional model), or passed unchanged when ``conditional=True`` (a conditional model
    steered further by the classifier, as in Dhariwal & Nichol's Table 4).

    The gradient is taken with autograd inside the samplers' ``torch.inference_mode``: ``x_t``
    and ``t`` are cloned out of inference mode into ordinary tensors first. ``s = 1`` with the
    exact ``p(y | x_t)`` turns ``eps_u`` into the exact conditional ``eps`` (Bayes' rule,
    ``grad log p(x_t | y) = grad log p(x_t) + grad log p(y | x_t)``); ``s > 1`` samples towards
    ``p(x) p(y | x)^s``, sharper than ``p(x | y)`` (seed 002).
    """

    def __init__(
        self,
        denoiser: DenoiserFn,
        classifier: NoisyClassifierFn,
        scale: float,
        *,
        null_label: int | None = None,
        conditional: bool = False,
    ):
        if conditional and null_label is not None:
            raise ValueError("a conditional denoiser sees the labels: give no null_label")
        self.denoiser = denoiser
        self.schedule = denoiser.schedule
        self.classifier = classifier
        self.scale = float(scale)
        self.null_label = null_label
        self.conditional = conditional

    def __call__(
        self,
        x_t: Tensor,
        t: Tensor,
        cond: dict[str, Any] | None = None,
        *,
        alpha_sigma: AlphaSigma | None = None,
    ) -> Prediction:
        if not cond or "class_labels" not in cond:
            raise ValueError("classifier guidance needs the target labels in cond['class_labels']")
        labels = _per_example(torch.as_tensor(cond["class_labels"]), x_t.shape[0], "class_labels")
        pred = self.denoiser(x_t, t, self._denoiser_cond(cond, labels), alpha_sigma=alpha_sigma)
        grad = self.log_likelihood_gradient(x_t, t, labels)
        return pred.with_eps(pred.eps - self.scale * pred.sigma * grad.to(pred.eps.dtype))

    def log_likelihood_gradient(self, x_t: Tensor, t: Tensor, labels: Tensor) -> Tensor:
        """``grad_x log p_phi(y | x_t, t)``, ``x_t``'s shape (an ordinary, non-inference tensor)."""

        def log_likelihood(x: Tensor, t: Tensor) -> Tensor:
            log_probs = F.log_softmax(self.classifier(x, t), dim=-1)
            return log_probs.gather(1, labels.clone().to(log_probs.device)[:, None])[:, 0]

        return likelihood_gradient(log_likelihood, x_t, t)

    def _denoiser_cond(self, cond: dict[str, Any], labels: Tensor) -> dict[str, Any]:
        if self.conditional:
            return cond
        rest = {k: v for k, v in cond.items() if k != "class_labels"}
        if self.null_label is not None:
            rest["class_labels"] = torch.full_like(labels, self.null_label)
        return rest


class _Thresholding(ABC):
    """A wrapper that edits the data estimate of its denoiser's prediction (:meth:`clip`).

    ``eps`` follows from ``x_t = alpha x_0 + sigma eps`` (:meth:`Prediction.with_x0`) where the
    edit changed ``x_0``; elsewhere both are returned untouched.
    """

    def __init__(self, denoiser: DenoiserFn):
        self.denoiser = denoiser
        self.schedule = denoiser.schedule

    def __call__(
        self,
        x_t: Tensor,
        t: Tensor,
        cond: dict[str, Any] | None = None,
        *,
        alpha_sigma: AlphaSigma | None = None,
    ) -> Prediction:
        pred = self.denoiser(x_t, t, cond, alpha_sigma=alpha_sigma)
        return _replace_x0(pred, self.clip(pred.x0))

    @abstractmethod
    def clip(self, x0: Tensor) -> Tensor:
        """The edited data estimate."""


class StaticThresholding(_Thresholding):
    """``x_0 <- clip(x_0, -limit, limit)`` (Saharia et al. 2022, "static thresholding"); exactly
    the identity when no estimate leaves ``[-limit, limit]``."""

    def __init__(self, denoiser: DenoiserFn, limit: float = 1.0):
        if limit <= 0:
            raise ValueError(f"the clipping limit must be positive, got {limit}")
        super().__init__(denoiser)
        self.limit = float(limit)

    def clip(self, x0: Tensor) -> Tensor:
        return x0.clamp(-self.limit, self.limit)


class DynamicThresholding(_Thresholding):
    """Imagen's dynamic thresholding (Saharia et al. 2022, Sec. 2.3): per sample,
    ``s = max(1, quantile(|x_0|, percentile))`` over its pixels, then
    ``x_0 <- clip(x_0, -s, s) / s``.

    Every estimate ends in ``[-1, 1]``; saturated pixels are pushed inwards rather than clipped
    when many exceed the range. As for :class:`StaticThresholding`, the wrapper is exactly the
    identity when every ``|x_0| <= 1`` (then ``s = 1``).
    """

    def __init__(self, denoiser: DenoiserFn, percentile: float = 0.995):
        if not 0.0 < percentile <= 1.0:
            raise ValueError(f"percentile must lie in (0, 1], got {percentile}")
        super().__init__(denoiser)
        self.percentile = float(percentile)

    def clip(self, x0: Tensor) -> Tensor:
        flat = x0.abs().reshape(x0.shape[0], -1)
        flat = flat.to(torch.promote_types(flat.dtype, torch.float32))  # quantile needs >= fp32
        level = torch.quantile(flat, self.percentile, dim=1).to(x0.dtype).clamp(min=1.0)
        level = level.reshape(-1, *([1] * (x0.ndim - 1)))
        return torch.minimum(torch.maximum(x0, -level), level) / level


THRESHOLDS: tuple[str, ...] = ("none", "static", "dynamic")
"""The thresholdings :func:`thresholded` applies by name."""


def thresholded(denoiser: DenoiserFn, threshold: str, percentile: float = 0.995) -> DenoiserFn:
    """``denoiser`` with its data estimate thresholded by name (:data:`THRESHOLDS`): ``static``
    is :class:`StaticThresholding` (``x_0 <- clip(x_0, -1, 1)``), ``dynamic`` is
    :class:`DynamicThresholding` (``s = max(1, quantile(|x_0|, percentile))``,
    ``x_0 <- clip(x_0, -s, s) / s``), ``none`` returns ``denoiser`` itself. Raises
    ``ValueError`` for any other name.

    Without it an eps-prediction model sampled from ``t = 1`` (``alpha ~ 0``) has
    ``x_0 = (x_t - sigma eps) / alpha`` amplified by ``1 / alpha``, and DDIM-type samplers
    diverge."""
    if threshold == "static":
        return StaticThresholding(denoiser)
    if threshold == "dynamic":
        return DynamicThresholding(denoiser, percentile)
    if threshold != "none":
        raise ValueError(f"unknown threshold {threshold!r}: choose one of {', '.join(THRESHOLDS)}")
    return denoiser


# ------------------------------------------------------------------------------------------------


def _replace_x0(pred: Prediction, x0: Tensor) -> Prediction:
    """:meth:`Prediction.with_x0`, keeping the original ``eps`` bit for bit where ``x0`` is
    unchanged (recomputing it there would only add rounding)."""
    edited = pred.with_x0(x0)
    eps = torch.where(x0 == pred.x0, pred.eps, edited.eps)
    return Prediction(pred.x_t, pred.alpha, pred.sigma, x0, eps)


def _per_example(value: Tensor, B: int, key: str) -> Tensor:
    """``value`` as ``(B, ...)``: a scalar or a single row is broadcast over the batch."""
    if value.ndim == 0:
        return value.expand(B)
    if value.shape[0] == B:
        return value
    if value.shape[0] == 1:
        return value.expand(B, *value.shape[1:])
    raise ValueError(f"cond[{key!r}] has {value.shape[0]} rows for a batch of {B}")


def _twice(value: Tensor, B: int, name: str) -> Tensor:
    """A per-example ``value`` for the batch ``[x_t; x_t]`` (a 0-d one is shared as it is)."""
    return value if value.ndim == 0 else torch.cat([_per_example(value, B, name)] * 2)


def _first_half(a: Tensor, B: int) -> Tensor:
    """The conditional half of a per-example schedule value (scalars are shared)."""
    return a[:B] if a.ndim > 0 and a.shape[0] == 2 * B else a
