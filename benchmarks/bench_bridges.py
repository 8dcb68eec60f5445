"""Benchmark of the bridges between autoregressive and diffusion language models (issue 17).

1. Likelihood at equal training time (``--minutes`` per model, built-in Shakespeare, characters,
   the same transformer): the autoregressive model, MDLM from scratch, block diffusion with
   ``--block-sizes``, and MDLM adapted from the AR model for ``--adapt-minutes`` more
   (``difflab adapt``, mask annealed over ``--anneal-steps``, learning rate ``--adapt-lr``;
   its row reports the AR time plus the adaptation time). Bits per character on the held-out
   plays ('<=' marks a bound).
2. Generation: ``--n`` passages of ``--gen-length`` tokens from the AR model with its key/value
   cache, MDLM (cached sampler, ``--mdlm-steps``), block diffusion with its cache (one step per
   token of a block), and speculative decoding of the AR model with a small MDLM drafter
   (``--drafter-width``, ``--drafter-depth``, trained for ``--minutes``; ``--draft-length``,
   both exact drafter modes), the AR model alone timed at the same batch: tokens per second,
   generative perplexity under the AR model, acceptance rate and mean tokens per verification.
3. ``cost``: the CPU time of one training step (forward and backward, batch and context as
   above, the best of ``--cost-repeats``) of AR, MDLM and block diffusion's two streams, the
   latter as it was first written (one attention call under the dense ``(2L, 2L)`` mask, the
   whole last layer run for both streams), after the ``outputs`` cut (the last layer for the
   ``x_t`` stream alone) and as it is now (two attention calls, the clean queries without the
   noisy keys).
4. ``speculative``: an AR target of ``--target-width`` x ``--target-depth`` and a shallow MDLM
   drafter (``--drafter-width`` x ``--drafter-depth``, trained on rows of ``--drafter-length``
   tokens, which bounds the window it reads), each trained for ``--spec-minutes`` (or
   ``--steps spec-target=N,spec-drafter=M``); ``--spec-n`` passages of ``--gen-length``
   tokens, one at a time (seeds 0, 1, ...; each passage by every row before the next, so that a
   change of the machine's load falls on all rows alike), greedy and at temperature 1, by the
   target alone (KV cache) and by speculative decoding with one parallel drafter step for each
   of ``--spec-draft-lengths`` (and left to right for the first): tokens/s,
   generative perplexity under the target, acceptance, tokens per verification, and where the
   time of a round goes (target calls, drafter calls, the rest: acceptance rule, sampling, cache).

``--parts`` picks among ``likelihood`` (1, the models trained), ``generation`` (2), ``cost`` (3)
and ``speculative`` (4); ``--block-mask-range BETA,OMEGA`` trains the block runs with that
``diffusion.mask_range`` (empty: the block kind's default) and ``--block-lr`` at that learning
rate (default: the preset's). ``--lr-schedule cosine`` decays every run's learning rate to zero
over its ``--steps`` (default: constant, which a ``--minutes`` budget needs).
``--adapt-minutes 0`` leaves the adapted model out.
``--steps NAME=N,...`` trains the named runs (``ar``, ``mdlm``,
``adapted``, ``block-L``, ``spec-target``, ``spec-drafter``) for ``N`` steps instead of
``--minutes``: on a shared machine, equal CPU time is set by steps in the ratio of the step
costs of part 3. ``--only NAME,...`` trains those runs and stops (several processes may train
in parallel); a later call with ``--skip-train`` evaluates every run, reading the wall and CPU
seconds each training took from ``RUN/bench_time.json``.

Usage: ``python benchmarks/bench_bridges.py --minutes 2 [--out runs/bench-bridges]``; prints
markdown for docs/BENCHMARKS.md and writes it to ``OUT/bench_bridges.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path

import torch
from bench_text import _quality, _timed

from difflab.discrete.block import block_diffusion_loss
from difflab.discrete.objectives import continuous_time_loss
from difflab.discrete.process import MaskedProcess
from difflab.discrete.schedules import make_token_schedule
from difflab.nets.transformer import TextTransformer
from difflab.recipes import load_config
from difflab.recipes.adapt import RECIPE as ADAPT
from difflab.recipes.text import RECIPE as TEXT
from difflab.recipes.text.sample import generate_tokens
from difflab.recipes.text.speculative import speculative_tokens
from difflab.recipes.text.train import count_parameters


def common(args: argparse.Namespace, out: Path, minutes: float) -> list[str]:
    """The training keys of every run: ``--steps`` for its name if given, else ``minutes``."""
    steps = args.steps.get(out.name)
    if args.lr_schedule == "cosine" and not steps:
        sys.exit(f"bench_bridges: --lr-schedule cosine needs a --steps budget for {out.name}")
    budget = [f"train.steps={steps}", "train.max_minutes=0"] if steps else [
        f"train.max_minutes={minutes}", "train.steps=1000000"]  # fmt: skip
    return [
        f"train.out={out}", *budget, f"train.lr_schedule={args.lr_schedule}",
        f"train.batch_size={args.batch_size}", f"train.device={args.device}",
        f"data.length={args.length}",
    ]  # fmt: skip


def timed_training(args: argparse.Namespace, recipe, cfg, run: Path) -> tuple[float, float]:
    """Train ``cfg`` (or with ``--skip-train`` read what its training took): ``(wall seconds,
    CPU seconds of this process)``, kept in ``run/bench_time.json``."""
    record = run / "bench_time.json"
    if args.skip_train:
        if record.exists():
            return tuple(json.loads(record.read_text()))
        return float("nan"), float("nan")
    cpu = time.process_time()
    wall = recipe.train(cfg, progress=False).seconds
    times = (wall, time.process_time() - cpu)
    record.write_text(json.dumps(times))
    print(f"trained {run.name} in {wall:.0f} s ({times[1]:.0f} CPU s)", file=sys.stderr)
    return times


def train_text(args: argparse.Namespace, name: str, *overrides: str, width=None, depth=None,
               minutes=None):  # fmt: skip
    """Train (or load) one text run: ``(model, (wall seconds, CPU seconds))``."""
    run = args.out / name
    model = [f"model.width={width or args.width}", f"model.depth={depth or args.depth}",
             f"model.num_heads={args.heads}", "model.time_conditioning=false"]  # fmt: skip
    budget = common(args, run, args.minutes if minutes is None else minutes)
    _, cfg = load_config(args.preset, [*budget, *model, *overrides], recipe=TEXT.name)
    times = timed_training(args, TEXT, cfg, run)
    return TEXT.load(run, args.device), times


def adapt_ar(args: argparse.Namespace, ar_times: tuple[float, float]):
    """The adapted run: ``(model, AR + adaptation (wall, CPU) seconds)``."""
    run = args.out / "adapted"
    overrides = [*common(args, run, args.adapt_minutes),
                 f"adapt.anneal_steps={args.anneal_steps}"]  # fmt: skip
    if args.adapt_lr is not None:
        overrides.append(f"train.lr={args.adapt_lr}")
    cfg = None if args.skip_train else load_config(args.out / "ar", overrides, recipe=ADAPT.name)[1]
    times = timed_training(args, ADAPT, cfg, run)
    return ADAPT.load(run, args.device), (ar_times[0] + times[0], ar_times[1] + times[1])


def likelihood_table(models: dict, args: argparse.Namespace) -> list[str]:
    rows = ["| model | parameters | steps | train s (wall / CPU) | bits/char | vs AR |",
            "| --- | ---: | ---: | ---: | --- | ---: |"]  # fmt: skip
    results = {}
    for name, (model, _) in models.items():
        options = {} if model.kind == "ar" else {"t_samples": 4}
        results[name] = TEXT.evaluate(model, n=args.eval_sequences, seed=0, progress=False,
                                      **options).metrics  # fmt: skip
    ar = results["ar"]["bits_per_character"]
    for name, (model, (wall, cpu)) in models.items():
        r = results[name]
        bound = "<= " if r["bound"] else ""
        rows.append(
            f"| {name} | {count_parameters(model.net):,} | {model.step} | {wall:.0f} / {cpu:.0f} | "
            f"{bound}{r['bits_per_character']:.3f} ± "
            f"{r['nats_per_token_stderr'] * r['bits_per_character'] / r['nats_per_token']:.3f} "
            f"| {r['bits_per_character'] / ar:.3f} |"
        )
    return rows


def generation_table(models: dict, drafter, args: argparse.Namespace) -> list[str]:
    ar = models["ar"][0]
    rows = ["| model | batch | network calls | tokens/s | gen. perplexity (AR) | acceptance "
            "| tokens per verification |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    options = {"length": args.gen_length, "seed": 0, "temperature": 1.0}
    draws = [("ar, KV cache", ar, {}), ("mdlm, cached", models["mdlm"][0],
              {"steps": args.mdlm_steps, "sampler": "cached"})]  # fmt: skip
    draws += [(f"block L={size}, KV cache", models[f"block L={size}"][0], {})
              for size in args.block_sizes]  # fmt: skip
    for name, model, extra in draws:
        generate_tokens(model, 1, **{**options, **extra, "length": 16})  # warm-up
        samples, seconds = _timed(lambda m=model, e=extra: generate_tokens(m, args.n, **options,
                                                                           **e))  # fmt: skip
        rows.append(f"| {name} | {args.n} | {samples.nfe} | "
                    f"{args.n * args.gen_length / seconds:.0f} | "
                    f"{_quality(samples.tokens, ar)[0]} | - | - |")  # fmt: skip
    n = args.spec_n
    plain, seconds = _timed(lambda: generate_tokens(ar, n, **options))
    rows.append(f"| ar, KV cache | {n} | {plain.nfe} | {n * args.gen_length / seconds:.0f} | "
                f"{_quality(plain.tokens, ar)[0]} | - | - |")  # fmt: skip
    g = args.draft_length
    for steps, mode in ((g, "left to right"), (1, "one parallel step")):
        result, seconds = _timed(lambda s=steps: speculative_tokens(
            ar, drafter, n, draft_length=g, draft_steps=s, **options))  # fmt: skip
        per_round = (result.accepted + result.rounds * n) / max(result.rounds * n, 1)
        rows.append(
            f"| speculative, drafter {count_parameters(drafter.net):,} params, G={g}, {mode} | "
            f"{n} | {result.nfe} + {result.drafter_nfe} | "
            f"{n * args.gen_length / seconds:.0f} | {_quality(result.tokens, ar)[0]} | "
            f"{result.acceptance_rate:.3f} | {per_round:.2f} |"
        )
    return rows


def cost_table(args: argparse.Namespace) -> list[str]:
    """CPU milliseconds of this process per training step (forward and backward, the best of
    ``--cost-repeats``): on a shared machine the time a step takes on a core of its own."""
    vocab = 90  # the characters of the built-in corpus with the special tokens
    process = MaskedProcess(vocab, vocab - 1, make_token_schedule("log-linear"))
    torch.manual_seed(0)
    size = {"width": args.width, "depth": args.depth, "num_heads": args.heads}
    ar = TextTransformer(vocab, args.length, causal=True, **size)
    net = TextTransformer(vocab, args.length, time_conditioning=False, **size)
    x = torch.randint(0, vocab - 1, (args.batch_size, args.length))

    def dense(attn_mask):  # the (2L, 2L) mask the pair of two_stream_mask stands for
        noisy, clean = attn_mask
        return torch.cat([noisy, torch.cat([torch.zeros_like(clean), clean], 1)])

    def dense_whole(*a, attn_mask, outputs=None, **k):  # as first written: both streams out
        return net(*a, attn_mask=dense(attn_mask), **k)[:, :outputs]

    def dense_mask(*a, attn_mask, **k):  # with the outputs cut
        return net(*a, attn_mask=dense(attn_mask), **k)

    def ar_step():
        logits = ar(x[:, :-1])
        torch.nn.functional.cross_entropy(logits.transpose(1, 2), x[:, 1:]).backward()

    steps = {"autoregressive": ar_step,
             "MDLM": lambda: continuous_time_loss(net, process, x).loss.backward()}  # fmt: skip
    for size in args.block_sizes:
        steps[f"block L = {size}, dense mask, whole last layer"] = lambda s=size: (
            block_diffusion_loss(dense_whole, process, x, s).loss.backward())  # fmt: skip
        steps[f"block L = {size}, dense mask, last layer x_t only"] = lambda s=size: (
            block_diffusion_loss(dense_mask, process, x, s).loss.backward())  # fmt: skip
        steps[f"block L = {size}, two attention calls, last layer x_t only"] = lambda s=size: (
            block_diffusion_loss(net, process, x, s).loss.backward())  # fmt: skip
    best = {name: float("inf") for name in steps}
    for _ in range(args.cost_repeats):  # interleaved: a busy spell hits every row alike
        for name, step in steps.items():
            start = time.process_time()
            step()
            best[name] = min(best[name], time.process_time() - start)
    rows = [f"| training step | CPU ms (best of {args.cost_repeats}) | vs MDLM | vs AR |",
            "| --- | ---: | ---: | ---: |"]  # fmt: skip
    for name, seconds in best.items():
        rows.append(f"| {name} | {1000 * seconds:.0f} | {seconds / best['MDLM']:.2f} | "
                    f"{seconds / best['autoregressive']:.2f} |")  # fmt: skip
    return rows


class Timed:
    """A network whose calls are timed: ``seconds`` in all, over ``calls`` calls."""

    def __init__(self, net):
        self.net, self.seconds, self.calls = net, 0.0, 0

    def __call__(self, *args, **kwargs):
        start = time.process_time()
        out = self.net(*args, **kwargs)
        self.seconds += time.process_time() - start
        self.calls += 1
        return out

    def __getattr__(self, name):
        return getattr(self.net, name)


def speculative_pair(args: argparse.Namespace) -> dict:
    """The trainers of part 4's target and drafter."""
    return {
        "spec-target": lambda: train_text(
            args, "spec-target", "diffusion.kind=ar", width=args.target_width,
            depth=args.target_depth, minutes=args.spec_minutes),
        "spec-drafter": lambda: train_text(
            args, "spec-drafter", "diffusion.kind=mdlm", f"data.length={args.drafter_length}",
            f"train.batch_size={args.batch_size * args.length // args.drafter_length}",
            width=args.drafter_width, depth=args.drafter_depth, minutes=args.spec_minutes),
    }  # fmt: skip


def speculative_table(args: argparse.Namespace, trained_target, trained_drafter) -> list[str]:
    """Part 4 of the module docstring; times are CPU seconds of this process (on a shared
    machine, the time on a core of its own)."""
    (target, target_s), (drafter, drafter_s) = trained_target, trained_drafter
    sizes = count_parameters(target.net), count_parameters(drafter.net)
    rows = [
        f"Target: AR, {sizes[0]:,} parameters (width {args.target_width}, depth "
        f"{args.target_depth}), {target.step} steps in {target_s[0]:.0f} s ({target_s[1]:.0f} "
        f"CPU s); drafter: MDLM, "
        f"{sizes[1]:,} parameters (width {args.drafter_width}, depth {args.drafter_depth}, rows "
        f"of {args.drafter_length} tokens), {drafter.step} steps in {drafter_s[0]:.0f} s "
        f"({drafter_s[1]:.0f} CPU s); the "
        f"target is {sizes[0] / sizes[1]:.1f}x the drafter. {args.spec_n} passages of "
        f"{args.gen_length} tokens, one at a time.",
        "",
        "| temperature | decoding | tokens per CPU s | vs AR | gen. perplexity (target) "
        "| acceptance | tokens per verification | ms per round: target + drafter + rest |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    g0 = args.spec_draft_lengths[0]
    modes = [(g, 1) for g in args.spec_draft_lengths] + [(g0, g0)]
    for temperature in (0.0, 1.0):
        options = {"length": args.gen_length, "temperature": temperature}
        ar = dataclasses.replace(target, net=Timed(target.net))
        pairs = {
            mode: (
                dataclasses.replace(target, net=Timed(target.net)),
                dataclasses.replace(drafter, net=Timed(drafter.net)),
            )
            for mode in modes
        }
        generate_tokens(ar, 1, **{**options, "length": 16})  # warm-up
        for g, calls in modes:
            speculative_tokens(*pairs[g, calls], 1, draft_length=g, draft_steps=calls,
                               **{**options, "length": 16})  # fmt: skip
        for net in [ar.net, *(n.net for pair in pairs.values() for n in pair)]:
            net.seconds = net.calls = 0
        # Passage by passage, the AR model and then each mode: a change in the machine's load
        # during the measurement falls on every row alike.
        seconds = dict.fromkeys(["ar", *modes], 0.0)
        plain, results = [], {mode: [] for mode in modes}
        for k in range(args.spec_n):
            start = time.process_time()
            plain.append(generate_tokens(ar, 1, seed=k, **options))
            seconds["ar"] += time.process_time() - start
            for g, calls in modes:
                start = time.process_time()
                results[g, calls].append(
                    speculative_tokens(
                        *pairs[g, calls], 1, draft_length=g, draft_steps=calls, seed=k, **options
                    )
                )
                seconds[g, calls] += time.process_time() - start
        ar_seconds, net = seconds["ar"], ar.net
        tokens = torch.cat([p.tokens for p in plain])
        rows.append(f"| {temperature:g} | AR alone, KV cache | "
                    f"{args.spec_n * args.gen_length / ar_seconds:.0f} | 1.00 | "
                    f"{_quality(tokens, target)[0]} | - | 1 | "
                    f"{1000 * net.seconds / net.calls:.2f} + 0 + "
                    f"{1000 * (ar_seconds - net.seconds) / net.calls:.2f} |")  # fmt: skip
        for g, calls in modes:
            net, draft_net = (model.net for model in pairs[g, calls])
            rounds = sum(r.rounds for r in results[g, calls])
            accepted = sum(r.accepted for r in results[g, calls])
            drafted = sum(r.drafted for r in results[g, calls])
            spec_tokens = torch.cat([r.tokens for r in results[g, calls]])
            same = ""
            if temperature == 0:
                same = ", same text" if torch.equal(spec_tokens, tokens) else ", TEXT DIFFERS"
            mode = "one parallel step" if calls == 1 else "left to right"
            per, spent = 1000 / max(net.calls, 1), seconds[g, calls]
            rows.append(
                f"| {temperature:g} | speculative, G = {g}, {mode}{same} | "
                f"{args.spec_n * args.gen_length / spent:.0f} | {ar_seconds / spent:.2f} | "
                f"{_quality(spec_tokens, target)[0]} | {accepted / max(drafted, 1):.3f} | "
                f"{(accepted + rounds) / max(rounds, 1):.2f} | {per * net.seconds:.2f} + "
                f"{per * draft_net.seconds:.2f} + "
                f"{per * (spent - net.seconds - draft_net.seconds):.2f} |"
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=2.0, help="training budget per model")
    parser.add_argument("--adapt-minutes", type=float, default=None,
                        help="adaptation budget (default: --minutes)")  # fmt: skip
    parser.add_argument("--anneal-steps", type=int, default=100)
    parser.add_argument("--adapt-lr", type=float, default=None,
                        help="learning rate of the adaptation (default: the preset's)")  # fmt: skip
    parser.add_argument("--block-lr", type=float, default=None,
                        help="learning rate of the block runs (default: the preset's)")  # fmt: skip
    parser.add_argument("--lr-schedule", choices=("constant", "cosine"), default="constant",
                        help="of every run (cosine: needs --steps budgets)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("runs/bench-bridges"))
    parser.add_argument("--preset", default="text-demo")
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--block-sizes", type=lambda s: [int(x) for x in s.split(",") if x],
                        default=[4, 8, 16], help="empty: no block runs")  # fmt: skip
    parser.add_argument("--drafter-width", type=int, default=32)
    parser.add_argument("--drafter-depth", type=int, default=2)
    parser.add_argument("--draft-length", type=int, default=4)
    parser.add_argument("--eval-sequences", type=int, default=128)
    parser.add_argument("--gen-length", type=int, default=256)
    parser.add_argument("--n", type=int, default=8, help="passages per generation row")
    parser.add_argument("--spec-n", type=int, default=1, help="passages of speculative rows")
    parser.add_argument("--mdlm-steps", type=int, default=64)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--skip-train", action="store_true", help="reuse the runs in --out")
    parser.add_argument("--steps", type=lambda s: {k: int(v) for k, v in
                                                   (x.split("=") for x in s.split(","))},
                        default={}, help="NAME=STEPS,...: train these runs by steps")  # fmt: skip
    parser.add_argument("--only", type=lambda s: s.split(","), default=None,
                        help="train these runs (ar, mdlm, adapted, block-L) and stop")  # fmt: skip
    parser.add_argument("--parts", type=lambda s: s.split(","),
                        default=["likelihood", "generation"])  # fmt: skip
    parser.add_argument("--block-mask-range", default=None, help="BETA,OMEGA of the block runs")
    parser.add_argument("--cost-repeats", type=int, default=5)
    parser.add_argument("--spec-minutes", type=float, default=5.0)
    parser.add_argument("--target-width", type=int, default=128)
    parser.add_argument("--target-depth", type=int, default=8)
    parser.add_argument("--drafter-length", type=int, default=32)
    parser.add_argument("--spec-draft-lengths", type=lambda s: [int(x) for x in s.split(",")],
                        default=[2, 3, 4])  # fmt: skip
    args = parser.parse_args()
    args.adapt_minutes = args.minutes if args.adapt_minutes is None else args.adapt_minutes

    lines = [
        f"## Bridges benchmark ({platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__})",
        "",
        f"Command: `python benchmarks/bench_bridges.py {' '.join(sys.argv[1:])}`",
    ]
    block = [] if args.block_mask_range is None else [
        f"diffusion.mask_range=[{args.block_mask_range}]"]  # fmt: skip
    if args.block_lr is not None:
        block.append(f"train.lr={args.block_lr}")
    trainers = {"ar": lambda: train_text(args, "ar", "diffusion.kind=ar"),
                "mdlm": lambda: train_text(args, "mdlm", "diffusion.kind=mdlm")}  # fmt: skip
    if args.adapt_minutes > 0 or "adapted" in args.steps:
        ar_record = argparse.Namespace(**{**vars(args), "skip_train": True})
        trainers["adapted"] = lambda: adapt_ar(
            args, timed_training(ar_record, TEXT, None, args.out / "ar")
        )
    for size in args.block_sizes:
        trainers[f"block-{size}"] = lambda s=size: train_text(
            args, f"block-{s}", "diffusion.kind=block", f"diffusion.block_size={s}", *block
        )
    pair = speculative_pair(args)
    if args.only:  # train these runs alone (a later call with --skip-train evaluates)
        for name in args.only:
            {**trainers, **pair}[name]()
        return
    if "cost" in args.parts:
        lines += ["", f"Training step, batch {args.batch_size}, context {args.length}, width "
                  f"{args.width}, depth {args.depth}:", "", *cost_table(args)]  # fmt: skip
    if "speculative" in args.parts:
        lines += ["", *speculative_table(args, pair["spec-target"](), pair["spec-drafter"]())]
    if "likelihood" in args.parts or "generation" in args.parts:
        labels = {"adapted": "adapted (AR + adaptation time)"}
        labels.update({f"block-{size}": f"block L={size}" for size in args.block_sizes})
        models = {labels.get(name, name): train() for name, train in trainers.items()}
    if "likelihood" in args.parts:
        lines += [
            "",
            f"Likelihood on the held-out plays, {args.minutes:g} min of training per model or "
            f"the steps {args.steps or '-'} (adapted: the AR run plus its adaptation), context "
            f"{args.length}, batch {args.batch_size}, width {args.width}, depth {args.depth}:",
            "",
            *likelihood_table(models, args),
        ]
    if "generation" in args.parts:
        drafter, _ = train_text(args, "drafter", "diffusion.kind=mdlm", width=args.drafter_width,
                                depth=args.drafter_depth)  # fmt: skip
        lines += [
            "",
            f"Generation of {args.gen_length} tokens per passage (temperature 1; generative "
            f"perplexity of the first {args.length} tokens under the AR model):",
            "",
            *generation_table(models, drafter, args),
        ]
    report = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_bridges.md").write_text(report)
    print(report)


if __name__ == "__main__":
    main()
