"""Samplers driven by exact oracles: moments, step laws, equivalences, convergence orders.

Issue 2: DDPM and DDIM reproduce a correlated Gaussian. Issue 3: every fast sampler's error
against a fine reference solution falls at its theoretical order, and its distribution error
against exact samples falls as steps grow.
"""

import math
from functools import partial

import pytest
import torch

from difflab.gaussian import samplers as S
from difflab.gaussian.oracles import GaussianMixtureOracle, GaussianOracle
from difflab.gaussian.parameterization import KINDS, Denoiser
from difflab.gaussian.process import posterior_coefficients, transition_coefficients
from difflab.gaussian.schedules import EDMSchedule, VESchedule, cosine_logsnr, linear_beta

F64 = torch.float64
LINEAR = linear_beta(1000)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _gaussian_4d() -> GaussianOracle:
    """A correlated 4-D Gaussian: eigenvalues 0.3, 0.6, 1.2, 2.0 in a random basis."""
    Q, _ = torch.linalg.qr(torch.randn(4, 4, generator=_gen(0), dtype=F64))
    cov = Q @ torch.diag(torch.tensor([0.3, 0.6, 1.2, 2.0], dtype=F64)) @ Q.T
    return GaussianOracle(torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=F64), cov, LINEAR)


def _from_q1(oracle, n: int, gen: torch.Generator) -> torch.Tensor:
    """Exact draws of x_1 ~ q_1. Starting there rather than at N(0, I) removes the prior
    mismatch of the linear schedule (alpha_1 = 0.0064 would shift the output mean by
    alpha_1 Sigma^(1/2) mu ~ 0.02), so only the sampler's own error remains."""
    a1, s1 = LINEAR.alpha_sigma(torch.ones((), dtype=F64))
    return a1 * oracle.sample(n, gen) + s1 * torch.randn(n, oracle.dim, generator=gen, dtype=F64)


def _assert_moments(out, mu, cov, bias):
    """Sample mean and covariance of ``out`` against ``(mu, cov)``, per entry within 4 standard
    errors plus a known deterministic ``bias`` of the sampler. Standard errors for n draws:
    mean_j: sqrt(C_jj / n); covariance_jk: sqrt((C_jj C_kk + C_jk^2) / n) (Gaussian fourth
    moments). 4 SE per entry: for the 14 distinct entries the chance that any one exceeds it by
    sampling noise alone is < 14 * 6.3e-5 ~ 1e-3 (and the seeds are fixed)."""
    n = out.shape[0]
    d = cov.diag()
    se_mean = (d / n).sqrt()
    se_cov = ((d[:, None] * d[None] + cov**2) / n).sqrt()
    assert ((out.mean(0) - mu).abs() <= 4 * se_mean).all(), (out.mean(0) - mu) / se_mean
    err = (torch.cov(out.T) - cov).abs()
    assert (err <= 4 * se_cov + bias).all(), err


# ================================================================================================
# Issue 2: DDPM and DDIM on a Gaussian
# ================================================================================================


@pytest.mark.parametrize("variance,bias", [("beta_tilde", 0.011), ("beta", 0.0012)])
def test_ddpm_1000_steps_reproduces_a_correlated_gaussian(variance, bias):
    """n = 4000 draws: SE(mean) <= sqrt(1.33 / 4000) = 0.018, SE(cov) <= sqrt(2 * 1.33^2 / 4000)
    = 0.030. The deterministic bias of DDPM with the exact denoiser at T = 1000 is the
    reverse kernel's missing c_x0^2 Cov[x0 | x_t]; propagating the exact moments through the
    1000 affine-Gaussian steps gives max |Cov_out - Sigma| = 0.0107 (beta_tilde) and 0.0011
    (beta), and an exact mean; these are the ``bias`` allowances."""
    oracle = _gaussian_4d()
    gen = _gen(1)
    out = S.ddpm(oracle, _from_q1(oracle, 4000, gen), LINEAR.timesteps(1000), generator=gen,
                 variance=variance)  # fmt: skip
    _assert_moments(out, oracle.mean, oracle.cov, bias)


def test_ddim_50_steps_reproduces_a_correlated_gaussian():
    """Deterministic DDIM with the Gaussian oracle is an affine map x_1 -> A x_1 + b, so its
    exact output law is N(A m_1 + b, A C_1 A^T) for x_1 ~ q_1 = N(m_1, C_1): read A and b off
    five runs (x = 0 and the basis vectors). The mean is exact (the flow maps alpha_t mu to
    alpha_s mu at every step); the covariance carries Euler's first-order error, 0.089 at 50
    steps and half that at 100. Then n = 6000 Monte Carlo draws agree with (mu, Sigma) within
    4 SE (see _assert_moments) plus that exact 0.09."""
    oracle = _gaussian_4d()
    a1, s1 = LINEAR.alpha_sigma(torch.ones((), dtype=F64))
    m1, C1 = a1 * oracle.mean, a1**2 * oracle.cov + s1**2 * torch.eye(4, dtype=F64)
    errors = {}
    for n in (50, 100):
        probe = torch.cat([torch.zeros(1, 4, dtype=F64), torch.eye(4, dtype=F64)])
        out = S.ddim(oracle, probe, LINEAR.timesteps(n))
        b, A = out[0], (out[1:] - out[0]).T
        assert (A @ m1 + b - oracle.mean).abs().max() < 1e-10
        errors[n] = float((A @ C1 @ A.T - oracle.cov).abs().max())
    assert errors[50] < 0.09 and 1.8 < errors[50] / errors[100] < 2.2, errors
    gen = _gen(2)
    out = S.ddim(oracle, _from_q1(oracle, 6000, gen), LINEAR.timesteps(50))
    _assert_moments(out, oracle.mean, oracle.cov, errors[50])


@pytest.mark.parametrize("schedule", [LINEAR, VESchedule(0.01, 50.0)], ids=["vp", "ve"])
@pytest.mark.parametrize("variance", ["beta_tilde", "beta"])
def test_one_ddpm_step_has_the_posterior_mean_and_the_chosen_variance(schedule, variance):
    """From a fixed x_t (t = 0.6) one step to s = 0.45: x_s ~ N(c_xt x_t + c_x0 x0_hat, v),
    with v the posterior variance (beta_tilde) or the transition variance sigma_{t|s}^2 (beta).
    n = 20000 copies: the sample mean is within 4 sqrt(v / n) and the sample variance (pooled
    over D = 2, so 40000 terms) within 4 sqrt(2 v^2 / 40000) = 0.028 v of the formula."""
    oracle = GaussianMixtureOracle(
        torch.tensor([[1.0, 0.0], [-1.0, 1.0]]), torch.tensor([0.5, 0.3]), None, schedule
    )
    t, s = torch.tensor(0.6, dtype=F64), torch.tensor(0.45, dtype=F64)
    x_t = torch.tensor([[0.3, -0.7]], dtype=F64).expand(20000, 2) * schedule.prior_std
    seen = {}
    S.ddpm(oracle, x_t, torch.tensor([0.6, 0.45, 0.0], dtype=F64), generator=_gen(3),
           variance=variance, callback=lambda i, t_, x, x0: seen.setdefault(i, x))  # fmt: skip
    x_s = seen[1]
    c_xt, c_x0, post_var = posterior_coefficients(schedule, s, t)
    v = post_var if variance == "beta_tilde" else transition_coefficients(schedule, s, t)[1]
    mean = c_xt * x_t[0] + c_x0 * oracle(x_t[:1], t[None]).x0[0]
    assert ((x_s.mean(0) - mean).abs() < 4 * (v / 20000).sqrt()).all()
    assert abs(float(x_s.var(0).mean() / v) - 1) < 0.028


#: The samplers in sigma_ve whose last step is a multistep step into sigma_ve = 0 rather than the
#: jump to x0_hat; at first order (these options) that step is the jump itself.
STEP_INTO_ZERO = {"ipndm": {"order": 1}, "lms": {"order": 1, "corrector": False}}


def test_callback_sees_every_step_and_the_last_step_lands_on_the_data_estimate():
    oracle = _gaussian_4d()
    ts = LINEAR.timesteps(7)
    for name, sampler in S.SAMPLERS.items():
        calls: list[tuple] = []
        x = torch.randn(3, 4, generator=_gen(0), dtype=F64)
        options = STEP_INTO_ZERO.get(name, {})
        out = sampler(oracle, x, ts, generator=_gen(1), callback=lambda *a, c=calls: c.append(a),
                      **options)  # fmt: skip
        assert [c[0] for c in calls] == list(range(7)), name
        if name != "heun":  # heun's callback reports its (possibly churned) evaluation time
            assert [c[1] for c in calls] == ts[:-1].tolist(), name
        assert all(c[2].shape == (3, 4) and c[3].shape == (3, 4) for c in calls), name
        if options:  # y - sigma_ve eps_hat, computed as a step: x0_hat up to rounding
            torch.testing.assert_close(out, calls[-1][3], rtol=0, atol=1e-12)
        else:
            assert torch.equal(out, calls[-1][3]), name  # no residual noise: exactly x0_hat


def test_ddim_eta_1_equals_ddpm_beta_tilde_path_by_path():
    """With eta = 1 DDIM's noise scale is the posterior std and its mean is the posterior mean
    (Song et al. 2021, eq. 16), so with the same generator both samplers take the same path:
    equal in distribution, and here even sample by sample."""
    oracle = _gaussian_4d()
    x = torch.randn(64, 4, generator=_gen(0), dtype=F64)
    for ts in (LINEAR.timesteps(1000), LINEAR.timesteps(20)):
        a = S.ddim(oracle, x, ts, eta=1.0, generator=_gen(5))
        b = S.ddpm(oracle, x, ts, variance="beta_tilde", generator=_gen(5))
        torch.testing.assert_close(a, b, rtol=0, atol=1e-9)
    c = S.ddpm(oracle, x, LINEAR.timesteps(20), variance="beta", generator=_gen(5))
    assert (c - b).abs().max() > 0.01  # the other variance takes another path


def test_determinism_and_reproducibility():
    oracle = _gaussian_4d()
    x = torch.randn(8, 4, generator=_gen(0), dtype=F64)
    ts = LINEAR.timesteps(25)
    first = S.ddim(oracle, x, ts)
    assert torch.equal(first, S.ddim(oracle, x, ts, generator=_gen(123)))  # draws nothing
    assert torch.equal(first, S.ddim(oracle, x.clone(), ts))
    noisy = [S.ddim(oracle, x, ts, eta=0.5, generator=_gen(k)) for k in (7, 7, 8)]
    assert torch.equal(noisy[0], noisy[1]) and not torch.equal(noisy[0], noisy[2])


def test_invalid_options_and_times_are_rejected_with_clear_messages():
    oracle = _gaussian_4d()
    x, ts = torch.zeros(2, 4, dtype=F64), LINEAR.timesteps(5)
    cases = [
        (lambda: S.ddim(oracle, x, ts, eta=1.5), "eta must lie in"),
        (lambda: S.ddim(oracle, x, ts, eta=-0.1), "eta must lie in"),
        (lambda: S.ddpm(oracle, x, ts, variance="large"), "variance must be one of"),
        (lambda: S.dpm_solver(oracle, x, ts, order=4), "order must be one of"),
        (lambda: S.dpm_solver(oracle, x, ts, prediction="v"), "prediction must be one of"),
        (lambda: S.dpm_solver_pp(oracle, x, ts, order=0), "order must be one of"),
        (lambda: S.ipndm(oracle, x, ts, order=5), "order must be one of"),
        (lambda: S.lms(oracle, x, ts, order=0), "order must be one of"),
        (lambda: S.lms(oracle, x, ts, corrector="yes"), "corrector must be one of"),
        (lambda: S.unipc(oracle, x, ts, lower_order_final="yes"), "lower_order_final must be"),
        (lambda: S.unipc(oracle, x, ts, bh2=None), "bh2 must be one of"),
        (lambda: S.heun(oracle, x, ts, s_churn=-1.0), "non-negative"),
        (lambda: S.ddim(oracle, x, [1.0, 0.5]), "end with exactly 0"),
        (lambda: S.ddim(oracle, x, [0.5, 0.7, 0.0]), "strictly decreasing"),
        (lambda: S.ddim(oracle, x, [1.5, 0.5, 0.0]), r"in \[0, 1\]"),
        (lambda: S.ddim(oracle, x, [0.0]), "at least two times"),
        (lambda: S.karras_times(LINEAR, 0), "at least 1"),
        (lambda: S.karras_times(LINEAR, 10, sigma_min=5.0, sigma_max=1.0), "sigma_min < sigma_max"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()


# ================================================================================================
# Issue 3: fast samplers on Gaussian mixtures
# ================================================================================================


def _mixture(dim: int, schedule) -> GaussianMixtureOracle:
    """Four isotropic components (stds 0.4-0.7, weights 0.1-0.4) with means ~ N(0, 1.5^2 I)."""
    means = 1.5 * torch.randn(4, dim, generator=_gen(10 + dim), dtype=F64)
    stds = torch.tensor([0.4, 0.5, 0.6, 0.7])
    return GaussianMixtureOracle(means, stds, torch.tensor([0.1, 0.2, 0.3, 0.4]), schedule)


# name, options, order of the global error of the deterministic solution (in steps n)
ODE_SOLVERS = [
    ("ddim", {}, 1),
    ("euler", {}, 1),
    ("heun", {}, 2),
    ("dpm_solver", {"order": 2}, 2),
    ("dpm_solver", {"order": 2, "prediction": "data"}, 2),
    ("dpm_solver", {"order": 3}, 3),
    ("dpm_solver", {"order": 3, "prediction": "data"}, 3),
    ("dpmpp_2m", {}, 2),
    ("dpmpp_3m", {}, 3),
    ("unipc", {"order": 1}, 2),
    ("unipc", {"order": 2}, 3),
    ("unipc", {"order": 3}, 4),
    ("unipc", {"order": 1, "bh2": True}, 2),
    ("unipc", {"order": 2, "bh2": True}, 3),
    ("unipc", {"order": 3, "bh2": True}, 4),
    ("unipc", {"order": 3, "lower_order_final": True}, 4),
]


@pytest.fixture(scope="module", params=[(2, "linear"), (32, "ve")], ids=["2d-linear", "32d-ve"])
def ode_problem(request):
    """Fixed starting noise and the exact ODE endpoint, computed by two independent high-order
    solvers on fine grids (DPM-Solver-3 singlestep with 400 steps, DPM-Solver++(3M) with 1200).
    They agree to 1e-8 (2-D) and 3e-7 (32-D), at least 20x below the smallest error measured
    against them (4e-7 and 6e-6: DPM-Solver-3 at 128 steps)."""
    dim, name = request.param
    schedule = {"linear": LINEAR, "ve": VESchedule(0.01, 50.0)}[name]
    oracle = _mixture(dim, schedule)
    x = schedule.prior_std * torch.randn(32, dim, generator=_gen(dim), dtype=F64)

    def grid(n):  # uniform in log-SNR down to sigma_ve = 0.05, then the jump to t = 0
        return S.log_snr_times(schedule, n, sigma_min=0.05)

    reference = S.dpm_solver(oracle, x, grid(400), order=3)
    check = S.dpm_solver_pp(oracle, x, grid(1200), order=3)
    assert (reference - check).norm(dim=1).mean() < 5e-7
    return oracle, x, grid, reference


@pytest.mark.parametrize("name,options,order", ODE_SOLVERS, ids=lambda v: str(v))
def test_deterministic_solvers_converge_at_their_theoretical_order(ode_problem, name, options,
                                                                   order):  # fmt: skip
    """Error e(n) = mean_b |x_n - x_ref| for n = 32, 64, 128 steps; the least-squares slope of
    log e on log n must be within 0.3 of the theoretical order. Measured slopes are within
    0.15 of theory (2-D: Euler 1.01, Heun 2.08, DPM-Solver-2 2.06, 2M 2.04, DPM-Solver-3 3.11,
    3M 2.96, UniPC-1/2/3 2.05/3.06/4.02; 32-D: 1.02, 2.07, 2.02, 1.90, 3.06, 3.03, 1.96/2.92/4.14;
    UniPC bh2-1/2/3 2.03/3.03/4.02 and 1.96/2.88/4.14, UniPC-3 with lower-order final steps
    4.11 and 4.14);
    the 0.3 allows for pre-asymptotic terms (at n = 16 DPM-Solver++(3S) in 32-D still shows
    local slope 2.1, which is why the grid starts at 32)."""
    oracle, x, grid, reference = ode_problem
    ns = torch.tensor([32.0, 64.0, 128.0], dtype=F64)
    errors = torch.stack(
        [
            (S.SAMPLERS[name](oracle, x, grid(int(n)), **options) - reference).norm(dim=1).mean()
            for n in ns
        ]
    )
    assert (errors[1:] < errors[:-1]).all(), errors
    u, v = ns.log() - ns.log().mean(), errors.log() - errors.log().mean()
    slope = -float((u * v).sum() / (u**2).sum())
    assert abs(slope - order) < 0.3, (slope, errors)


def _sliced_w2(a: torch.Tensor, b: torch.Tensor, directions: torch.Tensor) -> float:
    """Sliced 2-Wasserstein distance between equal-size samples (sorted projections)."""
    pa, pb = (a @ directions).sort(0).values, (b @ directions).sort(0).values
    return float(((pa - pb) ** 2).mean().sqrt())


def gaussian_flow_endpoint(oracle: GaussianOracle, x: torch.Tensor, t: float) -> torch.Tensor:
    """The exact probability-flow endpoint at t = 0 from ``x`` at time ``t`` for Gaussian data
    N(m, C): x_s = alpha_s m + S_s^(1/2) S_t^(-1/2) (x_t - alpha_t m) with
    S_t = alpha_t^2 C + sigma_t^2 I (seed 002: the flow of a Gaussian is linear), so at s = 0
    x_0 = m + C^(1/2) S_t^(-1/2) (x_t - alpha_t m), in C's eigenbasis."""
    alpha, sigma = oracle.schedule.alpha_sigma(torch.tensor(t, dtype=F64))
    lam, U = torch.linalg.eigh(oracle.cov)
    A = U @ torch.diag(lam.sqrt() / (alpha**2 * lam + sigma**2).sqrt()) @ U.T
    return oracle.mean + (x - alpha * oracle.mean) @ A.T


SIGMA_MULTISTEP = [  # (name, options, order of convergence on a Karras grid)
    ("ipndm", {"order": 1}, 1),
    ("ipndm", {"order": 2}, 2),
    ("ipndm", {"order": 3}, 2),  # fixed uniform-step coefficients on unequal steps: O(h^3) local
    ("ipndm", {"order": 4}, 2),
    ("lms", {"order": 2, "corrector": False}, 2),
    ("lms", {"order": 3, "corrector": False}, 3),
    ("lms", {"order": 4, "corrector": False}, 4),
    ("lms", {"order": 2}, 3),  # the Adams-Moulton corrector adds one order
    ("lms", {"order": 3}, 4),
    ("lms", {"order": 4}, 5),
]


@pytest.mark.parametrize("schedule", [EDMSchedule(), LINEAR], ids=["edm", "vp"])
@pytest.mark.parametrize("name,options,order", SIGMA_MULTISTEP, ids=lambda v: str(v))
def test_sigma_multistep_solvers_converge_at_their_order_to_the_closed_form_endpoint(
    schedule, name, options, order
):
    """iPNDM and LMS integrate into sigma_ve = 0 itself, so the reference is the exact flow
    endpoint of a correlated 4-D Gaussian (:func:`gaussian_flow_endpoint`). Error ratio when
    halving the step from 64 to 128 Karras steps: log2 within 0.3 of the order. Measured
    (EDM / VP): iPNDM 1.00 / 0.99, 2.03 / 1.91, 2.04 / 2.24, 2.07 / 2.27; LMS without the
    corrector 1.95 / 1.94, 2.88 / 2.87, 3.78 / 3.76; with it 2.97 / 2.97, 3.89 / 3.89,
    4.79 / 4.78."""
    oracle = GaussianOracle(_gaussian_4d().mean, _gaussian_4d().cov, schedule)
    x = schedule.prior_std * torch.randn(64, 4, generator=_gen(1), dtype=F64)
    exact = gaussian_flow_endpoint(oracle, x, 1.0)
    errors = [
        float((S.SAMPLERS[name](oracle, x, S.karras_times(schedule, n), **options) - exact)
              .norm(dim=1).mean())
        for n in (64, 128)
    ]  # fmt: skip
    assert abs(math.log2(errors[0] / errors[1]) - order) < 0.3, errors


STOCHASTIC = [
    ("ddpm", {}),
    ("ddpm", {"variance": "beta"}),
    ("ddim", {"eta": 0.5}),
    ("euler", {"s_churn": 5.0}),  # first order: 20 needs ~400 steps to reach the floor
    ("heun", {"s_churn": 20.0}),
    ("dpmpp_2m_sde", {}),
    ("dpmpp_3m", {}),  # deterministic: anchors the ODE reference above to the data law
]


@pytest.mark.parametrize("dim,n", [(2, 3000), (32, 800)])
def test_distribution_error_falls_to_the_sampling_floor(dim, n):
    """Sliced W2 (64 fixed directions) between n outputs and n exact draws, at 5 and 100 steps,
    for the stochastic samplers (the deterministic ones are covered by the ODE test above;
    their outputs are the exact flow's, whose law is the data's). The floor is the same
    distance between two independent exact samples of size n; over 8 replicate pairs it
    varies by about +-30% around its median, so at 100 steps a sampler must be below 1.5x the
    largest replicate floor; at 5 steps (discretization error dominating) above 1.5x its
    100-step value."""
    oracle = _mixture(dim, LINEAR)
    dirs = torch.randn(dim, 64, generator=_gen(20), dtype=F64)
    dirs = dirs / dirs.norm(dim=0)
    exact = oracle.sample(n, _gen(21))
    floor = max(_sliced_w2(exact, oracle.sample(n, _gen(30 + k)), dirs) for k in range(8))
    x = torch.randn(n, dim, generator=_gen(22), dtype=F64)
    for name, options in STOCHASTIC:
        grid = LINEAR.timesteps if name in ("ddpm", "ddim") else partial(S.karras_times, LINEAR)
        few, many = (
            _sliced_w2(
                S.SAMPLERS[name](oracle, x, grid(k), generator=_gen(23), **options), exact, dirs
            )
            for k in (5, 100)
        )
        assert many < 1.5 * floor and few > 1.5 * many, (name, options, few, many, floor)


def test_first_order_family_is_one_map():
    """DDIM (eta = 0) is Euler in (x / alpha, sigma_ve) and the first-order exponential
    integrator in either prediction (Lu et al. 2022a, Sec. 4.1; Karras et al. 2022, Sec. 3)."""
    oracle = _mixture(2, LINEAR)
    x = torch.randn(16, 2, generator=_gen(0), dtype=F64)
    ts = S.karras_times(LINEAR, 12)
    base = S.ddim(oracle, x, ts)
    for other in (
        S.euler(oracle, x, ts),
        S.dpm_solver(oracle, x, ts, order=1),
        S.dpm_solver(oracle, x, ts, order=1, prediction="data"),
        S.dpm_solver_pp(oracle, x, ts, order=1),
    ):
        torch.testing.assert_close(other, base, rtol=0, atol=1e-10)


def test_number_of_denoiser_calls():
    """NFE: n for DDPM, DDIM, Euler and the multistep solvers; 2n - 1 for Heun; k (n - 1) + 1
    for singlestep DPM-Solver-k (the step into t = 0 is one evaluation)."""
    oracle = _mixture(2, LINEAR)
    calls = []

    def counting(x_t, t, cond=None, *, alpha_sigma=None):
        calls.append(1)
        return oracle(x_t, t, cond, alpha_sigma=alpha_sigma)

    counting.schedule = LINEAR
    n = 10
    expected = {"heun": 2 * n - 1, "dpm_solver": 2 * (n - 1) + 1, "pf_ode_rk4": 4 * (n - 1) + 1}
    for name, sampler in S.SAMPLERS.items():
        if name in ("pc", "annealed_langevin"):  # corrector / Langevin steps: counted in test_sde
            continue
        calls.clear()
        sampler(counting, torch.zeros(2, 2, dtype=F64), LINEAR.timesteps(n), generator=_gen(0))
        assert len(calls) == expected.get(name, n), name
    calls.clear()
    S.dpm_solver(counting, torch.zeros(2, 2, dtype=F64), LINEAR.timesteps(n), order=3)
    assert len(calls) == 3 * (n - 1) + 1


@pytest.mark.parametrize("kind", KINDS)
def test_samplers_see_only_predictions_so_every_parameterization_agrees(kind):
    """A Denoiser of any parameterization built from the oracle drives every sampler to the
    oracle's own result (float64; conversions are exact up to rounding)."""
    oracle = _mixture(2, LINEAR)
    wrapped = Denoiser(oracle.as_network(kind), LINEAR, kind)
    x = torch.randn(8, 2, generator=_gen(0), dtype=F64)
    ts = S.karras_times(LINEAR, 8)
    for name, sampler in S.SAMPLERS.items():
        a = sampler(oracle, x, ts, generator=_gen(1))
        b = sampler(wrapped, x, ts, generator=_gen(1))
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-7, msg=name)


class _SchedulePolice(Denoiser):
    """A Denoiser that checks, on every call, that the sampler's precomputed ``alpha_sigma``
    is what the schedule gives at ``t`` (cast to x's dtype) and that using it changes nothing."""

    def __call__(self, x_t, t, cond=None, *, alpha_sigma=None):
        assert alpha_sigma is not None
        alpha, sigma = self.schedule.alpha_sigma(t)
        assert torch.equal(alpha_sigma[0].expand_as(alpha), alpha.to(x_t.dtype))
        assert torch.equal(alpha_sigma[1].expand_as(sigma), sigma.to(x_t.dtype))
        given = super().__call__(x_t, t, cond, alpha_sigma=alpha_sigma)
        own = super().__call__(x_t, t, cond)
        assert torch.equal(given.x0, own.x0) and torch.equal(given.eps, own.eps)
        return given


@pytest.mark.parametrize(("dtype", "kind"), [(F64, "v"), (torch.float32, "eps"), (F64, "edm")])
def test_samplers_hand_the_denoiser_the_schedule_values_at_t(dtype, kind):
    """The fast samplers evaluate the schedule once per grid and pass (alpha, sigma) with each
    call; they equal the schedule at that call's t bit for bit, and so do the predictions; the
    network always sees one noise level per example."""
    oracle = _mixture(2, LINEAR)
    exact = oracle.as_network("x0" if kind == "edm" else kind)

    def net(x_t, c_noise, **cond):
        assert c_noise.shape == (x_t.shape[0],)
        return exact(x_t, c_noise, **cond) if kind != "edm" else torch.zeros_like(x_t)

    police = _SchedulePolice(net, LINEAR, kind)
    x = torch.randn(4, 2, generator=_gen(0), dtype=dtype)
    for name in ("ddpm", "ddim", "euler", "heun", "dpm_solver", "dpmpp_2m", "dpmpp_3m",
                 "dpmpp_2m_sde", "unipc", "ipndm", "lms"):  # fmt: skip
        S.SAMPLERS[name](police, x, S.karras_times(LINEAR, 6), generator=_gen(1))
    S.heun(police, x, S.karras_times(LINEAR, 6), s_churn=10.0, generator=_gen(1))
    S.dpm_solver(police, x, S.karras_times(LINEAR, 6), order=3)


def test_plain_function_denoiser_and_float32():
    """eps_hat = 0 means the data estimate x_t / alpha_t never changes along the ODE in
    (x / alpha, sigma_ve), so every deterministic sampler must return x / alpha(ts[0])."""
    schedule = cosine_logsnr()
    zero_noise = Denoiser(lambda x, c_noise: torch.zeros_like(x), schedule, "eps")
    x = torch.randn(4, 3, generator=_gen(0))
    ts = schedule.timesteps(6)
    alpha0 = float(schedule.alpha_sigma(ts[:1])[0])
    for name, sampler in S.SAMPLERS.items():
        out = sampler(zero_noise, x, ts, generator=_gen(1))
        assert out.dtype == torch.float32 and torch.isfinite(out).all(), name
        if name not in ("ddpm", "dpmpp_2m_sde", "reverse_sde", "pc", "annealed_langevin"):
            torch.testing.assert_close(out, x / alpha0, msg=name)


def test_conditioning_reaches_the_denoiser():
    """cond={"class_labels": y} selects mixture component y: DPM-Solver++(2M) with 50 steps
    then draws from N(m_y, 0.6^2 I), whose sample mean over 2000 draws has SE 0.6 / sqrt(2000)
    = 0.013 per coordinate (asserted to 0.06, 4.5 SE)."""
    oracle = _mixture(2, LINEAR)
    x = torch.randn(2000, 2, generator=_gen(0), dtype=F64)
    labels = torch.full((2000,), 2)
    out = S.SAMPLERS["dpmpp_2m"](oracle, x, S.karras_times(LINEAR, 50),
                                 cond={"class_labels": labels})  # fmt: skip
    assert (out.mean(0) - oracle.means[2]).abs().max() < 0.06
    assert abs(float(out.std(0).mean()) - 0.6) < 0.03  # SE of a std: 0.6 / sqrt(2 * 2000)


def test_churn_is_gated_by_the_noise_window():
    oracle = _mixture(2, LINEAR)
    x = torch.randn(16, 2, generator=_gen(0), dtype=F64)
    ts = S.karras_times(LINEAR, 10)
    plain = S.heun(oracle, x, ts)
    outside = S.heun(oracle, x, ts, s_churn=40.0, s_tmin=1e3, s_tmax=1e4, generator=_gen(1))
    inside = S.heun(oracle, x, ts, s_churn=40.0, s_tmin=0.05, s_tmax=50.0, generator=_gen(1))
    assert torch.equal(plain, outside) and not torch.allclose(plain, inside)


def test_time_grids():
    n, rho = 10, 7.0
    ts = S.karras_times(LINEAR, n, sigma_min=0.01, sigma_max=80.0, rho=rho)
    assert len(ts) == n + 1 and ts[-1] == 0 and (ts[:-1] > ts[1:]).all()
    sig = LINEAR.sigma_ve(ts[:-1])
    i = torch.arange(n, dtype=F64) / (n - 1)
    expected = (80.0 ** (1 / rho) + i * (0.01 ** (1 / rho) - 80.0 ** (1 / rho))) ** rho
    torch.testing.assert_close(sig, expected, rtol=1e-9, atol=0)
    lam = LINEAR.log_snr(S.log_snr_times(LINEAR, n)[:-1])
    torch.testing.assert_close(lam.diff(), lam.diff()[:1].expand(n - 1), rtol=1e-9, atol=1e-9)
    # defaults: sigma_ve(1) down to sigma_ve(1/T) (discrete) or max(0.002, sigma_ve(1e-3))
    torch.testing.assert_close(
        S.karras_times(LINEAR, 5)[[0, 4]], torch.tensor([1.0, 1e-3], dtype=F64)
    )
    cont = cosine_logsnr()
    floor = max(0.002, float(cont.sigma_ve(torch.tensor(1e-3, dtype=F64))))
    assert float(cont.sigma_ve(S.log_snr_times(cont, 5)[4])) == pytest.approx(floor)
    ve = VESchedule(0.01, 50.0)  # its own minimum 0.01 > 0.002 bounds the default grid
    ts = S.karras_times(ve, 5)
    assert float(ts[0]) == pytest.approx(1.0) and float(ts[4]) == pytest.approx(1e-3)
    for bad in ({"sigma_min": 1e-4}, {"sigma_max": 80.0}):
        with pytest.raises(ValueError, match="outside the schedule's range"):
            S.karras_times(ve, 5, **bad)


def test_time_grid_by_name():
    assert S.GRIDS == ("trailing", "leading", "linspace", "karras", "log-snr")
    for spacing in ("trailing", "leading", "linspace"):
        assert torch.equal(S.time_grid(LINEAR, 7, spacing), LINEAR.timesteps(7, spacing))
    assert torch.equal(S.time_grid(LINEAR, 7, "karras"), S.karras_times(LINEAR, 7))
    assert torch.equal(S.time_grid(LINEAR, 7, "log-snr"), S.log_snr_times(LINEAR, 7))
    with pytest.raises(ValueError, match="unknown time grid 'uniform': choose one of trailing"):
        S.time_grid(LINEAR, 7, "uniform")


def test_sampler_options_are_the_keywords_each_sampler_takes():
    assert S.sampler_options("ddim") == {"eta": 0.0}
    assert S.sampler_options("ddpm") == {"variance": "beta_tilde"}
    assert S.sampler_options("dpm_solver") == {"order": 2, "prediction": "noise"}
    assert S.sampler_options("dpmpp_2m") == {"sde": False}  # its order is fixed
    assert S.sampler_options("dpmpp_2m_sde") == {}
    assert list(S.sampler_options("heun")) == ["s_churn", "s_tmin", "s_tmax", "s_noise"]
    assert S.sampler_options("pc") == {"snr": 0.16, "corrector_steps": 1}
    with pytest.raises(ValueError, match="unknown sampler 'plms': choose one of ddpm"):
        S.sampler_options("plms")


def test_registry_describes_every_sampler():
    assert set(S.SAMPLERS) == set(S.DESCRIPTIONS)
    assert {"ddpm", "ddim", "euler", "heun", "dpm_solver", "dpmpp_2m", "dpmpp_3m",
            "dpmpp_2m_sde", "unipc"} <= set(S.SAMPLERS)  # fmt: skip
    assert all(0 < len(d) <= 80 and "\n" not in d for d in S.DESCRIPTIONS.values())
