"""2-D toy benchmark (issue 11): are the ``moons`` preset's default samples on the data?

Trains the ``moons`` preset in one or more variants (``--variant NAME=KEY=VALUE,KEY=VALUE``;
by default the preset as shipped, ``preset``, and the former eps-prediction default, ``eps``),
draws ``--n`` samples of each with every sampler of ``--samplers`` (50 steps, the run's default
``trailing`` grid, ``threshold: none`` unless a row says otherwise) and measures them against
the held-out split of the data (``data.held_out``, never seen in training):

- **Chamfer distance** (data units; the data are standardised to unit std):
  ``C(S, H) = mean_{s in S} min_{h in H} |s - h| + mean_{h in H} min_{s in S} |s - h|``.
  The first half says whether samples lie on the data, the second whether they cover it.
  Two references: ``train vs held-out`` (as many training points as samples; what a perfect
  model scores) and ``N(0, I) vs held-out`` (pure noise).
- **far**: the share of samples farther than 0.5 (half the data's std) from every held-out
  point; **|x| max**: the largest coordinate (the data span about +-1.9); **finite**: the share
  of finite samples.

Writes a scatter plot of held-out points against the samples of each variant (DDIM, 50 steps)
to ``--plot``. Usage::

    OMP_NUM_THREADS=1 python benchmarks/bench_toys.py --runs runs/bench-toys \\
        --plot docs/img/moons_defaults.png

A variant whose run folder already holds a checkpoint is not trained again (``--retrain``
forces it).
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import torch
from torch import Tensor

import difflab
from difflab.recipes import is_run, load_config
from difflab.recipes.image import data_splits

FAR = 0.5
DEFAULT_VARIANTS = {
    "eps": {"diffusion.prediction": "eps"},
    "preset": {},
}


def nearest(a: Tensor, b: Tensor, chunk: int = 4096) -> Tensor:
    """For each row of ``a``, the Euclidean distance to its nearest row of ``b``."""
    return torch.cat([torch.cdist(part, b).min(1).values for part in a.split(chunk)])


def chamfer(samples: Tensor, held_out: Tensor) -> tuple[float, float]:
    """``(samples -> held-out, held-out -> samples)`` mean nearest-neighbour distances (their
    sum is the Chamfer distance); non-finite samples count as infinitely far."""
    s = samples.double()
    ok = torch.isfinite(s).all(1)
    if not bool(ok.any()):
        return float("inf"), float("inf")
    to_data = nearest(s[ok], held_out.double())
    back = nearest(held_out.double(), s[ok])
    forward = float(to_data.mean()) if bool(ok.all()) else float("inf")
    return forward, float(back.mean())


def measure(samples: Tensor, held_out: Tensor) -> dict[str, float]:
    s = samples.double()
    ok = torch.isfinite(s).all(1)
    fwd, back = chamfer(s, held_out)
    far = nearest(s[ok], held_out.double()) > FAR if bool(ok.any()) else torch.ones(0)
    far_share = (float(far.sum()) + float((~ok).sum())) / len(s)
    return {
        "chamfer": fwd + back,
        "to_data": fwd,
        "coverage": back,
        "far": far_share,
        "absmax": float(s[ok].abs().max()) if bool(ok.any()) else float("inf"),
        "finite": float(ok.double().mean()),
    }


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    name, _, rest = text.partition("=")
    pairs = [p for p in rest.split(",") if p]
    return name, dict(p.split("=", 1) for p in pairs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", default="runs/bench-toys", help="folder of the variants' runs")
    ap.add_argument(
        "--variant",
        action="append",
        default=[],
        help="NAME=KEY=VALUE,KEY=VALUE (config overrides of the moons preset)",
    )
    ap.add_argument("--steps", type=int, default=None, help="train.steps (default: the preset's)")
    ap.add_argument("--n", type=int, default=2000, help="samples per row")
    ap.add_argument(
        "--samplers",
        default="ddim,dpmpp_2m,heun,heun@karras,euler,ddpm",
        help="comma list of SAMPLER or SAMPLER@GRID (default grid: the run's)",
    )
    ap.add_argument("--sample-steps", type=int, default=50)
    ap.add_argument("--seeds", type=int, default=3, help="sampling seeds averaged per row")
    ap.add_argument("--plot", default=None, help="write the scatter plot here (PNG)")
    ap.add_argument("--retrain", action="store_true")
    args = ap.parse_args()

    variants = dict(parse_variant(v) for v in args.variant) if args.variant else DEFAULT_VARIANTS
    _, cfg = load_config("moons")
    train, held_out = data_splits(cfg.data)
    held = held_out.x.double()
    gen = torch.Generator().manual_seed(0)
    ref_train = train.x[torch.randperm(len(train), generator=gen)[: args.n]]
    ref_noise = torch.randn(args.n, 2, generator=gen)
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs visible, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads; held-out points: "
          f"{len(held)}, samples per row: {args.n}, seeds per row: {args.seeds}\n")  # fmt: skip
    print(
        "| model | sampler | threshold | Chamfer | samples->held-out | held-out->samples "
        "| far (> 0.5) | abs max | finite |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")

    def row(model: str, sampler: str, threshold: str, ms: list[dict[str, float]]) -> None:
        m = {k: sum(d[k] for d in ms) / len(ms) for k in ms[0]}
        print(f"| {model} | {sampler} | {threshold} | {m['chamfer']:.3f} | {m['to_data']:.3f} | "
              f"{m['coverage']:.3f} | {m['far']:.1%} | {m['absmax']:.3g} | {m['finite']:.1%} |",
              flush=True)  # fmt: skip

    row("(train vs held-out)", "-", "-", [measure(ref_train, held)])
    row("(N(0, I) vs held-out)", "-", "-", [measure(ref_noise, held)])

    scatter: dict[str, Tensor] = {}
    for name, overrides in variants.items():
        out = Path(args.runs) / name
        keys = dict(overrides)
        if args.steps is not None:
            keys["train.steps"] = str(args.steps)
        if args.retrain or not is_run(out):
            start = time.perf_counter()
            result = difflab.train("moons", [f"{k}={v}" for k, v in keys.items()],
                                   out=str(out), progress=False)  # fmt: skip
            print(f"<!-- trained {name} ({keys}): {result.steps} steps in "
                  f"{time.perf_counter() - start:.0f} s -->", flush=True)  # fmt: skip
        run = difflab.load(out, "cpu")
        d = run.config.diffusion
        label = f"{name} ({d.prediction}, {d.schedule})"
        for spec in args.samplers.split(","):
            sampler, _, grid = spec.partition("@")
            # static: clip x_0 to [-1, 1], difflab 0.1's default for every kind of data
            clip = spec == "ddim" and d.prediction == "eps"
            thresholds = ["static", "none"] if clip else ["none"]
            for threshold in thresholds:
                ms = []
                for seed in range(args.seeds):
                    s = run.sample(args.n, sampler=sampler, steps=args.sample_steps,
                                   grid=grid or None, threshold=threshold,
                                   seed=seed).x.cpu()  # fmt: skip
                    ms.append(measure(s, held))
                    if spec == "ddim" and seed == 0:
                        scatter[f"{name}: {d.prediction}-prediction, threshold {threshold}"] = s
                row(label, spec, threshold, ms)
    if args.plot:
        plot(scatter, held.float(), args.plot, args.sample_steps)


def plot(scatter: dict[str, Tensor], held: Tensor, path: str, steps: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(scatter), figsize=(4.2 * len(scatter), 4.4), squeeze=False)
    for ax, (title, s) in zip(axes[0], scatter.items(), strict=True):
        m = measure(s, held.double())
        ok = torch.isfinite(s).all(1)
        ax.scatter(held[:, 0], held[:, 1], s=3, c="tab:blue", alpha=0.35, label="held-out")
        ax.scatter(s[ok, 0], s[ok, 1], s=3, c="tab:red", alpha=0.5, label="samples")
        outside = float((s.abs() > 3).any(1).double().mean())
        if outside > 0:
            ax.text(0.98, 0.98, f"{outside:.0%} of the samples\nlie outside this view",
                    transform=ax.transAxes, ha="right", va="top", fontsize=9,
                    color="tab:red")  # fmt: skip
        ax.set_xlim(-3, 3)
        ax.set_ylim(-3, 3)
        ax.set_aspect("equal")
        ax.set_title(f"{title}\nChamfer {m['chamfer']:.3f}, far {m['far']:.0%}, "
                     f"|x| max {m['absmax']:.3g}", fontsize=9)  # fmt: skip
        ax.legend(loc="lower left", fontsize=8, markerscale=3)
    fig.suptitle(f"moons: DDIM {steps} steps vs held-out points (axes clipped to +-3)",
                 fontsize=10)  # fmt: skip
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"\nplot: {path}")


if __name__ == "__main__":
    main()
