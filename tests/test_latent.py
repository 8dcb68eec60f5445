"""The latent recipe end to end from the command line: a tiny autoencoder of the digits
(8x8x1 -> 4x4x4), a diffusion model of its scaled latents with each network kind, sampling with
guidance and decoding, the reverse-process callback on decoded images, the judged evaluation,
and every refusal (missing or foreign autoencoder, one that changed, options that do not
apply)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from cli_run import run

import difflab
from difflab.data.images import digits_split
from difflab.recipes import load_config
from difflab.recipes.autoencoder import encode_means

TINY_AE = ["data.name=digits", "data.held_out=0.2", "autoencoder.channels=8",
           "autoencoder.latent_channels=4",
           "autoencoder.channel_mults=[1,2]", "train.batch_size=16", "train.steps=10",
           "train.log_every=5"]  # fmt: skip
TINY = ["train.steps=2", "train.batch_size=8", "train.log_every=1", "model.unet.channels=8",
        "model.unet.num_heads=2", "diffusion.T=20", "sample.steps=2"]  # fmt: skip
KINDS = {
    "dit": ["model.kind=dit", "model.unet=null", "model.dit.width=16", "model.dit.depth=1",
            "model.dit.patch_size=2", "model.dit.num_heads=2", "diffusion.prediction=v"],
    "mlp": ["model.kind=mlp", "model.unet=null", "model.mlp.hidden=16", "model.mlp.depth=1",
            "diffusion.prediction=edm", "diffusion.schedule=edm", "diffusion.T=null"],
}  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An autoencoder run, a latent U-Net on it, and an image run."""
    root = tmp_path_factory.mktemp("latent")
    difflab.train("autoencoder", TINY_AE, out=str(root / "ae"), progress=False)
    difflab.train("digits-tiny", [*TINY, f"latent.autoencoder={root / 'ae'}"], recipe="latent",
                  out=str(root / "latent"), progress=False)  # fmt: skip
    difflab.train("digits-tiny", TINY, out=str(root / "image"), progress=False)
    return root


def test_a_latent_run_trains_samples_decodes_and_evaluates_from_the_cli(
    runs, tmp_path, monkeypatch, capsys
):
    code, out, err = run(monkeypatch, capsys, "sample", str(runs / "latent"), "--n", "6",
                         "--class", "3", "--guidance", "2", "--sampler", "dpmpp_2m",
                         "--out", str(tmp_path / "s"))  # fmt: skip
    assert code == 0, err
    samples = np.load(tmp_path / "s.npz")
    assert samples["samples"].shape == (6, 1, 8, 8)  # decoded: the images' shape
    assert np.isfinite(samples["samples"]).all() and list(samples["labels"]) == [3] * 6
    code, out, err = run(monkeypatch, capsys, "eval", str(runs / "latent"), "--n", "20")
    assert code == 0, err
    assert "judged FD" in out and "floor" in out and "on 20 decoded samples" in out
    assert "digit accuracy" in out


def test_the_latent_model_learns_the_scaled_latents_and_records_its_autoencoder(runs):
    latent = difflab.load(runs / "latent", "cpu").model
    ae = difflab.load(runs / "ae", "cpu").model
    assert latent.shape == ae.latent_shape == (4, 4, 4)
    assert latent.autoencoder.latent_scale == ae.latent_scale
    train, _ = digits_split()
    z = encode_means(ae.net, train.x) * ae.latent_scale
    assert abs(float(z.std()) - 1.0) < 0.05  # what the diffusion model is trained on
    # Decoding is D(z / scale): the decoded posterior mean is the autoencoder's reconstruction.
    decoded = difflab.recipes.get("latent").decode(latent, z[:4])
    assert torch.allclose(decoded, ae.net(train.x[:4]).clamp(-1, 1), atol=1e-5)


def test_the_reverse_process_callback_sees_decoded_images(runs):
    frames = []
    difflab.load(runs / "latent", "cpu").sample(
        3, steps=4, callback=lambda i, t, x_t, x0: frames.append((x_t, x0))
    )
    assert len(frames) == 4
    for x_t, x0 in frames:
        assert x_t.shape == x0.shape == (3, 1, 8, 8)
        assert float(x0.abs().max()) <= 1.0 and bool(torch.isfinite(x_t).all())


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_network_kind_trains_on_latents(kind, runs, tmp_path, monkeypatch, capsys):
    out = tmp_path / kind
    code, _, err = run(monkeypatch, capsys, "train", "digits-tiny", "--recipe", "latent",
                       *TINY, *KINDS[kind], f"latent.autoencoder={runs / 'ae'}",
                       f"train.out={out}", "--quiet")  # fmt: skip
    assert code == 0, err
    code, _, err = run(monkeypatch, capsys, "sample", str(out), "--n", "3", "--out",
                       str(tmp_path / "s"))  # fmt: skip
    assert code == 0, err
    assert np.load(tmp_path / "s.npz")["samples"].shape == (3, 1, 8, 8)


TRAIN = "train digits-tiny --recipe latent --quiet " + " ".join(TINY)


@pytest.mark.parametrize(
    ("command", "message"),
    [
        (TRAIN, "the latent recipe needs latent.autoencoder=RUN"),
        (TRAIN + " latent.autoencoder={root}/nowhere", "/nowhere is not a run folder"),
        (TRAIN + " latent.autoencoder={root}/image",
         "/image is a run of the image recipe, not of the autoencoder recipe"),
        (TRAIN + " latent.autoencoder={root}/ae data.name=moons",
         "encodes images of shape (1, 8, 8), but data.name=moons has images of shape (2,)"),
        (TRAIN + " latent.autoencoder={root}/ae sample.threshold=static",
         "sample.threshold does not apply to latent models"),
        ("sample {root}/latent --n 2 --threshold static",
         "--threshold does not apply to latent runs"),
        ("sample {root}/latent --n 2 --classifier {root}/image",
         "--classifier does not apply to latent runs"),
        ("eval {root}/latent --method vlb", "--method does not apply to latent runs"),
        ("eval {root}/latent --n 1", "--n must be at least 2"),
    ],
)  # fmt: skip
def test_bad_latent_input_is_refused_in_one_line(
    command, message, runs, tmp_path, monkeypatch, capsys
):
    before = sorted(p.name for p in (runs / "latent").iterdir())
    args = command.format(root=runs).split() + [f"train.out={tmp_path}/r"] * command.startswith(
        "train"
    )
    code, _, err = run(monkeypatch, capsys, *args)
    assert code == 2 and message.format(root=runs) in err and err.count("\n") == 1, err
    assert not (tmp_path / "r" / "checkpoint.safetensors").exists()
    assert sorted(p.name for p in (runs / "latent").iterdir()) == before


def test_a_missing_or_changed_autoencoder_is_refused_at_load(runs, tmp_path, monkeypatch, capsys):
    ae, latent = tmp_path / "ae", tmp_path / "latent"
    shutil.copytree(runs / "ae", ae)
    difflab.train("digits-tiny", [*TINY, f"latent.autoencoder={ae}"], recipe="latent",
                  out=str(latent), progress=False)  # fmt: skip
    code, _, err = run(monkeypatch, capsys, "train", str(ae), "--resume", "train.steps=12",
                       "--quiet")  # fmt: skip
    assert code == 0, err
    code, _, err = run(monkeypatch, capsys, "sample", str(latent), "--n", "2")
    assert code == 2 and f"the autoencoder in {ae} has changed since" in err, err
    code, _, err = run(monkeypatch, capsys, "train", str(latent), "--resume", "train.steps=3",
                       "--quiet")  # fmt: skip
    assert code == 2 and "different config" in err and "latent_scale" in err, err
    shutil.rmtree(ae)
    code, _, err = run(monkeypatch, capsys, "sample", str(latent), "--n", "2")
    assert code == 2 and f"the autoencoder of this latent model, {ae}, is missing" in err, err


def test_an_image_preset_becomes_a_v_prediction_latent_config_unless_told_otherwise(runs):
    ae = f"latent.autoencoder={runs / 'ae'}"
    assert load_config("glyphs", [ae], recipe="latent")[1].diffusion.prediction == "v"
    told = load_config("glyphs", [ae, "diffusion.prediction=eps"], recipe="latent")[1]
    assert told.diffusion.prediction == "eps"
    assert load_config("glyphs", [], recipe="image")[1].diffusion.prediction == "eps"
