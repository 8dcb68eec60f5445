"""Control by guidance with a log-likelihood (Diffusion-LM's plug-and-play control; seed 000).

Bayes' rule on the noisy latents, ``log p(x_t | y) = log p(x_t) + log p(y | x_t)``, weighted as
seed 000 writes it, ``log p(x_t) + gamma log p(y | x_t)``: the score of the denoiser gains
``gamma grad_x log p(y | x_t, t)``. The score is ``-eps / sigma`` (docs/design.md: ``x_t =
alpha_t x_0 + sigma_t eps``), so the guided noise estimate is

    eps' = eps - gamma sigma_t grad_x log p(y | x_t, t)
    (equivalently x0' = x0 + gamma sigma_t^2 / alpha_t grad_x log p(y | x_t, t)).

Here ``log p(y | x_t, t)`` is any differentiable function of the latents, one value per row (a
classifier's log-probability of the wanted class, or a sum of such terms for several
constraints); :class:`~difflab.gaussian.guidance.ClassifierGuidance` is the special case of one
class label per row. Two forms:

- **score guidance** (:class:`LikelihoodGuidance`): the gradient is added to the score once per
  network call, at ``x_t``; every sampler of the library runs it.
- **gradient steps on x_{t-1}**, Diffusion-LM's own form (Li et al. 2022, Sec. 5.2;
  :func:`controlled_ddpm`): after each ancestral step ``t -> s`` draws ``x_s`` from
  ``p(x_s | x_t) = N(mu, v I)`` (DDPM's posterior mean at the denoiser's ``x_0`` estimate and
  the posterior variance ``v``), ``K`` steps of gradient ascent on

      f(x_s) = log p(x_s | x_t) + gamma log p(y | x_s, s)
             = -||x_s - mu||^2 / (2 v) + gamma log p(y | x_s, s) + const

  move ``x_s`` towards the constraint while the first (fluency) term holds it near what the
  diffusion model proposes (the paper writes ``lambda log p(x_{t-1} | x_t) + log p(y | x_{t-1})``,
  the same maximiser with ``lambda = 1 / gamma``). Each step is preconditioned by ``v``
  (:func:`control_steps`), ``x <- x + eta v grad f(x) = x - eta (x - mu) + eta gamma v grad
  log p(y | x, s)``, so one step size ``eta`` in ``(0, 1]`` is stable at every noise level (the
  fluency term alone contracts by ``1 - eta``; the paper uses Adagrad, which normalises each
  coordinate instead). The classifier is read at ``x_s`` itself, the point it moves, rather
  than once at ``x_t``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from difflab.gaussian.grid import Callback, Grid
from difflab.gaussian.guidance import likelihood_gradient
from difflab.gaussian.parameterization import AlphaSigma, DenoiserFn, Prediction
from difflab.gaussian.process import posterior_coefficients

LogLikelihoodFn = Callable[[Tensor, Tensor], Tensor]
"""``log_likelihood(x_t, t) -> (B,)``: ``log p(y | x_t, t)`` of each row for the wanted ``y``;
``t`` is the ``(B,)`` time. It must be differentiable in ``x_t``."""


class LikelihoodGuidance:
    """``eps' = eps - scale sigma grad_x log_likelihood(x_t, t)`` (module docstring; the
    gradient by :func:`~difflab.gaussian.guidance.likelihood_gradient`)."""

    def __init__(self, denoiser: DenoiserFn, log_likelihood: LogLikelihoodFn, scale: float):
        self.denoiser, self.schedule = denoiser, denoiser.schedule
        self.log_likelihood = log_likelihood
        self.scale = float(scale)

    def __call__(
        self,
        x_t: Tensor,
        t: Tensor,
        cond: dict[str, Any] | None = None,
        *,
        alpha_sigma: AlphaSigma | None = None,
    ) -> Prediction:
        pred = self.denoiser(x_t, t, cond, alpha_sigma=alpha_sigma)
        grad = self.gradient(x_t, t)
        return pred.with_eps(pred.eps - self.scale * pred.sigma * grad.to(pred.eps.dtype))

    def gradient(self, x_t: Tensor, t: Tensor) -> Tensor:
        """``grad_x log p(y | x_t, t)``, ``x_t``'s shape (an ordinary, non-inference tensor)."""
        return likelihood_gradient(self.log_likelihood, x_t, t)


#: The default step size ``eta`` of :func:`control_steps`.
CONTROL_STEP_SIZE = 0.1


class Guide(NamedTuple):
    """A control: ``log_likelihood`` (``log p(y | x_t, t)``) at scale ``gamma``; ``steps = 0``:
    score guidance (:class:`LikelihoodGuidance`), ``steps = K > 0``: ``K`` gradient steps of
    size ``step_size`` on each ``x_{t-1}`` (:func:`controlled_ddpm`)."""

    log_likelihood: LogLikelihoodFn
    scale: float
    steps: int = 0
    step_size: float = CONTROL_STEP_SIZE


def control_steps(
    x: Tensor,
    mean: Tensor,
    variance: float,
    log_likelihood: LogLikelihoodFn,
    s: Tensor,
    *,
    scale: float,
    steps: int,
    step_size: float,
) -> Tensor:
    """``steps`` preconditioned gradient-ascent steps from ``x`` on ``f(x) = -||x - mean||^2 /
    (2 variance) + scale log_likelihood(x, s)`` (module docstring):
    ``x <- x - step_size (x - mean) + step_size scale variance grad log_likelihood(x, s)``.
    ``variance = 0`` (the step onto the data) leaves ``x`` as it is."""
    if variance <= 0:
        return x
    for _ in range(steps):
        grad = likelihood_gradient(log_likelihood, x, s).to(x.dtype)
        x = x - step_size * (x - mean) + (step_size * scale * variance) * grad
    return x


def controlled_ddpm(
    denoiser: DenoiserFn,
    x: Tensor,
    ts: Tensor | Sequence[float],
    guide: Guide,
    *,
    cond: dict[str, Any] | None = None,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """DDPM's ancestral sampler (posterior variance, as ``samplers.ddpm``) with Diffusion-LM's
    control: after each step ``t -> s`` with ``s > 0``, ``x_s ~ N(mu, v I)`` is moved by
    :func:`control_steps` (``guide.steps`` steps of ``guide.step_size`` at scale
    ``guide.scale``). Returns the last data estimate, as the samplers do."""
    if guide.steps < 1:
        raise ValueError(f"controlled_ddpm needs guide.steps >= 1, got {guide.steps}")
    if not 0 < guide.step_size <= 1:
        raise ValueError(f"the control step size must be in (0, 1], got {guide.step_size}")
    g = Grid(denoiser.schedule, ts)
    c_xt, c_x0, var = (c.tolist() for c in posterior_coefficients(g.schedule, g.ts[1:], g.ts[:-1]))
    times = g.on(x)
    for i in range(g.n):
        pred = denoiser(x, times[i], cond)
        if callback is not None:
            callback(i, g.t[i], x, pred.x0)
        if i == g.n - 1:
            return pred.x0
        mean = c_xt[i] * x + c_x0[i] * pred.x0
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x = control_steps(mean + var[i] ** 0.5 * noise, mean, var[i], guide.log_likelihood,
                          times[i + 1], scale=guide.scale, steps=guide.steps,
                          step_size=guide.step_size)  # fmt: skip
    raise AssertionError("unreachable")
