"""Continuous diffusion for text (Diffusion-LM, DiffuSeq, self-conditioning): the embedding and
rounding steps, seed 000's loss by hand, the clamping trick, self-conditioning, partial noising,
chrF, and the ``gaussian`` kinds of the text recipe end to end."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from cli_run import run

from difflab.data.text import CharTokenizer, load_corpus
from difflab.errors import UserError
from difflab.gaussian.embedding import (
    FIRST_STEP,
    Clamped,
    SourceReimposed,
    embedding_diffusion_loss,
    embedding_noise,
    nearest_embedding,
    round_to_tokens,
)
from difflab.gaussian.parameterization import Denoiser
from difflab.gaussian.samplers import SAMPLERS
from difflab.gaussian.schedules import sqrt_logsnr
from difflab.gaussian.self_conditioning import SelfConditioned
from difflab.nets.embedding_transformer import EmbeddingDiffusionNet
from difflab.recipes import load, load_config
from difflab.recipes.text import RECIPE
from difflab.recipes.text.continuous import (
    corpus_chrf,
    denoiser_of,
    minimum_bayes_risk,
    task_rows,
    unshuffle_pairs,
)

SCHEDULE = sqrt_logsnr()


class Oracle(torch.nn.Module):
    """A stand-in denoiser network that returns ``f(x_t)`` and records every call."""

    def __init__(self, fn):
        super().__init__()
        self.fn, self.calls = fn, []

    def forward(self, x_t, c_noise, self_cond=None):
        self.calls.append((x_t.clone(), c_noise.clone(), None if self_cond is None else
                           self_cond.clone(), torch.is_grad_enabled()))  # fmt: skip
        return self.fn(x_t)


def one_hot_net(vocab: int, scale: float = 3.0, self_condition: bool = False):
    """A net whose embedding is frozen at ``scale * I`` (one-hot-like, ``d = V``)."""
    net = EmbeddingDiffusionNet(vocab, vocab, 16, width=8, depth=1, num_heads=2,
                                self_condition=self_condition)  # fmt: skip
    with torch.no_grad():
        net.embed.weight.copy_(scale * torch.eye(vocab))
    net.embed.weight.requires_grad_(False)
    return net


# ---------------------------------------------------------------- embedding and rounding


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "dpm_solver", "dpmpp_2m"])
def test_exact_x0_predictor_and_rounding_recover_every_token(sampler):
    vocab, L = 11, 16
    net = one_hot_net(vocab)
    words = torch.arange(2 * L).remainder(vocab).view(2, L)  # every token appears
    net.denoiser = Oracle(lambda x_t: net.embed(words))
    x = torch.randn(2, L, vocab, generator=torch.Generator().manual_seed(0))
    x0 = SAMPLERS[sampler](Denoiser(net, SCHEDULE, "x0"), x, SCHEDULE.timesteps(10))
    assert torch.equal(round_to_tokens(net, x0), words)
    # The rounding alone: each embedding is its own word, and so is a point near it.
    assert torch.equal(round_to_tokens(net, net.embed.weight + 0.4), torch.arange(vocab))


def test_loss_terms_match_a_hand_computation():
    """Seed 000's three terms, recomputed from the loss's documented draws: ``x_0`` noise, the
    times, then the noise of ``x_t`` and of ``x_1``; the denoiser is ``x0_hat = x_t / 2``."""
    vocab, d, B, L = 7, 4, 3, 5
    net = EmbeddingDiffusionNet(vocab, d, L, width=8, depth=1, num_heads=2)
    net.denoiser = Oracle(lambda x_t: 0.5 * x_t)
    words = torch.randint(vocab, (B, L), generator=torch.Generator().manual_seed(1))
    loss_mask = torch.ones(B, L, dtype=torch.bool)
    loss_mask[0, 3:] = False
    got = embedding_diffusion_loss(net, SCHEDULE, words, loss_mask=loss_mask,
                                   generator=torch.Generator().manual_seed(5))  # fmt: skip

    g = torch.Generator().manual_seed(5)
    E = net.embed.weight.detach().double()
    emb = E[words]
    sigma_0 = embedding_noise(SCHEDULE)
    x0 = emb + sigma_0 * torch.randn(B, L, d, generator=g).double()
    t = torch.rand(B, generator=g, dtype=torch.float64).clamp(FIRST_STEP, 1.0)
    eps_t, eps_1 = (torch.randn(B, L, d, generator=g).double() for _ in range(2))
    s = SCHEDULE.config()["s"]
    u_max = (1 / (1 + math.exp(SCHEDULE.config()["log_snr_min"]))) ** 2 - s

    def alpha_sigma(time):
        alpha2 = 1 - torch.sqrt(torch.as_tensor(time, dtype=torch.float64) * u_max + s)
        return alpha2.sqrt(), (1 - alpha2).sqrt()

    a, sg = alpha_sigma(t)
    x_t = a[:, None, None] * x0 + sg[:, None, None] * eps_t
    a1, s1 = alpha_sigma(FIRST_STEP)
    x_1 = a1 * x0 + s1 * eps_1
    m = loss_mask.double()
    mse = (((0.5 * x_t - x0) ** 2).mean(-1) * m).sum() / m.sum()
    embedding = (((emb - 0.5 * x_1) ** 2).mean(-1) * m).sum() / m.sum()
    nll = F.cross_entropy((x0 @ E.T).transpose(1, 2), words, reduction="none")
    rounding = (nll * m).sum() / m.sum()
    for name, want in [("x0_mse", mse), ("embedding", embedding), ("rounding", rounding)]:
        assert float(getattr(got, name).detach()) == pytest.approx(float(want), rel=1e-4), name
    assert float(got.loss.detach()) == pytest.approx(float(mse + embedding + rounding), rel=1e-4)


def test_the_loss_trains_the_embedding_end_to_end():
    net = EmbeddingDiffusionNet(9, 4, 6, width=8, depth=1, num_heads=2)
    words = torch.randint(9, (2, 6))
    embedding_diffusion_loss(net, SCHEDULE, words).loss.backward()
    assert net.embed.weight.grad is not None and net.embed.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------- clamping


def test_clamping_keeps_an_exact_embedding_and_snaps_any_point_to_its_nearest():
    g = torch.Generator().manual_seed(0)
    E = torch.randn(13, 5, generator=g)
    points = 2 * torch.randn(4, 9, 5, generator=g)
    brute = torch.stack([(points - e).norm(dim=-1) for e in E], -1).argmin(-1)
    assert torch.equal(nearest_embedding(points, E), brute)

    target = {"x0": points}
    inner = Denoiser(lambda x_t, c: target["x0"], SCHEDULE, "x0")
    clamped = Clamped(inner, E)
    x_t, t = torch.randn(4, 9, 5, generator=g), torch.full((4,), 0.3, dtype=torch.float64)
    pred = clamped(x_t, t)
    assert torch.equal(pred.x0, E[brute])
    assert torch.allclose(pred.x_t, pred.alpha * pred.x0 + pred.sigma * pred.eps, atol=1e-5)
    target["x0"] = E[brute]  # already embeddings: unchanged, bit for bit
    assert torch.equal(clamped(x_t, t).x0, E[brute])


# ---------------------------------------------------------------- self-conditioning


def test_without_the_flag_the_model_is_the_plain_one():
    torch.manual_seed(0)
    plain = EmbeddingDiffusionNet(9, 4, 6, width=8, depth=1, num_heads=2)
    torch.manual_seed(0)
    off = EmbeddingDiffusionNet(9, 4, 6, width=8, depth=1, num_heads=2, self_condition=False)
    torch.manual_seed(0)
    on = EmbeddingDiffusionNet(9, 4, 6, width=8, depth=1, num_heads=2, self_condition=True)
    assert off.denoiser.proj_in.in_features == 4 and on.denoiser.proj_in.in_features == 8
    for (name, a), (_, b) in zip(plain.state_dict().items(), off.state_dict().items(),
                                 strict=True):  # fmt: skip
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="without self_condition"):
        off(torch.zeros(1, 6, 4), torch.zeros(1), torch.zeros(1, 6, 4))
    # Training: one network call per row and no previous estimate when off.
    off.denoiser = Oracle(lambda x_t: 0.5 * x_t)
    embedding_diffusion_loss(off, SCHEDULE, torch.randint(9, (2, 6)))
    assert len(off.denoiser.calls) == 1 and off.denoiser.calls[0][2] is None


def test_training_feeds_zeros_or_the_stop_gradient_first_estimate():
    """One coin per batch (gaussian.self_conditioning.SelfConditionedTraining): zeros and one
    trained call, or a first call without gradient whose estimate the trained call reads."""
    net = EmbeddingDiffusionNet(9, 4, 6, width=8, depth=1, num_heads=2, self_condition=True)
    recorder = Oracle(lambda x_t: 0.5 * x_t)
    net.denoiser = recorder
    generator = torch.Generator().manual_seed(0)
    kinds = []
    for _ in range(20):
        recorder.calls.clear()
        embedding_diffusion_loss(net, SCHEDULE, torch.randint(9, (4, 6)), generator=generator)
        if len(recorder.calls) == 1:
            ((_, _, cond, grad),) = recorder.calls
            assert grad and torch.equal(cond, torch.zeros_like(cond))
        else:
            (x1, _, cond1, grad1), (x2, _, cond2, grad2) = recorder.calls
            assert torch.equal(cond1, torch.zeros_like(cond1))
            assert not grad1 and grad2 and torch.equal(x1, x2)
            assert torch.equal(cond2, 0.5 * x1)
        kinds.append(len(recorder.calls))
    assert set(kinds) == {1, 2}


@pytest.mark.parametrize("sampler", ["ddim", "dpm_solver"])
def test_the_sampler_feeds_the_previous_estimate(sampler):
    seen, returned = [], []

    def fn(x_t, c_noise, self_cond):
        seen.append(self_cond.clone())
        out = torch.tanh(x_t) + 0.1 * len(seen)
        returned.append(out.clone())
        return out

    denoiser = SelfConditioned(Denoiser(fn, SCHEDULE, "x0"))
    SAMPLERS[sampler](denoiser, torch.randn(2, 5, 3), SCHEDULE.timesteps(6))
    assert len(seen) > 6 - 1
    assert torch.equal(seen[0], torch.zeros(2, 5, 3))
    for k in range(1, len(seen)):
        assert torch.equal(seen[k], returned[k - 1]), k


# ---------------------------------------------------------------- DiffuSeq


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "dpm_solver", "dpmpp_2m"])
def test_source_positions_are_bit_identical_through_the_whole_chain(sampler):
    vocab, L = 10, 12
    net = EmbeddingDiffusionNet(vocab, 4, L, width=8, depth=1, num_heads=2)
    recorder = Oracle(lambda x_t: torch.sin(3 * x_t))
    net.denoiser = recorder
    source = torch.randint(vocab, (3, L))
    given = torch.zeros(3, L, dtype=torch.bool)
    given[:, : L // 2] = True
    src = net.embed(source).detach()
    denoiser = SourceReimposed(Denoiser(net, SCHEDULE, "x0"), src, given)
    x = torch.randn(3, L, 4, generator=torch.Generator().manual_seed(0))
    x0 = SAMPLERS[sampler](denoiser, x, SCHEDULE.timesteps(8))
    assert len(recorder.calls) >= 8
    for x_in, *_ in recorder.calls:
        assert torch.equal(x_in[given], src[given])
        assert not torch.equal(x_in[~given], src[~given])
    assert torch.equal(x0[given], src[given])
    # Training: the source is given clean in x_t; the target is noised.
    recorder.calls.clear()
    embedding_diffusion_loss(net, SCHEDULE, source, noise_mask=~given)
    x_in = recorder.calls[0][0]
    assert torch.equal(x_in[given.repeat(2, 1)], torch.cat([src, src])[given.repeat(2, 1)])


def test_unshuffle_pairs_and_rows():
    docs = ["The king is dead, long live\nthe king\nTo be or not to be, that is"]
    pairs = unshuffle_pairs(docs)
    assert [target for _, target in pairs] == ["The king is dead, long live",
                                               "To be or not to be, that is"]  # fmt: skip
    for source, target in pairs:
        assert sorted(source.split()) == sorted(target.split())
    tokenizer = CharTokenizer.train(docs)
    rows = task_rows(docs, tokenizer, 64)
    assert rows.tokens.shape == (2, 64) and bool(rows.noise_mask[:, 32:].all())
    assert not bool(rows.noise_mask[:, :32].any())
    assert tokenizer.decode(rows.tokens[1, 32:]) == "To be or not to be, that is"
    assert tokenizer.decode(rows.tokens[1, :32]) == pairs[1][0]
    with pytest.raises(UserError, match="no line of the text fits"):
        task_rows(docs, tokenizer, 16)


def test_chrf_is_sacrebleus_definition_and_minimum_bayes_risk():
    # "a b" against "abc", whitespace removed: n=1: P = 2/2, R = 2/3; n=2: P = 1/1, R = 1/2;
    # n >= 3: no hypothesis n-grams, so those orders are left out of the averages P = 1,
    # R = 7/12, and chrF = 100 (1 + 4) P R / (4 P + R).
    p, r = 1.0, (2 / 3 + 1 / 2) / 2
    assert corpus_chrf(["a b"], ["abc"]) == pytest.approx(100 * 5 * p * r / (4 * p + r))
    assert corpus_chrf(["the cat"], ["the cat"]) == pytest.approx(100.0)
    assert corpus_chrf(["xyz"], ["abc"]) == 0.0
    # A corpus sums the counts first: not the mean of the sentence scores.
    pair = corpus_chrf(["a b", "abcdefgh"], ["abc", "abcdefgh"])
    assert 100 * 5 * p * r / (4 * p + r) < pair < 100.0
    assert pair != pytest.approx((100 * 5 * p * r / (4 * p + r) + 100) / 2)
    # Two near-identical candidates and an outlier: the risk picks one of the two.
    assert minimum_bayes_risk(["the cat sat", "dog ran far", "the cat sat down"]) in (0, 2)
    assert minimum_bayes_risk(["dog ran far", "the cat sat", "the cat sat"]) == 1
    assert minimum_bayes_risk(["only"]) == 0


# ---------------------------------------------------------------- the recipe


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "slice.txt"
    path.write_text(load_corpus()[100_000:130_000], encoding="utf-8")
    return path


def tiny(text_file: Path, out: Path, *overrides: str):
    _, cfg = load_config(
        "text-tiny", [f"data.source={text_file}", f"train.out={out}", "train.steps=2", *overrides]
    )
    return cfg


@pytest.mark.parametrize("self_condition", [False, True])
def test_diffusion_lm_trains_samples_and_evaluates(text_file, tmp_path, self_condition):
    cfg = tiny(text_file, tmp_path, "diffusion.kind=diffusion-lm",
               f"diffusion.self_condition={str(self_condition).lower()}")  # fmt: skip
    RECIPE.train(cfg, progress=False)
    run = load(tmp_path, "cpu")
    assert isinstance(denoiser_of(run.model, False), SelfConditioned) is self_condition
    for clamp in (True, False):
        samples = run.sample(3, prompt="KING", length=24, steps=5, clamp=clamp).texts
        assert len(samples) == 3 and all(s.startswith("KING") and len(s) <= 24 for s in samples)
    again = run.sample(3, prompt="KING", length=24, steps=5, sampler="dpm_solver", seed=4)
    assert again.texts == run.sample(3, prompt="KING", length=24, steps=5, sampler="dpm_solver",
                                     seed=4).texts  # fmt: skip
    metrics = run.evaluate(n=8, t_samples=2).metrics
    assert metrics["bound"] is False and metrics["step"] == 2
    terms = [metrics[k] for k in ("x0_mse", "embedding", "rounding")]
    assert all(math.isfinite(v) and v > 0 for v in terms)
    assert metrics["loss"] == pytest.approx(sum(terms))


def test_diffuseq_writes_targets_for_sources(text_file, tmp_path):
    RECIPE.train(tiny(text_file, tmp_path, "diffusion.kind=diffuseq", "data.length=64"),
                 progress=False)  # fmt: skip
    run = load(tmp_path, "cpu")
    targets = run.sample(2, prompt="king the is here", steps=4).texts
    assert len(targets) == 2 and all(len(t) <= 32 for t in targets)
    metrics = run.evaluate(n=4, t_samples=1).metrics
    assert 0.0 <= metrics["chrf"] <= 100.0 and metrics["chrf_source"] > 20.0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["sample.clamp=false"], "sample.clamp does not apply to diffusion.kind=mdlm"),
        (["diffusion.embed_dim=8"], "diffusion.embed_dim does not apply to diffusion.kind=mdlm"),
        (["diffusion.self_condition=true"], "diffusion.self_condition does not apply"),
        (["diffusion.prediction=eps"], "diffusion.prediction does not apply"),
        (["sample.sampler=ddim"], "ddim is a Gaussian sampler"),
        (["diffusion.kind=diffusion-lm", "diffusion.schedule=log-linear"], "diffusion.schedule"),
        (["diffusion.kind=diffusion-lm", "diffusion.T=10"], "diffusion.T does not apply"),
        (["diffusion.kind=diffusion-lm", "diffusion.prediction=score"], "diffusion.prediction"),
        (["diffusion.kind=diffusion-lm", "diffusion.embed_dim=0"], "embed_dim must be >= 1"),
        (["diffusion.kind=diffusion-lm", "sample.sampler=cached"], "sample.sampler must be one"),
        (["diffusion.kind=diffusion-lm", "sample.temperature=0.5"], "sample.temperature does"),
        (["diffusion.kind=diffusion-lm", "sample.block=8"], "sample.block does not apply"),
        (["diffusion.kind=diffuseq", "model.time_conditioning=false"], "cannot be off"),
    ],
)
def test_bad_configs_of_the_gaussian_kinds_are_refused(overrides, message):
    with pytest.raises(UserError, match=message):
        load_config("text-tiny", overrides)


def test_configs_of_the_gaussian_kinds_that_apply_are_accepted():
    load_config("text-tiny", ["diffusion.kind=diffusion-lm", "diffusion.schedule=cosine-logsnr",
                              "diffusion.prediction=eps", "diffusion.embed_dim=8",
                              "sample.sampler=dpm_solver", "sample.clamp=false",
                              "diffusion.stratified=false"])  # fmt: skip


def test_bad_requests_of_the_gaussian_kinds_are_refused(text_file, tmp_path):
    RECIPE.train(tiny(text_file, tmp_path / "dlm", "diffusion.kind=diffusion-lm"), progress=False)
    RECIPE.train(tiny(text_file, tmp_path / "seq", "diffusion.kind=diffuseq", "data.length=64"),
                 progress=False)  # fmt: skip
    RECIPE.train(tiny(text_file, tmp_path / "mdlm"), progress=False)
    dlm, seq = load(tmp_path / "dlm", "cpu"), load(tmp_path / "seq", "cpu")
    for options, message in [
        ({"temperature": 0.5}, "--temperature does not apply to diffusion.kind=diffusion-lm"),
        ({"top_p": 0.5}, "--top-p does not apply"),
        ({"sampler": "cached"}, "--sampler must be one of ddim"),
        ({"length": 33}, "--length must be at most the context"),
        ({"prompt": "x" * 40}, "the prompt has 40 tokens"),
        ({"steps": 0}, "--steps must be a whole number"),
    ]:
        with pytest.raises(UserError, match=message):
            dlm.sample(2, **options)
    with pytest.raises(UserError, match="diffuseq needs the source in --prompt"):
        seq.sample(2)
    with pytest.raises(UserError, match="--length does not apply to diffuseq"):
        seq.sample(2, prompt="a b c", length=10)
    with pytest.raises(UserError, match="at most 31 fit"):
        seq.sample(2, prompt="a" * 40)
    with pytest.raises(UserError, match="--clamp applies to the gaussian kinds only"):
        load(tmp_path / "mdlm", "cpu").sample(2, clamp=False)


def test_prediction_forms_agree_for_the_loss():
    """``eps``- and ``v``-prediction networks are scored by the same ``x_0`` error: a network
    whose raw output is converted to the exact ``x0`` gives the ``x0`` form's loss."""
    net = EmbeddingDiffusionNet(9, 4, 6, width=8, depth=1, num_heads=2)
    words = torch.randint(9, (2, 6))
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    net.denoiser = Oracle(lambda x_t: 0.25 * x_t)
    x0_form = embedding_diffusion_loss(net, SCHEDULE, words, generator=gen())
    # x0_hat = x_t / 4 as an eps prediction: eps = (x_t - alpha x_t / 4) / sigma.
    calls = []

    def as_eps(x_t, c_noise, self_cond=None):
        t = c_noise.double() / 1000.0
        alpha, sigma = SCHEDULE.alpha_sigma(t)
        calls.append(1)
        a, s = alpha.float()[:, None, None], sigma.float()[:, None, None]
        return (x_t - a * 0.25 * x_t) / s

    net.forward = as_eps
    eps_form = embedding_diffusion_loss(net, SCHEDULE, words, prediction="eps", generator=gen())
    assert calls and float(eps_form.x0_mse) == pytest.approx(float(x0_form.x0_mse), rel=1e-4)


def test_the_command_line_switches_clamping_and_refuses_it_elsewhere(
    text_file, tmp_path, monkeypatch, capsys
):
    RECIPE.train(tiny(text_file, tmp_path / "dlm", "diffusion.kind=diffusion-lm"), progress=False)

    def cli(*args: str) -> tuple[int, str, str]:
        return run(monkeypatch, capsys, *args)

    for switch in ("--clamp", "--no-clamp"):
        code, out, _ = cli("sample", str(tmp_path / "dlm"), "--n", "2", "--steps", "3", switch,
                           "--out", str(tmp_path / switch))  # fmt: skip
        assert code == 0 and "2 samples" in out
    RECIPE.train(tiny(text_file, tmp_path / "mdlm"), progress=False)
    code, _, err = cli("sample", str(tmp_path / "mdlm"), "--no-clamp")
    assert code != 0 and err.strip() == (
        "difflab: error: --clamp applies to the gaussian kinds only, not mdlm"
    )


def _trigram_rate(texts: list[str], pattern: str) -> float:
    """The share of character trigrams of ``texts`` that occur in the periodic ``pattern``."""
    valid = {(pattern * 2)[i : i + 3] for i in range(len(pattern))}
    grams = [t[i : i + 3] for t in texts for i in range(len(t) - 2)]
    return sum(g in valid for g in grams) / max(1, len(grams))


@pytest.mark.slow
def test_diffusion_lm_learns_a_periodic_text(tmp_path):
    """About a minute: on a text that repeats one sentence, a small Diffusion-LM's samples are
    made mostly of the sentence's character trigrams (an untrained one's are not)."""
    pattern = "the cat sat on the mat. "
    source = tmp_path / "pattern.txt"
    source.write_text(pattern * 2000)
    overrides = ["diffusion.kind=diffusion-lm", "model.width=64", "model.depth=2",
                 "train.ema=0.99", "train.steps=1500", "train.log_every=500"]  # fmt: skip
    _, untrained_cfg = load_config("text-tiny", [f"data.source={source}",
                                                 f"train.out={tmp_path / 'zero'}", *overrides[:4],
                                                 "train.steps=1"])  # fmt: skip
    RECIPE.train(untrained_cfg, progress=False)
    _, cfg = load_config("text-tiny", [f"data.source={source}", f"train.out={tmp_path / 'run'}",
                                       *overrides])  # fmt: skip
    RECIPE.train(cfg, progress=False)
    before = _trigram_rate(load(tmp_path / "zero", "cpu").sample(16, steps=50).texts, pattern)
    after = _trigram_rate(load(tmp_path / "run", "cpu").sample(16, steps=50).texts, pattern)
    assert before < 0.15 < 0.5 < after
