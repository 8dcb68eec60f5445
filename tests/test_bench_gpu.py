"""benchmarks/bench_gpu.py runs end to end on the CPU at tiny sizes (its figures on a GPU are in
docs/BENCHMARKS.md)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import difflab

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "bench_gpu.py"
SRC = str(Path(difflab.__file__).parents[1])


def _bench(*args: str) -> str:
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(SCRIPT), "--device", "cpu", "--tiny", *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def _rows(text: str, part: str) -> list[list[str]]:
    table = text.split(f"### {part}")[1].split("###")[0]
    return [[c.strip() for c in line.strip("|").split("|")]
            for line in table.splitlines() if re.match(r"\| \w", line)][1:]  # fmt: skip


def test_training_and_sampling_tables_at_tiny_sizes():
    out = _bench("--parts", "train,sample", "--precisions", "fp32,bf16")
    train = _rows(out, "train")
    # 2 presets x 2 precisions x (difflab, diffusers), parameters matched within 15%
    assert len(train) == 8
    for ours, peer in zip(train[::2], train[1::2], strict=True):
        assert ours[1] == "difflab" and peer[1] == "diffusers UNet2DModel"
        a, b = (int(r[2].replace(",", "")) for r in (ours, peer))
        assert abs(a - b) < 0.15 * b
        assert float(ours[4]) > 0 and peer[5] == "1.00x"
    sample = _rows(out, "sample")
    assert [(r[0], r[1], r[2]) for r in sample] == [
        (p, q, s) for p in ("digits", "glyphs") for q in ("fp32", "bf16") for s in ("10", "50")
    ]


@pytest.mark.slow
def test_every_part_at_tiny_sizes_with_compile_and_two_processes():
    out = _bench()
    assert len(_rows(out, "train")) == 12
    assert [r[0] for r in _rows(out, "scaling")] == ["1", "2"]
