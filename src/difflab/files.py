"""Writing the files a user keeps (checkpoints, configs, samples): whole or not at all.

:func:`write_atomically` writes to a temporary file ``.<name>.<random>.tmp`` in the target's
folder, flushes it to disk (``fsync``) and moves it into place with ``os.replace``, so a crash,
``kill -9`` or full disk at any moment leaves either the previous file or the new one, never a
torn one. The file gets the mode any new file gets (``0o666`` less the umask), like ``open``
and unlike ``tempfile.mkstemp``'s ``0o600``. File-system failures become one-line
:class:`~difflab.errors.UserError` messages (permission denied, disk full, ...).
"""

from __future__ import annotations

import errno
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from difflab.errors import UserError

_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def temp_pattern(name: str) -> str:
    """Glob pattern of the temporary files :func:`write_atomically` uses for ``name``."""
    return f".{name}.*.tmp"


def file_error(error: OSError, path: str | Path) -> UserError:
    """A one-line :class:`UserError` for a failed read or write of ``path``."""
    if isinstance(error, PermissionError):
        return UserError(f"permission denied: {path}")
    if error.errno in _DISK_FULL:
        return UserError(f"the disk is full: cannot write {path}; free some space and retry")
    return UserError(f"{path}: {error.strerror or error}")


def make_folder(path: str | Path) -> Path:
    """Create the folder ``path`` and its parents (if missing); failures are a UserError."""
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise UserError(f"cannot create folder {folder}: a file of that name exists") from None
    except OSError as e:
        raise file_error(e, folder) from None
    return folder


def write_atomically(path: str | Path, write: Callable[[BinaryIO], None]) -> Path:
    """Create or replace ``path`` with what ``write(f)`` writes into the open binary file ``f``
    (``np.savez(f, ...)``, ``image.save(f, format="PNG")``, ``f.write(data)``); see the
    module docstring. The folder is created if missing; on any failure the temporary file is
    removed and ``path`` is left as it was."""
    target = Path(path)
    make_folder(target.parent)
    tmp = target.parent / f".{target.name}.{secrets.token_hex(6)}.tmp"
    existed = target.exists()
    try:
        with open(tmp, "xb") as f:  # "x": a new file, mode 0o666 less the umask
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno in _DISK_FULL:
            kept = f"the previous {target.name} is intact" if existed else "nothing was written"
            raise UserError(f"the disk is full: cannot write {target} ({kept})") from None
        if isinstance(e, OSError):
            raise file_error(e, target) from None
        raise
    return target


def write_bytes(path: str | Path, data: bytes) -> Path:
    """:func:`write_atomically` of ``data``."""
    return write_atomically(path, lambda f: f.write(data))


def write_text(path: str | Path, text: str) -> Path:
    """:func:`write_atomically` of ``text`` in UTF-8."""
    return write_bytes(path, text.encode("utf-8"))


def cache_folder(folder: str | Path | None = None) -> Path:
    """Where built-in data and judges are cached: ``folder`` if given, else ``$DIFFLAB_CACHE``
    if set, else ``~/.cache/difflab``."""
    if folder is not None:
        return Path(folder)
    return Path(os.environ.get("DIFFLAB_CACHE") or Path.home() / ".cache" / "difflab")


def remove_stale_temp_files(folder: str | Path, names: tuple[str, ...]) -> None:
    """Remove the temporary files that interrupted :func:`write_atomically` calls for ``names``
    left in ``folder`` (e.g. after ``kill -9``). Only call it while no other process can be
    writing those files (the trainer holds the run folder's lock)."""
    for name in names:
        for p in Path(folder).glob(temp_pattern(name)):
            try:
                p.unlink(missing_ok=True)
            except OSError as e:
                raise file_error(e, p) from None
