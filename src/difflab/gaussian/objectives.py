"""Training objectives for a Gaussian :class:`~difflab.gaussian.parameterization.Denoiser`.

One training step (seed 001, Algorithm 18.1; Ho et al. 2020, Algorithm 1) draws a time ``t`` per
example, ``eps ~ N(0, I)``, forms ``x_t = alpha_t x_0 + sigma_t eps`` and regresses the network's
raw output on :func:`~difflab.gaussian.parameterization.target`. Every weighting is one number per
example in front of that squared error, and every one of them is written here as a weight on the
*noise* error (``lambda = log SNR = log(alpha^2 / sigma^2)``, ``D`` dimensions per example):

    loss(x_0) = w(lambda) * ||eps - eps_hat||^2 / D.

Because the parameterizations convert exactly (parameterization.py),
``||eps - eps_hat||^2 = c * ||out - target||^2`` with ``c = 1`` (eps), ``e^lambda`` (x0),
``alpha^2 / (alpha^2 + sigma^2)^2`` (v), ``sigma^2`` (score) and ``alpha^2 / det^2`` (flow, the
velocity ``u = alpha' x_0 + sigma' eps`` with ``det = alpha sigma' - sigma alpha'``, ``= 1`` on
the linear path); the loss is computed on the raw output as ``w(lambda) * c * ||out - target||^2
/ D``. The weightings:

- ``"simple"``: the plain MSE of the network's own parameterization, ``w = 1 / c``: L_simple
  for eps (``w = 1``), x0 MSE (``w = e^-lambda``), v MSE (``w = (alpha^2 + sigma^2)^2 / alpha^2``,
  ``1 + e^-lambda`` for VP schedules), score (``w = 1 / sigma^2``).
- ``"flow"``: the flow-matching loss ``||u - u_hat||^2 / D`` (Lipman et al. 2023; rectified
  flow's ``||(eps - x_0) - u_hat||^2`` on the linear path) whatever the network predicts,
  ``w = det^2 / alpha^2`` (``1 / (1 - t)^2`` on the linear path); for a ``flow`` network it is
  ``"simple"``.
- ``"min-snr"`` (Hang et al. 2023): ``w = min(e^lambda, gamma) / e^lambda = min(1, gamma
  e^-lambda)`` with ``gamma = 5``; i.e. ``min(SNR, gamma) ||x_0 - x0_hat||^2`` and
  ``min(SNR, gamma) / (SNR + 1) ||v - v_hat||^2`` for VP schedules, as in the paper.
- ``"elbo"``: the weight that makes the expected loss the negative ELBO in nats per dimension, up
  to a constant that does not depend on the network.

  *Discrete time* (DDPM, fixed reverse variances ``sigma_i^2``, vlb.py): step ``i`` uniform in
  ``1..T``, ``w_i = T c_x0(i)^2 e^-lambda_i / (2 sigma_i^2)``, where ``c_x0(i)`` is the ``x_0``
  coefficient of the posterior mean of ``q(x_{i-1} | x_i, x_0)``. For ``i >= 2`` this is the mean
  term of ``L_{i-1}`` (``mu_q - mu_p = c_x0 (x_0 - x0_hat)``); with ``sigma_i^2 = beta_tilde_i``
  it equals ``(T / 2)(e^(lambda_{i-1} - lambda_i) - 1)`` (Kingma et al. 2021). At ``i = 1`` the
  discretized decoder ``L_0`` is replaced by its Gaussian stand-in (the density times the bin
  width, as Ho et al. do in Sec. 3.4), ``w_1 = T e^-lambda_1 / (2 sigma_1^2)``. What the loss
  leaves out is ``L_T + sum_{i>=2} D/2 (log(sigma_i^2 / beta_tilde_i) + beta_tilde_i / sigma_i^2
  - 1)``, which does not depend on the network, and the gap between ``L_0`` and its stand-in.

  *Continuous time* (``t`` uniform in ``(0, 1]``): ``w(t) = -lambda'(t) / 2``, the ``T -> inf``
  limit of the above (the continuous-time loss of Kingma et al. 2021); as a function of
  ``lambda`` it is ``1 / (2 p(lambda))``, ``p`` the density of ``lambda`` under the time sampling.

Times: discrete schedules draw ``i`` uniform in ``1..T`` and use ``t = i / T``; continuous ones
draw ``t`` uniform in ``(0, 1]``. ``time_sampling`` chooses how the batch's uniforms are drawn,
each with the uniform marginal: ``"iid"``; ``"stratified"`` (the low-discrepancy sampler of
Kingma et al. 2021: ``u_k = (u_0 + k / B) mod 1``, one per stratum of width ``1/B``); or
``"antithetic"``, antithetic pairs (the Monte Carlo variance-reduction draw, not a
stratification): ``H = ceil(B / 2)`` iid uniforms for examples ``0..H-1``, and example ``H + k``
(``k < floor(B / 2)``) takes the mirror image of example ``k``: ``t_{H+k} = 1 - t_k`` in
continuous time, ``i_{H+k} = T + 1 - i_k`` in discrete time. Each pair is negatively correlated;
with an odd ``B``, example ``H - 1`` has no partner.

:func:`make_objective` gives the one training loss of a parameterization: :func:`loss_fn` with
one of these weightings for ``eps``, ``x0``, ``v`` and ``score``, and EDM's loss
(:func:`~difflab.gaussian.edm.edm_loss`) for ``edm``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor

from difflab.gaussian.edm import edm_loss
from difflab.gaussian.parameterization import PREDICTIONS, Denoiser, target, velocity_target
from difflab.gaussian.process import posterior_coefficients, q_sample
from difflab.gaussian.schedules import Schedule
from difflab.gaussian.vlb import VARIANCES, ReverseVariance, reverse_variance

Weighting = Literal["simple", "elbo", "min-snr", "flow"]
WEIGHTINGS: tuple[str, ...] = ("simple", "elbo", "min-snr", "flow")
TimeSampling = Literal["iid", "stratified", "antithetic"]
TIME_SAMPLINGS: tuple[str, ...] = ("iid", "stratified", "antithetic")
REDUCTIONS: tuple[str, ...] = ("mean", "none")

#: Each named choice of the objectives: its label in messages and its allowed values.
_CHOICES: dict[str, tuple[str, tuple[str, ...]]] = {
    "prediction": ("prediction", PREDICTIONS),
    "weighting": ("weighting", WEIGHTINGS),
    "time_sampling": ("time sampling", TIME_SAMPLINGS),
    "variance": ("reverse variance", VARIANCES),
    "reduction": ("reduction", REDUCTIONS),
}


def _check_choices(**values: Any) -> None:
    """Raise ``ValueError`` for a value that is not one of its :data:`_CHOICES`."""
    for key, value in values.items():
        label, allowed = _CHOICES[key]
        if value not in allowed:
            raise ValueError(f"unknown {label} {value!r}: choose one of {', '.join(allowed)}")


def sample_times(
    schedule: Schedule,
    batch: int,
    *,
    time_sampling: TimeSampling = "iid",
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Training times, float64 of shape ``(batch,)``, in ``(0, 1]``: ``i / T`` with ``i`` uniform
    in ``1..T`` for a discrete schedule, uniform in ``(0, 1]`` for a continuous one.

    ``time_sampling`` (module docstring): ``"iid"``; ``"stratified"``, one draw in each stratum of
    width ``1 / B``, ``u_k = (u_0 + k / B) mod 1``; ``"antithetic"``, pairs ``(t, 1 - t)``
    (``(i, T + 1 - i)`` on a discrete grid) between example ``k`` and example
    ``ceil(B / 2) + k``."""
    _check_choices(time_sampling=time_sampling)
    kw = {"device": device, "dtype": torch.float64}
    if time_sampling == "iid":
        u = torch.rand(batch, generator=generator, **kw)
    elif time_sampling == "stratified":
        u0 = torch.rand(1, generator=generator, **kw)
        u = torch.remainder(u0 + torch.arange(batch, **kw) / batch, 1.0)
    else:  # antithetic
        half = torch.rand((batch + 1) // 2, generator=generator, **kw)
        u = torch.cat([half, torch.remainder(-half[: batch // 2], 1.0)])
    # u lies in [0, 1); both maps below send u -> 1 - u under antithetic pairing.
    if schedule.T is None:
        return 1.0 - u
    T = schedule.T
    return ((u * T).floor().clamp(max=T - 1) + 1.0) / T


def _log_snr_derivative(schedule: Schedule, t: Tensor) -> Tensor:
    """``d lambda / dt`` at ``t`` by automatic differentiation of the schedule (works inside
    ``torch.inference_mode`` too)."""
    with torch.inference_mode(False), torch.enable_grad():
        t_ = t.detach().clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(schedule.log_snr(t_).sum(), t_)
    return grad


def _noise_weight(
    schedule: Schedule,
    t: Tensor,
    alpha: Tensor,
    sigma: Tensor,
    weighting: Weighting,
    variance: ReverseVariance,
    min_snr_gamma: float,
) -> Tensor:
    """``w(lambda)`` in front of ``||eps - eps_hat||^2 / D`` for "elbo", "min-snr" and "flow"
    (float64)."""
    if weighting == "flow":
        return 1.0 / _conversion("flow", schedule, t, alpha, sigma)
    snr = alpha**2 / sigma**2
    if weighting == "min-snr":
        return (min_snr_gamma / snr).clamp(max=1.0)
    if schedule.T is None:
        return -0.5 * _log_snr_derivative(schedule, t)
    T = schedule.T
    i = torch.round(t * T)
    c_x0 = posterior_coefficients(schedule, (i - 1) / T, i / T)[1]
    return T * c_x0**2 / (2.0 * reverse_variance(schedule, i, variance) * snr)


def _conversion(kind: str, schedule: Schedule, t: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """``c`` with ``||eps - eps_hat||^2 = c ||out - target||^2`` for a network of ``kind``."""
    if kind == "flow":
        d_alpha, d_sigma = schedule.derivatives(t)
        return alpha**2 / (alpha * d_sigma - sigma * d_alpha) ** 2
    if kind == "eps":
        return torch.ones_like(alpha)
    if kind == "x0":
        return alpha**2 / sigma**2
    if kind == "v":
        return alpha**2 / (alpha**2 + sigma**2) ** 2
    return sigma**2  # score


def loss_fn(
    denoiser: Denoiser,
    x0: Tensor,
    cond: dict[str, Any] | None = None,
    *,
    weighting: Weighting = "simple",
    generator: torch.Generator | None = None,
    time_sampling: TimeSampling = "iid",
    reduction: Literal["mean", "none"] = "mean",
    variance: ReverseVariance = "beta_tilde",
    min_snr_gamma: float = 5.0,
    t: Tensor | None = None,
    eps: Tensor | None = None,
) -> Tensor:
    """The denoising loss of ``denoiser`` on the batch ``x0`` (see the module docstring).

    Returns the batch mean (``reduction="mean"``) or the per-example losses ``(B,)``
    (``reduction="none"``), each ``w(lambda) * ||eps - eps_hat||^2 / D``. ``variance`` is the
    reverse variance of the DDPM bound that the discrete "elbo" weighting matches; ``min_snr_gamma``
    is the clip of "min-snr". ``t`` (``(B,)``; rounded to the grid ``i / T`` for a discrete
    schedule) and ``eps`` replace the random draws, e.g. to bucket per-example losses by time.
    """
    _check_choices(weighting=weighting, reduction=reduction, variance=variance)
    schedule = denoiser.schedule
    if t is None:
        t = sample_times(
            schedule,
            x0.shape[0],
            time_sampling=time_sampling,
            generator=generator,
            device=x0.device,
        )
    t = t.to(device=x0.device, dtype=torch.float64)
    if schedule.T is not None:  # snap to the grid i / T (a float32 t is off it by round-off)
        t = torch.round(t * schedule.T) / schedule.T
    if eps is None:
        eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    alpha, sigma = schedule.alpha_sigma(t)
    kind = denoiser.prediction
    pred = denoiser(q_sample(schedule, x0, t, eps), t, cond)
    # The network's raw output: the same tensor for eps and x0, and recovered up to round-off
    # for v, score and flow. Float32 at least, so that low-precision activations do
    # not round the squared error.
    dtype = torch.promote_types(x0.dtype, torch.float32)
    if kind == "flow":
        d_alpha, d_sigma = schedule.derivatives(t)
        out, goal = pred.velocity(d_alpha, d_sigma), velocity_target(x0, eps, d_alpha, d_sigma)
    else:
        out, goal = pred.as_kind(kind), target(kind, x0, eps, alpha, sigma)
    per_example = (out.to(dtype) - goal.to(dtype)).square().flatten(1).mean(1)
    if weighting != "simple" and not (kind == "flow" and weighting == "flow"):
        weight = _noise_weight(schedule, t, alpha, sigma, weighting, variance, min_snr_gamma)
        conversion = _conversion(kind, schedule, t, alpha, sigma)
        per_example = per_example * (weight * conversion).to(dtype)
    return per_example.mean() if reduction == "mean" else per_example


# ------------------------------------------------------------------------------------------------
# The objective of a parameterization
# ------------------------------------------------------------------------------------------------

Objective = Callable[..., Tensor]
"""``loss(denoiser, x0, cond=None, generator=None) -> Tensor``: one training loss."""

#: The keyword arguments of the losses that a caller sets per call, never through an objective.
_PER_CALL = ("weighting", "generator", "t", "eps")


def objective_options(prediction: str) -> dict[str, Any]:
    """The options of the objective of ``prediction``, with their defaults: the keyword
    arguments of :func:`~difflab.gaussian.edm.edm_loss` (``"edm"``) or :func:`loss_fn` (the
    others) beyond those :func:`make_objective` sets or the caller gives per call (``weighting``,
    ``generator``, ``t``, ``eps``)."""
    loss = edm_loss if prediction == "edm" else loss_fn
    return {
        p.name: p.default
        for p in inspect.signature(loss).parameters.values()
        if p.kind is p.KEYWORD_ONLY and p.name not in _PER_CALL
    }


def check_objective(prediction: str, weighting: str = "simple", **options: Any) -> None:
    """Raise ``ValueError`` (one line, with the choices) unless :func:`make_objective` applies
    to these arguments: ``prediction`` one of
    :data:`~difflab.gaussian.parameterization.PREDICTIONS`, ``weighting`` one of
    :data:`WEIGHTINGS`, and every option one the objective takes (:func:`objective_options`)
    with an allowed value. EDM's loss carries its own weight
    ``lambda(sigma) = 1 / c_out^2`` (``edm.py``), the plain MSE of its network's output, so with
    ``prediction="edm"`` the weighting must be ``"simple"``."""
    _check_choices(prediction=prediction, weighting=weighting)
    if prediction == "edm" and weighting != "simple":
        raise ValueError(
            f"weighting {weighting!r} does not apply to prediction 'edm', whose loss carries "
            "its own weight lambda(sigma): use weighting 'simple'"
        )
    allowed = objective_options(prediction)
    unknown = [name for name in options if name not in allowed]
    if unknown:
        raise ValueError(
            f"the {prediction} objective takes no option {', '.join(unknown)}: "
            f"its options are {', '.join(allowed)}"
        )
    _check_choices(**{name: value for name, value in options.items() if name in _CHOICES})


def make_objective(prediction: str, weighting: str = "simple", **options: Any) -> Objective:
    """The training loss of a denoiser of parameterization ``prediction``,
    ``loss(denoiser, x0, cond=None, generator=None) -> Tensor``:

    - ``"edm"``: :func:`~difflab.gaussian.edm.edm_loss`, ``lambda(sigma) ||D - x_0||^2 / D``
      with ``ln sigma ~ N(P_mean, P_std^2)`` (Karras et al. 2022);
    - ``"eps"``, ``"x0"``, ``"v"``, ``"score"``, ``"flow"``: :func:`loss_fn` with ``weighting``,
      ``w(lambda) ||eps - eps_hat||^2 / D`` with ``t`` drawn as ``time_sampling`` says.

    ``options`` go to that loss (:func:`objective_options`); :func:`check_objective` refuses
    what does not apply, here and at config time. The loss refuses a denoiser whose
    ``prediction`` is not ``prediction``.
    """
    check_objective(prediction, weighting, **options)

    def loss(
        denoiser: Denoiser,
        x0: Tensor,
        cond: dict[str, Any] | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        if denoiser.prediction != prediction:
            raise ValueError(
                f"an objective for prediction {prediction!r} got a denoiser that predicts "
                f"{denoiser.prediction!r}"
            )
        if prediction == "edm":
            return edm_loss(denoiser, x0, cond, generator, **options)
        return loss_fn(denoiser, x0, cond, weighting=weighting, generator=generator, **options)

    return loss
