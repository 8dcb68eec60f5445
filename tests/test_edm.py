"""EDM: preconditioning identities, the "edm" parameterization against exact oracles, the EDM
schedule and Karras grid, the log-normal levels and the loss against closed-form expectations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from difflab.gaussian.edm import edm_loss, edm_weight, sample_edm_sigma
from difflab.gaussian.oracles import GaussianMixtureOracle, GaussianOracle
from difflab.gaussian.parameterization import Denoiser, edm_preconditioning
from difflab.gaussian.samplers import karras_times
from difflab.gaussian.schedules import (
    EDMSchedule,
    VESchedule,
    broadcast,
    cosine_logsnr,
    linear_beta,
)
from difflab.nets.mlp import MLPDenoiserNet
from difflab.nets.unet import UNet

F64 = torch.float64
SIGMAS = torch.logspace(-3, 2, 41, dtype=F64)


@pytest.mark.parametrize("sigma_data", [0.5, 1.3])
def test_preconditioning_identities(sigma_data):
    c_skip, c_out, c_in, c_noise = edm_preconditioning(SIGMAS, sigma_data)
    total = SIGMAS**2 + sigma_data**2
    # Unit-variance input for data of std sigma_data: c_in^2 (sigma_data^2 + sigma^2) = 1.
    torch.testing.assert_close(c_in**2 * total, torch.ones_like(total))
    # Unit-variance target: Var((x0 - c_skip x~) / c_out) = 1.
    target_var = ((1 - c_skip) ** 2 * sigma_data**2 + c_skip**2 * SIGMAS**2) / c_out**2
    torch.testing.assert_close(target_var, torch.ones_like(total))
    # The loss weight undoes c_out: lambda c_out^2 = 1.
    torch.testing.assert_close(edm_weight(SIGMAS, sigma_data) * c_out**2, torch.ones_like(total))
    torch.testing.assert_close(c_noise, SIGMAS.log() / 4)
    # Skip and network paths contribute the variance c_skip^2 Var(x~) and c_out^2 Var(F) = c_out^2,
    # equal exactly at sigma = sigma_data, where c_skip = 1/2.
    at = edm_preconditioning(torch.tensor(sigma_data, dtype=F64), sigma_data)
    torch.testing.assert_close(at[0], torch.tensor(0.5, dtype=F64))
    torch.testing.assert_close(at[0] ** 2 * 2 * sigma_data**2, at[1] ** 2)
    skip_share, net_share = c_skip**2 * total, c_out**2
    low = sigma_data > SIGMAS
    assert bool((skip_share[low] > net_share[low]).all())
    assert bool((skip_share[~low] < net_share[~low]).all())
    # Limits: sigma -> 0 keeps the input, sigma -> inf trusts the network (c_out -> sigma_data).
    assert abs(float(c_skip[0]) - 1) < 1e-5 and float(c_out[0]) < 1e-3
    assert float(c_skip[-1]) < 1e-3 and abs(float(c_out[-1]) - sigma_data) < 1e-3


def test_preconditioned_input_and_target_have_unit_variance_by_monte_carlo():
    """Data N(0, 0.5^2 I), 40000 draws per level: Var(c_in x~) and Var(F_target) are 1 within
    5 SE (SE = sqrt(2 / n) = 0.7% for a Gaussian's sample variance)."""
    g = torch.Generator().manual_seed(0)
    n = 40000
    for sigma in (0.01, 0.5, 20.0):
        s = torch.tensor(sigma, dtype=F64)
        c_skip, c_out, c_in, _ = edm_preconditioning(s, 0.5)
        x0 = 0.5 * torch.randn(n, generator=g, dtype=F64)
        x_ve = x0 + sigma * torch.randn(n, generator=g, dtype=F64)
        for v in ((c_in * x_ve).var(), ((x0 - c_skip * x_ve) / c_out).var()):
            assert abs(float(v) - 1) < 5 * math.sqrt(2 / n)


def _exact_edm_network(oracle, sigma_data, calls):
    """The raw network ``F`` that makes the EDM denoiser exact: it recovers ``sigma`` from
    ``c_noise`` and ``x~`` from ``c_in x~``, and returns ``(x0_oracle - c_skip x~) / c_out``."""
    schedule = oracle.schedule

    def net(inp, c_noise):
        calls.append((inp, c_noise))
        sigma = torch.exp(4 * c_noise.to(F64))
        c_skip, c_out, c_in, _ = edm_preconditioning(sigma, sigma_data)
        x_ve = inp / broadcast(c_in, inp)
        t = schedule.t_of_sigma_ve(sigma)
        alpha, _ = schedule.alpha_sigma(t)
        x0 = oracle(broadcast(alpha, x_ve) * x_ve, t).x0
        return (x0 - broadcast(c_skip, inp) * x_ve) / broadcast(c_out, inp)

    return net


@pytest.mark.parametrize(
    "schedule",
    [EDMSchedule(), cosine_logsnr(), VESchedule(0.01, 50.0), linear_beta(1000)],
    ids=["edm", "cosine", "ve", "ddpm"],
)
def test_edm_denoiser_with_the_exact_network_is_the_oracle(schedule):
    means = torch.tensor([[1.0, 0.0], [-1.0, 0.5], [0.0, -2.0]], dtype=F64)
    oracle = GaussianMixtureOracle(means, torch.tensor([0.3, 0.6, 0.2]), None, schedule)
    calls = []
    sigma_data = 0.7
    den = Denoiser(_exact_edm_network(oracle, sigma_data, calls), schedule, "edm", sigma_data)
    g = torch.Generator().manual_seed(1)
    t = 0.05 + 0.9 * torch.rand(64, generator=g, dtype=F64)
    x_t = 2 * torch.randn(64, 2, generator=g, dtype=F64)
    got, want = den(x_t, t), oracle(x_t, t)
    torch.testing.assert_close(got.x0, want.x0, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(got.eps, want.eps, rtol=1e-7, atol=1e-9)
    # What the network saw: c_in x_t / alpha and log(sigma_ve) / 4.
    alpha, sigma = schedule.alpha_sigma(t)
    _, _, c_in, c_noise = edm_preconditioning(sigma / alpha, sigma_data)
    torch.testing.assert_close(calls[0][0], (c_in / alpha)[:, None] * x_t)
    torch.testing.assert_close(calls[0][1], c_noise)


def test_other_parameterizations_are_unchanged_and_unknown_ones_rejected():
    schedule = cosine_logsnr()
    oracle = GaussianOracle(torch.zeros(2), 0.5, schedule)
    t = torch.full((4,), 0.4, dtype=F64)
    x = torch.randn(4, 2, dtype=F64)
    for kind in ("eps", "x0", "v", "score"):
        den = Denoiser(oracle.as_network(kind), schedule, kind, sigma_data=3.0)
        torch.testing.assert_close(den(x, t).x0, oracle(x, t).x0)
    with pytest.raises(ValueError, match="edm"):
        Denoiser(oracle.as_network("eps"), schedule, "karras")


# ------------------------------------------------------------------------------------------------
# Schedule
# ------------------------------------------------------------------------------------------------


def test_edm_schedule_curve_inverse_and_karras_grid():
    schedule = EDMSchedule(0.002, 80.0, 7.0)
    t = torch.linspace(0.0, 1.0, 51, dtype=F64)
    alpha, sigma = schedule.alpha_sigma(t)
    torch.testing.assert_close(alpha, torch.ones_like(t))
    torch.testing.assert_close(sigma, 80.0 * t**7)
    torch.testing.assert_close(schedule.t_of_sigma_ve(sigma[1:]), t[1:])
    assert schedule.prior_std == pytest.approx(math.sqrt(1 + 80.0**2))
    n = 18
    ts = schedule.timesteps(n)
    i = torch.arange(n, dtype=F64)
    karras = (80.0 ** (1 / 7) + i / (n - 1) * (0.002 ** (1 / 7) - 80.0 ** (1 / 7))) ** 7
    assert ts.dtype == F64 and len(ts) == n + 1 and float(ts[-1]) == 0.0
    torch.testing.assert_close(schedule.sigma_ve(ts[:-1]), karras)
    # The samplers' Karras spacing (karras_times) lands on the same times.
    torch.testing.assert_close(karras_times(schedule, n), ts)


def test_log_normal_levels():
    g = torch.Generator().manual_seed(2)
    n = 100000
    log_sigma = sample_edm_sigma(n, generator=g).log()
    # Mean and std of ln sigma: SE 1.2 / sqrt(n) and 1.2 / sqrt(2n).
    assert abs(float(log_sigma.mean()) + 1.2) < 5 * 1.2 / math.sqrt(n)
    assert abs(float(log_sigma.std()) - 1.2) < 5 * 1.2 / math.sqrt(2 * n)


# ------------------------------------------------------------------------------------------------
# Loss
# ------------------------------------------------------------------------------------------------


def _expected_oracle_loss(s: float, sigma_data: float) -> float:
    """``E_sigma[lambda(sigma) MMSE(sigma)]`` for data N(0, s^2 I), where the optimal denoiser's
    error per dimension is ``MMSE = s^2 sigma^2 / (s^2 + sigma^2)``; ``ln sigma ~ N(-1.2, 1.2^2)``
    by 80-point Gauss-Hermite quadrature."""
    z, w = np.polynomial.hermite_e.hermegauss(80)
    sigma = np.exp(-1.2 + 1.2 * z)
    lam = (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
    return float((w * lam * s**2 * sigma**2 / (s**2 + sigma**2)).sum() / w.sum())


@pytest.mark.parametrize("s", [0.5, 0.8])
def test_edm_loss_of_the_oracle_matches_its_expectation(s):
    """With the exact denoiser of N(0, s^2 I) (d = 3) the loss has the closed-form expectation
    above, exactly 1 when ``s = sigma_data``. 20000 examples; tolerance 5 SE of the batch mean
    (per-example SE from the sample)."""
    schedule = EDMSchedule()
    oracle = GaussianOracle(torch.zeros(3), s, schedule)
    g = torch.Generator().manual_seed(3)
    x0 = oracle.sample(20000, g)
    per_example = edm_loss(oracle, x0, generator=g, reduction="none")
    assert per_example.shape == (20000,)
    se = float(per_example.std()) / math.sqrt(len(per_example))
    expected = _expected_oracle_loss(s, 0.5)
    assert abs(float(per_example.mean()) - expected) < 5 * se, (float(per_example.mean()), expected)
    if s == 0.5:
        assert expected == pytest.approx(1.0, abs=1e-12)
    loss = edm_loss(oracle, x0, generator=torch.Generator().manual_seed(3))
    assert loss.ndim == 0


def test_edm_loss_of_an_untrained_edm_network_is_the_unit_target_variance():
    """A zero-output network (the MLP's zero-initialised head) gives ``D = c_skip x~``; its loss
    is ``E ||F_target||^2 / d = 1`` for data of std ``sigma_data`` at every level (the unit-
    variance target), and the gradient reaches the weights. 8000 examples, 5 SE."""
    torch.manual_seed(0)
    net = MLPDenoiserNet(dim=4, hidden=32, depth=2).double()
    den = Denoiser(net, EDMSchedule(), "edm")
    g = torch.Generator().manual_seed(4)
    x0 = 0.5 * torch.randn(8000, 4, generator=g, dtype=F64)
    per_example = edm_loss(den, x0, generator=g, reduction="none")
    se = float(per_example.detach().std()) / math.sqrt(len(per_example))
    assert abs(float(per_example.detach().mean()) - 1.0) < 5 * se
    per_example.mean().backward()
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    assert grads and all(bool(torch.isfinite(gr).all()) for gr in grads)
    assert any(float(gr.abs().sum()) > 0 for gr in grads)


def test_edm_unet_trains_one_step():
    """The U-Net with EDM preconditioning on 8x8 images: finite loss and gradients, and a
    clamped extreme level (sigma far above sigma_max) still gives a finite loss."""
    torch.manual_seed(0)
    net = UNet(in_channels=1, channels=16, channel_mults=(1, 2), num_res_blocks=1)
    den = Denoiser(net, EDMSchedule(), "edm")
    x0 = torch.rand(4, 1, 8, 8) * 2 - 1
    loss = edm_loss(den, x0, generator=torch.Generator().manual_seed(5))
    loss.backward()
    assert bool(torch.isfinite(loss))
    assert all(bool(torch.isfinite(p.grad).all()) for p in net.parameters() if p.grad is not None)
    extreme = edm_loss(den, x0, generator=torch.Generator().manual_seed(5), p_mean=8.0, p_std=0.1)
    assert bool(torch.isfinite(extreme))
