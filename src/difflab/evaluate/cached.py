"""Judges trained once and cached as safetensors (the digits and glyphs judges).

:func:`load_cached` fills a fresh network with the weights of a cache file, or says (with a
warning) why it cannot, so the caller retrains; :func:`save_cached` writes the weights with
:func:`difflab.files.write_bytes`, whole or not at all.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as save_bytes
from torch import nn

from difflab.files import write_bytes


def load_cached(model: nn.Module, path: Path, what: str) -> nn.Module | None:
    """``model`` (eval mode, no parameter gradients) with the weights of ``path``, or ``None``
    when the file is missing or unreadable (the latter with a warning naming ``what``)."""
    if not path.exists():
        return None
    try:
        model.load_state_dict(load_file(path))
    except (SafetensorError, OSError, RuntimeError) as error:
        warnings.warn(f"retraining the {what}: cannot read {path} ({error})", stacklevel=3)
        return None
    return model.eval().requires_grad_(False)


def save_cached(model: nn.Module, path: Path, metadata: dict[str, str]) -> Path:
    """Write ``model``'s weights to ``path`` as safetensors with ``metadata``, atomically."""
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    return write_bytes(path, save_bytes(state, metadata=metadata))
