"""The autoencoder of latent diffusion (nets/autoencoder.py, recipes/autoencoder.py): shapes, the
KL term against its closed form and Monte Carlo, PSNR against a hand computation, the latent
scale (unit std on held-out latents, measured with the EMA weights, re-measured on resume,
refused when not measured on the final weights), and the recipe from the command line."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from cli_run import run
from safetensors import safe_open
from safetensors.torch import save_file

import difflab
from difflab.data.images import digits_split
from difflab.nets.autoencoder import Autoencoder, DiagonalGaussian, psnr
from difflab.recipes.autoencoder import encode_means, measure_latent_scale

#: A tiny autoencoder of the digits: 8x8x1 -> 4x4x4 (one halving), 20 steps of batch 16.
TINY_AE = ["data.name=digits", "data.held_out=0.2", "autoencoder.channels=8",
           "autoencoder.latent_channels=4",
           "autoencoder.channel_mults=[1,2]", "train.batch_size=16", "train.steps=20",
           "train.log_every=5", "train.lr=0.003"]  # fmt: skip


@pytest.fixture(scope="module")
def ae_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ae") / "run"
    difflab.train("autoencoder", TINY_AE, out=str(out), progress=False)
    return out


def test_encode_decode_shapes():
    torch.manual_seed(0)
    glyphs = Autoencoder(3, channels=8, channel_mults=(1, 2, 2), latent_channels=4)
    x = torch.randn(2, 3, 32, 32)
    posterior = glyphs.encode(x)
    assert posterior.mean.shape == posterior.logvar.shape == (2, 4, 8, 8)
    assert glyphs.latent_shape((3, 32, 32)) == (4, 8, 8) and glyphs.factor == 4
    assert glyphs.decode(posterior.sample()).shape == (2, 3, 32, 32) == glyphs(x).shape
    digits = Autoencoder(1, channels=8, channel_mults=(1, 2), latent_channels=3)
    assert digits.latent_shape((1, 8, 8)) == (3, 4, 4)
    assert digits(torch.randn(5, 1, 8, 8)).shape == (5, 1, 8, 8)
    with pytest.raises(ValueError, match="cannot be downsampled by 4"):
        glyphs.latent_shape((3, 30, 30))
    with pytest.raises(ValueError, match="latent_channels must be a positive integer"):
        Autoencoder(3, latent_channels=0)


def test_kl_matches_the_closed_form_and_monte_carlo():
    gen = torch.Generator().manual_seed(0)
    mean = torch.randn(3, 2, 4, 4, generator=gen)
    logvar = torch.randn(3, 2, 4, 4, generator=gen) * 0.5
    q = DiagonalGaussian(mean, logvar)
    normal = torch.distributions.Normal(mean, (0.5 * logvar).exp())
    reference = torch.distributions.kl_divergence(normal, torch.distributions.Normal(0.0, 1.0))
    assert torch.allclose(q.kl(), reference.flatten(1).sum(1), rtol=1e-6)
    # Monte Carlo: KL = E_q[log q(z) - log N(z; 0, I)], 20,000 draws per example.
    z = torch.stack([q.sample(gen) for _ in range(20_000)])
    log_ratio = normal.log_prob(z) - torch.distributions.Normal(0.0, 1.0).log_prob(z)
    per_draw = log_ratio.flatten(2).sum(2)  # (draws, examples)
    estimate, stderr = per_draw.mean(0), per_draw.std(0) / math.sqrt(len(per_draw))
    assert torch.all((estimate - q.kl()).abs() < 4 * stderr), (estimate, q.kl(), stderr)
    # A posterior equal to the prior costs nothing.
    zero = DiagonalGaussian(torch.zeros(2, 5), torch.zeros(2, 5)).kl()
    assert torch.equal(zero, torch.zeros(2))


def test_psnr_by_hand():
    x = torch.zeros(2, 3, 4, 4)
    reconstruction = torch.stack([torch.full((3, 4, 4), 0.1), torch.full((3, 4, 4), 5.0)])
    # MSE 0.01 -> 10 log10(4 / 0.01); the second is clamped to 1 first: MSE 1 -> 10 log10(4).
    expected = torch.tensor([10 * math.log10(400.0), 10 * math.log10(4.0)])
    assert torch.allclose(psnr(x, reconstruction), expected)


def test_latent_scale_gives_unit_std_on_held_out_latents(ae_run):
    model = difflab.load(ae_run, "cpu").model
    assert model.step == 20 and model.latent_shape == (4, 4, 4)
    train, held_out = digits_split()
    # The stored scale is the one the EMA weights give on the training digits, exactly.
    assert model.latent_scale == pytest.approx(measure_latent_scale(model.net, train.x), rel=1e-6)
    z = encode_means(model.net, held_out.x) * model.latent_scale
    # 360 held-out digits x 64 latent values; tolerance 10% (measured: 0.99).
    assert abs(float(z.std()) - 1.0) < 0.1, float(z.std())
    unscaled = float(encode_means(model.net, held_out.x).std())
    assert abs(unscaled - 1.0) > 0.1  # the scale matters: without it the std is not 1


def _set_metadata(path, **entries) -> None:
    """Rewrite the run config in a checkpoint's header with ``entries`` changed."""
    file = path / "checkpoint.safetensors"
    with safe_open(file, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        meta = f.metadata()
    config = json.loads(meta["config"])
    config.update(entries)
    save_file(tensors, file, metadata={**meta, "config": json.dumps(config)})


def test_resume_remeasures_the_scale_and_an_unmeasured_scale_is_refused(
    ae_run, tmp_path, monkeypatch, capsys
):
    copy = tmp_path / "ae"
    shutil.copytree(ae_run, copy)
    code, _, err = run(monkeypatch, capsys, "train", str(copy), "--resume", "train.steps=25",
                       "--quiet")  # fmt: skip
    assert code == 0, err
    resumed = difflab.load(copy, "cpu").model
    assert resumed.step == 25 and resumed.latent_scale is not None
    assert resumed.latent_scale != difflab.load(ae_run, "cpu").model.latent_scale
    # A checkpoint whose scale belongs to other weights (a run stopped by Ctrl-C) is refused.
    _set_metadata(copy, latent_scale_step=20)
    code, _, err = run(monkeypatch, capsys, "sample", str(copy), "--n", "2")
    assert code == 2 and "latent scale was not measured on its weights of step 25" in err
    assert err.count("\n") == 1


def test_sample_decodes_random_latents_and_eval_reports_psnr_and_accuracy(
    ae_run, tmp_path, monkeypatch, capsys
):
    code, out, err = run(monkeypatch, capsys, "sample", str(ae_run), "--n", "5", "--seed", "3",
                         "--out", str(tmp_path / "s"))  # fmt: skip
    assert code == 0, err
    samples = np.load(tmp_path / "s.npz")["samples"]
    assert samples.shape == (5, 1, 8, 8) and np.isfinite(samples).all()
    code, out, err = run(monkeypatch, capsys, "eval", str(ae_run), "--n", "50")
    assert code == 0, err
    assert "PSNR" in out and "on 50 held-out images" in out and "digit accuracy" in out
    metrics = difflab.load(ae_run, "cpu").evaluate(n=50).metrics
    assert 0.0 < metrics["psnr"] < 60.0  # 9 dB after these 20 steps (see bench_latent.py)
    assert metrics["accuracy_real"] > 0.95


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["data.name=moons"], "the autoencoder needs images (C, H, W)"),
        (["data.name=digits", "autoencoder.channel_mults=[1,2,2,2,2]"],
         "cannot be downsampled by 16"),
        (["autoencoder.reconstruction=l3"], "autoencoder.reconstruction must be one of l1, l2"),
        (["autoencoder.kl_weight=-1"], "autoencoder.kl_weight must be non-negative"),
        (["model.kind=unet"], "model"),
    ],
)  # fmt: skip
def test_bad_autoencoder_configs_are_refused(args, message, tmp_path, monkeypatch, capsys):
    code, _, err = run(monkeypatch, capsys, "train", "autoencoder", f"train.out={tmp_path}/r",
                       *args, "--quiet")  # fmt: skip
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "r" / "checkpoint.safetensors").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--sampler", "ddim"], "--sampler does not apply to autoencoder runs"),
        (["--guidance", "2"], "--guidance does not apply to autoencoder runs"),
        (["--seed", "-1"], "--seed must be a whole number"),
    ],
)
def test_options_an_autoencoder_does_not_take_are_refused(
    args, message, ae_run, monkeypatch, capsys
):
    code, _, err = run(monkeypatch, capsys, "sample", str(ae_run), "--n", "2", *args)
    assert code == 2 and message in err and err.count("\n") == 1, err
    code, _, err = run(monkeypatch, capsys, "eval", str(ae_run), "--method", "vlb")
    assert code == 2 and "--method does not apply to autoencoder runs" in err
