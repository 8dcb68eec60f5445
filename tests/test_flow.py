"""Flow matching / rectified flow: the linear path, the velocity parameterization and its exact
conversions, the flow-matching loss, and Euler on the flow ODE against the exact (oracle)
velocity of Gaussian data, whose flow map is known in closed form."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import Tensor

from difflab.gaussian import samplers as S
from difflab.gaussian.objectives import loss_fn
from difflab.gaussian.oracles import GaussianOracle
from difflab.gaussian.parameterization import KINDS, Denoiser, Prediction, target, velocity_target
from difflab.gaussian.process import q_sample
from difflab.gaussian.schedules import LinearPathSchedule, Schedule, make_schedule

F64 = torch.float64
PATH = make_schedule("rectified-flow")
SCHEDULES = {
    "rectified-flow": PATH,
    "cosine": make_schedule("cosine"),
    "cosine-logsnr": make_schedule("cosine-logsnr"),
    "vp-linear": make_schedule("vp-linear"),
    "sub-vp": make_schedule("sub-vp"),
    "edm": make_schedule("edm"),
}
MEAN = torch.tensor([0.5, -0.3, 0.1], dtype=F64)
COV = torch.tensor([[0.30, 0.10, 0.00], [0.10, 0.20, -0.05], [0.00, -0.05, 0.15]], dtype=F64)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_the_linear_path_is_x_t_equal_one_minus_t_x0_plus_t_eps():
    t = torch.tensor([0.0, 0.25, 0.5, 0.999, 1.0], dtype=F64)
    alpha, sigma = PATH.alpha_sigma(t)
    torch.testing.assert_close(alpha, 1 - t, rtol=0, atol=0)
    torch.testing.assert_close(sigma, t, rtol=0, atol=0)
    inner = t[1:-1]
    torch.testing.assert_close(PATH.t_of_log_snr(PATH.log_snr(inner)), inner, rtol=1e-12, atol=0)
    assert PATH.prior_std == 1.0  # x_1 = eps
    ts = PATH.timesteps(4)
    assert ts[0] == LinearPathSchedule.T_MAX and ts[-1] == 0 and len(ts) == 5


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_derivatives_match_finite_differences(name):
    """``Schedule.derivatives`` (autograd, or the closed form of the linear path) against central
    differences; for the discrete cosine schedule away from its grid points."""
    schedule = SCHEDULES[name]
    t = torch.tensor([0.1234, 0.3456, 0.6789, 0.8765], dtype=F64)
    h = 1e-6
    d_alpha, d_sigma = schedule.derivatives(t)
    (a_hi, s_hi), (a_lo, s_lo) = schedule.alpha_sigma(t + h), schedule.alpha_sigma(t - h)
    torch.testing.assert_close(d_alpha, (a_hi - a_lo) / (2 * h), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(d_sigma, (s_hi - s_lo) / (2 * h), rtol=1e-5, atol=1e-7)
    if name == "rectified-flow":  # the closed form is what autograd finds
        auto = Schedule.derivatives(schedule, t)
        torch.testing.assert_close(auto, (d_alpha, d_sigma), rtol=0, atol=1e-15)


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_velocity_converts_exactly_into_every_other_form_and_back(name):
    """u = alpha' x0 + sigma' eps -> (x0, eps, v, score) -> u, float64 round trips to 1e-6 (they
    are exact up to rounding: 1e-9 is asked)."""
    schedule = SCHEDULES[name]
    gen = _gen(1)
    x0 = torch.randn(16, 3, generator=gen, dtype=F64)
    eps = torch.randn(16, 3, generator=gen, dtype=F64)
    t = torch.rand(16, generator=gen, dtype=F64) * 0.98 + 0.01
    alpha, sigma = schedule.alpha_sigma(t)
    d_alpha, d_sigma = schedule.derivatives(t)
    x_t = q_sample(schedule, x0, t, eps)
    u = velocity_target(x0, eps, d_alpha, d_sigma)
    pred = Prediction.from_velocity(u, x_t, alpha, sigma, d_alpha, d_sigma)
    torch.testing.assert_close(pred.x0, x0, rtol=0, atol=1e-9)
    torch.testing.assert_close(pred.eps, eps, rtol=0, atol=1e-9)
    for kind in KINDS:  # every other form, and back to the velocity from it
        out = pred.as_kind(kind)
        torch.testing.assert_close(out, target(kind, x0, eps, alpha, sigma), rtol=1e-9, atol=1e-9)
        back = Prediction.from_output(kind, out, x_t, alpha, sigma).velocity(d_alpha, d_sigma)
        torch.testing.assert_close(back, u, rtol=0, atol=1e-6)


def test_on_the_linear_path_the_velocity_is_eps_minus_x0_and_finite_at_pure_noise():
    gen = _gen(2)
    x0, eps = torch.randn(2, 8, 3, generator=gen, dtype=F64)
    t = torch.tensor([1.0, 0.9, 0.5, 0.3, 0.1, 1e-3, 0.7, 1.0], dtype=F64)
    d_alpha, d_sigma = PATH.derivatives(t)
    torch.testing.assert_close(velocity_target(x0, eps, d_alpha, d_sigma), eps - x0)
    x_t = q_sample(PATH, x0, t, eps)
    alpha, sigma = PATH.alpha_sigma(t)
    pred = Prediction.from_velocity(eps - x0, x_t, alpha, sigma, d_alpha, d_sigma)
    torch.testing.assert_close(pred.x0, x_t - t[:, None] * (eps - x0))  # x0 = x_t - t u
    torch.testing.assert_close(pred.x0, x0, rtol=0, atol=1e-12)  # also at t = 1 (alpha = 0)
    torch.testing.assert_close(pred.eps, eps, rtol=0, atol=1e-12)


def test_a_flow_denoiser_of_the_oracle_is_the_oracle():
    """Denoiser(prediction="flow") around the oracle's exact velocity gives the oracle's own
    x0 and eps, on the linear path and on a VP schedule (autograd derivatives)."""
    for schedule in (PATH, SCHEDULES["cosine-logsnr"]):
        oracle = GaussianOracle(MEAN, COV, schedule)
        den = Denoiser(oracle.as_network("flow"), schedule, "flow")
        x = torch.randn(6, 3, generator=_gen(3), dtype=F64)
        t = torch.tensor([0.999, 0.8, 0.5, 0.3, 0.1, 0.01], dtype=F64)
        torch.testing.assert_close(den(x, t).x0, oracle(x, t).x0, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(den(x, t).eps, oracle(x, t).eps, rtol=1e-9, atol=1e-9)


def test_flow_matching_loss_is_the_velocity_mse():
    """For a flow network the simple (= flow) weighting is ||u_hat - (eps - x0)||^2 / D; for an
    x0 network the flow weighting gives the same quantity of its implied velocity."""
    gen = _gen(4)
    x0 = torch.randn(32, 3, generator=gen, dtype=F64)
    eps = torch.randn(32, 3, generator=gen, dtype=F64)
    t = torch.rand(32, generator=gen, dtype=F64) * 0.98 + 0.01
    weights = torch.randn(3, 3, generator=gen, dtype=F64)

    def net(x_t, c_noise, **cond):  # any function of (x_t, t)
        return torch.tanh(x_t @ weights) * (c_noise[:, None] / 1000.0)

    x_t = q_sample(PATH, x0, t, eps)
    expected = (net(x_t, 1000.0 * t) - (eps - x0)).square().mean(1)
    for weighting in ("simple", "flow"):
        got = loss_fn(Denoiser(net, PATH, "flow"), x0, weighting=weighting, t=t, eps=eps,
                      reduction="none")  # fmt: skip
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    x0_hat = net(x_t, 1000.0 * t)
    u_hat = (x_t - x0_hat) / t[:, None]  # eps_hat - x0_hat with eps_hat = (x_t - (1-t) x0_hat)/t
    got = loss_fn(Denoiser(net, PATH, "x0"), x0, weighting="flow", t=t, eps=eps, reduction="none")
    torch.testing.assert_close(got, (u_hat - (eps - x0)).square().mean(1), rtol=1e-9, atol=1e-12)


def _flow_map(x1: Tensor) -> Tensor:
    """The exact flow map of the linear path from t = 1 to 0 for N(MEAN, COV) data: in the
    eigenbasis of COV each coordinate's standardised value (x_t - alpha m) / sqrt(alpha^2 l +
    sigma^2) is constant along the ODE, so x_0 = MEAN + COV^(1/2) x_1 (x_1 = eps)."""
    vals, vecs = torch.linalg.eigh(COV)
    root = vecs @ torch.diag(vals.sqrt()) @ vecs.T
    return MEAN + x1 @ root.T


def test_euler_on_the_exact_velocity_converges_at_order_one_to_the_flow_map():
    """Error of n Euler steps against the closed-form flow map, as n doubles: the ratio tends to
    2 (order 1); DDIM on the linear path is exactly the same map; the endpoint reproduces the
    data's mean and covariance (the Euler map is affine here, so both are computed exactly by
    pushing 0 and the unit vectors through it) with an error that halves as n doubles."""
    oracle = GaussianOracle(MEAN, COV, PATH)
    den = Denoiser(oracle.as_network("flow"), PATH, "flow")
    x1 = torch.randn(256, 3, generator=_gen(5), dtype=F64)
    probe = torch.cat([torch.zeros(1, 3, dtype=F64), torch.eye(3, dtype=F64)])
    exact = _flow_map(x1)
    errors, moment_errors = [], []
    for n in (8, 16, 32, 64, 128):
        ts = torch.linspace(1.0, 0.0, n + 1, dtype=F64)
        x = x1.clone()
        for t, s in zip(ts[:-1].tolist(), ts[1:].tolist(), strict=True):
            x = x + (s - t) * den(x, torch.full((len(x),), t, dtype=F64)).velocity(
                *PATH.derivatives(torch.tensor(t, dtype=F64))
            )
        torch.testing.assert_close(S.ddim(den, x1, ts), x, rtol=0, atol=1e-12)
        errors.append(float((x - exact).norm(dim=1).max()))
        pushed = S.ddim(den, probe, ts)
        b, A = pushed[0], (pushed[1:] - pushed[0]).T  # x_0 = A x_1 + b
        moment_errors.append(max(float((b - MEAN).abs().max()),
                                 float((A @ A.T - COV).abs().max())))  # fmt: skip
    ratios = [a / b for a, b in itertools.pairwise(errors)]
    assert all(1.8 < r < 2.2 for r in ratios), ratios
    assert errors[-1] < 0.05
    moment_ratios = [a / b for a, b in itertools.pairwise(moment_errors)]
    assert all(1.7 < r < 2.3 for r in moment_ratios), moment_ratios
    assert moment_errors[-1] < 1e-2


def test_every_sampler_runs_on_a_flow_denoiser_exactly_as_on_the_oracle():
    """The velocity converts exactly, so every sampler of the library gives the same result
    on the oracle and on a flow Denoiser of it (the schedule's own grid, from T_MAX)."""
    oracle = GaussianOracle(MEAN, COV, PATH)
    den = Denoiser(oracle.as_network("flow"), PATH, "flow")
    x = torch.randn(8, 3, generator=_gen(6), dtype=F64)
    ts = PATH.timesteps(8)
    for name, sampler in S.SAMPLERS.items():
        a = sampler(oracle, x, ts, generator=_gen(7))
        b = sampler(den, x, ts, generator=_gen(7))
        assert bool(a.isfinite().all()), name
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-7, msg=name)


def test_heun_on_the_flow_converges_at_order_two():
    oracle = GaussianOracle(MEAN, COV, PATH)
    den = Denoiser(oracle.as_network("flow"), PATH, "flow")
    x1 = torch.randn(64, 3, generator=_gen(8), dtype=F64)
    t0 = LinearPathSchedule.T_MAX
    # the exact map from T_MAX: standardise in the eigenbasis at alpha = 1 - t0, sigma = t0
    vals, vecs = torch.linalg.eigh(COV)
    a, s = 1 - t0, t0
    z = ((x1 - a * MEAN) @ vecs) / (a**2 * vals + s**2).sqrt()
    exact = MEAN + (z * vals.sqrt()) @ vecs.T
    errors = []
    for n in (8, 16, 32, 64):
        ts = torch.linspace(t0, 0.0, n + 1, dtype=F64)
        errors.append(float((S.heun(den, x1, ts) - exact).norm(dim=1).max()))
    ratios = [a / b for a, b in itertools.pairwise(errors)]
    assert all(r > 3.0 for r in ratios), (errors, ratios)
    assert math.isfinite(errors[-1])


def test_the_probability_flow_likelihood_of_the_linear_path_is_the_datas():
    """The ODE likelihood runs to the schedule's first sampling time (0.999 on the linear path,
    whose log-SNR at t = 1 is -inf): with the exact velocity it gives the data's own density at
    sigma_min = 1e-3 up to the prior's approximation there (measured 0.0074 nats)."""
    from difflab.gaussian.likelihood import ode_log_likelihood

    oracle = GaussianOracle(MEAN, torch.diag(torch.tensor([0.3, 0.2, 0.15], dtype=F64)), PATH)
    x = oracle.sample(16, _gen(9))
    ll = ode_log_likelihood(oracle, x, n_steps=60, generator=_gen(10))
    t0 = PATH.t_of_sigma_ve(torch.tensor(1e-3, dtype=F64))
    assert bool(ll.isfinite().all())
    assert float((ll - oracle.log_prob(x, t0)).abs().max()) < 0.05
