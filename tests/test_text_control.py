"""Control of Diffusion-LM by classifier guidance (seed 000): the guidance gradient against the
closed form of a Gaussian toy, the controls' log-likelihoods against enumeration, the rows of
whole lines, refusals, and ``difflab train-control`` / ``sample --control`` end to end."""

import itertools
from pathlib import Path

import pytest
import torch
from cli_run import run as cli

from difflab.data.text import EOS_ID, PAD_ID, CharTokenizer, load_corpus
from difflab.errors import UserError
from difflab.gaussian.control import LikelihoodGuidance
from difflab.gaussian.parameterization import Prediction
from difflab.gaussian.schedules import sqrt_logsnr
from difflab.recipes import load, load_config
from difflab.recipes.text import RECIPE
from difflab.recipes.text.continuous import LINES_PER_ROW, line_rows
from difflab.recipes.text.control import (
    Control,
    count_log_likelihood,
    length_log_likelihood,
    word_log_likelihood,
)

SCHEDULE = sqrt_logsnr()


class GaussianDenoiser:
    """The exact denoiser of ``x_0 ~ N(m, v)`` per coordinate: ``E[eps | x_t] = sigma (x_t -
    alpha m) / (alpha^2 v + sigma^2)``."""

    def __init__(self, mean: float, var: float):
        self.schedule, self.mean, self.var = SCHEDULE, mean, var

    def __call__(self, x_t, t, cond=None, *, alpha_sigma=None):
        alpha, sigma = (v[:, None] for v in self.schedule.alpha_sigma(t))
        eps = sigma * (x_t - alpha * self.mean) / (alpha**2 * self.var + sigma**2)
        return Prediction(x_t, alpha, sigma, eps=eps)


def test_guidance_turns_the_exact_prior_denoiser_into_the_exact_posterior_one():
    # x_0 ~ N(0, 1), y = x_0 + N(0, s2): p(y | x_t) = N(y; alpha x_t / (alpha^2 + sigma^2),
    # s2 + sigma^2 / (alpha^2 + sigma^2)) and p(x_0 | y) = N(y / (1 + s2), s2 / (1 + s2)).
    # Bayes' rule: at scale 1 the guided prior denoiser is the posterior's, exactly.
    y, s2 = 1.7, 0.3

    def log_likelihood(x_t, t):
        alpha, sigma = (v[:, None] for v in SCHEDULE.alpha_sigma(t))
        total = alpha**2 + sigma**2
        mean, var = alpha * x_t / total, s2 + sigma**2 / total
        return (-0.5 * (y - mean) ** 2 / var).sum(-1)

    x_t = torch.randn(6, 3, dtype=torch.float64)
    t = torch.linspace(0.05, 0.95, 6, dtype=torch.float64)
    guided = LikelihoodGuidance(GaussianDenoiser(0.0, 1.0), log_likelihood, 1.0)
    with torch.inference_mode():  # as the samplers call it
        pred = guided(x_t, t)
    posterior = GaussianDenoiser(y / (1 + s2), s2 / (1 + s2))(x_t, t)
    torch.testing.assert_close(pred.eps, posterior.eps)
    torch.testing.assert_close(pred.x0, posterior.x0)
    # The gradient itself: alpha (y - mean) / var / (alpha^2 + sigma^2), and the scale is linear.
    alpha, sigma = (v[:, None] for v in SCHEDULE.alpha_sigma(t))
    grad = alpha * (y - alpha * x_t) / (s2 + sigma**2)
    torch.testing.assert_close(guided.gradient(x_t, t), grad)
    twice = LikelihoodGuidance(GaussianDenoiser(0.0, 1.0), log_likelihood, 2.0)(x_t, t)
    plain = GaussianDenoiser(0.0, 1.0)(x_t, t)
    torch.testing.assert_close(twice.eps, plain.eps - 2.0 * sigma * grad)


def _enumerate(log_probs: torch.Tensor, event) -> torch.Tensor:
    """``log sum_w p(w) event(w)`` over every sequence ``w`` of the independent positions."""
    batch, length, vocab = log_probs.shape
    totals = torch.zeros(batch, dtype=log_probs.dtype)
    for w in itertools.product(range(vocab), repeat=length):
        weight = event(w)
        if weight:
            totals += weight * log_probs[:, torch.arange(length), list(w)].sum(-1).exp()
    return totals.log()


def test_the_controls_log_likelihoods_match_enumeration():
    torch.manual_seed(0)
    vocab = 5  # ids 0..4: <pad>, <bos>, <eos>, <unk> are 0..3 in difflab; 4 a word
    assert {PAD_ID, EOS_ID} <= set(range(4))
    log_probs = torch.randn(3, 5, vocab, dtype=torch.float64).log_softmax(-1)
    ended = {PAD_ID, EOS_ID}
    for n in (1, 3, 5):
        exact = _enumerate(log_probs, lambda w, n=n: all((x in ended) == (i >= n)
                                                         for i, x in enumerate(w)))  # fmt: skip
        torch.testing.assert_close(length_log_likelihood(log_probs, n), exact)
    for count in (0, 2, 5):
        exact = _enumerate(log_probs, lambda w, c=count: sum(x == 4 for x in w) == c)
        torch.testing.assert_close(count_log_likelihood(log_probs, 4, count), exact)
    # The word term is the log of the expected number of occurrences of the word.
    word = (4, 1)
    exact = _enumerate(log_probs, lambda w: sum(tuple(w[j : j + 2]) == word for j in range(4)))
    torch.testing.assert_close(word_log_likelihood(log_probs, word), exact)


def test_controls_judge_samples_independently():
    tokenizer = CharTokenizer.train(["KING:\nabc?"])
    assert Control("length", 10).satisfied("x" * 11, tokenizer)
    assert not Control("length", 10).satisfied("x" * 12, tokenizer)
    assert Control("word", "KING").satisfied("the KING:", tokenizer)
    assert not Control("word", "KING").satisfied("the King", tokenizer)
    assert Control("lines", 2).satisfied("a\nb", tokenizer)
    assert not Control("lines", 2).satisfied("a\nb\nc", tokenizer)


def test_rows_of_whole_lines_end_in_eos():
    docs = ["First line\n\nsecond one\nthird\nfourth line\nfifth"]
    tokenizer = CharTokenizer.train(docs)
    tokens, loss_mask = line_rows(docs, tokenizer, 24)
    assert bool(loss_mask.all()) and tokens.shape[1] == 24
    lines = ["First line", "second one", "third", "fourth line", "fifth"]
    for j, row in enumerate(tokens.tolist()):
        end = row.index(EOS_ID)
        assert all(x == PAD_ID for x in row[end + 1 :])
        text = tokenizer.decode(torch.tensor(row[:end]))
        k = text.count("\n") + 1
        assert 1 <= k <= 1 + j % LINES_PER_ROW and text == "\n".join(lines[j : j + k])
        if j + k < len(lines) and k < 1 + j % LINES_PER_ROW:  # the next line did not fit
            assert len(text) + 1 + len(lines[j + k]) >= 24
    with pytest.raises(UserError, match="no line of the text fits"):
        line_rows(docs, tokenizer, 4)


# ---------------------------------------------------------------- the command line


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """A tiny diffusion-lm run on whole lines with its control classifier, and an mdlm run."""
    root = tmp_path_factory.mktemp("control")
    text = root / "slice.txt"
    text.write_text(load_corpus()[100_000:130_000], encoding="utf-8")
    for name, kind in (("dlm", "diffusion-lm"), ("stream", "diffusion-lm"), ("mdlm", "mdlm")):
        extra = ["diffusion.lines=true"] if name == "dlm" else []
        _, cfg = load_config("text-tiny", [f"data.source={text}", f"train.out={root / name}",
                                           "train.steps=2", "data.length=48",
                                           f"diffusion.kind={kind}", *extra])  # fmt: skip
        RECIPE.train(cfg, progress=False)
    return root


def test_train_control_then_sample_with_three_controls(runs, monkeypatch, capsys):
    dlm = str(runs / "dlm")
    code, _, err = cli(monkeypatch, capsys, "sample", dlm, "--control", "length=20")
    assert code != 0 and err.strip().startswith("difflab: error: no control classifier in")
    code, out, _ = cli(monkeypatch, capsys, "train-control", dlm, "--steps", "3", "--quiet")
    assert code == 0 and "trained 3 steps" in out
    assert (runs / "dlm" / "control" / "checkpoint.safetensors").is_file()
    controls = ["--control", "length=20", "--control", "word=KING", "--control", "lines=2"]
    code, out, _ = cli(monkeypatch, capsys, "sample", dlm, "--n", "3", "--steps", "4", *controls,
                       "--control-scale", "2", "--out", str(runs / "guided"))  # fmt: skip
    assert code == 0 and "3 samples" in out
    # Guidance changes the samples of the same seed; scale 0 is the unguided sampler.
    run = load(runs / "dlm", "cpu")
    plain = run.sample(3, steps=4, seed=1).texts
    assert run.sample(3, steps=4, seed=1, control=["length=20"], control_scale=0.0).texts == plain
    assert run.sample(3, steps=4, seed=1, control=["length=20"], control_scale=50.0).texts != plain
    code, _, err = cli(monkeypatch, capsys, "train-control", dlm, "--quiet")
    assert code != 0 and "already holds a control classifier" in err


@pytest.mark.parametrize(
    ("run", "options", "message"),
    [
        ("mdlm", {"control": ["length=20"]}, "control applies to diffusion.kind=diffusion-lm"),
        ("dlm", {"control": ["mood=happy"]}, "NAME one of length, word, lines"),
        ("dlm", {"control": ["length"]}, "give NAME=VALUE"),
        ("dlm", {"control": ["length=0"]}, "a whole number >= 1"),
        ("dlm", {"control": ["length=49"]}, "at most the context, 48 tokens"),
        ("dlm", {"control": ["word=\u00e9\u00e9"]}, "a word of this model's vocabulary"),
        ("dlm", {"control": ["length=5", "length=6"]}, "give each control once"),
        ("dlm", {"control_scale": 2.0}, "--control-scale needs at least one --control"),
        ("dlm", {"control": ["lines=2"], "control_scale": -1.0}, "finite number >= 0"),
        ("stream", {"control": ["length=20"]}, "needs a run trained on whole lines"),
        ("dlm", {"control": ["length=20"], "length": 10}, "cannot be met by passages cut at"),
    ],
)
def test_bad_controls_are_refused(runs, run, options, message):
    with pytest.raises(UserError, match=message):
        load(runs / run, "cpu").sample(2, steps=2, **options)


def test_train_control_is_refused_elsewhere(runs, monkeypatch, capsys):
    code, _, err = cli(monkeypatch, capsys, "train-control", str(runs / "mdlm"))
    assert code != 0 and err.strip() == (
        "difflab: error: control applies to diffusion.kind=diffusion-lm runs, not mdlm"
    )
    code, _, err = cli(monkeypatch, capsys, "train-control", str(runs / "dlm"), "--steps", "0")
    assert code != 0 and "--steps must be >= 1" in err
    with pytest.raises(UserError, match=r"diffusion\.lines does not apply to diffusion\.kind=mdlm"):
        load_config("text-tiny", ["diffusion.lines=true"])
