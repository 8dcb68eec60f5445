"""Benchmark of Diffusion-LM control by classifier guidance (issue 16; seed 000).

A ``diffusion-lm`` run on whole lines (``diffusion.lines=true``, the built-in Shakespeare,
characters) trained for ``--minutes``, its control classifier for ``--classifier-steps`` steps
(``difflab train-control``), then ``--n`` passages per control drawn with guidance at each of
``--scales`` and ``--n`` unguided passages (the same seeds' sampler at scale 0). Each control is
judged on the decoded text by an independent measure (:class:`difflab.recipes.text.control.
Control`): ``length=N`` succeeds within +-10% of ``N`` characters, ``word=W`` when ``W`` occurs,
``lines=K`` when the text has exactly ``K`` lines. The unguided row judges the same unguided
passages against every control (the base rate). ``--control-steps K`` takes Diffusion-LM's
own form instead of score guidance: ``K`` gradient steps of ``--control-step-size`` on each
``x_{t-1}`` of DDPM's ancestral sampler (:func:`difflab.gaussian.control.controlled_ddpm`).

Usage: ``OMP_NUM_THREADS=1 python benchmarks/bench_ctext_control.py --minutes 3
[--out runs/bench-ctext-control]``; prints markdown for docs/BENCHMARKS.md and writes it to
``OUT/bench_ctext_control.md``.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

from difflab.gaussian.control import CONTROL_STEP_SIZE
from difflab.recipes import load_config
from difflab.recipes.text import RECIPE
from difflab.recipes.text.control import (
    CONTROL_FOLDER,
    Control,
    parse_controls,
    train_control,
)


def train_run(args: argparse.Namespace) -> tuple[object, float]:
    run = args.out / "diffusion-lm-lines"
    seconds = float("nan")
    if not (run / "checkpoint.safetensors").exists():  # reused when --out is kept
        _, cfg = load_config(args.preset, [
            f"train.out={run}", f"train.max_minutes={args.minutes}", "train.steps=1000000",
            "train.lr_schedule=constant", f"train.batch_size={args.batch_size}",
            f"data.length={args.length}", f"model.width={args.width}",
            f"model.depth={args.depth}", f"model.num_heads={args.heads}", "train.device=cpu",
            "diffusion.kind=diffusion-lm", "diffusion.lines=true", *args.set,
        ], recipe=RECIPE.name)  # fmt: skip
        seconds = RECIPE.train(cfg, progress=False).seconds
    model = RECIPE.load(run, "cpu")
    if not (run / CONTROL_FOLDER / "checkpoint.safetensors").exists():
        train_control(model, steps=args.classifier_steps, progress=False)
    return model, seconds


def success(controls: list[Control], texts: list[str], tokenizer) -> list[float]:
    return [sum(c.satisfied(t, tokenizer) for t in texts) / len(texts) for c in controls]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=3.0, help="diffusion-lm training")
    parser.add_argument("--classifier-steps", type=int, default=300)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-ctext-control"))
    parser.add_argument("--preset", default="text-demo")
    parser.add_argument("--length", type=int, default=96, help="context (characters)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--steps", type=int, default=50, help="sampling steps (ddim)")
    parser.add_argument("--n", type=int, default=32, help="passages per row")
    parser.add_argument("--scales", default="1,4", help="guidance scales gamma, comma-separated")
    parser.add_argument("--controls", default="length=60,length=30,word=KING,lines=2")
    parser.add_argument("--set", nargs="*", default=[], help="more overrides of the run")
    parser.add_argument("--control-steps", type=int, default=0,
                        help="gradient steps on each x_(t-1) (0: score guidance)")  # fmt: skip
    parser.add_argument("--control-step-size", type=float, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, seconds = train_run(args)
    items = args.controls.split(",")
    controls = [parse_controls([item], model)[0] for item in items]
    tok = model.tokenizer
    start = time.perf_counter()
    plain = RECIPE.sample(model, args.n, steps=args.steps, seed=0).texts
    plain_s = time.perf_counter() - start
    base = success(controls, plain, tok)
    lengths = sorted(len(tok.encode(t)) for t in plain)
    form = "ddim (score guidance)"
    steps_options = {}
    if args.control_steps:
        size = args.control_step_size or CONTROL_STEP_SIZE
        form = (f"ddpm with {args.control_steps} gradient steps of size {size} on each x_(t-1) "
                "(unguided: ddim)")  # fmt: skip
        steps_options = {"control_steps": args.control_steps,
                         "control_step_size": args.control_step_size}  # fmt: skip
    lines = [
        f"Diffusion-LM on whole lines (`diffusion.lines=true`), context {args.length} characters, "
        f"width {args.width}, depth {args.depth}, {model.step} steps "
        f"({seconds:.0f} s; nan: reused); classifier {args.classifier_steps} steps; {args.n} "
        f"passages per row, {form} {args.steps} steps, clamping on. Unguided lengths: median "
        f"{lengths[len(lengths) // 2]}, range {lengths[0]}-{lengths[-1]} characters.",
        "",
        "| control | unguided | " + " | ".join(f"gamma = {s}" for s in args.scales.split(","))
        + " |",
        "| --- | --- | " + " | ".join("---" for _ in args.scales.split(",")) + " |",
    ]  # fmt: skip
    rows = {item: [f"{rate:.2f}"] for item, rate in zip(items, base, strict=True)}
    guided_s = []
    for scale in (float(s) for s in args.scales.split(",")):
        for item, control in zip(items, controls, strict=True):
            start = time.perf_counter()
            texts = RECIPE.sample(model, args.n, steps=args.steps, seed=0, control=[item],
                                  control_scale=scale, **steps_options).texts  # fmt: skip
            guided_s.append(time.perf_counter() - start)
            rate = success([control], texts, tok)[0]
            detail = ""
            if control.name == "length":
                got = sorted(int(control.measure(t, tok)) for t in texts)
                detail = f" (median {got[len(got) // 2]})"
            rows[item].append(f"{rate:.2f}{detail}")
            print(f"{item} gamma={scale}: {rate:.2f}{detail}; e.g. {texts[0]!r}", file=sys.stderr)
    for item, cells in rows.items():
        lines.append(f"| {item} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Sampling {args.n} passages: {plain_s:.1f} s unguided, {min(guided_s):.1f}-"
        f"{max(guided_s):.1f} s guided ({platform.machine()}, {torch.get_num_threads()} "
        f"thread, torch {torch.__version__}).",
    ]
    report = "\n".join(lines)
    print(report)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_ctext_control.md").write_text(report + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
