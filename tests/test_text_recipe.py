"""The text recipe end to end: config, training with exact resume, sampling, evaluation, demo.

Every run is the ``text-tiny`` preset (a one-block transformer of width 32, rows of 32
characters) on a 30 k-character slice of the built-in corpus, trained for a few steps.
"""

import csv
import dataclasses
import math
from pathlib import Path

import pytest
import torch

from difflab.config import presets, recipe_of
from difflab.data.text import EOS_ID, load_corpus, load_tokenizer, pack_texts, split_documents
from difflab.errors import UserError
from difflab.evaluate.text_metrics import mean_token_nll
from difflab.recipes import text
from difflab.train.checkpoint import load_checkpoint, save_checkpoint


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "slice.txt"
    path.write_text(load_corpus()[100_000:130_000], encoding="utf-8")
    return path


def tiny(text_file: Path, out: Path, *overrides: str) -> text.TextConfig:
    return text.load_text_config(
        "text-tiny", [f"data.source={text_file}", f"train.out={out}", *overrides]
    )


def losses(run: Path) -> list[tuple[str, str]]:
    with open(run / "loss.csv") as f:
        return [(row["step"], row["loss"]) for row in csv.DictReader(f)]


@pytest.fixture(scope="module")
def trained(text_file, tmp_path_factory) -> dict[str, text.LoadedTextModel]:
    """One tiny MDLM and one tiny AR model (3 steps each)."""
    root = tmp_path_factory.mktemp("runs")
    models = {}
    for kind in ("mdlm", "ar"):
        text.train(tiny(text_file, root / kind, f"diffusion.kind={kind}", "train.steps=3"),
                   progress=False)  # fmt: skip
        models[kind] = text.load_model(root / kind)
    return models


# ---------------------------------------------------------------- training


@pytest.mark.parametrize("kind", ["mdlm", "d3pm-uniform", "ar"])
def test_resume_gives_the_losses_and_weights_of_the_uninterrupted_run(text_file, tmp_path, kind):
    # d3pm-uniform covers a time-conditioned network and the discrete-time loss.
    text.train(tiny(text_file, tmp_path / "full", f"diffusion.kind={kind}"), progress=False)
    part = tmp_path / "part"
    text.train(tiny(text_file, part, f"diffusion.kind={kind}", "train.steps=3"), progress=False)
    text.train(tiny(text_file, part, f"diffusion.kind={kind}"), resume=True, progress=False)
    assert losses(tmp_path / "full") == losses(part)
    assert len(losses(part)) == 6
    full, resumed = load_checkpoint(tmp_path / "full"), load_checkpoint(part)
    assert full.step == resumed.step == 6
    for name, value in full.ema.items():
        assert torch.equal(value, resumed.ema[name]), name
    assert resumed.config["recipe"] == "text"
    assert resumed.config["config"]["diffusion"]["kind"] == kind
    tokenizer = load_tokenizer(part / text.TOKENIZER_FILE)
    assert tokenizer.vocab_size == resumed.config["vocab_size"]


@pytest.mark.parametrize("kind", text.KINDS)
def test_every_kind_trains_samples_and_evaluates(text_file, tmp_path, kind):
    text.train(tiny(text_file, tmp_path, f"diffusion.kind={kind}", "train.steps=2"),
               progress=False)  # fmt: skip
    model = text.load_model(tmp_path, "cpu")
    assert model.kind == kind and model.step == 2
    samples = text.generate(model, 3, prompt="KING", length=24, steps=8, seed=0)
    assert len(samples) == 3
    # Characters: at most one per token; the prompt is the given prefix.
    assert all(s.startswith("KING") and len(s) <= 24 for s in samples)
    result = text.evaluate(model, n_sequences=8, time_samples=2)
    assert result["bound"] is (kind != "ar")
    assert all(math.isfinite(result[k]) for k in ("nats_per_token", "bits_per_character"))
    assert result["nats_per_token"] > 0
    if model.process is not None and model.process.absorbing:
        # Caching skips network calls, never changes samples (same seed).
        kw = {"length": 24, "steps": 40, "seed": 3}
        assert text.generate(model, 3, sampler="cached", **kw) == text.generate(
            model, 3, sampler="ancestral", **kw
        )


def test_bpe_runs_end_to_end(text_file, tmp_path):
    cfg = tiny(text_file, tmp_path, "data.tokenizer=bpe", "data.bpe_vocab=400", "train.steps=2")
    text.train(cfg, progress=False)
    model = text.load_model(tmp_path)
    assert model.tokenizer.vocab_size == 400
    (sample,) = text.generate(model, 1, prompt="KING HENRY", length=20, steps=4)
    assert sample.startswith("KING HENRY")
    result = text.evaluate(model, n_sequences=4)
    # 139 merges (400 ids - 5 specials - 256 bytes): 1.8 characters per token on this held-out
    # text (measured), where characters would give one token each (plus BOS and EOS).
    assert result["split_tokens"] < 0.75 * result["split_characters"]


# ---------------------------------------------------------------- sampling


def _force(model: text.LoadedTextModel, token: int) -> None:
    """Make the output head put (almost) all probability on ``token``."""
    with torch.no_grad():
        model.net.head.weight.zero_()
        model.net.head.bias.zero_()
        model.net.head.bias[token] = 50.0


@pytest.mark.parametrize("kind", ["mdlm", "ar"])
def test_generation_stops_at_eos_and_keeps_the_prompt(trained, kind):
    model = trained[kind]
    _force(model, EOS_ID)
    try:
        assert text.generate(model, 2, prompt="KING", length=20) == ["KING", "KING"]
        assert text.generate(model, 2, length=20) == ["", ""]
        samples = text.generate_tokens(model, 2, prompt="KI", length=20)
        assert samples.lengths.tolist() == [3, 3]  # K, I, EOS
        assert samples.tokens.shape == (2, 20)
    finally:
        _restore(model)


@pytest.mark.parametrize("kind", ["mdlm", "ar"])
@pytest.mark.parametrize("sampler", ["cached", "remask", "semi-ar"])
def test_lengths_beyond_the_context_are_generated_in_windows(trained, kind, sampler):
    model = trained[kind]
    a = model.tokenizer.encode("a")[0]
    _force(model, a)
    try:
        # 80 tokens with a context of 32: three windows; every token is "a".
        assert text.generate(model, 2, length=80, sampler=sampler, steps=4) == ["a" * 80] * 2
        prompted = text.generate(model, 1, prompt="KING", length=80, sampler=sampler, steps=4)
        assert prompted == ["KING" + "a" * 76]
    finally:
        _restore(model)


def _run_of(model: text.LoadedTextModel) -> Path:
    return Path(model.config.train.out)


def _restore(model: text.LoadedTextModel) -> None:
    """Undo :func:`_force`: reload the trained weights (the fixture is shared)."""
    model.net.load_state_dict(text.load_model(_run_of(model)).net.state_dict())


def test_labels_condition_samples(tmp_path):
    """Two classes of disjoint characters: 60 steps teach the tiny model which is which."""
    root = tmp_path / "data"
    for name, line in [("low", "abc cab bca\n"), ("high", "XYZ ZYX YZX\n")]:
        (root / name).mkdir(parents=True)
        for i in range(3):
            (root / name / f"{i}.txt").write_text(line * 40)
    cfg = text.load_text_config("text-tiny", [f"data.source={root}", "data.labels=true",
                                             f"train.out={tmp_path / 'run'}", "train.steps=60",
                                             "diffusion.cond_drop=0.2"])  # fmt: skip
    text.train(cfg, progress=False)
    model = text.load_model(tmp_path / "run")
    assert model.class_names == ["high", "low"]
    for label, own, other in [("low", "abc", "XYZ"), ("high", "XYZ", "abc")]:
        for guidance in (0.0, 2.0):
            joined = "".join(text.generate(model, 8, label=label, guidance=guidance, length=32))
            letters = [c for c in joined if c.strip()]
            # Measured: 0-1% of the other class's letters (seed 0); 10% leaves a wide margin
            # while a model that ignored the label would be near 50%.
            assert sum(c in other for c in letters) <= 0.1 * len(letters)
            assert sum(c in own for c in letters) >= 0.5 * len(letters)
    result = text.evaluate(model, n_sequences=8)
    assert math.isfinite(result["nats_per_token"])
    with pytest.raises(UserError, match="unknown label"):
        text.generate(model, 1, label="middle")
    with pytest.raises(UserError, match="guidance needs a label"):
        text.generate(model, 1, guidance=1.0)


# ---------------------------------------------------------------- evaluation


def test_evaluation_units_follow_the_formulas(trained, text_file):
    _, held_out = split_documents([text_file.read_text(encoding="utf-8")])
    for model in trained.values():
        result = text.evaluate(model, n_sequences=16)
        tokens = pack_texts(held_out, model.tokenizer, model.context).loss_mask.sum()
        assert result["split_tokens"] == int(tokens)
        assert result["split_characters"] == sum(len(d) for d in held_out)
        nats = result["nats_per_token"]
        expected_bpc = nats * result["split_tokens"] / result["split_characters"] / math.log(2)
        assert result["bits_per_character"] == pytest.approx(expected_bpc, rel=1e-12)
        assert result["bits_per_token"] == pytest.approx(nats / math.log(2), rel=1e-12)
        assert result["perplexity"] == pytest.approx(math.exp(nats), rel=1e-12)


def test_ar_evaluation_is_the_exact_nll(trained):
    model = trained["ar"]
    result = text.evaluate(model, n_sequences=10_000)  # every held-out row
    tokens, mask, _, _ = text.held_out_rows(model)
    reference = mean_token_nll(lambda x: model.net(x), tokens, mask, bos_id=1)
    assert result["sequences"] == len(tokens)
    assert result["nats_per_token"] == pytest.approx(reference, rel=1e-6)


def test_bounds_of_a_uniform_denoiser(trained, text_file, tmp_path):
    """With a zero output head the AR model is uniform over V tokens (NLL = log V exactly) and
    MDLM's SUBS is uniform over the V - 1 non-mask tokens. MDLM's bound in its mask-count form
    costs each row (n / l) * l * log(V - 1): exactly log(V - 1) per token, whatever is drawn."""
    ar = text.load_model(_run_of(trained["ar"]))
    mdlm = text.load_model(_run_of(trained["mdlm"]))
    for model in (ar, mdlm):
        torch.nn.init.zeros_(model.net.head.weight)
        torch.nn.init.zeros_(model.net.head.bias)
    V = ar.tokenizer.vocab_size
    assert text.evaluate(ar, 32)["nats_per_token"] == pytest.approx(math.log(V), rel=1e-6)
    result = text.evaluate(mdlm, 32, time_samples=2)
    assert result["nats_per_token"] == pytest.approx(math.log(V - 1), rel=1e-6)
    assert result["nats_per_token_stderr"] < 1e-6


@pytest.mark.parametrize("time_conditioning", [False, True])
def test_mdlm_is_scored_in_the_count_form_when_time_agnostic(trained, time_conditioning):
    """A time-agnostic MDLM network is scored in the mask-count form of the bound (exactly l
    masked tokens, t = l / n); a time-conditioned one in the time form (a Binomial number masked
    at time t), since only there is its t the samplers' t."""
    model = trained["mdlm"]
    seen = []

    class Spy(torch.nn.Module):
        embed = model.net.embed  # where the model's device is read

        def forward(self, x_t, t, cond=None):
            seen.append((x_t, t))
            return torch.zeros(*x_t.shape, model.tokenizer.vocab_size)

    spy = Spy()
    config = dataclasses.replace(
        model.config,
        model=dataclasses.replace(model.config.model, time_conditioning=time_conditioning),
    )
    text.evaluate(dataclasses.replace(model, net=spy, config=config), 64, time_samples=2)
    x_t, t = torch.cat([x for x, _ in seen]), torch.cat([t for _, t in seen])
    # Rows without padding: the fraction masked is l / n = t exactly in the count form, and
    # almost never t (a continuous time) in the time form.
    exact = ((x_t == text.MASK_ID).double().mean(1) - t.double()).abs() < 1e-6
    if time_conditioning:
        assert not bool(exact.any())
    else:
        assert float(exact.double().mean()) > 0.9


# ---------------------------------------------------------------- demo


def test_demo_writes_a_report_with_both_models(tmp_path, text_file, monkeypatch):
    preset = tmp_path / "demo.yaml"
    preset.write_text(
        f"recipe: text\ndata: {{source: {text_file}, length: 32}}\n"
        "model: {width: 32, depth: 1, num_heads: 2}\n"
        "train: {steps: 2, batch_size: 8, warmup: 1, max_minutes: 1.0}\n"
        "sample: {steps: 8}\n"
    )
    monkeypatch.setattr(text, "DEMO_PRESET", str(preset))
    report = text.demo(tmp_path / "demo", quiet=True)
    assert (tmp_path / "demo" / "report.md").read_text() == report
    assert "| MDLM (masked diffusion) | 2 |" in report
    assert "| Autoregressive baseline | 2 |" in report
    assert report.count("```") == 2 * 8  # 2 models x (2 unconditional + 2 prompted)
    assert report.count("\n" + text.DEMO_PROMPT) == 4  # prompted passages start with it
    for kind in ("mdlm", "ar"):
        assert load_checkpoint(tmp_path / "demo" / kind).config["recipe"] == "text"


# ---------------------------------------------------------------- user errors


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.widht=64"], "unknown config key model.widht"),
        (["modle.width=64"], "unknown config section 'modle'"),
        (["diffusion.kind=gpt"], "diffusion.kind must be one of"),
        (["sample.sampler=ddim"], "sample.sampler must be one of"),
        (["diffusion.kind=ar", "model.time_conditioning=true"], "cannot be on"),
        (["model.num_heads=3"], "even whole number"),
        (["train.lr=-1"], "train.lr must be positive"),
        (["width=3"], "must look like section.key=value"),
    ],
)
def test_bad_configs_are_user_errors(overrides, message):
    with pytest.raises(UserError, match=message):
        text.load_text_config("text-tiny", overrides)


def test_text_sources_are_recognised(tmp_path):
    assert {"text-demo", "text-tiny", "text-shakespeare", "text-bpe"} <= set(presets())
    assert recipe_of("text-tiny") == "text"
    for recipe in ["text", "image"]:
        path = tmp_path / f"{recipe}.yaml"
        path.write_text(f"recipe: {recipe}\n")
        assert recipe_of(str(path)) == recipe
    assert recipe_of("digits") == "image"
    assert recipe_of(None) == "image"
    assert recipe_of(str(tmp_path / "missing.yaml")) == "image"


def test_bad_sources_and_files_are_user_errors(tmp_path, text_file, trained):
    with pytest.raises(UserError, match="neither a preset"):
        text.load_text_config("text-nonexistent", [])
    image_yaml = tmp_path / "image.yaml"
    image_yaml.write_text("recipe: image\ntrain: {steps: 3}\n")
    with pytest.raises(UserError, match="'image' recipe"):
        text.load_text_config(str(image_yaml), [])
    missing = tiny(tmp_path / "no" / "such.txt", tmp_path / "run")
    with pytest.raises(UserError, match="does not exist"):
        text.train(missing, progress=False)
    with pytest.raises(UserError, match="no run to resume"):
        text.train(tiny(text_file, tmp_path / "empty"), resume=True, progress=False)
    with pytest.raises(UserError, match="already holds a run"):
        text.train(tiny(text_file, _run_of(trained["mdlm"])), progress=False)
    foreign = tmp_path / "foreign"
    save_checkpoint(foreign / "checkpoint.safetensors", config={"recipe": "image"}, step=0,
                    model={}, ema={}, optimizer=None, rng={})  # fmt: skip
    with pytest.raises(UserError, match="not a checkpoint of the text recipe"):
        text.load_model(foreign)


def test_bad_generation_requests_are_user_errors(trained, tmp_path):
    mdlm, ar = trained["mdlm"], trained["ar"]
    with pytest.raises(UserError, match="unknown sampler"):
        text.generate(mdlm, 1, sampler="ddim")
    with pytest.raises(UserError, match="must exceed it"):
        text.generate(ar, 1, prompt="KING HENRY", length=5)
    with pytest.raises(UserError, match="has no classes"):
        text.generate(mdlm, 1, label="low")
    text.train(tiny(Path(mdlm.config.data.source), tmp_path, "diffusion.kind=udlm",
                    "train.steps=1"), progress=False)  # fmt: skip
    with pytest.raises(UserError, match="needs a masked kind"):
        text.generate(text.load_model(tmp_path), 1, sampler="confidence")
