"""Consistency models (``gaussian/consistency.py``, ``recipes/consistency.py``, ``difflab distill
--method consistency``): the boundary condition for random networks, the exact consistency
function of Gaussian data (the probability-flow ODE's flow map in closed form) against both
losses, the teacher's ODE step against that flow map, the noise levels of multistep sampling,
and the command line (distillation, training, sampling, refusals)."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from cli_run import run

import difflab
from difflab.gaussian.consistency import (
    ConsistencyFunction,
    boundary_coefficients,
    consistency_distillation_loss,
    consistency_sampler,
    consistency_training_loss,
    karras_levels,
    level_probabilities,
    multistep_times,
    ode_step,
    pseudo_huber,
    training_levels,
)
from difflab.gaussian.oracles import GaussianOracle
from difflab.gaussian.parameterization import Denoiser, Prediction, edm_preconditioning
from difflab.gaussian.schedules import broadcast, make_schedule
from difflab.nets.mlp import MLPDenoiserNet
from difflab.recipes.distill import distill
from difflab.train.checkpoint import read_run_config

SCHEDULES = [("cosine", {"T": 1000}), ("edm", {}), ("linear-logsnr", {})]


def _sigma_of(schedule, t):
    alpha, sigma = schedule.alpha_sigma(t)
    return sigma / alpha


# ---------------------------------------------------------------- boundary parameterization


@pytest.mark.parametrize(("name", "kwargs"), SCHEDULES)
@pytest.mark.parametrize("prediction", ["eps", "x0", "v", "flow", "edm"])
def test_the_consistency_function_is_the_identity_at_sigma_min_for_random_networks(
    name, kwargs, prediction
):
    torch.manual_seed(0)
    schedule = make_schedule(name, **kwargs)
    net = MLPDenoiserNet(5, hidden=32, depth=2)
    for p in net.parameters():  # a random network, far from any trained one
        torch.nn.init.normal_(p, std=0.5)
    sigma_min = max(0.002, float(schedule.sigma_ve(torch.tensor(1e-3, dtype=torch.float64))))
    f = ConsistencyFunction(Denoiser(net, schedule, prediction), sigma_min, sigma_data=0.5)
    t_min = schedule.t_of_sigma_ve(torch.tensor([sigma_min], dtype=torch.float64)).expand(64)
    x_ve = 3 * torch.randn(64, 5)
    alpha = schedule.alpha_sigma(t_min)[0].float()[:, None]
    x_t = alpha * x_ve
    with torch.no_grad():
        out = f(x_t, t_min).x0
        assert torch.allclose(out, x_t / alpha, atol=1e-6, rtol=0)
        # above sigma_min the network matters: the identity there would pass by accident
        t_up = schedule.t_of_sigma_ve(torch.tensor([1.0], dtype=torch.float64)).expand(64)
        up = f(schedule.alpha_sigma(t_up)[0].float()[:, None] * x_ve, t_up).x0
        assert (up - x_ve).abs().max() > 0.1


def test_boundary_coefficients_and_songs_parameterization_for_an_edm_network():
    sigma = torch.tensor([0.002, 0.5, 80.0], dtype=torch.float64)
    c_skip, c_out = boundary_coefficients(sigma, 0.002, 0.5)
    assert c_skip[0] == 1.0 and c_out[0] == 0.0
    torch.testing.assert_close(c_skip, 0.25 / ((sigma - 0.002) ** 2 + 0.25))
    torch.testing.assert_close(c_out, (sigma - 0.002) * 0.5 / (0.25 + sigma**2).sqrt())
    # with EDM's preconditioning F is the network's own output: f = c_skip x~ + c_out F
    torch.manual_seed(1)
    schedule = make_schedule("edm")
    net = MLPDenoiserNet(4, hidden=16, depth=1).double()
    f = ConsistencyFunction(Denoiser(net, schedule, "edm"), 0.002, 0.5)
    t = schedule.t_of_sigma_ve(sigma).repeat_interleave(5)
    x = torch.randn(15, 4, dtype=torch.float64) * 3
    s = sigma.repeat_interleave(5)
    _, _, c_in, c_noise = edm_preconditioning(s, 0.5)
    skip, out = boundary_coefficients(s, 0.002, 0.5)
    with torch.no_grad():
        expected = skip[:, None] * x + out[:, None] * net(c_in[:, None] * x, c_noise)
        torch.testing.assert_close(f(x, t).x0, expected, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------- Gaussian data: exact maps


def _gaussian(schedule, dim=3, seed=0):
    """A Gaussian oracle with a full covariance and its eigendecomposition."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(dim, dim, generator=gen, dtype=torch.float64)
    cov = 0.3 * a @ a.T + 0.05 * torch.eye(dim, dtype=torch.float64)
    mean = torch.randn(dim, generator=gen, dtype=torch.float64)
    lam, u = torch.linalg.eigh(cov)
    return GaussianOracle(mean, cov, schedule), mean, lam, u


def _flow_map(mean, lam, u, x_ve, sigma_from, sigma_to):
    """The PF-ODE ``dx~/dsigma = sigma (Sigma + sigma^2 I)^{-1} (x~ - mu)`` of ``N(mu, Sigma)``
    data solved in closed form: in the eigenbasis of ``Sigma`` each coordinate of ``x~ - mu``
    is scaled by ``sqrt((lambda + sigma_to^2) / (lambda + sigma_from^2))`` (``d/dsigma
    sqrt(lambda + sigma^2) = sigma / sqrt(lambda + sigma^2)``)."""
    scale = ((lam + sigma_to[:, None] ** 2) / (lam + sigma_from[:, None] ** 2)).sqrt()
    return mean + ((x_ve - mean) @ u * scale) @ u.T


class ExactConsistency:
    """The exact consistency function of Gaussian data, ``f*(x~, sigma) = mu + U diag(sqrt((
    lambda + sigma_min^2) / (lambda + sigma^2))) U^T (x~ - mu)`` (the flow map down to
    ``sigma_min``; compare ``E[x_0 | x~] = mu + U diag(lambda / (lambda + sigma^2)) U^T (x~ -
    mu)``: the same directions, scaled by the square root of the posterior-mean factor's
    companion), optionally perturbed by ``bend * sigma / (1 + sigma) * x~``."""

    def __init__(self, schedule, mean, lam, u, sigma_min, bend=0.0):
        self.schedule, self.mean, self.lam, self.u = schedule, mean, lam, u
        self.sigma_min, self.bend = sigma_min, bend

    def __call__(self, x_t, t, cond=None, *, alpha_sigma=None):
        alpha, sigma = self.schedule.alpha_sigma(t)
        x_ve = x_t / alpha[:, None]
        s = sigma / alpha
        f = _flow_map(self.mean, self.lam, self.u, x_ve, s, torch.full_like(s, self.sigma_min))
        f = f + self.bend * (s / (1 + s))[:, None] * x_ve
        return Prediction(x_t, broadcast(alpha, x_t), broadcast(sigma, x_t), x0=f)


def _exact_step(schedule, mean, lam, u):
    def step(x_t, t, s, cond=None):
        (a_t, s_t), (a_s, s_s) = schedule.alpha_sigma(t), schedule.alpha_sigma(s)
        x_ve = _flow_map(mean, lam, u, x_t / a_t[:, None], s_t / a_t, s_s / a_s)
        return a_s[:, None] * x_ve

    return step


@pytest.mark.parametrize(("name", "kwargs"), SCHEDULES)
def test_the_teachers_heun_and_ddim_steps_converge_to_the_exact_flow_map(name, kwargs):
    schedule = make_schedule(name, **kwargs)
    oracle, mean, lam, u = _gaussian(schedule)
    x_ve = mean + 2.0 * torch.randn(200, 3, dtype=torch.float64)
    sigma = torch.full((200,), 1.5, dtype=torch.float64)
    errors = {"heun": [], "ddim": []}
    for h in (0.2, 0.1, 0.05):
        t, s = schedule.t_of_sigma_ve(sigma), schedule.t_of_sigma_ve(sigma - h)
        x_t = schedule.alpha_sigma(t)[0][:, None] * x_ve
        exact = _exact_step(schedule, mean, lam, u)(x_t, t, s)
        for solver in errors:
            err = (ode_step(oracle, x_t, t, s, solver=solver) - exact).abs().max()
            errors[solver].append(float(err))
    # local errors: O(h^3) for Heun, O(h^2) for Euler (DDIM): ratios 8 and 4 per halving
    for solver, order in (("heun", 3), ("ddim", 2)):
        rates = [math.log2(a / b) for a, b in zip(errors[solver], errors[solver][1:], strict=False)]
        assert all(abs(r - order) < 0.3 for r in rates), (solver, errors[solver], rates)


@pytest.mark.parametrize("loss", ["ict", "l2"])
@pytest.mark.parametrize(("name", "kwargs"), SCHEDULES)
def test_the_exact_consistency_function_has_zero_distillation_loss(name, kwargs, loss):
    schedule = make_schedule(name, **kwargs)
    _, mean, lam, u = _gaussian(schedule)
    sigma_min = max(0.002, float(schedule.sigma_ve(torch.tensor(1e-3, dtype=torch.float64))))
    times = karras_levels(schedule, 18, sigma_min, 20.0)
    gen = torch.Generator().manual_seed(0)
    x0 = mean + torch.randn(512, 3, generator=gen, dtype=torch.float64) @ torch.diag(lam.sqrt())
    exact = ExactConsistency(schedule, mean, lam, u, sigma_min)
    step = _exact_step(schedule, mean, lam, u)

    def value(student, target):
        gen = torch.Generator().manual_seed(1)
        return float(consistency_distillation_loss(student, target, step, x0, times, loss=loss,
                                                   generator=gen))  # fmt: skip

    bent = ExactConsistency(schedule, mean, lam, u, sigma_min, bend=0.05)
    zero = 1e-20 if loss == "l2" else 1e-12  # pseudo-Huber: sqrt(c^2) - c rounds to ~1e-19 / dsigma
    assert value(exact, exact) < zero
    assert value(bent, bent) > 1e-5
    assert value(bent, exact) > 1e-5


def test_the_ict_distillation_loss_is_its_formula_on_its_own_draws():
    """``loss="ict"``: levels ``n ~ p(n)``, then ``z``; per example ``d(f(x~_{n+1}), f-(step(
    x~_{n+1}))) / (sigma_{n+1} - sigma_n)``, recomputed here from the same generator's draws."""
    schedule = make_schedule("edm")
    _, mean, lam, u = _gaussian(schedule)
    times = karras_levels(schedule, 12, 0.002, 80.0)
    x0 = mean + torch.randn(64, 3, generator=torch.Generator().manual_seed(3),
                            dtype=torch.float64) @ torch.diag(lam.sqrt())  # fmt: skip
    student = ExactConsistency(schedule, mean, lam, u, 0.002, bend=0.05)
    target = ExactConsistency(schedule, mean, lam, u, 0.002)
    step = _exact_step(schedule, mean, lam, u)
    got = consistency_distillation_loss(student, target, step, x0, times, loss="ict",
                                        generator=torch.Generator().manual_seed(4),
                                        reduction="none")  # fmt: skip
    gen = torch.Generator().manual_seed(4)
    sigmas = schedule.sigma_ve(times).to(torch.float64)
    n = torch.multinomial(level_probabilities(sigmas), len(x0), replacement=True, generator=gen)
    z = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    t, s = times[n + 1], times[n]
    alpha, sigma = schedule.alpha_sigma(t)
    x_t = alpha[:, None] * x0 + sigma[:, None] * z
    d = pseudo_huber(student(x_t, t, None).x0, target(step(x_t, t, s, None), s, None).x0)
    torch.testing.assert_close(got, d / (sigmas[n + 1] - sigmas[n]))
    assert (got > 0).all() and n.unique().numel() > 3


def test_the_exact_consistency_function_of_a_point_mass_has_zero_training_loss():
    """For data at one point ``mu`` the same noise at both levels lies on one ODE trajectory
    (``x~_sigma = mu + sigma z``), so consistency training's target is exact: the exact
    ``f*(x~, sigma) = mu + (sigma_min / sigma) (x~ - mu)`` has zero loss, a perturbed one not."""
    schedule = make_schedule("edm")
    mu = torch.tensor([0.3, -0.7, 0.1], dtype=torch.float64)
    tiny = torch.full((3,), 1e-24, dtype=torch.float64)  # Sigma -> 0: f* -> the formula above
    exact = ExactConsistency(schedule, mu, tiny, torch.eye(3, dtype=torch.float64), 0.002)
    bent = ExactConsistency(schedule, mu, tiny, torch.eye(3, dtype=torch.float64), 0.002, 0.05)
    times = karras_levels(schedule, 41, 0.002, 80.0)
    x0 = mu.expand(256, 3).clone()

    def loss(f):
        return consistency_training_loss(f, x0, times, generator=torch.Generator().manual_seed(2))

    assert float(loss(exact)) < 1e-12
    assert float(loss(bent)) > 1e-3


def test_training_schedule_levels_and_pseudo_huber_follow_song_and_dhariwal():
    # N(k) = min(10 * 2^floor(k / K'), 1280) + 1 with K' = floor(K / 8)
    assert [training_levels(k, 800) for k in (0, 99, 100, 350, 699, 700, 799)] == [
        11, 11, 21, 81, 641, 1281, 1281]  # fmt: skip
    sigmas = torch.tensor([0.002, 0.1, 1.0, 10.0, 80.0], dtype=torch.float64)
    p = level_probabilities(sigmas, -1.1, 2.0)
    normal = torch.distributions.Normal(-1.1, 2.0)
    cdf = normal.cdf(sigmas.log())
    torch.testing.assert_close(p, (cdf[1:] - cdf[:-1]) / (cdf[-1] - cdf[0]))
    a, b = torch.zeros(2, 100), torch.zeros(2, 100)
    b[0, 0], b[1, 0] = 1e-4, 10.0
    d = pseudo_huber(a, b)
    c = 0.00054 * 10
    torch.testing.assert_close(d, torch.tensor([math.sqrt(1e-8 + c * c) - c, math.sqrt(100 + c * c)
                                                - c]))  # fmt: skip


# ---------------------------------------------------------------- multistep sampling


def test_multistep_sampling_renoises_to_the_karras_levels():
    schedule = make_schedule("cosine", T=1000)
    sigma_min, sigma_max, k = 0.0064, 80.0, 4
    ts = multistep_times(schedule, k, sigma_min, sigma_max)
    ramp = np.linspace(0, 1, k + 1)
    karras = (sigma_max ** (1 / 7) + ramp * (sigma_min ** (1 / 7) - sigma_max ** (1 / 7))) ** 7
    assert ts[-1] == 0 and len(ts) == k + 1
    np.testing.assert_allclose(_sigma_of(schedule, ts[:-1]).numpy(), karras[:k], rtol=1e-6)
    m = torch.full((4000, 6), 0.25)
    seen = []

    class Recording:
        """A consistency function that answers ``m`` and records where it was asked."""

        def __init__(self):
            self.schedule = schedule

        def __call__(self, x_t, t, cond=None, *, alpha_sigma=None):
            alpha, sigma = schedule.alpha_sigma(t)
            seen.append((t.clone(), x_t.clone()))
            return Prediction(x_t, broadcast(alpha, x_t).float(), broadcast(sigma, x_t).float(),
                              x0=m)  # fmt: skip

    x = torch.randn(4000, 6)
    out = consistency_sampler(Recording(), x, ts, generator=torch.Generator().manual_seed(0),
                              sigma_min=sigma_min)  # fmt: skip
    assert torch.equal(out, m) and len(seen) == k
    assert torch.equal(seen[0][1], x)
    for i, (t, x_t) in enumerate(seen):
        assert torch.all(t == ts[i])
        if i == 0:
            continue
        alpha = float(schedule.alpha_sigma(ts[i : i + 1])[0])
        noise = x_t / alpha - m  # x~ = m + sqrt(tau^2 - sigma_min^2) z
        expected = math.sqrt(karras[i] ** 2 - sigma_min**2)
        assert abs(float(noise.std()) / expected - 1) < 0.03
        assert abs(float(noise.mean())) < 0.05 * expected


# ---------------------------------------------------------------- the command line

TINY = ["train.steps=2", "train.batch_size=8", "train.log_every=1", "model.unet.channels=8",
        "model.unet.num_heads=2", "diffusion.T=20", "sample.steps=2"]  # fmt: skip
FAST = ["--train-steps", "2", "--batch-size", "4", "--quiet"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    path = tmp_path_factory.mktemp("teacher") / "image"
    difflab.train("digits-tiny", TINY, out=str(path), progress=False)
    return path


def test_consistency_distillation_writes_a_run_sampled_in_one_step(
    teacher, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "cd"
    code, stdout, err = run(monkeypatch, capsys, "distill", str(teacher), "--method",
                            "consistency", "--levels", "6", "--guidance", "1", "--out", str(out),
                            *FAST)  # fmt: skip
    assert code == 0, err
    assert stdout.startswith(f"1 steps: {out / 'consistency'}")
    config = json.loads((out / "consistency" / "config.json").read_text())
    assert config["recipe"] == "consistency" and config["sample"]["steps"] == 1
    assert config["diffusion"]["schedule"] == "cosine" and config["diffusion"]["prediction"] == "v"
    student = difflab.load(out / "consistency")
    for steps, calls in ((None, 1), (3, 3)):
        seen: list[float] = []
        student.sample(4, steps=steps, callback=lambda i, t, x_t, x0, seen=seen: seen.append(t))
        assert len(seen) == calls
    code, _, err = run(monkeypatch, capsys, "sample", str(out / "consistency"), "--n", "3",
                       "--steps", "2", "--out", str(tmp_path / "s"))  # fmt: skip
    assert code == 0, err
    samples = np.load(tmp_path / "s.npz")["samples"]
    assert samples.shape == (3, 1, 8, 8) and np.isfinite(samples).all()
    code, _, err = run(monkeypatch, capsys, "train", str(out / "consistency"), "--resume",
                       "--quiet")  # fmt: skip
    assert code == 2 and "was written by difflab distill --method consistency" in err


@pytest.mark.parametrize(
    ("kind", "preset", "args", "kept"),
    [
        ("flow", "digits-tiny", ["--recipe", "flow", *TINY[:-2]], ("rectified-flow", "flow", None)),
        ("edm", "digits-tiny", [*TINY[:-2], "diffusion.T=null", "diffusion.schedule=edm",
                                "diffusion.prediction=edm", "diffusion.sigma_data=0.6"],
         ("edm", "edm", 0.6)),
        ("moons", "moons", ["train.steps=2", "train.batch_size=8", "model.mlp.hidden=8",
                            "model.mlp.depth=1", "diffusion.T=20",
                            "diffusion.class_conditional=false"], ("cosine", "v", None)),
    ],
)  # fmt: skip
def test_consistency_distillation_of_flow_edm_and_vector_teachers(
    kind, preset, args, kept, tmp_path, monkeypatch, capsys
):
    code, _, err = run(monkeypatch, capsys, "train", preset, f"train.out={tmp_path / kind}",
                       *args, "--quiet")  # fmt: skip
    assert code == 0, err
    code, _, err = run(monkeypatch, capsys, "distill", str(tmp_path / kind), "--method",
                       "consistency", "--levels", "4", "--out", str(tmp_path / "cd"),
                       *FAST)  # fmt: skip
    assert code == 0, err
    config = json.loads((tmp_path / "cd" / "consistency" / "config.json").read_text())
    d = config["diffusion"]
    assert (d["schedule"], d["prediction"], d["sigma_data"]) == kept
    samples = difflab.load(tmp_path / "cd" / "consistency").sample(5, steps=2).x
    assert samples.shape[0] == 5 and bool(samples.isfinite().all())
    if kind == "moons":  # vectors are not clipped to [-1, 1]
        assert config["sample"]["threshold"] is None and samples.ndim == 2


def test_consistency_training_trains_and_samples(tmp_path, monkeypatch, capsys):
    out = tmp_path / "ct"
    code, _, err = run(monkeypatch, capsys, "train", "digits-tiny", "--recipe", "consistency",
                       f"train.out={out}", *TINY[:-2], "--quiet")  # fmt: skip
    assert code == 0, err
    config = json.loads((out / "config.json").read_text())
    assert (config["diffusion"]["schedule"], config["diffusion"]["prediction"]) == ("edm", "edm")
    code, _, err = run(monkeypatch, capsys, "sample", str(out), "--n", "4", "--out",
                       str(tmp_path / "s"))  # fmt: skip
    assert code == 0, err
    assert np.isfinite(np.load(tmp_path / "s.npz")["samples"]).all()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--method", "consistency", "--to-steps", "2"],
         "--to-steps does not apply to --method consistency"),
        (["--method", "consistency", "--weighting", "v"],
         "--weighting does not apply to --method consistency"),
        (["--method", "consistency", "--levels", "1"], "--levels must be at least 2"),
        (["--method", "consistency", "--levels", "0"], "--levels must be a whole number >= 1"),
        (["--method", "consistency", "--solver", "rk4"], "--solver must be one of"),
        (["--method", "consistency", "--target-ema", "1.5"], "--target-ema must be a finite"),
        (["--method", "consistency", "--prediction", "magic"], "--prediction must be one of"),
        (["--method", "consistency", "--loss", "l1"], "--loss must be one of"),
        (["--method", "progressive", "--loss", "l2"],
         "--loss does not apply to --method progressive"),
        (["--method", "progressive", "--levels", "8"],
         "--levels does not apply to --method progressive"),
        (["--method", "progressive", "--solver", "heun"],
         "--solver does not apply to --method progressive"),
    ],
)  # fmt: skip
def test_bad_consistency_distillation_options_are_refused(
    args, message, teacher, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "students"
    code, _, err = run(monkeypatch, capsys, "distill", str(teacher), "--out", str(out), *FAST,
                       *args)  # fmt: skip
    assert code == 2 and err.startswith("difflab: error: ") and message in err, err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    path = tmp_path_factory.mktemp("ct") / "run"
    difflab.train("digits-tiny", TINY[:-2], recipe="consistency", out=str(path), progress=False)
    return path


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["sample", "{run}", "--sampler", "ddim"], "--sampler does not apply to consistency runs"),
        (["sample", "{run}", "--guidance", "2"], "--guidance does not apply to consistency runs"),
        (["sample", "{run}", "--grid", "karras"], "--grid does not apply to consistency runs"),
        (["sample", "{run}", "--steps", "0"], "--steps must be a whole number >= 1"),
        (["eval", "{run}"], "has no likelihood to evaluate"),
        (["train", "digits-tiny", "--recipe", "consistency", "diffusion.weighting=elbo"],
         "diffusion.weighting does not apply to the consistency recipe"),
        (["train", "digits-tiny", "--recipe", "consistency", "consistency.sigma_min=100"],
         "must be below sigma_max"),
        (["train", "digits-tiny", "--recipe", "consistency", "sample.sampler=ddim"],
         "unknown config key sample.sampler"),
        (["train", "digits-tiny", "--recipe", "consistency", "consistency.levels_start=0"],
         "consistency.levels_start must be >= 1"),
    ],
)  # fmt: skip
def test_bad_consistency_options_are_refused(args, message, trained, tmp_path, monkeypatch,
                                             capsys):  # fmt: skip
    args = [a.replace("{run}", str(trained)) for a in args]
    extra = (["--n", "2", "--out", str(tmp_path / "s")] if args[0] == "sample" else
             [f"train.out={tmp_path / 'r'}", "--quiet"] if args[0] == "train" else [])  # fmt: skip
    code, _, err = run(monkeypatch, capsys, *args, *extra)
    assert code == 2 and err.startswith("difflab: error: ") and message in err, err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "s.npz").exists() and not (tmp_path / "r").exists()


def test_the_distillation_loss_option_reaches_the_training(teacher, tmp_path):
    """``--loss ict`` and ``--loss l2`` train different students from the same draws (and the
    run records which), so the option is not lost on its way to the loss."""
    students = {}
    for loss in ("ict", "l2"):
        out = tmp_path / loss
        distill(teacher, method="consistency", out=out, loss=loss, train_steps=2, batch_size=4,
                progress=False)  # fmt: skip
        assert read_run_config(out / "consistency")["distilled"]["loss"] == loss
        students[loss] = difflab.load(out / "consistency").model.denoiser.net.state_dict()
    assert any(not torch.equal(students["ict"][k], students["l2"][k]) for k in students["l2"])


def test_consistency_training_can_start_from_a_diffusion_run(tmp_path, monkeypatch, capsys):
    """``consistency.init`` (consistency tuning): the network starts from the run's EMA
    weights, so after two steps at a learning rate of 1e-12 the run still holds them, and the
    same run without it (its own random start) does not. The diffusion run is initialised with
    another seed, so that its weights are not the consistency run's own start."""
    source = tmp_path / "diffusion"
    difflab.train("digits-tiny", [*TINY, "train.seed=7"], out=str(source), progress=False)
    same = [*TINY[:-1], "diffusion.schedule=cosine", "diffusion.prediction=eps", "train.lr=1e-12"]
    weights = {}
    for name, extra in (("tuned", [f"consistency.init={source}"]), ("scratch", [])):
        code, _, err = run(monkeypatch, capsys, "train", "digits-tiny", "--recipe", "consistency",
                           f"train.out={tmp_path / name}", *same, *extra, "--quiet")  # fmt: skip
        assert code == 0, err
        weights[name] = difflab.load(tmp_path / name).model.denoiser.net.state_dict()
    start = difflab.load(source).model.denoiser.net.state_dict()
    assert all(torch.allclose(weights["tuned"][k], start[k], atol=1e-6) for k in start)
    assert not all(torch.allclose(weights["scratch"][k], start[k], atol=1e-2) for k in start)
    shutil.rmtree(source)  # a resumed run needs its checkpoint, not the run it started from
    code, _, err = run(monkeypatch, capsys, "train", str(tmp_path / "tuned"), "--resume",
                       "--quiet")  # fmt: skip
    assert code == 0, err


@pytest.mark.parametrize(
    ("source", "args", "message"),
    [
        ("{tmp}/nothing", [], "is not a run folder"),
        ("{trained}", [], "is a run of the consistency recipe; start from a diffusion run"),
        ("{teacher}", [], "give its values: diffusion.T=20 diffusion.prediction=eps "
                          "diffusion.schedule=cosine"),
        ("{teacher}", ["diffusion.schedule=cosine", "diffusion.prediction=eps", "diffusion.T=20",
                       "model.unet.channels=16"], "give its values: model.unet.channels=8"),
    ],
)  # fmt: skip
def test_a_start_that_is_not_a_matching_diffusion_run_is_refused(
    source, args, message, teacher, trained, tmp_path, monkeypatch, capsys
):
    source = source.format(tmp=tmp_path, trained=trained, teacher=teacher)
    out = tmp_path / "r"
    code, _, err = run(monkeypatch, capsys, "train", "digits-tiny", "--recipe", "consistency",
                       *TINY[:-2], *args, f"consistency.init={source}", f"train.out={out}",
                       "--quiet")  # fmt: skip
    assert code == 2 and err.startswith("difflab: error: consistency.init: ") and message in err
    assert len(err.strip().splitlines()) == 1 and not out.exists()
