"""The ``difflab`` command: parsing, then the Python API (:mod:`difflab.recipes`).

``train`` builds a recipe's config and trains it; ``distill`` trains few-step students of a run
(:mod:`difflab.recipes.distill`); ``sample``, ``eval`` and ``demo`` find the recipe of a run
from its checkpoint and call it with the options the user gave (every option defaults to "not
given", so the recipe, not the command line, owns the defaults and refuses what it does
not take). A mistake the user can fix prints one line ``difflab: error: ...`` and exits with
status 2; Ctrl-C or SIGTERM during training saves a checkpoint and exits with status 130.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

try:  # typer >= 0.26 carries its own copy of click
    from typer._click import exceptions as click_errors
except ImportError:  # pragma: no cover - older typer uses click itself
    from click import exceptions as click_errors

from difflab.errors import UserError
from difflab.version import __version__

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    help="Diffusion models that are correct, fast and readable: train, sample, evaluate.",
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"difflab {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """Diffusion models that are correct, fast and readable: train, sample, evaluate."""


def _given(**options: Any) -> dict[str, Any]:
    """The options the user gave (typer's default for each is ``None``: not given)."""
    return {k: v for k, v in options.items() if v is not None}


def _presets() -> str:
    from difflab.config import presets

    return ", ".join(presets())


@app.command(
    help="Train a model; writes checkpoint.safetensors, config.json, loss.csv and "
    f"loss_curve.png into train.out. SOURCE is a preset ({_presets()}), a YAML or JSON config, "
    "or a run folder (continue it with --resume)."
)
def train(
    source: Annotated[
        str | None, typer.Argument(help="Preset, config file or run folder; default digits.")
    ] = None,
    overrides: Annotated[
        list[str] | None,
        typer.Argument(help="key=value overrides, e.g. train.steps=500 model.unet.channels=64."),
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the run in train.out from its checkpoint.")
    ] = False,
    recipe: Annotated[
        str | None,
        typer.Option(
            help="Train another recipe on the same config (sets its recipe key): image, "
            "classifier, cascade, text-to-digit, text, flow."
        ),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar.")] = False,
) -> None:
    from difflab.recipes import train as train_run
    from difflab.train.distributed import is_main

    rest = list(overrides or [])
    if source is not None and "=" in source:
        source, rest = None, [source, *rest]
    result = train_run(source, rest, recipe=recipe, resume=resume, progress=not quiet)
    if not is_main():  # under torchrun, rank 0 reports for the job
        return
    typer.echo(
        f"trained {result.steps} steps in {result.seconds:.1f} s "
        f"({result.images_per_second:.0f} examples/s)\ncheckpoint: {result.checkpoint}\n"
        f"loss log: {result.log}"
    )
    if result.stopped_early:
        typer.echo(
            f"WARNING: training stopped at step {result.steps}, before train.steps, because "
            f"train.max_minutes was reached; continue with: difflab train "
            f"{result.checkpoint.parent} --resume",
            err=True,
        )


@app.command(
    help="Draw samples from a run: for images OUT.npz (samples in [0, 1], labels) and the grid "
    "OUT.png; for vectors OUT.npz; for text OUT.txt. OUT defaults to RUN/samples."
)
def sample(
    run: Annotated[Path | None, typer.Argument(help="Run folder or checkpoint file.")] = None,
    n: Annotated[
        int | None, typer.Option("--n", help="Number of samples (run's sample.n).")
    ] = None,
    sampler: Annotated[str | None, typer.Option(help="Sampler name (see --list).")] = None,
    steps: Annotated[int | None, typer.Option(help="Sampling steps.")] = None,
    grid: Annotated[
        str | None, typer.Option(help="Time grid: trailing, leading, linspace, karras, log-snr.")
    ] = None,
    eta: Annotated[float | None, typer.Option(help="DDIM stochasticity in [0, 1].")] = None,
    opt: Annotated[
        list[str] | None,
        typer.Option(help="A sampler option key=value, repeatable, e.g. --opt order=3."),
    ] = None,
    class_: Annotated[
        str | None,
        typer.Option("--class", help="Class name or index, or a comma list cycled over samples."),
    ] = None,
    guidance: Annotated[
        float | None, typer.Option(help="Classifier-free guidance scale w (0: off).")
    ] = None,
    convention: Annotated[
        str | None, typer.Option(help="Guidance convention: w, or gamma ((1-g) u + g c).")
    ] = None,
    classifier: Annotated[
        Path | None, typer.Option(help="A classifier run (--recipe classifier) for guidance.")
    ] = None,
    classifier_scale: Annotated[float | None, typer.Option(help="Classifier guidance s.")] = None,
    threshold: Annotated[
        str | None, typer.Option(help="x_0 thresholding: none, static or dynamic.")
    ] = None,
    percentile: Annotated[
        float | None, typer.Option(help="Dynamic thresholding percentile in (0, 1].")
    ] = None,
    aug_level: Annotated[
        float | None, typer.Option(help="Cascades: noise level of the low-resolution input.")
    ] = None,
    prompt: Annotated[
        str | None,
        typer.Option(
            help="Text: the beginning of every passage. Text-to-digit: captions "
            "separated by ';', cycled over the samples."
        ),
    ] = None,
    length: Annotated[int | None, typer.Option(help="Text: tokens per passage.")] = None,
    temperature: Annotated[float | None, typer.Option(help="Text: temperature.")] = None,
    top_p: Annotated[float | None, typer.Option(help="Text: nucleus mass.")] = None,
    clamp: Annotated[
        bool | None,
        typer.Option("--clamp/--no-clamp", help="Continuous text: the clamping trick."),
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed.")] = None,
    control: Annotated[
        list[str] | None,
        typer.Option(
            help="Diffusion-LM runs: a control NAME=VALUE, repeatable: length=N, word=W, "
            "lines=K (classifier from difflab train-control)."
        ),
    ] = None,
    control_scale: Annotated[
        float | None, typer.Option(help="Diffusion-LM control: guidance scale gamma (1).")
    ] = None,
    control_steps: Annotated[
        int | None,
        typer.Option(
            help="Diffusion-LM control: K gradient steps on each x_(t-1) of DDPM's sampler, as "
            "the paper (empty: the gradient added to the score once per step)."
        ),
    ] = None,
    control_step_size: Annotated[
        float | None,
        typer.Option(help="Diffusion-LM control: step size in (0, 1] of --control-steps (0.1)."),
    ] = None,
    draft: Annotated[
        Path | None,
        typer.Option(
            help="Text, ar runs: a masked diffusion run drafting for speculative decoding."
        ),
    ] = None,
    draft_length: Annotated[
        int | None, typer.Option(help="Speculative decoding: tokens drafted per round (4).")
    ] = None,
    draft_steps: Annotated[
        int | None,
        typer.Option(help="Speculative decoding: drafter calls per round, 1 or --draft-length."),
    ] = None,
    adapter: Annotated[
        list[str] | None,
        typer.Option(
            help="Text-to-image: a LoRA adapter FILE[:SCALE] from difflab finetune, repeatable "
            "(their updates add up)."
        ),
    ] = None,
    embedding: Annotated[
        list[Path] | None,
        typer.Option(
            help="Text-to-image: a textual-inversion embedding from difflab finetune, "
            "repeatable; its token is a word of --prompt."
        ),
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Output stem (default RUN/samples).")] = None,
    format_: Annotated[
        str, typer.Option("--format", help="npz, or png: also one PNG per sample in OUT/.")
    ] = "npz",
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    list_: Annotated[bool, typer.Option("--list", help="Describe every sampler and exit.")] = False,
) -> None:
    import difflab

    _one_process("sample")
    if list_:
        _list_samplers()
        return
    if run is None:
        raise UserError("give the run folder or checkpoint to sample from (or --list)")
    if format_ not in ("npz", "png"):
        raise UserError(f"--format must be npz or png, got {format_!r}")
    loaded = difflab.load(run, device)
    if embedding:  # first: an adapter trained over an embedding needs it
        _finetune_module().apply_embeddings(loaded, embedding)
    if adapter:
        finetuning = _finetune_module()
        tokens = finetuning.apply_adapters(loaded, adapter)
        prompt = None if prompt is None else finetuning.read_prompt(prompt, tokens)
    options = _given(
        sampler=sampler, steps=steps, grid=grid, eta=eta, sampler_options=_pairs(opt),
        label=class_, guidance=guidance, convention=convention, classifier=classifier,
        classifier_scale=classifier_scale, threshold=threshold, percentile=percentile,
        aug_level=aug_level, prompt=prompt, length=length, temperature=temperature, top_p=top_p,
        clamp=clamp, seed=seed, draft=draft, draft_length=draft_length, draft_steps=draft_steps,
        control=control, control_scale=control_scale, control_steps=control_steps,
        control_step_size=control_step_size,
    )  # fmt: skip
    start = time.perf_counter()
    samples = loaded.sample(n, **options)
    seconds = time.perf_counter() - start
    stem = out if out is not None else _run_folder(run) / "samples"
    for text in samples.texts or []:
        typer.echo(f"---\n{text}")
    for path in samples.save(stem, png=format_ == "png"):
        typer.echo(f"wrote {path}")
    count = len(samples.texts) if samples.texts is not None else len(samples.x)
    typer.echo(f"{count} samples in {seconds:.2f} s")


def _run_folder(run: Path) -> Path:
    return run if run.is_dir() else run.parent


def _pairs(items: list[str] | None) -> dict[str, Any] | None:
    """``--opt key=value`` pairs, values parsed as YAML (``3``, ``0.5``, ``true``, ``data``)."""
    import yaml

    if not items:
        return None
    options: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise UserError(f"--opt {item!r} must look like key=value, e.g. order=3")
        try:
            options[key] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise UserError(f"--opt {item!r}: cannot read the value {value!r}") from None
    return options


def _list_samplers() -> None:
    from difflab.discrete.samplers import TOKEN_SAMPLER_DESCRIPTIONS
    from difflab.gaussian.samplers import DESCRIPTIONS

    typer.echo("Image and vector models (options: --opt key=value; grids: --grid):")
    for name, description in DESCRIPTIONS.items():
        typer.echo(f"  {name:18s} {description}")
    typer.echo("Text models:")
    for name, description in TOKEN_SAMPLER_DESCRIPTIONS.items():
        typer.echo(f"  {name:18s} {description}")


@app.command(
    "eval",
    help="Negative log-likelihood of held-out data: bits/dim for images (variational bound or "
    "probability-flow ODE), perplexity bound and bits per character for text models.",
)
def evaluate(
    run: Annotated[Path, typer.Argument(help="Run folder or checkpoint file.")],
    n: Annotated[int | None, typer.Option("--n", help="Examples (held-out or sampled).")] = None,
    method: Annotated[
        str | None,
        typer.Option(
            help="Images: vlb (DDPM's bound, discretized decoder; default) or ode "
            "(probability-flow ODE likelihood, uniform dequantization)."
        ),
    ] = None,
    t_samples: Annotated[
        int | None, typer.Option(help="Monte Carlo time samples per example (vlb: default all T).")
    ] = None,
    ode_steps: Annotated[int | None, typer.Option(help="ode: RK4 steps in log-SNR.")] = None,
    probes: Annotated[int | None, typer.Option(help="ode: Hutchinson probes per example.")] = None,
    guidance: Annotated[
        float | None, typer.Option(help="Evaluations that sample: classifier-free scale w.")
    ] = None,
    sampler: Annotated[str | None, typer.Option(help="Evaluations that sample: sampler.")] = None,
    steps: Annotated[int | None, typer.Option(help="Evaluations that sample: steps.")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed.")] = None,
    judge: Annotated[
        Path | None,
        typer.Option(help="Text, latent-text runs: an ar run whose perplexity judges samples."),
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar.")] = False,
) -> None:
    import difflab

    _one_process("eval")
    loaded = difflab.load(run, device)
    options = _given(n=n, method=method, t_samples=t_samples, ode_steps=ode_steps,
                     probes=probes, guidance=guidance, sampler=sampler, steps=steps,
                     seed=seed, judge=judge)  # fmt: skip
    typer.echo(loaded.evaluate(progress=not quiet, **options).summary)


@app.command(
    help="Distil a trained run into a few-step sampler. --method progressive (Salimans & Ho "
    "2022; image and flow runs): halve the number of DDIM steps from --from-steps down to "
    "--to-steps, each halving a student initialised from its teacher and written to "
    "OUT/steps-N, a run that difflab sample draws from in N steps by default. --method reflow "
    "(Liu et al. 2023; flow runs): retrain the flow on --pairs noise-sample pairs it generates, "
    "into OUT/reflow-1, whose straighter paths need fewer steps. --method consistency (Song et "
    "al. 2023; image and flow runs): consistency distillation on --levels Karras levels into "
    "OUT/consistency, a run that difflab sample draws from in 1 step (--steps K: multistep). "
    "OUT defaults to RUN-METHOD."
)
def distill(
    run: Annotated[Path, typer.Argument(help="The teacher: a run folder or checkpoint file.")],
    method: Annotated[
        str, typer.Option(help="progressive, reflow or consistency.")
    ] = "progressive",
    to_steps: Annotated[
        int | None, typer.Option(help="progressive: steps of the last student (4).")
    ] = None,
    from_steps: Annotated[
        int | None,
        typer.Option(
            help="progressive: the teacher's DDIM steps, --to-steps times a power of two "
            "(default: the first at or above the run's sample.steps)."
        ),
    ] = None,
    prediction: Annotated[
        str | None,
        typer.Option(
            help="The student's parameterization: progressive x0, v or flow; consistency any "
            "(default: the teacher's if x0, v, flow or edm, else v)."
        ),
    ] = None,
    weighting: Annotated[
        str | None, typer.Option(help="progressive: truncated-snr (default) or v.")
    ] = None,
    pairs: Annotated[
        int | None, typer.Option(help="reflow: noise-sample pairs (4 per training example).")
    ] = None,
    pair_steps: Annotated[
        int | None, typer.Option(help="reflow: Euler steps per pair (the run's sample.steps).")
    ] = None,
    levels: Annotated[
        int | None, typer.Option(help="consistency: Karras levels N of the grid (18).")
    ] = None,
    target_ema: Annotated[
        float | None, typer.Option(help="consistency: EMA rate mu of the target network (0.95).")
    ] = None,
    solver: Annotated[
        str | None, typer.Option(help="consistency: the teacher's ODE step, heun or ddim.")
    ] = None,
    loss: Annotated[
        str | None,
        typer.Option(
            help="consistency: ict (log-normal levels, pseudo-Huber, 1/dsigma weights; "
            "default) or l2 (Algorithm 2)."
        ),
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Folder of the students.")] = None,
    train_steps: Annotated[
        int | None,
        typer.Option(
            help="Training steps per student (progressive 300, reflow and consistency 1000)."
        ),
    ] = None,
    batch_size: Annotated[int | None, typer.Option(help="Batch size (the run's).")] = None,
    lr: Annotated[
        float | None,
        typer.Option(help="Learning rate, constant (2e-4; consistency 1e-3)."),
    ] = None,
    guidance: Annotated[
        float | None,
        typer.Option(help="Classifier-free guidance scale of the teacher, fixed at distillation."),
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar.")] = False,
) -> None:
    from difflab.recipes.distill import distill as distill_run

    options = _given(to_steps=to_steps, from_steps=from_steps, prediction=prediction,
                     weighting=weighting, pairs=pairs, pair_steps=pair_steps, levels=levels,
                     target_ema=target_ema, solver=solver, loss=loss, train_steps=train_steps,
                     batch_size=batch_size, lr=lr, guidance=guidance, seed=seed)  # fmt: skip
    for student in distill_run(run, method=method, out=out, device=device, progress=not quiet,
                               **options):  # fmt: skip
        typer.echo(f"{student.steps} steps: {student.path} ({student.seconds:.0f} s)")


@app.command(
    help="Teach a text-to-image run a new concept from a folder of 32x32 RGB pictures (seed 004, "
    "fine-tuning). --method textual-inversion: a new word --token in the text encoder's "
    "vocabulary, initialised from --init-word, its row alone trained (--vectors K: K rows, read "
    "in a row); OUT holds them, for difflab sample RUN --embedding OUT. --method lora: low-rank "
    "adapters (A Gaussian, B zero, scale alpha/rank; Hugging Face peft) on the denoiser's "
    "attention projections, the base frozen; OUT is a small safetensors file of the adapter "
    "alone, for difflab sample RUN --adapter OUT[:SCALE] and difflab merge. Both train with the "
    "run's objective on --prompt with --token in its {}. --method dreambooth: the whole denoiser "
    "fine-tuned on --prompt with a known word as identifier, with the prior-preservation loss on "
    "--num-class-images pictures of --class-prompt the frozen run draws first; OUT is a new run "
    "folder; --train-text-encoder tunes the text encoder too. --method dreambooth --rank R: "
    "DreamBooth-LoRA, adapters trained with that loss (--train-text-encoder: on the text "
    "encoder's feed-forward maps too); OUT is an adapter file as LoRA's."
)
def finetune(
    run: Annotated[Path, typer.Argument(help="The text-to-image run folder.")],
    method: Annotated[str, typer.Option(help="lora, textual-inversion or dreambooth.")] = "lora",
    images: Annotated[
        Path | None, typer.Option(help="Folder of the concept's 32x32 RGB pictures.")
    ] = None,
    prompt: Annotated[
        str | None,
        typer.Option(
            help="Their caption, {} where the token goes: 'a {} letter A'; or one caption per "
            "picture in the folder's metadata.jsonl (JSON lines with file_name and text)."
        ),
    ] = None,
    token: Annotated[str | None, typer.Option(help="The concept's token, e.g. '<tt>'.")] = None,
    init_word: Annotated[
        str | None,
        typer.Option(
            help="LoRA: a word the run knows that an unknown token stands for; textual "
            "inversion: the word whose row the new one starts from."
        ),
    ] = None,
    vectors: Annotated[
        int | None,
        typer.Option(help="Textual inversion: vectors the token stands for, read in a row (1)."),
    ] = None,
    embedding: Annotated[
        list[Path] | None,
        typer.Option(
            help="LoRA: train over a textual-inversion embedding of this run (repeatable; its "
            "token is read with its own frozen rows: pivotal tuning); sample with it too."
        ),
    ] = None,
    rank: Annotated[
        int | None, typer.Option(help="LoRA rank r (4); with dreambooth: DreamBooth-LoRA.")
    ] = None,
    alpha: Annotated[
        float | None, typer.Option(help="LoRA alpha; the update is scaled alpha/r (default r).")
    ] = None,
    targets: Annotated[
        str | None,
        typer.Option(
            help="LoRA: what to adapt, a comma list of q,k,v,out (attention projections; the "
            "default) and conv (a U-Net's 3x3 convolutions)."
        ),
    ] = None,
    class_prompt: Annotated[
        str | None,
        typer.Option(
            help="DreamBooth: the class caption of the prior-preservation pictures; several, "
            "separated by ';', share them out in order (default: each training caption "
            "without the identifier, 'a red [V] letter' -> 'a red letter')."
        ),
    ] = None,
    num_class_images: Annotated[
        int | None,
        typer.Option(help="DreamBooth: class pictures the frozen run draws first (16)."),
    ] = None,
    class_guidance: Annotated[
        float | None,
        typer.Option(
            help="DreamBooth: guidance scale of the class pictures (the run's default; 0: "
            "samples of the model's own conditional)."
        ),
    ] = None,
    prior_weight: Annotated[
        float | None,
        typer.Option(help="DreamBooth: weight lambda of the prior-preservation loss (1; 0: off)."),
    ] = None,
    prior_target: Annotated[
        str | None,
        typer.Option(
            help="DreamBooth: what the prior term regresses on at a noisy class picture: "
            "pictures (the picture, as the paper; the default) or frozen (the frozen run's "
            "prediction there)."
        ),
    ] = None,
    train_text_encoder: Annotated[
        bool,
        typer.Option(
            "--train-text-encoder",
            help="DreamBooth: tune the text encoder too (with --rank: adapters on it).",
        ),
    ] = False,
    steps: Annotated[int | None, typer.Option(help="Training steps (200).")] = None,
    lr: Annotated[
        float | None,
        typer.Option(
            help="Learning rate, AdamW (LoRA 1e-3, textual inversion 5e-3, DreamBooth 5e-5)."
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    out: Annotated[
        Path | None,
        typer.Option(help="The adapter or embedding file, or DreamBooth's new run folder."),
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar.")] = False,
) -> None:
    _one_process("finetune")
    finetuning = _finetune_module()
    if method not in finetuning.METHODS:
        methods = ", ".join(finetuning.METHODS)
        raise UserError(f"--method must be one of {methods}, got {method!r}")
    for option, value in (("--images", images), ("--token", token), ("--out", out)):
        if value is None:
            raise UserError(f"difflab finetune needs {option}")
    common = dict(images=images, prompt=prompt, token=token, out=out, init_word=init_word,
                  seed=seed, device=device, progress=not quiet)  # fmt: skip
    common |= _given(steps=steps, lr=lr)
    lora_only = _given(rank=rank, targets=targets, alpha=alpha)
    inversion_only = _given(vectors=vectors)
    dreambooth_only = _given(class_prompt=class_prompt, num_class_images=num_class_images,
                             class_guidance=class_guidance, prior_weight=prior_weight,
                             prior_target=prior_target)  # fmt: skip
    dreambooth_only |= {"train_text_encoder": True} if train_text_encoder else {}
    if embedding and method != "lora":
        raise UserError("--embedding applies to --method lora only")
    for only, names in ((lora_only, ("lora", "dreambooth")),
                        (inversion_only, ("textual-inversion",)),
                        (dreambooth_only, ("dreambooth",))):  # fmt: skip
        if only and method not in names:
            option = "--" + next(iter(only)).replace("_", "-")
            raise UserError(f"{option} applies to --method {' or '.join(names)} only")
    if method == "lora":
        result = finetuning.finetune_lora(run, **common, **lora_only, embeddings=embedding or ())
    elif method == "textual-inversion":
        result = finetuning.finetune_embedding(run, **common, **inversion_only)
    else:
        if common.pop("init_word") is not None:
            raise UserError("--init-word does not apply to DreamBooth: its identifier --token "
                            "is a word the run knows")  # fmt: skip
        result = finetuning.finetune_dreambooth(run, **common, **lora_only, **dreambooth_only)
    files = sorted(result.path.rglob("*")) if result.path.is_dir() else [result.path]
    size = sum(f.stat().st_size for f in files if f.is_file())  # DreamBooth writes a run folder
    typer.echo(f"trained {result.steps} steps in {result.seconds:.1f} s, final loss "
               f"{result.final_loss:.4f}; {result.trainable:,} trained parameters "
               f"({result.trainable / result.base_params:.2%} of the base's "
               f"{result.base_params:,})\nwrote {result.path} ({size:,} bytes)")  # fmt: skip


@app.command(
    help="Fold LoRA adapters (FILE[:SCALE], repeatable) into a text-to-image run's weights: "
    "OUT becomes an ordinary run that samples as RUN with the adapters on."
)
def merge(
    run: Annotated[Path, typer.Argument(help="The text-to-image run folder.")],
    adapter: Annotated[
        list[str] | None, typer.Option(help="An adapter FILE[:SCALE], repeatable.")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="The merged run's folder (new).")] = None,
) -> None:
    _one_process("merge")
    if not adapter or out is None:
        raise UserError("difflab merge needs --adapter FILE[:SCALE] and --out FOLDER")
    typer.echo(f"merged run: {_finetune_module().merge(run, adapter, out)}")


def _finetune_module() -> Any:
    """:mod:`difflab.recipes.finetune`, or one line saying how to install peft."""
    try:
        from difflab.recipes import finetune
    except ModuleNotFoundError as e:
        if e.name is None or e.name.split(".")[0] not in ("peft", "transformers", "accelerate"):
            raise
        raise UserError(f"LoRA needs peft ({e.name} is missing): pip install "
                        "'difflab[finetune]'") from None  # fmt: skip
    return finetune


@app.command(
    help="Adapt a trained ar text run into a masked diffusion language model (Gong et al. "
    "2024): the same transformer and weights, its outputs shifted (position i-1 predicts token "
    "i), its attention mask annealed from causal to bidirectional over adapt.anneal_steps, "
    "trained with the masked-diffusion loss. OUT becomes an ordinary MDLM run (sample, eval, "
    "--draft); continue it with difflab train OUT --resume."
)
def adapt(
    run: Annotated[Path, typer.Argument(help="The ar run folder to adapt.")],
    overrides: Annotated[
        list[str] | None,
        typer.Argument(help="key=value overrides, e.g. adapt.anneal_steps=500 train.steps=2000."),
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Folder of the adapted run (required).")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar.")] = False,
) -> None:
    from difflab.recipes import is_run
    from difflab.recipes import train as train_run

    if out is None:
        raise UserError("give the folder of the adapted run with --out")
    if not is_run(run):
        raise UserError(f"no run in {run}: give the folder of a trained ar text run")
    items = [*(overrides or []), f"train.out={out}"]
    result = train_run(run, items, recipe="adapt", progress=not quiet)
    typer.echo(f"adapted in {result.steps} steps, {result.seconds:.1f} s\n"
               f"checkpoint: {result.checkpoint}")  # fmt: skip


@app.command(
    name="train-control",
    help="Train the control classifier of a diffusion-lm text run (p(word | x_t) at each "
    "position, on the run's noisy embeddings) into RUN/control, for difflab sample RUN "
    "--control NAME=VALUE.",
)
def train_control(
    run: Annotated[Path, typer.Argument(help="The diffusion-lm run folder.")],
    steps: Annotated[int | None, typer.Option(help="Training steps (500).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar.")] = False,
) -> None:
    import difflab
    from difflab.recipes.text import TextRecipe
    from difflab.recipes.text.control import train_control as train_classifier

    _one_process("train-control")
    loaded = difflab.load(run, device)
    if not isinstance(loaded.recipe, TextRecipe):
        raise UserError(f"{run} is a run of the {loaded.recipe.name} recipe, not a text run")
    result = train_classifier(loaded.model, steps=steps, progress=not quiet)
    typer.echo(f"trained {result.steps} steps in {result.seconds:.1f} s\n"
               f"checkpoint: {result.checkpoint}")  # fmt: skip


@app.command(
    help="Train a class-conditional model on the built-in digits (about 2.5 minutes on 2 CPU "
    "cores), then write a grid of samples (one row per class), an animation of the reverse "
    "process and the loss curve. With --text: a masked diffusion language model and an "
    "autoregressive one of the same size, trained for the same time on Shakespeare, with "
    "passages and bits per character from both. With --glyphs: an autoencoder of the built-in "
    "glyphs and a latent text-to-image model on it (about 9 minutes in all), with a grid of "
    "prompts by seeds. Never deletes files difflab did not write."
)
def demo(
    out: Annotated[
        Path | None,
        typer.Option(help="Folder (default runs/demo, runs/demo-text, runs/demo-glyphs)."),
    ] = None,
    steps: Annotated[
        int | None,
        typer.Option(help="Training steps (digits demo; glyphs demo: each of its two models)."),
    ] = None,
    text_: Annotated[bool, typer.Option("--text", help="The text demo.")] = False,
    glyphs: Annotated[bool, typer.Option("--glyphs", help="The text-to-image demo.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar.")] = False,
) -> None:
    from difflab.recipes import get, run_demo

    _one_process("demo")
    if text_ and glyphs:
        raise UserError("--text and --glyphs name two demos: choose one")
    name, default = ("text", "runs/demo-text") if text_ else ("image", "runs/demo")
    if glyphs:
        name, default = "text-to-image", "runs/demo-glyphs"
    recipe = get(name)
    folder = out or Path(default)
    typer.echo(run_demo(recipe, folder, quiet=quiet, **_given(steps=steps)))


@app.command(
    help="Serve the explorer, a local web page of the lectures' figures on exact oracles and on "
    "your runs: the forward process, the score field and sampler paths in 2-D, the reverse "
    "process of an image model, guidance, and a text model unmasking a passage. Needs the "
    "explore extra (pip install 'difflab[explore]')."
)
def explore(
    runs: Annotated[
        list[Path] | None, typer.Argument(help="Run folders to open (2-D, image or text runs).")
    ] = None,
    host: Annotated[str, typer.Option(help="Address to serve on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to serve on.")] = 7860,
) -> None:
    try:
        from difflab.explore.app import serve
    except ModuleNotFoundError as e:
        if e.name != "gradio":
            raise
        raise UserError("the explorer needs gradio: pip install 'difflab[explore]'") from None
    if not 0 < port < 65536:
        raise UserError(f"--port must be in 1..65535, got {port}")
    serve([str(r) for r in runs or []], host, port)


def _one_process(command: str) -> None:
    """Refuse ``command`` in a job of many processes: only training is shared out."""
    from difflab.train.distributed import world

    if world().size > 1:
        raise UserError(f"difflab {command} runs in one process: start it without torchrun "
                        "(only difflab train uses many)")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    """Entry point: every usage error, :class:`UserError`, failed allocation and file-system
    error becomes one line and exit 2; Ctrl-C or SIGTERM during training saves a checkpoint and
    exits with 130. Under ``torchrun``, rank 0 reports for the job; the first process that
    fails says why (its line names its rank) and the others, stopped by its absence, stay
    quiet (exit 1)."""
    from difflab.files import file_error
    from difflab.train import distributed
    from difflab.train.trainer import Interrupted

    try:
        code = app(args=argv, standalone_mode=False)
    except UserError as e:
        _fail(str(e))
    except click_errors.NoArgsIsHelpError as e:
        typer.echo(e.ctx.get_help() if e.ctx else str(e))
        sys.exit(2)
    except click_errors.ClickException as e:
        _fail(e.format_message())
    except Interrupted as e:
        if _is_main():
            typer.echo(f"difflab: {e}", err=True)
        sys.exit(130)
    except (KeyboardInterrupt, typer.Abort):
        if _is_main():
            typer.echo("difflab: interrupted", err=True)
        sys.exit(130)
    except (MemoryError, RuntimeError) as e:
        if distributed.failed_elsewhere():  # a collective broke because that process left
            sys.exit(1)
        if not _out_of_memory(e):
            distributed.claim_failure()
            raise
        _fail("out of memory: ask for fewer samples (--n), a smaller train.batch_size or a "
              "smaller model")  # fmt: skip
    except OSError as e:  # a file-system failure no reader turned into a UserError itself
        _fail(str(file_error(e, e.filename or "a file")))
    sys.exit(code if isinstance(code, int) else 0)


def _out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is a failed allocation (Python's, or PyTorch's on the CPU or a GPU)."""
    import torch

    return isinstance(error, (MemoryError, torch.OutOfMemoryError)) or (
        "can't allocate memory" in str(error)
    )


def _fail(message: str) -> None:
    """Say ``message`` in one line (under torchrun: if this is the job's first failure, with
    the rank) and exit 2."""
    from difflab.train import distributed

    if distributed.claim_failure():
        world = _world()
        rank = f"rank {world.rank} of {world.size}: " if world and world.size > 1 else ""
        typer.echo("difflab: error: " + rank + " ".join(message.split()), err=True)
    sys.exit(2)


def _world() -> Any:
    """This process's :class:`~difflab.train.distributed.World`, ``None`` when torchrun's
    variables are broken (that error is being reported)."""
    from difflab.train.distributed import world

    try:
        return world()
    except UserError:
        return None


def _is_main() -> bool:
    world = _world()
    return world is None or world.rank == 0


if __name__ == "__main__":
    main()
