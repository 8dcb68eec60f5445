"""Recipe ``latent``: a diffusion model of an autoencoder's latents, decoded after sampling
(latent diffusion, Rombach et al. 2022; seeds 002 and 004).

``difflab train glyphs --recipe latent latent.autoencoder=RUN`` loads the frozen autoencoder of
an ``autoencoder`` run, encodes the training images once to their posterior means and trains
any diffusion model of the image recipe (every schedule, parameterization, weighting, network
kind, class conditioning with dropout) on

    z_0 = latent_scale * mu(x),

whose standard deviation is 1 on the autoencoder's training data (``latent_scale`` is the one
the autoencoder measured and stored in its checkpoint). On an image preset (``--recipe latent``
on ``glyphs``) the prediction becomes ``v`` unless the user asks for another: latents are not
bounded, so no x_0 threshold can catch the eps-prediction's estimate ``x_0 = (z_t - sigma_t
eps) / alpha_t``, which multiplies the network's eps error by ``1 / alpha_t`` (2 * 10^4 at the
cosine schedule's ``t = 1``; a trained eps model's sampled latents came out with a standard
deviation of 2,000), while ``x_0 = alpha_t z_t - sigma_t v`` stays bounded. ``model.kind=mlp``
sees each latent flattened to a vector. The run records the autoencoder's absolute path, step
and latent scale, and refuses to load when the autoencoder is missing or has changed since.

Sampling draws latents with any sampler and classifier-free guidance exactly as the image recipe
does (no x_0 threshold: latents are not bounded, so ``--threshold`` does not apply; nor does
``--classifier``, whose classifiers see pixels), then decodes ``x = D(z_0 / latent_scale)``,
clamped to ``[-1, 1]``. A sampling callback receives decoded images: the decoded x_0 estimate
and the decoded state ``x_t / sqrt(alpha_t^2 + sigma_t^2)`` (the latent rescaled to unit
variance under VE schedules too), so the reverse-process animation shows pictures.
``difflab eval`` samples and judges the decoded images (FD against held-out real images, its
floor, the judge's class accuracy: :func:`difflab.evaluate.judged.judged_quality`), for digits
and glyphs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

from difflab.config import check
from difflab.data.images import ArrayData
from difflab.errors import UserError
from difflab.evaluate import judged
from difflab.recipes import (
    Evaluation,
    Recipe,
    Samples,
    is_run,
    load,
    positive_int,
    reading_metadata,
    seed_value,
)
from difflab.recipes.autoencoder import (
    AutoencoderRecipe,
    LoadedAutoencoder,
    decode_latents,
    encode_means,
    require_scale,
)
from difflab.recipes.image import (
    ImageConfig,
    ImageRecipe,
    LoadedModel,
    check_output_memory,
    data_splits,
)
from difflab.train.checkpoint import read_run_config


@dataclass
class LatentSection:
    """``autoencoder``: the run folder of the ``autoencoder`` recipe whose latents are modelled."""

    autoencoder: str | None = None

    def validate(self) -> None:
        check(bool(self.autoencoder), "the latent recipe needs latent.autoencoder=RUN, the run "
              "folder of an autoencoder (difflab train autoencoder)")  # fmt: skip


@dataclass
class LatentConfig(ImageConfig):
    """The image recipe's config plus the ``latent`` section."""

    SELF_CONDITIONING: ClassVar[bool] = True  # the image recipe's loss and sampling

    latent: LatentSection = field(default_factory=LatentSection)

    def validate(self) -> LatentConfig:
        super().validate()
        self.latent.validate()
        check(
            self.sample.threshold in (None, "none"),
            "sample.threshold does not apply to latent models: latents are not bounded",
        )
        return self


def load_autoencoder(path: str | Path, device: str) -> LoadedAutoencoder:
    """The autoencoder of the run ``path``, with a measured latent scale; a missing folder or a
    run of another recipe is a :class:`UserError`."""
    if not is_run(path):
        raise UserError(f"latent.autoencoder={path} is not a run folder: train one with "
                        "difflab train autoencoder train.out=RUN")  # fmt: skip
    run = load(path, device)
    if not isinstance(run.recipe, AutoencoderRecipe):
        raise UserError(f"latent.autoencoder={path} is a run of the {run.recipe.name} recipe, "
                        "not of the autoencoder recipe")  # fmt: skip
    require_scale(run.model, "train on its latents")
    return run.model


def encode_training_images(
    path: str, data: ArrayData, name: str, device: str, flat: bool = False
) -> tuple[ArrayData, dict[str, Any]]:
    """``latent_scale * mu(x)`` of the images of ``data`` (of ``data.name=name``) under the
    autoencoder of the run ``path`` (flattened when ``flat``, for ``model.kind=mlp``), and what a
    latent run's metadata records of the autoencoder: its absolute path, step, latent scale and
    image shape."""
    ae = load_autoencoder(path, device)
    if data.shape != ae.shape:
        raise UserError(f"the autoencoder in {path} encodes images of shape {ae.shape}, but "
                        f"data.name={name} has images of shape {data.shape}")  # fmt: skip
    z = encode_means(ae.net, data.x).cpu() * ae.latent_scale
    extra = {
        "autoencoder": str(Path(path).resolve()),
        "autoencoder_step": ae.step,
        "latent_scale": ae.latent_scale,
        "image_shape": list(ae.shape),
    }
    return ArrayData(z.flatten(1) if flat else z, data.labels, data.class_names), extra


def autoencoder_of_run(path: Path, device: str) -> LoadedAutoencoder:
    """The autoencoder a latent run was trained on, refused when it is missing or has changed
    (another step or latent scale) since."""
    meta = read_run_config(path)
    with reading_metadata(path):
        ae_path, ae_step = str(meta["autoencoder"]), int(meta["autoencoder_step"])
        scale = float(meta["latent_scale"])
    if not is_run(ae_path):
        raise UserError(f"the autoencoder of this latent model, {ae_path}, is missing: put its "
                        "run folder back there, or train the latent model again")  # fmt: skip
    ae = load_autoencoder(ae_path, device)
    if ae.step != ae_step or ae.latent_scale != scale:
        raise UserError(f"the autoencoder in {ae_path} has changed since this latent model "
                        f"was trained (step {ae.step}, latent scale {ae.latent_scale:.6g}; "
                        f"then step {ae_step}, scale {scale:.6g}): train the latent model "
                        "again")  # fmt: skip
    return ae


def decode(ae: LoadedAutoencoder, z: Tensor) -> Tensor:
    """Images ``D(z / latent_scale)`` in ``[-1, 1]`` of latents ``z`` as a diffusion model draws
    them (flat for ``model.kind=mlp``)."""
    z = z.reshape(len(z), *ae.latent_shape).to(ae.device) / ae.latent_scale
    return decode_latents(ae.net, z).clamp(-1, 1)


def decoding_callback(ae: LoadedAutoencoder, schedule: Any, callback: Any) -> Any:
    """A sampler callback that hands ``callback(i, t, x, x0)`` decoded pictures: the decoded
    state ``x_t / sqrt(alpha_t^2 + sigma_t^2)`` and the decoded x_0 estimate."""
    if callback is None:
        return None

    def report(i: int, t: float, x_t: Tensor, x0: Tensor) -> None:
        alpha, sigma = schedule.alpha_sigma(torch.tensor([t], dtype=torch.float64))
        unit = x_t / math.sqrt(float(alpha.square() + sigma.square()))
        callback(i, t, decode(ae, unit), decode(ae, x0))

    return report


@dataclass
class LatentModel(LoadedModel):
    """A trained latent diffusion model: the image recipe's loaded model (its ``shape`` is the
    shape the diffusion model sees) plus the frozen autoencoder."""

    autoencoder: LoadedAutoencoder


class LatentRecipe(ImageRecipe):
    name = "latent"
    config_type = LatentConfig
    preset = "glyphs"
    demo = Recipe.demo  # no demo of its own (the image recipe's is the digits demo)
    adopted: ClassVar[dict[str, dict[str, Any]]] = {"diffusion": {"prediction": "v"}}

    def training_data(self, cfg: LatentConfig) -> tuple[ArrayData, dict[str, Any]]:
        """``latent_scale * mu(x)`` of the training split and the autoencoder's record."""
        train_data, _ = data_splits(cfg.data)
        return encode_training_images(cfg.latent.autoencoder, train_data, cfg.data.name,
                                      cfg.train.device,
                                      flat=cfg.model.kind == "mlp")  # fmt: skip

    def load(self, path: Path, device: str = "auto") -> LatentModel:
        model = super().load(path, device)
        ae = autoencoder_of_run(path, device)
        return LatentModel(model.denoiser, model.config, model.shape, model.class_names,
                           model.step, ae)  # fmt: skip

    def decode(self, model: LatentModel, z: Tensor) -> Tensor:
        """Images of latents ``z`` (:func:`decode`)."""
        return decode(model.autoencoder, z)

    def sample(
        self,
        model: LatentModel,
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
        seed: int | None = None,
        callback: Any = None,
    ) -> Samples:
        """``n`` decoded samples; the options are the image recipe's (``callback`` sees decoded
        images, see the module docstring)."""
        check_output_memory(n, model.autoencoder.shape)  # the decoded images, not the latents
        report = decoding_callback(model.autoencoder, model.denoiser.schedule, callback)
        samples = super().sample(model, n, sampler=sampler, steps=steps, grid=grid, eta=eta,
                                 sampler_options=sampler_options, label=label, guidance=guidance,
                                 convention=convention, threshold="none", seed=seed,
                                 callback=report)  # fmt: skip
        samples.x = self.decode(model, samples.x).cpu()
        return samples

    def evaluate(
        self, model: LatentModel, *, n: int = 1000, seed: int = 0, progress: bool = True
    ) -> Evaluation:
        """Draw ``n`` samples with the run's ``sample`` settings (class-conditional models: the
        classes in turn), decode them and judge them: FD against held-out real images, its
        floor at the same ``n``, and the judge's accuracy on the intended classes."""
        positive_int("n", n)
        seed_value(seed)
        data = model.config.data.name
        if judged.SHAPES.get(data) != model.autoencoder.shape:
            raise UserError(f"eval judges generated digits and glyphs; this run's data is "
                            f"data.name={data}")  # fmt: skip
        if n < 2:
            raise UserError("--n must be at least 2 for a Frechet distance")
        labels = None if model.num_classes is None else torch.arange(n) % model.num_classes
        x = self.sample(model, n, label=labels, seed=seed).x
        q = judged.judged_quality(x, data, labels)
        s = model.config.sample
        how = f"{s.sampler} {s.steps} steps, guidance {s.guidance:g}"
        summary = (f"judged FD {q['fd']:.2f} (floor {q['fd_floor']:.2f}, {q['fd_ratio']:.2f}x) "
                   f"on {n} decoded samples ({how})")  # fmt: skip
        if q["accuracy"] is not None:
            what = "character" if data == "glyphs" else "digit"
            summary += (f"; the judge's {what} accuracy {100 * q['accuracy']:.1f}% (on real "
                        f"held-out images {100 * q['accuracy_real']:.1f}%)")  # fmt: skip
        return Evaluation({k: v for k, v in q.items() if v is not None}, summary)


RECIPE = LatentRecipe()
