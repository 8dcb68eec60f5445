"""``difflab distill RUN --method progressive | reflow | consistency``: few-step students of a
trained run.

**progressive** (Salimans & Ho 2022; seed 004, Algorithm 2), for ``image`` and ``flow`` runs.
Starting from the teacher sampled by DDIM on ``from_steps`` steps of its schedule's own grid
(:meth:`Schedule.timesteps`, ``trailing`` for discrete schedules: every other point of the
``2N``-step grid is the ``N``-step grid), each halving trains a student, initialised with the
teacher's (EMA) weights, so that one of its DDIM steps lands where two of the teacher's land
(the target ``x~`` and weights of ``gaussian/distillation.py``); the student is then the next
teacher, until ``to_steps`` remain. Each halving writes an ordinary run folder of the ``image``
recipe, ``OUT/steps-N``, whose ``sample`` section is DDIM on ``N`` steps (so ``difflab sample
OUT/steps-4`` takes 4 steps by default) and whose ``train`` section is the distillation's.
The student predicts ``x0``, ``v`` or ``flow`` (by default the teacher's parameterization when it
is one of those, else ``v``). Its network is the teacher's, weights included; when the
parameterization changes (an ``eps`` teacher) the copied output layer first means the wrong
quantity and the first halving has to relearn it, so it needs more training steps.

**reflow** (Liu et al. 2023; ``gaussian/rectified_flow.py``), for ``flow`` runs on the linear
path: ``pairs`` noise draws ``eps`` are carried to ``x_0`` by ``pair_steps`` Euler steps of the
teacher's flow ODE from ``t = 1``, and a student initialised from the teacher is trained with
the flow-matching loss on these coupled pairs (``x_t = (1 - t) x_0 + t eps``, target
``eps - x_0``). It writes a ``flow`` run, ``OUT/reflow-1``, with the teacher's sampling
defaults; its straighter paths need fewer steps (``difflab sample OUT/reflow-1 --steps 2``),
and it can be distilled further (``difflab distill OUT/reflow-1 --method progressive``).

**consistency** (Song et al. 2023, Algorithm 2 in seed 004; ``gaussian/consistency.py``), for
``image`` and ``flow`` runs: a student of the ``consistency`` recipe (``recipes/consistency.py``),
initialised with the teacher's (EMA) weights and its schedule, learns ``f(x~, sigma) = c_skip
x~ + c_out F`` on ``levels`` Karras levels between the consistency recipe's default
``sigma_min`` and ``sigma_max`` of the teacher's schedule, so that ``f`` at level
``sigma_{n+1}`` matches the EMA target network (rate ``target_ema``) at the point one step of
the teacher's probability-flow ODE (``solver``: ``heun``, or ``ddim``) brings it down to
``sigma_n``, by ``loss`` ``ict`` (the default: levels drawn from improved consistency
training's log-normal, pseudo-Huber distance weighted by ``1 / (sigma_{n+1} - sigma_n)``) or
``l2`` (Algorithm 2's squared distance on uniform levels). Its network keeps the teacher's
parameterization when that is ``x0``, ``v``, ``flow`` or ``edm`` (else ``v``, relearned from
the copied output layer, like progressive distillation: an ``eps`` network's data estimate
``(x_t - sigma eps) / alpha`` amplifies its errors by ``1 / alpha``, 80 at the top level;
``prediction`` chooses any). It writes one run, ``OUT/consistency``, that ``difflab sample``
draws from in 1 step (``--steps K``: multistep consistency sampling). The EMA target is not
saved: the run is not resumable as a distillation.

Class-conditional teachers with classifier-free guidance: the guidance scale ``w`` is fixed at
distillation time (guided distillation with a fixed scale, not as an input of the student): the
first teacher is sampled with guidance ``w``. Progressive and consistency distillation drop
labels to the null label at the teacher's ``cond_drop`` rate, so the student learns the guided
map for labels and the unconditional one for the null label (the consistency student's
teacher takes Heun steps of the guided ODE); reflow generates its pairs for labels cycled over
the classes and trains with the same label dropout (its null label learns the reflow of the
guided mixture). The students' samples carry the guidance; their ``sample.guidance`` is 0. The
teacher's x_0 estimate is thresholded as its own sampler does (static for images).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from difflab.config import TrainConfig, choose, from_dict, to_dict
from difflab.errors import UserError
from difflab.gaussian.consistency import (
    DISTILLATION_LOSSES,
    SOLVERS,
    consistency_distillation_loss,
    ode_step,
)
from difflab.gaussian.distillation import (
    DISTILL_WEIGHTINGS,
    STUDENT_PREDICTIONS,
    progressive_loss,
)
from difflab.gaussian.objectives import loss_fn
from difflab.gaussian.parameterization import PREDICTIONS
from difflab.gaussian.rectified_flow import reflow_pairs
from difflab.recipes import Run, finite, is_run, load, positive_int, refuse_unknown, seed_value
from difflab.recipes.consistency import RECIPE as CONSISTENCY
from difflab.recipes.consistency import (
    ConsistencyConfig,
    consistency_function,
    level_grid,
    sigma_range,
)
from difflab.recipes.image import RECIPE as IMAGE
from difflab.recipes.image import (
    SAMPLE_CHUNK,
    ImageConfig,
    LoadedModel,
    build_denoiser,
    data_splits,
    drop_labels,
    guided_denoiser,
    run_metadata,
    threshold_settings,
)
from difflab.train.trainer import Trainer

#: The recipes whose runs each method distils.
TEACHERS: dict[str, tuple[str, ...]] = {
    "progressive": ("image", "flow"),
    "reflow": ("flow",),
    "consistency": ("image", "flow"),
}
METHODS: tuple[str, ...] = tuple(TEACHERS)


@dataclass
class Student:
    """One student: its default number of sampling steps, its run folder and its training
    time (pair generation included)."""

    steps: int
    path: Path
    seconds: float


def distill(
    run: str | Path,
    *,
    method: str = "progressive",
    out: str | Path | None = None,
    device: str = "auto",
    progress: bool = True,
    **options: Any,
) -> list[Student]:
    """The students of ``run`` by ``method`` (:func:`progressive`, :func:`reflow` or
    :func:`consistency`, whose
    keyword arguments are the ``options`` it takes; any other is refused), written into ``out``
    (default ``RUN-<method>``)."""
    choose("--method", method, METHODS)
    fn = {"progressive": progressive, "reflow": reflow, "consistency": consistency}[method]
    refuse_unknown(options, fn, f"--method {method}")
    teacher_run = load(run, device)
    if teacher_run.recipe.name not in TEACHERS[method]:
        raise UserError(f"--method {method} distils runs of the "
                        f"{' and '.join(TEACHERS[method])} recipe; {run} is a "
                        f"{teacher_run.recipe.name} run")  # fmt: skip
    if teacher_run.config.model.self_condition:
        raise UserError(f"--method {method} does not distil a self-conditioned run "
                        f"(model.self_condition=true): {run}")  # fmt: skip
    out = Path(out) if out is not None else Path(f"{Path(run).resolve()}-{method}")
    return fn(teacher_run, out=out, device=device, progress=progress, **options)


def progressive(
    teacher_run: Run,
    *,
    out: Path,
    device: str,
    progress: bool,
    to_steps: int = 4,
    from_steps: int | None = None,
    train_steps: int = 300,
    batch_size: int | None = None,
    lr: float = 2e-4,
    prediction: str | None = None,
    weighting: str = "truncated-snr",
    guidance: float | None = None,
    seed: int = 0,
) -> list[Student]:
    """Progressive distillation of ``teacher_run`` into ``to_steps`` DDIM steps, halving from
    ``from_steps`` (default: the smallest ``to_steps * 2^k >= `` the teacher's ``sample.steps``,
    ``k >= 1``), each halving ``train_steps`` steps of AdamW at ``lr`` (constant, EMA 0.99) on
    batches of ``batch_size`` (default: the teacher's), into ``out/steps-N``. ``prediction``:
    the student's (x0, v or flow); ``weighting``: truncated-snr or v; ``guidance``: the fixed
    classifier-free guidance scale of the first teacher (default: its ``sample.guidance``).
    Every argument is checked, and no folder is written, before training starts."""
    to_steps = positive_int("to_steps", to_steps)
    teacher: LoadedModel = teacher_run.model
    cfg = teacher.config
    prediction = _student_prediction(prediction, cfg.diffusion.prediction)
    choose("--weighting", weighting, DISTILL_WEIGHTINGS)
    training = _training(cfg, train_steps, batch_size, lr, seed, device)
    w = _guidance(guidance, teacher)
    halvings = _halvings(to_steps, from_steps, cfg.sample.steps, teacher.denoiser.schedule.T)
    folders = _free_folders([out / f"steps-{n}" for n in halvings])
    threshold, percentile = threshold_settings(None, None, cfg.sample.threshold, teacher.shape)
    train_data, _ = data_splits(cfg.data)
    num_classes = teacher.num_classes
    tensors = (train_data.x,) if num_classes is None else (train_data.x, train_data.labels)
    run = teacher_run.path
    result = []
    for n, folder in zip(halvings, folders, strict=True):
        teacher_den = guided_denoiser(teacher, guidance=w, threshold=threshold,
                                      percentile=percentile)  # fmt: skip
        grid = teacher.denoiser.schedule.timesteps(2 * n)
        student_cfg = _student_config(cfg, prediction, n, replace(training, out=str(folder)))
        meta = run_metadata(IMAGE.name, student_cfg, train_data, distilled={
            "method": "progressive", "teacher": str(run), "teacher_steps": 2 * n, "steps": n,
            "guidance": w, "weighting": weighting, "from_steps": halvings[0] * 2,
        })  # fmt: skip
        net = IMAGE.build(student_cfg, meta)
        net.load_state_dict(teacher.denoiser.net.state_dict())
        loss = _loss(student_cfg, teacher_den, grid, weighting, num_classes)
        start = time.perf_counter()
        Trainer(net, loss, tensors, student_cfg.train, meta, folder).fit(progress=progress)
        result.append(Student(n, folder, time.perf_counter() - start))
        teacher, w = IMAGE.load(folder, device), 0.0  # the guidance is in the student now
    return result


def _student_prediction(prediction: str | None, teacher: str) -> str:
    """The student's parameterization: the one asked for, else the teacher's if a student may
    have it, else ``v``."""
    if prediction is None:
        return teacher if teacher in STUDENT_PREDICTIONS else "v"
    choose("--prediction", prediction, STUDENT_PREDICTIONS)
    return prediction


def _halvings(to_steps: int, from_steps: int | None, teacher_steps: int, T: int | None) -> list:
    """The students' step counts ``from_steps / 2, from_steps / 4, ..., to_steps``."""
    if from_steps is None:
        k = max(1, math.ceil(math.log2(max(teacher_steps, 1) / to_steps)))
        from_steps = to_steps * 2**k
    from_steps = positive_int("from_steps", from_steps)
    k = round(math.log2(from_steps / to_steps)) if from_steps > to_steps else 0
    if k < 1 or from_steps != to_steps * 2**k:
        raise UserError(f"--from-steps must be --to-steps times a power of two (2, 4, ...), got "
                        f"{from_steps} and {to_steps}")  # fmt: skip
    if T is not None and from_steps > T:
        raise UserError(f"--from-steps {from_steps} exceeds the teacher's {T} training steps")
    return [to_steps * 2**j for j in range(k - 1, -1, -1)]


def _student_config(
    cfg: ImageConfig, prediction: str, steps: int, training: TrainConfig
) -> ImageConfig:
    """The image-recipe config of a progressive student: the teacher's with the student's
    prediction, DDIM on ``steps`` as its sampler, and the distillation's training settings."""
    raw = to_dict(cfg)
    raw["diffusion"].update(prediction=prediction, weighting="simple", sigma_data=None)
    raw["sample"].update(sampler="ddim", steps=steps, grid="trailing", eta=None, guidance=0.0)
    raw["train"] = to_dict(training)
    return from_dict(ImageConfig, raw).validate()


def _training(
    cfg: ImageConfig, steps: int, batch_size: int | None, lr: float, seed: int, device: str
) -> TrainConfig:
    """The students' training settings, checked: AdamW at a constant ``lr``, EMA 0.99, one
    checkpoint at the end; ``batch_size`` defaults to the teacher's."""
    batch_size = cfg.train.batch_size if batch_size is None else batch_size
    steps = positive_int("train_steps", steps)
    return TrainConfig(steps=steps, batch_size=positive_int("batch_size", batch_size),
                       lr=finite("lr", lr, 1e-12, 1.0), warmup=0, lr_schedule="constant",
                       ema=0.99, seed=seed_value(seed), device=device,
                       ckpt_every=steps)  # fmt: skip


def _guidance(guidance: float | None, teacher: LoadedModel) -> float:
    """The fixed guidance scale of the teacher: the one given, else its ``sample.guidance``."""
    w = teacher.config.sample.guidance if guidance is None else finite("guidance", guidance, 0.0)
    if w > 0 and teacher.num_classes is None:
        raise UserError("--guidance needs a class-conditional teacher")
    return w


def _free_folders(folders: list[Path]) -> list[Path]:
    """``folders``, refused if any already holds a run or is a file (nothing is replaced)."""
    for folder in folders:
        if is_run(folder) or (folder.exists() and not folder.is_dir()):
            raise UserError(f"{folder} already exists: choose another --out")
    return folders


def _loss(cfg: ImageConfig, teacher: Any, grid: torch.Tensor, weighting: str,
          num_classes: int | None):  # fmt: skip
    """``loss(net, batch, generator)`` of one halving for the trainer."""

    def loss(net: torch.nn.Module, batch: tuple[torch.Tensor, ...], generator) -> torch.Tensor:
        cond = None
        if num_classes is not None:
            labels = drop_labels(batch[1], num_classes, cfg.diffusion.cond_drop, generator)
            cond = {"class_labels": labels}
        student = build_denoiser(net, cfg.diffusion)
        return progressive_loss(student, teacher, batch[0], grid, cond, weighting=weighting,
                                generator=generator)  # fmt: skip

    return loss


def reflow(
    teacher_run: Run,
    *,
    out: Path,
    device: str,
    progress: bool,
    pairs: int | None = None,
    pair_steps: int | None = None,
    train_steps: int = 1000,
    batch_size: int | None = None,
    lr: float = 2e-4,
    guidance: float | None = None,
    seed: int = 0,
) -> list[Student]:
    """One round of reflow of a flow run on the linear path (module docstring): ``pairs``
    noise-sample pairs (default: 4 per training example) by ``pair_steps`` Euler steps of its
    ODE (default: its ``sample.steps``), then ``train_steps`` steps on them, into
    ``out/reflow-1``."""
    teacher: LoadedModel = teacher_run.model
    cfg = teacher.config
    if cfg.diffusion.schedule != "rectified-flow":
        raise UserError(f"reflow straightens the linear path (diffusion.schedule=rectified-flow); "
                        f"this run's schedule is {cfg.diffusion.schedule}")  # fmt: skip
    training = _training(cfg, train_steps, batch_size, lr, seed, device)
    w = _guidance(guidance, teacher)
    train_data, _ = data_splits(cfg.data)
    pairs = 4 * len(train_data) if pairs is None else positive_int("pairs", pairs)
    steps = cfg.sample.steps if pair_steps is None else positive_int("pair_steps", pair_steps)
    (folder,) = _free_folders([out / "reflow-1"])
    threshold, percentile = threshold_settings(None, None, cfg.sample.threshold, teacher.shape)
    den = guided_denoiser(teacher, guidance=w, threshold=threshold, percentile=percentile)
    start = time.perf_counter()
    gen = torch.Generator().manual_seed(training.seed)
    noise = torch.randn((pairs, *teacher.shape), generator=gen)
    labels = None
    if teacher.num_classes is not None:
        labels = torch.arange(pairs) % teacher.num_classes
    samples = []
    for rows in torch.arange(pairs).split(SAMPLE_CHUNK):
        cond = None if labels is None else {"class_labels": labels[rows].to(teacher.device)}
        samples.append(reflow_pairs(den, noise[rows].to(teacher.device), steps, cond).cpu())
    x = torch.cat(samples)
    student_cfg = from_dict(type(cfg), {**to_dict(cfg), "train": to_dict(
        replace(training, out=str(folder)))}).validate()  # fmt: skip
    student_cfg.sample.guidance = 0.0
    meta = run_metadata(teacher_run.recipe.name, student_cfg, train_data, distilled={
        "method": "reflow", "teacher": str(teacher_run.path), "pairs": pairs,
        "pair_steps": steps, "guidance": w,
    })  # fmt: skip
    net = teacher_run.recipe.build(student_cfg, meta)
    net.load_state_dict(teacher.denoiser.net.state_dict())
    d, num_classes = student_cfg.diffusion, teacher.num_classes

    def loss(net: torch.nn.Module, batch: tuple[torch.Tensor, ...], generator) -> torch.Tensor:
        cond = None
        if num_classes is not None:
            cond = {"class_labels": drop_labels(batch[2], num_classes, d.cond_drop, generator)}
        return loss_fn(build_denoiser(net, d), batch[0], cond, weighting=d.weighting,
                       generator=generator, eps=batch[1])  # fmt: skip

    tensors = (x, noise) if labels is None else (x, noise, labels)
    Trainer(net, loss, tensors, student_cfg.train, meta, folder).fit(progress=progress)
    return [Student(student_cfg.sample.steps, folder, time.perf_counter() - start)]


#: The parameterizations a consistency student keeps from its teacher by default (else it
#: predicts ``v``; any of ``PREDICTIONS`` may be asked for).
CONSISTENCY_PREDICTIONS: tuple[str, ...] = (*STUDENT_PREDICTIONS, "edm")


def consistency(
    teacher_run: Run,
    *,
    out: Path,
    device: str,
    progress: bool,
    levels: int = 18,
    target_ema: float = 0.95,
    solver: str = "heun",
    loss: str = "ict",
    prediction: str | None = None,
    train_steps: int = 1000,
    batch_size: int | None = None,
    lr: float = 1e-3,
    guidance: float | None = None,
    seed: int = 0,
) -> list[Student]:
    """Consistency distillation of ``teacher_run`` (module docstring) on ``levels`` Karras
    levels (Song et al.'s N, 18 for CIFAR-10), EMA target rate ``target_ema`` (their mu, 0.95),
    the teacher's ODE step by ``solver`` (heun or ddim), the ``loss`` ``ict`` (Song & Dhariwal's
    level distribution, weighting and pseudo-Huber distance) or ``l2`` (Algorithm 2's squared
    distance, levels uniform; :func:`consistency_distillation_loss`), ``train_steps`` steps of
    AdamW at ``lr`` (constant; the sampled weights an EMA of 0.99) on batches of
    ``batch_size`` (default: the teacher's), into ``out/consistency``. ``prediction``: the
    student's parameterization (default: the teacher's if one of
    :data:`CONSISTENCY_PREDICTIONS`, else ``v``); ``guidance``: the fixed classifier-free
    guidance scale of the teacher (default: its ``sample.guidance``). Every argument is
    checked, and no folder is written, before training starts."""
    teacher: LoadedModel = teacher_run.model
    cfg = teacher.config
    levels = positive_int("levels", levels)
    if levels < 2:
        raise UserError(f"--levels must be at least 2 (one ODE step between two levels), got "
                        f"{levels}")  # fmt: skip
    mu = finite("target_ema", target_ema, 0.0, 1.0)
    choose("--solver", solver, SOLVERS)
    choose("--loss", loss, DISTILLATION_LOSSES)
    if prediction is None:
        prediction = cfg.diffusion.prediction
        prediction = prediction if prediction in CONSISTENCY_PREDICTIONS else "v"
    choose("--prediction", prediction, PREDICTIONS)
    training = _training(cfg, train_steps, batch_size, lr, seed, device)
    w = _guidance(guidance, teacher)
    (folder,) = _free_folders([out / "consistency"])
    threshold, percentile = threshold_settings(None, None, cfg.sample.threshold, teacher.shape)
    teacher_den = guided_denoiser(teacher, guidance=w, threshold=threshold, percentile=percentile)
    student_cfg = _consistency_config(cfg, prediction, replace(training, out=str(folder)))
    sigma_min, sigma_max = sigma_range(student_cfg)
    train_data, _ = data_splits(cfg.data)
    meta = run_metadata(CONSISTENCY.name, student_cfg, train_data, distilled={
        "method": "consistency", "teacher": str(teacher_run.path), "levels": levels,
        "target_ema": mu, "solver": solver, "loss": loss, "guidance": w, "sigma_min": sigma_min,
        "sigma_max": sigma_max,
    })  # fmt: skip
    net = CONSISTENCY.build(student_cfg, meta)
    net.load_state_dict(teacher.denoiser.net.state_dict())
    d, num_classes = student_cfg.diffusion, teacher.num_classes
    times = level_grid(teacher.denoiser.schedule, student_cfg, levels)
    tensors = (train_data.x,) if num_classes is None else (train_data.x, train_data.labels)

    def step(x_t: torch.Tensor, t: torch.Tensor, s: torch.Tensor, cond) -> torch.Tensor:
        return ode_step(teacher_den, x_t, t, s, cond, solver=solver)  # type: ignore[arg-type]

    updated = [0]  # the trainer's step at the target network's last update

    def batch_loss(net: torch.nn.Module, batch: tuple[torch.Tensor, ...], generator):
        if trainer.step != updated[0]:  # after each optimiser step: theta- <- EMA of theta
            torch._foreach_lerp_(target_weights, weights, 1.0 - mu)
            updated[0] = trainer.step
        cond = None
        if num_classes is not None:
            cond = {"class_labels": drop_labels(batch[1], num_classes, d.cond_drop, generator)}
        student = consistency_function(build_denoiser(net, d), student_cfg)
        target_fn = consistency_function(build_denoiser(target, d), student_cfg)
        return consistency_distillation_loss(student, target_fn, step, batch[0], times, cond,
                                             loss=loss, generator=generator)  # fmt: skip

    start = time.perf_counter()
    trainer = Trainer(net, batch_loss, tensors, student_cfg.train, meta, folder)
    target = copy.deepcopy(trainer.model).requires_grad_(False)
    weights = [p.detach() for p in trainer.model.parameters()]
    target_weights = [p.detach() for p in target.parameters()]
    trainer.fit(progress=progress)
    return [Student(student_cfg.sample.steps, folder, time.perf_counter() - start)]


def _consistency_config(cfg: ImageConfig, prediction: str, training: TrainConfig):
    """The consistency-recipe config of a student: the teacher's data, network and schedule
    with the student's parameterization, one sampling step, the teacher's threshold, and the
    distillation's training settings."""
    raw = to_dict(cfg)
    sigma_data = raw["diffusion"]["sigma_data"] if prediction == "edm" else None
    raw["diffusion"].update(prediction=prediction, weighting="simple", sigma_data=sigma_data)
    s = cfg.sample
    raw["sample"] = {"steps": 1, "threshold": s.threshold, "n": s.n, "seed": s.seed}
    raw["train"] = to_dict(training)
    return from_dict(ConsistencyConfig, raw).validate()
