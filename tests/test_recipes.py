"""Every recipe on the one interface, from the command line: each image recipe trains with every
parameterization it accepts (2 steps), saves, loads and samples; nonsense values are refused with
one line (every option a recipe does not take: the table of test_bad_input.py); checkpoints of
difflab 0.1 still load."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from cli_run import run

from difflab.config import preset_path, presets
from difflab.gaussian.parameterization import PREDICTIONS
from difflab.recipes import RECIPES, get, load, load_config

TINY = ["train.steps=2", "train.batch_size=8", "train.log_every=1", "model.unet.channels=8",
        "model.unet.num_heads=2", "diffusion.T=20", "sample.steps=2"]  # fmt: skip
OLD_RUNS = Path(__file__).parent / "data" / "v0.1"


def test_every_registered_recipe_is_named_as_registered():
    for name in RECIPES:
        assert get(name).name == name


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("recipe", ["image", "cascade", "text-to-digit"])
def test_recipe_trains_saves_loads_and_samples_with_every_prediction(
    recipe, prediction, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "run"
    extra = ["diffusion.T=null", "diffusion.schedule=edm"] if prediction == "edm" else []
    code, _, err = run(monkeypatch, capsys, "train", "digits-tiny", f"train.out={out}", *TINY,
                       f"diffusion.prediction={prediction}", *extra, "--recipe", recipe,
                       "--quiet")  # fmt: skip
    assert code == 0, err
    args = ["sample", str(out), "--n", "3", "--out", str(tmp_path / "s")]
    if recipe == "text-to-digit":
        args += ["--prompt", "a thin three"]
    code, _, err = run(monkeypatch, capsys, *args)
    assert code == 0, err
    samples = np.load(tmp_path / "s.npz")["samples"]
    assert samples.shape == (3, 1, 8, 8) and np.isfinite(samples).all()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["diffusion.prediction=edm", "diffusion.weighting=elbo"], "does not apply to prediction"),
        (["diffusion.sigma_data=0.5"], "sigma_data applies to diffusion.prediction=edm only"),
        (["diffusion.prediction=magic"], "diffusion.prediction must be one of"),
        (["model.kind=mlp"], "model.unet does not apply to model.kind=mlp"),
    ],
)
def test_impossible_configs_are_refused_at_config_time(args, message, monkeypatch, capsys,
                                                       tmp_path):  # fmt: skip
    code, _, err = run(monkeypatch, capsys, "train", "digits-tiny", f"train.out={tmp_path}",
                       *args, "--quiet")  # fmt: skip
    assert code == 2 and message in err and err.count("\n") == 1
    assert not (tmp_path / "checkpoint.safetensors").exists()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One tiny run of every recipe."""
    import difflab

    root = tmp_path_factory.mktemp("runs")
    for recipe in ("image", "classifier", "cascade", "text-to-digit"):
        difflab.train("digits-tiny", TINY + ["classifier.channels=8"] * (recipe == "classifier"),
                      recipe=recipe, out=str(root / recipe), progress=False)  # fmt: skip
    difflab.train("text-tiny", ["train.steps=2"], out=str(root / "text"), progress=False)
    return root


@pytest.mark.parametrize(
    ("recipe", "args", "message"),
    [
        ("image", ["--sampler", "heun", "--eta", "0.5"], "--eta does not apply to sampler heun"),
        ("image", ["--opt", "order=2"], "--opt order does not apply to sampler ddim"),
        ("image", ["--guidance", "nan"], "--guidance must be a finite number"),
        ("image", ["--percentile", "0.9"], "--percentile applies with --threshold dynamic only"),
        ("image", ["--classifier-scale", "2"], "--classifier-scale applies with --classifier"),
        ("image", ["--convention", "gamma"], "--convention applies with --guidance only"),
        ("image", ["--classifier", "{text}"], "--classifier wants a run of the classifier"),
        ("cascade", ["--aug-level", "1.5"], "--aug-level must be a finite number [0, 1]"),
        ("text-to-digit", ["--prompt", " ; "], "--prompt holds no caption"),
        ("image", ["--n", "100000000"], "will not fit in memory"),
    ],
)
def test_nonsense_values_are_refused(recipe, args, message, runs, monkeypatch, capsys):
    args = [a.format(text=runs / "text") for a in args]
    code, _, err = run(monkeypatch, capsys, "sample", str(runs / recipe), "--n", "2", *args)
    assert code == 2 and message in err and err.count("\n") == 1, err


def test_a_dit_run_trains_loads_and_samples(tmp_path, monkeypatch, capsys):
    # DiT's position table is a non-persistent buffer: the checkpoint must not hold it.
    out = tmp_path / "dit"
    dit = ["model.kind=dit", "model.unet=null", "model.dit.width=16", "model.dit.depth=1",
           "model.dit.num_heads=2", "model.dit.patch_size=2"]  # fmt: skip
    args = [a for a in TINY if not a.startswith("model.unet")]
    code, _, err = run(monkeypatch, capsys, "train", "digits-tiny", f"train.out={out}", *args,
                       *dit, "--quiet")  # fmt: skip
    assert code == 0, err
    x = load(out, "cpu").sample(10, steps=2).x
    assert x.shape == (10, 1, 8, 8) and torch.isfinite(x).all()


def test_eval_options_follow_the_recipe(runs, monkeypatch, capsys):
    code, _, err = run(monkeypatch, capsys, "eval", str(runs / "text"), "--method", "ode")
    assert code == 2 and "--method does not apply to text runs" in err
    code, _, err = run(monkeypatch, capsys, "eval", str(runs / "image"), "--ode-steps", "3")
    assert code == 2 and "--ode-steps and --probes apply to --method ode only" in err
    code, out, err = run(monkeypatch, capsys, "eval", str(runs / "classifier"), "--n", "16")
    assert code == 0 and "held-out accuracy on 16 examples" in out, err


@pytest.mark.parametrize("kind", ["image", "text"])
def test_checkpoints_of_difflab_0_1_load_and_sample(kind, tmp_path, monkeypatch, capsys):
    old = tmp_path / kind
    shutil.copytree(OLD_RUNS / kind, old)
    loaded = load(old, "cpu")
    assert loaded.recipe.name == kind and loaded.step == 2
    if kind == "image":
        assert loaded.config.model.unet.channels == 8
        assert loaded.config.diffusion.T == 100
    code, _, err = run(monkeypatch, capsys, "sample", str(old), "--n", "2")
    assert code == 0, err
    assert (old / "samples.npz").exists() if kind == "image" else (old / "samples.txt").exists()
    # continuing the training is refused with one line (the optimiser state's layout may differ)
    code, _, err = run(monkeypatch, capsys, "train", str(old), "train.steps=3", "--resume",
                       "--quiet")  # fmt: skip
    assert code == 2 and "trained by difflab 0.1" in err and err.count("\n") == 1


def test_large_requests_are_drawn_in_chunks_with_their_own_labels(monkeypatch):
    """``draw`` splits n samples into chunks of SAMPLE_CHUNK rows and hands each chunk its own
    rows of the condition; a request within one chunk is one batch."""
    import torch

    from difflab.gaussian.parameterization import Denoiser
    from difflab.gaussian.schedules import make_schedule
    from difflab.recipes import image

    seen = []

    class Spy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(()))

        def forward(self, x, c_noise, class_labels=None):
            seen.append(class_labels.tolist())
            return x * self.weight

    schedule = make_schedule("cosine", T=20)
    model = image.LoadedModel(Denoiser(Spy(), schedule, "eps"), None, (1, 2, 2), None, 0)
    labels = {"class_labels": torch.arange(5)}
    kwargs = {"sampler": "ddim", "steps": 1, "grid": "trailing", "seed": 0, "options": {}}
    monkeypatch.setattr(image, "SAMPLE_CHUNK", 2)
    x = image.draw(model, model.denoiser, 5, labels, **kwargs)
    assert x.shape == (5, 1, 2, 2) and seen == [[0, 1], [2, 3], [4]]
    seen.clear()
    monkeypatch.setattr(image, "SAMPLE_CHUNK", 8)
    one_batch = image.draw(model, model.denoiser, 5, labels, **kwargs)
    assert seen == [[0, 1, 2, 3, 4]] and torch.isfinite(one_batch).all()


def test_a_classifier_of_another_schedule_is_refused(tmp_path, monkeypatch, capsys):
    import difflab

    difflab.train("digits-tiny", TINY, out=str(tmp_path / "model"), progress=False)
    difflab.train("digits-tiny", [*TINY, "classifier.channels=8", "diffusion.schedule=linear"],
                  recipe="classifier", out=str(tmp_path / "clf"), progress=False)  # fmt: skip
    code, _, err = run(monkeypatch, capsys, "sample", str(tmp_path / "model"), "--n", "2",
                       "--classifier", str(tmp_path / "clf"))  # fmt: skip
    assert code == 2 and "trained on another noise schedule" in err, err


def test_requests_beyond_half_the_memory_are_refused_before_drawing():
    from difflab.errors import UserError
    from difflab.recipes import image

    image.check_output_memory(1_000_000, (1, 8, 8))  # 0.8 GB of float32 copies: fine
    with pytest.raises(UserError, match=r"need about .* GiB, more than half"):
        image.check_output_memory(1_000_000, (3, 256, 256))


def test_a_grid_shows_at_most_grid_max_samples(tmp_path, monkeypatch):
    import torch
    from PIL import Image

    import difflab.recipes as recipes

    monkeypatch.setattr(recipes, "GRID_MAX", 6)
    recipes.Samples(x=torch.zeros(10, 1, 8, 8), nrow=3).save(tmp_path / "s")
    assert len(np.load(tmp_path / "s.npz")["samples"]) == 10
    # 3 columns, 2 rows of 8x8 images at 4x with 1-pixel borders
    assert Image.open(tmp_path / "s.png").size == (4 * (3 * 9 + 1), 4 * (2 * 9 + 1))


@pytest.mark.parametrize("preset", presets())
def test_every_shipped_preset_is_a_valid_config_of_its_recipe(preset):
    recipe, cfg = load_config(preset, [])
    named = yaml.safe_load(preset_path(preset).read_text())["recipe"]
    assert recipe.name == named and type(cfg) is recipe.config_type
