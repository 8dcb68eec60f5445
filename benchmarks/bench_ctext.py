"""Benchmark of continuous diffusion for text (issue 16) against MDLM and the AR baseline.

1. Language modelling: Diffusion-LM (with and without self-conditioning), latent-text, MDLM and
   AR, the same transformer width and depth, each trained for the same wall-clock budget
   (``--minutes``; latent-text: its autoencoder stage of ``--ae-steps`` steps and its diffusion
   stage together) on the built-in Shakespeare (characters). Held out: the NELBO of MDLM (a
   bound) and the exact NLL of AR; Diffusion-LM has no bound here (its loss terms are given
   instead). The training-loss curve at quarters of each run (latent-text: its diffusion
   stage). Generation of ``--n`` passages of the context: Diffusion-LM
   with and without clamping, MDLM and AR; generative perplexity under the AR model, unigram
   entropy, distinct-2/3, and for Diffusion-LM the in-vocabulary rate before rounding: the
   share of final vectors ``x_0,i`` within half the distance from their nearest embedding to
   that embedding's nearest other embedding (unambiguously one word). Latent-text has no bound
   either: its held-out latent loss and its autoencoder's reconstruction of the held-out rows
   (exact rows, tokens) are given.
2. DiffuSeq on the task ``unshuffle`` (restore a line from its shuffled words) against an AR
   model of the same size trained for the same time on the same rows (loss on the target half,
   decoded greedily after the source half): corpus chrF of ``--task-rows`` held-out lines,
   DiffuSeq with one sample and with minimum Bayes risk over 4; copying the source is the
   floor.

Usage: ``OMP_NUM_THREADS=1 python benchmarks/bench_ctext.py --minutes 2 [--out runs/bench-ctext]``
(about ``7 x minutes`` of training plus sampling; ``--models latent-text`` trains latent-text
and the AR judge only, and runs already in ``--out`` are reused); prints markdown for
docs/BENCHMARKS.md and writes it to ``OUT/bench_ctext.md``.
"""

from __future__ import annotations

import argparse
import csv
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


def config(args: argparse.Namespace, out: Path, length: int, *overrides: str):
    _, cfg = load_config(args.preset, [
        f"train.out={out}", f"train.max_minutes={args.minutes}", "train.steps=1000000",
        "train.lr_schedule=constant", f"train.batch_size={args.batch_size}",
        f"data.length={length}", f"model.width={args.width}", f"model.depth={args.depth}",
        f"model.num_heads={args.heads}", "train.device=cpu", *overrides, *args.set,
    ], recipe=RECIPE.name)  # fmt: skip
    return cfg


def train(cfg) -> float:
    if (Path(cfg.train.out) / "checkpoint.safetensors").exists():
        return float("nan")  # reused (--out kept from an earlier run)
    return RECIPE.train(cfg, progress=False).seconds


def loss_curve(run: Path) -> str:
    """The mean training loss over the last tenth before each quarter of the run."""
    with open(run / "loss.csv") as f:
        losses = [float(row["loss"]) for row in csv.DictReader(f)]
    if not losses:
        return "-"
    points = []
    for q in (0.25, 0.5, 0.75, 1.0):
        end = max(1, round(q * len(losses)))
        window = losses[max(0, end - max(1, len(losses) // 10)) : end]
        points.append(f"{sum(window) / len(window):.3f}")
    return " / ".join(points)


def in_vocabulary(x0: torch.Tensor, embeddings: torch.Tensor) -> float:
    """The share of vectors of ``x0`` nearer to their nearest embedding than half its distance
    to the nearest other embedding."""
    gaps = torch.cdist(embeddings, embeddings)
    gaps.fill_diagonal_(float("inf"))
    ids = nearest_embedding(x0, embeddings)
    distance = (x0 - embeddings[ids]).norm(dim=-1)
    return float((distance < gaps.min(1).values[ids] / 2).float().mean())


def quality(tokens: torch.Tensor, ar) -> list[str]:
    mask = valid_token_mask(tokens, EOS_ID, PAD_ID)
    ppl = generative_perplexity(lambda x: ar.net(x), tokens, mask, BOS_ID)
    return [f"{ppl:.2f}", f"{unigram_entropy(tokens, mask):.3f}",
            f"{distinct_n(tokens, 2, mask):.3f}", f"{distinct_n(tokens, 3, mask):.3f}"]  # fmt: skip


def language_models(args: argparse.Namespace) -> list[str]:
    models, seconds = {}, {}
    for name, overrides in LM_RUNS.items():
        if name not in args.models and name != "ar":  # the AR model judges the others
            continue
        if name == "latent-text":
            overrides = [*overrides, f"latent_text.ae_steps={args.ae_steps}"]
        run = args.out / name.replace(" + ", "-")
        seconds[name] = train(config(args, run, args.length, *overrides))
        models[name] = RECIPE.load(run, "cpu")
    ar = models["ar"]
    lines = [
        "| model | parameters | steps | train s | held-out | loss at 1/4, 1/2, 3/4, end |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, model in models.items():
        metrics = RECIPE.evaluate(model, n=args.eval_rows, seed=0, progress=False).metrics
        if "reconstruction_exact" in metrics:
            held = (f"latent loss {metrics['latent_loss']:.3f}; autoencoder: "
                    f"{metrics['reconstruction_exact']:.3f} of rows, "
                    f"{metrics['reconstruction_accuracy']:.3f} of tokens exact; "
                    "no bound")  # fmt: skip
        elif metrics["bound"] is False and "rounding" in metrics:
            held = (f"loss {metrics['loss']:.3f} (x0 {metrics['x0_mse']:.3f}, emb "
                    f"{metrics['embedding']:.3f}, round {metrics['rounding']:.3f}); "
                    "no bound")  # fmt: skip
        else:
            bound = "<= " if metrics["bound"] else ""
            held = (f"{bound}{metrics['nats_per_token']:.3f} nats/token, {bound}"
                    f"{metrics['bits_per_character']:.3f} bits/char")  # fmt: skip
        lines.append(
            f"| {name} | {count_parameters(model.net):,} | {model.step} | {seconds[name]:.0f} | "
            f"{held} | {loss_curve(Path(model.config.train.out))} |"
        )
    lines += [
        "",
        f"Generation of {args.n} passages of {args.length} characters ({args.steps} steps for "
        "the diffusion models; AR: its key/value cache):",
        "",
        "| model | sampling | s | gen. perplexity (AR) | unigram entropy | distinct-2 | "
        "distinct-3 | in-vocabulary before rounding |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name in ("diffusion-lm", "diffusion-lm + self-cond"):
        if name not in models:
            continue
        for clamp in (True, False):
            start = time.perf_counter()
            tokens, x0 = sample_rows(models[name], args.n, steps=args.steps, sampler="ddim",
                                     clamp=clamp, seed=0)  # fmt: skip
            took = time.perf_counter() - start
            rate = in_vocabulary(x0, models[name].net.embed.weight.detach())
            lines.append(f"| {name} | ddim, clamp {'on' if clamp else 'off'} | {took:.1f} | "
                         + " | ".join(quality(tokens, ar)) + f" | {rate:.3f} |")  # fmt: skip
    if "latent-text" in models:
        start = time.perf_counter()
        tokens = latent_text.sample_tokens(models["latent-text"], args.n, steps=args.steps,
                                           sampler="ddim", seed=0)  # fmt: skip
        took = time.perf_counter() - start
        lines.append(f"| latent-text | ddim, self-cond | {took:.1f} | "
                     + " | ".join(quality(tokens, ar)) + " | - |")  # fmt: skip
    for name, options in [("mdlm", {"steps": args.steps, "sampler": "cached"}), ("ar", {})]:
        if name not in models:
            continue
        start = time.perf_counter()
        samples = generate_tokens(models[name], args.n, length=args.length, seed=0, **options)
        took = time.perf_counter() - start
        how = "cached ancestral" if options else "key/value cache"
        lines.append(f"| {name} | {how} | {took:.1f} | "
                     + " | ".join(quality(samples.tokens, ar)) + " | - |")  # fmt: skip
    held, _ = truncate_at_eos(task_free_rows(models["ar"], args), EOS_ID, PAD_ID)
    lines.append("| held-out text | - | - | " + " | ".join(quality(held, ar)) + " | - |")
    return lines


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
    parser.add_argument("--minutes", type=float, default=2.0, help="training budget per model")
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
    lines = [
        f"## Continuous text diffusion benchmark ({platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__})",
        "",
        f"Command: `OMP_NUM_THREADS=1 python benchmarks/bench_ctext.py {' '.join(sys.argv[1:])}`",
        "",
    ]
    if "lm" in args.parts:
        lines += [f"Language models, {args.minutes:g} min of training each (context "
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
