"""Recipe ``autoencoder``: the KL-regularised autoencoder of latent diffusion
(:class:`~difflab.nets.autoencoder.Autoencoder`; Rombach et al. 2022; seeds 002 and 004).

Trains the encoder and decoder together through the one :class:`Trainer` on the images of
``data`` with the per-pixel loss ``(||x - D(z)||_p^p + beta KL(q(z | x) || N(0, I))) / (C H W)``,
``z ~ q(z | x)`` (``autoencoder.reconstruction``: l1 or l2; ``autoencoder.kl_weight``: beta).
No perceptual or adversarial term: the glyphs judge's features were not tried as a loss.

The latent scale: when training ends, the posterior means ``mu(x)`` of (up to
:data:`SCALE_IMAGES`) training images are encoded with the EMA weights and
``latent_scale = 1 / std(mu)`` (over every element) is written into the checkpoint's metadata
with the step it was measured at (``latent_scale_step``); the ``latent`` recipe trains on
``latent_scale * mu(x)``, which has unit standard deviation on the training data, and refuses an
autoencoder whose scale was not measured on its final weights (a run stopped by Ctrl-C).

``difflab sample`` decodes latents drawn from ``N(0, I) / latent_scale``: what the decoder makes
of random latents (not glyphs: that is what a latent diffusion model is for).
``difflab eval`` reports the reconstruction PSNR of held-out images and, for digits and glyphs,
the judge's accuracy on the reconstructions next to its accuracy on the originals, and the
Frechet distance between the two in the judge's features.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from difflab.config import TrainConfig, check, check_seed, choose, to_dict
from difflab.errors import UserError
from difflab.evaluate import judged
from difflab.evaluate.frechet import frechet_distance_from_samples
from difflab.nets.autoencoder import Autoencoder, psnr
from difflab.recipes import (
    Evaluation,
    Recipe,
    Samples,
    load_network,
    positive_int,
    reading_metadata,
    seed_value,
)
from difflab.recipes.image import DataConfig, data_splits
from difflab.train.checkpoint import FILENAME, load_checkpoint, write_config_file
from difflab.train.trainer import Trainer, TrainResult

#: The version of this config's layout that checkpoints record.
CONFIG_VERSION = 1
#: Training images encoded to measure the latent scale (a seeded random subset).
SCALE_IMAGES = 4096
#: Images encoded or decoded per network batch outside training.
BATCH = 256
RECONSTRUCTIONS = ("l1", "l2")


@dataclass
class AutoencoderSection:
    """The network (``channels`` times ``channel_mults`` per level, ``len(channel_mults) - 1``
    halvings: [1, 2, 2] downsamples by 4; ``num_res_blocks`` per level; ``latent_channels``) and
    its loss (``reconstruction``: l1 | l2; ``kl_weight``: the KL term's weight beta)."""

    channels: int = 32
    channel_mults: list[int] = field(default_factory=lambda: [1, 2, 2])
    num_res_blocks: int = 1
    latent_channels: int = 4
    reconstruction: str = "l1"
    kl_weight: float = 1e-6

    def validate(self) -> None:
        check(
            self.channels >= 1 and self.num_res_blocks >= 1 and self.latent_channels >= 1,
            "autoencoder.channels, num_res_blocks and latent_channels must be at least 1",
        )
        check(bool(self.channel_mults) and all(m >= 1 for m in self.channel_mults),
              "autoencoder.channel_mults must be a non-empty list of positive numbers")  # fmt: skip
        choose("autoencoder.reconstruction", self.reconstruction, RECONSTRUCTIONS)
        check(self.kl_weight >= 0, "autoencoder.kl_weight must be non-negative")


@dataclass
class DecodeConfig:
    """``difflab sample``: how many random latents to decode, and the seed."""

    n: int = 64
    seed: int = 0

    def validate(self) -> None:
        check(self.n >= 1, "sample.n must be at least 1")
        check_seed("sample.seed", self.seed)


@dataclass
class AutoencoderConfig:
    """The whole config of the autoencoder recipe."""

    data: DataConfig = field(default_factory=lambda: DataConfig(name="glyphs", held_out=0.05))
    autoencoder: AutoencoderSection = field(default_factory=AutoencoderSection)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: DecodeConfig = field(default_factory=DecodeConfig)

    def validate(self) -> AutoencoderConfig:
        for section in (self.data, self.autoencoder, self.train, self.sample):
            section.validate()
        return self


def build_autoencoder(a: AutoencoderSection, image_shape: tuple[int, ...]) -> Autoencoder:
    """The autoencoder of ``a`` for images of ``image_shape``; shapes it cannot take are a
    :class:`UserError`."""
    if len(image_shape) != 3:
        raise UserError(f"the autoencoder needs images (C, H, W), got examples of shape "
                        f"{tuple(image_shape)}")  # fmt: skip
    try:
        net = Autoencoder(
            image_shape[0],
            channels=a.channels,
            channel_mults=tuple(a.channel_mults),
            num_res_blocks=a.num_res_blocks,
            latent_channels=a.latent_channels,
        )
        net.latent_shape(image_shape)
    except ValueError as e:
        raise UserError(f"autoencoder: {e}") from None
    return net


def make_loss(a: AutoencoderSection):
    """``loss(net, (x,), generator)``: the batch mean of
    ``(||x - D(z)||_p^p + kl_weight * KL(q(z | x) || N(0, I))) / (C H W)``, ``z ~ q(z | x)``."""

    def loss(net: nn.Module, batch: tuple[Tensor, ...], generator: torch.Generator) -> Tensor:
        x = batch[0]
        posterior = net.encode(x)
        error = net.decode(posterior.sample(generator)) - x
        error = error.abs() if a.reconstruction == "l1" else error.square()
        per_image = error.flatten(1).sum(dim=1) + a.kl_weight * posterior.kl()
        return per_image.mean() / x[0].numel()

    return loss


@torch.inference_mode()
def encode_means(net: Autoencoder, x: Tensor) -> Tensor:
    """Posterior means ``mu(x)`` of images ``x`` (on the network's device), in batches."""
    device = next(net.parameters()).device
    return torch.cat([net.encode(part.to(device)).mean for part in x.split(BATCH)])


@torch.inference_mode()
def decode_latents(net: Autoencoder, z: Tensor) -> Tensor:
    """Images ``D(z)`` of latents ``z`` (on the network's device), in batches."""
    return torch.cat([net.decode(part) for part in z.split(BATCH)])


def measure_latent_scale(net: Autoencoder, x: Tensor, seed: int = 0) -> float:
    """``1 / std(mu(x))`` over every element of the posterior means of up to
    :data:`SCALE_IMAGES` images of ``x`` (a random subset drawn with ``seed``)."""
    pick = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:SCALE_IMAGES]
    return float(1.0 / encode_means(net, x[pick]).double().std())


@dataclass
class LoadedAutoencoder:
    """A trained autoencoder (EMA weights, eval mode, no parameter gradients), the shape of its
    images and latents, its latent scale (``None`` when not measured on these weights) and the
    training step."""

    net: Autoencoder
    config: AutoencoderConfig
    shape: tuple[int, ...]
    latent_shape: tuple[int, ...]
    latent_scale: float | None
    step: int

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device


class AutoencoderRecipe(Recipe):
    name = "autoencoder"
    config_type = AutoencoderConfig
    preset = "autoencoder"
    data = "images"

    def build(self, cfg: AutoencoderConfig, meta: dict[str, Any]) -> Autoencoder:
        return build_autoencoder(cfg.autoencoder, tuple(meta["shape"]))

    def train(
        self, cfg: AutoencoderConfig, *, resume: bool = False, progress: bool = True
    ) -> TrainResult:
        """Train, then measure the latent scale with the EMA weights and store it in the
        checkpoint's metadata (and ``config.json``)."""
        train_data, _ = data_splits(cfg.data)
        out = Path(cfg.train.out)
        meta: dict[str, Any] = {
            "recipe": self.name,
            "config_version": CONFIG_VERSION,
            "config": to_dict(cfg),
            "shape": list(train_data.shape),
        }
        if resume and (out / FILENAME).is_file():  # the scale of the checkpoint resumed from
            before = load_checkpoint(out).config
            meta.update(
                {k: before[k] for k in ("latent_scale", "latent_scale_step") if k in before}
            )
        torch.manual_seed(cfg.train.seed)  # network initialisation
        net = self.build(cfg, meta)
        trainer = Trainer(net, make_loss(cfg.autoencoder), (train_data.x,), cfg.train, meta, out)
        result = trainer.fit(resume=resume, progress=progress)
        ema = self.build(cfg, meta).to(trainer.device)
        ema.load_state_dict(trainer.ema_state())
        scale = measure_latent_scale(ema.eval(), train_data.x, seed=cfg.train.seed)
        trainer.run_config.update(latent_scale=scale, latent_scale_step=trainer.step)
        trainer.save()
        write_config_file(out, trainer.run_config)
        return result

    def load(self, path: Path, device: str = "auto") -> LoadedAutoencoder:
        cfg, meta, net, step = load_network(self, path, device)
        net.requires_grad_(False)
        with reading_metadata(path):
            shape = tuple(int(s) for s in meta["shape"])
            measured = meta.get("latent_scale_step") == step
            scale = float(meta["latent_scale"]) if measured else None
        return LoadedAutoencoder(net, cfg, shape, net.latent_shape(shape), scale, step)

    def sample(self, model: LoadedAutoencoder, n: int, *, seed: int | None = None) -> Samples:
        """``n`` images decoded from latents ``z ~ N(0, I) / latent_scale``."""
        seed = model.config.sample.seed if seed is None else seed_value(seed)
        scale = require_scale(model, "decode random latents")
        gen = torch.Generator(model.device).manual_seed(seed)
        z = torch.randn((n, *model.latent_shape), generator=gen, device=model.device)
        return Samples(x=decode_latents(model.net, z / scale).cpu())

    def evaluate(
        self, model: LoadedAutoencoder, *, n: int = 1000, seed: int = 0, progress: bool = True
    ) -> Evaluation:
        """Reconstruction of ``n`` held-out images through the posterior mean: PSNR (mean over
        images, ``[-1, 1]`` range); for digits and glyphs also the judge's accuracy on the
        reconstructions and on the originals (the digits' held-out split, the glyphs' test
        split) and the FD between the two in the judge's features."""
        positive_int("n", n)
        seed_value(seed)
        data = model.config.data.name
        judge = data in judged.SHAPES and model.shape == judged.SHAPES[data]
        if judge:
            x, labels = judged.real_images(data, "held-out", n, seed)
        else:
            _, held_out = data_splits(model.config.data)
            if len(held_out) == 0:
                raise UserError("this run has no held-out data (data.held_out=0)")
            x, labels = held_out.x[:n], None
        reconstruction = decode_latents(model.net, encode_means(model.net, x)).cpu()
        db = psnr(x, reconstruction)
        metrics: dict[str, Any] = {"psnr": float(db.mean()), "images": len(x)}
        summary = f"PSNR {metrics['psnr']:.2f} dB on {len(x)} held-out images"
        if judge and len(x) >= 2:
            real_features, real_classes = judged.read(data, x)
            features, classes = judged.read(data, reconstruction)
            metrics.update(
                accuracy=float((classes == labels).double().mean()),
                accuracy_real=float((real_classes == labels).double().mean()),
                fd=frechet_distance_from_samples(features, real_features),
            )
            what = "character" if data == "glyphs" else "digit"
            summary += (f"; the {data} judge's {what} accuracy {100 * metrics['accuracy']:.1f}% "
                        f"on reconstructions vs {100 * metrics['accuracy_real']:.1f}% on the "
                        f"originals; judge-feature FD reconstructions-originals "
                        f"{metrics['fd']:.2f}")  # fmt: skip
        return Evaluation(metrics, summary)


def require_scale(model: LoadedAutoencoder, what: str) -> float:
    """The latent scale of an autoencoder, or a :class:`UserError` when its training stopped
    before measuring it."""
    if model.latent_scale is None:
        raise UserError(f"cannot {what}: this autoencoder's latent scale was not measured on "
                        f"its weights of step {model.step} (its training was interrupted): "
                        "finish it with difflab train RUN --resume")  # fmt: skip
    return model.latent_scale


RECIPE = AutoencoderRecipe()
