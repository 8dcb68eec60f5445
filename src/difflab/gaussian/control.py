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
class label per row. Diffusion-LM also takes a few gradient steps on ``x_{t-1}`` after each
denoising step; this wrapper adds the gradient to the score once per network call, which every
sampler of the library can run.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor

from difflab.gaussian.guidance import likelihood_gradient
from difflab.gaussian.parameterization import AlphaSigma, DenoiserFn, Prediction

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
