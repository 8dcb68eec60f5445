"""The text recipe end to end: config, training with exact resume, sampling, evaluation, demo,
and the runs of difflab 0.1.

Every run is the ``text-tiny`` preset (a one-block transformer of width 32, rows of 32
characters) on a 30 k-character slice of the built-in corpus, trained for a few steps.
"""

import csv
import dataclasses
import math
from pathlib import Path

import pytest
import torch

import difflab.recipes.text.demo as text_demo
import difflab.recipes.text.sample as sample_module
from difflab.config import presets
from difflab.data.text import (
    EOS_ID,
    MASK_ID,
    load_corpus,
    load_tokenizer,
    pack_texts,
    split_documents,
)
from difflab.discrete.autoregressive import EOS_CHECK_EVERY
from difflab.errors import UserError
from difflab.evaluate.text_metrics import mean_token_nll
from difflab.recipes import DEMO_MARKER, Run, get, load, load_config, run_config, run_demo
from difflab.recipes.text import KINDS, RECIPE, LoadedTextModel, TextConfig
from difflab.recipes.text.config import migrate
from difflab.recipes.text.evaluate import held_out_rows
from difflab.recipes.text.sample import generate_tokens, window_count
from difflab.recipes.text.train import TOKENIZER_FILE
from difflab.train.checkpoint import load_checkpoint, read_run_config, save_checkpoint

V01 = Path(__file__).parent / "data" / "v0.1" / "text"


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "slice.txt"
    path.write_text(load_corpus()[100_000:130_000], encoding="utf-8")
    return path


def tiny(text_file: Path, out: Path, *overrides: str) -> TextConfig:
    recipe, cfg = load_config(
        "text-tiny", [f"data.source={text_file}", f"train.out={out}", *overrides]
    )
    assert recipe is RECIPE
    return cfg


def train(cfg: TextConfig) -> None:
    RECIPE.train(cfg, progress=False)


def texts(run: Run, n: int, **options) -> list[str]:
    return run.sample(n, **options).texts


def losses(run: Path) -> list[tuple[str, str]]:
    with open(run / "loss.csv") as f:
        return [(row["step"], row["loss"]) for row in csv.DictReader(f)]


@pytest.fixture(scope="module")
def trained(text_file, tmp_path_factory) -> dict[str, Run]:
    """One tiny MDLM and one tiny AR model (3 steps each)."""
    root = tmp_path_factory.mktemp("runs")
    runs = {}
    for kind in ("mdlm", "ar"):
        train(tiny(text_file, root / kind, f"diffusion.kind={kind}", "train.steps=3"))
        runs[kind] = load(root / kind)
    return runs


# ---------------------------------------------------------------- training


@pytest.mark.parametrize("kind", ["mdlm", "d3pm-uniform", "ar"])
def test_resume_gives_the_losses_and_weights_of_the_uninterrupted_run(text_file, tmp_path, kind):
    # d3pm-uniform covers a time-conditioned network and the discrete-time loss.
    train(tiny(text_file, tmp_path / "full", f"diffusion.kind={kind}"))
    part = tmp_path / "part"
    train(tiny(text_file, part, f"diffusion.kind={kind}", "train.steps=3"))
    RECIPE.train(tiny(text_file, part, f"diffusion.kind={kind}"), resume=True, progress=False)
    assert losses(tmp_path / "full") == losses(part)
    assert len(losses(part)) == 6
    full, resumed = load_checkpoint(tmp_path / "full"), load_checkpoint(part)
    assert full.step == resumed.step == 6
    for name, value in full.ema.items():
        assert torch.equal(value, resumed.ema[name]), name
    assert resumed.config["recipe"] == "text"
    assert resumed.config["config"]["diffusion"]["kind"] == kind
    tokenizer = load_tokenizer(part / TOKENIZER_FILE)
    assert tokenizer.vocab_size == resumed.config["vocab_size"]


@pytest.mark.parametrize("kind", [k for k in KINDS if KINDS[k].process != "gaussian"])
def test_every_kind_trains_samples_and_evaluates(text_file, tmp_path, kind):
    # The gaussian kinds (continuous diffusion): tests/test_continuous_text.py.
    train(tiny(text_file, tmp_path, f"diffusion.kind={kind}", "train.steps=2"))
    run = load(tmp_path, "cpu")
    assert run.recipe is RECIPE and run.model.kind == kind and run.step == 2
    diffusion = kind != "ar"  # ar takes neither steps nor time samples
    samples = texts(run, 3, prompt="KING", length=24, seed=0, **({"steps": 8} if diffusion else {}))
    assert len(samples) == 3
    # Characters: at most one per token; the prompt is the given prefix.
    assert all(s.startswith("KING") and len(s) <= 24 for s in samples)
    result = run.evaluate(n=8, progress=False, **({"t_samples": 2} if diffusion else {})).metrics
    assert result["bound"] is diffusion
    assert all(math.isfinite(result[k]) for k in ("nats_per_token", "bits_per_character"))
    assert result["nats_per_token"] > 0
    if run.model.process is not None and run.model.process.absorbing and kind != "block":
        # Caching skips network calls, never changes samples (same seed). (block has one
        # sampler: tests/test_block_diffusion.py)
        kw = {"length": 24, "steps": 40, "seed": 3}
        assert texts(run, 3, sampler="cached", **kw) == texts(run, 3, sampler="ancestral", **kw)


def test_bpe_runs_end_to_end(text_file, tmp_path):
    train(tiny(text_file, tmp_path, "data.tokenizer=bpe", "data.bpe_vocab=400", "train.steps=2"))
    run = load(tmp_path)
    assert run.model.tokenizer.vocab_size == 400
    (sample,) = texts(run, 1, prompt="KING HENRY", length=20, steps=4)
    assert sample.startswith("KING HENRY")
    result = run.evaluate(n=4, progress=False).metrics
    # 139 merges (400 ids - 5 specials - 256 bytes): 1.8 characters per token on this held-out
    # text (measured), where characters would give one token each (plus BOS and EOS).
    assert result["split_tokens"] < 0.75 * result["split_characters"]


# ---------------------------------------------------------------- sampling


def _force(run: Run, token: int) -> None:
    """Make the output head put (almost) all probability on ``token``."""
    with torch.no_grad():
        run.model.net.head.weight.zero_()
        run.model.net.head.bias.zero_()
        run.model.net.head.bias[token] = 50.0


def _restore(run: Run) -> None:
    """Undo :func:`_force`: reload the trained weights (the fixture is shared)."""
    run.model.net.load_state_dict(RECIPE.load(run.path).net.state_dict())


@pytest.mark.parametrize("kind", ["mdlm", "ar"])
def test_generation_stops_at_eos_and_keeps_the_prompt(trained, kind):
    run = trained[kind]
    _force(run, EOS_ID)
    try:
        assert texts(run, 2, prompt="KING", length=20) == ["KING", "KING"]
        assert texts(run, 2, length=20) == ["", ""]
        samples = generate_tokens(run.model, 2, prompt="KI", length=20)
        assert samples.lengths.tolist() == [3, 3]  # K, I, EOS
        assert samples.tokens.shape == (2, 20)
    finally:
        _restore(run)


@pytest.mark.parametrize(
    "kind, sampler", [("mdlm", "cached"), ("mdlm", "remask"), ("mdlm", "semi-ar"), ("ar", None)]
)
def test_lengths_beyond_the_context_are_generated_in_windows(trained, kind, sampler):
    run = trained[kind]
    a = run.model.tokenizer.encode("a")[0]
    options = {} if sampler is None else {"sampler": sampler, "steps": 4}
    _force(run, a)
    try:
        # 80 tokens with a context of 32: several windows; every token is "a".
        assert texts(run, 2, length=80, **options) == ["a" * 80] * 2
        assert texts(run, 1, prompt="KING", length=80, **options) == ["KING" + "a" * 76]
    finally:
        _restore(run)


@pytest.mark.parametrize(
    "prompt, length, windows",
    [(0, 20, 1), (0, 32, 1), (0, 33, 2), (0, 80, 4), (4, 33, 2), (4, 80, 4), (20, 100, 5),
     (40, 80, 3)],
)  # fmt: skip
def test_the_progress_bar_counts_every_step_of_every_window(trained, prompt, length, windows):
    """Context 32, block 16: the first window fills the context after the prompt (at least 16
    new tokens), each later one adds 16. Uncached ancestral sampling calls the network once per
    step of each window, so its ``nfe`` is the total the progress bar counts to (every token
    is forced to be "a": no row ends early, which would stop the windows)."""
    run = trained["mdlm"]
    model = run.model
    assert (model.context, model.config.block) == (32, 16)
    assert window_count(prompt, length, model.context, model.config.block) == windows
    text = ("KING " * 10)[:prompt]
    _force(run, model.tokenizer.encode("a")[0])
    try:
        samples = generate_tokens(model, 1, prompt=text, length=length, sampler="ancestral",
                                  steps=3)  # fmt: skip
    finally:
        _restore(run)
    assert samples.nfe == 3 * windows


def test_ar_sampling_of_a_huge_length_stops_once_every_row_has_ended(trained):
    run = trained["ar"]
    _force(run, EOS_ID)
    try:
        samples = generate_tokens(run.model, 2, length=100_000)
        assert samples.nfe <= EOS_CHECK_EVERY
        assert samples.lengths.tolist() == [1, 1]
    finally:
        _restore(run)


def test_diffusion_sampling_of_a_huge_length_stops_once_every_row_has_ended(trained):
    """Every token EOS: the first window ends every row, so no other window is drawn (the 100 k
    tokens would be 6249 more windows of 32 steps)."""
    run = trained["mdlm"]
    _force(run, EOS_ID)
    try:
        samples = generate_tokens(run.model, 2, length=100_000, steps=4)
        assert samples.nfe <= 4
        assert samples.lengths.tolist() == [1, 1]
        assert samples.tokens.shape == (2, 100_000)
    finally:
        _restore(run)


@pytest.mark.parametrize("kind", ["mdlm", "ar"])
def test_passages_are_drawn_in_chunks_of_rows(trained, kind, monkeypatch):
    """With room for two rows per network call, five passages are three chunks drawn one after
    the other from the one generator: the first chunk is what a request of two draws, the next
    ones continue the generator. A request that fits one chunk is one batch, as before."""
    model = trained[kind].model
    options = {"length": 40, "seed": 5, **({"steps": 4} if kind == "mdlm" else {})}
    assert sample_module.rows_per_chunk(model) >= 5
    whole = generate_tokens(model, 5, **options)
    two = generate_tokens(model, 2, **options)
    monkeypatch.setattr(sample_module, "rows_per_chunk", lambda model: 2)
    chunked = generate_tokens(model, 5, **options)
    assert chunked.tokens.shape == (5, 40) and chunked.lengths.shape == (5,)
    assert torch.equal(chunked.tokens[:2], two.tokens)
    assert not torch.equal(chunked.tokens[2:4], two.tokens)  # later chunks draw other numbers
    assert torch.equal(generate_tokens(model, 2, **options).tokens, two.tokens)  # one chunk
    assert not torch.equal(chunked.tokens, whole.tokens)


def test_rows_per_chunk_bounds_the_memory_of_a_call(trained):
    model = trained["mdlm"].model
    L, V = model.context + 1, model.tokenizer.vocab_size
    per_row = L * (V + 4 * model.net.width + model.net.num_heads * L)
    rows = sample_module.rows_per_chunk(model)
    assert rows * per_row <= sample_module.CALL_BUDGET < (rows + 1) * per_row


@pytest.mark.parametrize(
    "kind, length, total", [("mdlm", 20, 32), ("mdlm", 80, 4 * 32), ("ar", 20, 20), ("ar", 80, 80)]
)
def test_generation_shows_a_progress_bar(trained, monkeypatch, kind, length, total):
    """A bar counting every step of every window (diffusion) or every token (ar), shown on a
    terminal only (``disable=None``: tests stay quiet) and only once sampling takes a while."""
    bars = []
    real = sample_module.tqdm

    def spy(**kwargs):
        bars.append(kwargs)
        return real(**kwargs)

    monkeypatch.setattr(sample_module, "tqdm", spy)
    generate_tokens(trained[kind].model, 2, length=length)
    ((bar,),) = [bars]
    assert bar["total"] == total
    assert bar["disable"] is None and bar["delay"] == sample_module.PROGRESS_DELAY > 0


def test_a_length_beyond_the_training_text_is_refused(tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("To be, or not to be.\n" * 3)
    with pytest.raises(UserError, match=r"data.length=128 is longer than the training text"):
        train(tiny(short, tmp_path / "run", "data.length=128"))
    assert not (tmp_path / "run" / "checkpoint.safetensors").exists()
    with pytest.raises(UserError, match=r"data.length must be at most 8,192 tokens"):
        tiny(short, tmp_path / "run", "data.length=100000000")


def test_many_time_samples_are_scored_in_smaller_batches(trained):
    mdlm = trained["mdlm"]
    result = mdlm.evaluate(n=3, t_samples=256, progress=False).metrics
    assert result["sequences"] == 3 and math.isfinite(result["nats_per_token"])


def test_labels_condition_samples(tmp_path):
    """Two classes of disjoint characters: 60 steps teach the tiny model which is which."""
    root = tmp_path / "data"
    for name, line in [("low", "abc cab bca\n"), ("high", "XYZ ZYX YZX\n")]:
        (root / name).mkdir(parents=True)
        for i in range(3):
            (root / name / f"{i}.txt").write_text(line * 40)
    train(tiny(root, tmp_path / "run", "data.labels=true", "train.steps=60",
               "diffusion.cond_drop=0.2"))  # fmt: skip
    run = load(tmp_path / "run")
    assert run.model.class_names == ["high", "low"]
    for label, own, other in [("low", "abc", "XYZ"), ("high", "XYZ", "abc")]:
        for guidance in (0.0, 2.0):
            joined = "".join(texts(run, 8, label=label, guidance=guidance, length=32, steps=16))
            letters = [c for c in joined if c.strip()]
            # Measured: 0-1% of the other class's letters (seed 0); 10% leaves a wide margin
            # while a model that ignored the label would be near 50%.
            assert sum(c in other for c in letters) <= 0.1 * len(letters)
            assert sum(c in own for c in letters) >= 0.5 * len(letters)
    result = run.evaluate(n=8, progress=False).metrics
    assert math.isfinite(result["nats_per_token"])
    with pytest.raises(UserError, match="unknown class 'middle'"):
        run.sample(1, label="middle")
    with pytest.raises(UserError, match="--guidance needs a --class"):
        run.sample(1, guidance=1.0)


# ---------------------------------------------------------------- evaluation


def test_evaluation_units_follow_the_formulas(trained, text_file):
    _, held_out = split_documents([text_file.read_text(encoding="utf-8")])
    for run in trained.values():
        evaluation = run.evaluate(n=16, progress=False)
        result = evaluation.metrics
        tokens = pack_texts(held_out, run.model.tokenizer, run.model.context).loss_mask.sum()
        assert result["split_tokens"] == int(tokens)
        assert result["split_characters"] == sum(len(d) for d in held_out)
        nats = result["nats_per_token"]
        expected_bpc = nats * result["split_tokens"] / result["split_characters"] / math.log(2)
        assert result["bits_per_character"] == pytest.approx(expected_bpc, rel=1e-12)
        assert result["bits_per_token"] == pytest.approx(nats / math.log(2), rel=1e-12)
        assert result["perplexity"] == pytest.approx(math.exp(nats), rel=1e-12)
        assert f"nats_per_token {nats:.4f}" in evaluation.summary


def test_ar_evaluation_is_the_exact_nll(trained):
    model = trained["ar"].model
    result = RECIPE.evaluate(model, n=10_000, progress=False).metrics  # every held-out row
    tokens, mask, _, _ = held_out_rows(model)
    reference = mean_token_nll(lambda x: model.net(x), tokens, mask, bos_id=1)
    assert result["sequences"] == len(tokens)
    assert result["nats_per_token"] == pytest.approx(reference, rel=1e-6)


def test_bounds_of_a_uniform_denoiser(trained):
    """With a zero output head the AR model is uniform over V tokens (NLL = log V exactly) and
    MDLM's SUBS is uniform over the V - 1 non-mask tokens. MDLM's bound in its mask-count form
    costs each row (n / l) * l * log(V - 1): exactly log(V - 1) per token, whatever is drawn."""
    ar, mdlm = RECIPE.load(trained["ar"].path), RECIPE.load(trained["mdlm"].path)
    for model in (ar, mdlm):
        torch.nn.init.zeros_(model.net.head.weight)
        torch.nn.init.zeros_(model.net.head.bias)
    V = ar.tokenizer.vocab_size
    nats = RECIPE.evaluate(ar, n=32, progress=False).metrics["nats_per_token"]
    assert nats == pytest.approx(math.log(V), rel=1e-6)
    result = RECIPE.evaluate(mdlm, n=32, t_samples=2, progress=False).metrics
    assert result["nats_per_token"] == pytest.approx(math.log(V - 1), rel=1e-6)
    assert result["nats_per_token_stderr"] < 1e-6


@pytest.mark.parametrize("time_conditioning", [False, True])
def test_mdlm_is_scored_in_the_count_form_when_time_agnostic(trained, time_conditioning):
    """A time-agnostic MDLM network is scored in the mask-count form of the bound (exactly l
    masked tokens, t = l / n); a time-conditioned one in the time form (a Binomial number masked
    at time t), since only there is its t the samplers' t."""
    model: LoadedTextModel = trained["mdlm"].model
    seen = []

    class Spy(torch.nn.Module):
        embed = model.net.embed  # where the model's device is read

        def forward(self, x_t, t, cond=None):
            seen.append((x_t, t))
            return torch.zeros(*x_t.shape, model.tokenizer.vocab_size)

    config = dataclasses.replace(
        model.config,
        model=dataclasses.replace(model.config.model, time_conditioning=time_conditioning),
    )
    spied = dataclasses.replace(model, net=Spy(), config=config)
    RECIPE.evaluate(spied, n=64, t_samples=2, progress=False)
    x_t, t = torch.cat([x for x, _ in seen]), torch.cat([t for _, t in seen])
    # Rows without padding: the fraction masked is l / n = t exactly in the count form, and
    # almost never t (a continuous time) in the time form.
    exact = ((x_t == MASK_ID).double().mean(1) - t.double()).abs() < 1e-6
    if time_conditioning:
        assert not bool(exact.any())
    else:
        assert float(exact.double().mean()) > 0.9


# ---------------------------------------------------------------- demo


def test_demo_writes_a_report_with_both_models_and_deletes_nothing(
    tmp_path, text_file, monkeypatch
):
    preset = tmp_path / "demo.yaml"
    preset.write_text(
        f"recipe: text\ndata: {{source: {text_file}, length: 32}}\n"
        "model: {width: 32, depth: 1, num_heads: 2}\n"
        "train: {steps: 2, batch_size: 8, warmup: 1, max_minutes: 1.0}\n"
    )
    monkeypatch.setattr(text_demo, "DEMO_PRESET", str(preset))
    out = tmp_path / "demo"
    report = run_demo(RECIPE, out, quiet=True)
    assert (out / "report.md").read_text() == report
    assert "| MDLM (masked diffusion) | 2 |" in report
    assert "| Autoregressive baseline | 2 |" in report
    assert report.count("```") == 2 * 8  # 2 models x (2 unconditional + 2 prompted)
    assert report.count("\n" + text_demo.DEMO_PROMPT) == 4  # prompted passages start with it
    for kind in ("mdlm", "ar"):
        assert load_checkpoint(out / kind).config["recipe"] == "text"
    # demo_files names exactly what the demo wrote: run_demo replaces those on a re-run.
    written = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert written == {*RECIPE.demo_files, DEMO_MARKER}
    (out / "mdlm" / "notes.txt").write_text("mine")
    again = run_demo(RECIPE, out, quiet=True)
    assert "| MDLM (masked diffusion) | 2 |" in again
    assert (out / "mdlm" / "notes.txt").read_text() == "mine"
    with pytest.raises(UserError, match="--steps does not apply to the text demo"):
        run_demo(RECIPE, out, steps=3)


# ---------------------------------------------------------------- configs


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.widht=64"], "unknown config key model.widht"),
        (["modle.width=64"], "unknown config section modle"),
        (["diffusion.kind=gpt"], "diffusion.kind must be one of"),
        (["diffusion.schedule=ddpm"], "diffusion.schedule must be one of"),
        (["sample.sampler=ddim"], "sample.sampler must be one of"),
        (["diffusion.kind=ar", "model.time_conditioning=true"], "cannot be on"),
        (["model.num_heads=3"], "even whole number"),
        (["train.lr=-1"], "train.lr must be positive"),
        (["width=3"], "must look like section.key=value"),
        (["diffusion.antithetic=true"], "unknown config key diffusion.antithetic"),
        (["sample.temperature=.nan"], "sample.temperature must be a finite number"),
        (["sample.block=33"], "sample.block must be in 1..data.length"),
        (["data.bpe_vocab=400"], "data.bpe_vocab applies to data.tokenizer=bpe only"),
        (["data.tokenizer=bpe", "data.bpe_vocab=100"], "data.bpe_vocab must be at least 261"),
        # Keys that do not apply to the chosen kind, schedule or data:
        (
            ["diffusion.T=50"],
            "diffusion.T does not apply to diffusion.kind=mdlm with the "
            "continuous schedule log-linear",
        ),
        (["diffusion.kind=d3pm-absorbing", "diffusion.schedule=cosine"], "needs diffusion.T"),
        (["diffusion.hybrid_lambda=0.1"], "diffusion.hybrid_lambda does not apply"),
        (["diffusion.kind=udlm", "diffusion.p_uniform=0.2"], "diffusion.p_uniform does not apply"),
        (
            ["diffusion.kind=d3pm-uniform", "diffusion.stratified=false"],
            "diffusion.stratified does not apply to diffusion.kind=d3pm-uniform",
        ),
        (["diffusion.kind=ar", "diffusion.schedule=cosine"], "diffusion.schedule does not apply"),
        (["diffusion.kind=ar", "diffusion.stratified=true"], "diffusion.stratified does not apply"),
        (
            ["diffusion.kind=ar", "sample.steps=8"],
            "sample.steps does not apply to diffusion.kind=ar",
        ),
        (["diffusion.kind=ar", "sample.sampler=cached"], "sample.sampler does not apply"),
        (["diffusion.cond_drop=0.2"], "diffusion.cond_drop applies to labelled runs only"),
        (["sample.guidance=1"], "sample.guidance applies to labelled runs only"),
    ],
)
def test_bad_configs_are_user_errors(overrides, message):
    with pytest.raises(UserError, match=message):
        load_config("text-tiny", overrides)


@pytest.mark.parametrize(
    "overrides",
    [
        ["diffusion.kind=d3pm-uniform", "diffusion.T=50", "diffusion.hybrid_lambda=0.1"],
        ["diffusion.kind=d3pm-absorbing", "diffusion.schedule=log-linear", "diffusion.T=100"],
        ["diffusion.schedule=d3pm-absorbing", "diffusion.T=50", "diffusion.stratified=false"],
        ["diffusion.kind=hybrid", "diffusion.p_uniform=0.2", "sample.sampler=semi-ar"],
        ["diffusion.kind=ar", "sample.block=8", "sample.temperature=0.8"],
        ["data.tokenizer=bpe", "data.bpe_vocab=300"],
    ],
)
def test_keys_that_apply_are_accepted(overrides):
    load_config("text-tiny", overrides)


@pytest.mark.parametrize("preset", [p for p in presets() if p.startswith("text-")])
def test_every_text_preset_takes_every_kind(preset):
    recipe, _ = load_config(preset)
    assert recipe is RECIPE
    for kind in KINDS:
        _, cfg = load_config(preset, [f"diffusion.kind={kind}"])
        assert cfg.diffusion.kind == kind


def test_text_sources_are_recognised(tmp_path):
    assert {"text-demo", "text-tiny", "text-shakespeare", "text-bpe"} <= set(presets())
    assert get("text") is RECIPE
    recipe, cfg = load_config(None, recipe="text")  # its preset, text-shakespeare
    assert recipe is RECIPE and cfg.data.length == 256
    for name in ["text", "image"]:
        path = tmp_path / f"{name}.yaml"
        path.write_text(f"recipe: {name}\n")
        assert load_config(str(path))[0] is get(name)
    # The text defaults of the train section hold when the section sets other keys.
    path = tmp_path / "steps.yaml"
    path.write_text("recipe: text\ntrain: {steps: 7}\n")
    train_cfg = load_config(str(path))[1].train
    assert (train_cfg.steps, train_cfg.batch_size, train_cfg.lr, train_cfg.out) == (
        7, 32, 1e-3, "runs/text"
    )  # fmt: skip


def test_bad_sources_and_files_are_user_errors(tmp_path, text_file, trained):
    with pytest.raises(UserError, match="neither a preset"):
        load_config("text-nonexistent")
    image_yaml = tmp_path / "image.yaml"
    image_yaml.write_text("recipe: image\ntrain: {steps: 3}\n")
    with pytest.raises(UserError, match="config of the image recipe"):
        load_config(str(image_yaml), recipe="text")
    missing = tiny(tmp_path / "no" / "such.txt", tmp_path / "run")
    with pytest.raises(UserError, match="does not exist"):
        train(missing)
    with pytest.raises(UserError, match="no run to resume"):
        RECIPE.train(tiny(text_file, tmp_path / "empty"), resume=True, progress=False)
    with pytest.raises(UserError, match="already holds a run"):
        train(tiny(text_file, trained["mdlm"].path))
    foreign = tmp_path / "foreign"
    save_checkpoint(foreign / "checkpoint.safetensors", config={"recipe": "image"}, step=0,
                    model={}, ema={}, optimizer=None, rng={})  # fmt: skip
    with pytest.raises(UserError, match="a run of the image recipe, not of text"):
        RECIPE.load(foreign)


def test_bad_generation_requests_are_user_errors(trained, tmp_path):
    mdlm, ar = trained["mdlm"], trained["ar"]
    bad = [
        (mdlm, {"sampler": "ddim"}, "--sampler must be one of"),
        (ar, {"prompt": "KING HENRY", "length": 5}, "must exceed it"),
        (mdlm, {"prompt": "KING ☃ said"}, "outside this model's vocabulary: '☃'"),
        (mdlm, {"label": "low"}, "not class-conditional"),
        (mdlm, {"guidance": 1.0}, "--guidance applies to labelled runs"),
        (mdlm, {"temperature": float("nan")}, "--temperature must be a finite number"),
        (mdlm, {"temperature": -1.0}, "--temperature must be a finite number >= 0"),
        (ar, {"top_p": 0.0}, r"--top-p must be in \(0, 1\]"),
        (mdlm, {"top_p": 1.5}, r"--top-p must be in \(0, 1\]"),
        (mdlm, {"length": 0}, "--length must be a whole number >= 1"),
        (mdlm, {"steps": 0}, "--steps must be a whole number >= 1"),
        (mdlm, {"seed": -1}, r"--seed must be a whole number in 0..2\*\*63-1"),
        (ar, {"seed": 10**23}, r"--seed must be a whole number in 0..2\*\*63-1"),
        (mdlm, {"length": 2 * 10**8}, r"200,000,000 tokens\) will not fit in memory"),
        (ar, {"steps": 4}, "--steps does not apply to ar models"),
        (ar, {"sampler": "cached"}, "--sampler does not apply to ar models"),
        (ar, {"guidance": 1.0}, "--guidance does not apply to ar models"),
        (mdlm, {"grid": "karras"}, "--grid does not apply to text runs"),
    ]
    for run, options, message in bad:
        with pytest.raises(UserError, match=message):
            run.sample(1, **options)
    with pytest.raises(UserError, match="--t-samples does not apply to ar models"):
        ar.evaluate(t_samples=2)
    with pytest.raises(UserError, match="--t-samples must be at most 256"):
        mdlm.evaluate(t_samples=257)
    with pytest.raises(UserError, match=r"--seed must be a whole number in 0..2\*\*63-1"):
        mdlm.evaluate(seed=2**63)
    with pytest.raises(UserError, match="--method does not apply to text runs"):
        mdlm.evaluate(method="ode")
    train(tiny(Path(mdlm.config.data.source), tmp_path, "diffusion.kind=udlm", "train.steps=1"))
    with pytest.raises(UserError, match=r"sampler confidence: .* needs the masked"):
        load(tmp_path).sample(1, sampler="confidence")


# ---------------------------------------------------------------- runs of difflab 0.1


def test_a_run_of_difflab_0_1_loads_and_samples():
    cfg = RECIPE.config_from_run(read_run_config(V01))
    # Renamed (antithetic -> stratified); emptied where it had no effect (T of an MDLM with a
    # continuous schedule, the D3PM and hybrid weights, conditioning without labels); kept
    # where it did (16 sampling steps).
    d = cfg.diffusion
    assert (d.kind, d.stratified, d.T, d.hybrid_lambda, d.p_uniform, d.cond_drop) == (
        "mdlm", True, None, None, None, None
    )  # fmt: skip
    assert (cfg.sample.steps, cfg.sample.sampler, cfg.data.bpe_vocab) == (16, "cached", None)
    assert "antithetic" not in run_config(V01)["diffusion"]
    run = load(V01, "cpu")
    assert run.recipe is RECIPE and run.step == 2
    assert all(s.startswith("KING") for s in texts(run, 2, prompt="KING", length=24))


def test_migration_keeps_what_a_0_1_run_used():
    meta = read_run_config(V01)
    assert "config_version" not in meta
    old = meta["config"]
    d3pm = {**old, "diffusion": {**old["diffusion"], "kind": "d3pm-uniform", "antithetic": False}}
    assert migrate(d3pm)["diffusion"] == {
        "kind": "d3pm-uniform", "schedule": None, "T": 50, "hybrid_lambda": 0.01
    }  # fmt: skip
    hybrid = {**old, "diffusion": {**old["diffusion"], "kind": "hybrid", "antithetic": False}}
    assert migrate(hybrid)["diffusion"] == {
        "kind": "hybrid", "schedule": None, "p_uniform": 0.1, "stratified": False
    }  # fmt: skip
    ar = {**old, "diffusion": {**old["diffusion"], "kind": "ar"}}
    migrated = migrate(ar)
    assert migrated["diffusion"] == {"kind": "ar"}
    assert "sampler" not in migrated["sample"] and "steps" not in migrated["sample"]
    labelled = {**old, "data": {**old["data"], "labels": True}}
    migrated = migrate(labelled)
    assert migrated["diffusion"]["cond_drop"] == 0.1 and migrated["sample"]["guidance"] == 0.0
    for config in (d3pm, hybrid, ar, labelled):
        RECIPE.config_from_run({"config": config})  # valid in today's layout
