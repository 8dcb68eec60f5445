"""Exact oracles: data distributions whose denoiser and score are known in closed form.

For data ``x_0 ~ sum_k w_k N(m_k, C_k)`` and ``x_t = alpha x_0 + sigma eps`` (any schedule, VP or
VE), every noised marginal is again a mixture (seed 002: the score of a Gaussian is linear):

    q_t(x) = sum_k w_k N(x; alpha m_k, S_k),      S_k = alpha^2 C_k + sigma^2 I.

With the responsibilities ``r_k(x) = p(k | x_t = x) = w_k N(x; alpha m_k, S_k) / q_t(x)``
(Bayes' rule, computed with log-sum-exp) and ``d_k = x - alpha m_k``:

    E[x_0 | x_t] = sum_k r_k (m_k + alpha C_k S_k^{-1} d_k)
    E[eps | x_t] = sum_k r_k sigma S_k^{-1} d_k
    grad log q_t(x) = -sum_k r_k S_k^{-1} d_k

Each ``C_k = U_k diag(l_k) U_k^T`` is diagonalised once, so ``S_k^{-1} = U_k diag(1 / (alpha^2
l_k + sigma^2)) U_k^T`` costs two rotations per call, and both estimates stay finite at
``sigma = 0`` (where ``E[eps | x_t] = 0``) as long as the covariances are positive definite.

The oracles satisfy the :class:`~difflab.gaussian.parameterization.DenoiserFn` contract, so any
sampler runs on them; :meth:`GaussianMixtureOracle.as_network` gives the raw network of any
parameterization for :class:`~difflab.gaussian.parameterization.Denoiser`. Data of any shape
(vectors or images) is handled by flattening ``(B, *shape)`` to ``(B, D)``.

Conditioning: ``cond={"class_labels": y}`` with ``y`` in ``0..K-1`` conditions on the component
``y`` (the data is then ``N(m_y, C_y)``); the label ``K`` is the null label (unconditional), as
for classifier-free guidance.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor

from difflab.gaussian.parameterization import AlphaSigma, Kind, Prediction
from difflab.gaussian.schedules import Schedule, broadcast


class GaussianMixtureOracle:
    """Data ``x_0 ~ sum_k w_k N(m_k, C_k)`` with the exact ``E[x_0 | x_t]`` at every ``t``.

    Args:
        means: ``(K, *shape)`` component means (``shape`` is the data shape, e.g. ``(D,)`` or
            ``(C, H, W)``).
        covs: full covariances ``(K, D, D)`` with ``D = prod(shape)``, or isotropic standard
            deviations: a float or a ``(K,)`` tensor (``C_k = std_k^2 I``). Must be positive
            definite.
        weights: ``(K,)`` positive mixture weights (normalised here); ``None`` for uniform.
        schedule: the forward process ``x_t = alpha(t) x_0 + sigma(t) eps``.

    Parameters are kept in float64; each call computes in the dtype and on the device of
    ``x_t`` and returns the same.
    """

    def __init__(
        self,
        means: Tensor,
        covs: Tensor | float,
        weights: Tensor | None,
        schedule: Schedule,
    ):
        means = torch.as_tensor(means, dtype=torch.float64)
        if means.ndim < 2:
            raise ValueError(f"means must have shape (K, *shape), got {tuple(means.shape)}")
        K = means.shape[0]
        self.shape: tuple[int, ...] = tuple(means.shape[1:])
        D = math.prod(self.shape)
        self.means = means.reshape(K, D)
        covs = torch.as_tensor(covs, dtype=torch.float64)
        if covs.ndim == 3:
            if covs.shape != (K, D, D):
                raise ValueError(f"covs must have shape {(K, D, D)}, got {tuple(covs.shape)}")
            if not torch.allclose(covs, covs.transpose(1, 2), rtol=1e-10, atol=1e-12):
                raise ValueError("covariance matrices must be symmetric")
            eigvals, eigvecs = torch.linalg.eigh(covs)
            self._eigvecs: Tensor | None = eigvecs
        elif covs.ndim <= 1 and covs.numel() in (1, K):
            eigvals = (covs**2).reshape(-1, 1).expand(K, D).clone()
            self._eigvecs = None
        else:
            raise ValueError(
                f"covs must be (K, D, D) covariances or isotropic stds (a float or (K,)), "
                f"got shape {tuple(covs.shape)}"
            )
        if not bool((eigvals > 0).all()):
            raise ValueError("every component covariance must be positive definite")
        self._eigvals = eigvals
        if weights is None:
            weights = torch.full((K,), 1.0 / K, dtype=torch.float64)
        weights = torch.as_tensor(weights, dtype=torch.float64)
        if weights.shape != (K,) or not bool((weights > 0).all()):
            raise ValueError(f"weights must be {K} positive numbers")
        self.weights = weights / weights.sum()
        self.schedule = schedule
        self._cache: dict[tuple[torch.dtype, torch.device], tuple] = {}

    # ---------------------------------------------------------------- properties

    @property
    def num_components(self) -> int:
        """``K``; also the null class label."""
        return self.means.shape[0]

    @property
    def dim(self) -> int:
        """``D = prod(shape)``."""
        return self.means.shape[1]

    @property
    def covs(self) -> Tensor:
        """Component covariances ``(K, D, D)``, float64."""
        if self._eigvecs is None:
            return torch.diag_embed(self._eigvals)
        return self._eigvecs @ torch.diag_embed(self._eigvals) @ self._eigvecs.transpose(1, 2)

    # ---------------------------------------------------------------- denoiser contract

    def __call__(
        self,
        x_t: Tensor,
        t: Tensor,
        cond: dict[str, Any] | None = None,
        *,
        alpha_sigma: AlphaSigma | None = None,
    ) -> Prediction:
        """The exact posterior means ``E[x_0 | x_t]`` and ``E[eps | x_t]`` as a Prediction.

        ``alpha_sigma`` is ignored: the oracle evaluates its schedule at ``t`` in float64."""
        st = self._stats(x_t, t, _labels(cond))
        weighted = st.resp[..., None] * st.q  # r_k S_k^{-1} d_k in each eigenbasis
        x0 = st.resp @ st.means + st.alpha[:, None] * st.rotate(st.eigvals * weighted)
        eps = st.sigma[:, None] * st.rotate(weighted)
        alpha, sigma = broadcast(st.alpha, x_t), broadcast(st.sigma, x_t)
        return Prediction(x_t, alpha, sigma, x0.reshape(x_t.shape), eps.reshape(x_t.shape))

    def as_network(self, kind: Kind | Literal["flow"] = "eps") -> Callable[..., Tensor]:
        """A raw network ``net(x_t, c_noise, **cond)`` predicting ``kind``, for ``Denoiser``.

        ``Denoiser(oracle.as_network(kind), oracle.schedule, kind)`` is the oracle again, seen
        through the parameterization ``kind`` (``t = c_noise / 1000``); ``"flow"`` is the exact
        velocity ``E[alpha' x_0 + sigma' eps | x_t]`` of the path.
        """

        def net(x_t: Tensor, c_noise: Tensor, **cond: Any) -> Tensor:
            t = c_noise.to(torch.float64) / 1000.0
            pred = self(x_t, t, cond or None)
            if kind == "flow":
                return pred.velocity(*self.schedule.derivatives(t))
            return pred.as_kind(kind)

        return net

    # ---------------------------------------------------------------- closed forms

    def score(self, x_t: Tensor, t: Tensor | float, cond: dict[str, Any] | None = None) -> Tensor:
        """``grad_x log q_t(x_t)`` (conditional on the class label when given), finite at t=0."""
        st = self._stats(x_t, t, _labels(cond))
        return -st.rotate(st.resp[..., None] * st.q).reshape(x_t.shape)

    def log_prob(
        self, x: Tensor, t: Tensor | float | None = None, class_labels: Tensor | None = None
    ) -> Tensor:
        """``log q_t(x)`` per sample, ``(B,)``; the data density ``log p(x_0)`` if ``t`` is None."""
        if t is None:
            t = 0.0
        st = self._stats(x, t, class_labels)
        return torch.logsumexp(st.logits, dim=-1)

    def log_class_posterior(self, x_t: Tensor, t: Tensor | float) -> Tensor:
        """``log p(k | x_t)`` for every component, ``(B, K)`` (the log responsibilities)."""
        st = self._stats(x_t, t, None)
        return st.logits - torch.logsumexp(st.logits, dim=-1, keepdim=True)

    def class_posterior(self, x_t: Tensor, t: Tensor | float) -> Tensor:
        """``p(k | x_t)``, ``(B, K)``: the exact noisy classifier for classifier guidance."""
        return self.log_class_posterior(x_t, t).exp()

    def sample(
        self,
        n: int,
        generator: torch.Generator | None = None,
        class_labels: Tensor | None = None,
    ) -> Tensor:
        """``n`` exact draws of ``x_0``, ``(n, *shape)`` float64 on the CPU.

        With ``class_labels`` (``(n,)`` in ``0..K-1``) draw from those components; otherwise the
        components are drawn with probabilities ``w``.
        """
        if class_labels is None:
            labels = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        else:
            labels = torch.as_tensor(class_labels, dtype=torch.long).cpu()
            if labels.shape != (n,) or bool(
                (labels < 0).any() | (labels >= self.num_components).any()
            ):
                raise ValueError(
                    f"class_labels must be {n} integers in 0..{self.num_components - 1}"
                )
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        scaled = self._eigvals[labels].sqrt() * z
        if self._eigvecs is not None:
            scaled = torch.einsum("nde,ne->nd", self._eigvecs[labels], scaled)
        return (self.means[labels] + scaled).reshape(n, *self.shape)

    # ---------------------------------------------------------------- internals

    def _params(self, dtype: torch.dtype, device: torch.device) -> tuple:
        key = (dtype, device)
        # Built outside inference mode: a sampler may fill the cache, and classifier guidance
        # later differentiates through these tensors.
        if key not in self._cache:
            with torch.inference_mode(False):
                self._cache[key] = self._cast(dtype, device)
        return self._cache[key]

    def _cast(self, dtype: torch.dtype, device: torch.device) -> tuple:
        cast = {"dtype": dtype, "device": device}
        vecs = None if self._eigvecs is None else self._eigvecs.to(**cast)
        # isotropic components keep one eigenvalue each, (K, 1), and broadcast over D
        vals = self._eigvals if vecs is not None else self._eigvals[:, :1]
        return (
            self.means.to(**cast),
            vals.to(**cast),
            vecs,
            self.weights.log().to(**cast),
        )

    def _stats(self, x: Tensor, t: Tensor | float, labels: Tensor | None) -> _Stats:
        if x.shape[1:] != self.shape:
            raise ValueError(f"expected inputs of shape (B, {self.shape}), got {tuple(x.shape)}")
        B = x.shape[0]
        means, eigvals, eigvecs, log_w = self._params(x.dtype, x.device)
        t = torch.as_tensor(t, dtype=torch.float64, device=x.device)
        alpha, sigma = self.schedule.alpha_sigma(t.expand(B) if t.ndim == 0 else t)
        alpha, sigma = alpha.to(x.dtype), sigma.to(x.dtype)
        a = alpha[:, None, None]
        diff = x.reshape(B, 1, -1) - a * means  # (B, K, D)
        z = diff if eigvecs is None else torch.einsum("bkd,kde->bke", diff, eigvecs)
        var = a**2 * eigvals + sigma[:, None, None] ** 2  # eigenvalues of S_k: (B, K, D or 1)
        q = z / var
        log_det = var.log().sum(-1) * (self.dim // var.shape[-1])
        log_normal = -0.5 * ((z * q).sum(-1) + log_det + self.dim * _LOG_2PI)
        logits = log_normal + self._log_weights(log_w, labels, B)
        resp = torch.softmax(logits, dim=-1)
        return _Stats(alpha, sigma, means, eigvals, eigvecs, q, logits, resp)

    def _log_weights(self, log_w: Tensor, labels: Tensor | None, B: int) -> Tensor:
        if labels is None:
            return log_w
        K = self.num_components
        labels = torch.as_tensor(labels, device=log_w.device).reshape(-1).expand(B)
        if bool((labels < 0).any() | (labels > K).any()):
            raise ValueError(f"class labels must lie in 0..{K} ({K} is the null label)")
        own = torch.arange(K, device=log_w.device) == labels[:, None]
        conditional = torch.where(own, 0.0, -math.inf).to(log_w.dtype)
        return torch.where((labels == K)[:, None], log_w, conditional)


class GaussianOracle(GaussianMixtureOracle):
    """Data ``x_0 ~ N(mu, Sigma)``: ``E[x_0 | x_t] = mu + alpha Sigma (alpha^2 Sigma + sigma^2
    I)^{-1} (x_t - alpha mu)`` and ``q_t = N(alpha mu, alpha^2 Sigma + sigma^2 I)``.

    The one-component case of :class:`GaussianMixtureOracle` (label 0 is the component, 1 the
    null label). ``mean`` has the data shape; ``cov`` is ``(D, D)`` or an isotropic std.
    """

    def __init__(self, mean: Tensor, cov: Tensor | float, schedule: Schedule):
        mean = torch.as_tensor(mean, dtype=torch.float64)
        cov = torch.as_tensor(cov, dtype=torch.float64)
        super().__init__(mean[None], cov[None] if cov.ndim == 2 else cov, None, schedule)

    @property
    def mean(self) -> Tensor:
        """``mu`` in the data shape, float64."""
        return self.means[0].reshape(self.shape)

    @property
    def cov(self) -> Tensor:
        """``Sigma``, ``(D, D)`` float64."""
        return self.covs[0]


# ------------------------------------------------------------------------------------------------

_LOG_2PI = math.log(2 * math.pi)


class _Stats:
    """Per-call quantities shared by the denoiser, score and densities (flattened).

    ``q[b, k] = S_k^{-1} d_k`` in the eigenbasis of ``C_k``; ``resp`` the responsibilities.
    """

    __slots__ = ("alpha", "eigvals", "eigvecs", "logits", "means", "q", "resp", "sigma")

    def __init__(self, alpha, sigma, means, eigvals, eigvecs, q, logits, resp):
        self.alpha, self.sigma, self.means = alpha, sigma, means
        self.eigvals, self.eigvecs, self.q = eigvals, eigvecs, q
        self.logits, self.resp = logits, resp

    def rotate(self, v: Tensor) -> Tensor:
        """``sum_k U_k v_k``: back from each component's eigenbasis, summed over ``k``."""
        if self.eigvecs is None:
            return v.sum(1)
        return torch.einsum("bke,kde->bd", v, self.eigvecs)


def _labels(cond: dict[str, Any] | None) -> Tensor | None:
    return None if not cond else cond.get("class_labels")
