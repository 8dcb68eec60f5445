"""Gaussian diffusion on learned word embeddings: Diffusion-LM (Li et al. 2022), DiffuSeq's
partial noising (Gong et al. 2023) and self-conditioning (Chen et al. 2023); seeds 000 and 003.

A row of tokens ``w = (w_1..w_L)`` is embedded, ``x_0 ~ q_phi(x_0 | w) = N(E(w), sigma_0^2 I)``,
and diffused by the library's forward process ``x_t = alpha_t x_0 + sigma_t eps`` (any
:class:`~difflab.gaussian.schedules.Schedule`; Diffusion-LM's ``sqrt`` by default in the
recipe). A sample ``x_0`` is turned back into tokens by the rounding step
``p_theta(w_i | x_0,i) = softmax(x_0,i E^T)``. ``sigma_0 = sigma(t_1)`` is the noise of the
first step ``t_1 =`` :data:`FIRST_STEP` (Diffusion-LM's ``sqrt(1 - alpha_bar_1)``).

The loss (:func:`embedding_diffusion_loss`) is seed 000's, in ``x_0`` form, trained end to end
with ``E``::

    L = E_{t, x_0, eps} [ ||x0_hat(x_t, t) - x_0||^2 + ||E(w) - x0_hat(x_1, t_1)||^2
                          - log p_theta(w | x_0) ]

where ``x0_hat`` is the denoiser's data estimate (the network's output for ``x0``-prediction,
converted exactly otherwise) and ``mu_theta(x_1, 1)`` of the seed is the estimate at the first
step. Each squared norm is averaged over the ``d`` coordinates (Diffusion-LM's ``mean_flat``),
each term over the counted tokens.

Sampling runs any Gaussian sampler of :mod:`difflab.gaussian.samplers` with the denoiser
wrapped (each wrapper is a :class:`~difflab.gaussian.parameterization.DenoiserFn`):

- :class:`Clamped`, the clamping trick: the data estimate is snapped to its nearest embedding
  at every step, ``x0_hat <- argmin_{e in E} ||x0_hat - e||``;
- :class:`~difflab.gaussian.self_conditioning.SelfConditioned`: the network also reads its
  previous data estimate (zeros first);
- :class:`SourceReimposed`: DiffuSeq's partial noising, the given positions (the source of a
  ``[source; target]`` row, or a prompt) hold their clean embeddings at every network call, and
  the result holds them exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from difflab.gaussian.parameterization import AlphaSigma, Denoiser, DenoiserFn, Prediction
from difflab.gaussian.schedules import Schedule
from difflab.gaussian.self_conditioning import SelfConditionedTraining

#: The time of Diffusion-LM's first step ``x_1`` (``1 / T`` with its ``T = 2000``): the
#: embedding term is the denoiser's error there, and ``sigma_0 = sigma(t_1)``.
FIRST_STEP = 1.0 / 2000


class EmbeddingNet(Protocol):
    """What the loss needs of a network: ``embed`` (the ``(V, d)`` embedding ``E``),
    ``rounding_logits(x0)``, ``self_condition`` and ``forward(x_t, c_noise, self_cond=None)``."""

    embed: nn.Embedding
    self_condition: bool

    def __call__(self, x_t: Tensor, c_noise: Tensor, self_cond: Tensor | None = None) -> Tensor: ...

    def rounding_logits(self, x0: Tensor) -> Tensor: ...


@dataclass
class EmbeddingLoss:
    """The loss and its three terms (scalars): ``x0_mse`` (L_simple in ``x_0`` form),
    ``embedding`` (``||E(w) - x0_hat(x_1, t_1)||^2``) and ``rounding`` (``-log p(w | x_0)``)."""

    loss: Tensor
    x0_mse: Tensor
    embedding: Tensor
    rounding: Tensor


def embedding_noise(schedule: Schedule) -> float:
    """``sigma_0 = sigma(t_1)``, the standard deviation of ``q_phi(x_0 | w)``."""
    return float(schedule.alpha_sigma(torch.tensor(FIRST_STEP, dtype=torch.float64))[1])


def draw_times(batch: int, stratified: bool, generator: torch.Generator | None, device) -> Tensor:
    """``(B,)`` times uniform on ``(0, 1)``; ``stratified``: one in each of ``B`` equal strata
    (``t_i = (u + i) / B`` with one shared ``u``), the same law with lower variance."""
    if stratified:
        u = torch.rand((), generator=generator, device=device, dtype=torch.float64)
        t = (u + torch.arange(batch, device=device, dtype=torch.float64)) / batch
    else:
        t = torch.rand(batch, generator=generator, device=device, dtype=torch.float64)
    return t.clamp(FIRST_STEP, 1.0)


def _mean(values: Tensor, mask: Tensor) -> Tensor:
    return (values * mask).sum() / mask.sum().clamp_min(1)


def embedding_diffusion_loss(
    net: EmbeddingNet,
    schedule: Schedule,
    tokens: Tensor,
    *,
    prediction: str = "x0",
    loss_mask: Tensor | None = None,
    noise_mask: Tensor | None = None,
    stratified: bool = False,
    generator: torch.Generator | None = None,
) -> EmbeddingLoss:
    """Seed 000's loss (module docstring) of the rows ``tokens (B, L)``.

    ``loss_mask (B, L)``: the tokens counted (False on padding). ``noise_mask (B, L)``:
    DiffuSeq's partial noising, True on the positions that are diffused (the target); the
    others are given as their clean embeddings ``E(w)`` in ``x_t``, so the squared terms count
    the noised positions only and the rounding term every counted one. With
    ``net.self_condition`` the network call also reads a previous estimate: zeros in half of
    the batches, in the others the network's own first estimate of ``x_0`` from the same
    ``x_t`` without gradient (:class:`.self_conditioning.SelfConditionedTraining`).
    """
    B, device = tokens.shape[0], tokens.device
    counted = torch.ones_like(tokens, dtype=torch.bool) if loss_mask is None else loss_mask.bool()
    noised = counted if noise_mask is None else counted & noise_mask.bool()
    emb = net.embed(tokens)
    denoiser: DenoiserFn = Denoiser(net, schedule, prediction)  # type: ignore[arg-type]

    def randn() -> Tensor:
        return torch.randn(emb.shape, generator=generator, device=device, dtype=emb.dtype)

    x0 = emb + embedding_noise(schedule) * randn()
    t = torch.cat([draw_times(B, stratified, generator, device),
                   torch.full((B,), FIRST_STEP, dtype=torch.float64, device=device)])  # fmt: skip
    alpha, sigma = schedule.alpha_sigma(t)
    x0_twice = torch.cat([x0, x0])
    x_t = alpha.to(emb.dtype)[:, None, None] * x0_twice + sigma.to(emb.dtype)[:, None, None] * (
        torch.cat([randn(), randn()])
    )
    if noise_mask is not None:
        x_t = torch.where(noise_mask.repeat(2, 1)[..., None], x_t, torch.cat([emb, emb]))
    if net.self_condition:
        denoiser = SelfConditionedTraining(denoiser, generator)
    x0_hat = denoiser(x_t, t).x0
    x0_mse = _mean((x0_hat[:B] - x0).square().mean(-1), noised)
    embedding = _mean((emb - x0_hat[B:]).square().mean(-1), noised)
    logits = net.rounding_logits(x0)
    rounding = _mean(F.cross_entropy(logits.transpose(1, 2), tokens, reduction="none"), counted)
    return EmbeddingLoss(x0_mse + embedding + rounding, x0_mse, embedding, rounding)


def nearest_embedding(x: Tensor, embeddings: Tensor) -> Tensor:
    """The ids ``argmin_v ||x_i - E_v||^2`` of the nearest embedding of each vector of
    ``x (..., d)`` among the rows of ``embeddings (V, d)``, shape ``x.shape[:-1]``."""
    distance = x.square().sum(-1, keepdim=True) - 2 * x @ embeddings.T + embeddings.square().sum(-1)
    return distance.argmin(-1)


def round_to_tokens(net: EmbeddingNet, x0: Tensor) -> Tensor:
    """The rounding step: ``argmax_w p_theta(w | x_0)`` per position, ``(B, L)`` ids."""
    return net.rounding_logits(x0).argmax(-1)


class Clamped:
    """The clamping trick (Li et al. 2022): the wrapped denoiser's data estimate snapped to the
    nearest row of ``embeddings (V, d)`` at every call, ``eps`` following from it."""

    def __init__(self, denoiser: DenoiserFn, embeddings: Tensor):
        self.denoiser, self.schedule = denoiser, denoiser.schedule
        self.embeddings = embeddings

    def __call__(
        self,
        x_t: Tensor,
        t: Tensor,
        cond: dict[str, Any] | None = None,
        *,
        alpha_sigma: AlphaSigma | None = None,
    ) -> Prediction:
        pred = self.denoiser(x_t, t, cond, alpha_sigma=alpha_sigma)
        snapped = self.embeddings[nearest_embedding(pred.x0, self.embeddings)]
        return pred.with_x0(snapped.to(pred.x0.dtype))


class SourceReimposed:
    """DiffuSeq's partial noising while sampling: where ``given (B, L)`` is True the network
    always reads the clean ``source (B, L, d)`` (whatever the sampler's state holds there), and
    the data estimate is the source there, so the sample ends with it exactly."""

    def __init__(self, denoiser: DenoiserFn, source: Tensor, given: Tensor):
        self.denoiser, self.schedule = denoiser, denoiser.schedule
        self.source, self.given = source, given[..., None]

    def __call__(
        self,
        x_t: Tensor,
        t: Tensor,
        cond: dict[str, Any] | None = None,
        *,
        alpha_sigma: AlphaSigma | None = None,
    ) -> Prediction:
        x_in = torch.where(self.given, self.source.to(x_t.dtype), x_t)
        pred = self.denoiser(x_in, t, cond, alpha_sigma=alpha_sigma)
        x0 = torch.where(self.given, self.source.to(pred.x0.dtype), pred.x0)
        return Prediction(x_t, pred.alpha, pred.sigma, x0=x0)
