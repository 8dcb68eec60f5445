"""Metrics between two sample sets, against closed forms and oracles computed independently.

Frechet and kernel distances (difflab.evaluate.frechet), improved precision/recall and
within-class spread (difflab.evaluate.precision_recall).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch
from sklearn.datasets import load_digits
from torch import Tensor

from difflab.evaluate.frechet import (
    feature_statistics,
    frechet_distance,
    frechet_distance_from_samples,
    kernel_distance,
)
from difflab.evaluate.precision_recall import knn_radii, precision_recall, within_class_spread

F64 = torch.float64


def random_spd(dim: int, generator: torch.Generator, rank: int | None = None) -> Tensor:
    """A random symmetric positive (semi-)definite matrix of the given rank."""
    a = torch.randn(dim, rank or dim, generator=generator, dtype=F64)
    return a @ a.T / dim + (0.3 * torch.eye(dim, dtype=F64) if rank is None else 0)


def test_feature_statistics_match_numpy():
    x = torch.randn(50, 2, 3, generator=torch.Generator().manual_seed(0))
    mu, cov = feature_statistics(x)
    flat = x.reshape(50, 6).double().numpy()
    np.testing.assert_allclose(mu.numpy(), flat.mean(axis=0), rtol=0, atol=1e-14)
    np.testing.assert_allclose(cov.numpy(), np.cov(flat, rowvar=False), rtol=0, atol=1e-14)
    assert mu.dtype == cov.dtype == F64


def test_identical_statistics_give_zero_even_when_singular():
    # Digit pixels: the covariance is singular (some border pixels are always 0).
    x = torch.tensor(load_digits().images / 8 - 1).reshape(-1, 64)
    mu, cov = feature_statistics(x)
    assert torch.linalg.matrix_rank(cov) < 64
    assert frechet_distance(mu, cov, mu, cov) <= 1e-9 * float(torch.trace(cov))
    assert frechet_distance_from_samples(x, x.clone()) <= 1e-9 * float(torch.trace(cov))


def test_diagonal_case_by_hand():
    # Diagonal covariances commute: FD = |d mu|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2, zeros included.
    mu1 = torch.tensor([0.0, 1.0, 2.0, 3.0])
    mu2 = torch.tensor([1.0, 1.0, 0.0, 3.0])  # |d mu|^2 = 1 + 0 + 4 + 0 = 5
    cov1 = torch.diag(torch.tensor([0.0, 1.0, 4.0, 2.5]))
    cov2 = torch.diag(torch.tensor([0.0, 9.0, 1.0, 0.0]))  # (0)^2 + (1-3)^2 + (2-1)^2 + 2.5 = 7.5
    assert frechet_distance(mu1, cov1, mu2, cov2) == pytest.approx(12.5, abs=1e-12)


def test_commuting_case_matches_eigenvalue_formula():
    g = torch.Generator().manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(10, 10, generator=g, dtype=F64))
    a, b = torch.rand(10, generator=g, dtype=F64) * 3, torch.rand(10, generator=g, dtype=F64)
    mu1, mu2 = torch.randn(10, generator=g, dtype=F64), torch.randn(10, generator=g, dtype=F64)
    expected = float((mu1 - mu2).square().sum() + (a.sqrt() - b.sqrt()).square().sum())
    got = frechet_distance(mu1, q @ torch.diag(a) @ q.T, mu2, q @ torch.diag(b) @ q.T)
    assert got == pytest.approx(expected, rel=1e-10)


def scipy_frechet(mu1: Tensor, cov1: Tensor, mu2: Tensor, cov2: Tensor) -> float:
    """Reference: tr((C1^{1/2} C2 C1^{1/2})^{1/2}) = tr((C1 C2)^{1/2}) via scipy's Schur sqrtm."""
    root = scipy.linalg.sqrtm(cov1.numpy() @ cov2.numpy())
    return float(
        ((mu1 - mu2) ** 2).sum() + torch.trace(cov1) + torch.trace(cov2) - 2 * np.trace(root).real
    )


def test_random_case_matches_scipy_and_is_symmetric():
    g = torch.Generator().manual_seed(2)
    mu1, mu2 = torch.randn(16, generator=g, dtype=F64), torch.randn(16, generator=g, dtype=F64)
    cov1, cov2 = random_spd(16, g), random_spd(16, g)
    assert not torch.allclose(cov1 @ cov2, cov2 @ cov1)  # the non-commuting case
    expected = scipy_frechet(mu1, cov1, mu2, cov2)
    assert frechet_distance(mu1, cov1, mu2, cov2) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(mu2, cov2, mu1, cov1) == pytest.approx(expected, rel=1e-9)


def test_singular_covariance_matches_reduced_problem():
    # C1 = A A^T of rank 3 in 6 dims: the non-zero eigenvalues of C1 C2 are those of the full-rank
    # 3x3 matrix A^T C2 A, so tr((C1^{1/2} C2 C1^{1/2})^{1/2}) = sum sqrt(eig(A^T C2 A)).
    g = torch.Generator().manual_seed(3)
    a = torch.randn(6, 3, generator=g, dtype=F64)
    cov1, cov2 = a @ a.T, random_spd(6, g)
    mu = torch.zeros(6, dtype=F64)
    eig = np.linalg.eigvals((a.T @ cov2 @ a).numpy()).real
    expected = float(torch.trace(cov1) + torch.trace(cov2)) - 2 * np.sqrt(eig).sum()
    assert frechet_distance(mu, cov1, mu, cov2) == pytest.approx(expected, rel=1e-12)
    assert frechet_distance(mu, cov2, mu, cov1) == pytest.approx(expected, rel=1e-12)


def test_zero_block_is_ignored():
    # Coordinates that are constant in both sets (digit borders) add nothing to the distance.
    g = torch.Generator().manual_seed(4)
    mu1, mu2 = torch.randn(5, generator=g, dtype=F64), torch.randn(5, generator=g, dtype=F64)
    cov1, cov2 = random_spd(5, g), random_spd(5, g)

    def embed(mu: Tensor, cov: Tensor) -> tuple[Tensor, Tensor]:
        big = torch.zeros(8, 8, dtype=F64)
        big[:5, :5] = cov
        return torch.cat([mu, torch.full((3,), -1.0, dtype=F64)]), big

    expected = scipy_frechet(mu1, cov1, mu2, cov2)
    assert frechet_distance(*embed(mu1, cov1), *embed(mu2, cov2)) == pytest.approx(
        expected, rel=1e-9
    )


def test_from_samples_converges_to_closed_form():
    g = torch.Generator().manual_seed(5)
    dim, n = 3, 100_000
    mu1, mu2 = torch.zeros(dim, dtype=F64), torch.tensor([1.0, 0.5, -0.5], dtype=F64)
    cov1, cov2 = random_spd(dim, g), random_spd(dim, g)
    a = mu1 + torch.randn(n, dim, generator=g, dtype=F64) @ torch.linalg.cholesky(cov1).T
    b = mu2 + torch.randn(n, dim, generator=g, dtype=F64) @ torch.linalg.cholesky(cov2).T
    exact = scipy_frechet(mu1, cov1, mu2, cov2)

    # Tolerance from the delta method: FD is differentiable in (mu1, mu2, C1, C2) with gradients
    # 2 (mu1 - mu2), -2 (mu1 - mu2), I - T and I - T^{-1}, where T is the optimal transport map
    # from N(C1) to N(C2), T = C1^{-1/2} (C1^{1/2} C2 C1^{1/2})^{1/2} C1^{-1/2}. For Gaussian data
    # Var(mean) = C / n and Var(tr(G C_hat)) = 2 tr(G C G C) / n, so the estimate's standard
    # deviation is the square root below (0.0185 here; 200 repeats at n = 20000 measured 0.0386
    # against the formula's 0.0414). The O(dim / n) bias is ~1e-4, negligible; allow 4 sd.
    r1 = torch.from_numpy(scipy.linalg.sqrtm(cov1.numpy()).real)
    r1_inv = torch.linalg.inv(r1)
    transport = (
        r1_inv @ torch.from_numpy(scipy.linalg.sqrtm((r1 @ cov2 @ r1).numpy()).real) @ r1_inv
    )
    eye = torch.eye(dim, dtype=F64)
    g1, g2 = eye - transport, eye - torch.linalg.inv(transport)
    delta = mu1 - mu2
    variance = (
        4 * delta @ (cov1 + cov2) @ delta
        + 2 * torch.trace(g1 @ cov1 @ g1 @ cov1)
        + 2 * torch.trace(g2 @ cov2 @ g2 @ cov2)
    ) / n
    estimate = frechet_distance_from_samples(a, b)
    assert abs(estimate - exact) < 4 * math.sqrt(float(variance))
    assert frechet_distance_from_samples(b, a) == pytest.approx(estimate, rel=1e-9)


def test_from_samples_in_more_dimensions_than_points_equals_covariance_form():
    # Fewer points than dimensions: the distance comes from the N x N singular values of
    # B A^T (module docstring); it must equal the D x D covariance computation.
    g = torch.Generator().manual_seed(6)
    dim = 300
    mix = torch.randn(dim, dim, generator=g, dtype=F64) / dim**0.5
    a = torch.randn(120, dim, generator=g, dtype=F64) @ mix
    b = 0.3 + torch.randn(90, dim, generator=g, dtype=F64) @ (1.5 * mix)
    by_covariances = frechet_distance(*feature_statistics(a), *feature_statistics(b))
    assert frechet_distance_from_samples(a, b) == pytest.approx(by_covariances, rel=1e-9)
    assert frechet_distance_from_samples(b, a) == pytest.approx(by_covariances, rel=1e-9)
    assert frechet_distance_from_samples(a.reshape(120, 3, 10, 10), a) == pytest.approx(
        0.0, abs=1e-9
    )
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance_from_samples(a[:1], b)


def test_shape_errors():
    with pytest.raises(ValueError, match="equal length"):
        frechet_distance(torch.zeros(3), torch.eye(3), torch.zeros(4), torch.eye(4))
    with pytest.raises(ValueError, match="covariances"):
        frechet_distance(torch.zeros(3), torch.eye(3), torch.zeros(3), torch.eye(4))
    with pytest.raises(ValueError, match="equal dimensions"):
        frechet_distance_from_samples(torch.zeros(5, 3), torch.zeros(5, 4))
    with pytest.raises(ValueError, match="dimension"):
        kernel_distance(torch.zeros(5, 3), torch.zeros(5, 4))


def test_kernel_distance_matches_explicit_feature_map():
    # (1 + u.v)^3 = phi(u).phi(v) with u = x / sqrt(D) and
    # phi(u) = [1, sqrt(3) u, sqrt(3) u(x)u, u(x)u(x)u]; the unbiased within-set term is
    # (|sum phi|^2 - sum |phi|^2) / (n (n - 1)) and the cross term mean(phi_a) . mean(phi_b).
    g = torch.Generator().manual_seed(6)
    a = torch.randn(30, 3, generator=g, dtype=F64)
    b = torch.randn(20, 3, generator=g, dtype=F64) * 1.5 + 0.3

    def phi(x: Tensor) -> Tensor:
        u = x / math.sqrt(x.shape[1])
        u2 = torch.einsum("ni,nj->nij", u, u).flatten(1)
        u3 = torch.einsum("ni,nj,nk->nijk", u, u, u).flatten(1)
        return torch.cat([torch.ones(len(x), 1, dtype=F64), 3**0.5 * u, 3**0.5 * u2, u3], dim=1)

    def within(f: Tensor) -> Tensor:
        n = len(f)
        return (f.sum(0).square().sum() - f.square().sum()) / (n * (n - 1))

    fa, fb = phi(a), phi(b)
    expected = within(fa) + within(fb) - 2 * fa.mean(0) @ fb.mean(0)
    assert kernel_distance(a, b) == pytest.approx(float(expected), rel=1e-10)


def test_kernel_distance_is_unbiased():
    # Same distribution: E[MMD_u^2] = 0 exactly at any n. The biased (V-statistic) estimate would be
    # off by (E k(x,x) - E k(x,y)) (1/m + 1/n); for N(0, I_2) and m = n = 10, with |x|^2/2 ~ Exp(1)
    # and E (x.y)^2 = 2, that is (E(1 + |x|^2/2)^3 - E(1 + x.y/2)^3) / 5 = (16 - 2.5) / 5 = 2.7.
    g = torch.Generator().manual_seed(7)
    repeats, n = 2000, 10
    draws = torch.randn(repeats, 2, n, 2, generator=g, dtype=F64)
    values = torch.tensor([kernel_distance(x[0], x[1]) for x in draws])
    standard_error = values.std() / math.sqrt(repeats)
    assert abs(values.mean()) < 4 * standard_error
    assert 4 * standard_error < 0.1 * 2.7


# ---- precision / recall (Kynkaanniemi et al. 2019) and within-class spread ----


def brute_force_precision_recall(real: Tensor, fake: Tensor, k: int) -> tuple[float, float]:
    """Oracle: the paper's definition with Python loops over points and exact distances."""

    def radii(s: Tensor) -> list[float]:
        return [sorted(float((p - q).norm()) for q in s)[k] for p in s]  # [0] is the point itself

    def coverage(points: Tensor, support: Tensor) -> float:
        r = radii(support)
        inside = [any(float((p - s).norm()) <= r[j] for j, s in enumerate(support)) for p in points]
        return sum(inside) / len(points)

    return coverage(fake, real), coverage(real, fake)


def test_precision_recall_matches_brute_force():
    g = torch.Generator().manual_seed(8)
    real = torch.randn(40, 5, generator=g, dtype=F64)
    fake = torch.randn(30, 5, generator=g, dtype=F64) * 1.3 + 0.8
    got = precision_recall(real, fake, k=3)
    expected = brute_force_precision_recall(real, fake, k=3)
    assert got == pytest.approx(expected, abs=1e-12)
    assert 0 < got.precision < 1 and 0 < got.recall < 1  # a case where both rules matter


def test_precision_recall_by_hand():
    # Real 0, 1, ..., 9 on a line: with k = 1 every ball has radius 1. Fake {0.5, 20, 20.5}: only
    # 0.5 is inside a real ball -> precision 1/3. Fake radii (k = 1): 19.5, 0.5, 0.5; the ball of
    # radius 19.5 around 0.5 holds all ten real points -> recall 1.
    real = torch.arange(10, dtype=F64)[:, None]
    fake = torch.tensor([[0.5], [20.0], [20.5]], dtype=F64)
    assert precision_recall(real, fake, k=1) == pytest.approx((1 / 3, 1.0), abs=1e-15)
    assert knn_radii(fake, k=1).tolist() == [19.5, 0.5, 0.5]
    assert knn_radii(real, k=2).tolist() == [2.0] + [1.0] * 8 + [2.0]


def test_precision_recall_of_a_set_with_itself_and_a_distant_copy():
    g = torch.Generator().manual_seed(9)
    x = torch.randn(300, 64, generator=g)
    # Four copies of five points: their k = 3 radii are exactly zero, and each copy must still
    # count as inside its own ball (an |a|^2 + |b|^2 - 2 a.b distance would put it at ~1e-7).
    x = torch.cat([x, x[:5], x[:5], x[:5]])
    assert (knn_radii(x, k=3)[:5] == 0).all()
    assert precision_recall(x, x) == (1.0, 1.0)
    # Radii are at most ~2 sqrt(2 * 64) = 23 here; a shift by 100 in every coordinate is disjoint.
    assert precision_recall(x, x + 100) == (0.0, 0.0)
    with pytest.raises(ValueError, match="k must be"):
        precision_recall(x[:3], x[:3], k=3)


def test_within_class_spread_matches_numpy():
    g = torch.Generator().manual_seed(10)
    labels = torch.randint(0, 4, (200,), generator=g)
    labels[labels == 3] = 2  # class 3 empty
    labels[0] = 3  # ...now a single sample: no spread defined
    x = torch.randn(200, 6, generator=g) * (1 + labels[:, None])
    spread = within_class_spread(x, labels, num_classes=5)
    for c in range(3):
        members = x[labels == c].double().numpy()
        expected = np.sqrt(np.trace(np.cov(members, rowvar=False)))
        assert float(spread[c]) == pytest.approx(expected, rel=1e-12)
    assert torch.isnan(spread[3:]).all()
    with pytest.raises(ValueError, match="labels must lie"):
        within_class_spread(x, labels, num_classes=3)
