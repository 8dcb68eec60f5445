"""Recipe ``image``: a Gaussian diffusion model of images or vectors, optionally class-conditional
with conditioning dropout to the null label (classifier-free guidance).

Wires ``data`` -> a network of ``nets/`` -> :class:`Denoiser` (the parameterization) -> the
objective of that parameterization (:func:`make_objective`) -> the :class:`Trainer`; samples with
any sampler of ``gaussian/samplers.py`` through the guidance and thresholding wrappers, and
evaluates bits/dim by the variational bound or the probability-flow ODE.

The config sections defined here (``data``, ``model``, ``diffusion``, ``sample``) are shared by
the other image recipes (``classifier``, ``cascade``, ``text-to-digit``), which add their own.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from difflab.config import TrainConfig, check, check_seed, choose, coerce, from_dict, to_dict
from difflab.data.images import ArrayData, load_dataset
from difflab.errors import UserError
from difflab.gaussian import guidance as g
from difflab.gaussian import samplers as gaussian_samplers
from difflab.gaussian.objectives import WEIGHTINGS, check_objective, make_objective
from difflab.gaussian.parameterization import PREDICTIONS, Denoiser, DenoiserFn
from difflab.gaussian.schedules import SCHEDULES, Schedule, make_schedule, schedule_parameters
from difflab.gaussian.self_conditioning import SelfConditioned, SelfConditionedTraining, restart
from difflab.recipes import (
    RUN_FILES,
    Evaluation,
    Recipe,
    Samples,
    class_labels,
    finite,
    flag,
    load_network,
    positive_int,
    reading_metadata,
    seed_value,
)
from difflab.train.trainer import LOCK_NAME, Trainer, TrainResult
from difflab.viz.images import save_animation, save_grid, save_loss_curve

# ------------------------------------------------------------------ config

#: The version of this config's layout that checkpoints record (0.1's had no number).
CONFIG_VERSION = 2


@dataclass
class DataConfig:
    """Training data. ``name``: digits | glyphs | moons | swissroll | 8gaussians | checkerboard |
    folder | array; ``path`` for folder/array; ``image_size`` resizes folder images;
    ``held_out`` is the share kept for evaluation, split by ``split_seed``."""

    name: str = "digits"
    path: str | None = None
    image_size: int | None = None
    held_out: float = 0.2
    split_seed: int = 0

    def validate(self) -> None:
        reads_files = self.name in ("folder", "array")
        check(
            reads_files or self.path is None, f"data.path does not apply to data.name={self.name}"
        )
        check(not reads_files or bool(self.path), f"data.name={self.name} needs data.path")
        check(
            self.image_size is None or self.name == "folder",
            f"data.image_size applies to data.name=folder only, not {self.name}",
        )
        check(self.image_size is None or self.image_size >= 1, "data.image_size must be >= 1")
        check(0.0 <= self.held_out <= 0.5, "data.held_out must be in [0, 0.5]")
        check(self.split_seed >= 0, "data.split_seed must be non-negative")


@dataclass
class UNetConfig:
    """:class:`~difflab.nets.unet.UNet`: width of the first level, a width multiplier per level,
    residual blocks per level, the resolutions with self-attention, heads, dropout."""

    channels: int = 32
    channel_mults: list[int] = field(default_factory=lambda: [1, 2])
    num_res_blocks: int = 1
    attn_resolutions: list[int] = field(default_factory=lambda: [4])
    num_heads: int = 4
    dropout: float = 0.0


@dataclass
class DiTConfig:
    """:class:`~difflab.nets.dit.DiT`: token width, patch side, blocks, heads."""

    width: int = 32
    patch_size: int = 2
    depth: int = 6
    num_heads: int = 4


@dataclass
class MLPConfig:
    """:class:`~difflab.nets.mlp.MLPDenoiserNet` for vector data: hidden width and blocks."""

    hidden: int = 256
    depth: int = 6


@dataclass
class ModelConfig:
    """The denoiser network: ``kind`` names one of :data:`NETS`; its sub-section holds its size
    (the others must stay empty). ``self_condition`` (empty: off, as for runs saved before it
    existed): the network also reads its previous estimate of ``x_0`` as extra input channels
    (Chen et al. 2023; U-Net and DiT), trained with
    zeros in half the batches and its own stop-gradient estimate in the others, sampled with the
    previous network evaluation's estimate (:mod:`difflab.gaussian.self_conditioning`)."""

    kind: str = "unet"
    unet: UNetConfig | None = None
    dit: DiTConfig | None = None
    mlp: MLPConfig | None = None
    self_condition: bool | None = None

    def validate(self) -> None:
        choose("model.kind", self.kind, NETS)
        check(not self.self_condition or self.kind in SELF_CONDITIONED_NETS,
              f"model.self_condition applies to model.kind={' or '.join(SELF_CONDITIONED_NETS)}, "
              f"not {self.kind}")  # fmt: skip
        for other in NETS:
            if other != self.kind and getattr(self, other) is not None:
                raise UserError(f"model.{other} does not apply to model.kind={self.kind}")
        if self.net is None:
            setattr(self, self.kind, NETS[self.kind][0]())

    @property
    def net(self) -> Any:
        """The sub-section of the chosen kind."""
        return getattr(self, self.kind)


@dataclass
class DiffusionConfig:
    """Process and objective. ``schedule``: a name of the schedule registry; ``T`` (steps of the
    discrete-time schedules) and ``shift`` (of the log-SNR ones) apply where the schedule takes
    them (empty: its default); ``prediction``: eps | x0 | v | score, or ``edm`` (Karras et al.'s
    preconditioning with ``sigma_data``, trained with the EDM loss); ``weighting``: simple | elbo
    | min-snr; ``cond_drop``: probability of the null
    label in training (classifier-free guidance)."""

    schedule: str = "cosine"
    T: int | None = None
    shift: float | None = None
    prediction: str = "eps"
    sigma_data: float | None = None
    weighting: str = "simple"
    cond_drop: float = 0.1
    class_conditional: bool = True

    def validate(self) -> None:
        choose("diffusion.schedule", self.schedule, SCHEDULES)
        takes = schedule_parameters(self.schedule)
        for key in ("T", "shift"):
            check(
                getattr(self, key) is None or key in takes,
                f"diffusion.{key} does not apply to diffusion.schedule={self.schedule}",
            )
        check(self.T is None or self.T >= 1, "diffusion.T must be at least 1")
        choose("diffusion.prediction", self.prediction, PREDICTIONS)
        check(
            self.sigma_data is None or self.prediction == "edm",
            "diffusion.sigma_data applies to diffusion.prediction=edm only",
        )
        check(self.sigma_data is None or self.sigma_data > 0, "diffusion.sigma_data must be > 0")
        choose("diffusion.weighting", self.weighting, WEIGHTINGS)
        try:
            check_objective(self.prediction, self.weighting)
        except ValueError as e:
            raise UserError(str(e)) from None
        check(0.0 <= self.cond_drop < 1.0, "diffusion.cond_drop must be in [0, 1)")

    def schedule_kwargs(self) -> dict[str, Any]:
        """The parameters given to the schedule (those left empty take its defaults)."""
        given = {"T": self.T, "shift": self.shift}
        return {k: v for k, v in given.items() if v is not None}


@dataclass
class SampleConfig:
    """Defaults of sampling (``difflab sample`` and the demo's pictures): sampler, steps, time
    grid (``gaussian.samplers.GRIDS``), ``eta`` (ddim only), classifier-free guidance ``w``,
    ``threshold`` of the x_0 estimate (none | static: clip to [-1, 1] | dynamic; empty: static
    for images, none for vectors, which need not lie in a range), sample count and seed."""

    sampler: str = "ddim"
    steps: int = 50
    grid: str = "trailing"
    eta: float | None = None
    guidance: float = 0.0
    threshold: str | None = None
    n: int = 100
    seed: int = 0

    def validate(self) -> None:
        choose("sample.sampler", self.sampler, gaussian_samplers.SAMPLERS)
        check(self.steps >= 1, "sample.steps must be at least 1")
        choose("sample.grid", self.grid, gaussian_samplers.GRIDS)
        if self.eta is not None:
            check(
                "eta" in gaussian_samplers.sampler_options(self.sampler),
                f"sample.eta does not apply to sample.sampler={self.sampler}",
            )
            check(0.0 <= self.eta <= 1.0, "sample.eta must be in [0, 1]")
        check(self.guidance >= 0, "sample.guidance must be non-negative")
        check(self.threshold is None or self.threshold in THRESHOLDS,
              "sample.threshold must be none, static or dynamic")  # fmt: skip
        check(self.n >= 1, "sample.n must be at least 1")
        check_seed("sample.seed", self.seed)


THRESHOLDS = ("none", "static", "dynamic")


@dataclass
class ImageConfig:
    """The whole config of the image recipe.

    ``SELF_CONDITIONING``: whether the recipe of this config wires ``model.self_condition`` (the
    image recipe's loss and sampling, :func:`make_loss` and :func:`guided_denoiser`). A recipe
    whose config derives from this one refuses the flag unless its class sets it to ``True``
    itself: one that trains or samples in its own way must wire it first."""

    SELF_CONDITIONING: ClassVar[bool] = True

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.SELF_CONDITIONING = bool(cls.__dict__.get("SELF_CONDITIONING", False))

    def validate(self) -> ImageConfig:
        for section in (self.data, self.model, self.diffusion, self.train, self.sample):
            section.validate()
        check(not self.model.self_condition or self.SELF_CONDITIONING,
              "model.self_condition does not apply to this recipe")  # fmt: skip
        return self


def migrate(config: dict[str, Any]) -> dict[str, Any]:
    """An image-family config as difflab 0.1 recorded it, in today's layout: the flat ``model``
    section split by network kind, and the diffusion keys that do not apply emptied."""
    config = json.loads(json.dumps(config))
    model = config.get("model", {})
    kind = model.get("kind", "unet")
    flat = {
        "unet": ("channels", "channel_mults", "num_res_blocks", "attn_resolutions",
                 "num_heads", "dropout"),
        "dit": ("patch_size", "depth", "num_heads"),
        "mlp": ("hidden", "depth"),
    }[kind]  # fmt: skip
    sub = {k: model[k] for k in flat if k in model}
    if kind == "dit" and "channels" in model:
        sub["width"] = model["channels"]
    config["model"] = {"kind": kind, kind: sub}
    d = config.get("diffusion", {})
    takes = (
        schedule_parameters(d.get("schedule", "cosine")) if d.get("schedule") in SCHEDULES else ()
    )
    for key in ("T", "shift"):
        if key not in takes:
            d.pop(key, None)
    if d.get("prediction") != "edm":
        d.pop("sigma_data", None)
    s = config.get("sample", {})
    if "eta" in s and s["eta"] == 0.0:
        s.pop("eta")
    if s.get("threshold") == "static" and kind == "mlp":
        s.pop("threshold")  # 0.1 clipped vectors to [-1, 1] by default: a defect, not a choice
    return config


def config_from_run(config_type: type, meta: dict[str, Any]) -> Any:
    """The validated config of type ``config_type`` that a checkpoint's metadata records
    (migrated from difflab 0.1's layout when it has no ``config_version``)."""
    if not isinstance(meta["config"], dict):
        raise TypeError("its config is not a mapping")
    config = meta["config"] if meta.get("config_version") else migrate(meta["config"])
    return from_dict(config_type, config).validate()


# ------------------------------------------------------------------ parts


def build_unet(
    cfg: UNetConfig, shape: tuple[int, ...], num_classes: int | None, **extra: Any
) -> nn.Module:
    """The U-Net of ``cfg`` for images of ``shape`` (``extra``: conditioning inputs such as
    ``cond_channels`` or ``context_dim``)."""
    from difflab.nets.unet import UNet

    if len(shape) != 3 or shape[1] != shape[2]:
        raise UserError(f"model.kind=unet needs square images (C, H, H), got {shape}")
    factor = 2 ** (len(cfg.channel_mults) - 1)
    if shape[1] % factor:
        raise UserError(
            f"model.kind=unet with {len(cfg.channel_mults)} levels needs images whose side is "
            f"divisible by {factor}, got {shape[1]}"
        )
    return UNet(
        in_channels=shape[0], channels=cfg.channels, channel_mults=tuple(cfg.channel_mults),
        num_res_blocks=cfg.num_res_blocks, attn_resolutions=tuple(cfg.attn_resolutions),
        image_size=shape[1], num_classes=num_classes, dropout=cfg.dropout,
        num_heads=cfg.num_heads, **extra,
    )  # fmt: skip


def build_dit(
    cfg: DiTConfig, shape: tuple[int, ...], num_classes: int | None, **extra: Any
) -> nn.Module:
    """The DiT of ``cfg`` for images of ``shape`` (``extra``: ``context_dim``)."""
    from difflab.nets.dit import DiT

    if len(shape) != 3 or shape[1] != shape[2]:
        raise UserError(f"model.kind=dit needs square images (C, H, H), got {shape}")
    return DiT(in_channels=shape[0], image_size=shape[1], patch_size=cfg.patch_size,
               width=cfg.width, depth=cfg.depth, num_heads=cfg.num_heads,
               num_classes=num_classes, **extra)  # fmt: skip


def _mlp(cfg: MLPConfig, shape: tuple[int, ...], num_classes: int | None) -> nn.Module:
    from difflab.nets.mlp import MLPDenoiserNet

    if len(shape) != 1:
        raise UserError(f"model.kind=mlp needs vector data, got examples of shape {shape}")
    return MLPDenoiserNet(shape[0], hidden=cfg.hidden, depth=cfg.depth, num_classes=num_classes)


#: Every ``model.kind``: its config section and its builder ``(section, shape, classes)``.
NETS = {"unet": (UNetConfig, build_unet), "dit": (DiTConfig, build_dit), "mlp": (MLPConfig, _mlp)}
#: The kinds that take ``model.self_condition``.
SELF_CONDITIONED_NETS = ("unet", "dit")


def build_net(
    model: ModelConfig, shape: tuple[int, ...], num_classes: int | None, **extra: Any
) -> nn.Module:
    """The network ``model`` describes for examples of ``shape`` (``extra``: conditioning inputs
    such as ``context_dim``); an argument the network refuses is a :class:`UserError`."""
    if model.self_condition:
        extra["self_condition"] = True
    try:
        return NETS[model.kind][1](model.net, tuple(shape), num_classes, **extra)
    except ValueError as e:
        raise UserError(f"model.{model.kind}: {e}") from None


def build_schedule(d: DiffusionConfig) -> Schedule:
    """The schedule ``diffusion.*`` names, with the parameters it takes."""
    return make_schedule(d.schedule, **d.schedule_kwargs())


def build_denoiser(net: nn.Module, d: DiffusionConfig) -> Denoiser:
    """``net`` under the parameterization of ``diffusion.prediction``."""
    sigma_data = {} if d.sigma_data is None else {"sigma_data": d.sigma_data}
    return Denoiser(net, build_schedule(d), d.prediction, **sigma_data)


def drop_labels(labels: Tensor, null: int, p: float, generator: torch.Generator) -> Tensor:
    """Replace each label by the null label ``null`` with probability ``p`` (CFG training)."""
    if p <= 0:
        return labels
    drop = torch.rand(labels.shape, device=labels.device, generator=generator) < p
    return torch.where(drop, torch.full_like(labels, null), labels)


def make_loss(d: DiffusionConfig, num_classes: int | None):
    """``loss(net, batch, generator)`` for the trainer: the objective of the parameterization,
    on ``batch = (x0,)`` or ``(x0, labels)`` with labels dropped to the null class at rate
    ``cond_drop``; a network built with ``self_condition`` is trained self-conditioned
    (:class:`~difflab.gaussian.self_conditioning.SelfConditionedTraining`)."""
    objective = make_objective(d.prediction, d.weighting)

    def loss(net: nn.Module, batch: tuple[Tensor, ...], generator: torch.Generator) -> Tensor:
        cond = None
        if num_classes is not None:
            cond = {"class_labels": drop_labels(batch[1], num_classes, d.cond_drop, generator)}
        denoiser: DenoiserFn = build_denoiser(net, d)
        if getattr(net, "self_condition", False):
            denoiser = SelfConditionedTraining(denoiser, generator)
        return objective(denoiser, batch[0], cond, generator)

    return loss


def data_splits(data: DataConfig) -> tuple[ArrayData, ArrayData]:
    """``(train, held_out)`` split fixed by ``data.held_out`` and ``data.split_seed``."""
    return load_dataset(data.name, data.path, data.image_size).split(data.held_out, data.split_seed)


def run_metadata(recipe: str, cfg: Any, data: ArrayData, **extra: Any) -> dict[str, Any]:
    """What a checkpoint of an image-family recipe records to rebuild its model: the recipe,
    the config, the data's shape and class names (when the run uses them)."""
    conditional = cfg.diffusion.class_conditional and data.class_names is not None
    return {
        "recipe": recipe,
        "config_version": CONFIG_VERSION,
        "config": to_dict(cfg),
        "shape": list(data.shape),
        "class_names": data.class_names if conditional else None,
        **extra,
    }


def num_classes_of(meta: dict[str, Any]) -> int | None:
    return len(meta["class_names"]) if meta.get("class_names") else None


def is_images(shape: tuple[int, ...]) -> bool:
    """Image data lie in ``[-1, 1]``; vector data (2-D toys, arrays of vectors) need not."""
    return len(shape) == 3


def threshold_settings(
    threshold: str | None, percentile: float | None, default: str | None, shape: tuple[int, ...]
) -> tuple[str, float]:
    """The x_0 threshold to use and the percentile of the dynamic one, checked: the threshold
    asked for, else the run's ``default``, else ``static`` for images (known to lie in
    ``[-1, 1]``) and ``none`` for vectors; ``percentile`` (default 0.995) in ``(0, 1]``."""
    threshold = default if threshold is None else threshold
    if threshold is None:
        threshold = "static" if is_images(shape) else "none"
    choose(flag("threshold"), threshold, THRESHOLDS)
    if percentile is not None and threshold != "dynamic":
        raise UserError("--percentile applies with --threshold dynamic only")
    return threshold, 0.995 if percentile is None else finite("percentile", percentile, 1e-6, 1.0)


def guidance_settings(
    guidance: float | None, convention: str | None, default: float
) -> tuple[float, str]:
    """The classifier-free guidance scale (given, else ``default``) and its convention (w or
    gamma, default w), checked."""
    guidance = default if guidance is None else finite("guidance", guidance, 0.0)
    if convention is not None:
        if guidance == 0:
            raise UserError("--convention applies with --guidance only")
        choose(flag("convention"), convention, g.CONVENTIONS)
    return guidance, convention or "w"


# ------------------------------------------------------------------ loaded model


@dataclass
class LoadedModel:
    """A trained model ready to sample: the EMA denoiser, the config, the data's shape, the
    class names (``None``: unconditional) and the training step."""

    denoiser: Denoiser
    config: ImageConfig
    shape: tuple[int, ...]
    class_names: list[str] | None
    step: int

    @property
    def num_classes(self) -> int | None:
        return None if self.class_names is None else len(self.class_names)

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.net.parameters()).device


def guided_denoiser(
    model: LoadedModel,
    *,
    guidance: float = 0.0,
    convention: str = "w",
    classifier: nn.Module | None = None,
    classifier_scale: float = 1.0,
    threshold: str = "static",
    percentile: float = 0.995,
    null_cond: dict[str, Tensor] | None = None,
) -> DenoiserFn:
    """The model's denoiser inside the wrappers the options ask for, innermost first:
    self-conditioning (when the network was built with it, :class:`SelfConditioned`: so each
    branch of classifier-free guidance keeps its own estimate), classifier guidance
    (``classifier`` with scale ``classifier_scale``), classifier-free guidance
    (``w = guidance > 0``; the null label, or ``null_cond``), then x_0 thresholding."""
    den: DenoiserFn = model.denoiser
    if getattr(model.denoiser.net, "self_condition", False):
        den = SelfConditioned(den)
    if classifier is not None:
        den = g.ClassifierGuidance(den, classifier, classifier_scale, null_label=model.num_classes)
    if guidance > 0:
        if null_cond is not None:
            den = g.ClassifierFreeGuidance(den, guidance, convention=convention,
                                           null_cond=null_cond)  # fmt: skip
        elif model.num_classes is None:
            raise UserError(f"{flag('guidance')} needs a class-conditional model")
        else:
            den = g.ClassifierFreeGuidance(den, guidance, convention=convention,
                                           null_label=model.num_classes)  # fmt: skip
    return g.thresholded(den, threshold, percentile)


#: Samples drawn per network batch: a large request runs in chunks of this many rows.
SAMPLE_CHUNK = 1024


def check_output_memory(n: int, shape: tuple[int, ...]) -> None:
    """Refuse ``n`` samples of ``shape`` whose float32 copies (the samples, the array written
    and the 8-bit grid: about three) would take more than half of this machine's memory."""
    needed = 3 * 4 * n * math.prod(shape)
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if needed > total // 2:
        most = total // 2 // (3 * 4 * math.prod(shape))
        raise UserError(f"{n:,} samples of shape {tuple(shape)} need about {needed / 2**30:.1f} "
                        f"GiB, more than half this machine's {total / 2**30:.0f} GiB: draw at most "
                        f"{most:,} at a time")  # fmt: skip


def draw(
    model: LoadedModel,
    denoiser: DenoiserFn,
    n: int,
    cond: dict[str, Tensor] | None,
    *,
    sampler: str,
    steps: int,
    grid: str,
    seed: int,
    options: dict[str, Any],
    callback: Any = None,
) -> Tensor:
    """Run ``sampler`` from prior noise over ``steps`` of the time ``grid``, in chunks of
    :data:`SAMPLE_CHUNK` rows (one generator for all, so ``n`` up to a chunk draws exactly what
    one batch would), with a progress bar on a terminal."""
    schedule = model.denoiser.schedule
    try:
        ts = gaussian_samplers.time_grid(schedule, steps, grid)
    except ValueError as e:
        raise UserError(str(e)) from None
    check_output_memory(n, model.shape)
    gen = torch.Generator(model.device).manual_seed(seed)
    fn = gaussian_samplers.SAMPLERS[sampler]
    chunks = []
    with tqdm(total=n * (len(ts) - 1), desc=f"sampling ({sampler})", unit="sample-step",
              disable=None, leave=False) as bar:  # fmt: skip
        report = callback
        if not bar.disable:  # the bar reads each step; without it, no per-step callback cost

            def report(i: int, t: float, x_t: Tensor, x0: Tensor) -> None:
                bar.update(len(x_t))
                if callback is not None:
                    callback(i, t, x_t, x0)

        for rows in torch.arange(n).split(SAMPLE_CHUNK):
            x = torch.randn((len(rows), *model.shape), generator=gen, device=model.device)
            part = None if cond is None else {k: v[rows] for k, v in cond.items()}
            try:
                with torch.inference_mode(not _needs_gradients(denoiser)):
                    chunks.append(fn(restart(denoiser), x * schedule.prior_std, ts, cond=part,
                                     generator=gen, callback=report, **options))  # fmt: skip
            except ValueError as e:
                raise UserError(f"sampler {sampler}: {e}") from None
    return torch.cat(chunks)


def _needs_gradients(denoiser: DenoiserFn) -> bool:
    """Classifier guidance differentiates the classifier: no inference mode around it."""
    while True:
        if isinstance(denoiser, g.ClassifierGuidance):
            return True
        inner = getattr(denoiser, "denoiser", None)
        if inner is None:
            return False
        denoiser = inner


def sampler_settings(
    cfg: SampleConfig,
    sampler: str | None,
    steps: int | None,
    grid: str | None,
    eta: float | None,
    sampler_options: dict[str, Any] | None,
) -> tuple[str, int, str, dict[str, Any]]:
    """``(sampler, steps, grid, options)``: the given ones, checked, else the run's defaults;
    ``eta`` and ``sampler_options`` must be options of the chosen sampler, each ``--opt`` value
    of the type of the option's default."""
    sampler = cfg.sampler if sampler is None else sampler
    choose("--sampler", sampler, gaussian_samplers.SAMPLERS)
    steps = cfg.steps if steps is None else positive_int("steps", steps)
    grid = cfg.grid if grid is None else grid
    choose("--grid", grid, gaussian_samplers.GRIDS)
    accepted = gaussian_samplers.sampler_options(sampler)
    options = {}
    for key, value in (sampler_options or {}).items():
        if key not in accepted:
            names = ", ".join(accepted) or "none"
            raise UserError(
                f"--opt {key} does not apply to sampler {sampler} (its options: {names})"
            )
        options[key] = coerce(value, type(accepted[key]), f"--opt {key}")
    if "eta" in options:
        if eta is not None:
            raise UserError("--eta and --opt eta were both given: give eta once")
        eta = options.pop("eta")
    if eta is None and cfg.eta is not None and sampler == cfg.sampler:
        eta = cfg.eta
    if eta is not None:
        if "eta" not in accepted:
            raise UserError(f"--eta does not apply to sampler {sampler}")
        options["eta"] = finite("eta", eta, 0.0, 1.0)
    return sampler, steps, grid, options


# ------------------------------------------------------------------ the recipe


class ImageRecipe(Recipe):
    name = "image"
    config_type = ImageConfig
    preset = "digits"
    data = "images"
    demo_files = (*RUN_FILES, LOCK_NAME, "samples.png", "reverse_process.gif")

    def config_from_run(self, meta: dict[str, Any]) -> ImageConfig:
        return config_from_run(self.config_type, meta)

    def build(self, cfg: ImageConfig, meta: dict[str, Any]) -> nn.Module:
        return build_net(cfg.model, tuple(meta["shape"]), num_classes_of(meta))

    def training_data(self, cfg: ImageConfig) -> tuple[ArrayData, dict[str, Any]]:
        """The examples the diffusion model learns (the training split of ``data``) and what
        the run's metadata records beside :func:`run_metadata` (nothing here; a subclass that
        trains on a transform of the data, such as the latent recipe, says what it used)."""
        train_data, _ = data_splits(cfg.data)
        return train_data, {}

    def train(
        self, cfg: ImageConfig, *, resume: bool = False, progress: bool = True
    ) -> TrainResult:
        train_data, extra = self.training_data(cfg)
        meta = run_metadata(self.name, cfg, train_data, **extra)
        num_classes = num_classes_of(meta)
        torch.manual_seed(cfg.train.seed)  # network initialisation
        net = self.build(cfg, meta)
        tensors = (train_data.x,) if num_classes is None else (train_data.x, train_data.labels)
        loss = make_loss(cfg.diffusion, num_classes)
        trainer = Trainer(net, loss, tensors, cfg.train, meta, Path(cfg.train.out))
        return trainer.fit(resume=resume, progress=progress)

    def load(self, path: Path, device: str = "auto") -> LoadedModel:
        cfg, meta, net, step = load_network(self, path, device)
        with reading_metadata(path):
            return LoadedModel(build_denoiser(net, cfg.diffusion), cfg, tuple(meta["shape"]),
                               meta["class_names"], step)  # fmt: skip

    def sample(
        self,
        model: LoadedModel,
        n: int,
        *,
        sampler: str | None = None,
        steps: int | None = None,
        grid: str | None = None,
        eta: float | None = None,
        sampler_options: dict[str, Any] | None = None,
        label: Any = None,
        guidance: float | None = None,
        convention: str | None = None,
        classifier: str | Path | None = None,
        classifier_scale: float | None = None,
        threshold: str | None = None,
        percentile: float | None = None,
        seed: int | None = None,
        callback: Any = None,
    ) -> Samples:
        """``n`` samples. ``label``: class index/name, a comma list or a sequence (cycled; default
        one row per class for class-conditional models); ``guidance``: classifier-free ``w``
        (``convention`` w or gamma); ``classifier``: a run of the ``classifier`` recipe for
        classifier guidance of scale ``classifier_scale``; ``threshold``/``percentile``: the x_0
        threshold; ``callback(step, t, x_t, x0)`` sees every step. Left empty: the run's
        ``sample`` section."""
        s = model.config.sample
        sampler, steps, grid, options = sampler_settings(s, sampler, steps, grid, eta,
                                                         sampler_options)  # fmt: skip
        labels, nrow = labels_and_rows(label, model.class_names, n)
        guidance, convention = guidance_settings(guidance, convention, s.guidance)
        seed = s.seed if seed is None else seed_value(seed)
        net = None
        if classifier is not None:
            net = load_guiding_classifier(classifier, model)
        elif classifier_scale is not None:
            raise UserError("--classifier-scale applies with --classifier only")
        scale = 1.0 if classifier_scale is None else finite("classifier_scale", classifier_scale)
        threshold, percentile = threshold_settings(threshold, percentile, s.threshold, model.shape)
        den = guided_denoiser(model, guidance=guidance, convention=convention,
                              classifier=net, classifier_scale=scale, threshold=threshold,
                              percentile=percentile)  # fmt: skip
        cond = None
        if model.num_classes is not None:
            null = torch.full((n,), model.num_classes, dtype=torch.long)
            cond = {"class_labels": (null if labels is None else labels).to(model.device)}
        x = draw(model, den, n, cond, sampler=sampler, steps=steps, grid=grid, seed=seed,
                 options=options, callback=callback)  # fmt: skip
        return Samples(x=x, labels=labels, nrow=nrow)

    def evaluate(
        self,
        model: LoadedModel,
        *,
        n: int = 256,
        method: str = "vlb",
        t_samples: int | None = None,
        ode_steps: int | None = None,
        probes: int | None = None,
        seed: int = 0,
        progress: bool = True,
    ) -> Evaluation:
        """Bits/dim of ``n`` held-out images: ``vlb`` (DDPM's bound with its discretized
        decoder; ``t_samples`` Monte Carlo times per example, empty: all ``T`` terms) or ``ode``
        (the probability-flow ODE's exact likelihood, ``ode_steps`` RK4 steps, ``probes``
        Hutchinson probes, uniform dequantization)."""
        choose("--method", method, ("vlb", "ode"))
        positive_int("n", n)
        seed_value(seed)
        if not is_images(model.shape):
            raise UserError("eval measures bits/dim of 8-bit images; this run's data are vectors")
        if method == "vlb":
            if ode_steps is not None or probes is not None:
                raise UserError("--ode-steps and --probes apply to --method ode only")
            T = model.denoiser.schedule.T
            if T is None:
                raise UserError(
                    "the variational bound needs a discrete-time schedule: use --method ode"
                )
            if t_samples is not None and positive_int("t_samples", t_samples) >= T:
                raise UserError(f"--t-samples must be below T = {T}: leave it empty for the "
                                f"exact sum of all {T - 1} terms")  # fmt: skip
        elif t_samples is not None:
            raise UserError("--t-samples applies to --method vlb only")
        else:
            ode_steps = 100 if ode_steps is None else positive_int("ode_steps", ode_steps)
            probes = 1 if probes is None else positive_int("probes", probes)
        _, held_out = data_splits(model.config.data)
        if len(held_out) == 0:
            raise UserError("this run has no held-out data (data.held_out=0)")
        x, labels = held_out.x[:n], held_out.labels
        gen = torch.Generator(model.device).manual_seed(seed)
        per_example: dict[str, list[Tensor]] = {}
        chunks = torch.arange(len(x)).split(EVAL_BATCH)
        for idx in tqdm(chunks, desc=f"eval ({method})", disable=not progress, unit="batch"):
            cond = None
            if model.num_classes is not None:
                cond = {"class_labels": labels[idx].to(model.device)}
            for key, value in _bits_per_dim(model, x[idx].to(model.device), cond, method,
                                            t_samples, ode_steps, probes, gen).items():  # fmt: skip
                per_example.setdefault(key, []).append(value.double().cpu())
        metrics = {k: float(torch.cat(v).mean()) for k, v in per_example.items()}
        total = torch.cat(per_example["total"])
        se = float(total.std() / len(total) ** 0.5) if len(total) > 1 else float("nan")
        metrics.update(examples=len(x), stderr=se, method=method)
        if method == "ode":
            how = f"probability-flow ODE, {ode_steps} RK4 steps, uniform dequantization"
        else:
            how = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()
                            if k not in ("total", "examples", "stderr", "method"))  # fmt: skip
        summary = (f"bits/dim {metrics['total']:.4f} +- {se:.4f} on {len(x)} held-out "
                   f"examples ({how})")  # fmt: skip
        if model.config.model.self_condition:
            summary += ("; of the self-conditioned network with no previous estimate (zeros), "
                        "the model its first sampling step uses")  # fmt: skip
        return Evaluation(metrics, summary)

    def demo(self, out: Path, *, quiet: bool = False, steps: int | None = None) -> str:
        """Train the ``digits`` preset (at most 2.7 minutes) into ``out``, then write a grid of
        samples (one row per class), the reverse process as an animation and the loss curve."""
        from difflab.recipes import load_config

        overrides = [f"train.out={out}", "train.max_minutes=2.7"]
        if steps is not None:
            overrides.append(f"train.steps={steps}")
        _, cfg = load_config(self.preset, overrides)
        start = time.perf_counter()
        result = self.train(cfg, progress=not quiet)
        model = self.load(out)
        k = model.num_classes or 1
        grid = self.sample(model, 10 * k).x
        frames: list[tuple[Tensor, Tensor]] = []

        def record(step: int, t: float, x_t: Tensor, x0: Tensor) -> None:
            frames.append((x_t.float().cpu(), x0.float().cpu()))

        self.sample(model, k, seed=cfg.sample.seed + 1, callback=record)
        lines = [
            f"demo finished in {time.perf_counter() - start:.0f} s ({result.steps} training "
            f"steps, {result.images_per_second:.0f} images/s)",
            f"samples (one row per class): {save_grid(grid, out / 'samples.png', nrow=10)}",
            f"reverse process: {save_animation(frames, out / 'reverse_process.gif')}",
            f"loss curve: {save_loss_curve(result.log, out / 'loss_curve.png')}",
            f"checkpoint: {result.checkpoint}",
        ]
        if result.stopped_early:
            lines.append(
                f"WARNING: this machine trained only {result.steps} of {cfg.train.steps} steps "
                f"in the demo's {cfg.train.max_minutes:g} minutes, so the samples are "
                f"undertrained; continue with: difflab train {out} --resume train.max_minutes=0, "
                f"then difflab sample {out}"
            )
        return "\n".join(lines)


#: Held-out examples evaluated per batch (one progress-bar tick).
EVAL_BATCH = 32


def _bits_per_dim(
    model: LoadedModel,
    x: Tensor,
    cond: dict[str, Tensor] | None,
    method: str,
    t_samples: int | None,
    ode_steps: int | None,
    probes: int | None,
    generator: torch.Generator,
) -> dict[str, Tensor]:
    """Per-example bits/dim of one batch: ``{"total": ...}`` (and the bound's terms for vlb)."""
    if method == "ode":
        from difflab.gaussian.likelihood import ode_bits_per_dim

        bpd = ode_bits_per_dim(model.denoiser, x, cond, n_steps=ode_steps, n_probes=probes,
                               generator=generator)  # fmt: skip
        return {"total": bpd}
    from difflab.gaussian.vlb import bits_per_dim

    return bits_per_dim(model.denoiser, x, cond, mc_steps=t_samples, reduction="none",
                        generator=generator)  # fmt: skip


def labels_and_rows(label: Any, names: list[str] | None, n: int) -> tuple[Tensor | None, int]:
    """The labels of ``label`` (default: one row per class for class-conditional models) and
    the grid's row length."""
    labels = class_labels(label, names, n)
    if labels is None and names is not None:
        per_class = -(-n // len(names))
        return torch.arange(len(names)).repeat_interleave(per_class)[:n], per_class
    return labels, 10


def load_guiding_classifier(path: str | Path, model: LoadedModel) -> nn.Module:
    """The noisy classifier of a ``classifier`` run, checked to fit ``model``: the same classes
    and the same noise schedule (its times ``t`` must mean the same ``x_t``)."""
    from difflab.recipes import load

    run = load(path, str(model.device))
    if run.recipe.name != "classifier":
        raise UserError(f"--classifier wants a run of the classifier recipe; {path} is a "
                        f"{run.recipe.name} run")  # fmt: skip
    if run.model.class_names != model.class_names:
        raise UserError(f"the classifier in {path} knows other classes than this model")
    if run.model.schedule.config() != model.denoiser.schedule.config():
        raise UserError(f"the classifier in {path} was trained on another noise schedule than "
                        "this model: train it with this model's config")  # fmt: skip
    return run.model.net


RECIPE = ImageRecipe()
