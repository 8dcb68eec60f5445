"""Benchmark of continuous diffusion for text (issue 16) against MDLM and the AR baseline.

1. Language modelling: Diffusion-LM (with and without self-conditioning: two trainings),
   latent-text, MDLM and AR, the same transformer width and depth, each trained for the same
   CPU time of this process (``--cpu-minutes``; latent-text: its autoencoder stage of
   ``--ae-steps`` steps and its diffusion stage together) on the built-in Shakespeare
   (characters), stopping at ``--curve`` equal shares of that CPU time, the steps of each
   segment from the model's measured CPU cost per step (:func:`trained_in_segments`: CPU time,
   not wall clock, so that a shared machine's load does not decide the steps). After each
   segment: held out, the NELBO of MDLM (a bound) and the exact NLL of AR; Diffusion-LM has no
   bound here (its loss terms are given instead), latent-text neither (its held-out latent loss
   and its autoencoder's reconstruction of the held-out rows, exact rows and tokens); and
   ``--n`` passages of the context from each
   sampling row: Diffusion-LM with and without clamping (a sampling switch: the same trained
   model, two rows), latent-text, MDLM and AR. Once all are trained: generative perplexity under
   the final AR model, unigram entropy, distinct-2/3, and for Diffusion-LM the in-vocabulary rate
   before rounding: the share of final vectors ``x_0,i`` within half the distance from their
   nearest embedding to that embedding's nearest other embedding (unambiguously one word). The
   table at the end of the budget, the curve at every point (``OUT/ctext_curve.png``, ``.json``).
2. DiffuSeq on the task ``unshuffle`` (restore a line from its shuffled words) against an AR
   model of the same size trained for the same wall-clock time (``--minutes``) on the same rows
   (loss on the target half, decoded greedily after the source half): corpus chrF of
   ``--task-rows`` held-out lines, DiffuSeq with one sample and with minimum Bayes risk over 4;
   copying the source is the floor.

Usage: ``OMP_NUM_THREADS=1 python benchmarks/bench_ctext.py --cpu-minutes 3 --curve 3
[--out runs/bench-ctext]`` (part 1: about ``5 x cpu-minutes`` of CPU time for training plus
evaluation and sampling at each point of the curve; ``--out`` must not hold part 1's runs);
prints markdown for docs/BENCHMARKS.md and writes it to ``OUT/bench_ctext.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from difflab.data.text import BOS_ID, EOS_ID, PAD_ID
from difflab.discrete.autoregressive import autoregressive_sample
from difflab.discrete.samplers import truncate_at_eos
from difflab.evaluate.text_metrics import (
    distinct_n,
    generative_perplexity,
    unigram_entropy,
    valid_token_mask,
)
from difflab.gaussian.embedding import nearest_embedding
from difflab.recipes import load_config
from difflab.recipes.text import RECIPE, latent_text
from difflab.recipes.text.continuous import (
    corpus_chrf,
    sample_rows,
    task_rows,
    translate,
    translate_mbr,
)
from difflab.recipes.text.sample import generate_tokens
from difflab.recipes.text.train import (
    TOKENIZER_FILE,
    build_tokenizer,
    count_parameters,
    load_splits,
    make_loss,
    run_metadata,
    save_tokenizer,
)
from difflab.train.trainer import Trainer

#: name -> the overrides of each language model of part 1.
LM_RUNS = {
    "diffusion-lm": ["diffusion.kind=diffusion-lm"],
    "diffusion-lm + self-cond": ["diffusion.kind=diffusion-lm", "diffusion.self_condition=true"],
    "latent-text": ["diffusion.kind=latent-text"],
    "mdlm": ["diffusion.kind=mdlm", "model.time_conditioning=true"],  # adaLN as the others
    "ar": ["diffusion.kind=ar"],
}


def config(args: argparse.Namespace, out: Path, length: int, *overrides: str, steps=None):
    """The run's config: ``steps`` steps when given, else ``--minutes`` of wall clock."""
    budget = [f"train.steps={steps}", "train.max_minutes=0"] if steps else [
        f"train.max_minutes={args.minutes}", "train.steps=1000000"]  # fmt: skip
    _, cfg = load_config(args.preset, [
        f"train.out={out}", *budget, "train.lr_schedule=constant",
        f"train.batch_size={args.batch_size}", f"data.length={length}",
        f"model.width={args.width}", f"model.depth={args.depth}",
        f"model.num_heads={args.heads}", "train.device=cpu", *overrides, *args.set,
    ], recipe=RECIPE.name)  # fmt: skip
    return cfg


def train(cfg) -> float:
    if (Path(cfg.train.out) / "checkpoint.safetensors").exists():
        return float("nan")  # reused (--out kept from an earlier run)
    return RECIPE.train(cfg, progress=False).seconds


def cpu_seconds_of(cfg, resume: bool) -> float:
    """Train ``cfg`` (from scratch or continuing its run): the CPU seconds of this process."""
    start = time.process_time()
    RECIPE.train(cfg, resume=resume, progress=False)
    return time.process_time() - start


def trained_in_segments(args: argparse.Namespace, run: Path, overrides: list[str], at_point):
    """Train one language model for ``--cpu-minutes`` of CPU time of this process, stopping
    within 2% of that budget ``B`` of each of ``--curve`` equal shares ``k B / K`` to call
    ``at_point(model, step, CPU seconds)``. CPU time, not wall clock, so that a shared
    machine's load does not decide the steps; evaluation at the points is not counted.

    First ``c = --calibrate`` steps from scratch (setup and, for latent-text, its whole
    autoencoder stage), then ``c`` more, resumed. A resumed segment of ``n`` steps is taken to
    cost ``o + r n`` CPU seconds (``o``: its setup, e.g. latent-text encoding its rows), ``o``
    and ``r`` fitted by least squares to the resumed segments so far; each next segment has
    ``(k B / K - spent - o) / r`` steps, and is followed by another while the point is still
    more than ``B / 50`` away."""
    if (run / "checkpoint.safetensors").exists():
        raise SystemExit(f"bench_ctext.py: {run} already holds a run: choose another --out")
    budget, step = args.cpu_minutes * 60, args.calibrate
    spent = cpu_seconds_of(config(args, run, args.length, *overrides, steps=step), resume=False)
    seconds = cpu_seconds_of(config(args, run, args.length, *overrides, steps=2 * step), True)
    costs = [(step, seconds)]
    spent, step = spent + seconds, 2 * step
    for k in range(1, args.curve + 1):
        target = budget * k / args.curve
        while target - spent > budget / 50:
            setup, per_step = segment_cost(costs)
            more = max(1, round((target - spent - setup) / per_step))
            cfg = config(args, run, args.length, *overrides, steps=step + more)
            seconds = cpu_seconds_of(cfg, resume=True)
            costs.append((more, seconds))
            spent, step = spent + seconds, step + more
        model = RECIPE.load(run, "cpu")
        print(f"{run.name}: step {model.step}, {spent:.0f} CPU s", file=sys.stderr)
        at_point(model, model.step, spent)
    return model


def segment_cost(costs: list[tuple[int, float]]) -> tuple[float, float]:
    """``(o, r)`` of the line ``seconds = o + r steps`` fitted by least squares to ``costs``
    (``o >= 0``, ``r > 0``); with one segment length only, ``o = 0``."""
    steps = torch.tensor([n for n, _ in costs], dtype=torch.float64)
    seconds = torch.tensor([s for _, s in costs], dtype=torch.float64)
    spread = ((steps - steps.mean()) ** 2).sum()
    if spread > 0:
        rate = float(((steps - steps.mean()) * (seconds - seconds.mean())).sum() / spread)
        setup = float(seconds.mean()) - rate * float(steps.mean())
        if rate > 0 and setup >= 0:
            return setup, rate
    return 0.0, float(seconds.sum() / steps.sum())


def in_vocabulary(x0: torch.Tensor, embeddings: torch.Tensor) -> float:
    """The share of vectors of ``x0`` nearer to their nearest embedding than half its distance
    to the nearest other embedding."""
    gaps = torch.cdist(embeddings, embeddings)
    gaps.fill_diagonal_(float("inf"))
    ids = nearest_embedding(x0, embeddings)
    distance = (x0 - embeddings[ids]).norm(dim=-1)
    return float((distance < gaps.min(1).values[ids] / 2).float().mean())


def quality(tokens: torch.Tensor, ar) -> dict[str, float]:
    mask = valid_token_mask(tokens, EOS_ID, PAD_ID)
    return {
        "gen_ppl": generative_perplexity(lambda x: ar.net(x), tokens, mask, BOS_ID),
        "entropy": unigram_entropy(tokens, mask),
        "distinct2": distinct_n(tokens, 2, mask),
        "distinct3": distinct_n(tokens, 3, mask),
    }


def held_out(model, args: argparse.Namespace) -> tuple[str, float | None]:
    """The held-out column and the bound (nats per token) where one exists."""
    metrics = RECIPE.evaluate(model, n=args.eval_rows, seed=0, progress=False).metrics
    if "reconstruction_exact" in metrics:
        return (f"latent loss {metrics['latent_loss']:.3f}; autoencoder: "
                f"{metrics['reconstruction_exact']:.3f} of rows, "
                f"{metrics['reconstruction_accuracy']:.3f} of tokens exact; "
                "no bound"), None  # fmt: skip
    if metrics["bound"] is False and "rounding" in metrics:
        return (f"loss {metrics['loss']:.3f} (x0 {metrics['x0_mse']:.3f}, emb "
                f"{metrics['embedding']:.3f}, round {metrics['rounding']:.3f}); "
                "no bound"), None  # fmt: skip
    bound = "<= " if metrics["bound"] else ""
    return (
        f"{bound}{metrics['nats_per_token']:.3f} nats/token, {bound}"
        f"{metrics['bits_per_character']:.3f} bits/char"
    ), metrics["nats_per_token"]


def generations(name: str, model, args: argparse.Namespace) -> list[dict]:
    """Each sampling row of one model: its label, tokens, seconds and in-vocabulary rate."""
    rows = []
    if model.kind == "diffusion-lm":
        for clamp in (True, False):
            start = time.perf_counter()
            tokens, x0 = sample_rows(model, args.n, steps=args.steps, sampler="ddim",
                                     clamp=clamp, seed=0)  # fmt: skip
            took = time.perf_counter() - start
            rate = in_vocabulary(x0, model.net.embed.weight.detach())
            rows.append({"row": f"{name}, clamp {'on' if clamp else 'off'}", "sampling": "ddim",
                         "tokens": tokens, "s": took, "in_vocab": rate})  # fmt: skip
        return rows
    start = time.perf_counter()
    if model.kind == latent_text.KIND:
        tokens, how = latent_text.sample_tokens(model, args.n, steps=args.steps, sampler="ddim",
                                                seed=0), "ddim, self-cond"  # fmt: skip
    elif model.kind == "ar":
        tokens = generate_tokens(model, args.n, length=args.length, seed=0).tokens
        how = "key/value cache"
    else:
        tokens = generate_tokens(model, args.n, length=args.length, seed=0, steps=args.steps,
                                 sampler="cached").tokens  # fmt: skip
        how = "cached ancestral"
    took = time.perf_counter() - start
    return [{"row": name, "sampling": how, "tokens": tokens, "s": took, "in_vocab": None}]


def language_models(args: argparse.Namespace) -> list[str]:
    """Part 1: every model trained for the same CPU time in ``--curve`` segments; the table at
    the end of the budget, the curve at each segment (generative perplexity under the final AR
    model, so the AR model's own early samples are judged by its final self)."""
    curve, final, counts = [], {}, {}
    for name, overrides in LM_RUNS.items():
        if name not in args.models and name != "ar":  # the AR model judges the others
            continue
        if name == "latent-text":
            overrides = [*overrides, f"latent_text.ae_steps={args.ae_steps}"]

        def at_point(model, step, spent, name=name):
            text, bound = held_out(model, args)
            rows = generations(name, model, args)
            curve.extend({"model": name, "step": step, "cpu_s": spent, "bound": bound, **r}
                         for r in rows)  # fmt: skip
            final[name] = (step, spent, text)

        model = trained_in_segments(args, args.out / name.replace(" + ", "-"), overrides, at_point)
        counts[name] = count_parameters(model.net)
        if model.kind == latent_text.KIND:  # the denoiser trained here, the autoencoder frozen
            counts[name] = (count_parameters(model.net.denoiser),
                            count_parameters(model.net.autoencoder))  # fmt: skip
    ar = RECIPE.load(args.out / "ar", "cpu")
    for point in curve:
        point.update(quality(point["tokens"], ar))
    held, _ = truncate_at_eos(task_free_rows(ar, args), EOS_ID, PAD_ID)
    reference = quality(held, ar)
    write_curve(args, curve, reference["gen_ppl"])
    lines = [
        "| model | parameters | steps | CPU s | held-out |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, (step, spent, text) in final.items():
        count = counts[name]
        if isinstance(count, tuple):
            count = f"{count[0]:,} (+ {count[1]:,} frozen autoencoder)"
        else:
            count = f"{count:,}"
        lines.append(f"| {name} | {count} | {step} | {spent:.0f} | {text} |")
    lines += [
        "",
        f"Generation of {args.n} passages of {args.length} characters at the end of the budget "
        f"({args.steps} steps for the diffusion models; AR: its key/value cache):",
        "",
        "| model | sampling | s | gen. perplexity (AR) | unigram entropy | distinct-2 | "
        "distinct-3 | in-vocabulary before rounding |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    last = {p["model"]: p["step"] for p in curve}
    for p in curve:
        if p["step"] == last[p["model"]]:
            lines.append(quality_row(p))
    lines.append(quality_row({"row": "held-out text", "sampling": "-", "s": None,
                              "in_vocab": None, **reference}))  # fmt: skip
    lines += [
        "",
        f"The curve: generative perplexity (AR) and the bound where one exists at "
        f"{args.curve} equal shares of each model's CPU time:",
        "",
        "| model | step | CPU s | bound (nats/token) | gen. perplexity (AR) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for p in curve:
        bound = "-" if p["bound"] is None else f"{p['bound']:.3f}"
        lines.append(f"| {p['row']} | {p['step']} | {p['cpu_s']:.0f} | {bound} "
                     f"| {p['gen_ppl']:.2f} |")  # fmt: skip
    return lines


def quality_row(p: dict) -> str:
    seconds = "-" if p["s"] is None else f"{p['s']:.1f}"
    rate = "-" if p["in_vocab"] is None else f"{p['in_vocab']:.3f}"
    return (
        f"| {p['row']} | {p['sampling']} | {seconds} | {p['gen_ppl']:.2f} | "
        f"{p['entropy']:.3f} | {p['distinct2']:.3f} | {p['distinct3']:.3f} | {rate} |"
    )


def write_curve(args: argparse.Namespace, curve: list[dict], reference: float) -> None:
    """``OUT/ctext_curve.json`` and ``OUT/ctext_curve.png``: generative perplexity and the bound
    against CPU seconds of training, one line per sampling row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [{k: v for k, v in p.items() if k != "tokens"} for p in curve]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ctext_curve.json").write_text(json.dumps(points, indent=1))
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for row in dict.fromkeys(p["row"] for p in points):
        line = [p for p in points if p["row"] == row]
        left.plot([p["cpu_s"] for p in line], [p["gen_ppl"] for p in line], "o-", label=row)
    left.axhline(reference, color="gray", ls="--", label="held-out text")
    left.set(xlabel="CPU seconds of training", ylabel="generative perplexity (AR judge)",
             yscale="log", title="samples")  # fmt: skip
    left.legend(fontsize=7)
    for model in dict.fromkeys(p["model"] for p in points if p["bound"] is not None):
        line = [p for p in points if p["model"] == model]
        right.plot([p["cpu_s"] for p in line], [p["bound"] for p in line], "o-", label=model)
    right.set(xlabel="CPU seconds of training", ylabel="held-out nats/token",
              title="bound (MDLM) and exact NLL (AR)")  # fmt: skip
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out / "ctext_curve.png", dpi=110)
    plt.close(fig)


def task_free_rows(model, args: argparse.Namespace) -> torch.Tensor:
    """``args.n`` held-out rows of the context, the reference for the quality columns."""
    from difflab.recipes.text.evaluate import held_out_rows

    tokens = held_out_rows(model)[0]
    return tokens[torch.linspace(0, len(tokens) - 1, args.n).round().long()]


def ar_task_model(args: argparse.Namespace, run: Path):
    """An AR model of the same size trained on the task rows (loss on the target half)."""
    cfg = config(args, run, args.task_length, "diffusion.kind=ar")
    if not (run / "checkpoint.safetensors").exists():
        train_split, _, _ = load_splits(cfg.data)
        tokenizer = build_tokenizer(cfg.data, train_split.documents)
        task = task_rows(train_split.documents, tokenizer, args.task_length)
        meta = run_metadata(cfg, tokenizer, None)
        torch.manual_seed(cfg.train.seed)
        net = RECIPE.build(cfg, meta)
        loss = make_loss(cfg, None, None)
        result = Trainer(net, loss, (task.tokens, task.noise_mask), cfg.train, meta, run).fit(
            progress=False
        )
        save_tokenizer(tokenizer, run / TOKENIZER_FILE)
        return RECIPE.load(run, "cpu"), result.seconds
    return RECIPE.load(run, "cpu"), float("nan")


def ar_translate(model, tokens: torch.Tensor, half: int) -> list[str]:
    """Greedy AR targets after each row's source half."""
    out = autoregressive_sample(
        model.net, (len(tokens), tokens.shape[1]), context_length=model.context,
        block_length=model.context, prompt=tokens[:, :half], bos_id=BOS_ID, temperature=0.0,
    ).tokens  # fmt: skip
    targets, _ = truncate_at_eos(out[:, half:], EOS_ID, PAD_ID)
    return [model.tokenizer.decode(row) for row in targets]


def seq2seq(args: argparse.Namespace) -> list[str]:
    seq_run = args.out / "diffuseq"
    seq_seconds = train(config(args, seq_run, args.task_length, "diffusion.kind=diffuseq"))
    seq = RECIPE.load(seq_run, "cpu")
    ar, ar_seconds = ar_task_model(args, args.out / "ar-task")
    _, held, _ = load_splits(seq.config.data)
    task = task_rows(held.documents, seq.tokenizer, args.task_length)
    picked = torch.linspace(0, len(task.targets) - 1, args.task_rows).round().long().tolist()
    sources = [task.sources[i] for i in picked]
    references = [task.targets[i] for i in picked]
    options = {"steps": args.steps, "sampler": "ddim", "clamp": True, "seed": 0}
    start = time.perf_counter()
    one = translate(seq, sources, **options)
    one_s = time.perf_counter() - start
    start = time.perf_counter()
    mbr = translate_mbr(seq, sources, 4, **options)
    mbr_s = time.perf_counter() - start
    start = time.perf_counter()
    greedy = ar_translate(ar, task.tokens[picked], args.task_length // 2)
    ar_s = time.perf_counter() - start
    exact = lambda outs: sum(o == r for o, r in zip(outs, references, strict=True)) / len(outs)  # noqa: E731
    return [
        "| model | parameters | steps | train s | decoding | decode s | chrF | exact |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
        f"| diffuseq | {count_parameters(seq.net):,} | {seq.step} | {seq_seconds:.0f} | 1 sample "
        f"| {one_s:.1f} | {corpus_chrf(one, references):.1f} | {exact(one):.3f} |",
        f"| diffuseq | | | | MBR over 4 | {mbr_s:.1f} | {corpus_chrf(mbr, references):.1f} "
        f"| {exact(mbr):.3f} |",
        f"| ar | {count_parameters(ar.net):,} | {ar.step} | {ar_seconds:.0f} | greedy "
        f"| {ar_s:.1f} | {corpus_chrf(greedy, references):.1f} | {exact(greedy):.3f} |",
        f"| copy the source | - | - | - | - | - | {corpus_chrf(sources, references):.1f} "
        f"| {exact(sources):.3f} |",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=2.0, help="part 2: wall clock per model")
    parser.add_argument(
        "--cpu-minutes", type=float, default=3.0, help="part 1: CPU time of training per model"
    )
    parser.add_argument("--curve", type=int, default=3, help="part 1: points of the curve")
    parser.add_argument(
        "--calibrate", type=int, default=10, help="part 1: steps of each cost measurement"
    )
    parser.add_argument("--out", type=Path, default=Path("runs/bench-ctext"))
    parser.add_argument("--preset", default="text-demo")
    parser.add_argument("--length", type=int, default=64, help="context of part 1")
    parser.add_argument("--task-length", type=int, default=128, help="context of part 2")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--steps", type=int, default=100, help="sampling steps")
    parser.add_argument("--n", type=int, default=32, help="passages generated per row")
    parser.add_argument("--eval-rows", type=int, default=128)
    parser.add_argument("--task-rows", type=int, default=128)
    parser.add_argument("--parts", default="lm,seq2seq")
    parser.add_argument(
        "--models",
        default=",".join(LM_RUNS),
        help="language models of part 1, comma-separated (ar is always trained)",
    )
    parser.add_argument(
        "--ae-steps",
        type=int,
        default=150,
        help="latent-text: steps of its autoencoder stage (within --minutes)",
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="any other config override"
    )
    args = parser.parse_args()
    args.models = args.models.split(",")
    unknown = [m for m in args.models if m not in LM_RUNS]
    if unknown:
        parser.error(f"unknown --models {', '.join(unknown)}: choose from {', '.join(LM_RUNS)}")
    if args.curve < 1 or args.calibrate < 1 or args.cpu_minutes <= 0:
        parser.error("--curve and --calibrate must be at least 1, --cpu-minutes positive")
    lines = [
        f"## Continuous text diffusion benchmark ({platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__})",
        "",
        f"Command: `OMP_NUM_THREADS=1 python benchmarks/bench_ctext.py {' '.join(sys.argv[1:])}`",
        "",
    ]
    if "lm" in args.parts:
        lines += [f"Language models, {args.cpu_minutes:g} CPU-min of training each (context "
                  f"{args.length}, batch {args.batch_size}, width {args.width}, depth "
                  f"{args.depth}):", "", *language_models(args), ""]  # fmt: skip
    if "seq2seq" in args.parts:
        lines += [f"Sequence to sequence, `unshuffle`, {args.minutes:g} min of training each "
                  f"(rows of {args.task_length}: source half, target half; "
                  f"{args.task_rows} held-out lines):", "", *seq2seq(args), ""]  # fmt: skip
    report = "\n".join(lines)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_ctext.md").write_text(report)
    print(report)


if __name__ == "__main__":
    main()
