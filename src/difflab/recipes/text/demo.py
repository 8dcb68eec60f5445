"""The text demo (``difflab demo --text``): masked diffusion against the autoregressive baseline.

An MDLM and an autoregressive model of the same size are trained for the same wall-clock budget
on the built-in Shakespeare (characters; the preset ``text-demo``) into ``OUT/mdlm`` and
``OUT/ar``; ``OUT/report.md`` gives each one's held-out perplexity (bound) and bits per
character and passages from each, unconditional and from a prompt. The demo writes only
:data:`DEMO_FILES` and deletes nothing (``difflab.recipes.run_demo`` replaces those files when
it runs again in its own folder).
"""

from __future__ import annotations

import time
from pathlib import Path

from difflab.files import write_text
from difflab.recipes import Recipe, load_config
from difflab.recipes.text.config import TextConfig
from difflab.recipes.text.train import RUN_FILES, LoadedTextModel, count_parameters
from difflab.train.trainer import TrainResult

DEMO_PRESET = "text-demo"
DEMO_PROMPT = "KING.\nWhat"
DEMO_KINDS = ("mdlm", "ar")
REPORT_FILE = "report.md"
#: Every file the demo writes, relative to its folder.
DEMO_FILES = (*(f"{kind}/{name}" for kind in DEMO_KINDS for name in RUN_FILES), REPORT_FILE)
NAMES = {"mdlm": "MDLM (masked diffusion)", "ar": "Autoregressive baseline"}


def mdlm_versus_ar(recipe: Recipe, out: Path, *, quiet: bool = False) -> str:
    """Train both models of the demo with ``recipe`` (the text recipe) into ``out``, write
    ``out/report.md`` and return its text."""
    out = Path(out)
    start = time.perf_counter()
    results, models = {}, {}
    for kind in DEMO_KINDS:
        overrides = [f"diffusion.kind={kind}", f"train.out={out / kind}"]
        _, cfg = load_config(DEMO_PRESET, overrides, recipe=recipe.name)
        results[kind] = recipe.train(cfg, progress=not quiet)
        models[kind] = recipe.load(out / kind)
    lines = report_lines(recipe, models, results, time.perf_counter() - start)
    lines.append(f"\nWhole demo: {time.perf_counter() - start:.0f} s.")
    report = "\n".join(lines) + "\n"
    write_text(out / REPORT_FILE, report)
    return report


def training_flops(cfg: TextConfig, vocab_size: int, steps: int) -> float:
    """Estimated training FLOPs: ``6 N`` per token for the ``N`` weights of the matrix products
    (``12 w^2`` per block and the ``V w`` output head; forward and backward) plus ``12 L w`` per
    token and layer for attention (``2 L w`` FLOPs each for ``QK^T`` and ``AV``, times 3 with
    the backward)."""
    m, L = cfg.model, cfg.data.length
    dense = m.depth * 12 * m.width**2 + vocab_size * m.width
    per_token = 6 * dense + 12 * m.depth * L * m.width
    return float(per_token * cfg.train.batch_size * L * steps)


def report_lines(
    recipe: Recipe,
    models: dict[str, LoadedTextModel],
    results: dict[str, TrainResult],
    train_seconds: float,
) -> list[str]:
    """The report: the setting, a table of held-out figures, then passages of each model."""
    mdlm = models["mdlm"]
    cfg, m, vocab = mdlm.config, mdlm.config.model, mdlm.tokenizer.vocab_size
    flops = training_flops(cfg, vocab, cfg.train.steps)
    lines = [
        "# difflab text demo: masked diffusion vs autoregressive on Shakespeare",
        "",
        f"Both models: the same transformer (width {m.width}, depth {m.depth}, "
        f"{m.num_heads} heads, {count_parameters(mdlm.net) / 1e6:.2f} M parameters), characters "
        f"(vocabulary {vocab}), context {cfg.data.length}, batch {cfg.train.batch_size}, at "
        f"most {cfg.train.steps} steps or {cfg.train.max_minutes:g} minutes each (about "
        f"{flops / 1e12:.1f} TFLOP for {cfg.train.steps} steps); training took "
        f"{train_seconds:.0f} s in all.",
        "",
        "Held-out text: Macbeth and Twelfth Night. MDLM gives an upper bound (NELBO) on its "
        "negative log-likelihood; the autoregressive model its exact value.",
        "",
        "| model | steps | train s | nats/token | perplexity | bits/char |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for kind, model in models.items():
        ev = recipe.evaluate(model, n=128, seed=0, progress=False).metrics
        bound = "<= " if ev["bound"] else ""
        lines.append(
            f"| {NAMES[kind]} | {results[kind].steps} | {results[kind].seconds:.0f} | "
            f"{bound}{ev['nats_per_token']:.3f} ± {ev['nats_per_token_stderr']:.3f} | "
            f"{bound}{ev['perplexity']:.2f} | {bound}{ev['bits_per_character']:.3f} |"
        )
    for kind, model in models.items():
        how = "key/value cache" if kind == "ar" else (
            f"{cfg.sampler} sampler, {cfg.sample_steps} steps"
        )  # fmt: skip
        lines += ["", f"## {NAMES[kind]} ({how})", "", "Unconditional:"]
        free = recipe.sample(model, 2, seed=1).texts
        prompted = recipe.sample(model, 2, prompt=DEMO_PROMPT, seed=2).texts
        lines += [_fence(text) for text in free]
        lines += ["", f"From the prompt {DEMO_PROMPT!r}:"]
        lines += [_fence(text) for text in prompted]
    return lines


def _fence(text: str) -> str:
    return f"\n```\n{text}\n```"
