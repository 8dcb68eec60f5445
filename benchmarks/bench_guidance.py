"""Benchmark of guidance (issue 4): the fidelity/diversity trade-off and prompt adherence on digits.

1. Classifier-free guidance: a class-conditional digits model trained with conditioning dropout
   (``difflab train digits``) sampled with ``eps = (1 + w) eps_c - w eps_u`` for each ``w``.
2. Classifier guidance: the same model's unconditional branch (null label) steered by a noisy
   classifier ``p_phi(y | x_t, t)`` with ``eps = eps_u - s sigma grad log p_phi(y | x_t, t)``
   for each ``s`` (the classifier is trained first if its checkpoint does not exist).
3. Prompt adherence of the text-conditioned digits model (``recipes/text_to_digit``, trained
   first if its checkpoint does not exist): the share of samples whose measured digit,
   thickness and slant match the prompt, against the same samples judged by shuffled prompts.

For every scale the table gives the fidelity, the accuracy of the independent digits classifier
(``evaluate/digits_classifier``) on the samples against the asked label, and the diversity,
within-class spread ``sqrt(tr Cov)`` in pixels (averaged over classes) and improved
precision/recall against the held-out digits in the classifier's features (``k = 3``).

Usage::

    python benchmarks/bench_guidance.py --checkpoint runs/digits --out runs/bench-guidance \
        [--classifier runs/digits-classifier] [--text runs/text-to-digit]

writes ``guidance.md`` (tables) and ``guidance_tradeoff.png`` (plot) into ``--out`` and prints
the tables. A seconds-long smoke run: ``--n-per-class 2 --steps 3 --classifier-steps 5
--text-steps 5 --cfg-scales 0,2 --cg-scales 0,4 --text-scales 0,2``.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

import difflab
from difflab.data.images import digits_split
from difflab.evaluate.digits_classifier import load_digits_classifier
from difflab.evaluate.precision_recall import precision_recall, within_class_spread
from difflab.recipes import is_run
from difflab.recipes import text_to_digit as t2d

NUM_CLASSES = 10


def _scales(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def judge_samples(x: torch.Tensor, labels: torch.Tensor, judge, held_out) -> dict[str, float]:
    """Fidelity (classifier accuracy, precision) and diversity (spread, recall) of ``x``."""
    x = x.float().cpu().clamp(-1, 1)
    spread = within_class_spread(x, labels, NUM_CLASSES)
    pr = precision_recall(judge.features(held_out.x), judge.features(x))
    return {
        "accuracy": judge.accuracy(x, labels),
        "spread": float(spread[~spread.isnan()].mean()),
        "precision": pr.precision,
        "recall": pr.recall,
    }


def sweep(run, options, scales, labels, args, judge, held_out) -> list[dict]:
    """Samples of ``run`` with the guidance options ``options(scale)`` for every scale."""
    rows = []
    for scale in scales:
        start = time.perf_counter()
        x = run.sample(
            len(labels),
            sampler=args.sampler,
            steps=args.steps,
            label=labels,
            seed=args.seed,
            **options(scale),
        ).x
        seconds = time.perf_counter() - start
        rows.append(
            {
                "scale": scale,
                **judge_samples(x, labels, judge, held_out),
                "seconds": seconds,
                "samples": x,
            }
        )
    return rows


def classifier_for(run: difflab.Run, args) -> Path:
    """The noisy classifier run at ``--classifier``, trained there first if missing (with the
    config of the model it guides: its data and noise schedule), checked to fit ``run``."""
    path = Path(args.classifier or args.out / "classifier")
    if not is_run(path) and not path.is_file():
        print(f"training the noisy classifier ({args.classifier_steps} steps) into {path}")
        difflab.train(
            run.path if run.path.is_dir() else run.path.parent,  # the run folder: its config
            recipe="classifier",
            progress=False,
            out=str(path),
            steps=args.classifier_steps,
            ckpt_every=max(run.config.train.ckpt_every, args.classifier_steps),
        )
    clf = difflab.load(path, args.device)
    if clf.recipe.name != "classifier":
        raise SystemExit(f"{path} is a {clf.recipe.name} run, not a noisy classifier")
    if clf.model.schedule.config() != run.model.denoiser.schedule.config():
        raise SystemExit(f"the classifier in {path} was trained on another noise schedule")
    return path


def text_model_for(args) -> difflab.Run:
    """Load the text-to-digit run at ``--text``, training it there first if missing."""
    path = Path(args.text or args.out / "text-to-digit")
    if not is_run(path) and not path.is_file():
        print(f"training the text-to-digit model ({args.text_steps} steps) into {path}")
        difflab.train(
            "digits",
            recipe="text-to-digit",
            progress=False,
            out=str(path),
            steps=args.text_steps,
            ckpt_every=max(500, args.text_steps),
        )
    run = difflab.load(path, args.device)
    if run.recipe.name != "text-to-digit":
        raise SystemExit(f"{path} is a {run.recipe.name} run, not a text-to-digit model")
    return run


def adherence_rows(run: difflab.Run, scales, args, judge) -> list[dict]:
    """Adherence to prompts naming a digit, a thickness and a slant (40 prompts), and to the
    same prompts shuffled (the chance level of the measurement)."""
    prompts = [
        t2d.caption(d, thickness, slant)
        for d in range(NUM_CLASSES)
        for thickness in (-1, 1)
        for slant in (-1, 1)
    ]
    prompts = prompts * args.prompt_repeats
    shuffled = [
        prompts[i]
        for i in torch.randperm(
            len(prompts), generator=torch.Generator().manual_seed(args.seed)
        ).tolist()
    ]
    rows = []
    for scale in scales:
        x = (
            run.sample(
                len(prompts),
                prompt=prompts,
                guidance=scale,
                sampler=args.sampler,
                steps=args.steps,
                seed=args.seed,
            )
            .x.float()
            .cpu()
        )
        for name, asked in (("prompts", prompts), ("shuffled prompts", shuffled)):
            a = t2d.prompt_adherence(x, asked, run.model.thresholds, judge.predict)
            rows.append(
                {
                    "scale": scale,
                    "judged by": name,
                    "digit": a.digit,
                    "thickness": a.thickness,
                    "slant": a.slant,
                    "all": a.all,
                }
            )
    return rows


def plot(cfg_rows, cg_rows, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for rows, name, marker in (
        (cfg_rows, "classifier-free (w)", "o"),
        (cg_rows, "classifier (s)", "s"),
    ):
        if not rows:
            continue
        acc = [r["accuracy"] for r in rows]
        axes[0].plot([r["spread"] for r in rows], acc, marker=marker, label=name)
        axes[1].plot(
            [r["recall"] for r in rows], [r["precision"] for r in rows], marker=marker, label=name
        )
        for r in rows:
            axes[0].annotate(f"{r['scale']:g}", (r["spread"], r["accuracy"]), fontsize=8)
            axes[1].annotate(f"{r['scale']:g}", (r["recall"], r["precision"]), fontsize=8)
    axes[0].set(
        xlabel="within-class spread (pixels)",
        ylabel="classifier accuracy",
        title="fidelity vs diversity",
    )
    axes[1].set(
        xlabel="recall (diversity)",
        ylabel="precision (fidelity)",
        title="improved precision / recall",
    )
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def table(rows: list[dict], columns: list[str]) -> str:
    def cell(v) -> str:
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    head = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns)
    body = ["| " + " | ".join(cell(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join([head, *body])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--checkpoint",
        type=Path,
        required=True,
        help="class-conditional digits run (difflab train digits)",
    )
    parser.add_argument("--out", type=Path, default=Path("runs/bench-guidance"))
    parser.add_argument("--classifier", type=Path, help="noisy classifier run (trained if missing)")
    parser.add_argument("--classifier-steps", type=int, default=2000)
    parser.add_argument("--text", type=Path, help="text-to-digit run (trained if missing)")
    parser.add_argument("--text-steps", type=int, default=4000)
    parser.add_argument("--skip-text", action="store_true", help="no prompt-adherence section")
    parser.add_argument("--cfg-scales", default="0,0.5,1,2,3,5,8")
    parser.add_argument("--cg-scales", default="0,1,2,5,10,20")
    parser.add_argument("--text-scales", default="0,1,2,4")
    parser.add_argument("--n-per-class", type=int, default=36, help="36: as many as held out")
    parser.add_argument("--prompt-repeats", type=int, default=5, help="samples per prompt")
    parser.add_argument("--sampler", default="ddim")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    run = difflab.load(args.checkpoint, args.device)
    if run.recipe.name != "image" or run.model.num_classes != NUM_CLASSES:
        raise SystemExit(f"{args.checkpoint} is not a class-conditional digits model")
    judge = load_digits_classifier()
    _, held_out = digits_split()
    labels = torch.arange(NUM_CLASSES).repeat_interleave(args.n_per_class)
    real = judge_samples(held_out.x, held_out.labels, judge, held_out)

    def cfg_options(w: float) -> dict:
        return {"guidance": w}

    cfg_rows = sweep(run, cfg_options, _scales(args.cfg_scales), labels, args, judge, held_out)
    clf = classifier_for(run, args)

    def cg_options(s: float) -> dict:
        return {"classifier": clf, "classifier_scale": s}

    cg_rows = sweep(run, cg_options, _scales(args.cg_scales), labels, args, judge, held_out)
    columns = ["scale", "accuracy", "spread", "precision", "recall", "seconds"]
    args.out.mkdir(parents=True, exist_ok=True)
    lines = [
        f"# Guidance on digits ({run.step} training steps, {args.sampler} {args.steps} steps, "
        f"{len(labels)} samples per scale)",
        f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch "
        f"{torch.__version__}",
        f"held-out digits themselves: accuracy {real['accuracy']:.3f}, spread {real['spread']:.3f}",
        "\n## Classifier-free guidance, eps = (1 + w) eps_c - w eps_u (scale = w)\n",
        table(cfg_rows, columns),
        "\n## Classifier guidance, eps = eps_u - s sigma grad log p(y | x_t, t) (scale = s)\n",
        table(cg_rows, columns),
    ]
    from difflab.viz.images import save_grid

    for name, rows in (("cfg", cfg_rows), ("cg", cg_rows)):
        for r in rows:
            save_grid(r["samples"], args.out / f"{name}_{r['scale']:g}.png", nrow=args.n_per_class)
    if not args.skip_text:
        text_model = text_model_for(args)
        text_rows = adherence_rows(text_model, _scales(args.text_scales), args, judge)
        lines += [
            f"\n## Prompt adherence of the text-conditioned model ({text_model.step} steps; "
            "classifier-free guidance with the empty caption, scale = w)\n",
            table(text_rows, ["scale", "judged by", "digit", "thickness", "slant", "all"]),
        ]
    figure = plot(cfg_rows, cg_rows, args.out / "guidance_tradeoff.png")
    report = "\n".join(lines) + f"\n\n![trade-off]({figure.name})\n"
    (args.out / "guidance.md").write_text(report)
    print(report)
    print(f"written: {args.out / 'guidance.md'}, {figure}")


if __name__ == "__main__":
    main()
