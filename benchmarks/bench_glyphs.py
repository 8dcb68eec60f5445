"""Glyphs: pixel U-Net, latent U-Net and latent DiTs side by side at equal training compute
(issue 12), and the text-to-image model's prompt adherence.

Every model is class-conditional on the character (the ``glyphs`` preset's labels, caption-free)
and trains for the same budget of training FLOPs (``--tflop``): its steps are the budget over
its measured FLOPs per step (forward and backward of one batch, counted by
``torch.utils.flop_counter``). A FLOP budget, not a wall-clock one, keeps the comparison fair
on a machine shared with other work; the images/s each model trained at are reported too. The
latent models train on the latents of one frozen autoencoder (``--autoencoder RUN``, e.g. from
``benchmarks/bench_latent.py``), whose own training is not counted in their budget (it is paid
once for every latent model). Each model then draws ``--n`` samples, cycling over the 62
characters, with classifier-free guidance ``--guidance``, and is judged by
:func:`difflab.evaluate.judged.judged_quality`: FD to the test glyphs in the judge's features
over the floor (real training glyphs at the same n), and the judge's character accuracy.

With ``--text RUN`` (a run of the ``text-to-image`` recipe) its ``difflab eval`` line (prompt
adherence per attribute against shuffled prompts, judged FD) is appended.

    .venv/bin/python benchmarks/bench_glyphs.py --autoencoder runs/bench/glyphs-ae --tflop 20
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

import difflab
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--autoencoder", required=True, help="run of the autoencoder recipe")
    parser.add_argument("--tflop", type=float, default=20.0, help="training budget per model")
    parser.add_argument("--n", type=int, default=1000, help="samples judged per model")
    parser.add_argument("--guidance", type=float, default=1.0)
    parser.add_argument("--out", default="runs/bench/glyphs")
    parser.add_argument("--only", nargs="*", help="model names to run (default all)")
    parser.add_argument("--text", help="a text-to-image run to evaluate too")
    args = parser.parse_args()
    rows = []
    for name, (recipe, extra) in MODELS.items():
        if args.only and name not in args.only:
            continue
        overrides = [*extra, "data.held_out=0.05"]
        if recipe == "latent":
            overrides.append(f"latent.autoencoder={args.autoencoder}")
        flops = flops_per_image(recipe, overrides)
        _, cfg = load_config("glyphs", overrides, recipe=recipe)
        steps = max(1, round(args.tflop * 1e12 / (flops * cfg.train.batch_size)))
        out = Path(args.out) / name.replace(" ", "-")
        start = time.perf_counter()
        result = difflab.train("glyphs", [*overrides, f"train.steps={steps}", "train.max_minutes=0",
                                          "train.warmup=50"],
                               recipe=recipe, out=str(out), progress=False)  # fmt: skip
        seconds = time.perf_counter() - start
        run = difflab.load(out, "cpu")
        labels = torch.arange(args.n) % 62
        x = run.sample(args.n, label=labels.tolist(), guidance=args.guidance, seed=0).x
        q = judged_quality(x.float().cpu(), "glyphs", labels)
        rows.append((name, flops / 1e9, steps, result.images_per_second, seconds, q))
        print(f"{name}: {flops / 1e9:.2f} GFLOP/image, {steps} steps, "
              f"{result.images_per_second:.0f} images/s, FD {q['fd']:.2f} / floor "
              f"{q['fd_floor']:.2f} = {q['fd_ratio']:.2f}, character {q['accuracy']:.1%}",
              flush=True)  # fmt: skip
    print("\n| model | GFLOP/image (train) | steps | images/s | FD | FD / floor | character |")
    print("|---|---|---|---|---|---|---|")
    for name, gflop, steps, ips, _, q in rows:
        print(
            f"| {name} | {gflop:.2f} | {steps} | {ips:.0f} | {q['fd']:.2f} | "
            f"{q['fd_ratio']:.2f} | {q['accuracy']:.1%} |"
        )
    if args.text:
        print("\n" + difflab.load(args.text, "cpu").evaluate(n=args.n, progress=False).summary)


if __name__ == "__main__":
    main()
