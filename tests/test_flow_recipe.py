"""The ``flow`` recipe from the command line: ``difflab train PRESET --recipe flow`` adopts the
preset with the linear path, the velocity target and Euler, trains, saves, loads and samples
(with classifier-free guidance and other samplers too); what does not apply is refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
from cli_run import run

from difflab.recipes import load_config

TINY = ["train.steps=2", "train.batch_size=8", "train.log_every=1", "model.unet.channels=8",
        "model.unet.num_heads=2", "sample.steps=2"]  # fmt: skip


def test_recipe_flow_on_an_image_preset_takes_the_flow_defaults_and_the_users_overrides():
    recipe, cfg = load_config("digits", [], recipe="flow")
    assert recipe.name == "flow"
    d, s = cfg.diffusion, cfg.sample
    assert (d.schedule, d.prediction, d.weighting, d.T, s.sampler) == (
        "rectified-flow", "flow", "simple", None, "euler")  # fmt: skip
    assert cfg.model.unet.channels == 32 and cfg.train.steps == 1000  # the rest is the preset's
    _, cfg = load_config("digits", ["diffusion.schedule=cosine", "sample.sampler=heun"], "flow")
    assert (cfg.diffusion.schedule, cfg.diffusion.prediction, cfg.sample.sampler) == (
        "cosine", "flow", "heun")  # fmt: skip
    _, image = load_config("digits", [])  # the image recipe is untouched
    assert (image.diffusion.schedule, image.diffusion.prediction) == ("cosine", "eps")


def test_flow_trains_saves_loads_and_samples_from_the_command_line(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    code, _, err = run(monkeypatch, capsys, "train", "digits-tiny", "--recipe", "flow",
                       f"train.out={out}", *TINY, "--quiet")  # fmt: skip
    assert code == 0, err
    recorded = json.loads((out / "config.json").read_text())
    assert recorded["recipe"] == "flow"
    assert recorded["diffusion"]["schedule"] == "rectified-flow"
    assert recorded["diffusion"]["prediction"] == "flow"
    for extra in ([], ["--guidance", "2", "--class", "3"], ["--sampler", "dpmpp_2m"],
                  ["--sampler", "heun", "--threshold", "dynamic"]):  # fmt: skip
        code, _, err = run(monkeypatch, capsys, "sample", str(out), "--n", "3", "--out",
                           str(tmp_path / "s"), *extra)  # fmt: skip
        assert code == 0, (extra, err)
        samples = np.load(tmp_path / "s.npz")["samples"]
        assert samples.shape == (3, 1, 8, 8) and np.isfinite(samples).all()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["diffusion.prediction=eps"], "the flow recipe trains a velocity"),
        (["diffusion.prediction=edm"], "the flow recipe trains a velocity"),
        (["diffusion.weighting=elbow"], "diffusion.weighting must be one of"),
    ],
)
def test_flow_refuses_what_does_not_apply(args, message, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    code, _, err = run(monkeypatch, capsys, "train", "digits-tiny", "--recipe", "flow",
                       f"train.out={out}", *TINY, *args, "--quiet")  # fmt: skip
    assert code == 2 and err.startswith("difflab: error: ") and message in err, err
    assert len(err.strip().splitlines()) == 1 and not out.exists()
