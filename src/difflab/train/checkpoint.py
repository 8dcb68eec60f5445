"""Checkpoints: one safetensors file per run, written atomically.

``checkpoint.safetensors`` holds the tensors ``model.*`` (raw weights), ``ema.*`` (EMA weights,
what sampling uses), ``optim.<i>.<name>`` (AdamW state) and ``rng.*`` (generator states), and a
metadata header with the run config (JSON), the step and the optimiser's param groups; the header
is the reference for what the run was. It is written with :func:`difflab.files.write_atomically`,
so a crash, Ctrl-C or a full disk at any moment leaves either the old or the new checkpoint,
never a torn one. ``config.json`` beside it (:func:`write_config_file`) is the run's config as a
file that ``difflab train`` accepts back.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open
from safetensors.torch import save as safetensors_bytes
from torch import Tensor

from difflab.errors import UserError
from difflab.files import file_error, write_bytes, write_text
from difflab.version import __version__

FILENAME = "checkpoint.safetensors"
CONFIG_FILENAME = "config.json"


@dataclass
class Checkpoint:
    """A loaded checkpoint: tensors grouped by prefix plus its metadata."""

    config: dict[str, Any]
    step: int
    model: dict[str, Tensor]
    ema: dict[str, Tensor]
    optim: dict[str, Tensor]
    rng: dict[str, Tensor]
    param_groups: list[dict[str, Any]]
    extra: dict[str, Any]


def save_checkpoint(
    path: Path,
    *,
    config: dict[str, Any],
    step: int,
    model: dict[str, Tensor],
    ema: dict[str, Tensor],
    optimizer: torch.optim.Optimizer | None,
    rng: dict[str, Tensor],
    extra: dict[str, Any] | None = None,
) -> None:
    """Save everything a bit-exact resume needs, atomically (see module docstring)."""
    tensors: dict[str, Tensor] = {}
    tensors.update({f"model.{k}": v for k, v in model.items()})
    tensors.update({f"ema.{k}": v for k, v in ema.items()})
    tensors.update({f"rng.{k}": v for k, v in rng.items()})
    groups: list[dict[str, Any]] = []
    if optimizer is not None:
        state = optimizer.state_dict()
        for idx, s in state["state"].items():
            for name, value in s.items():
                tensors[f"optim.{idx}.{name}"] = torch.as_tensor(value)
        groups = state["param_groups"]
    # Copies: the same tensor may appear twice (buffers live in both model and ema).
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}
    metadata = {
        "format": "difflab-checkpoint-1",
        "difflab_version": __version__,
        "config": json.dumps(config, sort_keys=True, indent=2),
        "step": str(step),
        "param_groups": json.dumps(groups),
        "extra": json.dumps(extra or {}),
    }
    write_bytes(path, safetensors_bytes(tensors, metadata=metadata))


def write_config_file(folder: Path, run_config: dict[str, Any]) -> Path:
    """``config.json`` in ``folder``: ``{"recipe": ..., **run_config["config"]}``, the run's
    config in the form ``difflab train`` reads (the checkpoint's header stays the reference)."""
    config = {"recipe": run_config["recipe"], **run_config["config"]}
    return write_text(folder / CONFIG_FILENAME, json.dumps(config, indent=2) + "\n")


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a run folder or the checkpoint file itself."""
    p = Path(path)
    if p.is_dir():
        p = p / FILENAME
    if not p.is_file():
        raise UserError(f"no checkpoint at {path} (expected a run folder or {FILENAME})")
    return p


def _metadata(p: Path) -> dict[str, str]:
    """The safetensors header of a difflab checkpoint (no tensor is read)."""
    try:
        open(p, "rb").close()  # safetensors reports a denied file as a missing one
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
    except PermissionError as e:
        raise file_error(e, p) from None
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{p} is not a readable checkpoint: {e}") from None
    if meta.get("format") != "difflab-checkpoint-1":
        raise UserError(f"{p} is a safetensors file but not a difflab checkpoint")
    return meta


def _run_config(p: Path, meta: dict[str, str]) -> dict[str, Any]:
    try:
        config = json.loads(meta["config"])
    except KeyError:
        raise UserError(f"{p} has a corrupt header: its run config is missing") from None
    except ValueError as e:
        raise UserError(f"{p} has a corrupt header: its run config is not JSON ({e})") from None
    if not isinstance(config, dict):
        raise UserError(f"{p} has a corrupt header: its run config is not a mapping")
    return config


def read_run_config(path: str | Path) -> dict[str, Any]:
    """The run config stored in a checkpoint, read from its header alone."""
    p = resolve_checkpoint(path)
    return _run_config(p, _metadata(p))


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Load a checkpoint; a missing, foreign or corrupt file is a :class:`UserError`."""
    p = resolve_checkpoint(path)
    meta = _metadata(p)
    config = _run_config(p, meta)
    try:
        step = int(meta["step"])
        param_groups = json.loads(meta["param_groups"])
        extra = json.loads(meta.get("extra", "{}"))
    except KeyError as e:
        raise UserError(f"{p} has a corrupt header: {e} is missing") from None
    except ValueError as e:
        raise UserError(f"{p} has a corrupt header: {e}") from None
    try:
        tensors = load_file(str(p))
    except PermissionError as e:
        raise file_error(e, p) from None
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{p} is not a readable checkpoint: {e}") from None

    def group(prefix: str) -> dict[str, Tensor]:
        n = len(prefix) + 1
        return {k[n:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}

    return Checkpoint(
        config=config,
        step=step,
        model=group("model"),
        ema=group("ema"),
        optim=group("optim"),
        rng=group("rng"),
        param_groups=param_groups,
        extra=extra,
    )


def optimizer_state(ckpt: Checkpoint) -> dict[str, Any]:
    """Rebuild ``optimizer.state_dict()`` from the flat ``optim.<i>.<name>`` tensors."""
    state: dict[int, dict[str, Tensor]] = {}
    for key, value in ckpt.optim.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    return {"state": state, "param_groups": ckpt.param_groups}
