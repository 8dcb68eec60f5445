"""Self-conditioning on digits (issue 16): the digits preset trained twice at equal steps, with
and without ``model.self_condition=true``, then judged at equal sampling steps.

Each pair of runs shares the seed, the data, the schedule and every setting but the flag. The
quality is :func:`bench_demo.quality`: pixel Frechet distance of class-conditional samples to
the held-out digits (next to its floor), the digits judge's feature FD and its accuracy.

Usage: ``OMP_NUM_THREADS=1 python benchmarks/bench_selfcond.py --train-steps 600 --predictions
eps,v --samplers ddim:10,ddim:50,dpmpp_2m:10 --n-per-class 100 --out runs/bench-selfcond``;
prints a markdown table for docs/BENCHMARKS.md. A seconds-long smoke run: ``--train-steps 5
--n-per-class 2 --samplers ddim:2``.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch
from bench_demo import quality

import difflab


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/bench-selfcond"))
    parser.add_argument("--train-steps", type=int, default=600)
    parser.add_argument("--predictions", default="eps,v", help="comma list of diffusion.prediction")
    parser.add_argument("--samplers", default="ddim:10,ddim:50,dpmpp_2m:10",
                        help="comma list of SAMPLER:STEPS")  # fmt: skip
    parser.add_argument("--n-per-class", type=int, default=100)
    parser.add_argument("--skip-train", action="store_true", help="reuse the runs in --out")
    args = parser.parse_args()
    samplers = [(s.split(":")[0], int(s.split(":")[1])) for s in args.samplers.split(",")]
    rows = []
    for prediction in args.predictions.split(","):
        for flag in (False, True):
            out = args.out / f"{prediction}-{'selfcond' if flag else 'plain'}"
            seconds = float("nan")
            if not args.skip_train:
                start = time.perf_counter()
                difflab.train("digits", [f"diffusion.prediction={prediction}",
                                         f"model.self_condition={str(flag).lower()}"],
                              out=str(out), steps=args.train_steps, progress=False)  # fmt: skip
                seconds = time.perf_counter() - start
            for sampler, steps in samplers:
                q = quality(out, sampler, steps, args.n_per_class)
                rows.append((prediction, "yes" if flag else "no", f"{seconds:.0f}", q["sampler"],
                             f"{q['fd_pixels']:.3f} ({q['fd_pixels'] / q['fd_pixels_floor']:.2f}x)",
                             f"{q['fd_features']:.2f} "
                             f"({q['fd_features'] / q['fd_features_floor']:.2f}x)",
                             f"{100 * q['accuracy']:.1f}%"))  # fmt: skip
                print(rows[-1], flush=True)
    threads = torch.get_num_threads()
    print(
        f"\nmachine: {platform.machine()}, {threads} threads, torch {torch.__version__}; "
        f"{args.train_steps} training steps, {10 * args.n_per_class} samples per row"
    )
    print(
        "\n| prediction | self-conditioning | training s | sampler | pixel FD (x floor) | "
        "feature FD (x floor) | judge accuracy |\n|---|---|---:|---|---:|---:|---:|"
    )
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
