"""Text-to-image on glyphs: captions read back into the attributes that made them, attribute
dropout by Monte Carlo, the empty caption as the null condition, a seconds-long run from the
command line through U-Net and DiT, and bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from difflab import cli
from difflab.data.glyphs import CHARACTERS, GREEK, LATIN, caption, generate
from difflab.errors import UserError
from difflab.nets.text_encoder import TextConditionedNet, TextEncoder
from difflab.nets.unet import UNet
from difflab.recipes import load, load_config, run_metadata
from difflab.recipes import text_to_image as t2i

TINY = ["train.steps=3", "train.batch_size=8", "train.log_every=1", "train.ema=0",
        "model.unet.channels=8", "model.unet.num_heads=2", "text_encoder.dim=16",
        "text_encoder.depth=1", "text_encoder.num_heads=2", "sample.steps=2"]  # fmt: skip


def main(args: list[str]) -> int:
    """The command line's exit status for ``args``."""
    with pytest.raises(SystemExit) as info:
        cli.main(args)
    return info.value.code


@pytest.fixture(scope="module")
def glyphs():
    return generate("train", 400, seed=3)


def test_every_training_caption_tokenizes_and_parses_back_to_its_attributes(glyphs):
    captions = glyphs.captions()
    tokens, groups = t2i.tokenize(captions)
    assert tokens.shape == groups.shape == (len(captions), t2i.MAX_TOKENS)
    for i, text in enumerate(captions):
        row = glyphs.attribute_row(i)
        named = t2i.parse_prompt(text)
        want = {"character": int(glyphs.labels[i])} | {
            k: row[k] for k in ("family", "weight", "slant", "colour", "background")
        }
        assert named == want, text
        words = [t2i.VOCAB[j] for j in tokens[i] if j != t2i.PAD]
        assert words.count(f"char:{CHARACTERS[glyphs.labels[i]]}") == 1
        # The background phrase is one group; no other attribute word sits in it.
        on = words.index("on")
        assert (groups[i, on : len(words)] == t2i.GROUPS.index("background")).all()
        assert (groups[i, :on] != t2i.GROUPS.index("background")).all()


def test_characters_after_a_kind_word_are_characters_and_a_stays_an_article():
    tokens, _ = t2i.tokenize(["A red letter a on an orange background", "a blue q"])
    words = [[t2i.VOCAB[j] for j in row if j] for row in tokens]
    assert words[0] == ["a", "red", "letter", "char:a", "on", "a", "orange", "background"]
    assert words[1] == ["a", "blue", "char:q"]
    assert t2i.parse_prompt("a pale blue cm sans capital Q on a blue background") == {
        "character": LATIN.index("Q"), "family": 5, "weight": 0, "slant": 0, "colour": 8,
        "background": 4}  # fmt: skip
    for bad, reason in [("a typewriter letter q", "unknown words"),
                        (f"a Greek capital {GREEK[0]}", "unknown words"),
                        (" ".join(["red"] * 17), "at most 16")]:  # fmt: skip
        with pytest.raises(ValueError, match=reason):
            t2i.tokenize([bad])


def test_a_pseudo_word_of_several_vectors_reads_as_its_ids_in_a_row():
    v = len(t2i.VOCAB)
    added = ("tt", "om", "om", "om")  # "tt" one vector (id v), "om" three (v + 1 .. v + 3)
    tokens, groups = t2i.tokenize(["a red <om> letter on a <tt> background"], added)
    ids = [t2i.VOCAB.index(w) for w in ("a", "red")]
    ids += [v + 1, v + 2, v + 3, t2i.VOCAB.index("letter"), t2i.VOCAB.index("on"),
            t2i.VOCAB.index("a"), v, t2i.VOCAB.index("background")]  # fmt: skip
    assert tokens[0, : len(ids)].tolist() == ids and (tokens[0, len(ids) :] == t2i.PAD).all()
    colour = t2i.GROUPS.index("colour")
    assert groups[0, : len(ids)].tolist() == [0, colour, 0, 0, 0, 0, 6, 6, 6, 6]
    # The limit counts ids: 13 words and a word of three vectors are 16; one word more is not.
    t2i.tokenize([" ".join(["red"] * 13 + ["om"])], added)
    with pytest.raises(ValueError, match="17 words; at most 16"):
        t2i.tokenize([" ".join(["red"] * 14 + ["om"])], added)


def test_attribute_dropout_drops_each_group_at_its_rate_and_closes_the_gaps(glyphs):
    captions = glyphs.captions()
    tokens, groups = t2i.tokenize(captions)
    n, p = 20 * len(captions), 0.3
    tokens, groups = tokens.repeat(20, 1), groups.repeat(20, 1)
    dropped = t2i.drop_attributes(tokens, groups, p, torch.Generator().manual_seed(0))
    assert ((dropped != t2i.PAD).sum(1) <= (tokens != t2i.PAD).sum(1)).all()
    # Closed up: no word after a pad.
    is_pad = dropped == t2i.PAD
    assert not (is_pad[:, :-1] & ~is_pad[:, 1:]).any()
    # Kept words keep their order: the result is a subsequence of the caption.
    for i in range(0, n, 97):
        kept = [int(t) for t in dropped[i] if t]
        rest = iter(int(t) for t in tokens[i] if t)
        assert all(any(t == u for u in rest) for t in kept)
    for g, name in enumerate(t2i.GROUPS):
        present = (groups == g) & (tokens != t2i.PAD)
        has = present.any(1)
        first = present.float().argmax(1)
        word = tokens[torch.arange(n), first]
        still = (dropped == word[:, None]).any(1)[has]
        rate = 1 - float(still.double().mean())
        trials = int(has.sum())
        if name == "always":
            assert rate == 0
        elif name not in ("weight", "slant") or trials > 500:
            # 5 binomial standard deviations (an "a" or a colour word may also sit elsewhere)
            assert abs(rate - p) <= 5 * math.sqrt(p * (1 - p) / trials) + 0.02, (name, rate)


def test_legacy_unet_keys_load_into_the_text_conditioned_net():
    torch.manual_seed(0)

    def make() -> TextConditionedNet:
        unet = UNet(channels=8, channel_mults=(1,), attn_resolutions=(8,), num_heads=2,
                    context_dim=8)  # fmt: skip
        return TextConditionedNet(TextEncoder(5, 4, 8, 1, 2), unet)

    net = make()
    legacy = {k.replace("net.", "unet.", 1) if k.startswith("net.") else k: v
              for k, v in net.state_dict().items()}  # fmt: skip
    assert any(k.startswith("unet.") for k in legacy)
    other = make()
    other.load_state_dict(legacy)
    for k, v in net.state_dict().items():
        assert torch.equal(other.state_dict()[k], v)


@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_text_to_image_trains_samples_and_evaluates_from_the_command_line(
    tmp_path, capsys, kind, monkeypatch
):
    net = ["model.kind=dit", "model.unet=null", "model.dit.width=16", "model.dit.depth=1",
           "model.dit.num_heads=2", "model.dit.patch_size=4"] if kind == "dit" else []  # fmt: skip
    tiny = [a for a in TINY if not a.startswith("model.unet") or kind == "unet"]
    out = tmp_path / "run"
    assert main(["train", "glyphs-text", *tiny, *net, f"train.out={out}", "--quiet"]) == 0
    run = load(out, "cpu")
    assert run.recipe is t2i.RECIPE and run.step == 3
    prompts = ["a red capital G on a black background", "a green italic sans letter q"]
    x = run.sample(4, prompt=prompts, guidance=3.0, steps=2, seed=1).x
    assert x.shape == (4, 3, 32, 32) and torch.isfinite(x).all()
    assert torch.equal(x, run.sample(4, prompt=prompts, guidance=3.0, steps=2, seed=1).x)
    # The prompt reaches the samples (unclipped: 3 steps leave x_0 estimates far outside [-1, 1]).
    free = dict(guidance=3.0, steps=2, seed=1, threshold="none")
    other = run.sample(4, prompt="a blue digit 4", **free).x
    assert not torch.equal(run.sample(4, prompt=prompts, **free).x, other)
    stem = tmp_path / "s"
    code = main(["sample", str(out), "--prompt", "; ".join(prompts), "--n", "4", "--steps", "2",
                 "--guidance", "2", "--out", str(stem)])  # fmt: skip
    assert code == 0 and stem.with_suffix(".png").exists()
    with np.load(stem.with_suffix(".npz")) as f:
        assert f["samples"].shape == (4, 3, 32, 32)
    # A judge that reads every glyph as the first class of each head: adherence is then the share
    # of prompts naming those classes, exactly.
    monkeypatch.setattr(t2i, "load_glyphs_judge", lambda: FirstClassJudge())
    capsys.readouterr()
    assert main(["eval", str(out), "--n", "6", "--steps", "2"]) == 0
    printed = capsys.readouterr().out
    assert "prompt adherence on 6 test captions" in printed and "judged FD" in printed


class FirstClassJudge(torch.nn.Module):
    def predict(self, x):
        return {h: torch.zeros(len(x), dtype=torch.long) for h in t2i.GLYPHS_HEADS}

    def features(self, x):
        return x.flatten(1)[:, :8].double()


def test_prompt_adherence_counts_what_each_prompt_names():
    prompts = ["a black sans digit 0 on a white background",  # all first classes but background
               "a white bold italic mono capital A on a black background",
               "a digit 0"]  # fmt: skip
    got = t2i.prompt_adherence(FirstClassJudge(), torch.zeros(3, 3, 32, 32), prompts)
    # character 0 is "0": prompts 1 and 3 -> 2/3; family sans (0): 1 of the 2 naming one; weight
    # and slant always named: 2/3; colour black (0): 1/2; background black: 1/2.
    assert got == {"character": 2 / 3, "family": 0.5, "weight": 2 / 3, "slant": 2 / 3,
                   "colour": 0.5, "background": 0.5}  # fmt: skip


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "glyphs-text", "data.name=digits"], "trains on data.name=glyphs"),
        (["train", "glyphs-text", "data.held_out=0.1"], "data.held_out does not apply"),
        (["train", "glyphs-text", "model.kind=mlp", "model.unet=null"], "model.kind=unet or dit"),
        (["train", "glyphs-text", "text_encoder.num_heads=3"], "must divide text_encoder.dim"),
    ],
)
def test_bad_configs_are_one_line(args, message, capsys, tmp_path):
    assert main([*args, f"train.out={tmp_path / 'x'}", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("difflab: error: ") and message in err[0]
    assert not (tmp_path / "x").exists()


def test_bad_prompts_are_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    recipe, cfg = load_config("glyphs-text", [*TINY, "train.steps=1", f"train.out={out}"])
    recipe.train(cfg, progress=False)
    for args, message in [
        ([], "needs --prompt"),
        (["--prompt", " ; "], "--prompt holds no caption"),
        (["--prompt", "a typewriter capital G"], "unknown words ['typewriter']"),
        (["--prompt", "a red G", "--class", "3"], "--class"),
        (["--prompt", "a red G", "--guidance", "-1"], "guidance"),
    ]:
        assert main(["sample", str(out), "--n", "2", "--out", str(tmp_path / "s"), *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("difflab: error: ") and message in err[0], err
        assert not (tmp_path / "s.npz").exists()
    with pytest.raises(UserError, match="--n must be at most"):
        load(out, "cpu").evaluate(n=10_001)


def test_the_demo_prompts_are_known_captions():
    for prompt in t2i.DEMO_PROMPTS:
        assert len(t2i.parse_prompt(prompt)) == 6, prompt
    t2i.tokenize(list(t2i.DEMO_PROMPTS))
    assert caption(0, {"size": 0, "colour": 2, "weight": 1, "slant": 0, "family": 2,
                       "background": 8}).startswith("a small red bold serif digit 0")  # fmt: skip


def test_the_glyphs_demo_writes_a_grid_of_prompts_by_seeds(tmp_path, capsys, monkeypatch):
    prompts = ("a red capital G on a black background", "a blue digit 4")
    monkeypatch.setattr(t2i, "DEMO_PROMPTS", prompts)
    out = tmp_path / "demo"
    assert main(["demo", "--glyphs", "--steps", "2", "--quiet", "--out", str(out)]) == 0
    report = capsys.readouterr().out
    assert "row 1: a red capital G on a black background" in report
    from PIL import Image

    from difflab.viz.images import grid_array

    rows = grid_array(torch.zeros(16, 3, 32, 32), 8, 4).shape  # 2 rows of 8 seeds
    with Image.open(out / "prompts.png") as grid:
        assert grid.size == (rows[1], rows[0]) and rows[1] > 3 * rows[0]
    assert (out / "loss_curve.png").exists() and (out / "checkpoint.safetensors").exists()
    # a latent model, on the latents of the autoencoder the demo trained beside it
    meta = run_metadata(out)
    assert meta["autoencoder"] == str((out / "autoencoder").resolve())
    assert meta["latent_scale"] == run_metadata(out / "autoencoder")["latent_scale"]
    assert main(["demo", "--glyphs", "--steps", "2", "--quiet", "--out", str(out)]) == 0
    assert "holds other files" not in capsys.readouterr().out  # its own folder: run again there
    assert main(["demo", "--glyphs", "--text"]) == 2
    assert "choose one" in capsys.readouterr().err


def test_latent_text_to_image_draws_latents_and_decodes_them(tmp_path, capsys, monkeypatch):
    ae, out = tmp_path / "ae", tmp_path / "run"
    tiny_ae = ["autoencoder.channels=8", "autoencoder.latent_channels=4", "train.steps=2",
               "train.batch_size=8"]  # fmt: skip
    assert main(["train", "autoencoder", *tiny_ae, f"train.out={ae}", "--quiet"]) == 0
    assert main(["train", "glyphs-text", *TINY, f"latent.autoencoder={ae}", f"train.out={out}",
                 "--quiet"]) == 0  # fmt: skip
    run = load(out, "cpu")
    assert run.model.shape == run.model.autoencoder.latent_shape == (4, 8, 8)
    prompts = ["a red capital G on a black background", "a blue digit 4"]
    x = run.sample(4, prompt=prompts, steps=2, seed=1).x
    assert x.shape == (4, 3, 32, 32) and x.abs().max() <= 1
    # The pictures are D(z / latent_scale) of the latents the same sampler draws.
    pictures: list[torch.Tensor] = []
    run.sample(
        4, prompt=prompts, steps=2, seed=1, callback=lambda i, t, x_t, x0: pictures.append(x0)
    )
    assert pictures[-1].shape == (4, 3, 32, 32)
    latent_only = t2i.TextToImageModel(run.model.denoiser, run.model.config, run.model.shape, 3)
    z = run.recipe.sample(latent_only, 4, prompt=prompts, steps=2, seed=1, threshold="none").x
    assert z.shape == (4, 4, 8, 8)
    assert torch.allclose(x, t2i.decode(run.model.autoencoder, z), atol=1e-6)
    monkeypatch.setattr(t2i, "load_glyphs_judge", lambda: FirstClassJudge())
    capsys.readouterr()
    assert main(["eval", str(out), "--n", "6", "--steps", "2"]) == 0
    assert "prompt adherence on 6 test captions" in capsys.readouterr().out
    code = main(["sample", str(out), "--prompt", "a blue digit 4", "--threshold", "static",
                 "--out", str(tmp_path / "s")])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--threshold does not apply to latent runs" in err[0]
    assert not (tmp_path / "s.npz").exists()
    assert main(["train", "glyphs-text", f"latent.autoencoder={ae}", "sample.threshold=static",
                 f"train.out={tmp_path / 'x'}", "--quiet"]) == 2  # fmt: skip
    assert "sample.threshold does not apply to latent models" in capsys.readouterr().err
