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
import json
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from difflab.config import (
    DEFAULT_RECIPE,
    apply_overrides,
    choose,
    from_dict,
    read_source,
    to_dict,
)
from difflab.errors import UserError
from difflab.files import write_atomically, write_text
from difflab.train.checkpoint import FILENAME, load_checkpoint, read_run_config
from difflab.train.trainer import TrainResult, load_ema
from difflab.viz.images import save_grid, save_images, save_loss_curve

#: Every recipe: its name (recorded in checkpoints) and the module defining ``RECIPE``.
RECIPES = {
    "image": "difflab.recipes.image",
    "classifier": "difflab.recipes.classifier",
    "cascade": "difflab.recipes.cascade",
    "text-to-digit": "difflab.recipes.text_to_digit",
    "text": "difflab.recipes.text",
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
    ``recipe`` may name another recipe of the same data (``--recipe cascade`` on ``digits``).
    A run folder's own ``train.out`` is the folder itself, wherever it now lives."""
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
    try:
        cfg = recipe.config_from_run(meta)
        net = recipe.build(cfg, meta)
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"the metadata of the checkpoint in {path} is damaged ({e!r})") from None
    load_ema(net, ckpt.ema, path, device)
    return cfg, meta, net, ckpt.step


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
    return {"recipe": recipe.name, **to_dict(recipe.config_from_run(run_metadata(path)))}


@dataclass
class Samples:
    """What :meth:`Recipe.sample` returns. ``x``: images ``(N, C, H, W)`` in ``[-1, 1]`` or
    vectors ``(N, D)`` in data units; ``labels``: class per sample (``None``: unconditional);
    ``texts``: passages (text models); ``nrow``: images per grid row; ``extras``: further image
    sets by name (a cascade's ``low`` resolution stage); ``nfe``: network calls per sample."""

    x: Tensor | None = None
    labels: Tensor | None = None
    texts: list[str] | None = None
    nrow: int = 10
    extras: dict[str, Tensor] = field(default_factory=dict)

    def save(self, stem: str | Path, png: bool = False) -> list[Path]:
        """Write the samples next to ``stem``, each file whole or not at all: ``STEM.txt`` for
        passages; ``STEM.npz`` (``samples``: images in ``[0, 1]``, vectors as drawn; ``labels``,
        -1 where none) and, for images, the grid ``STEM.png`` (and ``STEM_<extra>.png``), plus
        with ``png`` one file per sample ``STEM/000000.png`` ... (what FID tools read)."""
        stem = Path(stem)
        if self.texts is not None:
            return [write_text(stem.with_suffix(".txt"), "\n\n---\n\n".join(self.texts) + "\n")]
        assert self.x is not None
        x = self.x.detach().float().cpu()
        images = x.ndim == 4
        values = ((x.clamp(-1, 1) + 1) / 2) if images else x
        labels = np.full(len(x), -1) if self.labels is None else self.labels.cpu().numpy()
        arrays = {"samples": values.numpy(), "labels": labels}
        written = [write_atomically(stem.with_suffix(".npz"), lambda f: np.savez(f, **arrays))]
        if images:
            written.append(save_grid(x, stem.with_suffix(".png"), nrow=min(self.nrow, len(x))))
            for name, extra in self.extras.items():
                path = stem.with_name(f"{stem.name}_{name}.png")
                written.append(save_grid(extra, path, nrow=min(self.nrow, len(extra))))
        if png:
            if not images:
                raise UserError("--format png applies to images only")
            written += save_images(x, stem)
        return written


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
        return self.recipe.sample(self.model, n, **options)

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
    chosen, cfg = load_config(source, items, recipe)
    out = Path(cfg.train.out)
    if resume and is_run(out) and not run_metadata(out).get("config_version"):
        raise UserError(
            f"{out} was trained by difflab 0.1: this version samples and evaluates it, but "
            "continuing its training needs difflab 0.1"
        )
    result = chosen.train(cfg, resume=resume, progress=progress)
    save_loss_curve(result.log, result.log.with_name("loss_curve.png"))
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
    (said in the report)."""
    refuse_unknown(options, recipe.demo, f"the {recipe.name} demo")
    folder, i = Path(out), 1
    while folder.exists() and any(folder.iterdir()) and not (folder / DEMO_MARKER).is_file():
        i += 1
        folder = Path(out).with_name(f"{Path(out).name}-{i}")
    for name in recipe.demo_files:
        (folder / name).unlink(missing_ok=True)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / DEMO_MARKER).touch()
    report = recipe.demo(folder, **options)
    if folder != Path(out):
        report = f"{out} holds other files, so this demo ran in {folder}\n{report}"
    return report


def refuse_unknown(options: dict[str, Any], method: Any, what: str) -> None:
    """Refuse the keyword ``options`` that ``method`` does not declare, naming the first one
    the way the command line spells it."""
    import inspect

    accepted = inspect.signature(method).parameters
    for key in options:
        if key not in accepted or accepted[key].kind is inspect.Parameter.VAR_KEYWORD:
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
        span = f"[{low:g}, {high:g}]" if math.isfinite(high) else f">= {low:g}"
        raise UserError(f"{flag(name)} must be a finite number {span}, got {value!r}")
    return number


def positive_int(name: str, value: Any) -> int:
    """``value`` as an int >= 1, or a :class:`UserError`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{flag(name)} must be a whole number >= 1, got {value!r}")
    return value
