"""Fine-tuning a latent text-to-image run (issue 15): every method trains on the concept's
pictures encoded by the run's autoencoder, ``z = latent_scale * mu(x)``, checked against one
AdamW step computed here on those latents; DreamBooth's class targets are the latents the frozen
run draws (their decoding is the run's own samples); adapters, embeddings and merged runs sample
decoded pictures."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_finetune import PROMPT, TOKEN, WORD, concept_folder, randomised
from test_finetune_dreambooth import CLASS_PROMPT, adam_first_step, one_step, oracle_gradients
from test_text_to_image import TINY

from difflab.gaussian.objectives import make_objective
from difflab.recipes import finetune as ft
from difflab.recipes import load, train
from difflab.recipes import text_to_image as t2i
from difflab.recipes.autoencoder import encode_means

LR, SEED = 1e-3, 4


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("latent")
    train("autoencoder", ["autoencoder.channels=8", "autoencoder.latent_channels=4",
                          "train.steps=2", "train.batch_size=8",
                          f"train.out={root / 'ae'}"], progress=False)  # fmt: skip
    train("glyphs-text", [*TINY, f"latent.autoencoder={root / 'ae'}", f"train.out={root / 'run'}"],
          progress=False)  # fmt: skip
    return root / "run"


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return concept_folder(tmp_path_factory.mktemp("concept"))


def latents(model: t2i.TextToImageModel, images: Path) -> torch.Tensor:
    ae = model.autoencoder
    with torch.no_grad():
        return encode_means(ae.net, ft.concept_images(images)) * ae.latent_scale


def test_lora_on_a_latent_run_learns_the_encoded_pictures(base, images, tmp_path):
    out = ft.finetune_lora(base, images=images, prompt=PROMPT, token=TOKEN, init_word=WORD,
                           out=tmp_path / "a.safetensors", steps=1, lr=LR, seed=SEED,
                           progress=False).path  # fmt: skip
    model = load(base, "cpu").model
    assert model.shape == (4, 8, 8)
    z = latents(model, images)
    net = model.denoiser.net
    ft.add_lora(net, ft.parse_targets(ft.DEFAULT_TARGETS), 4, 4.0, SEED)
    net.train()
    tokens = t2i.tokenize([PROMPT.format(WORD)])[0].expand(len(z), -1)
    objective = make_objective(model.config.diffusion.prediction, model.config.diffusion.weighting)
    objective(model.denoiser, z, {"tokens": tokens}, torch.Generator().manual_seed(SEED)).backward()
    stored = ft.read_adapter(out).tensors
    grads = {
        n.replace(f".{ft.TRAINED}.", "."): p
        for n, p in net.named_parameters()
        if p.grad is not None
    }
    assert stored.keys() == grads.keys()
    for name, p in grads.items():
        torch.testing.assert_close(stored[name], adam_first_step(p.detach(), p.grad),
                                   rtol=1e-4, atol=1e-10)  # fmt: skip
    assert any(float(stored[n].abs().max()) > 1e-3 * LR for n in stored if "lora_B" in n)
    # sampling with the adapter, and from the merged run, gives decoded pictures, the same ones
    strong = randomised(out, tmp_path / "strong.safetensors", 1)
    with_adapter = load(base, "cpu")
    ft.apply_adapters(with_adapter, [str(strong)])
    x = with_adapter.sample(3, prompt="a mono letter A", seed=1).x
    assert x.shape == (3, 3, 32, 32) and x.abs().max() <= 1
    merged = load(ft.merge(base, [str(strong)], tmp_path / "merged"), "cpu")
    assert merged.model.autoencoder is not None
    plain = load(base, "cpu").sample(3, prompt="a mono letter A", seed=1).x
    change = float((x - plain).abs().max())  # the decoder's float32 rounding is ~1e-6
    assert change > 1e-4
    merged_x = merged.sample(3, prompt="a mono letter A", seed=1).x
    assert float((merged_x - x).abs().max()) < 1e-3 * change


def test_textual_inversion_on_a_latent_run_learns_the_encoded_pictures(base, images, tmp_path):
    out = ft.finetune_embedding(base, images=images, prompt=PROMPT, token=TOKEN, init_word=WORD,
                                out=tmp_path / "tt.safetensors", steps=1, lr=LR, seed=SEED,
                                progress=False).path  # fmt: skip
    model = load(base, "cpu").model
    z = latents(model, images)
    start = model.denoiser.net.encoder.words.weight[t2i.VOCAB.index(WORD)].detach().clone()
    ft.add_rows(model, ["tt"], start[None])
    weight = model.denoiser.net.encoder.words.weight
    weight.requires_grad_(True)
    tokens = t2i.tokenize([PROMPT.format(TOKEN)], ("tt",))[0].expand(len(z), -1)
    objective = make_objective(model.config.diffusion.prediction, model.config.diffusion.weighting)
    objective(model.denoiser, z, {"tokens": tokens}, torch.Generator().manual_seed(SEED)).backward()
    _, (row,) = ft.read_embedding(out)
    grad = weight.grad[-1]
    assert float(grad.abs().max()) > 1e-9  # small on a 3-step base, but not zero
    torch.testing.assert_close(row, adam_first_step(start, grad), rtol=1e-4, atol=1e-10)
    loaded = load(base, "cpu")
    ft.apply_embeddings(loaded, [out])
    x = loaded.sample(2, prompt="a red <tt> letter k", seed=0).x
    assert x.shape == (2, 3, 32, 32) and x.abs().max() <= 1


def test_dreambooth_on_a_latent_run_keeps_to_latents(base, images, tmp_path):
    model = load(base, "cpu").model
    z_class, _ = ft.class_images(model, [CLASS_PROMPT], 3, seed=2)
    assert z_class.shape == (3, 4, 8, 8)  # latents, not decoded pictures
    pictures = load(base, "cpu").sample(3, prompt=CLASS_PROMPT, seed=2).x
    torch.testing.assert_close(t2i.decode(model.autoencoder, z_class), pictures, rtol=0, atol=1e-6)
    # DreamBooth-LoRA with the text encoder: the step of the two-term loss on the latents
    out = one_step(base, images, tmp_path / "db.safetensors", rank=2, targets="q,k,v,out",
                   train_text_encoder=True).path  # fmt: skip
    net, _, grads = oracle_gradients(base, images, {"rank": 2, "targets": "q,k,v,out"}, True)
    stored = ft.read_adapter(out).tensors
    state = net.state_dict()
    for name, g in grads.items():
        torch.testing.assert_close(stored[name.replace(f".{ft.TRAINED}.", ".")],
                                   adam_first_step(state[name], g), rtol=1e-4,
                                   atol=1e-10)  # fmt: skip
    # plain DreamBooth writes a latent run that samples decoded pictures
    full = one_step(base, images, tmp_path / "full").path
    tuned = load(full, "cpu")
    assert tuned.model.autoencoder is not None
    x = tuned.sample(2, prompt="a stix letter A", seed=0).x
    assert x.shape == (2, 3, 32, 32) and x.abs().max() <= 1
