"""Schedules, the forward process's closed forms and the parameterization conversions."""

import math

import pytest
import torch

from difflab.gaussian import process
from difflab.gaussian.parameterization import KINDS, Prediction, target
from difflab.gaussian.schedules import (
    SCHEDULES,
    LogSNRSchedule,
    VESchedule,
    constant_beta,
    cosine_beta,
    cosine_logsnr,
    linear_beta,
    linear_logsnr,
    make_schedule,
    schedule_from_config,
    schedule_parameters,
    sqrt_logsnr,
)

ALL = {
    "linear": linear_beta(1000),
    "cosine": cosine_beta(1000),
    "constant": constant_beta(100, 0.03),
    "cosine-logsnr": cosine_logsnr(shift=0.5),
    "linear-logsnr": linear_logsnr(),
    "sqrt": sqrt_logsnr(),
    "ve": VESchedule(0.01, 50.0),
}


def test_linear_and_cosine_betas_follow_their_formulas():
    s = linear_beta(1000, 1e-4, 0.02)
    assert s.betas[0] == pytest.approx(1e-4) and s.betas[-1] == pytest.approx(0.02)
    c = cosine_beta(1000)
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    for i in (1, 10, 500, 900):
        assert float(c.alpha_bar[i - 1]) == pytest.approx(f(i / 1000) / f(0), rel=1e-9)


@pytest.mark.parametrize("name", list(ALL))
def test_data_at_zero_and_log_snr_inverse(name):
    s = ALL[name]
    a0, s0 = s.alpha_sigma(torch.zeros(1, dtype=torch.float64))
    assert float(a0) == 1.0 and float(s0) == 0.0
    t = torch.linspace(0.01, 1.0, 57, dtype=torch.float64)
    lam = s.log_snr(t)
    assert bool((lam[1:] < lam[:-1]).all()), "log-SNR must decrease in t"
    assert torch.allclose(s.t_of_log_snr(lam), t, atol=1e-7)


def test_logsnr_shift_and_bisection_inverse():
    base, shifted = cosine_logsnr(), cosine_logsnr(shift=2.0)
    t = torch.linspace(0.05, 0.95, 11, dtype=torch.float64)
    assert torch.allclose(shifted.log_snr(t) - base.log_snr(t), torch.full_like(t, 2.0))
    # A custom curve without an analytic inverse: bisection must agree with the true inverse.
    custom = LogSNRSchedule(lambda u: 6.0 - 12.0 * u**2, shift=1.0)
    lam = custom.log_snr(t)
    assert torch.allclose(custom.t_of_log_snr(lam), t, atol=1e-9)
    a, s = custom.alpha_sigma(t)
    assert torch.allclose(a**2 + s**2, torch.ones_like(t))


def test_discrete_schedule_is_exact_on_its_grid():
    s = linear_beta(1000)
    i = torch.tensor([1, 2, 250, 1000])
    a, sig = s.alpha_sigma(i.double() / 1000)
    assert torch.allclose(a**2, s.alpha_bar[i - 1], rtol=1e-12)
    assert torch.allclose(sig**2, 1 - s.alpha_bar[i - 1], rtol=1e-10)


@pytest.mark.parametrize("spacing", ["trailing", "leading", "linspace"])
@pytest.mark.parametrize("n", [1, 7, 50, 1000])
def test_sampling_grid_never_off_by_one(spacing, n):
    s = linear_beta(1000)
    ts = s.timesteps(n, spacing)
    assert len(ts) == n + 1 and float(ts[-1]) == 0.0
    steps = ts[:-1] * 1000
    assert torch.allclose(steps, steps.round()), "model steps must lie on the training grid"
    assert bool((steps[1:] < steps[:-1]).all()) and steps.min() >= 1 and steps.max() <= 1000
    if spacing == "trailing" or (spacing == "linspace" and n > 1):
        assert float(steps[0]) == 1000
    if spacing == "leading" or (spacing == "linspace" and n > 1):
        assert float(steps[-1]) == 1
    if n == 1000:
        assert torch.equal(steps, torch.arange(1000, 0, -1, dtype=torch.float64))


def test_timesteps_reject_impossible_counts():
    with pytest.raises(ValueError, match="at least 1"):
        linear_beta(10).timesteps(0)
    with pytest.raises(ValueError, match="cannot take 11"):
        linear_beta(10).timesteps(11)


def test_schedule_config_round_trip():
    for s in ALL.values():
        rebuilt = schedule_from_config(s.config())
        t = torch.linspace(0, 1, 9, dtype=torch.float64)
        for u, v in zip(s.alpha_sigma(t), rebuilt.alpha_sigma(t), strict=True):
            assert torch.allclose(u, v)
    with pytest.raises(ValueError, match="unknown schedule"):
        make_schedule("quadratic")


def test_registry_lists_every_schedule_with_its_parameters():
    assert list(SCHEDULES) == ["linear", "cosine", "constant", "cosine-logsnr", "linear-logsnr",
                               "sqrt", "vp-linear", "sub-vp", "ve", "edm",
                               "rectified-flow"]  # fmt: skip
    assert schedule_parameters("linear") == {"T": 1000, "beta_start": 1e-4, "beta_end": 0.02}
    assert list(schedule_parameters("cosine-logsnr")) == ["shift", "log_snr_min", "log_snr_max"]
    assert list(schedule_parameters("edm")) == ["sigma_min", "sigma_max", "rho"]
    for name in SCHEDULES:  # every schedule builds from its defaults and records its name
        s = make_schedule(name, **schedule_parameters(name))
        assert s.config()["kind"] == name
    assert make_schedule("linear", T=10).T == 10
    with pytest.raises(ValueError, match="unknown schedule 'quadratic': choose one of linear"):
        schedule_parameters("quadratic")
    with pytest.raises(ValueError, match="takes no parameter shift: its parameters are T, beta"):
        make_schedule("linear", shift=1.0)


def test_marginal_equals_t_single_steps_in_distribution():
    """Run the Markov chain q(x_i | x_{i-1}) step by step and compare with q(x_t | x_0)."""
    s = constant_beta(100, 0.03)  # seed 001's example
    gen = torch.Generator().manual_seed(0)
    n, x0 = 200_000, torch.full((200_000,), 1.5, dtype=torch.float64)
    x = x0.clone()
    for i in range(1, 41):
        x = process.transition(s, x, (i - 1) / 100, i / 100).sample(gen)
    closed = process.marginal(s, x0[:1], 0.4)
    # Standard errors: mean sd/sqrt(n) ~ 0.0022, variance ~ var*sqrt(2/n) ~ 0.003; allow 5 s.e.
    assert float(x.mean()) == pytest.approx(
        float(closed.mean[0]), abs=5 * math.sqrt(closed.var / n)
    )
    assert float(x.var()) == pytest.approx(
        float(closed.var), abs=5 * float(closed.var) * math.sqrt(2 / n)
    )
    # And exactly: composing the one-step coefficients gives the marginal's.
    a, v = torch.tensor(1.0, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64)
    for i in range(1, 41):
        a_ts, var_ts = process.transition_coefficients(s, (i - 1) / 100, i / 100)
        assert float(a_ts**2) == pytest.approx(1 - 0.03) and float(var_ts) == pytest.approx(0.03)
        a, v = a * a_ts, a_ts**2 * v + var_ts
    alpha, sigma = s.alpha_sigma(torch.tensor(0.4, dtype=torch.float64))
    assert float(a) == pytest.approx(float(alpha), rel=1e-12)
    assert float(v) == pytest.approx(float(sigma**2), rel=1e-12)


@pytest.mark.parametrize("name", ["linear", "cosine-logsnr", "ve"])
def test_posterior_matches_bayes_rule_on_a_grid(name):
    """q(x_s|x_t,x_0) from its closed form vs q(x_t|x_s) q(x_s|x_0), normalised numerically."""
    s = ALL[name]
    x0, xt, s_time, t_time = 0.7, -0.3, 0.3, 0.35
    prior = process.marginal(s, torch.tensor([x0], dtype=torch.float64), s_time)
    sd = float(prior.var.sqrt())
    grid = torch.linspace(float(prior.mean) - 12 * sd, float(prior.mean) + 12 * sd, 400_001,
                          dtype=torch.float64)  # fmt: skip
    a_ts, var_ts = process.transition_coefficients(s, s_time, t_time)
    log_w = -((xt - a_ts * grid) ** 2) / (2 * var_ts) - (grid - prior.mean) ** 2 / (2 * prior.var)
    w = torch.softmax(log_w, 0)
    mean = float((w * grid).sum())
    var = float((w * (grid - mean) ** 2).sum())
    post = process.posterior(
        s, torch.tensor([xt], dtype=torch.float64), torch.tensor([x0], dtype=torch.float64),
        s_time, t_time,
    )  # fmt: skip
    assert float(post.mean) == pytest.approx(mean, rel=1e-6, abs=1e-9)
    assert float(post.var) == pytest.approx(var, rel=1e-5)


def test_posterior_variance_is_beta_tilde_and_final_step_is_the_data():
    s = linear_beta(1000)
    i = 500
    _, _, var = process.posterior_coefficients(s, (i - 1) / 1000, i / 1000)
    beta_tilde = (1 - s.alpha_bar[i - 2]) / (1 - s.alpha_bar[i - 1]) * s.betas[i - 1]
    assert float(var) == pytest.approx(float(beta_tilde), rel=1e-10)
    c_xt, c_x0, var0 = process.posterior_coefficients(s, 0.0, 1 / 1000)
    assert (float(c_xt), float(c_x0), float(var0)) == (0.0, 1.0, 0.0)


def test_prior_is_standard_normal_for_vp_and_wide_for_ve():
    assert process.prior(linear_beta(), (3,)).var == pytest.approx(1.0, abs=1e-9)
    assert float(process.prior(VESchedule(0.01, 50.0), (3,)).var.sqrt()) == pytest.approx(
        50.0, rel=1e-3
    )


@pytest.mark.parametrize("name", list(ALL))
@pytest.mark.parametrize("kind", KINDS)
def test_parameterizations_round_trip_exactly(name, kind):
    s = ALL[name]
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randn(16, 3, generator=gen, dtype=torch.float64)
    eps = torch.randn(16, 3, generator=gen, dtype=torch.float64)
    t = torch.rand(16, generator=gen, dtype=torch.float64) * 0.98 + 0.01
    alpha, sigma = s.alpha_sigma(t)
    x_t = process.q_sample(s, x0, t, eps)
    pred = Prediction.from_output(kind, target(kind, x0, eps, alpha, sigma), x_t, alpha, sigma)
    assert torch.allclose(pred.x0, x0, atol=1e-8)
    assert torch.allclose(pred.eps, eps, atol=1e-8)
    for other in KINDS:
        assert torch.allclose(pred.as_kind(other), target(other, x0, eps, alpha, sigma), atol=1e-8)


def test_a_prediction_derives_the_form_it_was_not_given_exactly_once():
    """Given x0 alone, eps = (x_t - alpha x0) / sigma; given eps alone, x0 = (x_t - sigma eps)
    / alpha; the derived tensor is kept (the same object on every read)."""
    gen = torch.Generator().manual_seed(3)
    x_t, x0 = torch.randn(2, 5, 3, generator=gen, dtype=torch.float64)
    alpha, sigma = torch.tensor(0.6, dtype=torch.float64), torch.tensor(0.8, dtype=torch.float64)
    from_x0 = Prediction(x_t, alpha, sigma, x0=x0)
    assert from_x0.given == "x0" and from_x0.x0 is x0
    torch.testing.assert_close(from_x0.eps, (x_t - 0.6 * x0) / 0.8, rtol=1e-15, atol=1e-15)
    assert from_x0.eps is from_x0.eps
    from_eps = Prediction(x_t, alpha, sigma, eps=from_x0.eps)
    assert from_eps.given == "eps"
    torch.testing.assert_close(from_eps.x0, x0, rtol=1e-14, atol=1e-14)
    with pytest.raises(ValueError, match="needs x0, eps or both"):
        Prediction(x_t, alpha, sigma)


def test_sqrt_schedule_is_diffusion_lms_alpha_bar():
    """``alpha(t)^2 = 1 - sqrt(u + s)`` with ``u = t u_max`` (Li et al. 2022), its closed
    inverse, and ``lambda(1) = log_snr_min``."""
    s, lo = 1e-4, -12.0
    sched = sqrt_logsnr(s=s, log_snr_min=lo)
    u_max = (1.0 / (1.0 + math.exp(lo))) ** 2 - s
    t = torch.tensor([0.01, 0.2, 0.5, 0.9], dtype=torch.float64)
    alpha, sigma = sched.alpha_sigma(t)
    assert torch.allclose(alpha**2, 1.0 - torch.sqrt(t * u_max + s), rtol=1e-12)
    assert torch.allclose(alpha**2 + sigma**2, torch.ones_like(t))
    assert float(sched.log_snr(torch.ones((), dtype=torch.float64))) == pytest.approx(lo)
    assert torch.allclose(sched.t_of_log_snr(sched.log_snr(t)), t, rtol=1e-10)
    at_start = float(sched.log_snr(torch.tensor(1e-9)))
    assert at_start == pytest.approx(math.log(0.99 / 0.01), abs=1e-3)
