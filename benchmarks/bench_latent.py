"""Benchmark of the latent diffusion autoencoder (issue 12, part 3): reconstruction PSNR and the
glyphs judge's accuracy on reconstructions vs on the real images.

Trains the ``autoencoder`` preset (glyphs, 32x32x3 -> 8x8x8) into ``--out`` for at most
``--minutes`` of wall-clock (``train.max_minutes``; the run stops early and says so), unless
``--skip-train`` reuses the run there; a stopped run continues with
``difflab train OUT --resume train.max_minutes=0``. Then it reconstructs the first ``--n`` glyphs
of the test split (never seen by the autoencoder or the judge) through the posterior mean and
reports the PSNR and each judge head's accuracy on the reconstructions and on the originals.

The trained run in ``--out`` (default ``runs/bench/glyphs-ae``) is the autoencoder of the latent
side of the pixel / latent / DiT comparison:
``difflab train glyphs --recipe latent latent.autoencoder=runs/bench/glyphs-ae``.

Usage: ``python benchmarks/bench_latent.py [--out runs/bench/glyphs-ae] [--minutes 8]
[--skip-train] [--n 2000]``; prints a markdown table for docs/BENCHMARKS.md. A smoke run:
``--minutes 0.2 --n 100 --out /tmp/ae-smoke``.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

import difflab
from difflab.data.glyphs import glyphs_dataset
from difflab.evaluate.glyphs_judge import glyphs_targets, glyphs_to_tensor, load_glyphs_judge
from difflab.nets.autoencoder import psnr
from difflab.nets.judge import GLYPHS_HEADS
from difflab.recipes.autoencoder import decode_latents, encode_means


def reconstruction_quality(run: Path, n: int) -> dict:
    """PSNR and the judge's per-head accuracy on reconstructions and originals of the first
    ``n`` test glyphs."""
    loaded = difflab.load(run, "cpu")
    test = glyphs_dataset("test")
    x = glyphs_to_tensor(test.images[:n])
    targets = {k: v[:n] for k, v in glyphs_targets(test).items()}
    net = loaded.model.net
    reconstruction = decode_latents(net, encode_means(net, x)).clamp(-1, 1)
    judge = load_glyphs_judge()

    def accuracies(images: torch.Tensor) -> dict[str, float]:
        predicted = {k: [] for k in GLYPHS_HEADS}
        for part in images.split(1024):
            for k, v in judge.predict(part).items():
                predicted[k].append(v)
        return {k: float((torch.cat(predicted[k]) == targets[k]).double().mean())
                for k in GLYPHS_HEADS}  # fmt: skip

    return {
        "step": loaded.step,
        "latent_scale": loaded.model.latent_scale,
        "psnr": float(psnr(x, reconstruction).mean()),
        "real": accuracies(x),
        "reconstructed": accuracies(reconstruction),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/bench/glyphs-ae"))
    parser.add_argument("--minutes", type=float, default=8.0, help="training wall-clock cap")
    parser.add_argument("--steps", type=int, default=20_000, help="train.steps (the cap)")
    parser.add_argument("--skip-train", action="store_true", help="reuse the run in --out")
    parser.add_argument("--n", type=int, default=2000, help="test glyphs reconstructed")
    args = parser.parse_args()
    rows = []
    if not args.skip_train:
        start = time.perf_counter()
        result = difflab.train("autoencoder", out=str(args.out), steps=args.steps,
                               max_minutes=args.minutes, lr_schedule="constant")  # fmt: skip
        rows += [
            ("training", f"{result.steps} steps of batch 32 in {result.seconds:.0f} s "
                         f"({result.images_per_second:.1f} images/s)", "<= 8 min"),
            ("wall-clock with the latent-scale measurement", f"{time.perf_counter() - start:.0f} s",
             ""),
        ]  # fmt: skip
    q = reconstruction_quality(args.out, args.n)
    rows += [
        ("checkpoint step, latent scale", f"{q['step']}, {q['latent_scale']:.4f}", ""),
        (f"PSNR on {args.n} test glyphs", f"{q['psnr']:.2f} dB", ""),
    ]
    for head in GLYPHS_HEADS:
        real, rec = 100 * q["real"][head], 100 * q["reconstructed"][head]
        target = "within 1 point of real" if head == "character" else ""
        rows.append((f"judge {head} accuracy: reconstructions (real)",
                     f"{rec:.1f}% ({real:.1f}%), {rec - real:+.1f} points", target))  # fmt: skip
    threads = torch.get_num_threads()
    print(f"\nmachine: {platform.machine()}, {threads} threads, torch {torch.__version__}")
    print(f"run folder: {args.out}")
    print("\n| measure | value | target |\n|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
