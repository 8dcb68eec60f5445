"""Run configuration: one YAML tree per run, typed by its recipe, strict, settable by ``key=value``.

A config file (a preset name, a YAML file, a run folder or its ``config.json``) is a mapping of
sections, plus the top-level ``recipe`` that names the recipe it trains (default ``image``).
``key=value`` overrides address any depth (``train.steps=500``, ``model.unet.channels=64``,
``recipe=cascade``); values are parsed as YAML (``3``, ``1e-3``, ``[1, 2]``, ``true``). Each
recipe types the tree with nested dataclasses; :func:`from_dict` builds them, refusing unknown
keys and values of the wrong type with a :class:`~difflab.errors.UserError` naming the key.

This module holds the machinery and the one section every recipe shares, :class:`TrainConfig`;
each recipe defines its own sections (``recipes/``).
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import math
import reprlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml

from difflab.errors import UserError

#: The recipe of a config that names none.
DEFAULT_RECIPE = "image"
#: The largest random seed (``torch.manual_seed`` takes up to ``2**64 - 1``; this leaves room
#: for the ``seed + 1`` of a second stage).
MAX_SEED = 2**63 - 1
#: ``train.precision``: ``auto`` is bf16 on a GPU that computes in bfloat16, fp32 elsewhere.
PRECISIONS = ("auto", "bf16", "fp32")


@dataclass
class TrainConfig:
    """Optimisation, shared by every recipe: AdamW with linear warm-up then ``lr_schedule``
    (constant | cosine), gradient clipping (0: off), EMA decay of the sampled weights; logging
    and checkpoints every ``log_every``/``ckpt_every`` steps; ``max_minutes`` stops early (0: no
    limit); ``out`` is the run folder.

    How a step runs: ``batch_size`` is the global batch of one optimiser step, split over the
    processes of a ``torchrun`` job and into ``accumulate`` micro-batches per process (gradients
    summed, synchronised once per step); ``precision`` is the network's arithmetic (``bf16``:
    autocast to bfloat16 with float32 weights and loss; ``auto``: bf16 on a GPU that has it,
    else fp32); ``compile`` runs the network through ``torch.compile``."""

    steps: int = 1000
    batch_size: int = 128
    lr: float = 2e-3
    lr_schedule: str = "cosine"
    warmup: int = 100
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema: float = 0.999
    seed: int = 0
    log_every: int = 10
    ckpt_every: int = 500
    max_minutes: float = 0.0
    device: str = "auto"
    accumulate: int = 1
    precision: str = "auto"
    compile: bool = False
    out: str = "runs/digits"

    def validate(self) -> None:
        check(self.steps >= 1, "train.steps must be at least 1")
        check(self.batch_size >= 1, "train.batch_size must be at least 1")
        check(self.lr > 0, "train.lr must be positive")
        check(self.warmup >= 0, "train.warmup must be non-negative")
        check(0.0 <= self.ema < 1.0, "train.ema must be in [0, 1)")
        check(self.grad_clip >= 0, "train.grad_clip must be non-negative (0 disables it)")
        check(self.weight_decay >= 0, "train.weight_decay must be non-negative")
        check_seed("train.seed", self.seed)
        choose("train.lr_schedule", self.lr_schedule, ("constant", "cosine"))
        check(self.log_every >= 1, "train.log_every must be at least 1")
        check(self.ckpt_every >= 1, "train.ckpt_every must be at least 1")
        check(self.max_minutes >= 0, "train.max_minutes must be non-negative (0: no limit)")
        choose("train.device", self.device, ("auto", "cpu", "cuda"))
        check(self.accumulate >= 1, "train.accumulate must be at least 1")
        check(self.batch_size % self.accumulate == 0,
              f"train.batch_size={self.batch_size} must be a multiple of train.accumulate="
              f"{self.accumulate} (the micro-batches are equal)")  # fmt: skip
        choose("train.precision", self.precision, PRECISIONS)
        check(bool(self.out), "train.out must name a folder")


def check(ok: bool, message: str) -> None:
    """Raise :class:`UserError` with ``message`` unless ``ok``."""
    if not ok:
        raise UserError(message)


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict, _REPR.maxstring = 2, 4, 4, 60


def _shown(value: Any) -> str:
    """``repr(value)`` cut short: a YAML value may be a nested structure of any size (an alias
    bomb has billions of items), and an error message is one line."""
    return _REPR.repr(value)


def check_seed(key: str, seed: int) -> None:
    """Refuse a seed outside ``0..MAX_SEED``."""
    check(0 <= seed <= MAX_SEED, f"{key} must be a whole number in 0..2**63-1, got {seed}")


def choose(key: str, value: Any, choices: Any) -> None:
    """Refuse ``value`` for ``key`` unless it is one of ``choices`` (a registry's names)."""
    names = list(choices)
    if value not in names:
        raise UserError(f"{key} must be one of {', '.join(map(str, names))}, got {_shown(value)}")


# ------------------------------------------------------------------ sources


def preset_path(name: str) -> Path:
    """Where the preset ``name`` (a file ``configs/<name>.yaml`` of the package) lives."""
    return Path(str(resources.files("difflab") / "configs" / f"{name}.yaml"))


def presets() -> list[str]:
    """Names of every shipped preset."""
    return sorted(p.stem for p in Path(str(resources.files("difflab") / "configs")).glob("*.yaml"))


def resolve_source(source: str | Path) -> Path:
    """A preset name or a YAML/JSON config file, as the path of an existing config file."""
    if str(source) in presets():
        return preset_path(str(source))
    path = Path(source)
    if not path.is_file():
        raise UserError(
            f"{source} is neither a preset ({', '.join(presets())}), a config file nor a run folder"
        )
    return path


class _StrictLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (plain YAML keeps the last
    one silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        keys = [self.construct_object(k, deep=deep) for k, _ in node.value]
        for key in keys:
            if keys.count(key) > 1:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {key!r} is given twice", node.start_mark
                )
        return super().construct_mapping(node, deep=deep)


def read_source(source: str | Path) -> dict[str, Any]:
    """The nested dicts of a config file (see :func:`resolve_source`), ``recipe`` included."""
    path = resolve_source(source)
    try:
        text = path.read_text()
    except PermissionError:
        raise UserError(f"permission denied: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    try:
        raw = yaml.load(text, Loader=_StrictLoader) or {}
    except yaml.YAMLError as e:
        raise UserError(f"cannot parse {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path} must hold a mapping of sections (data, model, ...)")
    return raw


def apply_overrides(raw: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``raw`` with each ``dotted.key=value`` set (a copy; intermediate sections are created)."""
    raw = copy.deepcopy(raw)  # keeps YAML's shared aliases shared: no exponential blow-up
    for item in overrides:
        key, sep, value = item.partition("=")
        parts = key.split(".")
        if not sep or not all(parts) or (len(parts) == 1 and key != "recipe"):
            raise UserError(
                f"override {item!r} must look like section.key=value, e.g. train.steps=100"
            )
        try:
            parsed = yaml.safe_load(value) if value else None
        except yaml.YAMLError:
            parsed = value
        node = raw
        for i, part in enumerate(parts[:-1]):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"config section {'.'.join(parts[: i + 1])} must be a mapping")
        node[parts[-1]] = parsed
    return raw


# ------------------------------------------------------------------ typed trees


def from_dict(cls: type, values: Any, where: str = "") -> Any:
    """The dataclass ``cls`` from nested dicts: missing keys take their defaults, nested
    dataclass fields recurse, unknown keys and ill-typed values are a :class:`UserError`."""
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise UserError(f"config section {where or 'root'} must be a mapping")
    hints = get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in fields:
            known = ", ".join(sorted(fields))
            kind = "key" if where else "section"
            raise UserError(f"unknown config {kind} {path}: known {kind}s are {known}")
        section = _section_type(hints[key])
        if section is None:
            kwargs[key] = coerce(value, hints[key], path)
        elif value is not None or type(None) not in get_args(hints[key]):
            kwargs[key] = from_dict(section, value, path)
    return cls(**kwargs)


def _section_type(hint: Any) -> type | None:
    """The dataclass of a section field typed ``Section`` or ``Section | None`` (else None)."""
    options = get_args(hint) if get_origin(hint) in (type(int | None),) else (hint,)
    sections = [o for o in options if dataclasses.is_dataclass(o)]
    return sections[0] if sections else None


def to_dict(cfg: Any) -> dict[str, Any]:
    """Nested dicts of a config (what checkpoints and ``config.json`` record)."""
    return dataclasses.asdict(cfg)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested dict keyed by dotted names, ``{"a": {"b": 1}} -> {"a.b": 1}`` (lists and empty
    dicts stay values)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def coerce(value: Any, hint: Any, key: str) -> Any:
    """Check and convert ``value`` to the annotated type (int -> float allowed; NaN refused;
    a YAML date such as ``2024-01-01`` is the string it was written as)."""
    options = get_args(hint) if get_origin(hint) in (type(int | None),) else (hint,)
    if value is None:
        if type(None) in options:
            return None
        raise UserError(f"{key} must not be empty")
    for option in options:
        if option is type(None):
            continue
        if option is bool and isinstance(value, bool):
            return value
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if option is float and not isinstance(value, bool) and isinstance(value, (int, float, str)):
            try:
                number = float(value)  # YAML 1.1 reads "1e-3" as a string
            except ValueError:
                continue
            if not math.isfinite(number):
                raise UserError(f"{key} must be a finite number, got {_shown(value)}")
            return number
        if (
            option is str
            and isinstance(value, (str, int, float, datetime.date))
            and not isinstance(value, bool)
        ):
            return str(value)
        if get_origin(option) is list and isinstance(value, list):
            (item,) = get_args(option)
            return [coerce(v, item, key) for v in value]
    expected = " or ".join(getattr(o, "__name__", str(o)) for o in options if o is not type(None))
    raise UserError(f"{key} has an impossible value {_shown(value)} (expected {expected})")
