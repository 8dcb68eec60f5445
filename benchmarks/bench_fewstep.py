"""Few-step generation on a digits or glyphs model (issue 14): quality at 1, 2, 4 and 8 network
calls.

Rows (class-conditional samples, ``--n-per-class`` of each class, seed 0):

- DPM-Solver++(2M) on the teacher, no training;
- progressive distillation of the teacher (``difflab distill TEACHER --to-steps 1``): the
  student of each halving at its own step count (8, 4, 2, 1);
- rectified flow: a flow trained like the teacher, for as many steps (``--recipe flow``),
  sampled by Euler; then
  one reflow (``--method reflow``), Euler; then the reflowed flow distilled progressively;
- consistency distillation of the teacher (``--method consistency``, ``--cd-steps`` training
  steps), sampled in 1 step and by multistep consistency sampling in 2, 4 and 8;
- consistency training (``difflab train digits --recipe consistency``, no teacher, for
  ``--ct-steps`` steps or ``--ct-minutes``), sampled likewise; with ``--ct-init`` it starts from
  the teacher's weights (``consistency.init``: consistency tuning, the teacher's network and
  parameterization, still no teacher ODE), so its budget is the teacher's training plus its own.

Each row: the Frechet distance to the teacher's DDIM 50-step samples (same labels, same seed) in
the features of the data's judge (:mod:`difflab.evaluate.judged`: 64-d for digits, 128-d for
glyphs) and in pixels, the judge's accuracy on the samples' labels (the digit, the character),
and the Frechet distance to the training data themselves (all 1,797 digits, all 50,000
training glyphs; judge features: the issue's targets compare it with the teacher's own at DDIM 50
steps); and the wall-clock time its training took on this machine. A deterministic sampler
started from the reference's noise follows the teacher's own trajectories, so its distance to
the reference can fall below that of any independent draw; the row "teacher, DDIM 50 steps,
another seed" measures that floor for stochastic samplers (multistep consistency sampling
re-noises).

``--guidance W`` measures guided distillation: the reference, the floor and DPM-Solver++ are
sampled with classifier-free guidance ``W``, and the distillations fix ``W`` in the student
(``difflab distill --guidance W``); only the two distillation rows apply then.

Usage::

    python benchmarks/bench_fewstep.py --teacher runs/demo [--work runs/bench-fewstep]
        [--n-per-class 100] [--train-steps 300] [--reflow-steps 1000] [--flow-steps N]
        [--cd-steps 1000] [--ct-steps 1000] [--ct-minutes 0] [--ct-init] [--ct-overrides K=V,...]
        [--rows progressive,flow,...]
        [--guidance 0] [--batch-size B] [--pairs P] [--pair-steps S] [--overrides K=V,...]

``--teacher`` is a digits or glyphs run of the image recipe (the ``make demo`` checkpoint, or
``difflab train digits``); the flow and the consistency-training model are trained with the
preset of the teacher's data (``digits``, ``glyphs``) and ``--overrides`` (the teacher's own
changes to that preset, e.g. ``model.unet.channels=32``), the flow for ``--flow-steps``
(default: as many as the teacher had). ``--batch-size`` is every distillation's (default: the
teacher's); ``--pairs`` and ``--pair-steps`` are reflow's (default: 4 pairs per training image,
by the flow's own number of sampling steps). ``--ct-overrides`` are the consistency-training
run's own (e.g. ``train.lr=2e-4,train.ema=0.99`` for a short tuning).
The students are written under ``--work`` (re-using those already there; a re-used one's
time is printed as 0). ``--rows`` picks the method rows (``progressive``, ``flow``,
``consistency-distillation``, ``consistency-training``; default all); the DPM-Solver++(2M) row
is always measured. Prints a markdown table for docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

import difflab
from difflab.data.images import load_dataset
from difflab.evaluate import judged
from difflab.evaluate.frechet import frechet_distance_from_samples
from difflab.recipes import is_run
from difflab.recipes.consistency import init_overrides
from difflab.recipes.distill import distill

CALLS = (1, 2, 4, 8)
ROWS = ("progressive", "flow", "consistency-distillation", "consistency-training")


def _timed_distill(run: Path, out: Path, **options) -> float:
    """Distil unless ``out`` already holds the students; returns the seconds it took (0 when
    re-used)."""
    if out.exists():
        return 0.0
    start = time.perf_counter()
    distill(run, out=out, progress=False, **options)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--teacher", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path("runs/bench-fewstep"))
    parser.add_argument("--n-per-class", type=int, default=100)
    parser.add_argument("--train-steps", type=int, default=300, help="per halving")
    parser.add_argument("--reflow-steps", type=int, default=1000)
    parser.add_argument("--flow-steps", type=int, default=0, help="0: the teacher's")
    parser.add_argument("--cd-steps", type=int, default=1000)
    parser.add_argument("--ct-steps", type=int, default=1000)
    parser.add_argument("--ct-minutes", type=float, default=0.0, help="0: no limit")
    parser.add_argument("--ct-init", action="store_true", help="start from the teacher's weights")
    parser.add_argument("--ct-overrides", default="", help="comma list of its key=value")
    parser.add_argument("--rows", default=",".join(ROWS), help="comma list of " + ", ".join(ROWS))
    parser.add_argument("--guidance", type=float, default=0.0)
    parser.add_argument("--batch-size", type=int, default=None, help="default: the teacher's")
    parser.add_argument("--pairs", type=int, default=None, help="reflow's; default 4 per image")
    parser.add_argument("--pair-steps", type=int, default=None, help="reflow's Euler steps")
    parser.add_argument("--overrides", default="", help="comma list of the teacher's key=value")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    rows = args.rows.split(",")
    if unknown := set(rows) - set(ROWS):
        parser.error(f"unknown rows {', '.join(sorted(unknown))}: choose from {', '.join(ROWS)}")
    if args.guidance and (unguided := set(rows) - {"progressive", "consistency-distillation"}):
        parser.error(f"--guidance applies to the distillation rows only, not {', '.join(unguided)}")
    args.overrides = [o for o in args.overrides.split(",") if o]
    ct_overrides = [o for o in args.ct_overrides.split(",") if o]
    if (args.ct_init or ct_overrides) and "consistency-training" not in rows:
        parser.error("--ct-init and --ct-overrides apply to the consistency-training row only")
    teacher = difflab.load(args.teacher, args.device)
    data = args.data = teacher.config.data.name
    labels = torch.arange(teacher.model.num_classes).repeat_interleave(args.n_per_class)

    def draw(run, seed: int = 0, **options) -> torch.Tensor:
        return run.sample(len(labels), label=labels, seed=seed, **options).x.clamp(-1, 1).cpu()

    def draw_teacher(seed: int = 0, **options) -> torch.Tensor:
        return draw(teacher, seed, guidance=args.guidance, **options)

    reference = draw_teacher(sampler="ddim", steps=50)
    ref_features, _ = judged.read(data, reference)
    data_features, _ = judged.read(data, load_dataset(data).x)

    def row(x: torch.Tensor) -> str:
        features, classes = judged.read(data, x)
        to_reference = frechet_distance_from_samples(features, ref_features)
        pixels = frechet_distance_from_samples(x.flatten(1), reference.flatten(1))
        accuracy = float((classes == labels).double().mean())
        to_data = frechet_distance_from_samples(features, data_features)
        return f"{to_reference:.2f} / {pixels:.2f} / {100 * accuracy:.0f}% / {to_data:.2f}"

    lines = [
        f"Teacher {args.teacher}, guidance {args.guidance}: DDIM 50 steps is the reference "
        f"({row(reference)} on itself). "
        "Cells: FD features / FD pixels to the reference / accuracy / FD features to the data.",
        "",
        "| method | 1 call | 2 calls | 4 calls | 8 calls | training time |",
        "|---|---|---|---|---|---|",
    ]
    floor = row(draw_teacher(seed=1, sampler="ddim", steps=50))
    lines.append(f"| teacher, DDIM 50 steps, another seed | {floor} (50 calls) | | | | 0 |")
    cells = [row(draw_teacher(sampler="dpmpp_2m", steps=k)) for k in CALLS]
    lines.append(f"| DPM-Solver++(2M) on the teacher | {' | '.join(cells)} | 0 |")

    work = args.work
    if "progressive" in rows:
        lines.append(_progressive_row(args, draw, row))
    if "flow" in rows:
        lines += _flow_rows(args, draw, row)
    if "consistency-distillation" in rows:
        cd = work / "consistency-distillation"
        seconds = _timed_distill(args.teacher, cd, method="consistency", train_steps=args.cd_steps,
                                 guidance=args.guidance, batch_size=args.batch_size)  # fmt: skip
        student = difflab.load(cd / "consistency", args.device)
        cells = [row(draw(student, steps=k)) for k in CALLS]
        lines.append(f"| consistency distillation ({args.cd_steps} steps) | {' | '.join(cells)} "
                     f"| {seconds:.0f} s |")  # fmt: skip
    if "consistency-training" in rows:
        ct = work / "consistency-training"
        start = time.perf_counter()
        if args.ct_init:
            ct_overrides = [f"consistency.init={args.teacher}",
                            *init_overrides(teacher.config), *ct_overrides]  # fmt: skip
        if not is_run(ct):
            difflab.train(data, [*args.overrides, *ct_overrides, f"train.out={ct}",
                                 f"train.steps={args.ct_steps}",
                                 f"train.max_minutes={args.ct_minutes}"],
                          recipe="consistency", progress=False)  # fmt: skip
        seconds = time.perf_counter() - start
        trained = difflab.load(ct, args.device)
        cells = [row(draw(trained, steps=k)) for k in CALLS]
        start_from = "from the teacher's weights" if args.ct_init else "no teacher"
        lines.append(f"| consistency training ({trained.step} steps, {start_from}) | "
                     f"{' | '.join(cells)} | {seconds:.0f} s |")  # fmt: skip
    print("\n".join(lines))
    print(f"\n{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")


def _progressive_row(args, draw, row) -> str:
    pd = args.work / "progressive"
    seconds = _timed_distill(args.teacher, pd, method="progressive", to_steps=1, from_steps=16,
                             train_steps=args.train_steps, guidance=args.guidance,
                             batch_size=args.batch_size)  # fmt: skip
    cells = [row(draw(difflab.load(pd / f"steps-{k}", args.device))) for k in CALLS]
    return f"| progressive distillation (16 -> 1) | {' | '.join(cells)} | {seconds:.0f} s |"


def _flow_rows(args, draw, row) -> list[str]:
    work, lines = args.work, []
    flow = work / "flow"
    start = time.perf_counter()
    if not is_run(flow):
        steps = args.flow_steps or difflab.load(args.teacher).step
        difflab.train(args.data, [*args.overrides, f"train.out={flow}", f"train.steps={steps}"],
                      recipe="flow", progress=False)  # fmt: skip
    flow_seconds = time.perf_counter() - start
    flow_run = difflab.load(flow, args.device)
    cells = [row(draw(flow_run, sampler="euler", steps=k)) for k in CALLS]
    lines.append(f"| rectified flow ({flow_run.step} steps), Euler | {' | '.join(cells)} "
                 f"| {flow_seconds:.0f} s |")  # fmt: skip
    reflow_dir = work / "reflow"
    seconds = _timed_distill(flow, reflow_dir, method="reflow", train_steps=args.reflow_steps,
                             batch_size=args.batch_size, pairs=args.pairs,
                             pair_steps=args.pair_steps)  # fmt: skip
    reflowed = difflab.load(reflow_dir / "reflow-1", args.device)
    cells = [row(draw(reflowed, sampler="euler", steps=k)) for k in CALLS]
    lines.append(f"| + reflow, Euler | {' | '.join(cells)} | {seconds:.0f} s |")
    rpd = work / "reflow-progressive"
    seconds = _timed_distill(reflow_dir / "reflow-1", rpd, method="progressive", to_steps=1,
                             from_steps=16, train_steps=args.train_steps,
                             batch_size=args.batch_size)  # fmt: skip
    cells = [row(draw(difflab.load(rpd / f"steps-{k}", args.device))) for k in CALLS]
    lines.append(
        f"| + progressive distillation (16 -> 1) | {' | '.join(cells)} | {seconds:.0f} s |"
    )
    return lines


if __name__ == "__main__":
    main()
