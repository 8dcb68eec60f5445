"""Distances between two sets of samples (images or features): Frechet distance and kernel distance.

Frechet distance (FD; Heusel et al. 2017, "FID" when the features are Inception's) is the
2-Wasserstein distance between the Gaussians fitted to the two sets::

    FD = ||mu_1 - mu_2||^2 + tr(C_1 + C_2 - 2 (C_1^{1/2} C_2 C_1^{1/2})^{1/2})

It is computed in float64 through two symmetric eigendecompositions, never through the square root
of the non-symmetric product ``C_1 C_2``: ``S = C_1^{1/2}`` from ``eigh(C_1)``, then the eigenvalues
of the symmetric positive semi-definite ``S C_2 S``, which are those of ``C_1 C_2``. Eigenvalues
at the level of rounding noise are set to zero, so singular covariances (constant border pixels of
the 8x8 digits, fewer samples than dimensions) need no added jitter and lose no accuracy.

From samples with fewer points than dimensions (1,000 glyphs in 3,072 pixels) the same distance
comes exactly from ``N x N`` matrices instead of ``D x D`` ones: with the centred samples scaled
to ``A = (a - mu_1) / sqrt(N_1 - 1)``, so that ``C_1 = A^T A`` (and ``B`` likewise), the nonzero
eigenvalues of ``C_1^{1/2} C_2 C_1^{1/2}`` are those of ``C_2 C_1 = B^T (B A^T) A``, that is of
``M M^T`` with ``M = B A^T``; so ``tr((C_1^{1/2} C_2 C_1^{1/2})^{1/2})`` is the sum of the
singular values of the ``N_2 x N_1`` matrix ``M``, and ``tr C_1 = ||A||_F^2``.

The plug-in FD is biased upward by O(dim / n); compare figures only at equal sample sizes. Kernel
distance (KID; Binkowski et al. 2018) is the unbiased estimate of the squared maximum mean
discrepancy with the cubic polynomial kernel ``k(x, y) = (x . y / dim + 1)^3``: its expectation is
zero when both sets come from the same distribution, at any n.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _as_matrix(x: Tensor) -> Tensor:
    """Samples ``(N, ...)`` as a float64 ``(N, D)`` matrix."""
    x = torch.as_tensor(x)
    if x.ndim < 2:
        raise ValueError(f"expected samples of shape (N, ...), got shape {tuple(x.shape)}")
    return x.reshape(x.shape[0], -1).to(torch.float64)


def feature_statistics(x: Tensor) -> tuple[Tensor, Tensor]:
    """Mean ``(D,)`` and unbiased covariance ``(D, D)`` (divisor N - 1) of ``x`` ``(N, ...)``.

    Trailing dimensions are flattened (an image ``(N, C, H, W)`` is a point in ``C H W`` dims);
    the statistics are float64.
    """
    x = _as_matrix(x)
    if x.shape[0] < 2:
        raise ValueError(f"a covariance needs at least 2 samples, got {x.shape[0]}")
    mu = x.mean(dim=0)
    centred = x - mu
    cov = centred.T @ centred / (x.shape[0] - 1)
    return mu, cov


def _clamp_rounding(eigvals: Tensor) -> Tensor:
    """Zero the eigenvalues of a PSD matrix that are rounding noise (below ``D eps max|lambda|``).

    Zeroing them (instead of taking square roots of ~1e-16) keeps singular cases exact to float64
    precision rather than to its square root.
    """
    tolerance = eigvals.shape[-1] * torch.finfo(eigvals.dtype).eps * eigvals.abs().max()
    return torch.where(eigvals > tolerance, eigvals, torch.zeros_like(eigvals))


def _psd_sqrt(cov: Tensor) -> Tensor:
    """Symmetric square root of a symmetric positive semi-definite matrix."""
    eigvals, eigvecs = torch.linalg.eigh((cov + cov.T) / 2)
    return (eigvecs * _clamp_rounding(eigvals).sqrt()) @ eigvecs.T


def frechet_distance(mu1: Tensor, cov1: Tensor, mu2: Tensor, cov2: Tensor) -> float:
    """Frechet distance between ``N(mu1, cov1)`` and ``N(mu2, cov2)``, computed in float64.

    ``||mu1 - mu2||^2 + tr(cov1) + tr(cov2) - 2 tr((cov1^{1/2} cov2 cov1^{1/2})^{1/2})``.
    Symmetric in its two arguments (up to rounding) and never negative.
    """
    mu1, mu2 = (torch.as_tensor(m, dtype=torch.float64) for m in (mu1, mu2))
    cov1, cov2 = (torch.as_tensor(c, dtype=torch.float64) for c in (cov1, cov2))
    dim = mu1.shape[0]
    if mu1.shape != (dim,) or mu2.shape != (dim,):
        raise ValueError(f"means must be vectors of equal length, got {mu1.shape} and {mu2.shape}")
    if cov1.shape != (dim, dim) or cov2.shape != (dim, dim):
        raise ValueError(
            f"covariances must be {dim}x{dim}, got {tuple(cov1.shape)} and {tuple(cov2.shape)}"
        )
    root1 = _psd_sqrt(cov1)
    product = root1 @ cov2 @ root1
    product_eigvals = torch.linalg.eigvalsh((product + product.T) / 2)
    trace_sqrt_product = _clamp_rounding(product_eigvals).sqrt().sum()
    distance = (
        (mu1 - mu2).square().sum() + torch.trace(cov1) + torch.trace(cov2) - 2 * trace_sqrt_product
    )
    return max(float(distance), 0.0)


def frechet_distance_from_samples(a: Tensor, b: Tensor) -> float:
    """Frechet distance between the Gaussians fitted to samples ``a`` ``(N, ...)`` and ``b``;
    through the samples themselves (module docstring) when both sets have fewer points than
    dimensions, through the covariances otherwise."""
    a, b = _as_matrix(a), _as_matrix(b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"samples must have equal dimensions, got {a.shape[1]} and {b.shape[1]}")
    if max(len(a), len(b)) >= a.shape[1]:
        return frechet_distance(*feature_statistics(a), *feature_statistics(b))
    if min(len(a), len(b)) < 2:
        raise ValueError(f"a covariance needs at least 2 samples, got {min(len(a), len(b))}")
    mu1, mu2 = a.mean(dim=0), b.mean(dim=0)
    scaled_a = (a - mu1) / (len(a) - 1) ** 0.5
    scaled_b = (b - mu2) / (len(b) - 1) ** 0.5
    trace_sqrt_product = torch.linalg.svdvals(scaled_b @ scaled_a.T).sum()
    distance = ((mu1 - mu2).square().sum() + scaled_a.square().sum() + scaled_b.square().sum()
                - 2 * trace_sqrt_product)  # fmt: skip
    return max(float(distance), 0.0)


def kernel_distance(a: Tensor, b: Tensor) -> float:
    """Unbiased squared MMD between samples ``a`` ``(M, ...)`` and ``b`` ``(N, ...)`` (KID).

    With ``k(x, y) = (x . y / D + 1)^3`` (Binkowski et al. 2018)::

        MMD_u^2 = sum_{i != j} k(a_i, a_j) / (M (M - 1)) + sum_{i != j} k(b_i, b_j) / (N (N - 1))
                  - 2 sum_{i, j} k(a_i, b_j) / (M N)

    Uses all pairs (memory O((M + N)^2) in float64); it can be slightly negative.
    """
    a, b = _as_matrix(a), _as_matrix(b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"samples differ in dimension: {a.shape[1]} and {b.shape[1]}")
    m, n, dim = a.shape[0], b.shape[0], a.shape[1]
    if m < 2 or n < 2:
        raise ValueError(f"kernel distance needs at least 2 samples per set, got {m} and {n}")

    def kernel(x: Tensor, y: Tensor) -> Tensor:
        return (x @ y.T / dim + 1) ** 3

    k_aa, k_bb = kernel(a, a), kernel(b, b)
    within_a = (k_aa.sum() - k_aa.diagonal().sum()) / (m * (m - 1))
    within_b = (k_bb.sum() - k_bb.diagonal().sum()) / (n * (n - 1))
    between = kernel(a, b).mean()
    return float(within_a + within_b - 2 * between)
