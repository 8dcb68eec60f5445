"""Recipe ``classifier``: a noisy classifier ``p_phi(y | x_t, t)`` for classifier guidance.

Classifier guidance (Dhariwal & Nichol 2021; seeds 000, 002 and 004) needs the gradient of
``log p(y | x_t)`` at every noise level, so the classifier is trained on inputs of the same
forward process as the diffusion model it will guide: for data ``(x_0, y)``, draw ``t`` as the
diffusion objective does (:func:`~difflab.gaussian.objectives.sample_times`), ``eps ~ N(0, I)``,
``x_t = alpha_t x_0 + sigma_t eps``, and minimise the cross-entropy ``-log p_phi(y | x_t, t)``.

Its config is the image recipe's (train it with the config of the model it will guide: the
``data`` and ``diffusion`` sections are what it uses) plus a ``classifier`` section for the
network (:class:`~difflab.nets.classifier.NoisyClassifier`). It draws no samples itself:
``difflab sample MODEL --classifier RUN`` guides a diffusion model with it.
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
from difflab.gaussian.objectives import sample_times
from difflab.gaussian.process import q_sample
from difflab.gaussian.schedules import Schedule
from difflab.nets.classifier import NoisyClassifier
from difflab.recipes import (
    Evaluation,
    Recipe,
    Samples,
    load_network,
    positive_int,
    reading_metadata,
    seed_value,
)
from difflab.recipes.image import (
    ImageConfig,
    build_schedule,
    config_from_run,
    data_splits,
    run_metadata,
)
from difflab.train.trainer import Trainer, TrainResult


@dataclass
class ClassifierNetConfig:
    """Size of the :class:`NoisyClassifier`: width of the first level, one width multiplier per
    resolution level, residual blocks per level, dropout inside them."""

    channels: int = 32
    channel_mults: list[int] = field(default_factory=lambda: [1, 2])
    num_res_blocks: int = 1
    dropout: float = 0.0

    def validate(self) -> None:
        check(self.channels >= 1 and self.num_res_blocks >= 1,
              "classifier.channels and classifier.num_res_blocks must be at least 1")  # fmt: skip
        check(len(self.channel_mults) >= 1 and min(self.channel_mults) >= 1,
              "classifier.channel_mults must be a non-empty list of positive numbers")  # fmt: skip
        check(0.0 <= self.dropout < 1.0, "classifier.dropout must be in [0, 1)")


@dataclass
class ClassifierConfig(ImageConfig):
    """The image recipe's config plus the classifier's network."""

    classifier: ClassifierNetConfig = field(default_factory=ClassifierNetConfig)

    def validate(self) -> ClassifierConfig:
        super().validate()
        self.classifier.validate()
        return self


def classifier_loss(
    model: nn.Module,
    schedule: Schedule,
    x0: Tensor,
    labels: Tensor,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Mean cross-entropy ``-log p_phi(y | x_t, t)`` with ``x_t = alpha_t x_0 + sigma_t eps`` at
    training times drawn as for the diffusion objective."""
    t = sample_times(schedule, x0.shape[0], generator=generator, device=x0.device)
    eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    x_t = q_sample(schedule, x0, t, eps)
    return F.cross_entropy(model(x_t, t).float(), labels)


@torch.inference_mode()
def noisy_accuracy(
    classifier: nn.Module,
    schedule: Schedule,
    x0: Tensor,
    labels: Tensor,
    t: float,
    generator: torch.Generator | None = None,
) -> float:
    """Share of ``x_t = alpha_t x_0 + sigma_t eps`` (one draw each) classified as their label."""
    device = next(classifier.parameters()).device
    x0, labels = x0.to(device), labels.to(device)
    eps = torch.randn(x0.shape, generator=generator, device=device, dtype=x0.dtype)
    times = torch.full((x0.shape[0],), float(t), dtype=torch.float64, device=device)
    predicted = classifier(q_sample(schedule, x0, times, eps), times).argmax(dim=1)
    return float((predicted == labels).float().mean())


@dataclass
class LoadedClassifier:
    """A trained noisy classifier (EMA weights, eval mode, no parameter gradients) and the
    schedule its times refer to. ``net(x_t, t)`` is what classifier guidance calls."""

    net: NoisyClassifier
    schedule: Schedule
    config: ClassifierConfig
    class_names: list[str]
    step: int


class ClassifierRecipe(Recipe):
    name = "classifier"
    config_type = ClassifierConfig
    preset = "digits"
    data = "images"

    def config_from_run(self, meta: dict[str, Any]) -> ClassifierConfig:
        if not meta.get("config_version"):  # difflab 0.1 kept the network's size beside it
            meta = {**meta, "config": {**meta["config"], "classifier": meta["classifier"]}}
        return config_from_run(self.config_type, meta)

    def build(self, cfg: ClassifierConfig, meta: dict[str, Any]) -> NoisyClassifier:
        c, channels, k = cfg.classifier, meta["shape"][0], len(meta["class_names"])
        try:
            return NoisyClassifier(channels, k, channels=c.channels,
                                   channel_mults=tuple(c.channel_mults),
                                   num_res_blocks=c.num_res_blocks, dropout=c.dropout)  # fmt: skip
        except ValueError as e:
            raise UserError(f"classifier: {e}") from None

    def train(
        self, cfg: ClassifierConfig, *, resume: bool = False, progress: bool = True
    ) -> TrainResult:
        data, _ = data_splits(cfg.data)
        if data.labels is None or data.class_names is None:
            raise UserError(f"the data {cfg.data.name!r} has no labels to train a classifier on")
        if len(data.shape) != 3:
            raise UserError(f"the noisy classifier needs images (C, H, W), got {data.shape}")
        factor = 2 ** (len(cfg.classifier.channel_mults) - 1)
        if data.shape[1] % factor or data.shape[2] % factor:
            raise UserError(f"image sides {data.shape[1:]} are not divisible by {factor}")
        meta = run_metadata(self.name, cfg, data)
        meta["class_names"] = data.class_names  # a classifier always knows the classes
        schedule = build_schedule(cfg.diffusion)
        torch.manual_seed(cfg.train.seed)  # network initialisation
        net = self.build(cfg, meta)

        def loss(model: nn.Module, batch: tuple[Tensor, ...], generator: torch.Generator) -> Tensor:
            return classifier_loss(model, schedule, batch[0], batch[1], generator)

        trainer = Trainer(net, loss, (data.x, data.labels), cfg.train, meta, Path(cfg.train.out))
        return trainer.fit(resume=resume, progress=progress)

    def load(self, path: Path, device: str = "auto") -> LoadedClassifier:
        cfg, meta, net, step = load_network(self, path, device)
        net.requires_grad_(False)
        with reading_metadata(path):
            names = list(meta["class_names"])
        return LoadedClassifier(net, build_schedule(cfg.diffusion), cfg, names, step)

    def sample(self, model: LoadedClassifier, n: int) -> Samples:
        raise UserError(
            "a classifier draws no samples: guide a diffusion model with it, "
            "difflab sample MODEL --classifier RUN --class K"
        )

    def evaluate(
        self, model: LoadedClassifier, *, n: int = 256, seed: int = 0, progress: bool = True
    ) -> Evaluation:
        """Held-out accuracy of the classifier on ``x_t`` at t = 0, 0.25, 0.5, 0.75."""
        positive_int("n", n)
        seed_value(seed)
        _, held_out = data_splits(model.config.data)
        if len(held_out) == 0:
            raise UserError("this run has no held-out data (data.held_out=0)")
        gen = torch.Generator(next(model.net.parameters()).device).manual_seed(seed)
        x, labels = held_out.x[:n], held_out.labels[:n]
        accuracy = {t: noisy_accuracy(model.net, model.schedule, x, labels, t, gen)
                    for t in (0.0, 0.25, 0.5, 0.75)}  # fmt: skip
        parts = ", ".join(f"t={t:g}: {a:.3f}" for t, a in accuracy.items())
        return Evaluation({f"accuracy_t{t:g}": a for t, a in accuracy.items()},
                          f"held-out accuracy on {len(x)} examples, {parts}")  # fmt: skip


RECIPE = ClassifierRecipe()
