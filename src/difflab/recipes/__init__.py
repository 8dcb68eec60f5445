"""Recipes: what a user trains, each one module implementing :class:`Recipe`.

A recipe wires the four contracts (process, denoiser, objective, sampler) for one kind of
model. It owns its config type (the nested sections of its YAML tree), builds its network from
a config and the run's metadata, trains with the one :class:`~difflab.train.trainer.Trainer`,
loads its checkpoints, samples and evaluates. It is found by name in :data:`RECIPES`, the name
being what its checkpoints record, so ``difflab sample RUN`` needs no other hint.

How to add a recipe: write ``recipes/<name>.py`` with a subclass of :class:`Recipe` assigned to
the module-level ``RECIPE``, add its module to :data:`RECIPES`, and give it a preset in
``configs/`` if it has a useful default. Its :meth:`Recipe.sample` lists the options it takes;
:meth:`Run.sample` refuses any other with one line naming the option and the recipe.
"""

from __future__ import annotations

import importlib
import inspect
import json
import math
import os
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from difflab.config import (
    DEFAULT_RECIPE,
    MAX_SEED,
    apply_overrides,
    choose,
    from_dict,
    read_source,
    to_dict,
)
from difflab.errors import UserError
from difflab.files import file_error, make_folder, write_atomically, write_bytes, write_text
from difflab.train import distributed
from difflab.train.checkpoint import CONFIG_FILENAME, FILENAME, load_checkpoint, read_run_config
from difflab.train.trainer import LOG_NAME, TrainResult, load_ema, sampling_precision
from difflab.viz.images import save_grid, save_images, save_loss_curve

#: Every recipe: its name (recorded in checkpoints) and the module defining ``RECIPE``.
RECIPES = {
    "image": "difflab.recipes.image",
    "classifier": "difflab.recipes.classifier",
    "cascade": "difflab.recipes.cascade",
    "text-to-digit": "difflab.recipes.text_to_digit",
    "text-to-image": "difflab.recipes.text_to_image",
    "text": "difflab.recipes.text",
    "flow": "difflab.recipes.flow",
    "consistency": "difflab.recipes.consistency",
    "autoencoder": "difflab.recipes.autoencoder",
    "latent": "difflab.recipes.latent",
    "adapt": "difflab.recipes.adapt",
}
#: The names checkpoints of difflab 0.1 recorded for recipes that have since been renamed.
FORMER_NAMES = {
    "noisy-classifier": "classifier",
    "cascade-base": "cascade",
    "cascade-super-resolution": "cascade",
}


def get(name: str) -> Recipe:
    """The recipe registered as ``name`` (or one of its :data:`FORMER_NAMES`)."""
    name = FORMER_NAMES.get(name, name)
    choose("recipe", name, RECIPES)
    return importlib.import_module(RECIPES[name]).RECIPE


class Recipe(ABC):
    """The interface every recipe implements.

    Class attributes: ``name`` (its key in :data:`RECIPES`), ``config_type`` (the dataclass of
    its whole YAML tree, with a ``validate()`` method), ``preset`` (the config used when none is
    given), ``data`` (``"images"`` or ``"text"``: recipes of the same data read each other's
    configs, so ``--recipe cascade`` works on the ``digits`` preset).
    """

    name: ClassVar[str]
    config_type: ClassVar[type]
    preset: ClassVar[str]
    data: ClassVar[str]
    #: What :meth:`demo` writes into its folder (files, relative paths), replaced on a re-run.
    demo_files: ClassVar[tuple[str, ...]] = ()
    #: Per config section, the keys :meth:`adopt` replaces (by the value) or removes (``None``).
    adopted: ClassVar[dict[str, dict[str, Any]]] = {}

    @abstractmethod
    def build(self, cfg: Any, meta: dict[str, Any]) -> nn.Module:
        """The untrained network of ``cfg`` for the data described by the run metadata ``meta``
        (shapes, classes, vocabulary: whatever the recipe recorded when it started training)."""

    @abstractmethod
    def train(self, cfg: Any, *, resume: bool = False, progress: bool = True) -> TrainResult:
        """Train into ``cfg.train.out`` (continuing its checkpoint when ``resume``)."""

    @abstractmethod
    def load(self, path: Path, device: str = "auto") -> Any:
        """The trained model of a run folder, ready to sample (EMA weights, eval mode)."""

    @abstractmethod
    def sample(self, model: Any, n: int, **options: Any) -> Samples:
        """``n`` samples; ``options`` are the keyword arguments this method declares."""

    @abstractmethod
    def evaluate(self, model: Any, **options: Any) -> Evaluation:
        """Held-out metrics of a trained model."""

    def demo(self, out: Path, *, quiet: bool = False, steps: int | None = None) -> str:
        """Train on built-in data and write pictures/text into ``out``; returns a report."""
        raise UserError(f"the {self.name} recipe has no demo")

    def adopt(self, raw: dict[str, Any]) -> dict[str, Any]:
        """A config of another recipe of the same data (``--recipe NAME`` on its preset), made
        this recipe's before the user's overrides apply: the keys of :attr:`adopted`, whose
        values the other recipe's preset chose but that mean something else here, replaced by
        this recipe's values or removed (``None``: the default of this recipe's config)."""
        raw = dict(raw)
        for section, keys in self.adopted.items():
            values = raw.get(section)
            if not isinstance(values, dict):
                continue
            values = {k: v for k, v in values.items() if k not in keys}
            values.update({k: v for k, v in keys.items() if v is not None})
            raw[section] = values
        return raw

    def config_from_run(self, meta: dict[str, Any]) -> Any:
        """The typed, validated config recorded in a checkpoint's metadata ``meta``."""
        return from_dict(self.config_type, meta["config"]).validate()


# ------------------------------------------------------------------ configs


def load_config(
    source: str | Path | None = None,
    overrides: Sequence[str] = (),
    recipe: str | None = None,
) -> tuple[Recipe, Any]:
    """``(recipe, config)`` from a preset, a config file or a run folder, with ``key=value``
    overrides, validated. The recipe is the config's ``recipe`` key (default ``image``);
    ``recipe`` may name another recipe of the same data (``--recipe cascade`` on ``digits``),
    which first adopts that config (:meth:`Recipe.adopt`). A run folder's own ``train.out`` is
    the folder itself, wherever it now lives."""
    if source is None:
        source = get(recipe or DEFAULT_RECIPE).preset
    if is_run(source):
        raw = run_config(source)
        raw.setdefault("train", {})["out"] = str(source)  # wherever the folder now lives
    else:
        raw = read_source(source)
        if isinstance(raw.get("config"), dict):  # a checkpoint's metadata (difflab 0.1 config.json)
            chosen = get(str(raw.get("recipe", DEFAULT_RECIPE)))
            raw = {"recipe": chosen.name, **to_dict(chosen.config_from_run(raw))}
    if recipe is not None:
        chosen, named = get(recipe), get(str(raw.get("recipe", DEFAULT_RECIPE)))
        if chosen is not named and chosen.data == named.data:
            raw = {**chosen.adopt(raw), "recipe": chosen.name}
    raw = apply_overrides(raw, overrides)
    named = get(str(raw.pop("recipe", DEFAULT_RECIPE)))
    chosen = get(recipe) if recipe else named
    if chosen.data != named.data:
        raise UserError(
            f"{source} is a config of the {named.name} recipe ({named.data}); the "
            f"{chosen.name} recipe trains on {chosen.data}"
        )
    cfg = from_dict(chosen.config_type, raw)
    cfg.validate()
    return chosen, cfg


# ------------------------------------------------------------------ runs


def load_network(
    recipe: Recipe, path: Path, device: str
) -> tuple[Any, dict[str, Any], nn.Module, int]:
    """``(config, metadata, network, step)`` of a checkpoint written by ``recipe``: the network
    rebuilt from the recorded config and metadata, with the EMA weights loaded (the one way
    every recipe loads a model)."""
    ckpt = load_checkpoint(path)
    meta = ckpt.config
    found = get(str(meta.get("recipe", "image")))
    if found is not recipe:
        raise UserError(f"{path} is a run of the {found.name} recipe, not of {recipe.name}")
    with reading_metadata(path):
        cfg = recipe.config_from_run(meta)
        net = recipe.build(cfg, meta)
    load_ema(net, ckpt.ema, path, device)
    return cfg, meta, net, ckpt.step


@contextmanager
def reading_metadata(path: str | Path) -> Iterator[None]:
    """Within the block, a missing or ill-typed entry of the metadata of the checkpoint at
    ``path`` (``KeyError``, ``TypeError``, ``ValueError``) is a one-line :class:`UserError`."""
    try:
        yield
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(
            f"the metadata of the checkpoint in {path} is damaged ({type(e).__name__}: {e})"
        ) from None


def is_run(source: str | Path) -> bool:
    """Whether ``source`` is a run folder (it holds a checkpoint, or a cascade's ``base/``)."""
    p = Path(source)
    return p.is_dir() and ((p / FILENAME).is_file() or (p / "base" / FILENAME).is_file())


def run_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata header of a run's checkpoint (a cascade's: its base stage's)."""
    p = Path(path)
    if p.is_dir() and not (p / FILENAME).exists() and (p / "base").is_dir():
        p = p / "base"
    return read_run_config(p)


def recipe_of_run(path: str | Path) -> Recipe:
    """The recipe that wrote a run folder (or checkpoint file)."""
    return get(str(run_metadata(path).get("recipe", DEFAULT_RECIPE)))


def run_config(path: str | Path) -> dict[str, Any]:
    """The config a run was trained with, as nested dicts with its ``recipe`` key."""
    recipe = recipe_of_run(path)
    with reading_metadata(path):
        return {"recipe": recipe.name, **to_dict(recipe.config_from_run(run_metadata(path)))}


@dataclass
class Samples:
    """What :meth:`Recipe.sample` returns. ``x``: images ``(N, C, H, W)`` in ``[-1, 1]`` or
    vectors ``(N, D)`` in data units; ``labels``: class per sample (``None``: unconditional);
    ``texts``: passages (text models); ``nrow``: images per grid row; ``extras``: further image
    sets by name (a cascade's ``low`` resolution stage)."""

    x: Tensor | None = None
    labels: Tensor | None = None
    texts: list[str] | None = None
    nrow: int = 10
    extras: dict[str, Tensor] = field(default_factory=dict)

    def save(self, stem: str | Path, png: bool = False) -> list[Path]:
        """Write the samples next to ``stem``, each file whole or not at all: ``STEM.txt`` for
        passages; ``STEM.npz`` (``samples``: images in ``[0, 1]``, vectors as drawn; ``labels``,
        -1 where none) and, for images, the grid ``STEM.png`` (and ``STEM_<extra>.png``), plus
        with ``png`` one file per sample ``STEM/000000.png`` ... (what FID tools read); a grid
        shows the first :data:`GRID_MAX` samples. Nothing is written when the request is
        refused (no file stem, ``png`` for text or vectors or into a folder holding more
        samples, or a file of a run in the way)."""
        stem = Path(stem)
        if stem.name in ("", ".."):
            raise UserError(f"the output {str(stem)!r} names no file: give a stem such as "
                            "runs/x/samples")  # fmt: skip
        images = self.x is not None and self.x.ndim == 4
        if png and not images:
            raise UserError("--format png applies to images only")
        if self.texts is not None:
            path = stem.with_suffix(".txt")
            _keep_run_files([path])
            return [write_text(path, "\n\n---\n\n".join(self.texts) + "\n")]
        assert self.x is not None
        x = self.x.detach().float().cpu()
        grids = {stem.with_suffix(".png"): x[:GRID_MAX]} if images else {}
        grids.update({stem.with_name(f"{stem.name}_{name}.png"): extra[:GRID_MAX]
                      for name, extra in self.extras.items()})  # fmt: skip
        _keep_run_files([stem.with_suffix(".npz"), *grids])
        if png:
            _check_png_folder(stem, len(x))
        values = ((x.clamp(-1, 1) + 1) / 2) if images else x
        labels = np.full(len(x), -1) if self.labels is None else self.labels.cpu().numpy()
        arrays = {"samples": values.numpy(), "labels": labels}
        written = [write_atomically(stem.with_suffix(".npz"), lambda f: np.savez(f, **arrays))]
        written += [save_grid(grid, path, nrow=min(self.nrow, len(grid)))
                    for path, grid in grids.items()]  # fmt: skip
        if png:
            written += save_images(x, stem)
        return written


#: The most samples a grid picture shows (the arrays and per-sample PNGs hold them all).
GRID_MAX = 400

#: The files a training writes into its run folder: ``difflab sample --out`` never replaces them.
LOSS_CURVE = "loss_curve.png"
RUN_FILES = (FILENAME, CONFIG_FILENAME, LOG_NAME, LOSS_CURVE)


def _check_png_folder(folder: Path, n: int) -> None:
    """Refuse to write ``n`` sample PNGs into ``folder`` when it is a file, or when it holds
    numbered PNGs beyond ``n`` (an earlier, larger request: the two would be mixed)."""
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{folder} is a file: one PNG per sample needs a folder of that name")
    numbered = folder.glob("[0-9]" * 6 + ".png") if folder.is_dir() else []
    if beyond := sorted(p.name for p in numbered if int(p.stem) >= n):
        raise UserError(
            f"{folder} holds sample PNGs up to {beyond[-1]} from an earlier, larger request, "
            f"which these {n} would not replace: choose another --out"
        )


def _keep_run_files(paths: list[Path]) -> None:
    """Refuse to write over a file of a run (:data:`RUN_FILES` next to a checkpoint)."""
    for path in paths:
        if path.name in RUN_FILES and is_run(path.parent):
            raise UserError(f"{path} is a file of the run in {path.parent}: choose another --out")


@dataclass
class Evaluation:
    """What :meth:`Recipe.evaluate` returns: named figures and the one line that states them."""

    metrics: dict[str, Any]
    summary: str


@dataclass
class Run:
    """A trained run loaded for use: ``run.sample(16, sampler="dpmpp_2m", steps=10, label=3)``,
    ``run.evaluate()``. ``model`` is the recipe's loaded model (its denoiser, config, ...)."""

    recipe: Recipe
    model: Any
    path: Path

    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def step(self) -> int:
        return self.model.step

    def sample(self, n: int | None = None, **options: Any) -> Samples:
        """``n`` samples (default: the run's ``sample.n``) with the recipe's sampling options;
        an option the recipe does not take is a :class:`UserError` naming it."""
        refuse_unknown(options, self.recipe.sample, f"{self.recipe.name} runs")
        n = self.config.sample.n if n is None else n
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise UserError(f"the number of samples must be a whole number >= 1, got {n!r}")
        if n > MAX_SAMPLES:
            raise UserError(f"{n} samples will not fit in memory; draw at most {MAX_SAMPLES:,}")
        with sampling_precision(self.config.train):
            samples = self.recipe.sample(self.model, n, **options)
        if samples.x is not None and not bool(samples.x.isfinite().all()):
            raise UserError(
                "sampling diverged: the samples hold NaN or infinite values (lower the guidance "
                "scale, or clip the x_0 estimate with --threshold static or dynamic)"
            )
        return samples

    def evaluate(self, **options: Any) -> Evaluation:
        """Held-out metrics with the recipe's evaluation options (others are refused)."""
        refuse_unknown(options, self.recipe.evaluate, f"{self.recipe.name} runs")
        return self.recipe.evaluate(self.model, **options)


#: The most samples one call draws (a request beyond it is refused before allocating).
MAX_SAMPLES = 1_000_000


def train(
    source: str | Path | None = None,
    overrides: Sequence[str] | dict[str, Any] = (),
    *,
    recipe: str | None = None,
    resume: bool = False,
    progress: bool = True,
    **train_keys: Any,
) -> TrainResult:
    """Train from a preset, a config file or a run folder (see :func:`load_config`), with
    ``overrides`` (``["model.unet.channels=64"]`` or ``{"model.unet.channels": 64}``) and the
    keywords as keys of the ``train`` section: ``difflab.train("digits", steps=3000)``. Writes
    the run (checkpoint, ``config.json``, ``loss.csv``, ``loss_curve.png``) into ``train.out``."""
    if isinstance(overrides, dict):
        overrides = [f"{key}={json.dumps(value)}" for key, value in overrides.items()]
    items = [*overrides, *(f"train.{key}={json.dumps(v)}" for key, v in train_keys.items())]
    distributed.setup()  # under torchrun: join the job first, so a refusal is said once
    chosen, cfg = load_config(source, items, recipe)
    out = Path(cfg.train.out)
    if is_run(out) and (found := recipe_of_run(out)) is not chosen:
        raise UserError(f"{out} holds a run of the {found.name} recipe: choose another train.out "
                        f"for the {chosen.name} recipe")  # fmt: skip
    if resume and is_run(out) and not run_metadata(out).get("config_version"):
        raise UserError(
            f"{out} was trained by difflab 0.1: this version samples and evaluates it, but "
            "continuing its training needs difflab 0.1"
        )
    result = chosen.train(cfg, resume=resume, progress=progress)
    if distributed.is_main():
        save_loss_curve(result.log, result.log.with_name(LOSS_CURVE))
    return result


def load(path: str | Path, device: str = "auto") -> Run:
    """Load a run folder (or its checkpoint file) written by any recipe."""
    recipe = recipe_of_run(path)
    return Run(recipe, recipe.load(Path(path), device), Path(path))


DEMO_MARKER = ".difflab-demo"


def run_demo(recipe: Recipe, out: Path, **options: Any) -> str:
    """``recipe.demo`` into ``out``, never deleting what difflab did not write there: a folder
    made by an earlier demo (it holds :data:`DEMO_MARKER`) has the demo's own files replaced;
    any other non-empty folder is left alone and the demo goes to ``out-2``, ``out-3``, ...
    (said in the report). The options are checked before the folder is touched."""
    refuse_unknown(options, recipe.demo, f"the {recipe.name} demo")
    if options.get("steps") is not None:
        positive_int("steps", options["steps"])
    folder, i = Path(out), 1
    while _holds_other_files(folder):
        i += 1
        folder = Path(f"{os.path.abspath(out)}-{i}")
    make_folder(folder)
    for name in recipe.demo_files:
        try:
            (folder / name).unlink(missing_ok=True)
        except OSError as e:
            raise file_error(e, folder / name) from None
    write_bytes(folder / DEMO_MARKER, b"")
    report = recipe.demo(folder, **options)
    if folder != Path(out):
        report = f"{out} holds other files, so this demo ran in {folder}\n{report}"
    return report


def _holds_other_files(folder: Path) -> bool:
    """Whether ``folder`` is a non-empty folder that no demo made."""
    try:
        return folder.is_dir() and not (folder / DEMO_MARKER).is_file() and any(folder.iterdir())
    except OSError as e:
        raise file_error(e, folder) from None


def refuse_unknown(options: dict[str, Any], method: Any, what: str) -> None:
    """Refuse the keyword ``options`` that ``method`` does not declare, naming the first one
    the way the command line spells it (a method with ``**options`` takes them all)."""
    accepted = inspect.signature(method).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values()):
        return
    for key in options:
        if key not in accepted:
            raise UserError(f"{flag(key)} does not apply to {what}")


def flag(option: str) -> str:
    """The command-line spelling of a keyword option (``label`` is ``--class``)."""
    return {"label": "--class", "sampler_options": "--opt"}.get(
        option, "--" + option.replace("_", "-")
    )


# ------------------------------------------------------------------ shared option parsing


def class_labels(
    label: int | str | Sequence[int | str] | Tensor | None, names: list[str] | None, n: int
) -> Tensor | None:
    """Class indices for ``n`` samples from ``label``: an index or a class name, a comma list
    ``"3,7"`` or a sequence of them (cycled over the samples), or ``None`` (no label)."""
    if label is None:
        return None
    if names is None:
        raise UserError(f"{flag('label')} was given, but this model is not class-conditional")
    if isinstance(label, Tensor):
        label = label.tolist()
    items = label.split(",") if isinstance(label, str) else label
    if isinstance(items, (int, float)):
        items = [items]
    indices = []
    for item in items:
        text = str(item).strip()
        if text in names:
            indices.append(names.index(text))
        elif text.isdigit() and int(text) < len(names):
            indices.append(int(text))
        else:
            raise UserError(f"unknown class {text!r}: this model knows {', '.join(names)}")
    if not indices:
        raise UserError(f"{flag('label')} names no class")
    return torch.tensor(indices).repeat(math.ceil(n / len(indices)))[:n]


def finite(name: str, value: float, low: float = -math.inf, high: float = math.inf) -> float:
    """``value`` as a float, refused when it is NaN or outside ``[low, high]``."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{flag(name)} must be a number, got {value!r}") from None
    if not math.isfinite(number) or not low <= number <= high:
        span = f" [{low:g}, {high:g}]" if math.isfinite(high) else f" >= {low:g}"
        span = span if math.isfinite(low) else ""
        raise UserError(f"{flag(name)} must be a finite number{span}, got {value!r}")
    return number


def seed_value(value: Any) -> int:
    """``value`` as a seed: an int in ``0..MAX_SEED``, or a :class:`UserError`."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEED:
        raise UserError(f"{flag('seed')} must be a whole number in 0..2**63-1, got {value!r}")
    return value


def positive_int(name: str, value: Any) -> int:
    """``value`` as an int >= 1, or a :class:`UserError`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{flag(name)} must be a whole number >= 1, got {value!r}")
    return value
