"""``difflab distill RUN --method progressive --to-steps 4``: progressive distillation
(Salimans & Ho 2022; seed 004, Algorithm 2) of a trained ``image`` or ``flow`` run.

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

Class-conditional teachers with classifier-free guidance: the guidance scale ``w`` is fixed at
distillation time (guided distillation with a fixed scale, not as an input of the student): the
first teacher is sampled with guidance ``w``, and labels are dropped to the null label at the
teacher's ``cond_drop`` rate, so the student learns the guided map for labels and the
unconditional one for the null label. Its samples carry the guidance; its ``sample.guidance``
is 0. The teacher's x_0 estimate is thresholded as its own sampler does (static for images).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from difflab.config import TrainConfig, choose, from_dict, to_dict
from difflab.errors import UserError
from difflab.gaussian.distillation import (
    DISTILL_WEIGHTINGS,
    STUDENT_PREDICTIONS,
    progressive_loss,
)
from difflab.recipes import finite, is_run, load, positive_int, seed_value
from difflab.recipes.image import RECIPE as IMAGE
from difflab.recipes.image import (
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

METHODS: tuple[str, ...] = ("progressive",)
#: The recipes whose runs can be distilled: a Gaussian denoiser of images or vectors.
TEACHERS: tuple[str, ...] = ("image", "flow")


@dataclass
class Halving:
    """One halving: the student's step count, its run folder and the training time."""

    steps: int
    path: Path
    seconds: float


def distill(
    run: str | Path,
    *,
    method: str = "progressive",
    to_steps: int = 4,
    from_steps: int | None = None,
    out: str | Path | None = None,
    train_steps: int = 300,
    batch_size: int | None = None,
    lr: float = 2e-4,
    prediction: str | None = None,
    weighting: str = "truncated-snr",
    guidance: float | None = None,
    seed: int = 0,
    device: str = "auto",
    progress: bool = True,
) -> list[Halving]:
    """Distil the run ``run`` by ``method`` into ``to_steps`` DDIM steps, halving from
    ``from_steps`` (default: the smallest ``to_steps * 2^k >= `` the teacher's ``sample.steps``,
    ``k >= 1``), each halving ``train_steps`` steps of AdamW at ``lr`` (constant, EMA 0.99) on
    batches of ``batch_size`` (default: the teacher's), into ``out/steps-N`` (default
    ``RUN-progressive``). ``prediction``: the student's (x0, v or flow); ``weighting``:
    truncated-snr or v; ``guidance``: the fixed classifier-free guidance scale of the first
    teacher (default: its ``sample.guidance``). Every argument is checked, and no folder is
    written, before training starts."""
    choose("--method", method, METHODS)
    to_steps = positive_int("to_steps", to_steps)
    train_steps = positive_int("train_steps", train_steps)
    lr = finite("lr", lr, 1e-12, 1.0)
    seed = seed_value(seed)
    choose("--weighting", weighting, DISTILL_WEIGHTINGS)
    teacher_run = load(run, device)
    if teacher_run.recipe.name not in TEACHERS:
        raise UserError(f"progressive distillation distils runs of the {' and '.join(TEACHERS)} "
                        f"recipes; {run} is a {teacher_run.recipe.name} run")  # fmt: skip
    teacher: LoadedModel = teacher_run.model
    cfg = teacher.config
    prediction = _student_prediction(prediction, cfg.diffusion.prediction)
    if batch_size is None:
        batch_size = cfg.train.batch_size
    batch_size = positive_int("batch_size", batch_size)
    w = cfg.sample.guidance if guidance is None else finite("guidance", guidance, 0.0)
    if w > 0 and teacher.num_classes is None:
        raise UserError("--guidance needs a class-conditional teacher")
    halvings = _halvings(to_steps, from_steps, cfg.sample.steps, teacher.denoiser.schedule.T)
    out = Path(out) if out is not None else Path(f"{Path(run).resolve()}-{method}")
    folders = [out / f"steps-{n}" for n in halvings]
    for folder in folders:
        if is_run(folder) or (folder.exists() and not folder.is_dir()):
            raise UserError(f"{folder} already exists: choose another --out")
    threshold, percentile = threshold_settings(None, None, cfg.sample.threshold, teacher.shape)
    train_data, _ = data_splits(cfg.data)
    num_classes = teacher.num_classes
    tensors = (train_data.x,) if num_classes is None else (train_data.x, train_data.labels)
    result = []
    for n, folder in zip(halvings, folders, strict=True):
        teacher_den = guided_denoiser(teacher, guidance=w, threshold=threshold,
                                      percentile=percentile)  # fmt: skip
        grid = teacher.denoiser.schedule.timesteps(2 * n)
        student_cfg = _student_config(cfg, prediction, n, folder, train_steps, batch_size, lr,
                                      seed, device)  # fmt: skip
        meta = run_metadata(IMAGE.name, student_cfg, train_data, distilled={
            "method": method, "teacher": str(run), "teacher_steps": 2 * n, "steps": n,
            "guidance": w, "weighting": weighting, "from_steps": halvings[0] * 2,
        })  # fmt: skip
        net = IMAGE.build(student_cfg, meta)
        net.load_state_dict(teacher.denoiser.net.state_dict())
        loss = _loss(student_cfg, teacher_den, grid, weighting, num_classes)
        start = time.perf_counter()
        Trainer(net, loss, tensors, student_cfg.train, meta, folder).fit(progress=progress)
        result.append(Halving(n, folder, time.perf_counter() - start))
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
    cfg: ImageConfig,
    prediction: str,
    steps: int,
    folder: Path,
    train_steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    device: str,
) -> ImageConfig:
    """The image-recipe config of a student: the teacher's with the student's prediction, DDIM
    on ``steps`` as its sampler, and the distillation's training settings."""
    raw = to_dict(cfg)
    raw["diffusion"].update(prediction=prediction, weighting="simple", sigma_data=None)
    raw["sample"].update(sampler="ddim", steps=steps, grid="trailing", eta=None, guidance=0.0)
    train = TrainConfig(steps=train_steps, batch_size=batch_size, lr=lr, warmup=0,
                        lr_schedule="constant", ema=0.99, seed=seed, device=device,
                        out=str(folder), ckpt_every=train_steps)  # fmt: skip
    raw["train"] = to_dict(train)
    return from_dict(ImageConfig, raw).validate()


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
