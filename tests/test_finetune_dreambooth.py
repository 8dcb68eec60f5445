"""DreamBooth-LoRA and DreamBooth with the text encoder tuned (issue 15): one training step
against its oracle (AdamW's first step moves each trained parameter by ``-lr g / (|g| + eps)``
with ``g`` the gradient of ``L_instance + lambda L_prior`` computed here alone, and leaves every
other parameter as it was), the adapter file with the text encoder's adapters folded by hand,
merge, the command line and its refusals."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from cli_run import run
from safetensors import safe_open
from test_finetune import (
    CLASS_PROMPT,
    assert_same,
    concept_folder,
    folded,
    outputs,
    randomised,
    refused,
    train_base,
)

from difflab.gaussian.objectives import make_objective, sample_times
from difflab.recipes import finetune as ft
from difflab.recipes import load
from difflab.recipes import text_to_image as t2i
from difflab.recipes.autoencoder import encode_means
from difflab.train.checkpoint import load_checkpoint

PROMPT, IDENTIFIER = "a {} letter A", "stix"
LR, LAMBDA, CLASS_IMAGES, SEED = 1e-3, 0.6, 3, 2


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return train_base(tmp_path_factory.mktemp("base") / "run")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return concept_folder(tmp_path_factory.mktemp("concept"))


def one_step(base: Path, images: Path, out: Path, **options) -> ft.FinetuneResult:
    """One DreamBooth step on ``PROMPT`` with ``CLASS_PROMPT``'s prior, unless ``options``
    say otherwise."""
    options = {"prompt": PROMPT, "class_prompt": CLASS_PROMPT, "prior_weight": LAMBDA} | options
    return ft.finetune_dreambooth(base, images=images, token=IDENTIFIER, out=out,
                                  num_class_images=CLASS_IMAGES, steps=1,
                                  lr=LR, seed=SEED, progress=False, **options)  # fmt: skip


def oracle_gradients(
    base: Path, images: Path, lora: dict | None, text_encoder: bool, captions=None,
    class_prompts=(CLASS_PROMPT,),
):  # fmt: skip
    """The base network (with fresh adapters as ``finetune_dreambooth`` draws them when
    ``lora``), its parameters before the step, and the gradient of ``L_instance + lambda
    L_prior`` on the run's own objective, the class targets drawn by the frozen base for
    ``class_prompts`` (one or three: a picture each); the pictures captioned ``PROMPT`` or
    ``captions[i]`` each."""
    model = load(base, "cpu").model
    x_class, _ = ft.class_images(model, class_prompts, CLASS_IMAGES, SEED)
    x = in_model_space(model, ft.concept_images(images))
    net = model.denoiser.net
    if lora is not None:
        params = ft.add_lora(net, ft.parse_targets(lora["targets"]), lora["rank"],
                             float(lora["rank"]), SEED, text_encoder)  # fmt: skip
    else:
        net.requires_grad_(False)
        params = [*net.net.parameters(), *(net.encoder.parameters() if text_encoder else ())]
        for p in params:
            p.requires_grad_(True)
    before = {k: v.detach().clone() for k, v in net.state_dict().items()}
    objective = make_objective(model.config.diffusion.prediction, model.config.diffusion.weighting)
    captions = [PROMPT] * len(x) if captions is None else captions
    instance = (x, t2i.tokenize([c.format(IDENTIFIER) for c in captions])[0])
    per_picture = list(class_prompts) * (CLASS_IMAGES // len(class_prompts))
    prior = (x_class, t2i.tokenize(per_picture)[0])
    net.train()
    g = torch.Generator().manual_seed(SEED)
    l_instance = objective(model.denoiser, instance[0], {"tokens": instance[1]}, g)
    l_prior = objective(model.denoiser, prior[0], {"tokens": prior[1]}, g)
    (l_instance + LAMBDA * l_prior).backward()
    grads = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    assert {id(p) for p in params} == {id(p) for p in net.parameters() if p.grad is not None}
    return net, before, grads


def in_model_space(model: t2i.TextToImageModel, x: torch.Tensor) -> torch.Tensor:
    """Pictures as a run's denoiser learns them: themselves, or ``latent_scale * mu(x)``."""
    if model.autoencoder is None:
        return x
    with torch.no_grad():
        return encode_means(model.autoencoder.net, x) * model.autoencoder.latent_scale


def adam_first_step(before: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """AdamW's first step without weight decay: ``m_hat = g``, ``v_hat = g^2``."""
    return before - LR * grad / (grad.abs() + 1e-8)


def assert_took_the_step(out: Path, before: dict, grads: dict) -> None:
    """The run ``out`` is ``before`` moved by AdamW's first step on ``grads``."""
    tuned = load(out, "cpu").model.denoiser.net.state_dict()
    for name, g in grads.items():
        torch.testing.assert_close(tuned[name], adam_first_step(before[name], g), rtol=1e-4,
                                   atol=1e-10)  # fmt: skip


# ------------------------------------------------------------------ DreamBooth-LoRA


def test_dreambooth_lora_takes_the_two_term_loss_step_on_the_adapters_alone(base, images,
                                                                            tmp_path):  # fmt: skip
    for text_encoder in (False, True):
        out = tmp_path / f"db{text_encoder}.safetensors"
        result = one_step(base, images, out, rank=2, targets="q,k,v,out",
                          train_text_encoder=text_encoder)  # fmt: skip
        net, _, grads = oracle_gradients(base, images, {"rank": 2, "targets": "q,k,v,out"},
                                         text_encoder)  # fmt: skip
        # Only the adapters get gradients; the text encoder's only when asked for.
        assert grads and all(".lora_" in n for n in grads)
        on_encoder = {n for n in grads if n.startswith("encoder.")}
        adapted = {n.split(".lora_")[0] for n in on_encoder}
        assert adapted == (set(ft.encoder_projection_names(net)) if text_encoder else set())
        assert adapted or not text_encoder
        assert result.trainable == sum(g.numel() for g in grads.values())
        with safe_open(str(out), framework="pt") as f:
            meta = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        assert meta["method"] == "dreambooth-lora"
        assert meta["text_encoder"] == str(text_encoder).lower()
        assert (meta["token"], meta["word"], meta["prior_weight"]) == (IDENTIFIER, "", str(LAMBDA))
        assert tensors.keys() == {n.replace(f".{ft.TRAINED}.", ".") for n in grads}
        state = net.state_dict()
        for name, g in grads.items():
            want = adam_first_step(state[name].detach(), g)
            got = tensors[name.replace(f".{ft.TRAINED}.", ".")]
            if "lora_B" in name:  # B = 0 before; a 3-step base's gradients are small, but
                assert float(got.abs().max()) > 1e-3 * LR  # not lost in Adam's eps
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-10)


def test_a_dreambooth_lora_adapter_with_its_text_encoder_samples_and_merges_as_folded(
    base, images, tmp_path
):
    trained = one_step(base, images, tmp_path / "db.safetensors", rank=3, targets="q,out",
                       train_text_encoder=True).path  # fmt: skip
    adapter = randomised(trained, tmp_path / "r.safetensors", 3)
    assert any(k.startswith("encoder.") for k in ft.read_adapter(adapter).tensors)
    plain = outputs(load(base, "cpu").model.denoiser.net)
    loaded = load(base, "cpu")
    assert ft.apply_adapters(loaded, [f"{adapter}:0.7"]) == {}  # a known identifier: no word
    # outputs() runs without gradients in eval mode: the encoder's fused kernel path
    assert_same(outputs(loaded.model.denoiser.net), outputs(folded(base, [(adapter, 0.7)])), plain)
    # and the text encoder's own states are those of its hand-folded weights
    tokens = t2i.tokenize(["a stix letter A", "a red bold serif capital G"])[0]
    nets = (loaded.model.denoiser.net, folded(base, [(adapter, 0.7)]),
            load(base, "cpu").model.denoiser.net)  # fmt: skip
    with torch.no_grad():
        assert_same(*(net.encoder(tokens)[0] for net in nets))
    merged = ft.merge(base, [f"{adapter}:0.7"], tmp_path / "merged")
    prompt = dict(prompt="a stix letter A", seed=1)
    with_adapter = load(base, "cpu")
    ft.apply_adapters(with_adapter, [f"{adapter}:0.7"])
    assert_same(load(merged, "cpu").sample(3, **prompt).x, with_adapter.sample(3, **prompt).x,
                load(base, "cpu").sample(3, **prompt).x)  # fmt: skip


# ------------------------------------------------------------------ DreamBooth, text encoder tuned


def test_dreambooth_with_the_text_encoder_takes_the_step_on_denoiser_and_encoder(
    base, images, tmp_path
):
    out = one_step(base, images, tmp_path / "db", train_text_encoder=True).path
    net, before, grads = oracle_gradients(base, images, None, text_encoder=True)
    tuned = load(out, "cpu").model.denoiser.net.state_dict()
    assert tuned.keys() == before.keys()
    assert any(k.startswith("encoder.") for k in grads) and any(k.startswith("net.") for k in grads)
    for name, value in before.items():
        if name in grads:
            torch.testing.assert_close(tuned[name], adam_first_step(value, grads[name]),
                                       rtol=1e-4, atol=1e-10)  # fmt: skip
        else:  # buffers only
            assert torch.equal(tuned[name], value), name
    # without the flag the text encoder stays bit-identical (test_finetune's CLI test), and
    # every parameter of the network is either the denoiser's or the encoder's
    assert {n.split(".")[0] for n, _ in net.named_parameters()} == {"net", "encoder"}


def test_each_picture_trains_with_its_own_caption_from_metadata_jsonl(base, tmp_path):
    (tmp_path / "captioned").mkdir()
    images = concept_folder(tmp_path / "captioned")
    colours = ["red", "blue", "green", "white", "black", "pink"]
    captions = [f"a {c} {{}} letter A" for c in colours]
    with (images / ft.CAPTIONS).open("w") as f:  # lines out of order: matched by file name
        for i in reversed(range(len(colours))):
            f.write(json.dumps({"file_name": f"{i}.png", "text": captions[i]}) + "\n")
    out = one_step(base, images, tmp_path / "db", prompt=None).path
    _, before, grads = oracle_gradients(base, images, None, False, captions)
    _, _, one_caption = oracle_gradients(base, images, None, False)
    assert_took_the_step(out, before, grads)
    # the captions matter: one caption for all pictures takes another step
    assert any(not torch.allclose(grads[n], one_caption[n]) for n in grads)


def test_several_class_prompts_share_the_prior_pictures_out(base, images, tmp_path):
    prompts = (CLASS_PROMPT, "a red capital B on a white background", "a bold digit 3")
    out = one_step(base, images, tmp_path / "db", class_prompt=" ; ".join(prompts)).path
    _, before, grads = oracle_gradients(base, images, None, False, class_prompts=prompts)
    _, _, one_prompt = oracle_gradients(base, images, None, False)
    assert_took_the_step(out, before, grads)
    # the class captions matter: one class prompt for all the pictures takes another step
    assert any(not torch.allclose(grads[n], one_prompt[n]) for n in grads)
    assert load_checkpoint(out).extra["dreambooth"]["class_prompt"] == "; ".join(prompts)


def test_without_a_class_prompt_the_prior_is_the_training_captions_without_the_identifier(
    base, tmp_path
):
    assert ft.without_identifier(["a red {} letter  on a white background", "{} a letter",
                                  "a red {} letter on a white background"]) == [
        "a red letter on a white background", "a letter"]  # fmt: skip
    (tmp_path / "captioned").mkdir()
    images = concept_folder(tmp_path / "captioned")
    colours = ["red", "blue", "green"] * 2
    with (images / ft.CAPTIONS).open("w") as f:
        for i, colour in enumerate(colours):
            f.write(json.dumps({"file_name": f"{i}.png", "text": f"a {colour} {{}} letter A"})
                    + "\n")  # fmt: skip
    out = one_step(base, images, tmp_path / "db", prompt=None, class_prompt=None).path
    class_prompts = ("a red letter A", "a blue letter A", "a green letter A")
    captions = [f"a {colour} {{}} letter A" for colour in colours]
    _, before, grads = oracle_gradients(base, images, None, False, captions, class_prompts)
    assert_took_the_step(out, before, grads)
    assert load_checkpoint(out).extra["dreambooth"]["class_prompt"] == "; ".join(class_prompts)


# ------------------------------------------------------------------ the frozen run's prior


def test_the_frozen_prior_is_the_weighted_change_of_the_output_and_zero_before_any_step(base):
    model = load(base, "cpu").model
    x, captions = ft.class_images(model, [CLASS_PROMPT], CLASS_IMAGES, SEED)
    cond = {"tokens": t2i.tokenize(captions)[0]}
    denoiser, frozen = model.denoiser, copy.deepcopy(model.denoiser)
    assert denoiser.prediction == "eps"

    def prior(weighting: str) -> torch.Tensor:
        return ft.frozen_prior_loss(denoiser, frozen, x, cond, weighting,
                                    torch.Generator().manual_seed(SEED))  # fmt: skip

    # before the run moves: no loss and no gradient (the paper's target pulls at once)
    at_start = prior("simple")
    at_start.backward()
    frozen_grad = max(p.grad.abs().max() for p in denoiser.net.parameters())
    denoiser.net.zero_grad()
    objective = make_objective("eps", "simple")
    objective(denoiser, x, cond, torch.Generator().manual_seed(SEED)).backward()
    pictures_grad = max(p.grad.abs().max() for p in denoiser.net.parameters())
    assert at_start < 1e-10 and frozen_grad < 1e-6 * pictures_grad, (at_start, frozen_grad)
    # once it moves: w(lambda) ||eps_theta(x_t) - eps_frozen(x_t)||^2 / D at the objective's draws
    with torch.no_grad():
        for p in denoiser.net.parameters():
            p.add_(0.02 * torch.randn_like(p))
    g = torch.Generator().manual_seed(SEED)
    t = sample_times(denoiser.schedule, len(x), generator=g)
    eps = torch.randn(x.shape, generator=g)
    alpha, sigma = (c.float() for c in denoiser.schedule.alpha_sigma(t))
    x_t = alpha.view(-1, 1, 1, 1) * x + sigma.view(-1, 1, 1, 1) * eps
    with torch.no_grad():
        change = (denoiser(x_t, t, cond).eps - frozen(x_t, t, cond).eps).square().flatten(1)
        min_snr = (5 * sigma**2 / alpha**2).clamp(max=1)  # eps: w = min(1, 5 / SNR)
        for weighting, weight in (("simple", torch.ones_like(min_snr)), ("min-snr", min_snr)):
            expected = (weight * change.mean(1)).mean()
            assert expected > 1e-4
            torch.testing.assert_close(prior(weighting), expected, rtol=1e-4, atol=0)


def test_with_the_frozen_prior_the_first_step_is_the_instance_terms_alone(base, images, tmp_path):
    tuned = {}
    for name, options in (("frozen", {"prior_target": "frozen"}), ("none", {"prior_weight": 0}),
                          ("pictures", {})):  # fmt: skip
        out = one_step(base, images, tmp_path / name, **options).path
        tuned[name] = load(out, "cpu").model.denoiser.net.state_dict()
        assert load_checkpoint(out).extra["dreambooth"]["prior_target"] == options.get(
            "prior_target", "pictures")  # fmt: skip
    before = load(base, "cpu").model.denoiser.net.state_dict()

    def step(name: str) -> torch.Tensor:
        return torch.cat([(tuned[name][k] - v).flatten() for k, v in before.items()
                          if k.startswith("net.")])  # fmt: skip

    frozen, none, pictures = step("frozen"), step("none"), step("pictures")
    assert none.abs().max() > 0.99 * LR  # AdamW's first step: lr g / (|g| + 1e-8)
    # the frozen prior's gradient is nought at the start: the step is the instance term's
    assert (frozen - none).abs().max() < 1e-6 * LR
    assert (pictures - none).abs().max() > LR  # where the paper's prior turns a sign


def test_the_prior_target_is_refused_where_it_does_not_apply(base, images, tmp_path, monkeypatch,
                                                              capsys):  # fmt: skip
    out = tmp_path / "db"
    args = ["finetune", str(base), "--method", "dreambooth", "--images", str(images),
            "--prompt", PROMPT, "--token", IDENTIFIER, "--out", str(out)]  # fmt: skip
    for extra, says in (
        (["--prior-target", "teacher"], "--prior-target must be one of pictures, frozen"),
        (["--prior-target", "frozen", "--prior-weight", "0"], "applies with a prior weight"),
    ):
        assert says in refused(monkeypatch, capsys, *args, *extra), extra
    args[3] = "lora"
    err = refused(monkeypatch, capsys, *args, "--prior-target", "frozen")
    assert "--prior-target applies to --method dreambooth only" in err
    assert not out.exists()


# ------------------------------------------------------------------ the command line


def test_dreambooth_lora_from_the_command_line_and_its_refusals(base, images, tmp_path,
                                                                monkeypatch, capsys):  # fmt: skip
    out = tmp_path / "db.safetensors"
    args = ["finetune", str(base), "--method", "dreambooth", "--images", str(images),
            "--prompt", PROMPT, "--token", IDENTIFIER, "--class-prompt", CLASS_PROMPT,
            "--num-class-images", "2", "--steps", "2", "--out", str(out)]  # fmt: skip
    folder = tmp_path / "folder"
    folder.mkdir()
    for extra, says in (
        (["--targets", "q"], "give --rank too"),
        (["--alpha", "2"], "give --rank too"),
        (["--rank", "0"], "rank"),
        (["--rank", "2", "--targets", "k"], "k and v"),
        (["--rank", "2", "--alpha", "0"], "--alpha"),
        (["--rank", "2", "--out", str(folder)], "writes an adapter file"),
    ):
        assert says in refused(monkeypatch, capsys, *args, *extra), extra
    assert not out.exists() and not any(folder.iterdir())
    for method in ("lora", "textual-inversion"):
        other = ["finetune", str(base), "--method", method, "--images", str(images), "--prompt",
                 PROMPT, "--token", "<tt>", "--init-word", "mono", "--out", str(out),
                 "--train-text-encoder"]  # fmt: skip
        err = refused(monkeypatch, capsys, *other)
        assert "--train-text-encoder applies to --method dreambooth only" in err
    assert not out.exists()

    code, stdout, err = run(monkeypatch, capsys, *args, "--rank", "2", "--targets", "q,out",
                            "--train-text-encoder", "--quiet")  # fmt: skip
    assert code == 0, err
    assert "trained parameters" in stdout and out.is_file()
    meta = ft.read_adapter(out).meta
    assert (meta["method"], meta["targets"], meta["text_encoder"]) == ("dreambooth-lora", "q,out",
                                                                       "true")  # fmt: skip
    sample = ["--prompt", "a stix letter A", "--n", "2"]
    code, _, err = run(monkeypatch, capsys, "sample", str(base), "--adapter", f"{out}:0.5",
                       *sample, "--out", str(tmp_path / "s"))  # fmt: skip
    assert code == 0, err
    code, _, err = run(monkeypatch, capsys, "merge", str(base), "--adapter", str(out), "--out",
                       str(tmp_path / "merged"))  # fmt: skip
    assert code == 0, err
    # an embedding of the same base goes with it, though the adapter changed the text encoder
    word = tmp_path / "tt.safetensors"
    ft.finetune_embedding(base, images=images, prompt=PROMPT, token="<tt>", init_word="mono",
                          out=word, steps=1, progress=False)  # fmt: skip
    code, _, err = run(monkeypatch, capsys, "sample", str(base), "--adapter", str(out),
                       "--embedding", str(word), "--prompt", "a <tt> stix letter A", "--n", "2",
                       "--out", str(tmp_path / "both"))  # fmt: skip
    assert code == 0, err
    loaded = load(base, "cpu")
    ft.apply_embeddings(loaded, [word])
    ft.apply_adapters(loaded, [str(out)])  # in the other order too
    # plain DreamBooth with the text encoder: a run folder whose encoder moved
    code, _, err = run(monkeypatch, capsys, *args[:-1], str(tmp_path / "full"),
                       "--train-text-encoder", "--lr", "1e-3", "--quiet")  # fmt: skip
    assert code == 0, err
    tuned = load(tmp_path / "full", "cpu").model.denoiser.net.state_dict()
    before = load(base, "cpu").model.denoiser.net.state_dict()
    assert any(not torch.equal(tuned[k], v) for k, v in before.items() if k.startswith("encoder."))
