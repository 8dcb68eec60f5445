"""Benchmark of the digits demo (issue 2): wall-clock, throughput, memory, sampling speed, quality.

Runs ``difflab demo`` in a child process (wall-clock and peak memory of the whole job), then
judges the demo's checkpoint:

- Frechet distance in pixel space (samples vs held-out digits, next to the floor: the real
  training split to the held-out digits) and in the features of the digits classifier
  (``difflab.evaluate.judged.judged_quality``: its floor uses as many training digits as samples);
- that classifier's accuracy on class-conditional samples (labels as asked);
- sampling time per image for the demo sampler (DDIM, 50 steps, x_0 clipped to [-1, 1]).

Usage: ``python benchmarks/bench_demo.py [--out runs/bench-demo] [--skip-train]``; prints a
markdown table for docs/BENCHMARKS.md. A seconds-long smoke run: ``--train-steps 20
--n-per-class 2``.
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

import difflab
from difflab.data.images import digits_split
from difflab.evaluate.frechet import frechet_distance_from_samples
from difflab.evaluate.judged import judged_quality


def quality(run: Path, sampler: str, steps: int, n_per_class: int, seed: int = 0) -> dict:
    """FD (pixels; judge features, :func:`difflab.evaluate.judged.judged_quality`) and the
    judge's accuracy of class-conditional samples."""
    loaded = difflab.load(run, "cpu")
    train, held_out = digits_split()
    labels = torch.arange(10).repeat_interleave(n_per_class)
    start = time.perf_counter()
    x = loaded.sample(len(labels), sampler=sampler, steps=steps, label=labels, seed=seed).x
    seconds = time.perf_counter() - start
    x = x.clamp(-1, 1)
    judged = judged_quality(x, "digits", labels)
    return {
        "sampler": f"{sampler} {steps}",
        "n": len(labels),
        "fd_pixels": frechet_distance_from_samples(x.flatten(1), held_out.x.flatten(1)),
        "fd_pixels_floor": frechet_distance_from_samples(train.x.flatten(1), held_out.x.flatten(1)),
        "fd_features": judged["fd"],
        "fd_features_floor": judged["fd_floor"],
        "accuracy": judged["accuracy"],
        "seconds_per_image": seconds / len(labels),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/bench-demo"))
    parser.add_argument("--skip-train", action="store_true", help="reuse the run in --out")
    parser.add_argument("--n-per-class", type=int, default=144)
    parser.add_argument("--train-steps", type=int, help="demo training steps (default: its own)")
    args = parser.parse_args()
    rows = []
    if not args.skip_train:
        steps = [] if args.train_steps is None else ["--steps", str(args.train_steps)]
        start = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "difflab.cli", "demo", "--out", str(args.out), "--quiet",
             *steps],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        wall = time.perf_counter() - start
        peak_gib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
        print(proc.stdout)
        folder = Path(proc.stdout.split("checkpoint: ", 1)[-1].splitlines()[0]).parent
        if folder != args.out:  # the demo writes into no folder that holds others' files
            raise SystemExit(f"{args.out} holds other files: the demo trained in {folder}")
        speed = proc.stdout.split(" images/s")[0].rsplit(" ", 1)[-1]
        rows += [
            ("demo wall-clock (train + pictures)", f"{wall:.0f} s", "<= 180 s"),
            ("training throughput", f"{speed} images/s", ""),
            ("peak memory (RSS) of the demo", f"{peak_gib:.2f} GiB", "< 2 GiB"),
        ]
    # The demo's own sampler; 1000-step DDPM and the fast samplers are in bench_samplers.py.
    for sampler, steps in [("ddim", 50)]:
        q = quality(args.out, sampler, steps, args.n_per_class)
        name = q["sampler"]
        rows += [
            (f"{name}: pixel FD (floor {q['fd_pixels_floor']:.2f})",
             f"{q['fd_pixels']:.2f} ({q['fd_pixels'] / q['fd_pixels_floor']:.2f}x floor)",
             "<= 1.5x floor"),
            (f"{name}: classifier-feature FD (floor {q['fd_features_floor']:.2f})",
             f"{q['fd_features']:.2f} ({q['fd_features'] / q['fd_features_floor']:.2f}x floor)",
             ""),
            (f"{name}: classifier accuracy on {q['n']} conditional samples",
             f"{100 * q['accuracy']:.1f}%", ">= 95%"),
            (f"{name}: sampling time per image", f"{1000 * q['seconds_per_image']:.1f} ms", ""),
        ]  # fmt: skip
    threads = torch.get_num_threads()
    print(f"\nmachine: {platform.machine()}, {threads} threads, torch {torch.__version__}")
    print("\n| measure | value | target |\n|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
