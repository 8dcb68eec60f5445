"""The explorer's computations (``difflab.explore``) against closed forms, Monte Carlo and the
library's own samplers, and its refusals; the page itself is driven in a real browser by
``test_explore_browser.py``."""

from __future__ import annotations

import math

import pytest
import torch

from difflab.errors import UserError
from difflab.explore import forward, guidance, reverse, score, text
from difflab.explore.data import (
    CLASSES_2D,
    DATASETS,
    MIXTURE_1D,
    MIXTURE_2D,
    figure_image,
    grid_points,
    mixture,
    schedule,
)
from difflab.gaussian.samplers import SAMPLERS, time_grid
from difflab.gaussian.schedules import SCHEDULES, make_schedule

TINY = ["train.steps=2", "train.batch_size=8", "train.log_every=1", "model.unet.channels=8",
        "model.unet.num_heads=2", "diffusion.T=20", "sample.steps=2"]  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny class-conditional digits run, a tiny 2-D run and a tiny text run."""
    import difflab

    root = tmp_path_factory.mktemp("explore-runs")
    difflab.train("digits-tiny", TINY, out=str(root / "digits"), progress=False)
    difflab.train("moons", ["train.steps=2", "train.batch_size=16", "model.mlp.hidden=16"],
                  out=str(root / "moons"), progress=False)  # fmt: skip
    difflab.train("text-tiny", ["train.steps=2"], out=str(root / "text"), progress=False)
    return root


# ---------------------------------------------------------------- forward process


@pytest.mark.parametrize("name", ["cosine", "linear", "ve", "edm", "cosine-logsnr"])
def test_forward_numbers_are_the_schedules(name):
    """At t = 0.3; every schedule is drawn at t = 1 by the next test."""
    view = forward.forward_view(MIXTURE_1D, name, "eps", 0.3)
    alpha, sigma = schedule(name).alpha_sigma(torch.tensor(0.3, dtype=torch.float64))
    n = view.numbers
    assert n["alpha"] == pytest.approx(float(alpha), rel=1e-12)
    assert n["sigma"] == pytest.approx(float(sigma), rel=1e-12)
    assert n["log_snr"] == pytest.approx(math.log(float(alpha) ** 2 / float(sigma) ** 2))
    x0 = float(view.x0[0, 0])
    assert n["mean[0]"] == pytest.approx(float(alpha) * x0)
    assert n["band_high[0]"] - n["band_low[0]"] == pytest.approx(4 * float(sigma))


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_every_schedule_is_shown_up_to_t_1(name):
    """Where alpha(1) = 0 (rectified flow) sigma_ve and logSNR are infinite, not an error."""
    view = forward.forward_view(MIXTURE_1D, name, "eps", 1.0)
    assert view.numbers["sigma_ve"] == float(
        schedule(name).sigma_ve(torch.tensor(1.0, dtype=torch.float64))
    )
    figure_image(forward.forward_figure(view, MIXTURE_1D, name, "eps"))


def test_forward_draws_follow_the_kernel():
    """``(x_t - alpha x_0) / sigma`` of the page's draws is standard normal."""
    view = forward.forward_view(MIXTURE_2D, "cosine", "eps", 0.6)
    n = view.numbers
    z = (view.x_t - n["alpha"] * view.x0) / n["sigma"]
    assert abs(float(z.mean())) < 0.1 and float(z.std()) == pytest.approx(1.0, abs=0.06)


@pytest.mark.parametrize("data", [MIXTURE_1D, MIXTURE_2D])
def test_forward_marginal_moments_match_monte_carlo(data):
    """The exact mean and variance of q(z_t) (first coordinate) against 200,000 draws."""
    sched = schedule("linear")
    view = forward.forward_view(data, "linear", "eps", 0.4)
    oracle = mixture(data, sched)
    gen = torch.Generator().manual_seed(3)
    x0 = oracle.sample(200_000, gen)[:, 0]
    a, s = view.numbers["alpha"], view.numbers["sigma"]
    x_t = a * x0 + s * torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    assert view.numbers["q_mean"] == pytest.approx(float(x_t.mean()), abs=0.01)
    assert view.numbers["q_var"] == pytest.approx(float(x_t.var()), rel=0.01)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v", "score"])
def test_forward_target_is_the_parameterizations(prediction):
    view = forward.forward_view("digits", "cosine", prediction, 0.5)
    a, s = view.numbers["alpha"], view.numbers["sigma"]
    x0, x_t = view.x0[0], view.x_t[0]
    eps = (x_t - a * x0) / s
    expected = {"eps": eps, "x0": x0, "v": a * eps - s * x0, "score": -eps / s}[prediction]
    torch.testing.assert_close(view.target, expected)


@pytest.mark.parametrize("data", DATASETS)
def test_forward_figure_of_every_data_set(data):
    view = forward.forward_view(data, "cosine", "v", 0.5)
    image = figure_image(forward.forward_figure(view, data, "cosine", "v"))
    assert image.width == 800 and len(image.resize((40, 20)).getcolors(800)) > 10


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("moons", "cosine", "eps", 0.0), "t must lie in (0, 1]"),
        (("moons", "cosine", "noise", 0.5), "unknown parameterization"),
        (("moons", "zigzag", "eps", 0.5), "unknown schedule"),
        (("mnist", "cosine", "eps", 0.5), "unknown data set"),
    ],
)
def test_forward_refusals(args, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace("]", r"\]")):
        forward.forward_view(*args)


# ---------------------------------------------------------------- score field and sampling


def _autograd_score(oracle, x, t, labels=None):
    x = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(oracle.log_prob(x, t, labels).sum(), x)
    return grad


def test_score_field_is_the_gradient_of_the_log_density():
    oracle = mixture(MIXTURE_2D, schedule("cosine"))
    points, field = score.score_field(oracle, 0.3)
    torch.testing.assert_close(field, _autograd_score(oracle, points, 0.3))


def test_deterministic_samplers_are_those_that_draw_nothing():
    """DETERMINISTIC lists exactly the samplers whose output does not move with the generator."""
    oracle = mixture(MIXTURE_2D, schedule("cosine"))
    x = score.starting_noise(oracle, 16, 0)
    ts = time_grid(oracle.schedule, 4)
    for name, fn in SAMPLERS.items():
        options = {"steps_per_level": 2} if name == "annealed_langevin" else {}
        a, b = (fn(oracle, x, ts, generator=torch.Generator().manual_seed(s), **options)
                for s in (1, 2))  # fmt: skip
        assert torch.equal(a, b) == (name in score.DETERMINISTIC), name


def test_trajectories_record_every_step_and_converge_to_the_ode():
    oracle = mixture(MIXTURE_2D, schedule("cosine"))
    coarse = score.trajectories(oracle, "ddim", 5, n=32, oracle=oracle)
    fine = score.trajectories(oracle, "dpmpp_2m", 100, n=32, oracle=oracle)
    assert coarse.paths.shape == (6, 32, 2) and coarse.numbers["nfe"] == 5
    torch.testing.assert_close(coarse.paths[0], score.starting_noise(oracle, 32, 0))
    ts = time_grid(oracle.schedule, 5)
    torch.testing.assert_close(coarse.paths[-1], SAMPLERS["ddim"](oracle, coarse.paths[0], ts))
    assert fine.numbers["endpoint_error"] < 0.01 < coarse.numbers["endpoint_error"]
    assert score.trajectories(oracle, "heun", 5, n=32).numbers["nfe"] == 9


def test_the_reference_endpoint_is_the_ode_solution():
    """Heun's 200 steps against DPM-Solver++(2M) with 500 (a second-order solver of the same
    ODE): the page's "exact endpoint" is exact to well below the errors it shows."""
    oracle = mixture(MIXTURE_2D, schedule("cosine"))
    x = score.starting_noise(oracle, 64, 0)
    fine = SAMPLERS["dpmpp_2m"](oracle, x, time_grid(oracle.schedule, 500))
    reference = score.reference_endpoints(oracle, 64, 0)
    assert float((reference - fine).norm(dim=1).mean()) < 3e-3


def test_exact_log_density_matches_a_quadrature():
    """``E log p(x_0) = integral p log p`` on a fine grid, against the page's Monte Carlo."""
    oracle = mixture(MIXTURE_2D, schedule("cosine"))
    points = grid_points(2.5, 500)
    logp = oracle.log_prob(points, 0.0)
    cell = (5.0 / 499) ** 2
    integral = float((logp.exp() * logp).sum() * cell)
    assert score.exact_log_density(oracle) == pytest.approx(integral, abs=0.02)


def test_the_reference_of_a_short_discrete_schedule_uses_its_whole_grid():
    oracle = mixture(MIXTURE_2D, make_schedule("constant", T=50))
    fine = SAMPLERS["heun"](
        oracle, score.starting_noise(oracle, 8, 0), time_grid(oracle.schedule, 50)
    )
    torch.testing.assert_close(score.reference_endpoints(oracle, 8, 0), fine)


def test_trajectories_refusals():
    oracle = mixture(MIXTURE_2D, schedule("cosine"))
    with pytest.raises(UserError, match=r"step count must be a whole number in 1\.\.200"):
        score.trajectories(oracle, "ddim", 0)
    with pytest.raises(UserError, match="unknown sampler"):
        score.trajectories(oracle, "magic", 10)
    with pytest.raises(UserError, match="cannot take 50 sampling steps on a schedule of 20"):
        score.trajectories(mixture(MIXTURE_2D, make_schedule("linear", T=20)), "ddim", 50)


# ---------------------------------------------------------------- guidance


def test_guidance_scores_are_seed_002s_geometry():
    """Conditional and unconditional scores are the gradients of the exact log densities, and
    the guided one is ``(1 + w) conditional - w unconditional``."""
    oracle = mixture(CLASSES_2D, schedule("cosine"))
    view = guidance.guidance_view(oracle, 1, 2.5, 0.4)
    labels = torch.full((len(view.points),), 1)
    torch.testing.assert_close(view.conditional, _autograd_score(oracle, view.points, 0.4, labels))
    torch.testing.assert_close(view.unconditional, _autograd_score(oracle, view.points, 0.4))
    torch.testing.assert_close(view.guided, 3.5 * view.conditional - 2.5 * view.unconditional)


def test_guidance_trades_diversity_for_accuracy():
    """At w = 0 the numbers are those of exact conditional samples (Bayes accuracy, diversity
    1); guidance raises the accuracy and lowers the diversity."""
    oracle = mixture(CLASSES_2D, schedule("cosine"))
    exact = oracle.sample(20_000, torch.Generator().manual_seed(0), torch.full((20_000,), 0))
    bayes = float((oracle.class_posterior(exact, 0.0).argmax(1) == 0).double().mean())
    plain = guidance.guidance_view(oracle, 0, 0.0, 0.5).numbers
    strong = guidance.guidance_view(oracle, 0, 4.0, 0.5).numbers
    assert plain["accuracy"] == pytest.approx(bayes, abs=0.04)
    assert plain["diversity"] == pytest.approx(1.0, abs=0.1)
    assert strong["accuracy"] > plain["accuracy"] and strong["diversity"] < 0.8


def test_digits_guidance_reads_the_runs_samples(runs):
    import difflab

    run = difflab.load(runs / "digits")
    samples, numbers = guidance.digits_guidance(run, 3, 1.0, steps=2)
    assert samples.shape == (guidance.DIGITS_SAMPLES, 1, 8, 8)
    again = run.sample(guidance.DIGITS_SAMPLES, sampler="ddim", steps=2, label=3, guidance=1.0,
                       seed=0).x  # fmt: skip
    torch.testing.assert_close(samples, again)
    assert 0 <= numbers["accuracy"] <= 1 and numbers["diversity"] > 0
    with pytest.raises(UserError, match="not a class-conditional digits run"):
        guidance.digits_guidance(difflab.load(runs / "moons"), 3, 1.0)


# ---------------------------------------------------------------- reverse process


def test_reverse_frames_are_the_runs_own_steps(runs):
    import difflab

    run = difflab.load(runs / "digits")
    frames = reverse.reverse_frames(run, steps=4, sampler="ddim", label="7", seed=5)
    assert len(frames.times) == 5 and frames.times == sorted(frames.times, reverse=True)
    assert frames.times[0] == pytest.approx(1.0) and frames.times[-1] == 0.0
    samples = run.sample(reverse.ROW, sampler="ddim", steps=4, label="7", seed=5).x
    torch.testing.assert_close(frames.x0[-1], samples)
    assert reverse.distance_to_sample(frames, 4) == 0.0
    first = float((frames.x0[0] - samples).abs().mean())
    assert reverse.distance_to_sample(frames, 0) == pytest.approx(first)
    image = figure_image(reverse.reverse_figure(frames, 2))
    assert image.height > 100


def test_reverse_refusals(runs):
    import difflab

    digits = difflab.load(runs / "digits")
    with pytest.raises(UserError, match=r"step count must be a whole number in 1\.\.1000"):
        reverse.reverse_frames(digits, steps=0)
    with pytest.raises(UserError, match="cannot take 50 sampling steps on a schedule of 20"):
        reverse.reverse_frames(digits, steps=50)
    with pytest.raises(UserError, match="--guidance needs a class-conditional model"):
        reverse.reverse_frames(difflab.load(runs / "moons"), steps=2, guidance=1.0)
    with pytest.raises(UserError, match="does not report its steps"):
        reverse.reverse_frames(difflab.load(runs / "text"), steps=2)


# ---------------------------------------------------------------- text


def test_remasking_follows_the_schedule(runs):
    """The remask sampler keeps ``round(L alpha(t_{i+1}))`` tokens after step ``i``: the masked
    fraction of every frame is that closed form, starting all masked and ending with none."""
    import difflab

    model = difflab.load(runs / "text").model
    L = model.context
    result = text.unmasking(model, "remask", 8, seed=1)
    assert len(result.states) == 9 and text.masked_fraction(result, 0) == 1.0
    for i in range(1, 9):
        kept = round(L * float(model.process.alpha(torch.tensor(result.times[i]))))
        assert text.masked_fraction(result, i) == pytest.approx(1 - kept / L)
        marks = text.step_marks(result, i)
        assert int(marks["revealed"].sum()) == round(
            L * (text.masked_fraction(result, i - 1) - text.masked_fraction(result, i))
        )
        assert not bool(marks["corrected"].any())
        assert int(marks["remasked"].sum()) == round(L * text.masked_fraction(result, i))
    expected = 1 - model.process.alpha(torch.tensor(result.times, dtype=torch.float64))
    assert result.expected_masked == pytest.approx(expected.tolist())
    assert text.masked_fraction(result, 8) == 0.0


def test_step_marks_on_a_made_up_run():
    """Revealed, corrected and remasked positions, by their definitions (mask id 3): only a
    sampler that proposes every masked token remasks."""
    states = [torch.tensor([3, 3, 3, 7]), torch.tensor([5, 3, 3, 8])]
    for remasks in (True, False):
        run = text.Unmasking(states, states, [1.0, 0.5], [1.0, 0.5], mask_id=3, remasks=remasks)
        marks = text.step_marks(run, 1)
        assert marks["revealed"].tolist() == [True, False, False, False]
        assert marks["corrected"].tolist() == [False, False, False, True]
        assert marks["remasked"].tolist() == [False, remasks, remasks, False]


def test_text_refusals(runs):
    import difflab

    model = difflab.load(runs / "text").model
    with pytest.raises(UserError, match="step count must be a whole number"):
        text.unmasking(model, "remask", 0)
    with pytest.raises(UserError, match="samples one window"):
        text.unmasking(model, "semi-ar", 4)


# ---------------------------------------------------------------- the command


def _explore(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    import sys

    from difflab.cli import main

    monkeypatch.setattr(sys, "argv", ["difflab", "explore", *args])
    with pytest.raises(SystemExit) as info:
        main()
    return info.value.code, capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["{root}/missing"], "no checkpoint at"),
        (["--port", "0"], "--port must be in 1..65535"),
        (["{root}/moons", "--port", "70000"], "--port must be in 1..65535"),
    ],
)
def test_explore_command_refusals(args, message, runs, monkeypatch, capsys):
    """Bad runs and ports are refused in one line, before anything is served."""
    pytest.importorskip("gradio")
    code, err = _explore(monkeypatch, capsys, *(a.format(root=runs) for a in args))
    assert code == 2 and err.startswith("difflab: error: ") and message in err
    assert err.count("\n") == 1


def test_a_port_in_use_is_refused():
    pytest.importorskip("gradio")
    import socket

    from difflab.explore.app import build_app, launch

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(UserError, match=f"cannot serve on 127.0.0.1:{port}"):
            launch(build_app([]), "127.0.0.1", port, block=False)


def test_explore_without_gradio_says_how_to_install_it(monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "gradio", None)  # as if it were not installed
    monkeypatch.delitem(sys.modules, "difflab.explore.app", raising=False)
    code, err = _explore(monkeypatch, capsys)
    assert (
        code == 2
        and err == "difflab: error: the explorer needs gradio: pip install 'difflab[explore]'\n"
    )


def test_explore_refuses_runs_it_cannot_draw(runs, tmp_path):
    """A vector run of more than 2 dimensions is refused when the page is built."""
    pytest.importorskip("gradio")
    import numpy as np

    import difflab
    from difflab.explore.app import build_app

    data = tmp_path / "three.npy"
    np.save(data, np.random.default_rng(0).uniform(-1, 1, (64, 3)).astype(np.float32))
    difflab.train("moons", ["train.steps=1", "train.batch_size=8", "model.mlp.hidden=8",
                            "data.name=array", f"data.path={data}"],
                  out=str(tmp_path / "three"), progress=False)  # fmt: skip
    with pytest.raises(UserError, match="3-D vectors"):
        build_app([str(tmp_path / "three")])
