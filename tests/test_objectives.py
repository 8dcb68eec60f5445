"""Training objectives (objectives.py): time sampling, each weighting against formulas written
here from the papers, expectations against quadrature, the exact oracle's closed-form minimum, and
the "elbo" weighting against the DDPM bound of vlb.py.

Data ``x_0 ~ N(mu, s^2 I)``; the denoiser is the exact oracle of ``N(mu', s'^2 I)``
(:class:`~difflab.gaussian.oracles.GaussianOracle`), exact when ``(mu', s') = (mu, s)``. Its
data error has the closed form, with ``k = alpha s'^2 / (alpha^2 s'^2 + sigma^2)``,

    E (x_0 - x0_hat)^2 = (1 - k alpha)^2 ((mu - mu')^2 + s^2) + k^2 sigma^2   (per dimension),

and, as ``eps - eps_hat = -(alpha / sigma) (x_0 - x0_hat)``, ``E (eps - eps_hat)^2 = SNR E (x_0 -
x0_hat)^2`` with ``SNR = alpha^2 / sigma^2``.
"""

import math

import numpy as np
import pytest
import torch
from scipy import integrate, stats

from difflab.gaussian.edm import edm_loss
from difflab.gaussian.objectives import (
    check_objective,
    loss_fn,
    make_objective,
    objective_options,
    sample_times,
)
from difflab.gaussian.oracles import GaussianOracle
from difflab.gaussian.parameterization import Denoiser
from difflab.gaussian.schedules import (
    EDMSchedule,
    VESchedule,
    cosine_logsnr,
    linear_beta,
    linear_logsnr,
)
from difflab.gaussian.vlb import bits_per_dim, step_kl

F64 = torch.float64
SMALL_T = linear_beta(10, 0.01, 0.5)  # few steps: an off-by-one in i moves every expectation
CONTINUOUS = cosine_logsnr(shift=1.0)
MU, S = 0.3, 0.5  # the data
MU_WRONG, S_WRONG = -0.2, 0.8  # the imperfect denoiser's belief


def denoiser(schedule, kind, mu=MU_WRONG, s=S_WRONG, dim=2):
    oracle = GaussianOracle(torch.full((dim,), mu, dtype=F64), s, schedule)
    return Denoiser(oracle.as_network(kind), schedule, kind)


def data(n, generator, dim=2):
    return MU + S * torch.randn(n, dim, generator=generator, dtype=F64)


def x0_error(alpha, sigma, mu=MU_WRONG, s=S_WRONG):
    """``E (x_0 - x0_hat)^2`` per dimension (module docstring)."""
    k = alpha * s**2 / (alpha**2 * s**2 + sigma**2)
    return (1 - k * alpha) ** 2 * ((MU - mu) ** 2 + S**2) + k**2 * sigma**2


def ddpm(schedule):
    """``beta_i``, ``alpha_bar_i``, ``beta_tilde_i`` (``i = 1..T``) from the betas (Ho et al.)."""
    beta = schedule.betas
    ab = torch.cumprod(1 - beta, 0)
    ab_prev = torch.cat([torch.ones(1, dtype=F64), ab[:-1]])
    return beta, ab, (1 - ab_prev) / (1 - ab) * beta


def cosine_dlambda_dt(schedule, t):
    """``lambda'(t)`` of :func:`cosine_logsnr` by hand: ``lambda = -2 log tan(theta)``,
    ``theta = pi/2 (t_min + t (t_max - t_min))``, so ``lambda' = -2 pi (t_max - t_min) /
    sin(2 theta)``."""
    lmin, lmax = schedule.config()["log_snr_min"], schedule.config()["log_snr_max"]
    t_min = math.atan(math.exp(-0.5 * lmax)) * 2 / math.pi
    t_max = math.atan(math.exp(-0.5 * lmin)) * 2 / math.pi
    theta = math.pi / 2 * (t_min + t * (t_max - t_min))
    return -2 * math.pi * (t_max - t_min) / torch.sin(2 * theta)


# ------------------------------------------------------------------------------------------------
# Time sampling
# ------------------------------------------------------------------------------------------------


def test_iid_times_are_uniform_on_the_grid_and_on_the_unit_interval():
    g = torch.Generator().manual_seed(0)
    t = sample_times(SMALL_T, 100_000, generator=g)
    i = t * 10
    assert torch.equal(i, i.round()) and int(i.min()) == 1 and int(i.max()) == 10
    counts = torch.bincount(i.round().long(), minlength=11)[1:].numpy()
    assert stats.chisquare(counts).pvalue > 1e-3  # fails one time in a thousand if correct
    t = sample_times(CONTINUOUS, 100_000, generator=g)
    assert float(t.min()) > 0 and float(t.max()) <= 1
    assert stats.kstest(t.numpy(), "uniform").pvalue > 1e-3


def test_stratified_times_put_one_draw_in_each_stratum():
    g = torch.Generator().manual_seed(1)
    i = (sample_times(SMALL_T, 30, time_sampling="stratified", generator=g) * 10).round()
    assert torch.equal(torch.bincount(i.long(), minlength=11)[1:], torch.full((10,), 3))
    firsts = []
    for _ in range(2000):
        t = sample_times(CONTINUOUS, 64, time_sampling="stratified", generator=g)
        assert float(t.min()) > 0 and float(t.max()) <= 1
        strata = ((1 - t) * 64).floor().long()
        assert torch.equal(strata.sort().values, torch.arange(64))
        firsts.append(float(t[0]))
    assert stats.kstest(firsts, "uniform").pvalue > 1e-3  # each draw is still uniform


@pytest.mark.parametrize("batch", [10, 11])
def test_antithetic_times_mirror_the_first_half(batch):
    g = torch.Generator().manual_seed(2)
    h = batch // 2
    i = (sample_times(SMALL_T, batch, time_sampling="antithetic", generator=g) * 10).round()
    assert torch.equal(i[:h] + i[(batch + 1) // 2 :], torch.full((h,), 11.0, dtype=F64))
    t = torch.cat(
        [
            sample_times(CONTINUOUS, batch, time_sampling="antithetic", generator=g)
            for _ in range(3000)
        ]
    )
    t = t.view(3000, batch)
    torch.testing.assert_close(t[:, :h] + t[:, (batch + 1) // 2 :], torch.ones(3000, h, dtype=F64))
    assert float(t.min()) > 0 and float(t.max()) <= 1
    assert stats.kstest(t.flatten().numpy(), "uniform").pvalue > 1e-3


# ------------------------------------------------------------------------------------------------
# Each weighting, example by example, against the papers' formulas
# ------------------------------------------------------------------------------------------------


def linear_net(x_t, c_noise):
    """An arbitrary network: its output means something different under each parameterization."""
    return 0.7 * x_t - 0.1 + 1e-3 * c_noise[:, None]


def fixed_draws(schedule, n=10, dim=3, seed=3):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(n, dim, generator=g, dtype=F64) * 2 - 1
    eps = torch.randn(n, dim, generator=g, dtype=F64)
    if schedule.T is None:
        t = torch.rand(n, generator=g, dtype=F64).clamp(min=1e-3)
    else:
        t = torch.randint(1, schedule.T + 1, (n,), generator=g).to(F64) / schedule.T
    alpha, sigma = (c[:, None] for c in schedule.alpha_sigma(t))
    x_t = alpha * x0 + sigma * eps
    return x0, eps, t, alpha, sigma, x_t, linear_net(x_t, 1000 * t)


@pytest.mark.parametrize("schedule", [SMALL_T, CONTINUOUS], ids=["discrete", "continuous"])
@pytest.mark.parametrize("kind", ["eps", "x0", "v", "score"])
def test_simple_is_the_plain_mse_of_the_networks_own_output(schedule, kind):
    x0, eps, t, alpha, sigma, _, out = fixed_draws(schedule)
    target = {"eps": eps, "x0": x0, "v": alpha * eps - sigma * x0, "score": -eps / sigma}[kind]
    got = loss_fn(Denoiser(linear_net, schedule, kind), x0, t=t, eps=eps, reduction="none")
    torch.testing.assert_close(got, ((out - target) ** 2).mean(1), rtol=1e-12, atol=0)


@pytest.mark.parametrize("schedule", [SMALL_T, CONTINUOUS], ids=["discrete", "continuous"])
@pytest.mark.parametrize("kind", ["eps", "x0", "v"])
def test_min_snr_follows_hang_et_al_in_each_parameterization(schedule, kind):
    """Hang et al. (2023), gamma = 5: ``min(SNR, 5) / SNR`` on eps, ``min(SNR, 5)`` on x_0 and
    ``min(SNR, 5) / (SNR + 1)`` on v (these schedules are variance preserving)."""
    x0, eps, t, alpha, sigma, _, out = fixed_draws(schedule)
    snr = (alpha / sigma).squeeze(1) ** 2
    clipped = snr.clamp(max=5.0)
    weight, target = {
        "eps": (clipped / snr, eps),
        "x0": (clipped, x0),
        "v": (clipped / (snr + 1), alpha * eps - sigma * x0),
    }[kind]
    got = loss_fn(
        Denoiser(linear_net, schedule, kind),
        x0,
        weighting="min-snr",
        t=t,
        eps=eps,
        reduction="none",
    )
    torch.testing.assert_close(got, weight * ((out - target) ** 2).mean(1), rtol=1e-10, atol=0)
    assert float(snr.max()) > 5 > float(snr.min())  # both sides of the clip are exercised


@pytest.mark.parametrize(
    "schedule", [SMALL_T, CONTINUOUS, VESchedule(0.01, 50.0)], ids=["discrete", "continuous", "ve"]
)
def test_weighted_losses_are_the_same_in_every_parameterization(schedule):
    """ "elbo" and "min-snr" weigh ||eps - eps_hat||^2: one denoising function seen through eps,
    x0, v or score gives the same loss; "simple" does not (it is each kind's own MSE)."""
    x0, eps, t, *_ = fixed_draws(schedule)
    for weighting in ("elbo", "min-snr", "simple"):
        losses = [
            loss_fn(
                denoiser(schedule, kind, dim=3),
                x0,
                weighting=weighting,
                t=t,
                eps=eps,
                reduction="none",
            )
            for kind in ("eps", "x0", "v", "score")
        ]
        same = all(torch.allclose(loss, losses[0], rtol=1e-9, atol=0) for loss in losses[1:])
        assert same == (weighting != "simple"), weighting


@pytest.mark.parametrize("variance", ["beta_tilde", "beta"])
def test_discrete_elbo_weight_is_the_vlb_term_example_by_example(variance):
    """For every step ``i >= 2``: ``D * loss / T + C_i = L_{i-1}`` of vlb.step_kl exactly (same
    ``x_0``, ``eps``), with ``C_i = D/2 (log(sigma_i^2 / beta_tilde_i) + beta_tilde_i / sigma_i^2
    - 1)``; at ``i = 1``: ``D * loss / T = ||x_0 - x0_hat||^2 / (2 sigma_1^2)`` (Ho et al.'s
    Gaussian stand-in for L_0). With beta_tilde, the eps weight is ``(T/2)(SNR_{i-1}/SNR_i - 1)``.
    """
    sched = linear_beta(1000)
    T, D = 1000, 3
    beta, ab, beta_tilde = ddpm(sched)
    g = torch.Generator().manual_seed(4)
    i = torch.arange(1, T + 1)
    x0 = torch.rand(T, D, generator=g, dtype=F64) * 2 - 1
    eps = torch.randn(T, D, generator=g, dtype=F64)
    model = Denoiser(linear_net, sched, "x0")  # raw output is x0_hat
    loss = loss_fn(
        model, x0, weighting="elbo", variance=variance, t=i / T, eps=eps, reduction="none"
    )
    var_p = beta if variance == "beta" else torch.cat([beta_tilde[1:2], beta_tilde[1:]])
    const = D / 2 * (torch.log(var_p / beta_tilde) + beta_tilde / var_p - 1)
    kl = step_kl(model, x0[1:], i[1:], eps[1:], variance=variance)
    torch.testing.assert_close(D * loss[1:] / T + const[1:], kl, rtol=1e-9, atol=1e-12)
    x1 = ab[0].sqrt() * x0[0] + (1 - ab[0]).sqrt() * eps[0]
    x0_hat = linear_net(x1[None], torch.tensor([1.0], dtype=F64))[0]
    surrogate = ((x0[0] - x0_hat) ** 2).sum() / (2 * var_p[0])
    torch.testing.assert_close(D * loss[0] / T, surrogate, rtol=1e-9, atol=0)
    if variance == "beta_tilde":
        snr = ab / (1 - ab)
        eps_model = Denoiser(linear_net, sched, "eps")
        loss = loss_fn(eps_model, x0, weighting="elbo", t=i / T, eps=eps, reduction="none")
        x_t = ab.sqrt()[:, None] * x0 + (1 - ab).sqrt()[:, None] * eps
        mse = ((linear_net(x_t, i.to(F64)) - eps) ** 2).mean(1)
        torch.testing.assert_close(
            loss[1:], T / 2 * (snr[:-1] / snr[1:] - 1) * mse[1:], rtol=1e-9, atol=0
        )


@pytest.mark.parametrize(
    ("schedule", "weight"),
    [
        (CONTINUOUS, lambda t: -0.5 * cosine_dlambda_dt(CONTINUOUS, t)),
        (linear_logsnr(), lambda t: torch.full_like(t, 10.0)),  # lambda from 10 down to -10
        (VESchedule(0.01, 50.0), lambda t: torch.full_like(t, math.log(5000.0))),
    ],
    ids=["cosine", "linear-logsnr", "ve"],
)
def test_continuous_elbo_weight_is_minus_half_dlambda_dt(schedule, weight):
    x0, eps, t, *_, out = fixed_draws(schedule)
    model = Denoiser(linear_net, schedule, "eps")
    want = weight(t) * ((out - eps) ** 2).mean(1)
    got = loss_fn(model, x0, weighting="elbo", t=t, eps=eps, reduction="none")
    torch.testing.assert_close(got, want, rtol=1e-8, atol=0)
    with torch.inference_mode():  # the derivative is taken by autograd; it must work here too
        got = loss_fn(model, x0, weighting="elbo", t=t, eps=eps, reduction="none")
    torch.testing.assert_close(got, want, rtol=1e-8, atol=0)


# ------------------------------------------------------------------------------------------------
# Expectations: Monte Carlo of loss_fn against quadrature of the closed-form error
# ------------------------------------------------------------------------------------------------


def expected_loss(schedule, weighting, kind, mu=MU_WRONG, s=S_WRONG):
    """``E_{t, x_0, eps}[loss]`` by an exact sum over the grid (discrete) or quadrature."""

    def per_time(alpha, sigma, snr, w_elbo):
        err_x0 = x0_error(alpha, sigma, mu, s)
        err_eps = snr * err_x0
        if weighting == "simple":
            return {"eps": err_eps, "x0": err_x0, "v": err_eps / alpha**2}[kind]  # VP
        if weighting == "min-snr":
            return np.minimum(snr, 5.0) / snr * err_eps
        return w_elbo * err_eps

    if schedule.T is not None:
        T = schedule.T
        _, ab, beta_tilde = (c.numpy() for c in ddpm(schedule))
        snr = ab / (1 - ab)
        var_p1 = beta_tilde[1]  # beta_tilde_1 = 0 is replaced by beta_tilde_2
        w = np.concatenate([[T / (2 * var_p1 * snr[0])], T / 2 * (snr[:-1] / snr[1:] - 1)])
        return float(np.mean(per_time(np.sqrt(ab), np.sqrt(1 - ab), snr, w)))
    if weighting == "elbo":  # int_0^1 -lambda'/2 f dt = 1/2 int f d lambda over the range of lambda
        lo, hi = (float(schedule.log_snr(torch.tensor(v, dtype=F64))) for v in (1.0, 1e-300))

        def f(lam):
            a2 = 1 / (1 + math.exp(-lam))
            return 0.5 * per_time(math.sqrt(a2), math.sqrt(1 - a2), math.exp(lam), 1.0)

        return integrate.quad(f, lo, hi, limit=200)[0]

    def g(t):
        alpha, sigma = (float(c) for c in schedule.alpha_sigma(torch.tensor(t, dtype=F64)))
        return per_time(alpha, sigma, alpha**2 / sigma**2, None)

    return integrate.quad(g, 0.0, 1.0, limit=200)[0]


@pytest.mark.parametrize("schedule", [SMALL_T, CONTINUOUS], ids=["discrete", "continuous"])
@pytest.mark.parametrize(
    ("weighting", "kind"),
    [("simple", "eps"), ("simple", "x0"), ("simple", "v"), ("min-snr", "x0"), ("elbo", "v")],
)
def test_expected_loss_matches_quadrature(schedule, weighting, kind):
    g = torch.Generator().manual_seed(5)
    # Continuous elbo weights -lambda'/2 are heavy-tailed near t = 0: more draws there.
    n = 1_000_000 if weighting == "elbo" and schedule.T is None else 200_000
    losses = loss_fn(
        denoiser(schedule, kind), data(n, g), weighting=weighting, generator=g, reduction="none"
    )
    want = expected_loss(schedule, weighting, kind)
    se = float(losses.std()) / math.sqrt(n)
    assert abs(float(losses.mean()) - want) <= 4 * se  # 4 standard errors of the mean


@pytest.mark.parametrize("schedule", [SMALL_T, CONTINUOUS], ids=["discrete", "continuous"])
@pytest.mark.parametrize("time_sampling", ["stratified", "antithetic"])
def test_stratified_and_antithetic_times_are_unbiased(schedule, time_sampling):
    g = torch.Generator().manual_seed(6)
    reps, batch = 200, 1000
    x0 = data(reps * batch, g).view(reps, batch, 2)
    model = denoiser(schedule, "eps")
    means = torch.stack(
        [loss_fn(model, x0[r], time_sampling=time_sampling, generator=g) for r in range(reps)]
    )
    se = float(means.std()) / math.sqrt(reps)  # batch means are independent across repetitions
    assert abs(float(means.mean()) - expected_loss(schedule, "simple", "eps")) <= 4 * se


# ------------------------------------------------------------------------------------------------
# The exact oracle and the variational bound
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["eps", "x0", "v"])
def test_exact_oracle_attains_the_closed_form_minimum_at_every_step(kind):
    """With the exact posterior mean, the simple loss at step ``i`` is the posterior variance of
    the target: ``Var(eps | x_t) = alpha^2 s^2 / (alpha^2 s^2 + sigma^2)``, ``Var(x_0 | x_t) =
    s^2 sigma^2 / (...)``, ``Var(v | x_t) = s^2 / (...)`` (VP); any other denoiser does worse."""
    T, per_step = 10, 20_000
    g = torch.Generator().manual_seed(8)
    x0 = data(T * per_step, g)
    eps = torch.randn(x0.shape, generator=g, dtype=F64)
    i = torch.arange(1, T + 1).repeat_interleave(per_step)
    exact = loss_fn(denoiser(SMALL_T, kind, MU, S), x0, t=i / T, eps=eps, reduction="none")
    exact = exact.view(T, per_step)
    _, ab, _ = ddpm(SMALL_T)
    alpha2, sigma2 = ab, 1 - ab
    denom = alpha2 * S**2 + sigma2
    want = {"eps": alpha2 * S**2, "x0": S**2 * sigma2, "v": S**2 * torch.ones(T, dtype=F64)}
    want = want[kind] / denom
    se = exact.std(1) / math.sqrt(per_step)
    assert bool(((exact.mean(1) - want).abs() <= 4 * se).all()), (exact.mean(1), want, se)
    # Paired with the same (x_0, eps, t), the imperfect denoiser's loss is higher at every step.
    wrong = loss_fn(denoiser(SMALL_T, kind), x0, t=i / T, eps=eps, reduction="none")
    excess = (wrong - exact.flatten()).view(T, per_step)
    assert bool((excess.mean(1) > 10 * excess.std(1) / math.sqrt(per_step)).all())


@pytest.mark.parametrize("variance", ["beta_tilde", "beta"])
def test_elbo_loss_reproduces_the_ddpm_bound_in_expectation(variance):
    """``D E[loss_elbo] = E[sum_{i>=2} L_{i-1}] - sum_i C_i + E||x_0 - x0_hat(x_1)||^2 /
    (2 sigma_1^2)``: the diffusion part of vlb.bits_per_dim, minus the network-independent
    variance terms ``C_i``, plus Ho et al.'s Gaussian stand-in for ``L_0`` (closed form here).
    Both sides are Monte Carlo (400k loss draws, 4000 exact bounds; T = 100); tolerance: 4
    combined standard errors, about 0.4 nats (beta_tilde) and 0.17 nats (beta) per example."""
    sched = linear_beta(100, 1e-3, 0.2)
    D = 2
    g = torch.Generator().manual_seed(9)
    model = denoiser(sched, "eps")
    n = 400_000
    losses = D * loss_fn(
        model, data(n, g), weighting="elbo", variance=variance, generator=g, reduction="none"
    )
    N = 4000
    bound = bits_per_dim(model, data(N, g), variance=variance, reduction="none", generator=g)
    diffusion = bound["diffusion"] * D * math.log(2)  # nats per example
    beta, ab, beta_tilde = ddpm(sched)
    var_p = beta if variance == "beta" else torch.cat([beta_tilde[1:2], beta_tilde[1:]])
    const = float((D / 2 * (torch.log(var_p / beta_tilde) + beta_tilde / var_p - 1))[1:].sum())
    decoder_stand_in = D * float(x0_error(ab[0].sqrt(), (1 - ab[0]).sqrt())) / (2 * float(var_p[0]))
    want = float(diffusion.mean()) - const + decoder_stand_in
    se = math.hypot(float(losses.std()) / math.sqrt(n), float(diffusion.std()) / math.sqrt(N))
    assert abs(float(losses.mean()) - want) <= 4 * se


# ------------------------------------------------------------------------------------------------
# Plumbing
# ------------------------------------------------------------------------------------------------


def test_loss_trains_a_network_and_keeps_the_data_dtype():
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 3)
    model = Denoiser(lambda x, c: net(x), SMALL_T, "v")
    x0 = torch.rand(8, 3) * 2 - 1
    g = torch.Generator().manual_seed(10)
    for weighting in ("simple", "elbo", "min-snr"):
        g.manual_seed(10)
        loss = loss_fn(model, x0, weighting=weighting, generator=g)
        g.manual_seed(10)
        per_example = loss_fn(model, x0, weighting=weighting, generator=g, reduction="none")
        assert loss.dtype == torch.float32 and loss.shape == () and per_example.shape == (8,)
        torch.testing.assert_close(loss, per_example.mean())
        net.zero_grad()
        loss.backward()
        assert net.weight.grad is not None and bool(net.weight.grad.abs().sum() > 0)


def test_loss_rejects_unknown_options():
    model = denoiser(SMALL_T, "eps")
    x0 = torch.zeros(4, 2, dtype=F64)
    for kwargs, message in [
        ({"weighting": "snr"}, "weighting"),
        ({"reduction": "sum"}, "reduction"),
        ({"variance": "learned"}, "reverse variance"),
        ({"time_sampling": "sobol"}, "time sampling"),
    ]:
        with pytest.raises(ValueError, match=message):
            loss_fn(model, x0, **kwargs)


# ------------------------------------------------------------------------------------------------
# The objective of a parameterization
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["eps", "x0", "v", "score"])
@pytest.mark.parametrize("weighting", ["simple", "elbo", "min-snr"])
def test_objective_of_a_raw_prediction_is_loss_fn_on_the_same_draws(kind, weighting):
    model, x0 = denoiser(SMALL_T, kind), data(16, torch.Generator().manual_seed(0))
    objective = make_objective(kind, weighting, time_sampling="stratified")
    got = objective(model, x0, None, torch.Generator().manual_seed(1))
    want = loss_fn(model, x0, weighting=weighting, time_sampling="stratified",
                   generator=torch.Generator().manual_seed(1))  # fmt: skip
    assert torch.equal(got, want)


def test_objective_of_edm_is_edm_loss_on_the_same_draws():
    schedule = EDMSchedule()
    oracle = GaussianOracle(torch.full((2,), MU_WRONG, dtype=F64), S_WRONG, schedule)
    model, x0 = Denoiser(oracle.as_network("x0"), schedule, "edm"), data(16, torch.Generator())
    objective = make_objective("edm", p_std=1.0, reduction="none")
    got = objective(model, x0, None, torch.Generator().manual_seed(1))
    want = edm_loss(model, x0, None, torch.Generator().manual_seed(1), p_std=1.0, reduction="none")
    assert got.shape == (16,) and torch.equal(got, want)


def test_objective_options_are_the_keywords_of_its_loss():
    assert objective_options("eps") == {"time_sampling": "iid", "reduction": "mean",
                                        "variance": "beta_tilde", "min_snr_gamma": 5.0}  # fmt: skip
    assert list(objective_options("edm")) == ["p_mean", "p_std", "sigma_data", "reduction"]


def test_objectives_that_do_not_apply_are_refused():
    check_objective("v", "min-snr", time_sampling="antithetic", variance="beta")
    check_objective("edm", "simple", sigma_data=1.0)
    for args, options, message in [
        (("edm", "elbo"), {}, "weighting 'elbo' does not apply to prediction 'edm'"),
        (("mu", "simple"), {}, "unknown prediction 'mu': choose one of eps, x0, v, score, flow"),
        (("eps", "snr"), {}, "unknown weighting 'snr': choose one of simple, elbo, min-snr, flow"),
        (("edm", "flow"), {}, "weighting 'flow' does not apply to prediction 'edm'"),
        (("edm",), {"time_sampling": "iid"}, "the edm objective takes no option time_sampling"),
        (("eps",), {"p_mean": 0.0}, "takes no option p_mean: its options are time_sampling"),
        (("eps",), {"time_sampling": "sobol"}, "unknown time sampling 'sobol'"),
    ]:
        with pytest.raises(ValueError, match=message):
            check_objective(*args, **options)
        with pytest.raises(ValueError, match=message):
            make_objective(*args, **options)
    with pytest.raises(ValueError, match="for prediction 'eps' got a denoiser that predicts 'v'"):
        make_objective("eps")(denoiser(SMALL_T, "v"), torch.zeros(4, 2, dtype=F64))
