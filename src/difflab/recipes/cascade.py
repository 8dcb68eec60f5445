"""Recipe ``cascade``: image-conditioned super-resolution and a two-stage cascade (Ho et al.
2021; seeds 002 and 004, "Cascade networks").

Stage 1 is a class-conditional base model of the digits downsampled to ``low_res x low_res``
(2x2 block means, 8x8 -> 4x4 by default); stage 2 is a super-resolution model of the full
8x8 digits conditioned on the low-resolution image, which the U-Net upsamples bilinearly and
concatenates to ``x_t`` on channels (seed 004).

Noise-conditioning augmentation (Ho et al. 2021, Sec. 3.2, "Gaussian conditioning
augmentation"): the super-resolution model never sees a clean low-resolution image. In training
the low-resolution input is replaced by a draw of the same forward process,
``z_s = alpha_s x_lr + sigma_s eps`` with ``s ~ U[0, aug_max]`` per example; at sampling the
base model's output is corrupted once at a fixed ``s = aug_sample``. The level ``s`` is given to
the network as one more constant input channel next to ``z_s``, so one model serves every level.
This makes the second stage robust to the first stage's artefacts (the train/test mismatch of
cascades).

Both stages are class-conditional with conditioning dropout ``diffusion.cond_drop``, so both can
be sampled with classifier-free guidance.

Config: the image recipe's sections (both stages share ``model``, ``diffusion`` and ``train``) plus
``cascade`` (:class:`CascadeSection`). The stages are written to ``<train.out>/base`` and
``<train.out>/sr``, each an ordinary run folder recording ``stage``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from difflab.config import check
from difflab.errors import UserError
from difflab.gaussian import samplers as gaussian_samplers
from difflab.gaussian.objectives import make_objective
from difflab.gaussian.parameterization import DenoiserFn
from difflab.gaussian.process import q_sample
from difflab.gaussian.schedules import Schedule
from difflab.nets.super_resolution import SuperResolutionNet
from difflab.recipes import (
    Evaluation,
    Recipe,
    Samples,
    finite,
    load_network,
    reading_metadata,
    seed_value,
)
from difflab.recipes.image import (
    SAMPLE_CHUNK,
    ImageConfig,
    LoadedModel,
    build_denoiser,
    build_net,
    build_schedule,
    build_unet,
    config_from_run,
    data_splits,
    draw,
    drop_labels,
    guidance_settings,
    guided_denoiser,
    labels_and_rows,
    make_loss,
    run_metadata,
    sampler_settings,
    threshold_settings,
)
from difflab.train.checkpoint import FILENAME, resolve_checkpoint
from difflab.train.trainer import Trainer, TrainResult

STAGES = ("base", "sr")


@dataclass
class CascadeSection:
    """``low_res``: side of the base stage's images; ``aug_max``: training range ``[0, aug_max]``
    of the augmentation level ``s`` (a diffusion time); ``aug_sample``: the fixed level used at
    sampling."""

    low_res: int = 4
    aug_max: float = 0.5
    aug_sample: float = 0.1

    def validate(self) -> None:
        check(self.low_res >= 1, "cascade.low_res must be at least 1")
        check(0.0 <= self.aug_max <= 1.0 and 0.0 <= self.aug_sample <= 1.0,
              "cascade.aug_max and cascade.aug_sample must lie in [0, 1]")  # fmt: skip


@dataclass
class CascadeConfig(ImageConfig):
    """The image recipe's config plus the cascade's own section."""

    cascade: CascadeSection = field(default_factory=CascadeSection)

    def validate(self) -> CascadeConfig:
        super().validate()
        check(self.model.kind == "unet", "the cascade recipe needs model.kind=unet")
        self.cascade.validate()
        return self


def downsample(x: Tensor, size: int) -> Tensor:
    """``(N, C, H, W) -> (N, C, size, size)`` by averaging ``H/size x W/size`` blocks."""
    if x.shape[-1] % size or x.shape[-2] % size:
        raise ValueError(f"cannot average {tuple(x.shape[-2:])} images down to {size}x{size}")
    return F.adaptive_avg_pool2d(x, size)


def augment_low_res(
    schedule: Schedule, x_lr: Tensor, s: Tensor, generator: torch.Generator | None = None
) -> Tensor:
    """``z_s = alpha_s x_lr + sigma_s eps``: the forward process applied to the conditioning
    image at levels ``s`` ``(B,)`` (``s = 0`` returns ``x_lr`` exactly)."""
    eps = torch.randn(x_lr.shape, generator=generator, device=x_lr.device, dtype=x_lr.dtype)
    return q_sample(schedule, x_lr, s, eps)


def make_super_resolution_loss(cfg: CascadeConfig, num_classes: int | None) -> Any:
    """``loss(model, (x, labels), generator)``: downsample, augment at ``s ~ U[0, aug_max]``,
    drop labels with probability ``diffusion.cond_drop``, then the objective of the
    parameterization."""
    d, c = cfg.diffusion, cfg.cascade
    schedule = build_schedule(d)
    objective = make_objective(d.prediction, d.weighting)

    def loss(model: nn.Module, batch: tuple[Tensor, ...], generator: torch.Generator) -> Tensor:
        x = batch[0]
        s = c.aug_max * torch.rand(x.shape[0], generator=generator, device=x.device,
                                   dtype=torch.float64)  # fmt: skip
        z = augment_low_res(schedule, downsample(x, c.low_res), s, generator)
        cond: dict[str, Any] = {"low_res": z, "aug_level": s}
        if num_classes is not None:
            cond["class_labels"] = drop_labels(batch[1], num_classes, d.cond_drop, generator)
        return objective(build_denoiser(model, d), x, cond, generator)

    return loss


@torch.inference_mode()
def super_resolve(
    denoiser: DenoiserFn,
    low_res: Tensor,
    shape: tuple[int, ...],
    ts: Tensor,
    *,
    aug_level: float,
    labels: Tensor | None = None,
    sampler: str = "ddim",
    generator: torch.Generator | None = None,
    **options: Any,
) -> Tensor:
    """Sample high-resolution images of ``shape`` given ``low_res`` ``(N, C, h, w)``: corrupt it
    once to ``z_s`` at the fixed level ``s = aug_level``, then run ``sampler`` over the times
    ``ts`` with ``cond = {low_res: z_s, aug_level: s[, class_labels]}``."""
    n, device = low_res.shape[0], low_res.device
    schedule = denoiser.schedule
    s = torch.full((n,), float(aug_level), dtype=torch.float64, device=device)
    cond: dict[str, Any] = {
        "low_res": augment_low_res(schedule, low_res, s, generator),
        "aug_level": s,
    }
    if labels is not None:
        cond["class_labels"] = labels.to(device)
    x = torch.randn((n, *shape), generator=generator, device=device, dtype=low_res.dtype)
    fn = gaussian_samplers.SAMPLERS[sampler]
    return fn(denoiser, x * schedule.prior_std, ts, cond=cond, generator=generator, **options)


@dataclass
class Cascade:
    """Both trained stages (EMA weights) as the image recipe's :class:`LoadedModel`: the base at
    low resolution, the super-resolution model at full resolution."""

    base: LoadedModel
    sr: LoadedModel
    config: CascadeConfig
    step: int

    @property
    def class_names(self) -> list[str] | None:
        return self.base.class_names


def stage_of(meta: dict[str, Any]) -> str:
    """``base`` or ``sr`` (difflab 0.1 recorded the stage as the recipe's name)."""
    former = {"cascade-base": "base", "cascade-super-resolution": "sr"}
    return meta.get("stage") or former[meta["recipe"]]


class CascadeRecipe(Recipe):
    name = "cascade"
    config_type = CascadeConfig
    preset = "digits"
    data = "images"

    def config_from_run(self, meta: dict[str, Any]) -> CascadeConfig:
        if not meta.get("config_version"):  # difflab 0.1 kept the cascade section beside it
            meta = {**meta, "config": {**meta["config"], "cascade": meta["cascade"]}}
        return config_from_run(self.config_type, meta)

    def build(self, cfg: CascadeConfig, meta: dict[str, Any]) -> nn.Module:
        shape, k = tuple(meta["shape"]), len(meta["class_names"] or []) or None
        if stage_of(meta) == "base":
            return build_net(cfg.model, shape, k)
        try:
            return SuperResolutionNet(build_unet(cfg.model.net, shape, k,
                                                 cond_channels=shape[0] + 1))  # fmt: skip
        except ValueError as e:
            raise UserError(f"model.unet: {e}") from None

    def train(
        self, cfg: CascadeConfig, *, resume: bool = False, progress: bool = True
    ) -> TrainResult:
        """Train both stages on ``data`` into ``<train.out>/base`` and ``<train.out>/sr``;
        returns the super-resolution stage's result."""
        data, _ = data_splits(cfg.data)
        if len(data.shape) != 3:
            raise UserError(f"a cascade needs images (C, H, W), got examples of shape {data.shape}")
        low = cfg.cascade.low_res
        check(data.shape[1] % low == 0 and data.shape[2] % low == 0,
              f"cascade.low_res={low} must divide the image size {data.shape[1]}")  # fmt: skip
        sr_meta = run_metadata(self.name, cfg, data, stage="sr")
        k = len(sr_meta["class_names"] or []) or None
        labels = () if k is None else (data.labels,)
        base_meta = {**sr_meta, "stage": "base", "shape": [data.shape[0], low, low]}
        out = Path(cfg.train.out)
        if resume:  # both stages, before either continues
            for stage in STAGES:
                resolve_checkpoint(out / stage)
        stages = [
            (base_meta, make_loss(cfg.diffusion, k), (downsample(data.x, low), *labels)),
            (sr_meta, make_super_resolution_loss(cfg, k), (data.x, *labels)),
        ]
        for meta, loss, tensors in stages:
            torch.manual_seed(cfg.train.seed)  # network initialisation
            net = self.build(cfg, meta)
            trainer = Trainer(net, loss, tensors, cfg.train, meta, out / meta["stage"])
            result = trainer.fit(resume=resume, progress=progress)
        return result

    def load(self, path: Path, device: str = "auto") -> Cascade:
        if path.is_file() or (path / FILENAME).is_file():
            raise UserError(f"{path} is one stage of a cascade: give the cascade's folder (which "
                            "holds base/ and sr/)")  # fmt: skip
        stages = {}
        for stage in STAGES:
            cfg, meta, net, step = load_network(self, path / stage, device)
            with reading_metadata(path / stage):
                if stage_of(meta) != stage:
                    raise UserError(f"{path / stage} holds the {stage_of(meta)} stage, not {stage}")
                shape, names = tuple(meta["shape"]), meta["class_names"]
            stages[stage] = LoadedModel(build_denoiser(net, cfg.diffusion), cfg, shape, names, step)
        return Cascade(stages["base"], stages["sr"], stages["sr"].config, stages["sr"].step)

    def sample(
        self,
        model: Cascade,
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
        threshold: str | None = None,
        percentile: float | None = None,
        aug_level: float | None = None,
        seed: int | None = None,
    ) -> Samples:
        """``n`` base samples at low resolution (clipped to ``[-1, 1]``, in ``extras["low"]``)
        and their super-resolved versions, both stages with the same sampler settings and
        classifier-free guidance towards ``label`` (one row per class by default). The base
        output is corrupted once at ``aug_level`` (default ``cascade.aug_sample``)."""
        s, base, sr = model.config.sample, model.base, model.sr
        sampler, steps, grid, options = sampler_settings(s, sampler, steps, grid, eta,
                                                         sampler_options)  # fmt: skip
        labels, nrow = labels_and_rows(label, model.class_names, n)
        guidance, convention = guidance_settings(guidance, convention, s.guidance)
        threshold, percentile = threshold_settings(threshold, percentile, s.threshold, base.shape)
        level = model.config.cascade.aug_sample if aug_level is None else aug_level
        level = finite("aug_level", level, 0.0, 1.0)
        seed = s.seed if seed is None else seed_value(seed)
        wrap = {"guidance": guidance, "convention": convention, "threshold": threshold,
                "percentile": percentile}  # fmt: skip
        cond = None
        if model.class_names is not None:
            null = torch.full((n,), len(model.class_names), dtype=torch.long)
            cond = {"class_labels": (null if labels is None else labels).to(base.device)}
        low = draw(base, guided_denoiser(base, **wrap), n, cond, sampler=sampler, steps=steps,
                   grid=grid, seed=seed, options=options).clamp(-1.0, 1.0)  # fmt: skip
        gen = torch.Generator(sr.device).manual_seed(seed + 1)
        try:
            ts = gaussian_samplers.time_grid(sr.denoiser.schedule, steps, grid)
            den = guided_denoiser(sr, **wrap)
            high = torch.cat([
                super_resolve(den, low[rows], sr.shape, ts, aug_level=level, sampler=sampler,
                              labels=cond and cond["class_labels"][rows], generator=gen,
                              **options)
                for rows in torch.arange(n).split(SAMPLE_CHUNK)
            ])  # fmt: skip
        except ValueError as e:
            raise UserError(f"sampler {sampler}: {e}") from None
        return Samples(x=high, labels=labels, nrow=nrow, extras={"low": low})

    def evaluate(self, model: Cascade, **options: Any) -> Evaluation:
        raise UserError("a cascade has no likelihood evaluation yet")


RECIPE = CascadeRecipe()
