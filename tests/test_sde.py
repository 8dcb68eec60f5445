"""Score SDEs: coefficients against closed forms, the forward SDE against the schedule's marginal
(Monte Carlo), and the reverse SDE, probability-flow ODE and predictor-corrector samplers against
exact Gaussian oracles."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from difflab.gaussian.oracles import GaussianOracle
from difflab.gaussian.schedules import (
    SubVPSchedule,
    VESchedule,
    cosine_logsnr,
    linear_beta,
    vp_linear,
)
from difflab.gaussian.sde import (
    ForwardSDE,
    langevin_corrector_step,
    predictor_corrector,
    probability_flow,
    probability_flow_velocity,
    reverse_sde,
)

F64 = torch.float64
BETA_MIN, BETA_MAX = 0.1, 20.0
MU = torch.tensor([0.5, -1.0], dtype=F64)
SIGMA = torch.tensor([[0.25, 0.125], [0.125, 0.2]], dtype=F64)  # full covariance, eigvals 0.35, 0.1


def _beta(t: torch.Tensor) -> torch.Tensor:
    return BETA_MIN + t * (BETA_MAX - BETA_MIN)


def _beta_integral(t: torch.Tensor) -> torch.Tensor:
    return BETA_MIN * t + 0.5 * (BETA_MAX - BETA_MIN) * t**2


def _song_coefficients(kind: str, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(f, g^2)`` of Song et al.'s three SDEs, written out (their eqs. 9, 11 and App. B)."""
    if kind == "vp":
        return -0.5 * _beta(t), _beta(t)
    if kind == "sub-vp":
        return -0.5 * _beta(t), _beta(t) * (1 - torch.exp(-2 * _beta_integral(t)))
    sigma = 0.01 * 5000.0**t  # VESchedule(0.01, 50)
    return torch.zeros_like(t), 2 * sigma**2 * math.log(5000.0)


SONG = {"vp": vp_linear(), "sub-vp": SubVPSchedule(), "ve": VESchedule(0.01, 50.0)}


# ------------------------------------------------------------------------------------------------
# Coefficients and schedules
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", SONG)
def test_coefficients_match_song_et_al(kind):
    t = torch.linspace(0.01, 1.0, 23, dtype=F64)
    f, g2 = ForwardSDE(SONG[kind]).coefficients(t)
    f_ref, g2_ref = _song_coefficients(kind, t)
    torch.testing.assert_close(f, f_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g2, g2_ref, rtol=1e-10, atol=1e-12)


def test_coefficients_of_ddpm_betas_are_piecewise_constant():
    # Between grid points log alpha_bar is linear with slope T log(1 - beta_i), so
    # f = T log(1 - beta_i) / 2 and g^2 = -T log(1 - beta_i) (the continuous beta(t) of DDPM).
    schedule = linear_beta(T=1000)
    i = torch.tensor([1, 10, 500, 1000])
    t = (i - 0.5) / 1000.0  # mid-segment
    f, g2 = ForwardSDE(schedule).coefficients(t.to(F64))
    rate = 1000.0 * torch.log1p(-schedule.betas[i - 1])
    torch.testing.assert_close(f, rate / 2, rtol=1e-9, atol=0)
    torch.testing.assert_close(g2, -rate, rtol=1e-9, atol=0)


def test_diffusion_and_drift_use_the_same_coefficients():
    sde = ForwardSDE(cosine_logsnr())
    t = torch.tensor([0.2, 0.7], dtype=F64)
    x = torch.randn(2, 3, dtype=F64)
    f, g2 = sde.coefficients(t)
    torch.testing.assert_close(sde.drift(x, t), f[:, None] * x)
    torch.testing.assert_close(sde.diffusion(t), g2.sqrt())
    # VP: g^2 = -2 f (alpha^2 + sigma^2 = 1 gives d sigma^2/dt = -2 alpha alpha').
    torch.testing.assert_close(g2, -2 * f)


@pytest.mark.parametrize("schedule", [vp_linear(), SubVPSchedule()], ids=["vp", "sub-vp"])
def test_song_schedules_closed_forms_and_inverse(schedule):
    t = torch.linspace(0.0, 1.0, 41, dtype=F64)
    alpha, sigma = schedule.alpha_sigma(t)
    b = _beta_integral(t)
    torch.testing.assert_close(alpha, torch.exp(-b / 2), rtol=1e-12, atol=0)
    expected_sigma = (1 - torch.exp(-b)) if schedule.config()["kind"] == "sub-vp" else None
    if expected_sigma is None:
        expected_sigma = torch.sqrt(1 - torch.exp(-b))
    torch.testing.assert_close(sigma, expected_sigma, rtol=1e-10, atol=1e-15)
    inner = t[1:]  # lambda(0) = +inf
    torch.testing.assert_close(
        schedule.t_of_log_snr(schedule.log_snr(inner)), inner, rtol=1e-9, atol=1e-12
    )


def test_vp_linear_is_the_continuous_limit_of_ddpm_linear_betas():
    # DDPM's beta_i = linspace(1e-4, 0.02, 1000) is beta(t)/T on the grid, so log alpha_bar
    # agrees with -B(t) up to O(1/T) relative terms: 1.5% at t = 0.05, 0.7% at t = 1.
    t = torch.linspace(0.05, 1.0, 20, dtype=F64)
    log_ab_ddpm = 2 * torch.log(linear_beta(1000).alpha_sigma(t)[0])
    log_ab_vp = 2 * torch.log(vp_linear().alpha_sigma(t)[0])
    assert float(((log_ab_ddpm - log_ab_vp) / log_ab_vp).abs().max()) < 0.02


# ------------------------------------------------------------------------------------------------
# Forward SDE: Euler-Maruyama paths against the closed-form marginal
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["vp", "sub-vp", "ve", "ddpm"])
def test_forward_sde_marginal_matches_schedule(kind):
    """Simulate ``dx = f x dt + g dw`` from a fixed ``x_0`` by Euler-Maruyama (500 steps to
    ``t = 0.6``, coefficients at each step's midpoint) and compare the empirical mean and
    variance at ``t = 0.6`` with ``q(x_t | x_0) = N(alpha x_0, sigma^2 I)``. For VE the SDE
    runs from ``sigma(0+) = sigma_min``: its variance is ``sigma^2 - sigma_min^2`` (sde.py)."""
    schedule = linear_beta(1000) if kind == "ddpm" else SONG[kind]
    sde = ForwardSDE(schedule)
    n, steps, t_end = 20000, 200, 0.6
    g = torch.Generator().manual_seed(0)
    x0 = torch.tensor([1.0, -2.0], dtype=F64)
    x = x0.expand(n, 2).clone()
    ts = torch.linspace(0.0, t_end, steps + 1, dtype=F64)
    for i in range(steps):
        t, h = 0.5 * (ts[i] + ts[i + 1]), ts[i + 1] - ts[i]  # coefficients at the midpoint
        noise = torch.randn(x.shape, generator=g, dtype=F64)
        x = x + sde.drift(x, t) * h + sde.diffusion(t) * h.sqrt() * noise
    m = sde.marginal(x0[None], torch.tensor(t_end, dtype=F64))
    var = m.var.squeeze() - (0.01**2 if kind == "ve" else 0.0)
    # Monte Carlo: SE(mean) = sd / sqrt(n) and SE(var) = var sqrt(2 / n) (1% of var); the
    # Euler-Maruyama bias of the first two moments is O(h) (h = 3e-3, with O(1) coefficients
    # times h: under 0.5% relative). 5 SE + 0.5%.
    sd = var.sqrt()
    assert float((x.mean(0) - m.mean[0]).abs().max()) < 5 * sd / math.sqrt(n) + 5e-3 * sd
    rel = (x.var(0) / var - 1).abs().max()
    assert float(rel) < 5 * math.sqrt(2 / n) + 5e-3, float(rel)


# ------------------------------------------------------------------------------------------------
# Reverse-time samplers on an exact Gaussian oracle
# ------------------------------------------------------------------------------------------------


def _em_moments(kind: str, ts: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact mean and covariance of the reverse Euler-Maruyama chain for Gaussian data.

    The oracle's score is affine, ``-S^{-1} (x - alpha mu)`` with ``S = alpha^2 Sigma +
    sigma^2 I``, so each step ``x <- A x + b + g sqrt(h) z`` maps a Gaussian to a Gaussian:
    ``m <- A m + b``, ``C <- A C A^T + g^2 h I``; the last step is the oracle's ``E[x_0 | x_t]``.
    Written independently of the library (Song et al.'s closed-form ``f``, ``g``)."""
    schedule, eye = SONG[kind], torch.eye(2, dtype=F64)
    m, c = torch.zeros(2, dtype=F64), eye * schedule.prior_std**2
    for t, s in itertools.pairwise(ts):
        tt = torch.tensor(t, dtype=F64)
        alpha, sigma = schedule.alpha_sigma(tt)
        s_inv = torch.linalg.inv(alpha**2 * SIGMA + sigma**2 * eye)
        if s == 0.0:
            gain = alpha * SIGMA @ s_inv
            return MU + gain @ (m - alpha * MU), gain @ c @ gain.T
        f, g2 = _song_coefficients(kind, tt)
        h = t - s
        a = (1 - h * f) * eye - h * g2 * s_inv
        m = a @ m + h * g2 * s_inv @ (alpha * MU)
        c = a @ c @ a.T + g2 * h * eye
    raise AssertionError("ts must end with 0")


def _moment_errors(x, mean, cov):
    """Errors of the sample mean and covariance in units of their Monte Carlo standard errors:
    ``SE(mean_i) = sqrt(C_ii / n)``, ``SE(C_ij) = sqrt((C_ii C_jj + C_ij^2) / n)``."""
    n = x.shape[0]
    se_mean = (cov.diag() / n).sqrt()
    se_cov = ((cov.diag()[:, None] * cov.diag()[None, :] + cov**2) / n).sqrt()
    return ((x.mean(0) - mean) / se_mean).abs().max(), ((torch.cov(x.T) - cov) / se_cov).abs().max()


@pytest.mark.parametrize("kind", SONG)
def test_reverse_sde_matches_its_exact_chain_and_the_data(kind):
    schedule = SONG[kind]
    oracle = GaussianOracle(MU, SIGMA, schedule)
    n, steps = 10000, 100
    ts = torch.linspace(1.0, 0.0, steps + 1, dtype=F64)
    g = torch.Generator().manual_seed(1)
    x = reverse_sde(oracle, torch.randn(n, 2, generator=g, dtype=F64) * schedule.prior_std, ts,
                    generator=g)  # fmt: skip
    mean, cov = _em_moments(kind, ts.tolist())
    # The sampler is the chain: within 5 Monte Carlo standard errors of its exact moments.
    err_mean, err_cov = _moment_errors(x, mean, cov)
    assert err_mean < 5 and err_cov < 5, (float(err_mean), float(err_cov))
    # The chain reproduces the data up to Euler-Maruyama's bias (at 100 steps at most 1.5% of
    # the largest variance, for sub-VP; O(h) for VP and sub-VP, faster for VE): bound it by 2%,
    # and check that it falls at least linearly in h from 50 to 100 steps.
    assert float((mean - MU).abs().max()) < 0.02 * 0.5
    assert float((cov - SIGMA).abs().max()) < 0.02 * 0.25
    _, coarse_cov = _em_moments(kind, torch.linspace(1.0, 0.0, 51, dtype=F64).tolist())
    ratio = (coarse_cov - SIGMA).abs().max() / (cov - SIGMA).abs().max()
    assert float(ratio) > 1.6, float(ratio)


def _exact_flow(x_ve: torch.Tensor, sigma_from: float, sigma_to: float) -> torch.Tensor:
    """The probability-flow map of Gaussian data in the VE variable: with ``A(s) = (Sigma +
    s^2 I)^{1/2}``, ``x~(s') = mu + A(s') A(s)^{-1} (x~(s) - mu)`` (the ODE is linear and ``A``
    commutes with itself)."""
    lam, vec = torch.linalg.eigh(SIGMA)
    scale = ((lam + sigma_to**2) / (lam + sigma_from**2)).sqrt()
    return MU + ((x_ve - MU) @ vec) * scale @ vec.T


@pytest.mark.parametrize(
    "schedule",
    [vp_linear(), SubVPSchedule(), VESchedule(0.01, 50.0), cosine_logsnr(), linear_beta(1000)],
    ids=["vp", "sub-vp", "ve", "cosine", "ddpm"],
)
def test_probability_flow_is_the_exact_transport_map(schedule):
    """RK4 against the closed-form flow, sample by sample: the output is ``E[x_0 | x_{t_{n-1}}]``
    of the exact flow's ``x_{t_{n-1}}``. Grids: ``n`` noise levels geometric in ``sigma_ve``
    from ``sigma_ve(1)`` to 0.01 (times from the schedule), then 0. The error must fall as
    ``h^4``: by 16 when the steps halve (asserted > 12), and be below 5e-4 at 60 levels
    (measured: 5e-5 for VP, sub-VP, DDPM; 2e-5 for VE; 2e-4 for cosine, whose ``sigma_ve(1)``
    is 1800, so its steps in log-SNR are the largest)."""
    oracle = GaussianOracle(MU, SIGMA, schedule)
    s_max = float(schedule.sigma_ve(torch.ones((), dtype=F64)))
    g = torch.Generator().manual_seed(2)
    x1 = torch.randn(2000, 2, generator=g, dtype=F64) * schedule.prior_std
    errors, outputs = [], []
    for n in (30, 60):
        sigmas = torch.logspace(math.log10(s_max), -2, n, dtype=F64)
        ts = torch.cat([schedule.t_of_sigma_ve(sigmas), torch.zeros(1, dtype=F64)])
        out = probability_flow(oracle, x1, ts)
        alpha1, alpha_last = schedule.alpha_sigma(ts[[0, -2]])[0]
        sigma1, sigma_last = schedule.sigma_ve(ts[[0, -2]]).tolist()
        x_last = alpha_last * _exact_flow(x1 / alpha1, sigma1, sigma_last)
        expected = oracle(x_last, ts[-2].expand(len(x1))).x0
        errors.append(float((out - expected).abs().max()))
        outputs.append(out)
    assert errors[1] < 5e-4 and errors[0] / errors[1] > 12, errors
    # And the data: Monte Carlo (5 SE) plus the last step's shrinkage, which is
    # O(sigma_last^2 / eig_min(Sigma)) = 1e-4 / 0.1 = 0.1%.
    err_mean, err_cov = _moment_errors(outputs[1], MU, SIGMA)
    assert err_mean < 5 and err_cov < 5, (float(err_mean), float(err_cov))


def test_probability_flow_drift_is_the_log_snr_velocity_in_t():
    """Song et al.'s ``dx/dt = f x - g^2 score / 2`` equals ``f x + alpha v dlambda/dt`` with
    ``v = dx~/dlambda`` (probability_flow_velocity) and ``dlambda/dt`` by central differences."""
    schedule = cosine_logsnr()
    oracle = GaussianOracle(MU, SIGMA, schedule)
    t = torch.tensor([0.2, 0.5, 0.8], dtype=F64)
    x = torch.randn(3, 2, dtype=F64, generator=torch.Generator().manual_seed(7))
    pred = oracle(x, t)
    sde = ForwardSDE(schedule)
    h = 1e-6
    dlam = (schedule.log_snr(t + h) - schedule.log_snr(t - h)) / (2 * h)
    f, _ = sde.coefficients(t)
    alpha = schedule.alpha_sigma(t)[0]
    expected = f[:, None] * x + (alpha * dlam)[:, None] * probability_flow_velocity(pred)
    torch.testing.assert_close(sde.probability_flow_drift(pred, t), expected, rtol=1e-7, atol=0)


@pytest.mark.parametrize("kind", ["vp", "ve"])
def test_predictor_corrector_reproduces_the_data(kind):
    """PC with Song et al.'s snr = 0.16 and one corrector step per level. Tolerance: 5 Monte Carlo
    SE plus the samplers' biases: Euler-Maruyama's O(h) (1.5% at 100 steps, see the test above)
    and the corrector's, which inflates a Gaussian's variance by ``1 / (1 - r^2) - 1 ~ 2.6%``
    (unadjusted Langevin with step ``eps ~ 2 r^2 var``). Together: 4% of the largest variance."""
    schedule = SONG[kind]
    oracle = GaussianOracle(MU, SIGMA, schedule)
    n = 10000
    g = torch.Generator().manual_seed(3)
    x1 = torch.randn(n, 2, generator=g, dtype=F64) * schedule.prior_std
    x = predictor_corrector(oracle, x1, torch.linspace(1.0, 0.0, 101, dtype=F64), generator=g)
    se_mean = (SIGMA.diag() / n).sqrt()
    assert bool(((x.mean(0) - MU).abs() < 5 * se_mean + 0.01 * 0.5).all())
    se_cov = ((SIGMA.diag()[:, None] * SIGMA.diag()[None, :] + SIGMA**2) / n).sqrt()
    assert bool(((torch.cov(x.T) - SIGMA).abs() < 5 * se_cov + 0.04 * 0.25).all())


def test_langevin_corrector_leaves_the_marginal_nearly_invariant():
    """Start exactly in ``q_t`` and take 20 corrector steps with the exact score: the mean stays
    (5 SE) and the covariance moves by at most the unadjusted-Langevin bias ``~ r^2`` (2.6% for
    r = 0.16, 0.16% for r = 0.04) plus 5 SE; with r = 0.04 the inflation is below 1%."""
    schedule = vp_linear()
    oracle = GaussianOracle(MU, SIGMA, schedule)
    n = 20000
    t = torch.tensor(0.3, dtype=F64)
    alpha, sigma = schedule.alpha_sigma(t)
    cov_t = alpha**2 * SIGMA + sigma**2 * torch.eye(2, dtype=F64)
    g = torch.Generator().manual_seed(4)
    x = alpha * oracle.sample(n, g) + sigma * torch.randn(n, 2, generator=g, dtype=F64)
    for snr, bias in [(0.16, 0.035), (0.04, 0.01)]:
        y = x
        for _ in range(20):
            y = langevin_corrector_step(y, oracle(y, t.expand(n)).score, snr, g)
        err_mean, _ = _moment_errors(y, alpha * MU, cov_t)
        assert err_mean < 5
        scale = cov_t.diag().max()
        se = 5 * scale * math.sqrt(2 / n)
        assert float((torch.cov(y.T) - cov_t).abs().max()) < bias * scale + se


# ------------------------------------------------------------------------------------------------
# Contract
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sampler", [reverse_sde, probability_flow, predictor_corrector])
def test_callback_and_last_step(sampler):
    schedule = vp_linear()
    oracle = GaussianOracle(MU, SIGMA, schedule)
    ts = torch.tensor([1.0, 0.6, 0.3, 0.1, 0.0], dtype=F64)
    seen = []

    def callback(i, t, x_t, x0):
        assert isinstance(t, float)
        seen.append((i, t, x_t.clone(), x0.clone()))

    x1 = torch.randn(8, 2, dtype=F64, generator=torch.Generator().manual_seed(5))
    out = sampler(oracle, x1, ts, generator=torch.Generator().manual_seed(6), callback=callback)
    assert [s[0] for s in seen] == [0, 1, 2, 3]
    assert [s[1] for s in seen] == ts[:-1].tolist()
    torch.testing.assert_close(seen[0][2], x1)
    # The last step returns E[x_0 | x_t] at the last positive time: no residual noise.
    torch.testing.assert_close(out, seen[-1][3])
    torch.testing.assert_close(out, oracle(seen[-1][2], ts[-2].expand(8)).x0)


@pytest.mark.parametrize(
    "ts",
    [[1.0, 0.5], [0.5, 0.6, 0.0], [1.5, 0.5, 0.0], [1.0]],
    ids=["no-zero", "increasing", "above-one", "single"],
)
def test_bad_grids_are_rejected(ts):
    oracle = GaussianOracle(MU, SIGMA, vp_linear())
    with pytest.raises(ValueError):
        reverse_sde(oracle, torch.zeros(2, 2, dtype=F64), torch.tensor(ts, dtype=F64))
