"""Benchmark of the text recipe (issue 5): likelihood at equal size and time, sampling speed
against sample quality, and the demo's wall-clock and memory.

1. Likelihood: MDLM, D3PM-absorbing, UDLM and the autoregressive baseline, each the same
   transformer (time conditioning off for all, so the parameter counts are equal), trained for
   the same wall-clock budget (``--minutes``) on the built-in Shakespeare (characters), scored on
   the held-out plays: perplexity bound (exact for AR) and bits per character.
2. Generation: ``--n`` samples of ``--gen-length`` tokens from MDLM at several step counts
   (cached ancestral; the uncached one at the largest count) and from the AR model with its
   key/value cache: tokens per second and network calls, next to the generative perplexity
   under the AR model, the unigram entropy and distinct-2/3 of the samples (and of held-out
   text, the reference).
3. ``--demo``: the wall-clock and peak memory (max RSS) of the text demo (``difflab demo
   --text``) run in a child process.

Usage: ``python benchmarks/bench_text.py --minutes 2 [--out runs/bench-text] [--demo]``; prints
markdown tables for docs/BENCHMARKS.md and writes them to ``OUT/bench_text.md``.
"""

from __future__ import annotations

import argparse
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from difflab.data.text import BOS_ID, EOS_ID, PAD_ID
from difflab.evaluate.text_metrics import (
    distinct_n,
    generative_perplexity,
    unigram_entropy,
    valid_token_mask,
)
from difflab.recipes import load_config
from difflab.recipes.text import RECIPE, LoadedTextModel
from difflab.recipes.text.evaluate import held_out_rows
from difflab.recipes.text.sample import generate_tokens
from difflab.recipes.text.train import count_parameters

KINDS = ("mdlm", "d3pm-absorbing", "udlm", "ar")


def train_all(args: argparse.Namespace) -> dict[str, tuple[LoadedTextModel, float]]:
    """Train (or, with ``--skip-train``, load) every kind; returns ``{kind: (model, seconds)}``."""
    models = {}
    for kind in args.kinds:
        run = args.out / kind
        overrides = [
            f"diffusion.kind={kind}",
            f"train.out={run}",
            f"train.max_minutes={args.minutes}",
            "train.steps=1000000",  # the time budget ends training
            "train.lr_schedule=constant",
            f"train.batch_size={args.batch_size}",
            *([f"train.lr={args.lr}"] if args.lr is not None else []),
            *args.set,
            f"train.device={args.device}",
            f"data.length={args.length}",
            f"model.width={args.width}",
            f"model.depth={args.depth}",
            f"model.num_heads={args.heads}",
            "model.time_conditioning=false",
        ]
        seconds = float("nan")
        if not args.skip_train:
            _, cfg = load_config(args.preset, overrides, recipe=RECIPE.name)
            seconds = RECIPE.train(cfg, progress=False).seconds
        models[kind] = (RECIPE.load(run, args.device), seconds)
    return models


def likelihood_table(models: dict, args: argparse.Namespace) -> list[str]:
    rows = [
        "| model | parameters | steps | train s | tokens seen | nats/token | perplexity "
        "| bits/char | vs AR |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    results = {
        kind: RECIPE.evaluate(
            model, n=args.eval_sequences, seed=0, progress=False,
            **({} if kind == "ar" else {"t_samples": 4}),  # the AR likelihood is exact
        ).metrics
        for kind, (model, _) in models.items()
    }  # fmt: skip
    ar_bpc = results["ar"]["bits_per_character"] if "ar" in results else None
    for kind, (model, seconds) in models.items():
        r = results[kind]
        bound = "<= " if r["bound"] else ""
        cfg = model.config
        seen = model.step * cfg.train.batch_size * cfg.data.length
        ratio = f"{r['bits_per_character'] / ar_bpc:.3f}" if ar_bpc else "-"
        rows.append(
            f"| {kind} | {count_parameters(model.net):,} | {model.step} | {seconds:.0f} | "
            f"{seen / 1e6:.2f} M | {bound}{r['nats_per_token']:.3f} ± "
            f"{r['nats_per_token_stderr']:.3f} | {bound}{r['perplexity']:.2f} | "
            f"{bound}{r['bits_per_character']:.3f} | {ratio} |"
        )
    return rows


def _quality(tokens: torch.Tensor, ar: LoadedTextModel | None) -> tuple[str, str, str, str]:
    """Generative perplexity under ``ar`` (of the first ``ar.context`` tokens of each sample),
    unigram entropy, distinct-2 and distinct-3."""
    mask = valid_token_mask(tokens, EOS_ID, PAD_ID)
    gen_ppl = "-"
    if ar is not None:
        head, head_mask = tokens[:, : ar.context].to(ar.device), mask[:, : ar.context]
        value = generative_perplexity(lambda x: ar.net(x), head, head_mask.to(ar.device), BOS_ID)
        gen_ppl = f"{value:.2f}"
    tokens, mask = tokens.cpu(), mask.cpu()
    return (
        gen_ppl,
        f"{unigram_entropy(tokens, mask):.3f}",
        f"{distinct_n(tokens, 2, mask):.3f}",
        f"{distinct_n(tokens, 3, mask):.3f}",
    )


def _timed(fn) -> tuple[object, float]:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def generation_table(models: dict, args: argparse.Namespace) -> list[str]:
    ar = models["ar"][0] if "ar" in models else None
    rows = [
        "| model | sampler | steps | network calls | tokens/s | gen. perplexity (AR) "
        "| unigram entropy | distinct-2 | distinct-3 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    n, length = args.n, args.gen_length
    runs = []
    if "mdlm" in models:
        mdlm = models["mdlm"][0]
        runs += [("mdlm", mdlm, "cached", steps) for steps in args.steps_list]
        runs.append(("mdlm", mdlm, "ancestral", max(args.steps_list)))
    if ar is not None:
        runs.append(("ar", ar, "kv-cache", None))
    for name, model, sampler, steps in runs:
        options = {"length": length, "seed": 0, "temperature": 1.0, "top_p": 1.0}
        if steps is not None:
            options.update(sampler=sampler, steps=steps)
        generate_tokens(model, 1, **{**options, "length": min(length, 16)})  # warm-up
        samples, seconds = _timed(lambda m=model, o=options: generate_tokens(m, n, **o))
        quality = _quality(samples.tokens, ar)
        rows.append(
            f"| {name} | {sampler} | {steps or length} | {samples.nfe} | "
            f"{n * length / seconds:.0f} | " + " | ".join(quality) + " |"
        )
    any_model = next(iter(models.values()))[0]
    held, _, _, _ = held_out_rows(any_model)
    rows_needed = -(-n * length // held.shape[1])
    reference = held[:rows_needed].reshape(-1)[: n * length].reshape(n, length)
    rows.append("| held-out text | - | - | - | - | " + " | ".join(_quality(reference, ar)) + " |")
    return rows


def demo_run(out: Path) -> list[str]:
    """Wall-clock and peak memory of the demo in a child process (its own max RSS)."""
    code = (
        "import sys; from pathlib import Path; from difflab.recipes import run_demo; "
        "from difflab.recipes.text import RECIPE; print(run_demo(RECIPE, Path(sys.argv[1]), "
        "quiet=True))"
    )
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code, str(out)], check=True, capture_output=True)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # KiB -> GiB
    return [
        "| job | wall-clock s | peak memory GiB | targets |",
        "| --- | --- | --- | --- |",
        f"| difflab demo --text | {seconds:.0f} | {peak:.2f} | <= 300 s, < 4 GiB |",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=2.0, help="training budget per model")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-text"))
    parser.add_argument("--preset", default="text-demo")
    parser.add_argument("--kinds", type=lambda s: s.split(","), default=list(KINDS))
    parser.add_argument("--length", type=int, default=256, help="training context")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, help="learning rate (default: the preset's)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="any other config override"
    )
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--eval-sequences", type=int, default=256)
    parser.add_argument("--gen-length", type=int, default=256)
    parser.add_argument("--n", type=int, default=8, help="samples per generation row")
    parser.add_argument(
        "--steps-list", type=lambda s: [int(x) for x in s.split(",")], default=[16, 64, 256]
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument("--skip-train", action="store_true", help="reuse the runs in --out")
    parser.add_argument("--demo", action="store_true", help="also time the text demo")
    args = parser.parse_args()

    models = train_all(args)
    threads = torch.get_num_threads()
    lines = [
        f"## Text benchmark ({platform.processor() or platform.machine()}, {threads} threads, "
        f"torch {torch.__version__})",
        "",
        f"Command: `python benchmarks/bench_text.py {' '.join(sys.argv[1:])}`",
        "",
        f"Likelihood on the held-out plays after {args.minutes:g} min of training each "
        f"(context {args.length}, batch {args.batch_size}, width {args.width}, depth "
        f"{args.depth}; '<=' marks a bound):",
        "",
        *likelihood_table(models, args),
        "",
        f"Generation of {args.n} x {args.gen_length} tokens (temperature 1; generative "
        f"perplexity of the first {min(args.gen_length, args.length)} tokens):",
        "",
        *generation_table(models, args),
    ]
    if args.demo:
        lines += ["", *demo_run(args.out / "demo")]
    report = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_text.md").write_text(report)
    print(report)


if __name__ == "__main__":
    main()
