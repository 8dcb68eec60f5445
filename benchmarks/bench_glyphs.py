"""Glyphs: pixel U-Net, latent U-Net and latent DiTs side by side at equal training time
(issue 12), and the text-to-image model's prompt adherence.

Every model is class-conditional on the character (the ``glyphs`` preset's labels, caption-free)
and trains for the same CPU time of this process (``--cpu-minutes``, run with one thread:
``OMP_NUM_THREADS=1``), which is the wall-clock time of an idle core and, unlike wall-clock,
does not depend on what else the machine runs. Its steps come from its measured CPU seconds per
training step (:func:`trained_for`: a short calibration, then resumed segments); setup (data
loading, the latent models' encoding of the training set) is reported, not counted. Training
FLOPs per image (forward and backward of one batch, ``torch.utils.flop_counter``) and images/s
are reported for each model. ``--train-steps N`` trains every model for ``N`` steps instead (the
DiT paper's axis: quality against model GFLOPs at a fixed number of steps; CPU seconds then
include setup). The latent models train on the latents of one frozen autoencoder
(``--autoencoder RUN``), whose own training is paid once for every latent model and not counted.
Each model then draws ``--n`` samples, cycling over the 62 characters, with the same sampler
(``--sampler``, ``--steps``) and classifier-free guidance ``--guidance``, judged by
:func:`difflab.evaluate.judged.judged_quality`: FD to the test glyphs in the judge's features
over the floor (real training glyphs at the same n), and the judge's character accuracy.

With ``--text RUN`` (a run of the ``text-to-image`` recipe) its ``difflab eval`` line (prompt
adherence per attribute against shuffled prompts, judged FD) is appended.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_glyphs.py --autoencoder runs/ae \
        --cpu-minutes 9 --n 500
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from bench_ctext import segment_cost
from torch.utils.flop_counter import FlopCounterMode

import difflab
from difflab.errors import UserError
from difflab.evaluate.judged import judged_quality
from difflab.recipes import load_config
from difflab.recipes.image import make_loss, num_classes_of, run_metadata

#: name: (recipe, overrides). The DiTs: two widths (S, B) and two patch sizes on 8x8 latents.
MODELS = {
    "pixel U-Net": ("image", []),
    "latent U-Net": ("latent", ["model.unet.channel_mults=[1,2]",
                                "model.unet.attn_resolutions=[4]"]),
    **{
        f"latent DiT-{size} p{p}": (
            "latent",
            ["model.kind=dit", "model.unet=null", f"model.dit.width={width}",
             f"model.dit.depth={depth}", "model.dit.num_heads=4", f"model.dit.patch_size={p}"],
        )
        for size, width, depth in (("S", 64, 4), ("B", 128, 6))
        for p in (1, 2)
    },
}  # fmt: skip


def flops_per_image(recipe_name: str, overrides: list[str]) -> float:
    """Training FLOPs (forward and backward) per image of one batch of the config."""
    recipe, cfg = load_config("glyphs", overrides, recipe=recipe_name)
    train_data, extra = recipe.training_data(cfg)
    meta = run_metadata(recipe.name, cfg, train_data, **extra)
    net = recipe.build(cfg, meta)
    batch = min(cfg.train.batch_size, len(train_data))
    labels = train_data.labels[:batch]
    loss = make_loss(cfg.diffusion, num_classes_of(meta))
    counter = FlopCounterMode(display=False)
    with counter:
        loss(net, (train_data.x[:batch], labels), torch.Generator().manual_seed(0)).backward()
    return counter.get_total_flops() / batch


def cpu_seconds(source: str | Path, overrides: list[str], **keys) -> float:
    """CPU seconds of this process spent in one ``difflab.train`` call."""
    start = time.process_time()
    difflab.train(source, overrides, progress=False, **keys)
    return time.process_time() - start


def trained_for(
    budget: float, recipe: str, overrides: list[str], out: Path, calibrate: int = 20
) -> tuple[int, float, float]:
    """Train one model into ``out`` for ``budget`` CPU seconds of training steps, setup not
    counted: ``calibrate`` steps from scratch, then resumed segments. A segment of ``n`` steps
    costs ``o + r n`` CPU seconds (``o``: its setup, e.g. encoding the training set). While
    setup dominates, a fit of ``o`` and ``r`` is far off (a first version, fitted on segments of
    20 and 60 steps, gave a small DiT twice its budget), so the resumed segments first double
    in length from ``calibrate`` until one costs twice the first; then ``o`` and ``r`` are
    fitted by least squares to them (:func:`bench_ctext.segment_cost`), and each next segment
    takes the budget left, ``(budget - r steps) / r``, until that is under 2% of the budget.
    ``(steps, o, r)``."""
    c = calibrate
    cpu_seconds("glyphs", [*overrides, f"train.steps={c}"], recipe=recipe, out=str(out))
    step, costs = c, []
    while True:
        setup, rate = segment_cost(costs) if len(costs) > 1 else (0.0, 0.0)
        calibrated = len(costs) > 1 and costs[-1][1] >= 2 * costs[0][1]
        if calibrated and budget - rate * step < budget / 50:
            return step, setup, rate
        more = round((budget - rate * step) / rate) if calibrated else c * 2 ** len(costs)
        costs.append((more, cpu_seconds(out, [f"train.steps={step + more}"], resume=True)))
        step += more


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--autoencoder", required=True, help="run of the autoencoder recipe")
    parser.add_argument(
        "--cpu-minutes",
        type=float,
        default=9.0,
        help="training CPU time per model (run with OMP_NUM_THREADS=1)",
    )
    parser.add_argument("--train-steps", type=int, help="equal steps instead of equal CPU time")
    parser.add_argument("--n", type=int, default=500, help="samples judged per model")
    parser.add_argument("--sampler", default="dpmpp_2m")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=1.0)
    parser.add_argument("--out", default="runs/bench/glyphs")
    parser.add_argument("--only", nargs="*", help="model names to run (default all)")
    parser.add_argument("--text", help="a text-to-image run to evaluate too")
    args = parser.parse_args()
    if args.cpu_minutes <= 0 or (args.train_steps is not None and args.train_steps < 1):
        parser.error("--cpu-minutes must be positive and --train-steps at least 1")
    if args.only and (unknown := set(args.only) - set(MODELS)):
        parser.error(f"unknown models {sorted(unknown)}: choose from {', '.join(MODELS)}")
    rows = []
    for name, (recipe, extra) in MODELS.items():
        if args.only and name not in args.only:
            continue
        overrides = [*extra, "data.held_out=0.05"]
        if recipe == "latent":
            overrides.append(f"latent.autoencoder={args.autoencoder}")
        flops = flops_per_image(recipe, overrides)
        _, cfg = load_config("glyphs", overrides, recipe=recipe)
        out = Path(args.out) / name.replace(" ", "-")
        overrides += ["train.max_minutes=0", "train.warmup=50"]
        if args.train_steps is not None:
            steps, setup = args.train_steps, 0.0
            overrides.append(f"train.steps={steps}")
            rate = cpu_seconds("glyphs", overrides, recipe=recipe, out=str(out)) / steps
        else:
            steps, setup, rate = trained_for(args.cpu_minutes * 60, recipe, overrides, out)
        run = difflab.load(out, "cpu")
        labels = torch.arange(args.n) % 62
        x = run.sample(
            args.n,
            label=labels.tolist(),
            guidance=args.guidance,
            seed=0,
            sampler=args.sampler,
            steps=args.steps,
        ).x
        q = judged_quality(x.float().cpu(), "glyphs", labels)
        ips = cfg.train.batch_size / rate
        rows.append((name, flops / 1e9, steps, ips, steps * rate, q))
        print(f"{name}: {flops / 1e9:.2f} GFLOP/image, {steps} steps ({steps * rate:.0f} CPU s, "
              f"setup {setup:.0f} s), {ips:.0f} images/s, FD {q['fd']:.2f} / floor "
              f"{q['fd_floor']:.2f} = {q['fd_ratio']:.2f}, character {q['accuracy']:.1%}",
              flush=True)  # fmt: skip
    print(
        "\n| model | GFLOP/image (train) | steps | CPU s | images/s | images seen | FD "
        "| FD / floor | character |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, gflop, steps, ips, seconds, q in rows:
        print(
            f"| {name} | {gflop:.2f} | {steps} | {seconds:.0f} | {ips:.0f} | "
            f"{ips * seconds:,.0f} | {q['fd']:.2f} | {q['fd_ratio']:.2f} | {q['accuracy']:.1%} |"
        )
    if args.text:
        print("\n" + difflab.load(args.text, "cpu").evaluate(n=args.n, progress=False).summary)


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        raise SystemExit(f"bench_glyphs.py: error: {e}") from None
