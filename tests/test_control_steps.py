"""Diffusion-LM's control as the paper does it (Li et al. 2022, Sec. 5.2; seed 000): gradient
steps on each x_{t-1} of the ancestral sampler on log p(x_{t-1} | x_t) + gamma log p(y | x_{t-1}).
The K-step update against its closed form on a Gaussian "classifier", its optimum, the sampler
moving samples towards a Gaussian toy's posterior, ``--control-steps`` end to end and its
refusals."""

from pathlib import Path

import pytest
import torch
from cli_run import run as cli

from difflab.data.text import load_corpus
from difflab.errors import UserError
from difflab.gaussian.control import Guide, control_steps, controlled_ddpm
from difflab.gaussian.parameterization import Prediction
from difflab.gaussian.samplers import ddpm
from difflab.gaussian.schedules import sqrt_logsnr
from difflab.recipes import load, load_config
from difflab.recipes.text import RECIPE
from difflab.recipes.text.control import train_control

SCHEDULE = sqrt_logsnr()


def gaussian_log_likelihood(m: torch.Tensor, tau2: float):
    """``log p(y | x) = -||x - m||^2 / (2 tau2)`` per row (a Gaussian "classifier")."""
    return lambda x, s: (-0.5 * (x - m) ** 2 / tau2).flatten(1).sum(1)


def test_k_steps_equal_their_closed_form_and_reach_the_optimum():
    # f(x) = -||x - mu||^2 / (2 v) - gamma ||x - m||^2 / (2 tau2): each preconditioned step
    # x <- x + eta v grad f is x - x* <- (1 - eta (1 + gamma v / tau2)) (x - x*), with the
    # maximiser x* = (mu + gamma v m / tau2) / (1 + gamma v / tau2).
    g = torch.Generator().manual_seed(0)
    mu, m, x0 = (torch.randn(4, 3, 2, generator=g, dtype=torch.float64) for _ in range(3))
    v, tau2, gamma, eta = 0.3, 0.5, 2.0, 0.4
    log_likelihood = gaussian_log_likelihood(m, tau2)
    s = torch.full((4,), 0.5, dtype=torch.float64)
    optimum = (mu + gamma * v * m / tau2) / (1 + gamma * v / tau2)
    rate = 1 - eta * (1 + gamma * v / tau2)
    for k in (1, 2, 5):
        with torch.inference_mode():  # as the sampler calls it
            x = control_steps(x0, mu, v, log_likelihood, s, scale=gamma, steps=k, step_size=eta)
        torch.testing.assert_close(x, optimum + rate**k * (x0 - optimum))
    far = control_steps(x0, mu, v, log_likelihood, s, scale=gamma, steps=200, step_size=eta)
    torch.testing.assert_close(far, optimum)
    # gamma = 0: the fluency term alone pulls towards the model's mean; v = 0: nothing moves
    alone = control_steps(x0, mu, v, log_likelihood, s, scale=0.0, steps=3, step_size=eta)
    torch.testing.assert_close(alone, mu + (1 - eta) ** 3 * (x0 - mu))
    assert torch.equal(control_steps(x0, mu, 0.0, log_likelihood, s, scale=gamma, steps=3,
                                     step_size=eta), x0)  # fmt: skip


class GaussianDenoiser:
    """The exact denoiser of ``x_0 ~ N(0, 1)`` per coordinate."""

    schedule = SCHEDULE

    def __call__(self, x_t, t, cond=None, *, alpha_sigma=None):
        alpha, sigma = (v[:, None] for v in self.schedule.alpha_sigma(t))
        return Prediction(x_t, alpha, sigma, eps=sigma * x_t / (alpha**2 + sigma**2))


def test_the_sampler_moves_samples_towards_the_constraint():
    # x_0 ~ N(0, 1), y = x_0 + N(0, s2) observed as y = 2: p(y | x_s) is Gaussian in closed
    # form and the posterior mean of x_0 is y / (1 + s2) = 1.54. Unguided samples have mean 0;
    # the controlled ones move most of the way (the K-step ascent is a mode-seeking
    # approximation, not an exact posterior sampler) and never past the likelihood's own peak.
    y, s2 = 2.0, 0.3

    def log_likelihood(x, s):
        alpha, sigma = (v[:, None] for v in SCHEDULE.alpha_sigma(s))
        total = alpha**2 + sigma**2
        return (-0.5 * (y - alpha * x / total) ** 2 / (s2 + sigma**2 / total)).sum(-1)

    x = torch.randn(4000, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ts = SCHEDULE.timesteps(50)
    plain = ddpm(GaussianDenoiser(), x, ts, generator=torch.Generator().manual_seed(1))
    guide = Guide(log_likelihood, 1.0, steps=3, step_size=0.5)
    with torch.inference_mode():
        steered = controlled_ddpm(GaussianDenoiser(), x, ts, guide,
                                  generator=torch.Generator().manual_seed(1))  # fmt: skip
    assert abs(float(plain.mean())) < 0.1
    assert 0.6 * y / (1 + s2) < float(steered.mean()) < y
    assert float(steered.std()) < 0.5 * (s2 / (1 + s2)) ** 0.5  # and, mode-seeking, narrower
    with pytest.raises(ValueError, match="steps >= 1"):
        controlled_ddpm(GaussianDenoiser(), x, ts, Guide(log_likelihood, 1.0))


# ---------------------------------------------------------------- the command line


@pytest.fixture(scope="module")
def dlm(tmp_path_factory) -> Path:
    """A tiny diffusion-lm run on whole lines with its control classifier."""
    root = tmp_path_factory.mktemp("control-steps")
    text = root / "slice.txt"
    text.write_text(load_corpus()[100_000:130_000], encoding="utf-8")
    overrides = [
        f"data.source={text}",
        f"train.out={root / 'dlm'}",
        "train.steps=2",
        "data.length=48",
        "diffusion.kind=diffusion-lm",
        "diffusion.lines=true",
    ]
    _, cfg = load_config("text-tiny", overrides)
    RECIPE.train(cfg, progress=False)
    train_control(load(root / "dlm", "cpu").model, steps=3, progress=False)
    return root / "dlm"


def test_control_steps_sample_from_the_command_line(dlm, monkeypatch, capsys):
    code, out, err = cli(monkeypatch, capsys, "sample", str(dlm), "--n", "3", "--steps", "4",
                         "--control", "length=20", "--control-scale", "4", "--control-steps",
                         "2", "--control-step-size", "0.3", "--out", str(dlm / "k"))  # fmt: skip
    assert code == 0, err
    assert "3 samples" in out
    run = load(dlm, "cpu")
    # gradient steps change the samples of the same seed, and differ from score guidance
    options = {"steps": 4, "seed": 1, "control": ["length=20"], "control_scale": 50.0}
    score = run.sample(3, **options).texts
    steps = run.sample(3, control_steps=3, **options).texts
    ddpm_plain = run.sample(3, steps=4, seed=1, sampler="ddpm").texts
    assert steps != ddpm_plain and steps != score


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"control_steps": 2}, "--control-steps needs at least one --control"),
        ({"control": ["length=20"], "control_steps": 0}, "--control-steps must be an integer"),
        ({"control": ["length=20"], "control_step_size": 0.5},
         "--control-step-size applies with --control-steps only"),
        ({"control": ["length=20"], "control_steps": 2, "control_step_size": 1.5},
         r"--control-step-size must be in \(0, 1\]"),
        ({"control": ["length=20"], "control_steps": 2, "sampler": "ddim"},
         "--sampler ddim does not apply"),
    ],
)  # fmt: skip
def test_bad_control_steps_are_refused(dlm, options, message):
    with pytest.raises(UserError, match=message):
        load(dlm, "cpu").sample(2, steps=2, **options)


def test_control_steps_refused_in_one_line_from_the_command_line(dlm, monkeypatch, capsys):
    code, out, err = cli(monkeypatch, capsys, "sample", str(dlm), "--control", "length=20",
                         "--control-steps", "2", "--sampler", "dpmpp_2m")  # fmt: skip
    assert code == 2 and out == "" and err.count("\n") == 1
    assert err.startswith("difflab: error: --control-steps takes gradient steps")
