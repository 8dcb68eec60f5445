"""Latent text diffusion (``diffusion.kind=latent-text``): the autoencoder reconstructs held-out
lines, the latent scale, the corruption of latents in training only, self-conditioning in the
latent loss, and the kind end to end from the command line with its refusals."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from cli_run import run

from difflab.data.text import load_corpus
from difflab.errors import UserError
from difflab.gaussian.parameterization import Denoiser
from difflab.gaussian.schedules import cosine_logsnr
from difflab.nets.embedding_transformer import EmbeddingTransformer
from difflab.nets.text_autoencoder import LatentTextNet, TextAutoencoder
from difflab.recipes import load, load_config
from difflab.recipes.text import RECIPE
from difflab.recipes.text import latent_text as lt
from difflab.recipes.text.train import load_splits

#: The reconstruction test's run: 300 autoencoder steps of batch 16 on whole lines (seconds).
AE_RUN = ["diffusion.lines=true", "latent_text.ae_steps=300", "train.steps=2",
          "train.batch_size=16", "train.log_every=50", "train.ckpt_every=1000"]  # fmt: skip


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "slice.txt"
    path.write_text(load_corpus()[100_000:130_000], encoding="utf-8")
    return path


def tiny(text_file: Path, out: Path, *overrides: str):
    _, cfg = load_config("text-tiny", [f"data.source={text_file}", f"train.out={out}",
                                       "diffusion.kind=latent-text", "latent_text.ae_steps=3",
                                       "train.steps=2", *overrides])  # fmt: skip
    return cfg


@pytest.fixture(scope="module")
def trained(text_file, tmp_path_factory):
    """A run whose autoencoder trained for 300 steps (about 15 s)."""
    out = tmp_path_factory.mktemp("latent") / "run"
    RECIPE.train(tiny(text_file, out, *AE_RUN), progress=False)
    return load(out, "cpu")


# ---------------------------------------------------------------- the autoencoder


def test_the_autoencoder_reconstructs_held_out_lines(trained):
    """The held-out rows of whole lines (never trained on), decoded from their clean latents:
    measured 65-75% of rows exactly and 98% of tokens at 300 steps (two seeds); an untrained
    autoencoder gets no row and a few per cent of tokens."""
    model = trained.model
    documents = load_splits(model.config.data)[1].documents
    tokens, mask = lt.held_out_rows(model, documents)
    assert len(tokens) >= 15
    exact, accuracy = lt.reconstruction(model.net, tokens, mask)
    assert exact >= 0.5 and accuracy >= 0.95
    untrained = lt.build_net(model.config, model.tokenizer.vocab_size).eval()
    assert lt.reconstruction(untrained, tokens, mask)[0] == 0.0
    metrics = trained.evaluate(n=64).metrics
    assert metrics["reconstruction_exact"] == pytest.approx(exact)
    assert metrics["reconstruction_accuracy"] == pytest.approx(accuracy)


def test_the_latent_scale_gives_unit_std_on_training_and_held_out_latents(trained):
    model = trained.model
    net = model.net
    train_split, held, _ = load_splits(model.config.data)
    train_tokens = lt.held_out_rows(model, train_split.documents)[0]
    # Stored: 1 / std of the clean latents of the training rows, as measured after stage 1.
    z = lt.encode_rows(net, train_tokens, scaled=False).double()
    assert float(net.latent_scale) == pytest.approx(float(1 / z.std()), rel=1e-5)
    assert float(lt.encode_rows(net, train_tokens).std()) == pytest.approx(1.0, abs=1e-4)
    held_std = float(lt.encode_rows(net, lt.held_out_rows(model, held.documents)[0]).std())
    assert held_std == pytest.approx(1.0, abs=0.05)
    assert trained.evaluate(n=64).metrics["latent_std"] == pytest.approx(held_std, rel=1e-5)


def test_corruption_draws_its_noise_and_masks_by_their_laws():
    """Monte Carlo: a share ``mask`` of the latent vectors is zeroed; on the others the added
    noise has variance ``E[sigma^2] = noise^2 / 3`` (``sigma ~ U(0, noise)`` per row)."""
    z = torch.randn(4000, 8, 16)
    out = lt.corrupt(z, 0.6, 0.25, torch.Generator().manual_seed(0))
    zeroed = (out == 0).all(-1)
    assert float(zeroed.float().mean()) == pytest.approx(0.25, abs=0.01)
    added = (out - z)[~zeroed]
    assert float(added.var()) == pytest.approx(0.36 / 3, rel=0.03)
    assert torch.equal(lt.corrupt(z, 0.0, 0.0), z)


def test_noise_and_masking_are_off_outside_the_autoencoders_training(trained):
    """The training loss corrupts (a random loss), encoding and decoding for sampling and
    evaluation do not: the same latents and tokens whatever the random state; with no noise
    and no masking the training loss is the clean reconstruction loss."""
    net, cfg = trained.model.net, trained.model.config
    tokens = lt.held_out_rows(trained.model, load_splits(cfg.data)[1].documents)[0][:8]
    mask = torch.ones_like(tokens, dtype=torch.bool)
    torch.manual_seed(1)
    first = lt.encode_rows(net, tokens), lt.decode_tokens(net, lt.encode_rows(net, tokens))
    torch.manual_seed(2)
    second = lt.encode_rows(net, tokens), lt.decode_tokens(net, lt.encode_rows(net, tokens))
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    o = lt.options(cfg)
    assert o.ae_noise > 0 and o.ae_mask > 0  # the defaults corrupt
    ae = net.autoencoder
    with torch.no_grad():
        noisy = [float(lt.autoencoder_loss(o)(ae, (tokens, mask), torch.Generator().manual_seed(s)))
                 for s in (0, 1)]  # fmt: skip
        off = lt.autoencoder_loss(lt.LatentOptions(**{**vars(o), "ae_noise": 0.0, "ae_mask": 0.0}))
        clean = float(lt.reconstruction_nll(ae, tokens, mask, ae.encode(tokens)))
        assert float(off(ae, (tokens, mask), torch.Generator())) == pytest.approx(clean)
    assert noisy[0] != noisy[1] and min(noisy) > clean


# ---------------------------------------------------------------- the latent diffusion


class Recorder(torch.nn.Module):
    """A denoiser network returning ``0.5 x_t`` and recording every call."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x_t, c_noise, self_cond=None):
        self.calls.append((self_cond, torch.is_grad_enabled()))
        return 0.5 * x_t


def test_the_latent_loss_self_conditions_on_zeros_or_its_first_estimate():
    # One coin per batch (gaussian.self_conditioning.SelfConditionedTraining): zeros and one
    # trained call, or a first call without gradient whose estimate (0.5 x_t) the trained reads.
    net = Recorder()
    denoiser = Denoiser(net, cosine_logsnr(), "x0")
    z0 = torch.randn(8, 4, 8)
    generator = torch.Generator().manual_seed(0)
    counts = []
    for _ in range(20):
        net.calls.clear()
        lt.latent_diffusion_loss(denoiser, z0, self_condition=True, stratified=True,
                                 generator=generator)  # fmt: skip
        *first, (cond, grad) = net.calls
        assert grad
        if first:
            ((zeros, first_grad),) = first
            assert torch.equal(zeros, torch.zeros_like(zeros)) and not first_grad
            assert not torch.equal(cond, torch.zeros_like(cond))
        else:
            assert torch.equal(cond, torch.zeros_like(cond))
        counts.append(len(net.calls))
    assert set(counts) == {1, 2}
    net.calls.clear()
    plain = lt.latent_diffusion_loss(denoiser, z0, self_condition=False, stratified=True,
                                     generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert len(net.calls) == 1 and net.calls[0][0] is None and math.isfinite(float(plain))


def test_the_network_shapes_and_the_decoding_of_data_latents():
    ae = TextAutoencoder(11, 12, 3, 5, width=16, depth=1, num_heads=2)
    net = LatentTextNet(ae, EmbeddingTransformer(5, 3, width=16, depth=1, num_heads=2))
    tokens = torch.randint(11, (2, 12))
    net.latent_scale.fill_(2.5)
    z0 = net.data_latents(tokens)
    assert z0.shape == (2, 3, 5) and torch.allclose(z0 / 2.5, ae.encode(tokens))
    assert torch.allclose(net.decode(z0), ae.decode(ae.encode(tokens)), atol=1e-5)
    assert net(z0, torch.zeros(2)).shape == (2, 3, 5)
    with pytest.raises(ValueError, match="must divide"):
        TextAutoencoder(11, 12, 5, 5)


# ---------------------------------------------------------------- the kind end to end


def test_train_sample_and_eval_from_the_command_line(text_file, tmp_path, monkeypatch, capsys):
    common = [f"data.source={text_file}", "latent_text.ae_steps=3", "train.steps=2"]
    code, _, err = run(monkeypatch, capsys, "train", "text-tiny", "diffusion.kind=latent-text",
                       f"train.out={tmp_path / 'lt'}", *common)  # fmt: skip
    assert code == 0, err
    assert (tmp_path / "lt" / "autoencoder" / "checkpoint.safetensors").is_file()
    code, out, err = run(monkeypatch, capsys, "sample", str(tmp_path / "lt"), "--n", "3", "--steps",
                         "4", "--length", "20", "--out", str(tmp_path / "s"))  # fmt: skip
    assert code == 0, err
    texts = out.split("---\n")[1:]
    assert len(texts) == 3 and "3 samples" in out
    model = load(tmp_path / "lt", "cpu").model
    assert model.net.self_condition  # on by default
    tokens = lt.sample_tokens(model, 5, steps=4, sampler="dpm_solver", seed=1)
    assert tokens.shape == (5, 32) and int(tokens.max()) < model.tokenizer.vocab_size
    code, _, err = run(monkeypatch, capsys, "train", "text-tiny", "diffusion.kind=ar",
                       f"train.out={tmp_path / 'ar'}", f"data.source={text_file}",
                       "train.steps=2")  # fmt: skip
    assert code == 0, err
    code, out, err = run(monkeypatch, capsys, "eval", str(tmp_path / "lt"), "--n", "8",
                         "--judge", str(tmp_path / "ar"))  # fmt: skip
    assert code == 0, err
    for key in ("latent_loss", "reconstruction_exact", "distinct_2", "unigram_entropy",
                "gen_perplexity"):  # fmt: skip
        assert key in out


def test_self_conditioning_switches_off(text_file, tmp_path):
    RECIPE.train(tiny(text_file, tmp_path, "diffusion.self_condition=false"), progress=False)
    assert not load(tmp_path, "cpu").model.net.self_condition


def test_resume_continues_and_a_stage_left_behind_is_not_overwritten(text_file, tmp_path):
    cfg = tiny(text_file, tmp_path / "run")
    RECIPE.train(cfg, progress=False)
    (tmp_path / "run" / "checkpoint.safetensors").unlink()  # as if stopped after stage 1
    with pytest.raises(UserError, match="holds the autoencoder stage of an earlier run"):
        RECIPE.train(cfg, progress=False)
    result = RECIPE.train(cfg, resume=True, progress=False)
    assert result.steps == 2 and load(tmp_path / "run", "cpu").step == 2


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["latent_text.ae_steps=5"], "latent_text.ae_steps applies to diffusion.kind=latent-text"),
        (["diffusion.kind=latent-text", "latent_text.latents=5"], "must divide data.length=32"),
        (["diffusion.kind=latent-text", "latent_text.dim=1"], "latent_text.dim must be at least"),
        (["diffusion.kind=latent-text", "latent_text.ae_mask=1"], "ae_mask must be in"),
        (["diffusion.kind=latent-text", "latent_text.ae_noise=-1"], "ae_noise must be >= 0"),
        (["diffusion.kind=latent-text", "sample.clamp=true"], "sample.clamp does not apply"),
        (["diffusion.kind=latent-text", "diffusion.embed_dim=8"], "embed_dim does not apply"),
        (["diffusion.kind=latent-text", "diffusion.schedule=log-linear"], "diffusion.schedule"),
    ],
)
def test_bad_configs_are_refused(overrides, message):
    with pytest.raises(UserError, match=message):
        load_config("text-tiny", overrides)


def test_bad_requests_are_one_line_refusals(text_file, tmp_path, monkeypatch, capsys):
    RECIPE.train(tiny(text_file, tmp_path / "lt"), progress=False)
    _, mdlm = load_config("text-tiny", [f"data.source={text_file}", "train.steps=2",
                                        f"train.out={tmp_path / 'mdlm'}"])  # fmt: skip
    RECIPE.train(mdlm, progress=False)
    lt_run, mdlm_run = str(tmp_path / "lt"), str(tmp_path / "mdlm")
    for args, message in [
        (["sample", lt_run, "--prompt", "KING"], "--prompt does not apply to diffusion.kind=la"),
        (["sample", lt_run, "--clamp"], "--clamp does not apply to diffusion.kind=latent-text"),
        (["sample", lt_run, "--temperature", "0.5"], "--temperature does not apply"),
        (["sample", lt_run, "--sampler", "cached"], "--sampler must be one of ddim"),
        (["sample", lt_run, "--length", "33"], "--length must be at most the context (32"),
        (["sample", lt_run, "--control", "length=10"], "control applies to diffusion.kind=dif"),
        (["eval", mdlm_run, "--judge", lt_run], "--judge applies to diffusion.kind=latent-text"),
        (["eval", lt_run, "--judge", mdlm_run], "--judge must be an ar text run"),
    ]:
        before = sorted(p.name for p in (tmp_path / "lt").iterdir())
        code, _, err = run(monkeypatch, capsys, *args)
        assert code == 2 and err.count("\n") == 1 and err.startswith("difflab: error: "), err
        assert message in err, err
        assert sorted(p.name for p in (tmp_path / "lt").iterdir()) == before


def test_the_default_latents_divide_the_row():
    assert [lt.default_latents(n) for n in (32, 64, 30, 7, 2)] == [8, 16, 6, 1, 1]
    _, cfg = load_config("text-tiny", ["diffusion.kind=latent-text", "data.length=30"])
    assert lt.options(cfg).latents == 6 and cfg.latent_text.latents is None
    tokens = torch.randint(100, (2, 30))
    assert lt.build_net(cfg, 100).autoencoder.encode(tokens).shape == (2, 6, 16)


def test_a_run_saved_before_the_latent_text_section_resumes():
    """A checkpoint's config that lacks keys added since (the ``latent_text`` section) matches
    today's, whose keys are empty; a key given a value is still a difference."""
    from difflab.config import to_dict
    from difflab.train.trainer import _config_differences

    _, cfg = load_config("text-tiny", [])
    now = {"recipe": "text", "config": to_dict(cfg)}
    saved = {"recipe": "text", "config": {k: v for k, v in to_dict(cfg).items()
                                          if k != "latent_text"}}  # fmt: skip
    assert _config_differences(saved, now) == []
    now["config"]["latent_text"]["dim"] = 8
    assert _config_differences(saved, now) == [
        "latent_text.dim is absent in the checkpoint but 8 now"
    ]
