"""``run(monkeypatch, capsys, *args)``: the command line run in-process, as the tests call it."""

from __future__ import annotations

import sys

import pytest

from difflab.cli import main


def run(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """``difflab ARGS`` in this process: its exit status, standard output and standard error."""
    monkeypatch.setattr(sys, "argv", ["difflab", *args])
    with pytest.raises(SystemExit) as info:
        main()
    out, err = capsys.readouterr()
    return info.value.code, out, err
