"""PF-ODE likelihood on Gaussian data, whose probability-flow ODE is solvable in closed form.

For data ``N(mu, Sigma)`` the flow in the VE variable is linear: with ``A(s) = (Sigma +
s^2 I)^{1/2}``, ``x~(s1) = mu + A(s1) A(s0)^{-1} (x~(s0) - mu)``, and the integrated divergence
is the log-determinant ``tr M``, ``M = log(A(s1) A(s0)^{-1})``. So the model's exact
log-density (the prior pulled back through the exact flow) is known.
"""

from __future__ import annotations

import math

import pytest
import torch

from difflab.gaussian.likelihood import ode_bits_per_dim, ode_log_likelihood
from difflab.gaussian.oracles import GaussianOracle
from difflab.gaussian.schedules import (
    EDMSchedule,
    VESchedule,
    cosine_logsnr,
    linear_beta,
    vp_linear,
)

F64 = torch.float64
MU = torch.tensor([0.3, -0.5, 0.1, 0.0], dtype=F64)
DIAG = torch.tensor([0.5, 0.1, 0.02, 1.0], dtype=F64)
S0 = 1e-3  # sigma_min, the library's default


def _full_cov() -> torch.Tensor:
    a = torch.randn(4, 4, dtype=F64, generator=torch.Generator().manual_seed(0))
    return a @ a.T / 4 + 0.05 * torch.eye(4, dtype=F64)


def _ends(schedule):
    """``(alpha(t0), alpha(1), sigma_ve(1))`` with ``sigma_ve(t0) = S0``."""
    t0 = schedule.t_of_sigma_ve(torch.tensor(S0, dtype=F64))
    one = torch.ones((), dtype=F64)
    return schedule.alpha_sigma(t0)[0], schedule.alpha_sigma(one)[0], schedule.sigma_ve(one)


def _exact_flow(schedule, cov, x):
    """``(x_1, log-det)``: the exact flow of ``x`` (at ``sigma_min``) to ``t = 1`` and ``tr M``."""
    a0, a1, s1 = _ends(schedule)
    lam, vec = torch.linalg.eigh(cov)
    x_ve1 = MU + ((x / a0 - MU) @ vec) * ((lam + s1**2) / (lam + S0**2)).sqrt() @ vec.T
    return a1 * x_ve1, 0.5 * torch.log((lam + s1**2) / (lam + S0**2)).sum()


def _exact_model_log_density(schedule, cov, x):
    """``log N(x_1; 0, prior_std^2 I) + D log(alpha(1) / alpha(t0)) + tr M``."""
    a0, a1, _ = _ends(schedule)
    x1, logdet = _exact_flow(schedule, cov, x)
    var, dim = schedule.prior_std**2, x.shape[1]
    log_prior = -0.5 * (x1.square().sum(1) / var + dim * math.log(2 * math.pi * var))
    return log_prior + dim * torch.log(a1 / a0) + logdet


SCHEDULES = {
    "vp": vp_linear(),
    "ve": VESchedule(1e-4, 50.0),  # its smallest level must be below sigma_min = 1e-3
    "edm": EDMSchedule(),
    "cosine": cosine_logsnr(),
    "ddpm": linear_beta(1000),
}


@pytest.mark.parametrize("name", SCHEDULES)
def test_reference_is_the_oracle_density_up_to_the_prior(name):
    """The closed-form model density, with the prior replaced by the true ``q_1``, must be the
    oracle's own ``log q_{t0}(x)``: this checks the reference (change of variables and
    log-determinant) against an independent formula, to rounding."""
    schedule = SCHEDULES[name]
    cov = _full_cov()
    oracle = GaussianOracle(MU, cov, schedule)
    x = oracle.sample(16, torch.Generator().manual_seed(1))
    x1, _ = _exact_flow(schedule, cov, x)
    var = schedule.prior_std**2
    log_prior = -0.5 * (x1.square().sum(1) / var + 4 * math.log(2 * math.pi * var))
    one = torch.ones((), dtype=F64)
    swapped = _exact_model_log_density(schedule, cov, x) - log_prior + oracle.log_prob(x1, one)
    t0 = schedule.t_of_sigma_ve(torch.tensor(S0, dtype=F64))
    torch.testing.assert_close(swapped, oracle.log_prob(x, t0), rtol=1e-10, atol=1e-9)


@pytest.mark.parametrize("name", SCHEDULES)
def test_matches_the_exact_model_density(name):
    """Diagonal covariance: the Jacobian of the flow is diagonal, so Rademacher probes give the
    divergence exactly and the only error is RK4's. It must fall as ``h^4`` (16x per halving;
    asserted > 10, measured 13-14 from 30 to 60 steps) and be below 4e-3 nats at 60 steps
    (measured 2.6e-4 for VE to 1.7e-3 for cosine, whose log-SNR range is the widest)."""
    schedule = SCHEDULES[name]
    oracle = GaussianOracle(MU, torch.diag(DIAG), schedule)
    g = torch.Generator().manual_seed(2)
    x = oracle.sample(32, g)
    exact = _exact_model_log_density(schedule, torch.diag(DIAG), x)
    errors = []
    for n_steps in (30, 60):
        ll = ode_log_likelihood(oracle, x, n_steps=n_steps, generator=g)
        assert ll.dtype == F64 and ll.shape == (32,)
        errors.append(float((ll - exact).abs().max()))
    assert errors[1] < 4e-3 and errors[0] / errors[1] > 10, errors
    # The model's density is the data's up to the prior mismatch at t = 1 (alpha(1) mu != 0)
    # and sigma_min: below 0.05 nats here, against a density spread over ~10 nats.
    t0 = schedule.t_of_sigma_ve(torch.tensor(S0, dtype=F64))
    assert float((ll - oracle.log_prob(x, t0)).abs().max()) < 0.05


@pytest.mark.parametrize(
    ("probe", "n_probes"), [("gaussian", 1), ("gaussian", 4), ("rademacher", 2)]
)
def test_hutchinson_estimate_is_unbiased_with_the_predicted_variance(probe, n_probes):
    """Full covariance. With probes ``z`` fixed along the trajectory, the estimate of the
    integrated divergence is ``mean_k z_k^T M z_k`` with ``M`` constant (the flow is linear),
    so the error has mean 0 and variance ``2 ||M||_F^2 / n`` (Gaussian probes) or
    ``2 sum_{i != j} M_ij^2 / n`` (Rademacher). Over B = 512 examples: the mean within 4 SE; the
    sample variance within [0.6, 1.5] of the prediction (its relative SE is at most
    ``sqrt(14 / B) = 0.17`` for a quadratic form, plus RK4's error, 1e-3 nats at 40 steps)."""
    schedule = vp_linear()
    cov = _full_cov()
    oracle = GaussianOracle(MU, cov, schedule)
    g = torch.Generator().manual_seed(3)
    x = oracle.sample(512, g)
    ll = ode_log_likelihood(oracle, x, n_steps=40, n_probes=n_probes, probe=probe, generator=g)
    error = ll - _exact_model_log_density(schedule, cov, x)
    _, _, s1 = _ends(schedule)
    lam, vec = torch.linalg.eigh(cov)
    m = vec @ torch.diag(0.5 * torch.log((lam + s1**2) / (lam + S0**2))) @ vec.T
    off = m - torch.diag(m.diag())
    var = 2 * (m.square().sum() if probe == "gaussian" else off.square().sum()) / n_probes
    assert float(error.mean().abs()) < 4 * float((var / len(x)).sqrt()) + 1e-3
    ratio = float(error.var() / var)
    assert 0.6 < ratio < 1.5, ratio


def test_bits_per_dim_of_8_bit_data():
    """Data on the 8-bit grid ``x = 2k/255 - 1``. For Gaussian data the model is Gaussian,
    ``N(m, diag(tau^2))`` (the prior pushed through the exact flow), so with ``w = 2/255``

        E_u[bits/dim] = (-log p(x) + sum_i w^2 / (24 tau_i^2)) / (D ln 2) + log2(127.5)

    exactly (``E[(x + w(u - 1/2) - m)^2] = (x - m)^2 + w^2/12``), and it bounds
    ``-log2 P(k) / D`` with ``P(k)`` the model's mass on the bin (Jensen). One point, R = 400
    dequantisations: mean within 4 SE (SE ~ 4e-6 bits) plus RK4's error at 60 steps (below
    5e-4 nats / (D ln 2) = 2e-4 bits); measured difference 1e-6 bits. A wrong offset such as
    log2 128 would be off by 6e-3, a wrong bin width by 1 bit."""
    schedule = vp_linear()
    cov = torch.diag(DIAG)
    oracle = GaussianOracle(MU, cov, schedule)
    k = torch.tensor([166.0, 64.0, 140.0, 128.0], dtype=F64)
    x = (2 * k / 255 - 1).expand(400, 4)
    g = torch.Generator().manual_seed(4)
    bpd = ode_bits_per_dim(oracle, x, n_steps=60, generator=g)
    # The model: x = alpha0 (mu + A0 A1^-1 (x1 / alpha1 - mu)), x1 ~ N(0, prior_std^2 I).
    a0, a1, s1 = _ends(schedule)
    gain = ((DIAG + S0**2) / (DIAG + s1**2)).sqrt()
    mean = a0 * (MU - gain * MU)
    tau = a0 * gain * schedule.prior_std / a1
    w, dim = 2 / 255, 4
    log_p = torch.distributions.Normal(mean, tau).log_prob(x[0]).sum()
    expected = (-log_p + (w**2 / (24 * tau**2)).sum()) / (dim * math.log(2)) + math.log2(127.5)
    se = bpd.std() / math.sqrt(len(bpd))
    assert abs(float(bpd.mean() - expected)) < 4 * float(se) + 2e-4, (float(bpd.mean()), expected)
    normal = torch.distributions.Normal(mean, tau)
    mass = (normal.cdf(x[0] + w / 2) - normal.cdf(x[0] - w / 2)).log().sum()
    discrete_bits = float(-mass / (dim * math.log(2)))
    assert discrete_bits <= expected < discrete_bits + 1e-3


def test_sigma_min_outside_the_schedule_is_rejected():
    oracle = GaussianOracle(MU, torch.diag(DIAG), VESchedule(0.01, 50.0))
    with pytest.raises(ValueError, match="outside the schedule"):
        ode_log_likelihood(oracle, torch.zeros(2, 4, dtype=F64), sigma_min=1e-3)
