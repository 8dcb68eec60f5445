"""Recipe ``consistency``: consistency models of images or vectors (Song et al. 2023; Song &
Dhariwal 2023), sampled in one network evaluation, or in a few by multistep consistency
sampling. The maths is in ``gaussian/consistency.py``.

A run of this recipe comes from one of two commands:

- ``difflab train PRESET --recipe consistency``: consistency training without a teacher, the
  improved recipe of Song & Dhariwal (2023): pseudo-Huber distance with ``c = 0.00054
  sqrt(D)`` (``consistency.huber_c``, empty: that), levels drawn from a discretised log-normal
  (``consistency.p_mean = -1.1``, ``p_std = 2``), ``N`` Karras levels doubling over
  ``train.steps`` from ``levels_start = 10`` to ``levels_end = 1280`` (plus one), the target
  the student itself without gradient (no EMA target), each term weighted by ``1 /
  (sigma_{n+1} - sigma_n)``. On an image preset (``digits``) the recipe adopts EDM's schedule
  and preconditioning (``diffusion.schedule=edm``, ``diffusion.prediction=edm``) and drops the
  preset's sampler keys (:meth:`ConsistencyRecipe.adopt`); any other schedule and
  parameterization may be given.
  With ``consistency.init=RUN`` the network starts from the (EMA) weights of a trained
  diffusion run (``image`` or ``flow`` recipe) instead of at random: consistency tuning (Geng et
  al. 2024, "Consistency Models Made Easy"), still no teacher ODE, the diffusion model being
  the first stage of the model's own training. Its data, network and parameterization
  (``diffusion.schedule``, ``T``, ``shift``, ``prediction``, ``sigma_data``,
  ``class_conditional``) must be given equal to the run's: since ``f -> D`` for ``sigma >>
  sigma_min``, the run's denoiser is then already the consistency function at high noise.
- ``difflab distill RUN --method consistency`` (``recipes/distill.py``): consistency
  distillation of a trained run; the student keeps its teacher's schedule.

The model is the image recipe's network under the parameterization ``diffusion.prediction``,
inside the boundary parameterization ``f = c_skip x~ + c_out F`` with ``sigma_data`` the
denoiser's (``diffusion.sigma_data``, 0.5 when empty) and the levels ``consistency.sigma_min``,
``sigma_max`` (empty: ``sigma_ve(1 / T)`` for a discrete schedule, else the larger of 0.002
and ``sigma_ve(0.001)``, the defaults of ``karras_times``; and
``min(sigma_ve(1), 80)``), Karras-spaced with ``rho``. ``difflab sample RUN`` takes
``sample.steps`` steps (default 1); ``--steps K`` samples in ``K`` evaluations, re-noising to
the first ``K`` of ``K + 1`` Karras levels from ``sigma_max`` to ``sigma_min``
(:func:`~difflab.gaussian.consistency.multistep_times`). Its options are ``--steps``,
``--class``, ``--threshold`` (static clipping of each ``f`` for images by default),
``--percentile`` and ``--seed``; guidance is not one (a distilled student carries its teacher's
guidance, fixed at distillation), nor is any sampler or grid.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from difflab.config import check, check_seed, flatten, to_dict
from difflab.errors import UserError
from difflab.gaussian import guidance as g
from difflab.gaussian.consistency import (
    ConsistencyFunction,
    consistency_sampler,
    consistency_training_loss,
    karras_levels,
    multistep_times,
    training_levels,
)
from difflab.gaussian.schedules import Schedule
from difflab.recipes import (
    Evaluation,
    Samples,
    is_run,
    load,
    positive_int,
    run_metadata,
    seed_value,
)
from difflab.recipes.image import (
    SAMPLE_CHUNK,
    THRESHOLDS,
    DiffusionConfig,
    ImageConfig,
    ImageRecipe,
    LoadedModel,
    build_denoiser,
    build_schedule,
    check_output_memory,
    drop_labels,
    labels_and_rows,
    num_classes_of,
    threshold_settings,
)
from difflab.recipes.image import run_metadata as image_run_metadata
from difflab.train.trainer import Trainer, TrainResult

#: EDM's largest level: the default ``sigma_max`` where a schedule reaches further.
SIGMA_MAX = 80.0
#: EDM's smallest level: the default ``sigma_min`` of continuous-time schedules.
SIGMA_MIN = 0.002

#: The recipes of the runs ``consistency.init`` may start from, and the keys that must equal
#: theirs (whole sections, or ``section.key``).
INIT_RECIPES = ("image", "flow")
INIT_KEYS = ("data.name", "data.path", "data.image_size", "model", "diffusion.schedule",
             "diffusion.T", "diffusion.shift", "diffusion.prediction", "diffusion.sigma_data",
             "diffusion.class_conditional")  # fmt: skip

#: The keys an image preset sets that mean another model here (``None``: removed, so the
#: default applies; otherwise this recipe's value).
ADOPTED = {
    "diffusion": {"schedule": "edm", "prediction": "edm", "weighting": None, "T": None,
                  "shift": None, "sigma_data": None},
    "sample": {"sampler": None, "grid": None, "eta": None, "guidance": None, "steps": None},
}  # fmt: skip


@dataclass
class ConsistencySection:
    """The levels of the model (``sigma_min``, ``sigma_max``: empty takes the schedule's
    defaults, see the module docstring; ``rho``: Karras spacing) and the settings of
    consistency training (levels doubling from ``levels_start`` to ``levels_end``; the
    log-normal ``p_mean``, ``p_std`` of the levels; ``huber_c``: the pseudo-Huber constant,
    empty: ``0.00054 sqrt(D)``); ``init``: a diffusion run whose weights start the network
    (module docstring)."""

    sigma_min: float | None = None
    sigma_max: float | None = None
    rho: float = 7.0
    levels_start: int = 10
    levels_end: int = 1280
    p_mean: float = -1.1
    p_std: float = 2.0
    huber_c: float | None = None
    init: str | None = None

    def validate(self) -> None:
        check(self.sigma_min is None or self.sigma_min > 0, "consistency.sigma_min must be > 0")
        check(self.sigma_max is None or self.sigma_max > 0, "consistency.sigma_max must be > 0")
        check(self.rho > 0, "consistency.rho must be > 0")
        check(1 <= self.levels_start <= self.levels_end,
              "consistency.levels_start must be >= 1 and at most "
              "consistency.levels_end")  # fmt: skip
        check(self.p_std > 0, "consistency.p_std must be > 0")
        check(self.huber_c is None or self.huber_c > 0, "consistency.huber_c must be > 0")


@dataclass
class ConsistencyDiffusionConfig(DiffusionConfig):
    """The image recipe's ``diffusion`` section with EDM's schedule and preconditioning as
    defaults; ``weighting`` does not apply (the consistency losses carry their own)."""

    schedule: str = "edm"
    prediction: str = "edm"

    def validate(self) -> None:
        check(self.weighting == "simple",
              "diffusion.weighting does not apply to the consistency recipe (its losses carry "
              "their own weights)")  # fmt: skip
        super().validate()


@dataclass
class ConsistencySampleConfig:
    """Defaults of sampling: evaluations of the consistency function (``steps``), the threshold
    of each data estimate (none | static | dynamic; empty: static for images, none for
    vectors), sample count and seed."""

    steps: int = 1
    threshold: str | None = None
    n: int = 100
    seed: int = 0

    def validate(self) -> None:
        check(self.steps >= 1, "sample.steps must be at least 1")
        check(self.threshold is None or self.threshold in THRESHOLDS,
              "sample.threshold must be none, static or dynamic")  # fmt: skip
        check(self.n >= 1, "sample.n must be at least 1")
        check_seed("sample.seed", self.seed)


@dataclass
class ConsistencyConfig(ImageConfig):
    """The whole config of the consistency recipe."""

    diffusion: ConsistencyDiffusionConfig = field(default_factory=ConsistencyDiffusionConfig)
    sample: ConsistencySampleConfig = field(default_factory=ConsistencySampleConfig)  # type: ignore[assignment]
    consistency: ConsistencySection = field(default_factory=ConsistencySection)

    def validate(self) -> ConsistencyConfig:
        super().validate()
        self.consistency.validate()
        sigma_range(self)
        return self


def sigma_range(cfg: ConsistencyConfig) -> tuple[float, float]:
    """``(sigma_min, sigma_max)`` of the model: the config's, else the schedule's defaults
    (module docstring), checked to lie in the schedule's range."""
    schedule = build_schedule(cfg.diffusion)
    c = cfg.consistency
    sigma_max = c.sigma_max
    if sigma_max is None:
        sigma_max = min(float(schedule.sigma_ve(torch.ones((), dtype=torch.float64))), SIGMA_MAX)
    sigma_min = c.sigma_min
    if sigma_min is None:  # the first step of a discrete schedule, else as karras_times
        first = torch.tensor(1e-3 if schedule.T is None else 1.0 / schedule.T, dtype=torch.float64)
        sigma_min = float(schedule.sigma_ve(first))
        sigma_min = sigma_min if schedule.T is not None else max(sigma_min, SIGMA_MIN)
    if not sigma_min < sigma_max:
        raise UserError(f"consistency.sigma_min ({sigma_min:g}) must be below sigma_max "
                        f"({sigma_max:g})")  # fmt: skip
    try:
        karras_levels(schedule, 2, sigma_min, sigma_max, c.rho)
    except ValueError as e:
        raise UserError(f"consistency levels {sigma_min:g}..{sigma_max:g}: {e}") from None
    return sigma_min, sigma_max


def initial_weights(cfg: ConsistencyConfig) -> dict[str, Tensor]:
    """The (EMA) network weights of the run ``consistency.init``, after checking that it is a
    diffusion run (:data:`INIT_RECIPES`) whose :data:`INIT_KEYS` equal this config's."""
    source = Path(str(cfg.consistency.init))
    if not is_run(source):
        raise UserError(f"consistency.init: {source} is not a run folder")
    run = load(source, "cpu")
    if run.recipe.name not in INIT_RECIPES:
        raise UserError(f"consistency.init: {source} is a run of the {run.recipe.name} recipe; "
                        f"start from a diffusion run ({' or '.join(INIT_RECIPES)})")  # fmt: skip
    differ = sorted(set(init_overrides(run.config)) - set(init_overrides(cfg)))
    if differ:
        raise UserError(f"consistency.init: {source} has another network or parameterization; "
                        f"give its values: {' '.join(differ)}")  # fmt: skip
    return run.model.denoiser.net.state_dict()


def init_overrides(cfg: Any) -> list[str]:
    """The ``key=value`` overrides that give a config the :data:`INIT_KEYS` values of ``cfg``
    (``model.unet.channels=32``, ``model.unet.channel_mults=[1,2,2]``, ``diffusion.T=null``)."""
    flat = flatten(to_dict(cfg))
    return [f"{key}={v if isinstance(v, str) else json.dumps(v, separators=(',', ':'))}"
            for key, v in flat.items()
            if any(key == k or key.startswith(k + ".") for k in INIT_KEYS)]  # fmt: skip


def consistency_function(denoiser: Any, cfg: ConsistencyConfig) -> ConsistencyFunction:
    """The consistency function of a denoiser of this recipe's config (``sigma_data``: the
    denoiser's own, 0.5 unless ``diffusion.sigma_data`` says otherwise)."""
    sigma_data = 0.5 if cfg.diffusion.sigma_data is None else cfg.diffusion.sigma_data
    return ConsistencyFunction(denoiser, sigma_range(cfg)[0], sigma_data)


def level_grid(schedule: Schedule, cfg: ConsistencyConfig, levels: int) -> Tensor:
    """The increasing times of ``levels`` Karras levels of the model's range."""
    sigma_min, sigma_max = sigma_range(cfg)
    return karras_levels(schedule, levels, sigma_min, sigma_max, cfg.consistency.rho)


class ConsistencyRecipe(ImageRecipe):
    name = "consistency"
    config_type = ConsistencyConfig
    preset = "digits"
    demo_files = ()
    adopted = ADOPTED

    def train(
        self, cfg: ConsistencyConfig, *, resume: bool = False, progress: bool = True
    ) -> TrainResult:
        """Consistency training (module docstring) into ``train.out``. A run written by
        ``difflab distill --method consistency`` is not continued: its loss was distillation's."""
        out = Path(cfg.train.out)
        if resume and is_run(out) and run_metadata(out).get("distilled"):
            raise UserError(f"{out} was written by difflab distill --method consistency; "
                            "--resume would continue it by consistency training: distil it "
                            "again with more --train-steps")  # fmt: skip
        continued = resume and is_run(out)  # its checkpoint holds the weights: no init needed
        start = None if cfg.consistency.init is None or continued else initial_weights(cfg)
        train_data, _ = self.training_data(cfg)
        meta = image_run_metadata(self.name, cfg, train_data)
        num_classes = num_classes_of(meta)
        torch.manual_seed(cfg.train.seed)
        net = self.build(cfg, meta)
        if start is not None:
            net.load_state_dict(start)
        tensors = (train_data.x,) if num_classes is None else (train_data.x, train_data.labels)
        schedule, c, d = build_schedule(cfg.diffusion), cfg.consistency, cfg.diffusion
        grids: dict[int, Tensor] = {}

        def loss(net: torch.nn.Module, batch: tuple[Tensor, ...], generator) -> Tensor:
            levels = training_levels(trainer.step, cfg.train.steps, c.levels_start, c.levels_end)
            if levels not in grids:
                grids[levels] = level_grid(schedule, cfg, levels)
            cond = None
            if num_classes is not None:
                cond = {"class_labels": drop_labels(batch[1], num_classes, d.cond_drop, generator)}
            student = consistency_function(build_denoiser(net, d), cfg)
            return consistency_training_loss(student, batch[0], grids[levels], cond,
                                             p_mean=c.p_mean, p_std=c.p_std, huber_c=c.huber_c,
                                             generator=generator)  # fmt: skip

        trainer = Trainer(net, loss, tensors, cfg.train, meta, out)
        return trainer.fit(resume=resume, progress=progress)

    def sample(
        self,
        model: LoadedModel,
        n: int,
        *,
        steps: int | None = None,
        label: Any = None,
        threshold: str | None = None,
        percentile: float | None = None,
        seed: int | None = None,
        callback: Any = None,
    ) -> Samples:
        """``n`` samples in ``steps`` evaluations of the consistency function (default: the
        run's ``sample.steps``). ``label``: class index/name, a comma list or a sequence
        (default one row per class); ``threshold``/``percentile``: the threshold of each data
        estimate; ``callback(step, t, x_t, x0)`` sees every evaluation."""
        cfg: ConsistencyConfig = model.config  # type: ignore[assignment]
        s = cfg.sample
        steps = s.steps if steps is None else positive_int("steps", steps)
        labels, nrow = labels_and_rows(label, model.class_names, n)
        seed = s.seed if seed is None else seed_value(seed)
        threshold, percentile = threshold_settings(threshold, percentile, s.threshold, model.shape)
        f = g.thresholded(consistency_function(model.denoiser, cfg), threshold, percentile)
        sigma_min, sigma_max = sigma_range(cfg)
        schedule = model.denoiser.schedule
        try:
            ts = multistep_times(schedule, steps, sigma_min, sigma_max, cfg.consistency.rho)
        except ValueError as e:
            raise UserError(f"--steps {steps}: {e}") from None
        check_output_memory(n, model.shape)
        prior = float(schedule.alpha_sigma(ts[:1])[1])  # x_T = alpha (sigma_max z) = sigma_T z
        cond = None
        if model.num_classes is not None:
            null = torch.full((n,), model.num_classes, dtype=torch.long)
            cond = {"class_labels": (null if labels is None else labels).to(model.device)}
        gen = torch.Generator(model.device).manual_seed(seed)
        chunks = []
        for rows in tqdm(torch.arange(n).split(SAMPLE_CHUNK), desc="sampling (consistency)",
                         disable=None, leave=False):  # fmt: skip
            x = torch.randn((len(rows), *model.shape), generator=gen, device=model.device)
            part = None if cond is None else {k: v[rows] for k, v in cond.items()}
            chunks.append(consistency_sampler(f, prior * x, ts, cond=part, generator=gen,
                                              callback=callback, sigma_min=sigma_min))  # fmt: skip
        return Samples(x=torch.cat(chunks), labels=labels, nrow=nrow)

    def evaluate(self, model: LoadedModel, *, progress: bool = True) -> Evaluation:
        """Refused: a consistency model defines no likelihood here."""
        raise UserError("the consistency recipe has no likelihood to evaluate: compare its "
                        "samples (difflab sample RUN), e.g. with "
                        "benchmarks/bench_fewstep.py")  # fmt: skip

    def demo(self, out: Path, *, quiet: bool = False, steps: int | None = None) -> str:
        raise UserError("the consistency recipe has no demo: train one with difflab train "
                        "digits --recipe consistency, or distil a run with difflab distill RUN "
                        "--method consistency")  # fmt: skip


RECIPE = ConsistencyRecipe()
