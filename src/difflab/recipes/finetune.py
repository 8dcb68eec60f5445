"""Teaching a trained text-to-image run a new concept (seed 004, "Fine-tuning"): low-rank
adapters (LoRA; Hu et al. 2021), ``difflab finetune RUN --method lora``, ``difflab sample RUN
--adapter FILE[:SCALE]`` and ``difflab merge RUN --adapter FILE[:SCALE] --out MERGED``; and
textual inversion (Gal et al. 2022), ``difflab finetune RUN --method textual-inversion`` and
``difflab sample RUN --embedding FILE``: a new word in the text encoder's vocabulary whose row
alone is trained (see :func:`finetune_embedding`); and DreamBooth (Ruiz et al. 2023), ``difflab
finetune RUN --method dreambooth``: the whole denoiser (``--train-text-encoder``: and the text
encoder) tuned with the prior-preservation loss, or with ``--rank`` LoRA adapters trained with
that loss (DreamBooth-LoRA; see :func:`finetune_dreambooth`). All three work on latent runs
too: the concept's pictures are encoded to ``latent_scale * mu(x)`` first.

A LoRA adapter replaces each chosen linear map ``h = W x`` of the denoiser's attention by
``h = W x + (alpha / r) B A x`` with ``A`` ``(r, d_in)`` drawn from a Gaussian and ``B``
``(d_out, r)`` zero, so the first step changes nothing; only ``A`` and ``B`` train, ``W`` stays
frozen. Applied at scale ``s`` the update is ``s (alpha / r) B A``; several adapters add up,
``W + sum_i s_i (alpha_i / r_i) B_i A_i``, which is also what merging folds into the weights.
The layers are Hugging Face ``peft``'s (:func:`peft.inject_adapter_in_model` wraps any
``nn.Module``, as diffusers does); this module picks the targets, trains, and keeps the file.

Targets (``--targets``, any of ``q,k,v,out,conv``; default ``q,k,v,out``): the projections of
the U-Net's or DiT's attention blocks. The cross-attention computes ``q`` from the image and
``k, v`` from the caption in one ``kv`` map, so ``k`` and ``v`` are adapted together; the
self-attention computes ``q, k, v`` in one ``qkv`` map, adapted when all three are named;
``out`` is both blocks' output projection. ``conv`` adds the two 3x3 convolutions of each of a
U-Net's residual blocks (``A`` a 3x3 convolution down to ``r`` channels, ``B`` a 1x1 one back,
so ``B A`` is again a 3x3 kernel; a DiT has none): a new shape is more than attention can
carry.
The text encoder stays as it is, except in DreamBooth-LoRA with ``--train-text-encoder``,
which adapts its feed-forward maps too (:func:`encoder_projection_names` says why not its
attention).

The new token: LoRA changes the denoiser, not the vocabulary, so a token the run does not know
("<tt>") stands for a word it knows, ``--init-word`` ("mono"): the prompt is read with that word
in the token's place, and the adapter learns what the word now means. The adapter file records
the pair, and sampling with the adapter reads the token the same way. Or the token is a word of
its own: LoRA trained over textual-inversion embeddings (``--embedding``, pivotal tuning in the
order of Roich et al. 2022: invert first, then tune the network around the inverted code) reads
the captions with their learnt rows, frozen, and the adapter records which rows (a hash of
each), so that it samples only with the same ``--embedding``.

An adapter file is a safetensors file of the ``lora_A``/``lora_B`` tensors alone, with its
metadata: the method, the base run's architecture and a hash of its weights (an adapter is
refused on any other base), the targets, rank, alpha, whether the text encoder is adapted,
token, word and the training captions.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import re
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes
from torch import Tensor, nn
from tqdm import tqdm

from difflab.config import to_dict
from difflab.data.images import image_files, image_folder
from difflab.errors import UserError
from difflab.files import file_error, make_folder, write_bytes
from difflab.gaussian.objectives import loss_fn, make_objective, sample_times
from difflab.gaussian.parameterization import Denoiser
from difflab.gaussian.process import q_sample
from difflab.nets.attention import CrossAttention, SelfAttention
from difflab.nets.unet import ResBlock
from difflab.recipes import Run, finite, load, positive_int, seed_value
from difflab.recipes.autoencoder import encode_means
from difflab.recipes.text_to_image import RECIPE as TEXT_TO_IMAGE
from difflab.recipes.text_to_image import TextToImageModel, shared_out, tokenize
from difflab.train.checkpoint import (
    FILENAME,
    load_checkpoint,
    save_checkpoint,
    write_config_file,
)

METHODS = ("lora", "textual-inversion", "dreambooth")
TARGETS = ("q", "k", "v", "out", "conv")
#: ``--targets`` when not given: the attention projections.
DEFAULT_TARGETS = "q,k,v,out"
#: The ``format`` entry of an adapter file's metadata.
ADAPTER_FORMAT = "difflab-lora-1"
#: The ``format`` entry of a textual-inversion embedding file's metadata.
EMBEDDING_FORMAT = "difflab-embedding-1"
#: Concept images are glyph-sized RGB pictures.
IMAGE_SHAPE = (3, 32, 32)
#: The optional file of per-picture captions in a concept folder.
CAPTIONS = "metadata.jsonl"
DEFAULT_STEPS = 200
DEFAULT_LR = 1e-3
#: Textual inversion's learning rate when none is given (one row learns faster at a higher one).
DEFAULT_EMBEDDING_LR = 5e-3


# ================================================================================================
# Reading the user's choices
# ================================================================================================


def parse_targets(text: str) -> tuple[str, ...]:
    """The targets of ``--targets`` (comma-separated, in :data:`TARGETS`), in that order."""
    named = {t.strip() for t in text.split(",") if t.strip()}
    if not named or named - set(TARGETS):
        raise UserError(f"--targets must be a comma list of {', '.join(TARGETS)}, got {text!r}")
    if ("k" in named) != ("v" in named):
        raise UserError("--targets: the cross-attention computes k and v in one projection; "
                        "name both or neither")  # fmt: skip
    return tuple(t for t in TARGETS if t in named)


def projection_names(net: nn.Module, targets: Sequence[str]) -> list[str]:
    """The full names of the linear maps of ``net``'s attention blocks, and of the convolutions
    of its residual blocks, that ``targets`` name (see the module docstring); ``conv`` for a
    network without residual blocks (a DiT) is a :class:`UserError`."""
    convolutions = [f"{name}.{conv}" for name, module in net.named_modules()
                    if isinstance(module, ResBlock) for conv in ("conv1", "conv2")]  # fmt: skip
    if "conv" in targets and not convolutions:
        raise UserError("--targets conv: this run's denoiser has no convolutions (a DiT); name "
                        "its attention projections q,k,v,out")  # fmt: skip
    names = convolutions if "conv" in targets else []
    for name, module in net.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, CrossAttention):
            names += [prefix + "q"] if "q" in targets else []
            names += [prefix + "kv"] if "k" in targets else []
        elif isinstance(module, SelfAttention) and {"q", "k", "v"} <= set(targets):
            names.append(prefix + "qkv")
        if isinstance(module, (CrossAttention, SelfAttention)) and "out" in targets:
            names.append(prefix + "out")
    return names


def concept_images(folder: str | Path) -> Tensor:
    """The pictures of ``folder`` as ``(N, 3, 32, 32)`` in ``[-1, 1]``; a missing, empty or
    unreadable folder, or pictures of another size, is a one-line :class:`UserError`."""
    x = image_folder(folder, channels=3).x
    if tuple(x.shape[1:]) != IMAGE_SHAPE:
        raise UserError(f"the images in {folder} are {x.shape[3]}x{x.shape[2]}: the glyphs "
                        "model draws 32x32 RGB pictures")  # fmt: skip
    return x


def concept_captions(folder: str | Path, prompt: str | None) -> list[str]:
    """The caption of each picture of ``folder``, in :func:`concept_images`' order, ``{}``
    where the token goes: ``prompt`` for every picture, or, when the folder has a
    ``metadata.jsonl`` (the Hugging Face image-folder layout: one JSON object per line,
    ``{"file_name": "0.png", "text": "a red {} letter on a white background"}``), each
    picture's own. Captions that name what varies between the pictures (colours, weight) leave
    the token only what they share. Exactly one of the two must be there."""
    root = Path(folder)
    names = [f.relative_to(root).as_posix() for f in image_files(root)]
    listing = root / CAPTIONS
    if not listing.is_file():
        if prompt is None:
            raise UserError(f"give --prompt (the pictures' caption, {{}} where the token goes) "
                            f"or a caption per picture in {listing}")  # fmt: skip
        captions = [prompt] * len(names)
    elif prompt is not None:
        raise UserError(f"--prompt does not apply: the pictures in {root} have their own "
                        f"captions in {listing}")  # fmt: skip
    else:
        given = _read_captions(listing)
        captions = [given.get(name) for name in names]
        if None in captions:
            raise UserError(f"{listing} has no caption for {names[captions.index(None)]}")
    for caption in captions:
        if "{}" not in caption:
            raise UserError(f"a caption must hold {{}} where the token goes, e.g. 'a {{}} letter "
                            f"A'; got {caption!r}")  # fmt: skip
    return captions


def _read_captions(listing: Path) -> dict[str, str]:
    """``file_name -> text`` of a ``metadata.jsonl``; a malformed line is a :class:`UserError`."""
    captions: dict[str, str] = {}
    try:
        lines = listing.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise file_error(e, listing) from None
    except UnicodeDecodeError:
        raise UserError(f"{listing} is not UTF-8 text") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            entry = None
        if not (isinstance(entry, dict) and isinstance(entry.get("file_name"), str)
                and isinstance(entry.get("text"), str)):  # fmt: skip
            raise UserError(f"{listing}, line {number}: expected a JSON object with a "
                            "\"file_name\" and a \"text\" string")  # fmt: skip
        if entry["file_name"] in captions:
            raise UserError(f"{listing}, line {number}: a second caption for "
                            f"{entry['file_name']}")  # fmt: skip
        captions[entry["file_name"]] = entry["text"]
    return captions


def parse_scale(spec: str) -> tuple[Path, float]:
    """``ADAPTER[:SCALE]`` as ``(path, scale)`` (scale 1 when not given; a finite number)."""
    path, sep, scale = spec.rpartition(":")
    if not sep or Path(spec).exists():
        return Path(spec), 1.0
    try:
        value = float(scale)
    except ValueError:
        raise UserError(f"--adapter {spec!r}: the scale {scale!r} is not a number") from None
    if not math.isfinite(value):
        raise UserError(f"--adapter {spec!r}: the scale must be a finite number")
    return Path(path), value


def read_prompt(prompt: str, tokens: dict[str, str]) -> str:
    """``prompt`` with each adapter token replaced by the word it stands for."""
    for token, word in tokens.items():
        prompt = prompt.replace(token, word)
    return prompt


# ================================================================================================
# The base a file is for
# ================================================================================================


def architecture(model: TextToImageModel) -> str:
    """The base's architecture as JSON: image shape, network and text-encoder sections."""
    cfg = model.config
    arch = {"shape": list(model.shape), "model": to_dict(cfg.model),
            "text_encoder": to_dict(cfg.text_encoder)}  # fmt: skip
    return json.dumps(arch, sort_keys=True)


def weights_hash(net: nn.Module) -> str:
    """SHA-256 of the base network's weights (names, dtypes, shapes and values), adapters
    left out."""
    digest = hashlib.sha256()
    for name, tensor in sorted(base_state(net).items()):
        _add_tensor(digest, name, tensor)
    return digest.hexdigest()


def _add_tensor(digest: Any, name: str, tensor: Tensor) -> None:
    """Feed ``name``, dtype, shape and values of ``tensor`` to the hash ``digest``."""
    t = tensor.detach().cpu().contiguous().reshape(-1)
    digest.update(f"{name}:{t.dtype}:{tuple(tensor.shape)}".encode())
    digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def loaded_hash(net: nn.Module) -> str:
    """:func:`weights_hash` of the base ``net`` was loaded as, remembered once adapters or
    words are added (they change its weights: folded text-encoder adapters, new rows), so the
    files applied after them are checked against the base too."""
    return getattr(net, "difflab_base_hash", None) or weights_hash(net)


def base_state(net: nn.Module) -> dict[str, Tensor]:
    """``net``'s state without adapter tensors, under the names of the plain network (peft's
    ``x.base_layer.weight`` read as ``x.weight``); with merged adapters, the merged weights."""
    return {k.replace(".base_layer.", "."): v for k, v in net.state_dict().items()
            if ".lora_" not in k}  # fmt: skip


def text_to_image_run(path: str | Path, device: str) -> Run:
    run = load(path, device)
    if run.recipe is not TEXT_TO_IMAGE:
        raise UserError(f"{path} is a run of the {run.recipe.name} recipe: fine-tuning "
                        "applies to text-to-image runs")  # fmt: skip
    return run


# ================================================================================================
# Adapters on a network
# ================================================================================================


@dataclass
class Adapter:
    """An adapter file: its ``lora_A``/``lora_B`` tensors (peft's names without the adapter's
    name) and its metadata (strings)."""

    tensors: dict[str, Tensor]
    meta: dict[str, str]
    path: Path

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(self.meta["targets"].split(","))

    def lora_config(self, net: nn.Module) -> LoraConfig:
        return lora_config(net, self.targets, int(self.meta["rank"]), float(self.meta["alpha"]),
                           self.meta.get("text_encoder") == "true")  # fmt: skip


def encoder_projection_names(net: nn.Module) -> list[str]:
    """The full names of the text encoder's feed-forward maps (``linear1``, ``linear2`` of each
    layer): the linear maps of the encoder that an adapter can reach. Its attention is
    ``nn.MultiheadAttention``, which computes ``q, k, v`` and the output projection from its
    weight tensors inside ``F.multi_head_attention_forward`` without calling them as modules, so
    an adapter wrapped around them would never run."""
    return [f"{name}.{child}" for name, module in net.named_modules()
            if isinstance(module, nn.TransformerEncoderLayer)
            for child in ("linear1", "linear2")]  # fmt: skip


def lora_config(
    net: nn.Module, targets: Sequence[str], rank: int, alpha: float, text_encoder: bool = False
) -> LoraConfig:
    """peft's config of rank-``rank`` adapters on ``targets`` of ``net`` (and on the text
    encoder's feed-forward maps when ``text_encoder``): ``A`` Gaussian, ``B`` zero
    (``init_lora_weights="gaussian"``), scale ``alpha / rank``."""
    names = projection_names(net, targets)
    if not names:
        raise UserError("the network has no attention projection to adapt: its config has no "
                        "attention blocks")  # fmt: skip
    names += encoder_projection_names(net) if text_encoder else []
    return LoraConfig(r=rank, lora_alpha=alpha, target_modules=names, lora_dropout=0.0,
                      init_lora_weights="gaussian", bias="none")  # fmt: skip


def read_adapter(path: Path) -> Adapter:
    """The adapter file at ``path``; a missing, foreign or damaged file is a UserError."""
    if not path.is_file():
        raise UserError(f"no adapter file at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (no __iter__)
    except PermissionError as e:
        raise file_error(e, path) from None
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path} is not a readable adapter file: {e}") from None
    if meta.get("format") != ADAPTER_FORMAT:
        raise UserError(f"{path} is not a difflab LoRA adapter file")
    missing = {"targets", "rank", "alpha", "base", "architecture", "token", "word"} - set(meta)
    if missing:
        raise UserError(f"{path} has a damaged header: {', '.join(sorted(missing))} missing")
    return Adapter(tensors, meta, path)


def check_base(meta: dict[str, str], path: Path, model: TextToImageModel, base_hash: str) -> None:
    """Refuse a file (its ``meta``) made for another base: another architecture, or other
    weights."""
    if meta["architecture"] != architecture(model):
        raise UserError(f"{path} was made for a model of another architecture than this "
                        "run's")  # fmt: skip
    if meta["base"] != base_hash:
        raise UserError(f"{path} was made for other weights than this run's (another "
                        "training or step of the same architecture)")  # fmt: skip


def attach(net: nn.Module, adapters: Sequence[tuple[Adapter, float]]) -> None:
    """Wrap ``net``'s targets with the adapters at their scales, all active together (their
    updates add up), every parameter frozen. The text encoder's adapters are folded into its
    weights at once: in eval mode without gradients ``nn.TransformerEncoderLayer`` runs a fused
    kernel that reads ``linear1.weight`` and ``linear2.weight`` directly, past any wrapper."""
    for i, (adapter, _) in enumerate(adapters):
        with warnings.catch_warnings():  # several adapters in one network are what we want
            warnings.filterwarnings("ignore", "Already found a `peft_config`", UserWarning)
            inject_adapter_in_model(adapter.lora_config(net), net, adapter_name=f"adapter{i}")
        want = get_peft_model_state_dict(net, adapter_name=f"adapter{i}")
        shapes = {k: tuple(v.shape) for k, v in adapter.tensors.items()}
        if shapes != {k: tuple(v.shape) for k, v in want.items()}:
            raise UserError(f"{adapter.path} does not match this run's network (tensor names "
                            "or shapes differ)")  # fmt: skip
        set_peft_model_state_dict(net, adapter.tensors, adapter_name=f"adapter{i}")
    for module in net.modules():
        if isinstance(module, LoraLayer):
            names = [f"adapter{i}" for i in range(len(adapters)) if f"adapter{i}" in module.lora_A]
            module.set_adapter(names)
            for i, (_, scale) in enumerate(adapters):
                if f"adapter{i}" in module.lora_A:
                    module.set_scale(f"adapter{i}", scale)
    for module in net.encoder.modules():
        if isinstance(module, LoraLayer):
            module.merge(adapter_names=list(module.active_adapters))
    net.requires_grad_(False)


def apply_adapters(run: Run, specs: Sequence[str]) -> dict[str, str]:
    """Attach the adapters ``specs`` (``FILE[:SCALE]``) to the loaded text-to-image ``run``
    after checking each was made for it (and, if trained over embeddings, that those are
    applied already: :func:`apply_embeddings` first); returns what their tokens stand for."""
    if run.recipe is not TEXT_TO_IMAGE:
        raise UserError(f"--adapter applies to text-to-image runs, not to {run.recipe.name} runs")
    model: TextToImageModel = run.model
    net = model.denoiser.net
    base_hash = loaded_hash(net)
    adapters = []
    applied = getattr(net, "difflab_embeddings", {})
    for spec in specs:
        path, scale = parse_scale(spec)
        adapter = read_adapter(path)
        check_base(adapter.meta, path, model, base_hash)
        needed = json.loads(adapter.meta.get("embeddings", "{}"))
        if any(applied.get(word) != digest for word, digest in needed.items()):
            raise UserError(f"{path} was trained over the textual-inversion word(s) "
                            f"{', '.join(sorted(needed))}: give the --embedding file(s) it was "
                            "trained with")  # fmt: skip
        adapters.append((adapter, scale))
    attach(net, adapters)
    net.difflab_base_hash = base_hash
    return {a.meta["token"]: a.meta["word"] for a, _ in adapters if a.meta["word"]}


# ================================================================================================
# Training
# ================================================================================================


@dataclass
class FinetuneResult:
    path: Path
    steps: int
    seconds: float
    trainable: int
    base_params: int
    final_loss: float


#: The name of the adapter being trained inside the network.
TRAINED = "lora"


def add_lora(
    net: nn.Module,
    targets: Sequence[str],
    rank: int,
    alpha: float,
    seed: int,
    text_encoder: bool = False,
) -> list[nn.Parameter]:
    """Wrap ``net``'s ``targets`` (and the text encoder's feed-forward maps when
    ``text_encoder``) with a new adapter :data:`TRAINED` (``A ~ N(0, 1 / r^2)`` drawn with
    ``seed``, ``B = 0``), freeze every other parameter, and return the adapter's."""
    torch.manual_seed(seed)
    config = lora_config(net, targets, rank, alpha, text_encoder)
    inject_adapter_in_model(config, net, adapter_name=TRAINED)
    for name, p in net.named_parameters():
        p.requires_grad_(f".{TRAINED}." in name and ".lora_" in name)
    return [p for p in net.parameters() if p.requires_grad]


def caption_word(
    captions: Sequence[str], token: str, init_word: str | None, added: Sequence[str] = ()
) -> str:
    """The word the captions are read with in the token's place (see the module docstring);
    ``added``: the pseudo-words of the embeddings the captions are read with."""
    if not token or token.split() != [token] or "{}" in token:
        raise UserError(f"--token must be one word without spaces, got {token!r}")
    known = all(_tokenizes(caption.replace("{}", token), added) for caption in captions)
    if known and init_word is not None:
        raise UserError(f"--init-word does not apply: the run knows the token {token!r} "
                        "already")  # fmt: skip
    if known:
        return ""
    if init_word is None:
        raise UserError(f"the run does not know the token {token!r}: give --init-word, a word "
                        "it knows that the token stands for (LoRA adapts the denoiser, not "
                        "the vocabulary)")  # fmt: skip
    try:
        tokenize([caption.replace("{}", init_word) for caption in captions])
    except ValueError as e:
        raise UserError(str(e)) from None
    return init_word


def _tokenizes(text: str, added: Sequence[str] = ()) -> bool:
    try:
        tokenize([text], added)
    except ValueError:
        return False
    return True


def finetune_lora(
    run_path: str | Path,
    *,
    images: str | Path,
    prompt: str | None,
    token: str,
    out: str | Path,
    rank: int = 4,
    targets: str = DEFAULT_TARGETS,
    alpha: float | None = None,
    init_word: str | None = None,
    embeddings: Sequence[str | Path] = (),
    steps: int = DEFAULT_STEPS,
    lr: float = DEFAULT_LR,
    seed: int = 0,
    device: str = "auto",
    progress: bool = True,
) -> FinetuneResult:
    """Train a LoRA adapter of ``run_path``'s denoiser on the pictures of ``images`` captioned
    ``prompt`` or their own captions (:func:`concept_captions`) with ``token`` in the ``{}``,
    with the run's own objective (``alpha`` defaults to ``rank``: scale 1), then write it alone
    to ``out``; over the textual-inversion ``embeddings`` (their rows frozen) when given. Every
    input is checked before anything is written."""
    rank, steps, seed = positive_int("rank", rank), positive_int("steps", steps), seed_value(seed)
    alpha = float(rank if alpha is None else alpha)
    if not (math.isfinite(alpha) and alpha > 0) or not (math.isfinite(lr) and lr > 0):
        raise UserError("--alpha and --lr must be positive numbers")
    chosen = parse_targets(targets)
    out = Path(out)
    if out.is_dir():
        raise UserError(f"--out {out} is a folder: give the adapter file's name")
    pictures, captions = concept_images(images), concept_captions(images, prompt)
    word = caption_word(captions, token, init_word, embedding_words(embeddings))
    run = text_to_image_run(run_path, device)
    model: TextToImageModel = run.model
    net = model.denoiser.net
    base_params = sum(p.numel() for p in net.parameters())
    if embeddings:
        apply_embeddings(run, embeddings)
    x0 = _to_model_space(model, pictures.to(model.device))
    texts = [caption.replace("{}", word or token) for caption in captions]
    tokens = tokenize(texts, model.added_words)[0].to(model.device)
    base_hash = loaded_hash(net)
    params = add_lora(net, chosen, rank, alpha, seed)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    d = model.config.diffusion
    objective = make_objective(d.prediction, d.weighting)
    generator = torch.Generator(model.device).manual_seed(seed)
    start, loss = time.perf_counter(), torch.zeros(())
    net.train()
    for _ in tqdm(range(steps), desc="finetune (lora)", disable=not progress):
        loss = objective(model.denoiser, x0, {"tokens": tokens}, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    net.eval()
    seconds = time.perf_counter() - start
    meta = {"method": "lora", "base": base_hash, "architecture": architecture(model),
            "base_run": str(Path(run_path).resolve()), "base_step": str(model.step),
            "targets": ",".join(chosen), "rank": str(rank), "alpha": repr(alpha),
            "text_encoder": "false", "token": token, "word": word,
            "embeddings": json.dumps(getattr(net, "difflab_embeddings", {})),
            "captions": json.dumps(captions), "steps": str(steps), "lr": repr(lr),
            "images": str(len(x0))}  # fmt: skip
    write_adapter(net, out, meta)
    return FinetuneResult(out, steps, seconds, sum(p.numel() for p in params), base_params,
                          float(loss.detach()))  # fmt: skip


def write_adapter(net: nn.Module, out: Path, meta: dict[str, str]) -> None:
    """Write the trained adapter :data:`TRAINED` of ``net`` alone to ``out`` with ``meta``."""
    tensors = {
        k: v.detach().cpu().contiguous()
        for k, v in get_peft_model_state_dict(net, adapter_name=TRAINED).items()
    }
    if out.parent != Path():
        make_folder(out.parent)
    write_bytes(out, safetensors_bytes(tensors, metadata={"format": ADAPTER_FORMAT, **meta}))


# ================================================================================================
# Merging
# ================================================================================================


def merge(run_path: str | Path, specs: Sequence[str], out: str | Path) -> Path:
    """Fold the adapters ``specs`` at their scales into the run's weights,
    ``W <- W + sum_i s_i (alpha_i / r_i) B_i A_i``, and write an ordinary run folder ``out``
    (the run's config and step, the merged weights) that samples as the run with the adapters
    on. ``out`` must be new or empty."""
    out = new_folder(out)
    for spec in specs:
        path = parse_scale(spec)[0]
        if json.loads(read_adapter(path).meta.get("embeddings", "{}")):
            raise UserError(f"{path} was trained over textual-inversion words, which a merged "
                            "run's vocabulary cannot hold: sample RUN --embedding FILE "
                            "--adapter ADAPTER instead")  # fmt: skip
    run = text_to_image_run(run_path, "cpu")
    apply_adapters(run, specs)
    net = run.model.denoiser.net
    for module in net.modules():
        if isinstance(module, LoraLayer) and not module.merged:  # the encoder's are already
            module.merge(adapter_names=list(module.active_adapters))
    return write_run(run_path, base_state(net), out, {"merged_adapters": list(specs)})


def new_folder(out: str | Path) -> Path:
    """``out``, refused unless it is a new or empty folder."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out} exists and is not an empty folder: choose a new folder")
    return out


def write_run(run_path: str | Path, state: dict[str, Tensor], out: Path, extra: dict) -> Path:
    """An ordinary run folder ``out`` of ``run_path``'s config and step with the weights
    ``state`` (no optimizer state)."""
    ckpt = load_checkpoint(run_path)
    make_folder(out)
    save_checkpoint(out / FILENAME, config=ckpt.config, step=ckpt.step, model=state, ema=state,
                    optimizer=None, rng={}, extra=extra)  # fmt: skip
    write_config_file(out, ckpt.config)
    return out


# ================================================================================================
# Textual inversion
# ================================================================================================


def pseudo_word(token: str) -> str:
    """The word a textual-inversion token is read as (``"<tt>"`` -> ``"tt"``): one run of at
    least two letters or digits that the run's vocabulary does not hold."""
    parts = re.findall(r"[A-Za-z0-9]+", token)
    if len(parts) != 1 or len(parts[0]) < 2 or token.split() != [token]:
        raise UserError(f"--token must read as one new word of at least two letters or digits "
                        f"(such as <tt>), got {token!r}")  # fmt: skip
    if _tokenizes(parts[0]):
        raise UserError(f"the token {token!r} reads as {parts[0].lower()!r}, a word the run "
                        "knows already: textual inversion adds a new one")  # fmt: skip
    return parts[0].lower()


def word_id(word: str) -> int:
    """The vocabulary id of ``word``, a single word the run knows."""
    try:
        tokens = tokenize([word])[0][0]
    except ValueError as e:
        raise UserError(f"--init-word: {e}") from None
    if int((tokens != 0).sum()) != 1:
        raise UserError(f"--init-word must be one word of the vocabulary, got {word!r}")
    return int(tokens[0])


def add_rows(model: TextToImageModel, words: Sequence[str], rows: Tensor) -> None:
    """Append ``rows`` ``(k, dim)`` to the text encoder's word embeddings, row ``i`` a vector
    of the pseudo-word ``words[i]`` (ids ``V, V + 1, ...`` after the ``V`` the model has; a word
    given ``n`` times has ``n`` vectors, :func:`~difflab.recipes.text_to_image.tokenize`); every
    existing row is kept as it is."""
    encoder = model.denoiser.net.encoder
    old = encoder.words
    if rows.shape[1:] != old.weight.shape[1:]:
        raise UserError(f"the embedding has width {rows.shape[1]}, the run's text encoder "
                        f"{old.weight.shape[1]}")  # fmt: skip
    new = nn.Embedding(old.num_embeddings + len(rows), old.embedding_dim,
                       padding_idx=old.padding_idx)  # fmt: skip
    new = new.to(device=old.weight.device, dtype=old.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(torch.cat([old.weight, rows.to(old.weight)]))
    encoder.words = new
    model.added_words = (*model.added_words, *words)


def apply_embeddings(run: Run, paths: Sequence[str | Path]) -> None:
    """Add the pseudo-words of the embedding files ``paths`` to the loaded text-to-image
    ``run`` after checking each was made for it."""
    if run.recipe is not TEXT_TO_IMAGE:
        raise UserError(f"--embedding applies to text-to-image runs, not to {run.recipe.name} runs")
    model: TextToImageModel = run.model
    base_hash = loaded_hash(model.denoiser.net)
    net = model.denoiser.net
    words, rows, applied = [], [], dict(getattr(net, "difflab_embeddings", {}))
    for path in map(Path, paths):
        meta, vectors = read_embedding(path)
        check_base(meta, path, model, base_hash)
        if meta["word"] in words or meta["word"] in applied:
            raise UserError(f"two embeddings of the word {meta['word']!r}: give one")
        words += [meta["word"]] * len(vectors)
        rows.append(vectors)
        applied[meta["word"]] = rows_hash(vectors)
    add_rows(model, words, torch.cat(rows))
    net.requires_grad_(False)
    net.difflab_base_hash = base_hash
    net.difflab_embeddings = applied


def rows_hash(rows: Tensor) -> str:
    """SHA-256 of an embedding's rows (dtype, shape and values): which rows an adapter trained
    over them needs."""
    digest = hashlib.sha256()
    _add_tensor(digest, "embedding", rows)
    return digest.hexdigest()


def embedding_words(paths: Sequence[str | Path]) -> list[str]:
    """The pseudo-words of the embedding files ``paths``, one entry per row (as
    :func:`~difflab.recipes.text_to_image.tokenize` takes them)."""
    words = []
    for path in map(Path, paths):
        meta, vectors = read_embedding(path)
        words += [meta["word"]] * len(vectors)
    return words


def read_embedding(path: Path) -> tuple[dict[str, str], Tensor]:
    """The metadata and the vectors ``(k, dim)`` of a textual-inversion file (files written
    before multi-vector tokens hold their one vector as ``(dim,)``)."""
    if not path.is_file():
        raise UserError(f"no embedding file at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            row = f.get_tensor("embedding") if "embedding" in f.keys() else None  # noqa: SIM118
    except PermissionError as e:
        raise file_error(e, path) from None
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path} is not a readable embedding file: {e}") from None
    if meta.get("format") != EMBEDDING_FORMAT or row is None or row.ndim not in (1, 2):
        raise UserError(f"{path} is not a difflab textual-inversion file")
    if {"base", "architecture", "word", "token"} - set(meta):
        raise UserError(f"{path} has a damaged header")
    return meta, row.reshape(-1, row.shape[-1])


def finetune_embedding(
    run_path: str | Path,
    *,
    images: str | Path,
    prompt: str | None,
    token: str,
    init_word: str | None,
    out: str | Path,
    vectors: int = 1,
    steps: int = DEFAULT_STEPS,
    lr: float = DEFAULT_EMBEDDING_LR,
    seed: int = 0,
    device: str = "auto",
    progress: bool = True,
) -> FinetuneResult:
    """Textual inversion (Gal et al. 2022; seed 004): add ``token`` as a new row of the text
    encoder's vocabulary, initialised as ``init_word``'s row, and train that row alone (AdamW,
    no weight decay; the gradient of every other row is masked to zero, so they stay
    bit-identical) with the run's objective on the pictures of ``images`` captioned ``prompt``
    or their own captions (:func:`concept_captions`); write the row alone to ``out``.

    ``vectors = k > 1``: the token is ``k`` new rows, read as ``k`` words in a row wherever it
    appears (as the multi-vector variant of the diffusers example), all starting from
    ``init_word``'s row (the text encoder's position embeddings tell them apart, so they part
    as they train); ``out`` holds the ``(k, dim)`` rows."""
    steps, seed = positive_int("steps", steps), seed_value(seed)
    vectors = positive_int("vectors", vectors)
    if not (math.isfinite(lr) and lr > 0):
        raise UserError("--lr must be a positive number")
    pictures, captions = concept_images(images), concept_captions(images, prompt)
    word = pseudo_word(token)
    if init_word is None:
        raise UserError("textual inversion needs --init-word, the word the new row starts from")
    start_id = word_id(init_word)
    out = Path(out)
    if out.is_dir():
        raise UserError(f"--out {out} is a folder: give the embedding file's name")
    texts = [caption.replace("{}", token) for caption in captions]
    try:
        tokenize(texts, (word,) * vectors)
    except ValueError as e:
        raise UserError(str(e)) from None
    run = text_to_image_run(run_path, device)
    model: TextToImageModel = run.model
    x0 = _to_model_space(model, pictures.to(model.device))
    net = model.denoiser.net
    base_hash, base_params = weights_hash(net), sum(p.numel() for p in net.parameters())
    start_row = net.encoder.words.weight[start_id].detach()
    add_rows(model, [word] * vectors, start_row.expand(vectors, -1).clone())
    tokens = tokenize(texts, model.added_words)[0].to(model.device)
    net.requires_grad_(False)
    weight = net.encoder.words.weight
    weight.requires_grad_(True)
    new = slice(len(weight) - vectors, len(weight))
    only_new = torch.zeros_like(weight[:, :1])
    only_new[new] = 1
    weight.register_hook(lambda grad: grad * only_new)
    optimizer = torch.optim.AdamW([weight], lr=lr, weight_decay=0.0)
    d = model.config.diffusion
    objective = make_objective(d.prediction, d.weighting)
    generator = torch.Generator(model.device).manual_seed(seed)
    start, loss = time.perf_counter(), torch.zeros(())
    for _ in tqdm(range(steps), desc="finetune (textual inversion)", disable=not progress):
        loss = objective(model.denoiser, x0, {"tokens": tokens}, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    seconds = time.perf_counter() - start
    meta = {"format": EMBEDDING_FORMAT, "method": "textual-inversion", "base": base_hash,
            "architecture": architecture(model), "base_run": str(Path(run_path).resolve()),
            "base_step": str(model.step), "token": token, "word": word,
            "init_word": init_word, "captions": json.dumps(captions), "steps": str(steps),
            "lr": repr(lr), "images": str(len(x0)), "vectors": str(vectors)}  # fmt: skip
    rows = weight[new].detach().cpu().clone()
    if out.parent != Path():
        make_folder(out.parent)
    write_bytes(out, safetensors_bytes({"embedding": rows}, metadata=meta))
    return FinetuneResult(out, steps, seconds, rows.numel(), base_params, float(loss.detach()))


# ================================================================================================
# DreamBooth
# ================================================================================================

#: DreamBooth's learning rate when none is given (the whole denoiser trains).
DEFAULT_DREAMBOOTH_LR = 5e-5
#: What the prior term regresses the tuned denoiser on at a noisy class picture
#: (:func:`dreambooth_loss`): the picture itself, or the frozen run's own prediction there.
PRIOR_TARGETS = ("pictures", "frozen")


def class_images(
    model: TextToImageModel,
    class_prompts: Sequence[str],
    n: int,
    seed: int,
    guidance: float | None = None,
) -> tuple[Tensor, list[str]]:
    """The ``n`` prior-preservation targets ``x_class`` that the frozen base draws with
    ``seed`` and classifier-free ``guidance`` (its own sampling settings where ``None``) and
    their captions: ``class_prompts`` shared out in order, ``ceil(n / k)`` pictures each of the
    ``k``, as ``difflab sample`` shares them. The targets are in the space the denoiser learns:
    pictures, or for a latent run the latents it draws, not decoded (and encoded again). The
    same seed, the same targets."""
    captions = shared_out(class_prompts, n)
    latent = model.autoencoder is not None
    frozen = dataclasses.replace(model, autoencoder=None)
    with torch.no_grad():
        x = TEXT_TO_IMAGE.sample(frozen, n, prompt=captions, seed=seed, guidance=guidance,
                                 threshold="none" if latent else None).x  # fmt: skip
    return x, captions


def without_identifier(templates: Sequence[str]) -> list[str]:
    """DreamBooth's class captions where none is given: each distinct training caption without
    the identifier ("a red {} letter on a white background" -> "a red letter on a white
    background"), the instance prompt minus "[V]" as Ruiz et al. prompt the frozen model: the
    prior then covers every context the captions put the identifier in, the colour words as
    well as the class noun."""
    captions = dict.fromkeys(" ".join(template.replace("{}", " ").split())
                             for template in templates)  # fmt: skip
    if "" in captions:
        raise UserError("a caption is the identifier alone: give --class-prompt (the class "
                        "without the identifier, e.g. 'a letter A')")  # fmt: skip
    return list(captions)


def frozen_prior_loss(
    denoiser: Denoiser,
    frozen: Denoiser,
    x_class: Tensor,
    cond: dict[str, Any],
    weighting: str,
    generator: torch.Generator,
) -> Tensor:
    """The prior term with the frozen run's prediction as its target: ``t`` and ``eps`` drawn
    as the objective draws them, ``x_t = alpha_t x_class + sigma_t eps``, then the objective
    with the frozen run's estimates ``(x0_hat, eps_hat)`` at ``x_t`` in place of ``(x_class,
    eps)``. They make the same ``x_t`` (``alpha x0_hat + sigma eps_hat = x_t``), so the target
    is the frozen run's own output there and the term is ``w(lambda) c ||out_theta(x_t) -
    out_frozen(x_t)||^2 / D`` (objectives.py's notation): zero, with its gradient, until the
    tuned run moves, then the change of its function around the class pictures. The paper's
    target ``x_class`` pulls from the first step (its gradient there is the objective's on the
    class pictures), toward denoising those few pictures better than the frozen run does."""
    schedule = denoiser.schedule
    t = sample_times(schedule, x_class.shape[0], generator=generator, device=x_class.device)
    eps = torch.randn(x_class.shape, generator=generator, device=x_class.device,
                      dtype=x_class.dtype)  # fmt: skip
    with torch.no_grad():
        estimate = frozen(q_sample(schedule, x_class, t, eps), t, cond)
    return loss_fn(denoiser, estimate.x0, cond, weighting=weighting, t=t, eps=estimate.eps)


def dreambooth_loss(
    objective: Any,
    denoiser: Any,
    instance: tuple[Tensor, Tensor],
    prior: tuple[Tensor, Tensor] | None,
    prior_weight: float,
    generator: torch.Generator,
    frozen: tuple[Denoiser, str] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(L, L_instance, L_prior)`` with ``L = L_instance + lambda L_prior`` (Ruiz et al. 2023;
    seed 004): ``L_instance`` the run's objective on the concept pictures and their caption
    "a [V] <class>", ``L_prior`` the same objective on the class pictures ``x_class`` and the
    class caption (``lambda ||x_theta(z', c_class) - x_class||^2`` in the objective's
    weighting), or with ``frozen`` (the frozen run and the objective's weighting) the same at
    ``z'`` with the frozen run's prediction as the target (:func:`frozen_prior_loss`). The
    instance term draws its noise and times first; with ``lambda = 0`` (or no class pictures)
    the prior term is not computed and ``L`` is plain fine-tuning's loss."""
    x, tokens = instance
    l_instance = objective(denoiser, x, {"tokens": tokens}, generator)
    if prior is None or prior_weight == 0:
        return l_instance, l_instance, torch.zeros_like(l_instance)
    cond = {"tokens": prior[1]}
    if frozen is None:
        l_prior = objective(denoiser, prior[0], cond, generator)
    else:
        l_prior = frozen_prior_loss(denoiser, frozen[0], prior[0], cond, frozen[1], generator)
    return l_instance + prior_weight * l_prior, l_instance, l_prior


def finetune_dreambooth(
    run_path: str | Path,
    *,
    images: str | Path,
    prompt: str | None,
    token: str,
    out: str | Path,
    class_prompt: str | Sequence[str] | None = None,
    num_class_images: int = 16,
    class_guidance: float | None = None,
    prior_weight: float = 1.0,
    prior_target: str = "pictures",
    rank: int | None = None,
    targets: str | None = None,
    alpha: float | None = None,
    train_text_encoder: bool = False,
    steps: int = DEFAULT_STEPS,
    lr: float | None = None,
    seed: int = 0,
    device: str = "auto",
    progress: bool = True,
) -> FinetuneResult:
    """DreamBooth: tune ``run_path``'s denoiser on the pictures of ``images`` captioned
    ``prompt`` or their own captions (:func:`concept_captions`) with the identifier ``token``
    (a word the run knows, rarely used, as the paper's rare tokens) in the ``{}``, with the
    class-specific prior-preservation loss on ``num_class_images`` targets the frozen run first
    draws for ``class_prompt`` (:func:`dreambooth_loss`); several class captions (separated by
    ``;``, or a list) share the targets out (:func:`class_images`), a prior over the variety
    the class shows (its colours, weights, sizes) rather than over one caption; without
    ``class_prompt`` the training captions without the identifier do
    (:func:`without_identifier`). The targets are drawn with ``class_guidance`` (the run's own
    default where ``None``): at 0, samples of the model's conditional ``p(x | c_class)``
    itself, which the prior term then keeps; with guidance, of the sharper guided
    distribution, which it then teaches. ``prior_target`` ``"pictures"`` is the paper's prior
    term; ``"frozen"`` regresses on the frozen run's prediction at the noisy class pictures
    instead (:func:`frozen_prior_loss`).

    Without ``rank`` the whole denoiser trains (with ``train_text_encoder`` the whole text
    encoder too) and ``out`` is a new run folder. With ``rank`` (DreamBooth-LoRA) only rank-
    ``rank`` adapters on ``targets`` train (with ``train_text_encoder`` adapters on the text
    encoder's feed-forward maps too, :func:`encoder_projection_names`), the base frozen, and
    ``out`` is an adapter file as ``finetune_lora`` writes, for ``--adapter`` and ``merge``.
    Every input is checked before anything is written."""
    steps, seed = positive_int("steps", steps), seed_value(seed)
    lora = rank is not None
    if not lora and (targets is not None or alpha is not None):
        raise UserError("--targets and --alpha apply to DreamBooth-LoRA: give --rank too")
    if lora:
        rank = positive_int("rank", rank)
        alpha = float(rank if alpha is None else alpha)
        if not (math.isfinite(alpha) and alpha > 0):
            raise UserError("--alpha must be a positive number")
        chosen = parse_targets(DEFAULT_TARGETS if targets is None else targets)
    lr = (DEFAULT_LR if lora else DEFAULT_DREAMBOOTH_LR) if lr is None else lr
    if not (math.isfinite(lr) and lr > 0):
        raise UserError("--lr must be a positive number")
    if not (math.isfinite(prior_weight) and prior_weight >= 0):
        raise UserError(f"--prior-weight must be a number >= 0, got {prior_weight}")
    if prior_target not in PRIOR_TARGETS:
        raise UserError(f"--prior-target must be one of {', '.join(PRIOR_TARGETS)}, got "
                        f"{prior_target!r}")  # fmt: skip
    x_instance, templates = concept_images(images), concept_captions(images, prompt)
    if isinstance(class_prompt, str):
        class_prompt = class_prompt.split(";")
    class_prompts = [text.strip() for text in class_prompt or () if text.strip()]
    if class_prompt is not None and not class_prompts:
        raise UserError("--class-prompt has no caption: give one, or leave it out for the "
                        "training captions without the identifier")  # fmt: skip
    for option, given in (("--class-guidance", class_guidance is not None),
                          ("--prior-target", prior_target != "pictures")):  # fmt: skip
        if prior_weight == 0 and given:
            raise UserError(f"{option} applies with a prior weight above 0: without the prior "
                            f"term no class picture is drawn")  # fmt: skip
    if prior_weight > 0:
        positive_int("num_class_images", num_class_images)
        class_prompts = class_prompts or without_identifier(templates)
        if class_guidance is not None:
            finite("class_guidance", class_guidance, 0.0)
        if num_class_images < len(class_prompts):
            raise UserError(f"--num-class-images {num_class_images} is fewer than the "
                            f"{len(class_prompts)} class prompts: each needs a "
                            f"picture")  # fmt: skip
    captions = [template.replace("{}", token) for template in templates]
    if token.split() != [token] or not _tokenizes(token):
        raise UserError(f"DreamBooth's identifier must be one word the run knows (it tunes the "
                        f"denoiser, not the vocabulary), got {token!r}")  # fmt: skip
    for text in (*captions, *class_prompts):
        if not _tokenizes(text):
            raise UserError(f"the caption {text!r} has words the run does not know")
    if lora:
        out = Path(out)
        if out.is_dir():
            raise UserError(f"--out {out} is a folder: DreamBooth-LoRA writes an adapter file")
    else:
        out = new_folder(out)
    run = text_to_image_run(run_path, device)
    model: TextToImageModel = run.model
    d = model.config.diffusion
    if prior_target == "frozen" and d.prediction == "edm":
        raise UserError("--prior-target frozen applies to eps, x0, v, score and flow runs, not "
                        "to an edm run (its loss draws its own noise levels)")  # fmt: skip
    x_instance = x_instance.to(model.device)
    prior = None
    if prior_weight > 0:
        x_class, class_captions = class_images(model, class_prompts, num_class_images, seed,
                                               class_guidance)  # fmt: skip
        prior = (x_class.to(model.device), tokenize(class_captions)[0].to(model.device))
    instance = (_to_model_space(model, x_instance), tokenize(captions)[0].to(model.device))
    net = model.denoiser.net
    base_hash, base_params = weights_hash(net), sum(p.numel() for p in net.parameters())
    frozen = None
    if prior is not None and prior_target == "frozen":  # a copy of the run as it is before any step
        frozen = (copy.deepcopy(model.denoiser), d.weighting)
        frozen[0].net.requires_grad_(False)
    if lora:
        params = add_lora(net, chosen, rank, alpha, seed, train_text_encoder)
    else:
        net.requires_grad_(False)
        tuned = [net.net, net.encoder] if train_text_encoder else [net.net]
        params = [p for module in tuned for p in module.parameters()]
        for p in params:
            p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    objective = make_objective(d.prediction, d.weighting)
    generator = torch.Generator(model.device).manual_seed(seed)
    start, loss = time.perf_counter(), torch.zeros(())
    net.train()  # (no dropout anywhere; and no fused encoder kernel that would skip adapters)
    for _ in tqdm(range(steps), desc="finetune (dreambooth)", disable=not progress):
        loss = dreambooth_loss(objective, model.denoiser, instance, prior, prior_weight,
                               generator, frozen)[0]  # fmt: skip
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    net.eval()
    seconds = time.perf_counter() - start
    settings = {"token": token, "captions": templates, "class_prompt": "; ".join(class_prompts),
                "num_class_images": num_class_images if prior else 0,
                "class_guidance": class_guidance,
                "prior_weight": prior_weight, "prior_target": prior_target,
                "train_text_encoder": train_text_encoder,
                "steps": steps, "lr": lr}  # fmt: skip
    if lora:
        meta = {k: json.dumps(v) if k == "captions" else str(v) for k, v in settings.items()
                if k != "train_text_encoder"}  # fmt: skip
        meta |= {"method": "dreambooth-lora", "base": base_hash,
                 "architecture": architecture(model), "base_run": str(Path(run_path).resolve()),
                 "base_step": str(model.step), "targets": ",".join(chosen), "rank": str(rank),
                 "alpha": repr(alpha), "text_encoder": str(train_text_encoder).lower(),
                 "word": "", "images": str(len(x_instance))}  # fmt: skip
        write_adapter(net, out, meta)
    else:
        state = {k: v.detach() for k, v in net.state_dict().items()}
        write_run(run_path, state, out, {"dreambooth": settings})
    return FinetuneResult(out, steps, seconds, sum(p.numel() for p in params), base_params,
                          float(loss.detach()))  # fmt: skip


def _to_model_space(model: TextToImageModel, x: Tensor) -> Tensor:
    """Pictures as the run's denoiser learns them: themselves, or ``latent_scale * mu(x)``."""
    if model.autoencoder is None:
        return x
    with torch.no_grad():
        return encode_means(model.autoencoder.net, x) * model.autoencoder.latent_scale
