"""LoRA fine-tuning of text-to-image runs (issue 15): zero effect at initialisation, gradients
on the adapters only, merge and unmerge, adapters adding up as ``W + sum_i s_i (alpha_i / r_i)
B_i A_i`` computed by hand, peft's own ``merge_and_unload`` as the reference of ``difflab
merge``, the adapter file alone and its base, the command line end to end, and bad input."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_run import run
from peft import get_peft_model, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from test_text_to_image import TINY
from torch import nn

from difflab.data.glyphs import generate
from difflab.errors import UserError
from difflab.gaussian.objectives import make_objective
from difflab.nets.attention import CrossAttention, SelfAttention
from difflab.nets.unet import ResBlock
from difflab.recipes import finetune as ft
from difflab.recipes import load, load_config, train
from difflab.recipes import text_to_image as t2i

PROMPT, TOKEN, WORD = "a {} letter A", "<tt>", "mono"


def train_base(folder: Path, *extra: str) -> Path:
    train("glyphs-text", [*TINY, f"train.out={folder}", *extra], progress=False)
    return folder


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return train_base(tmp_path_factory.mktemp("base") / "run")


def concept_folder(folder: Path) -> Path:
    """``folder`` with six glyphs of the training split as PNG files."""
    for i, picture in enumerate(generate("train", 6, seed=5).images):
        Image.fromarray(np.asarray(picture)).save(folder / f"{i}.png")
    return folder


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return concept_folder(tmp_path_factory.mktemp("concept"))


def trained_adapter(base: Path, images: Path, out: Path, **options) -> Path:
    options = {"steps": 3, "init_word": WORD, "progress": False, "prompt": PROMPT, **options}
    return ft.finetune_lora(base, images=images, token=TOKEN, out=out, **options).path


def randomised(adapter: Path, out: Path, seed: int) -> Path:
    """``adapter`` with its ``B`` matrices drawn at random (a few training steps from ``B = 0``
    leave them tiny), metadata kept: an adapter whose update is far from zero."""
    g = torch.Generator().manual_seed(seed)
    with safe_open(str(adapter), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    for k, v in tensors.items():
        if "lora_B" in k:
            tensors[k] = torch.randn(v.shape, generator=g) * 0.3
    save_file(tensors, str(out), metadata=meta)
    return out


def inputs(n: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens = t2i.tokenize(["a mono letter A", "a red bold serif capital G", ""][:n])[0]
    return torch.randn(n, 3, 32, 32, generator=g), torch.rand(n, generator=g), tokens


def outputs(net: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return net(*inputs())


def attention_linears(net: nn.Module) -> dict[str, nn.Linear]:
    return {f"{name}.{child}": getattr(m, child) for name, m in net.named_modules()
            if isinstance(m, (SelfAttention, CrossAttention))
            for child in ("q", "kv", "qkv", "out") if hasattr(m, child)}  # fmt: skip


def residual_convolutions(net: nn.Module) -> dict[str, nn.Conv2d]:
    return {f"{name}.{conv}": getattr(m, conv) for name, m in net.named_modules()
            if isinstance(m, ResBlock) for conv in ("conv1", "conv2")}  # fmt: skip


# ------------------------------------------------------------------ the adapters themselves


def test_the_targets_name_the_attention_projections_of_unet_and_dit():
    for kind in (
        ["model.unet.channels=8", "model.unet.num_heads=2"],
        [
            "model.kind=dit",
            "model.unet=null",
            "model.dit.width=16",
            "model.dit.depth=2",
            "model.dit.num_heads=2",
            "model.dit.patch_size=4",
        ],
    ):
        _, cfg = load_config("glyphs-text", [*kind, "text_encoder.dim=16"])
        net = t2i.build_text_net(cfg, (3, 32, 32))
        every = set(attention_linears(net))
        attention = ft.parse_targets(ft.DEFAULT_TARGETS)
        assert every and set(ft.projection_names(net, attention)) == every
        convolutions = set(residual_convolutions(net))
        if convolutions:  # the U-Net: conv adds its residual blocks' 3x3 convolutions
            assert set(ft.projection_names(net, ft.TARGETS)) == every | convolutions
            assert all(m.kernel_size == (3, 3) for m in residual_convolutions(net).values())
        else:  # the DiT has none: conv is refused
            with pytest.raises(UserError, match="no convolutions"):
                ft.projection_names(net, ("q", "conv"))
        assert {n.rsplit(".", 1)[1] for n in ft.projection_names(net, ("q",))} == {"q"}
        assert {n.rsplit(".", 1)[1] for n in ft.projection_names(net, ("k", "v"))} == {"kv"}
        assert {n.rsplit(".", 1)[1] for n in ft.projection_names(net, ("out",))} == {"out"}
        # The text encoder's attention is never a target.
        assert not any(n.startswith("encoder.") for n in every)
    assert ft.parse_targets("out, q") == ("q", "out")
    for bad in ("q,x", "k", "v,out", ""):
        with pytest.raises(UserError):
            ft.parse_targets(bad)


def test_a_new_adapter_changes_nothing_and_only_it_receives_gradients(base):
    model = load(base, "cpu").model
    net = model.denoiser.net
    before = outputs(net)
    weights = {k: v.clone() for k, v in net.state_dict().items()}
    params = ft.add_lora(net, ft.TARGETS, rank=4, alpha=8.0, seed=0)
    layers = [m for m in net.modules() if isinstance(m, LoraLayer)]
    assert len(layers) == len(attention_linears(net)) + len(residual_convolutions(net))
    for layer in layers:  # A Gaussian with std 1/r, B zero, scale alpha / r
        a, b = layer.lora_A[ft.TRAINED].weight, layer.lora_B[ft.TRAINED].weight
        assert float(b.detach().abs().max()) == 0 and abs(float(a.detach().std()) - 1 / 4) < 0.1
        assert layer.scaling[ft.TRAINED] == 2.0
    assert torch.allclose(outputs(net), before, atol=1e-7, rtol=0)

    x0, _, tokens = inputs()
    objective = make_objective(model.config.diffusion.prediction)
    objective(model.denoiser, x0.clamp(-1, 1), {"tokens": tokens},
              torch.Generator().manual_seed(0)).backward()  # fmt: skip
    with_grad = {n for n, p in net.named_parameters() if p.grad is not None}
    assert with_grad == {n for n, p in net.named_parameters() if ".lora_" in n}
    assert {id(p) for p in params} == {id(p) for n, p in net.named_parameters() if ".lora_" in n}
    assert all(float(p.grad.abs().sum()) > 0 for n, p in net.named_parameters() if "lora_B" in n)
    assert ft.base_state(net).keys() == weights.keys()
    assert all(torch.equal(ft.base_state(net)[k], v) for k, v in weights.items())


def test_training_leaves_every_base_weight_bit_identical(base, images, tmp_path):
    adapter = trained_adapter(base, images, tmp_path / "a.safetensors", steps=4, lr=1e-2)
    fresh = load(base, "cpu").model.denoiser.net
    reference = {k: v.clone() for k, v in fresh.state_dict().items()}
    model = load(base, "cpu")
    ft.apply_adapters(model, [str(adapter)])
    state = ft.base_state(model.model.denoiser.net)
    assert all(torch.equal(state[k], v) for k, v in reference.items())
    # and the adapter did learn: its B matrices moved off zero
    with safe_open(str(adapter), framework="pt") as f:
        assert all(float(f.get_tensor(k).abs().max()) > 0 for k in f.keys() if "lora_B" in k)  # noqa: SIM118


def test_the_file_holds_the_adapter_alone_and_loads_into_a_fresh_base(base, images, tmp_path):
    adapter = trained_adapter(base, images, tmp_path / "a.safetensors", rank=2, targets="q,out")
    with safe_open(str(adapter), framework="pt") as f:
        meta, keys = f.metadata(), list(f.keys())
        tensors = {k: f.get_tensor(k) for k in keys}
    net = load(base, "cpu").model.denoiser.net
    names = ft.projection_names(net, ("q", "out"))
    assert sorted(keys) == sorted(f"{n}.lora_{m}.weight" for n in names for m in "AB")
    assert all(v.shape[0 if k.endswith("lora_A.weight") else 1] == 2 for k, v in tensors.items())
    assert meta["targets"] == "q,out" and meta["rank"] == "2" and meta["alpha"] == "2.0"
    assert (meta["token"], meta["word"]) == (TOKEN, WORD)
    assert json.loads(meta["captions"]) == [PROMPT] * 6
    assert meta["base"] == ft.weights_hash(net)
    assert adapter.stat().st_size < 0.2 * (base / "checkpoint.safetensors").stat().st_size

    loaded = load(base, "cpu")
    assert ft.apply_adapters(loaded, [str(adapter)]) == {TOKEN: WORD}
    inside = loaded.model.denoiser.net.state_dict()
    for k, v in tensors.items():
        name, part = k.split(".lora_")
        assert torch.equal(inside[f"{name}.lora_{part[0]}.adapter0.weight"], v)


def assert_same(got: torch.Tensor, want: torch.Tensor, plain: torch.Tensor) -> None:
    """``got == want`` to 1e-4 of what the adapters change (``want - plain``), which must
    itself be far above float32 rounding: a 3-step base's outputs are small (its output layer
    starts at zero), so absolute tolerances would say nothing."""
    change = float((want - plain).abs().max())
    assert change > 1e-4 * float(plain.abs().max()) and change > 1e-6
    assert float((got - want).abs().max()) < 1e-4 * change


def folded(base: Path, adapters: list[tuple[Path, float]]) -> nn.Module:
    """The base network with ``W + sum_i s_i (alpha_i / r_i) B_i A_i`` written into each target
    by hand, from the files' tensors."""
    net = load(base, "cpu").model.denoiser.net
    linears = dict(net.named_modules())
    with torch.no_grad():
        for path, scale in adapters:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata()
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
            factor = scale * float(meta["alpha"]) / int(meta["rank"])
            for k, a in tensors.items():
                if k.endswith("lora_A.weight"):
                    name = k[: -len(".lora_A.weight")]
                    b = tensors[f"{name}.lora_B.weight"]  # (out, r) or (out, r, 1, 1)
                    weight = linears[name].weight
                    weight += factor * (b.flatten(1) @ a.flatten(1)).view_as(weight)
    return net


def test_two_adapters_at_a_and_b_equal_the_base_with_both_updates_folded_in(base, images, tmp_path):
    one = randomised(trained_adapter(base, images, tmp_path / "1.safetensors", rank=4,
                                     alpha=8.0), tmp_path / "r1.safetensors", 1)  # fmt: skip
    two = randomised(
        trained_adapter(
            base, images, tmp_path / "2.safetensors", rank=2, targets="k,v,conv", seed=3
        ),
        tmp_path / "r2.safetensors",
        2,
    )
    a, b = 0.7, -0.4
    loaded = load(base, "cpu")
    ft.apply_adapters(loaded, [f"{one}:{a}", f"{two}:{b}"])
    on = outputs(loaded.model.denoiser.net)
    by_hand = outputs(folded(base, [(one, a), (two, b)]))
    plain = outputs(load(base, "cpu").model.denoiser.net)
    assert_same(on, by_hand, plain)
    # each alone is its own update
    alone = load(base, "cpu")
    ft.apply_adapters(alone, [f"{one}:{a}"])
    assert_same(outputs(alone.model.denoiser.net), outputs(folded(base, [(one, a)])), plain)


def test_merge_then_unmerge_restores_the_weights(base, images, tmp_path):
    adapter = randomised(trained_adapter(base, images, tmp_path / "a.safetensors",
                                         targets="q,k,v,out,conv"),
                         tmp_path / "r.safetensors", 0)  # fmt: skip
    loaded = load(base, "cpu")
    before = {k: v.clone() for k, v in ft.base_state(loaded.model.denoiser.net).items()}
    ft.apply_adapters(loaded, [f"{adapter}:1.5"])
    layers = [m for m in loaded.model.denoiser.net.modules() if isinstance(m, LoraLayer)]
    for layer in layers:
        layer.merge()
    merged = ft.base_state(loaded.model.denoiser.net)
    assert max(float((merged[k] - v).abs().max()) for k, v in before.items()) > 1e-2
    for layer in layers:
        layer.unmerge()
    after = ft.base_state(loaded.model.denoiser.net)
    assert max(float((after[k] - v).abs().max()) for k, v in before.items()) < 1e-6


def test_difflab_merge_equals_peft_merge_and_unload_and_samples_as_the_adapter(
    base, images, tmp_path
):
    adapter = randomised(trained_adapter(base, images, tmp_path / "a.safetensors", rank=3,
                                         targets="q,k,v,out,conv"),
                         tmp_path / "r.safetensors", 4)  # fmt: skip
    merged = ft.merge(base, [f"{adapter}:0.5"], tmp_path / "merged")
    mine = load(merged, "cpu").model.denoiser.net

    # The reference: peft's own PeftModel over a copy of the base, merged and unloaded.
    reference = copy.deepcopy(load(base, "cpu").model.denoiser.net)
    stored = ft.read_adapter(adapter)
    peft_model = get_peft_model(reference, stored.lora_config(reference), adapter_name="x")
    result = set_peft_model_state_dict(
        peft_model, {f"base_model.model.{k}": v for k, v in stored.tensors.items()}, "x"
    )
    assert not result.unexpected_keys
    for m in peft_model.modules():
        if isinstance(m, LoraLayer):
            m.set_scale("x", 0.5)
    unloaded = peft_model.merge_and_unload()
    want = unloaded.state_dict()
    got = mine.state_dict()
    assert got.keys() == want.keys()
    assert max(float((got[k] - want[k]).abs().max()) for k in want) < 1e-6

    # The merged run samples as the base with the adapter on.
    with_adapter = load(base, "cpu")
    ft.apply_adapters(with_adapter, [f"{adapter}:0.5"])
    x = with_adapter.sample(4, prompt="a mono letter A", seed=1).x
    y = load(merged, "cpu").sample(4, prompt="a mono letter A", seed=1).x
    assert_same(y, x, load(base, "cpu").sample(4, prompt="a mono letter A", seed=1).x)


# ------------------------------------------------------------------ the command line


def test_finetune_sample_and_merge_from_the_command_line(base, images, tmp_path, monkeypatch,
                                                         capsys):  # fmt: skip
    adapter = tmp_path / "tt.safetensors"
    code, out, err = run(monkeypatch, capsys, "finetune", str(base), "--method", "lora",
                         "--images", str(images), "--prompt", PROMPT, "--token", TOKEN,
                         "--init-word", WORD, "--rank", "4", "--targets", "q,k,v,out",
                         "--alpha", "4", "--steps", "3", "--lr", "1e-2", "--out", str(adapter),
                         "--quiet")  # fmt: skip
    assert code == 0, err
    assert "trained parameters" in out and adapter.is_file()
    strong = randomised(adapter, tmp_path / "strong.safetensors", 5)
    stem = tmp_path / "with"
    code, _, err = run(monkeypatch, capsys, "sample", str(base), "--adapter", f"{strong}:0.8",
                       "--prompt", "a <tt> letter A", "--n", "3", "--seed", "2", "--out",
                       str(stem))  # fmt: skip
    assert code == 0, err
    code, out, err = run(monkeypatch, capsys, "merge", str(base), "--adapter", f"{strong}:0.8",
                         "--out", str(tmp_path / "merged"))  # fmt: skip
    assert code == 0, err
    code, _, err = run(monkeypatch, capsys, "sample", str(tmp_path / "merged"), "--prompt",
                       "a mono letter A", "--n", "3", "--seed", "2", "--out",
                       str(tmp_path / "merged_samples"))  # fmt: skip
    assert code == 0, err
    with_adapter = np.load(stem.with_suffix(".npz"))["samples"]
    from_merged = np.load(tmp_path / "merged_samples.npz")["samples"]
    code, _, err = run(monkeypatch, capsys, "sample", str(base), "--prompt", "a mono letter A",
                       "--n", "3", "--seed", "2", "--out", str(tmp_path / "plain"))  # fmt: skip
    assert code == 0, err
    plain = np.load(tmp_path / "plain.npz")["samples"]
    assert_same(*(torch.from_numpy(a) for a in (from_merged, with_adapter, plain)))


# ------------------------------------------------------------------ bad input


@pytest.fixture(scope="module")
def other_bases(tmp_path_factory) -> tuple[Path, Path]:
    """A base of another architecture (text encoder of width 32) and one of the same
    architecture trained with another seed."""
    root = tmp_path_factory.mktemp("others")
    wider = train_base(root / "wider", "text_encoder.dim=32")
    reseeded = train_base(root / "reseeded", "train.seed=7")
    return wider, reseeded


def refused(monkeypatch, capsys, *args: str) -> str:
    code, out, err = run(monkeypatch, capsys, *args)
    assert code == 2, (out, err)
    assert err.startswith("difflab: error: ") and err.count("\n") == 1, err
    return err


def test_an_adapter_is_refused_on_another_base(base, images, other_bases, tmp_path, monkeypatch,
                                               capsys):  # fmt: skip
    adapter = trained_adapter(base, images, tmp_path / "a.safetensors")
    wider, reseeded = other_bases
    for other, why in ((wider, "another architecture"), (reseeded, "other weights")):
        for args in (["sample", str(other), "--adapter", str(adapter), "--n", "1",
                      "--out", str(tmp_path / "s")],
                     ["merge", str(other), "--adapter", str(adapter), "--out",
                      str(tmp_path / "m")]):  # fmt: skip
            assert why in refused(monkeypatch, capsys, *args)
    assert not (tmp_path / "s.npz").exists() and not (tmp_path / "m").exists()


def test_a_scale_that_is_not_a_number_is_refused(base, images, tmp_path, monkeypatch, capsys):
    adapter = trained_adapter(base, images, tmp_path / "a.safetensors")
    for scale in ("abc", "nan", "inf", ""):
        err = refused(monkeypatch, capsys, "sample", str(base), "--adapter", f"{adapter}:{scale}",
                      "--n", "1", "--out", str(tmp_path / "s"))  # fmt: skip
        assert "scale" in err
    assert ft.parse_scale(f"{adapter}:-0.25") == (adapter, -0.25)
    assert ft.parse_scale(str(adapter)) == (adapter, 1.0)
    assert not (tmp_path / "s.npz").exists()


def write_pictures(folder: Path, size: int, n: int = 2) -> Path:
    folder.mkdir()
    for i in range(n):
        Image.new("RGB", (size, size), (200, 10, 10)).save(folder / f"{i}.png")
    return folder


def test_bad_finetune_input_is_refused_in_one_line_and_nothing_is_written(
    base, images, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "a.safetensors"
    empty = tmp_path / "empty"
    empty.mkdir()
    unreadable = tmp_path / "unreadable"
    unreadable.mkdir()
    (unreadable / "0.png").write_bytes(b"not a png")
    large = write_pictures(tmp_path / "large", 64)
    args = ["finetune", str(base), "--prompt", PROMPT, "--token", TOKEN, "--init-word", WORD,
            "--steps", "1", "--out", str(out)]  # fmt: skip
    cases = [
        (["--images", str(empty)], "contains no images"),
        (["--images", str(tmp_path / "missing")], "does not exist"),
        (["--images", str(unreadable)], "cannot read image"),
        (["--images", str(large)], "64x64"),
        (["--images", str(images), "--method", "bogus"], "--method"),
        (["--images", str(images), "--targets", "k"], "k and v"),
        (["--images", str(images), "--rank", "0"], "rank"),
        (["--images", str(images), "--alpha", "-1"], "--alpha"),
        (["--images", str(images), "--prompt", "a letter A"], "{}"),
        (["--images", str(images), "--token", "two words"], "--token"),
        (["--images", str(images), "--init-word", "zebra"], "unknown words"),
    ]
    for extra, says in cases:
        assert says in refused(monkeypatch, capsys, *args, *extra), extra
    # an unknown token without the word it stands for; a known one with a needless word
    no_word = [a for a in args if a not in ("--init-word", WORD)]
    assert "--init-word" in refused(monkeypatch, capsys, *no_word, "--images", str(images))
    known = ["--images", str(images), "--token", "mono"]
    assert "does not apply" in refused(monkeypatch, capsys, *args, *known)
    assert "needs --images" in refused(monkeypatch, capsys, *args)
    assert not out.exists()
    # a known token needs no word
    code, _, err = run(monkeypatch, capsys, *no_word, "--images", str(images), "--token", "mono")
    assert code == 0, err
    assert ft.read_adapter(out).meta["word"] == ""


def test_bad_captions_files_are_refused(base, images, tmp_path, monkeypatch, capsys):
    out = tmp_path / "a.safetensors"
    args = ["finetune", str(base), "--token", TOKEN, "--init-word", WORD, "--steps", "1",
            "--out", str(out)]  # fmt: skip
    lines = [json.dumps({"file_name": f"{i}.png", "text": f"a red {{}} letter {c}"})
             for i, c in enumerate("ABCDEF")]  # fmt: skip
    cases = [
        (lines, ["--prompt", PROMPT], "--prompt does not apply"),
        (lines[1:], [], "no caption for 0.png"),
        ([*lines, lines[2]], [], "line 7: a second caption for 2.png"),
        (["{not json", *lines], [], "line 1: expected a JSON object"),
        ([json.dumps({"file_name": "0.png"}), *lines[1:]], [], "line 1"),
        ([json.dumps({"file_name": "0.png", "text": "a red letter A"}), *lines[1:]], [], "{}"),
        ([json.dumps({"file_name": "0.png", "text": "a zebra {} letter A"}), *lines[1:]], [],
         "unknown words"),
    ]  # fmt: skip
    for number, (listing, extra, says) in enumerate(cases):
        folder = tmp_path / f"c{number}"
        folder.mkdir()
        for picture in images.iterdir():
            (folder / picture.name).write_bytes(picture.read_bytes())
        (folder / ft.CAPTIONS).write_text("\n".join(listing) + "\n")
        assert says in refused(monkeypatch, capsys, *args, "--images", str(folder), *extra), says
    assert "give --prompt" in refused(monkeypatch, capsys, *args, "--images", str(images))
    assert not out.exists()


def test_bad_merge_and_adapter_files_are_refused(base, images, tmp_path, monkeypatch, capsys):
    adapter = trained_adapter(base, images, tmp_path / "a.safetensors")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "mine.txt").write_text("keep")
    assert "not an empty folder" in refused(monkeypatch, capsys, "merge", str(base), "--adapter",
                                            str(adapter), "--out", str(taken))  # fmt: skip
    assert (taken / "mine.txt").read_text() == "keep" and len(list(taken.iterdir())) == 1
    assert "needs --adapter" in refused(monkeypatch, capsys, "merge", str(base), "--out",
                                        str(tmp_path / "m"))  # fmt: skip
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    assert "not a difflab LoRA adapter" in refused(
        monkeypatch, capsys, "sample", str(base), "--adapter", str(foreign), "--n", "1"
    )
    assert "no adapter file" in refused(
        monkeypatch,
        capsys,
        "sample",
        str(base),
        "--adapter",
        str(tmp_path / "missing.safetensors"),
        "--n",
        "1",
    )


def test_lora_and_textual_inversion_read_a_caption_per_picture(base, images, tmp_path):
    """A ``metadata.jsonl`` giving every picture ``PROMPT`` trains the same file, tensor for
    tensor, as ``--prompt PROMPT``; giving them other captions, a different one."""

    def captioned(name: str, texts: list[str]) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        for picture in images.iterdir():
            (folder / picture.name).write_bytes(picture.read_bytes())
        lines = [json.dumps({"file_name": f"{i}.png", "text": t}) for i, t in enumerate(texts)]
        (folder / ft.CAPTIONS).write_text("\n".join(lines) + "\n")
        return folder

    def tensors(path: Path) -> dict[str, torch.Tensor]:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118

    same = captioned("same", [PROMPT] * 6)
    other = captioned("other", [f"a {c} {{}} letter A" for c in ("red", "blue") * 3])
    for fit in (
        lambda folder, prompt, out: trained_adapter(base, folder, out, prompt=prompt),
        lambda folder, prompt, out: ft.finetune_embedding(
            base, images=folder, prompt=prompt, token=TOKEN, init_word=WORD, out=out, steps=3,
            lr=0.1, progress=False).path,
    ):  # fmt: skip
        one = tensors(fit(images, PROMPT, tmp_path / "one.safetensors"))
        each = tensors(fit(same, None, tmp_path / "each.safetensors"))
        moved = tensors(fit(other, None, tmp_path / "other.safetensors"))
        assert one.keys() == each.keys() == moved.keys()
        assert all(torch.equal(one[k], each[k]) for k in one)
        assert any(not torch.equal(one[k], moved[k]) for k in one)
        for name in ("one", "each", "other"):
            (tmp_path / f"{name}.safetensors").unlink()


# ------------------------------------------------------------------ textual inversion


def test_textual_inversion_trains_its_new_row_alone(base, images, tmp_path):
    out = tmp_path / "tt.safetensors"
    result = ft.finetune_embedding(base, images=images, prompt=PROMPT, token=TOKEN,
                                   init_word=WORD, out=out, steps=4, lr=0.1,
                                   progress=False)  # fmt: skip
    plain = load(base, "cpu")
    before = {k: v.clone() for k, v in plain.model.denoiser.net.state_dict().items()}
    with safe_open(str(out), framework="pt") as f:
        meta, keys = f.metadata(), list(f.keys())
        (row,) = f.get_tensor("embedding")
    dim = before["encoder.words.weight"].shape[1]
    assert keys == ["embedding"] and row.shape == (dim,) and result.trainable == dim
    assert out.stat().st_size < 2048
    assert (meta["word"], meta["init_word"], meta["token"]) == ("tt", WORD, TOKEN)
    start = before["encoder.words.weight"][t2i.VOCAB.index(WORD)]
    assert float((row - start).abs().max()) > 1e-3  # the row learnt

    loaded = load(base, "cpu")
    ft.apply_embeddings(loaded, [out])
    state = loaded.model.denoiser.net.state_dict()
    assert state.keys() == before.keys()
    words = state["encoder.words.weight"]
    assert words.shape[0] == len(t2i.VOCAB) + 1 and torch.equal(words[-1], row)
    # Every other row, and every other weight, bit-identical to the base.
    assert torch.equal(words[:-1], before["encoder.words.weight"])
    assert all(torch.equal(state[k], v) for k, v in before.items() if k != "encoder.words.weight")
    # The base's outputs for prompts without the pseudo-word are unchanged, bit for bit.
    assert torch.equal(outputs(loaded.model.denoiser.net), outputs(plain.model.denoiser.net))
    # and with it, the new row is read
    x, c, _ = inputs()
    with_word = t2i.tokenize(["a red <tt> letter k"] * 3, ("tt",))[0]
    with_init = t2i.tokenize([f"a red {WORD} letter k"] * 3)[0]
    assert int(with_word[0, 2]) == len(t2i.VOCAB)
    with torch.no_grad():
        new = loaded.model.denoiser.net(x, c, with_word)
        old = plain.model.denoiser.net(x, c, with_init)
    assert float((new - old).abs().max()) > 0


def test_textual_inversion_with_several_vectors_trains_them_alone_and_apart(base, images, tmp_path):
    out = tmp_path / "tt3.safetensors"
    result = ft.finetune_embedding(base, images=images, prompt=PROMPT, token=TOKEN,
                                   init_word=WORD, out=out, vectors=3, steps=4, lr=0.1,
                                   progress=False)  # fmt: skip
    plain = load(base, "cpu")
    before = plain.model.denoiser.net.state_dict()
    meta, rows = ft.read_embedding(out)
    dim = before["encoder.words.weight"].shape[1]
    assert rows.shape == (3, dim) and result.trainable == 3 * dim and meta["vectors"] == "3"
    start = before["encoder.words.weight"][t2i.VOCAB.index(WORD)]
    # All three started as the init word's row; the position embeddings set them apart.
    assert all(float((r - start).abs().max()) > 1e-3 for r in rows)
    assert float((rows[0] - rows[1]).abs().max()) > 1e-4
    assert float((rows[1] - rows[2]).abs().max()) > 1e-4

    loaded = load(base, "cpu")
    ft.apply_embeddings(loaded, [out])
    words = loaded.model.denoiser.net.encoder.words.weight
    assert torch.equal(words[:-3], before["encoder.words.weight"]) and torch.equal(words[-3:], rows)
    assert loaded.model.added_words == ("tt",) * 3
    assert torch.equal(outputs(loaded.model.denoiser.net), outputs(plain.model.denoiser.net))
    # The prompt's token reads as the three rows: the same output as the rows put in by hand.
    x, c, _ = inputs()
    tokens = t2i.tokenize(["a red <tt> letter k"] * 3, loaded.model.added_words)[0]
    v = len(t2i.VOCAB)
    assert tokens[0, 2:5].tolist() == [v, v + 1, v + 2]
    by_hand, stand_in = copy.deepcopy(plain.model.denoiser.net), tokens.clone()
    ids = [t2i.VOCAB.index(w) for w in ("yellow", "purple", "pink")]  # words the prompt lacks
    stand_in[:, 2:5] = torch.tensor(ids)
    with torch.no_grad():
        by_hand.encoder.words.weight[ids] = rows
        torch.testing.assert_close(loaded.model.denoiser.net(x, c, tokens),
                                   by_hand(x, c, stand_in), rtol=0, atol=1e-6)  # fmt: skip


def test_textual_inversion_from_the_command_line_and_its_refusals(
    base, images, other_bases, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "tt.safetensors"
    args = ["finetune", str(base), "--method", "textual-inversion", "--images", str(images),
            "--prompt", PROMPT, "--steps", "2", "--out", str(out)]  # fmt: skip
    for extra, says in (
        (["--token", "mono", "--init-word", WORD], "knows already"),
        (["--token", "<v>", "--init-word", WORD], "at least two"),
        (["--token", TOKEN], "needs --init-word"),
        (["--token", TOKEN, "--init-word", "zebra"], "unknown words"),
        (["--token", TOKEN, "--init-word", WORD, "--rank", "2"], "--rank applies"),
        (["--token", TOKEN, "--init-word", WORD, "--targets", "q"], "--targets applies"),
        (["--token", TOKEN, "--init-word", WORD, "--vectors", "0"], "vectors must be"),
    ):
        assert says in refused(monkeypatch, capsys, *args, *extra), extra
    assert not out.exists()
    code, stdout, err = run(monkeypatch, capsys, *args, "--token", TOKEN, "--init-word", WORD,
                            "--quiet")  # fmt: skip
    assert code == 0, err
    assert "16 trained parameters" in stdout and out.is_file()
    prompt = ["--prompt", "a red <tt> letter k", "--n", "2", "--out", str(tmp_path / "s")]
    code, _, err = run(monkeypatch, capsys, "sample", str(base), "--embedding", str(out), *prompt)
    assert code == 0, err
    assert (tmp_path / "s.npz").is_file()
    # without the embedding the word is unknown; on another base the file is refused
    assert "unknown words" in refused(monkeypatch, capsys, "sample", str(base), *prompt)
    for other, why in zip(other_bases, ("another architecture", "other weights"), strict=True):
        assert why in refused(monkeypatch, capsys, "sample", str(other), "--embedding", str(out),
                              *prompt)  # fmt: skip
    lora = trained_adapter(base, images, tmp_path / "a.safetensors")
    assert "not a difflab textual-inversion file" in refused(
        monkeypatch, capsys, "sample", str(base), "--embedding", str(lora), *prompt
    )


def test_lora_over_a_textual_inversion_embedding(base, images, tmp_path, monkeypatch, capsys):
    """Pivotal tuning: the adapter trains with the token read as the embedding's rows (another
    embedding, another adapter; the rows themselves frozen: only the adapter's parameters
    train), records those rows, and samples only with them."""

    def inverted(name: str, steps: int) -> Path:
        return ft.finetune_embedding(base, images=images, prompt=PROMPT, token=TOKEN,
                                     init_word=WORD, out=tmp_path / name, steps=steps, lr=0.1,
                                     progress=False).path  # fmt: skip

    def adapted(name: str, **options) -> ft.FinetuneResult:
        return ft.finetune_lora(base, images=images, prompt=PROMPT, token=TOKEN, lr=0.05,
                                out=tmp_path / f"{name}.safetensors", steps=3, progress=False,
                                **options)  # fmt: skip

    emb, other_emb = inverted("tt.safetensors", 3), inverted("tt2.safetensors", 1)
    results = {"over": adapted("over", embeddings=[emb]),
               "over_other": adapted("over_other", embeddings=[other_emb]),
               "plain": adapted("plain", init_word=WORD)}  # fmt: skip
    adapters = {name: ft.read_adapter(result.path) for name, result in results.items()}
    assert results["over"].trainable == results["plain"].trainable  # the adapter alone trains
    meta = adapters["over"].meta
    assert meta["word"] == "" and json.loads(meta["embeddings"]) == {
        "tt": ft.rows_hash(ft.read_embedding(emb)[1])
    }
    assert json.loads(adapters["plain"].meta["embeddings"]) == {}
    for a, b in (("over", "over_other"), ("over", "plain")):  # the rows the token reads matter
        assert any(not torch.equal(adapters[a].tensors[k], adapters[b].tensors[k])
                   for k in adapters[a].tensors)  # fmt: skip
    with pytest.raises(UserError, match="does not apply"):
        adapted("x", init_word=WORD, embeddings=[emb])

    adapter = str(results["over"].path)
    prompt = ["--prompt", "a red <tt> letter A", "--n", "2", "--out", str(tmp_path / "s")]
    code, _, err = run(monkeypatch, capsys, "sample", str(base), "--embedding", str(emb),
                       "--adapter", adapter, *prompt)  # fmt: skip
    assert code == 0, err
    for given in ([], ["--embedding", str(other_emb)]):
        assert "give the --embedding file(s) it was trained with" in refused(
            monkeypatch, capsys, "sample", str(base), *given, "--adapter", adapter, *prompt
        )
    merged = tmp_path / "merged"
    assert "cannot hold" in refused(monkeypatch, capsys, "merge", str(base), "--adapter",
                                    adapter, "--out", str(merged))  # fmt: skip
    assert not merged.exists()
    inversion = ["finetune", str(base), "--method", "textual-inversion", "--images", str(images),
                 "--prompt", PROMPT, "--token", "<uu>", "--init-word", WORD,
                 "--out", str(tmp_path / "y.safetensors")]  # fmt: skip
    assert "--embedding applies to --method lora only" in refused(
        monkeypatch, capsys, *inversion, "--embedding", str(emb)
    )


# ------------------------------------------------------------------ DreamBooth

CLASS_PROMPT = "a letter A"


def test_class_pictures_come_from_the_frozen_base_with_the_same_seed(base):
    model = load(base, "cpu").model
    first, captions = ft.class_images(model, [CLASS_PROMPT], 3, seed=4)
    again, _ = ft.class_images(load(base, "cpu").model, [CLASS_PROMPT], 3, seed=4)
    assert torch.equal(first, again) and captions == [CLASS_PROMPT] * 3
    assert torch.equal(first, load(base, "cpu").sample(3, prompt=CLASS_PROMPT, seed=4).x)
    assert not torch.equal(first, ft.class_images(model, [CLASS_PROMPT], 3, seed=5)[0])
    # several class prompts share the pictures out in order, as `difflab sample` does
    prompts = [CLASS_PROMPT, "a red letter b", "a bold digit 3"]
    shared, captions = ft.class_images(model, prompts, 5, seed=4)
    assert captions == [CLASS_PROMPT, CLASS_PROMPT, "a red letter b", "a red letter b",
                        "a bold digit 3"]  # fmt: skip
    assert torch.equal(shared, load(base, "cpu").sample(5, prompt=prompts, seed=4).x)
    # drawn with the guidance asked for (0: the model's own conditional), else the run's
    plain, _ = ft.class_images(model, [CLASS_PROMPT], 3, seed=4, guidance=0)
    assert torch.equal(plain, load(base, "cpu").sample(3, prompt=CLASS_PROMPT, seed=4,
                                                       guidance=0).x)  # fmt: skip
    assert not torch.equal(plain, first)


def test_the_dreambooth_loss_is_its_two_terms_and_without_prior_plain_fine_tuning(base):
    model = load(base, "cpu").model
    objective = make_objective(model.config.diffusion.prediction)
    x, _, _ = inputs()
    x = x.clamp(-1, 1)
    instance = (x, t2i.tokenize(["a mono letter A"] * 3)[0])
    prior = (x.flip(0), t2i.tokenize([CLASS_PROMPT] * 3)[0])
    total, l_inst, l_prior = ft.dreambooth_loss(objective, model.denoiser, instance, prior, 0.7,
                                                torch.Generator().manual_seed(9))  # fmt: skip
    # the terms, each computed alone with the generator in the same state
    g = torch.Generator().manual_seed(9)
    want_inst = objective(model.denoiser, instance[0], {"tokens": instance[1]}, g)
    want_prior = objective(model.denoiser, prior[0], {"tokens": prior[1]}, g)
    assert torch.equal(l_inst, want_inst) and torch.equal(l_prior, want_prior)
    assert float(l_prior.detach()) > 0
    torch.testing.assert_close(total, want_inst + 0.7 * want_prior, rtol=1e-6, atol=0)
    # prior weight 0: exactly the instance loss, the plain fine-tuning objective
    plain, _, zero = ft.dreambooth_loss(objective, model.denoiser, instance, prior, 0.0,
                                        torch.Generator().manual_seed(9))  # fmt: skip
    assert torch.equal(plain, want_inst) and float(zero) == 0


def test_dreambooth_from_the_command_line(base, images, tmp_path, monkeypatch, capsys):
    out = tmp_path / "db"
    args = ["finetune", str(base), "--method", "dreambooth", "--images", str(images),
            "--prompt", PROMPT, "--token", "stix", "--steps", "2", "--out", str(out)]  # fmt: skip
    for extra, says in (
        (["--class-prompt", CLASS_PROMPT, "--prior-weight", "-1"], "--prior-weight"),
        (["--class-prompt", CLASS_PROMPT, "--num-class-images", "0"], "--num-class-images"),
        (["--class-prompt", "a zebra"], "does not know"),
        (
            ["--class-prompt", f"{CLASS_PROMPT}; a letter b", "--num-class-images", "1"],
            "fewer than the 2 class prompts",
        ),
        (["--class-prompt", " ; "], "--class-prompt has no caption"),
        (["--prompt", "{}"], "the identifier alone: give --class-prompt"),
        (["--class-prompt", CLASS_PROMPT, "--class-guidance", "-1"], "--class-guidance must be"),
        (["--prior-weight", "0", "--class-guidance", "0"], "--class-guidance applies with a prior"),
        (["--class-prompt", CLASS_PROMPT, "--targets", "q"], "give --rank too"),
        (["--class-prompt", CLASS_PROMPT, "--init-word", "mono"], "--init-word"),
    ):
        assert says in refused(monkeypatch, capsys, *args, *extra), extra
    assert "--class-guidance applies" in refused(
        monkeypatch, capsys, *[a if a != "dreambooth" else "textual-inversion" for a in args],
        "--class-guidance", "0", "--init-word", "mono",
    )  # fmt: skip
    assert "--class-prompt applies" in refused(
        monkeypatch, capsys, *[a if a != "dreambooth" else "lora" for a in args],
        "--class-prompt", CLASS_PROMPT, "--init-word", "mono",
    )  # fmt: skip
    unknown = [a if a != "stix" else TOKEN for a in args]
    assert "identifier" in refused(monkeypatch, capsys, *unknown, "--class-prompt", CLASS_PROMPT)
    assert not out.exists()
    code, _, err = run(monkeypatch, capsys, *args, "--class-prompt", CLASS_PROMPT,
                       "--num-class-images", "3", "--lr", "1e-3", "--quiet")  # fmt: skip
    assert code == 0, err
    tuned = load(out, "cpu").model.denoiser.net.state_dict()
    before = load(base, "cpu").model.denoiser.net.state_dict()
    assert tuned.keys() == before.keys()
    # the text encoder frozen, the denoiser tuned
    assert all(torch.equal(tuned[k], v) for k, v in before.items() if k.startswith("encoder."))
    assert any(not torch.equal(tuned[k], v) for k, v in before.items() if k.startswith("net."))
    code, _, err = run(monkeypatch, capsys, "sample", str(out), "--prompt", "a stix letter A",
                       "--n", "2", "--out", str(tmp_path / "s"))  # fmt: skip
    assert code == 0, err
    assert "not an empty folder" in refused(monkeypatch, capsys, *args, "--class-prompt",
                                            CLASS_PROMPT)  # fmt: skip
