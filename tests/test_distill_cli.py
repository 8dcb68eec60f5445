"""``difflab distill RUN --method progressive | reflow`` from the command line: one run folder
per halving, each an image run whose default sampler is DDIM on its own step count; one flow
run retrained on its own pairs; bad input is one line, exit 2, and writes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_run import run

import difflab
from difflab.gaussian.schedules import make_schedule
from difflab.recipes import run_metadata

TINY = ["train.steps=2", "train.batch_size=8", "train.log_every=1", "model.unet.channels=8",
        "model.unet.num_heads=2", "diffusion.T=20", "sample.steps=2"]  # fmt: skip
FAST = ["--train-steps", "2", "--batch-size", "4", "--quiet"]


@pytest.fixture(scope="module")
def teachers(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("teachers")
    difflab.train("digits-tiny", TINY, out=str(root / "image"), progress=False)
    difflab.train("moons", ["train.steps=2", "train.batch_size=8", "model.mlp.hidden=8",
                            "model.mlp.depth=1", "diffusion.T=20", "sample.steps=2",
                            "diffusion.class_conditional=false"],
                  out=str(root / "moons"), progress=False)  # fmt: skip
    difflab.train("digits-tiny", TINY, recipe="classifier", out=str(root / "classifier"),
                  progress=False)  # fmt: skip
    difflab.train("digits-tiny", [*TINY[:-2], "sample.steps=4"], recipe="flow",
                  out=str(root / "flow"), progress=False)  # fmt: skip
    return {p.name: p for p in root.iterdir()}


def test_progressive_distillation_writes_one_sampleable_run_per_halving(
    teachers, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "students"
    code, stdout, err = run(monkeypatch, capsys, "distill", str(teachers["image"]), "--to-steps",
                            "2", "--from-steps", "8", "--out", str(out), "--guidance", "1.5",
                            *FAST)  # fmt: skip
    assert code == 0, err
    assert [line.split(":")[0] for line in stdout.splitlines()] == ["4 steps", "2 steps"]
    schedule = make_schedule("cosine", T=20)
    for n in (4, 2):
        config = json.loads((out / f"steps-{n}" / "config.json").read_text())
        assert config["recipe"] == "image"
        assert config["diffusion"]["prediction"] == "v"  # the eps teacher's student
        assert (config["sample"]["sampler"], config["sample"]["steps"]) == ("ddim", n)
        assert config["sample"]["guidance"] == 0.0  # fixed at distillation time
        # the student's grid is every other point of its teacher's
        assert schedule.timesteps(n).tolist() == schedule.timesteps(2 * n)[::2].tolist()
    student = difflab.load(out / "steps-2")
    seen = []
    student.sample(3, callback=lambda i, t, x_t, x0: seen.append(t))
    assert len(seen) == 2  # its own step count by default
    code, _, err = run(monkeypatch, capsys, "sample", str(out / "steps-2"), "--n", "3",
                       "--out", str(tmp_path / "s"))  # fmt: skip
    assert code == 0, err
    assert np.isfinite(np.load(tmp_path / "s.npz")["samples"]).all()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--method", "bogus"], "--method must be one of"),
        (["--to-steps", "3", "--from-steps", "8"], "must be --to-steps times a power of two"),
        (["--to-steps", "4", "--from-steps", "4"], "must be --to-steps times a power of two"),
        (["--to-steps", "0"], "--to-steps must be a whole number >= 1"),
        (["--from-steps", "64", "--to-steps", "2"], "exceeds the teacher's 20 training steps"),
        (["--prediction", "eps"], "--prediction must be one of"),
        (["--weighting", "snr"], "--weighting must be one of"),
        (["--lr", "nan"], "--lr must be a finite number"),
        (["--train-steps", "0"], "--train-steps must be a whole number >= 1"),
        (["--pairs", "10"], "--pairs does not apply to --method progressive"),
        (["--method", "reflow"], "--method reflow distils runs of the flow recipe"),
    ],
)
def test_bad_distillation_options_are_refused(args, message, teachers, tmp_path, monkeypatch,
                                              capsys):  # fmt: skip
    out = tmp_path / "students"
    code, _, err = run(monkeypatch, capsys, "distill", str(teachers["image"]), "--out",
                       str(out), *FAST, *args)  # fmt: skip
    assert code == 2 and err.startswith("difflab: error: ") and message in err, err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


def test_distillation_refuses_other_teachers_and_keeps_earlier_students(
    teachers, tmp_path, monkeypatch, capsys
):
    code, _, err = run(monkeypatch, capsys, "distill", str(teachers["classifier"]), "--out",
                       str(tmp_path / "c"), *FAST)  # fmt: skip
    assert code == 2 and "is a classifier run" in err and not (tmp_path / "c").exists()
    code, _, err = run(monkeypatch, capsys, "distill", str(teachers["moons"]), "--guidance", "2",
                       "--out", str(tmp_path / "m"), *FAST)  # fmt: skip
    assert code == 2 and "needs a class-conditional teacher" in err
    earlier = tmp_path / "earlier" / "steps-2"
    earlier.mkdir(parents=True)
    (earlier / "checkpoint.safetensors").write_bytes(b"mine")
    code, _, err = run(monkeypatch, capsys, "distill", str(teachers["image"]), "--to-steps", "2",
                       "--from-steps", "4", "--out", str(tmp_path / "earlier"), *FAST)  # fmt: skip
    assert code == 2 and "already exists: choose another --out" in err
    assert (earlier / "checkpoint.safetensors").read_bytes() == b"mine"


def test_reflow_retrains_a_flow_on_its_own_pairs(teachers, tmp_path, monkeypatch, capsys):
    out = tmp_path / "reflow"
    code, stdout, err = run(monkeypatch, capsys, "distill", str(teachers["flow"]), "--method",
                            "reflow", "--pairs", "16", "--pair-steps", "2", "--guidance", "1",
                            "--out", str(out), *FAST)  # fmt: skip
    assert code == 0, err
    assert stdout.startswith(f"4 steps: {out / 'reflow-1'}")
    config = json.loads((out / "reflow-1" / "config.json").read_text())
    assert config["recipe"] == "flow" and config["sample"]["guidance"] == 0.0
    code, _, err = run(monkeypatch, capsys, "sample", str(out / "reflow-1"), "--n", "3",
                       "--steps", "1", "--out", str(tmp_path / "s"))  # fmt: skip
    assert code == 0, err
    assert np.isfinite(np.load(tmp_path / "s.npz")["samples"]).all()
    for args, message in [
        (["--to-steps", "2"], "--to-steps does not apply to --method reflow"),
        (["--pairs", "0"], "--pairs must be a whole number >= 1"),
    ]:
        code, _, err = run(monkeypatch, capsys, "distill", str(teachers["flow"]), "--method",
                           "reflow", "--out", str(tmp_path / "bad"), *FAST, *args)  # fmt: skip
        assert code == 2 and message in err and not (tmp_path / "bad").exists(), err


def test_every_method_distils_class_conditional_glyphs_teachers(tmp_path, monkeypatch, capsys):
    """Progressive and consistency distillation of a pixel glyphs U-Net and reflow of a glyphs
    flow, all guided: each student draws 32x32 colour glyphs of the classes asked for."""
    teachers = tmp_path / "teachers"
    small = [*TINY[:-2], "sample.steps=2", "model.unet.attn_resolutions=[]"]
    for recipe, extra in (("image", ["diffusion.T=20"]), ("flow", [])):
        difflab.train("glyphs", [*small, *extra], recipe=recipe, out=str(teachers / recipe),
                      progress=False)  # fmt: skip
    jobs = [
        ("image", ["--method", "progressive", "--to-steps", "1", "--from-steps", "2"],
         "steps-1"),
        ("image", ["--method", "consistency"], "consistency"),
        ("flow", ["--method", "reflow", "--pairs", "8", "--pair-steps", "2"], "reflow-1"),
    ]  # fmt: skip
    for teacher, args, student in jobs:
        out = tmp_path / f"{teacher}-{args[1]}"
        code, _, err = run(monkeypatch, capsys, "distill", str(teachers / teacher), "--guidance",
                           "2", "--out", str(out), *FAST, *args)  # fmt: skip
        assert code == 0, err
        meta = run_metadata(out / student)
        assert meta["shape"] == [3, 32, 32] and meta["distilled"]["guidance"] == 2.0
        model = difflab.load(out / student)
        samples = model.sample(3, label=[0, 5, 61], steps=1)
        assert samples.x.shape == (3, 3, 32, 32) and samples.labels.tolist() == [0, 5, 61]
        assert torch.isfinite(samples.x).all()
