"""Recipe: discrete diffusion language models and their autoregressive baseline, on any text.

Wires text data (:mod:`difflab.data.text`) -> tokenizer -> :class:`TextTransformer` -> a token
process (:mod:`difflab.discrete.process`) and its objective (:mod:`difflab.discrete.objectives`)
-> the one :class:`~difflab.train.trainer.Trainer`; loads a checkpoint back into a model that
samples (:mod:`difflab.discrete.samplers`) and is evaluated on held-out text.

``diffusion.kind`` picks the model (seed 003; MDLM Sahoo et al. 2024, D3PM Austin et al. 2021,
UDLM Schiff et al. 2025, GIDD von Rutte et al. 2025):

==================  =====================================================================
``mdlm``            masked process, SUBS, continuous-time bound ``alpha'_t / (1 - alpha_t)``
``d3pm-absorbing``  masked process in ``T`` discrete steps, hybrid loss ``L_vb + lambda CE``
``d3pm-uniform``    uniform process in ``T`` discrete steps (cosine ``alpha_bar``), hybrid loss
``udlm``            uniform process, continuous-time bound
``hybrid``          mask-plus-uniform (GIDD) process, continuous-time bound
``ar``              the same transformer with a causal mask, next-token cross-entropy
==================  =====================================================================

Data: rows of ``data.length`` tokens cut from the stream ``<bos> doc <eos> <bos> doc ...`` of the
training split (``loss_mask`` is False only on the padding of the last row). The diffusion models
score all ``L`` tokens of a row; the autoregressive model reads ``<bos> x_1 .. x_{L-1}`` and
predicts ``x_1 .. x_L``, so it also scores all ``L`` tokens and the two are compared per token on
the same rows (:func:`evaluate`).

Units (:mod:`difflab.evaluate.text_metrics`): with ``N`` nats per token, the perplexity (bound)
is ``exp(N)`` and bits per character ``N * (tokens / characters) / ln 2``, where tokens and
characters are counted over the whole held-out split.

Public API (what ``difflab train | sample | eval | demo --text`` call): :class:`TextConfig`,
:func:`load_text_config`; :func:`train`; :func:`load_model` ->
:class:`LoadedTextModel`; :func:`generate` (strings) and :func:`generate_tokens` (ids);
:func:`evaluate`; :func:`demo`; :data:`SAMPLERS` (names and descriptions).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import torch
from torch import Tensor, nn

from difflab.config import Config, TrainConfig, _build, read_raw_config
from difflab.data.text import (
    BOS_ID,
    EOS_ID,
    MASK_ID,
    PAD_ID,
    BPETokenizer,
    CharTokenizer,
    Tokenizer,
    load_documents,
    load_text_documents,
    load_tokenizer,
    pack_texts,
    split_documents,
)
from difflab.discrete.autoregressive import autoregressive_sample
from difflab.discrete.objectives import continuous_time_loss, d3pm_loss, mask_count_loss
from difflab.discrete.process import HybridProcess, MaskedProcess, TokenProcess, UniformProcess
from difflab.discrete.samplers import (
    TOKEN_SAMPLER_DESCRIPTIONS,
    TOKEN_SAMPLERS,
    DiscreteSamples,
    classifier_free_guidance,
    prompt_to_fixed,
    semi_autoregressive_sample,
    uniform_times,
)
from difflab.discrete.schedules import make_token_schedule
from difflab.errors import UserError
from difflab.evaluate.text_metrics import bits_per_character
from difflab.nets.transformer import TextTransformer
from difflab.recipes.image import drop_labels
from difflab.train.checkpoint import FILENAME, load_checkpoint, resolve_checkpoint
from difflab.train.trainer import Trainer, TrainResult, load_ema

#: Every ``diffusion.kind``; the first five are diffusion models, ``ar`` the baseline.
KINDS = ("mdlm", "d3pm-absorbing", "d3pm-uniform", "udlm", "hybrid", "ar")
MASKED_KINDS = ("mdlm", "d3pm-absorbing")
DISCRETE_TIME_KINDS = ("d3pm-absorbing", "d3pm-uniform")
#: ``diffusion.schedule`` when left empty: D3PM's own ``T``-step schedules, else log-linear.
DEFAULT_SCHEDULES = {
    "d3pm-absorbing": "d3pm-absorbing",
    "d3pm-uniform": "d3pm-cosine",
}
SCHEDULES = ("log-linear", "linear", "cosine", "d3pm-absorbing", "d3pm-cosine")

#: ``sample.sampler`` names and what they run (the ``ar`` model ignores them: it always
#: samples token by token with its key/value cache).
SAMPLERS = TOKEN_SAMPLER_DESCRIPTIONS

TOKENIZER_FILE = "tokenizer.json"
REPORT_FILE = "report.md"


# ---------------------------------------------------------------- configuration


@dataclass
class TextDataConfig:
    """Training text. ``source``: a built-in corpus (``shakespeare``), a ``.txt`` file, a folder
    of them, or a local Hugging Face dataset (saved folder or cached name; column
    ``text_field``). ``tokenizer``: char | bpe (``bpe_vocab`` ids, specials included).
    ``length``: tokens per training row, the model's context. ``labels``: the source is a folder
    whose immediate subfolders are classes (for classifier-free guidance)."""

    source: str = "shakespeare"
    tokenizer: str = "char"
    bpe_vocab: int = 1024
    length: int = 128
    labels: bool = False
    text_field: str = "text"


@dataclass
class TextModelConfig:
    """The :class:`TextTransformer`. ``time_conditioning``: adaLN on ``t``; empty means off for
    ``ar`` and the masked kinds (MDLM's time-agnostic denoiser), on for uniform and hybrid."""

    width: int = 128
    depth: int = 4
    num_heads: int = 4
    dropout: float = 0.0
    time_conditioning: bool | None = None


@dataclass
class TextDiffusionConfig:
    """The model kind (see the module docstring) and its process. ``schedule``: log-linear |
    linear | cosine | d3pm-absorbing | d3pm-cosine (empty: by kind); ``T``: steps of the D3PM
    kinds; ``hybrid_lambda``: D3PM's weight of the auxiliary cross-entropy; ``p_uniform``: the
    hybrid's uniform share; ``antithetic``: stratified training times; ``cond_drop``:
    probability of the null label when ``data.labels`` is on."""

    kind: str = "mdlm"
    schedule: str | None = None
    T: int = 1000
    hybrid_lambda: float = 0.01
    p_uniform: float = 0.1
    antithetic: bool = True
    cond_drop: float = 0.1


@dataclass
class TextSampleConfig:
    """Defaults of :func:`generate`. ``sampler``: see :data:`SAMPLERS`; ``steps`` per window;
    ``temperature`` (0: greedy), ``top_p`` (1: off); ``length`` in tokens, prompt included
    (empty: ``data.length``); ``block``: new tokens per semi-autoregressive window (empty: half
    the context); ``guidance``: classifier-free guidance scale ``w`` (labelled runs)."""

    sampler: str = "cached"
    steps: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    length: int | None = None
    block: int | None = None
    n: int = 4
    seed: int = 0
    guidance: float = 0.0


def _default_train() -> TrainConfig:
    return TrainConfig(batch_size=32, lr=1e-3, warmup=100, ema=0.999, out="runs/text")


@dataclass
class TextConfig:
    data: TextDataConfig = field(default_factory=TextDataConfig)
    model: TextModelConfig = field(default_factory=TextModelConfig)
    diffusion: TextDiffusionConfig = field(default_factory=TextDiffusionConfig)
    train: TrainConfig = field(default_factory=_default_train)
    sample: TextSampleConfig = field(default_factory=TextSampleConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @property
    def time_conditioning(self) -> bool:
        """``model.time_conditioning``, resolved by kind when empty."""
        if self.model.time_conditioning is not None:
            return self.model.time_conditioning
        return self.diffusion.kind not in (*MASKED_KINDS, "ar")

    @property
    def schedule(self) -> str:
        """``diffusion.schedule``, resolved by kind when empty."""
        return self.diffusion.schedule or DEFAULT_SCHEDULES.get(self.diffusion.kind, "log-linear")

    def validate(self) -> TextConfig:
        """Raise :class:`UserError` on an impossible value."""
        d, m, k, s = self.data, self.model, self.diffusion, self.sample
        checks = [
            (d.tokenizer in ("char", "bpe"), "data.tokenizer must be char or bpe"),
            (d.bpe_vocab >= 261, "data.bpe_vocab must be at least 261 (5 specials + 256 bytes)"),
            (d.length >= 2, "data.length must be at least 2"),
            (m.width >= 2 and m.depth >= 1 and m.num_heads >= 1,
             "model.width, model.depth and model.num_heads must be positive"),
            (m.width % m.num_heads == 0 and (m.width // m.num_heads) % 2 == 0,
             "model.width / model.num_heads must be an even whole number (rotary embeddings)"),
            (0.0 <= m.dropout < 1.0, "model.dropout must be in [0, 1)"),
            (k.kind in KINDS, f"diffusion.kind must be one of {', '.join(KINDS)}"),
            (k.schedule is None or k.schedule in SCHEDULES,
             f"diffusion.schedule must be one of {', '.join(SCHEDULES)} (or empty)"),
            (k.T >= 1, "diffusion.T must be at least 1"),
            (k.hybrid_lambda >= 0, "diffusion.hybrid_lambda must be non-negative"),
            (0.0 < k.p_uniform < 1.0, "diffusion.p_uniform must be in (0, 1)"),
            (0.0 <= k.cond_drop < 1.0, "diffusion.cond_drop must be in [0, 1)"),
            (not (k.kind == "ar" and m.time_conditioning),
             "model.time_conditioning cannot be on for diffusion.kind=ar (it has no time)"),
            (s.sampler in SAMPLERS, f"sample.sampler must be one of {', '.join(SAMPLERS)}"),
            (s.steps >= 1, "sample.steps must be at least 1"),
            (s.temperature >= 0, "sample.temperature must be non-negative"),
            (0.0 < s.top_p <= 1.0, "sample.top_p must be in (0, 1]"),
            (s.length is None or s.length >= 1, "sample.length must be at least 1"),
            (s.block is None or 1 <= s.block <= d.length,
             "sample.block must be in 1..data.length"),
            (s.n >= 1, "sample.n must be at least 1"),
            (s.guidance >= 0, "sample.guidance must be non-negative"),
        ]  # fmt: skip
        for ok, message in checks:
            if not ok:
                raise UserError(message)
        Config(train=self.train).validate()  # the train section follows the shared rules
        return self


def load_text_config(source: str | None, overrides: list[str] | tuple[str, ...] = ()) -> TextConfig:
    """A :class:`TextConfig` from a preset name (default ``text-shakespeare``) or a YAML path
    whose top-level ``recipe`` is ``text``, then ``section.key=value`` overrides; unknown keys,
    a YAML of another recipe and impossible values are :class:`UserError`
    (:func:`difflab.config.read_raw_config`)."""
    raw = read_raw_config(source or "text-shakespeare", "text", overrides)
    return text_config_from_dict(raw).validate()


def text_config_from_dict(raw: dict[str, Any]) -> TextConfig:
    """Typed :class:`TextConfig` from nested dicts; unknown sections or keys are errors."""
    hints = get_type_hints(TextConfig)
    kwargs = {}
    for section, values in raw.items():
        if section not in hints:
            raise UserError(f"unknown config section {section!r}: choose {', '.join(hints)}")
        defaults = dataclasses.asdict(getattr(TextConfig(), section))
        kwargs[section] = _build(hints[section], {**defaults, **(values or {})}, section)
    return TextConfig(**kwargs)


# ---------------------------------------------------------------- data


@dataclass
class TextSplit:
    """Documents of one split, with class labels when the run has them."""

    documents: list[str]
    labels: list[int] | None

    @property
    def characters(self) -> int:
        return sum(len(d) for d in self.documents)


def load_splits(cfg: TextConfig) -> tuple[TextSplit, TextSplit, list[str] | None]:
    """``(train, held_out, class_names)`` by the fixed split of :func:`split_documents`
    (labelled data is split class by class)."""
    d = cfg.data
    if not d.labels:
        train_docs, held_docs = split_documents(load_documents(d.source, text_field=d.text_field))
        return TextSplit(train_docs, None), TextSplit(held_docs, None), None
    root = Path(d.source)
    if not root.is_dir():
        raise UserError(f"data.labels needs a folder of class subfolders; {root} is not a folder")
    classes = sorted(p for p in root.iterdir() if p.is_dir())
    if len(classes) < 2:
        raise UserError(f"data.labels needs at least two class subfolders in {root}")
    train, held = TextSplit([], []), TextSplit([], [])
    for label, folder in enumerate(classes):
        docs_train, docs_held = split_documents(load_text_documents(folder))
        train.documents += docs_train
        train.labels += [label] * len(docs_train)
        held.documents += docs_held
        held.labels += [label] * len(docs_held)
    return train, held, [p.name for p in classes]


def build_tokenizer(cfg: TextConfig, documents: list[str]) -> Tokenizer:
    """The ``data.tokenizer`` trained on ``documents`` (the training split)."""
    if cfg.data.tokenizer == "char":
        return CharTokenizer.train(documents)
    return BPETokenizer.train(documents, vocab_size=cfg.data.bpe_vocab)


def pack_split(
    split: TextSplit, tokenizer: Tokenizer, length: int
) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(tokens, loss_mask, labels)`` rows of ``length``; labelled documents are packed class by
    class so that every row has one label."""
    if split.labels is None:
        packed = pack_texts(split.documents, tokenizer, length)
        return packed.tokens, packed.loss_mask, None
    tokens, masks, labels = [], [], []
    for label in sorted(set(split.labels)):
        docs = [d for d, y in zip(split.documents, split.labels, strict=True) if y == label]
        packed = pack_texts(docs, tokenizer, length)
        tokens.append(packed.tokens)
        masks.append(packed.loss_mask)
        labels.append(torch.full((len(packed),), label, dtype=torch.long))
    return torch.cat(tokens), torch.cat(masks), torch.cat(labels)


# ---------------------------------------------------------------- model and objective


def build_process(cfg: TextConfig, vocab_size: int) -> TokenProcess | None:
    """The token process of ``diffusion.kind`` over ``vocab_size`` ids (``None`` for ``ar``)."""
    kind = cfg.diffusion.kind
    if kind == "ar":
        return None
    name = cfg.schedule
    options = {"T": cfg.diffusion.T} if name.startswith("d3pm") else {}
    schedule = make_token_schedule(name, **options)
    if kind in MASKED_KINDS:
        return MaskedProcess(vocab_size, MASK_ID, schedule)
    if kind == "hybrid":
        return HybridProcess(vocab_size, MASK_ID, schedule, p_uniform=cfg.diffusion.p_uniform)
    return UniformProcess(vocab_size, schedule)


def build_net(cfg: TextConfig, vocab_size: int, num_classes: int | None) -> TextTransformer:
    """The transformer: bidirectional for diffusion, causal for ``ar``. The causal model's
    context has one more position, for the ``<bos>`` it reads before the ``L`` tokens of a row."""
    m, causal = cfg.model, cfg.diffusion.kind == "ar"
    return TextTransformer(
        vocab_size,
        cfg.data.length + int(causal),
        width=m.width,
        depth=m.depth,
        num_heads=m.num_heads,
        dropout=m.dropout,
        causal=causal,
        time_conditioning=cfg.time_conditioning,
        num_classes=num_classes,
    )


def ar_token_nll(net: nn.Module, tokens: Tensor, cond: Tensor | None = None) -> Tensor:
    """``-log p(x_i | <bos>, x_1..x_{i-1})`` for every token of ``tokens (B, L)``, ``(B, L)``
    float32: the causal ``net`` reads ``<bos> x_1 .. x_{L-1}``."""
    inputs = torch.cat([torch.full_like(tokens[:, :1], BOS_ID), tokens[:, :-1]], dim=1)
    logits = net(inputs, cond=cond).float()
    return torch.nn.functional.cross_entropy(logits.transpose(1, 2), tokens, reduction="none")


def make_loss(
    cfg: TextConfig, process: TokenProcess | None, num_classes: int | None
) -> Callable[[nn.Module, tuple[Tensor, ...], torch.Generator], Tensor]:
    """``loss(model, (tokens, loss_mask[, labels]), generator)`` for the trainer: the objective of
    ``diffusion.kind`` (nats per counted token, or its D3PM hybrid)."""
    d = cfg.diffusion

    def loss(model: nn.Module, batch: tuple[Tensor, ...], generator: torch.Generator) -> Tensor:
        tokens, loss_mask = batch[0], batch[1]
        cond = None
        if num_classes is not None:
            cond = drop_labels(batch[2], num_classes, d.cond_drop, generator)
        if process is None:
            nll = ar_token_nll(model, tokens, cond)
            return (nll * loss_mask).sum() / loss_mask.sum().clamp_min(1)
        if d.kind in DISCRETE_TIME_KINDS:
            return d3pm_loss(model, process, tokens, d.T, ce_weight=d.hybrid_lambda,
                             loss_mask=loss_mask, cond=cond, generator=generator).loss  # fmt: skip
        return continuous_time_loss(model, process, tokens, loss_mask=loss_mask, cond=cond,
                                    stratified=d.antithetic, generator=generator).loss  # fmt: skip

    return loss


def count_parameters(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


# ---------------------------------------------------------------- training


def train(cfg: TextConfig, resume: bool = False, progress: bool = True) -> TrainResult:
    """Train the model of ``cfg`` into ``train.out``: ``checkpoint.safetensors`` (its run config
    has ``"recipe": "text"``), ``loss.csv`` and the tokenizer, trained on the training split, as
    ``tokenizer.json``. ``resume`` continues from the checkpoint with the saved tokenizer."""
    out = Path(cfg.train.out)
    if not resume and (out / FILENAME).exists():
        raise UserError(
            f"{out} already holds a run: pass --resume to continue it or choose another train.out"
        )
    if resume and not (out / TOKENIZER_FILE).is_file():
        raise UserError(f"no run to resume in {out} (no {TOKENIZER_FILE} there)")
    train_split, _, class_names = load_splits(cfg)
    if resume:
        tokenizer = load_tokenizer(out / TOKENIZER_FILE)
    else:
        tokenizer = build_tokenizer(cfg, train_split.documents)
    tokens, loss_mask, labels = pack_split(train_split, tokenizer, cfg.data.length)
    num_classes = len(class_names) if class_names else None
    meta = {
        "recipe": "text",
        "config": cfg.to_dict(),
        "vocab_size": tokenizer.vocab_size,
        "class_names": class_names,
    }
    process = build_process(cfg, tokenizer.vocab_size)
    torch.manual_seed(cfg.train.seed)  # network initialisation
    net = build_net(cfg, tokenizer.vocab_size, num_classes)
    tensors = (tokens, loss_mask) if labels is None else (tokens, loss_mask, labels)
    trainer = Trainer(net, make_loss(cfg, process, num_classes), tensors, cfg.train, meta, out)
    if not resume:
        _save_atomically(tokenizer, out / TOKENIZER_FILE)
    return trainer.fit(resume=resume, progress=progress)


def _save_atomically(tokenizer: Tokenizer, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        tokenizer.save(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------- loading and sampling


@dataclass
class LoadedTextModel:
    """A trained text model: the EMA network (eval mode), its tokenizer, its token process
    (``None`` for ``ar``), the run's config, class names (labelled runs) and training step."""

    net: TextTransformer
    tokenizer: Tokenizer
    process: TokenProcess | None
    config: TextConfig
    class_names: list[str] | None
    step: int

    @property
    def kind(self) -> str:
        return self.config.diffusion.kind

    @property
    def context(self) -> int:
        """Tokens the model sees at once (``data.length``)."""
        return self.config.data.length

    @property
    def num_classes(self) -> int | None:
        return None if self.class_names is None else len(self.class_names)

    @property
    def device(self) -> torch.device:
        return self.net.embed.weight.device


def load_model(path: str | Path, device: str = "auto") -> LoadedTextModel:
    """Load a text-recipe run (its folder or checkpoint file): EMA weights, the tokenizer saved
    next to the checkpoint, and the process."""
    ckpt_path = resolve_checkpoint(path)
    ckpt = load_checkpoint(ckpt_path)
    if ckpt.config.get("recipe") != "text":
        raise UserError(f"{path} is not a checkpoint of the text recipe")
    cfg = text_config_from_dict(ckpt.config["config"])
    tokenizer = load_tokenizer(ckpt_path.parent / TOKENIZER_FILE)
    vocab_size = ckpt.config["vocab_size"]
    if tokenizer.vocab_size != vocab_size:
        raise UserError(
            f"{ckpt_path.parent / TOKENIZER_FILE} has {tokenizer.vocab_size} ids but the model "
            f"was trained with {vocab_size}"
        )
    class_names = ckpt.config["class_names"]
    net = build_net(cfg, vocab_size, len(class_names) if class_names else None)
    load_ema(net, ckpt.ema, path, device)
    return LoadedTextModel(
        net, tokenizer, build_process(cfg, vocab_size), cfg, class_names, ckpt.step
    )


def generate_tokens(
    model: LoadedTextModel,
    n: int,
    *,
    prompt: str | None = None,
    steps: int | None = None,
    sampler: str | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    length: int | None = None,
    seed: int | None = None,
    label: str | int | None = None,
    guidance: float | None = None,
) -> DiscreteSamples:
    """Token ids ``(n, length)`` cut after the first ``<eos>`` (then ``<pad>``); see
    :func:`generate`, which decodes them."""
    s = model.config.sample
    steps = s.steps if steps is None else steps
    sampler = s.sampler if sampler is None else sampler
    temperature = s.temperature if temperature is None else temperature
    top_p = s.top_p if top_p is None else top_p
    length = (s.length or model.context) if length is None else length
    seed = s.seed if seed is None else seed
    guidance = s.guidance if guidance is None else guidance
    if n < 1:
        raise UserError(f"the number of samples must be at least 1, got {n}")
    if sampler not in SAMPLERS:
        raise UserError(f"unknown sampler {sampler!r}: choose one of {', '.join(SAMPLERS)}")
    if steps < 1:
        raise UserError(f"steps must be at least 1, got {steps}")
    if temperature < 0 or not 0.0 < top_p <= 1.0:
        raise UserError("temperature must be non-negative and top_p in (0, 1]")
    prompt_ids = model.tokenizer.encode(prompt) if prompt else []
    if len(prompt_ids) >= length:
        raise UserError(
            f"the prompt has {len(prompt_ids)} tokens; the length ({length}) must exceed it"
        )
    device = model.device
    generator = torch.Generator(device).manual_seed(seed)
    cond = _condition(model, n, label, guidance)
    prompt_tensor = torch.tensor([prompt_ids], dtype=torch.long, device=device).expand(n, -1)
    if model.process is None:
        if guidance > 0:
            raise UserError("classifier-free guidance applies to the diffusion kinds, not to ar")
        return autoregressive_sample(
            model.net, (n, length), context_length=model.context,
            block_length=s.block or max(1, model.context // 2), prompt=prompt_tensor,
            bos_id=BOS_ID, temperature=temperature, top_p=top_p, cond=cond, eos_id=EOS_ID,
            pad_id=PAD_ID, generator=generator,
        )  # fmt: skip
    if not model.process.absorbing and sampler in ("confidence", "remask"):
        raise UserError(f"sampler {sampler} needs a masked kind ({', '.join(MASKED_KINDS)})")
    denoiser: Any = model.net
    if guidance > 0:
        denoiser = classifier_free_guidance(model.net, guidance, torch.tensor(model.num_classes))
    inner = TOKEN_SAMPLERS["cached" if sampler == "semi-ar" else sampler]
    options = {
        "cond": cond,
        "temperature": temperature,
        "top_p": top_p if top_p < 1 else None,
        "eos_id": EOS_ID,
        "pad_id": PAD_ID,
        "generator": generator,
        "device": device,
    }
    if sampler == "semi-ar" or length > model.context:
        block = s.block or max(1, model.context // 2)
        return semi_autoregressive_sample(
            denoiser, model.process, (n, length), uniform_times(steps),
            context_length=model.context, block_length=block, sampler=inner,
            prompt=prompt_tensor if prompt_ids else None, **options,
        )  # fmt: skip
    fixed_tokens = fixed_mask = None
    if prompt_ids:
        fixed_tokens, fixed_mask = prompt_to_fixed(prompt_tensor, length)
    return inner(denoiser, model.process, (n, length), uniform_times(steps),
                 fixed_tokens=fixed_tokens, fixed_mask=fixed_mask, **options)  # fmt: skip


def generate(
    model: LoadedTextModel,
    n: int,
    *,
    prompt: str | None = None,
    steps: int | None = None,
    sampler: str | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    length: int | None = None,
    seed: int | None = None,
    label: str | int | None = None,
    guidance: float | None = None,
) -> list[str]:
    """``n`` passages of up to ``length`` tokens (prompt included), each ending before its first
    ``<eos>``; the prompt is their given prefix, never noised. Every option left ``None`` comes
    from the run's ``sample`` section (``length``: the training context).

    Diffusion kinds run ``sampler`` (:data:`SAMPLERS`) for ``steps`` steps per window; a
    ``length`` beyond the context is generated semi-autoregressively in windows of the context
    that keep its last ``context - block`` tokens. ``ar`` samples token by token with a
    key/value cache (windows the same way beyond its context; ``steps`` and ``sampler`` do not
    apply). ``label`` (name or index) conditions a labelled run; ``guidance`` ``w > 0`` applies
    classifier-free guidance ``(1 + w) log p(x_0 | x_t, c) - w log p(x_0 | x_t)``. Special tokens
    are dropped from the text.
    """
    samples = generate_tokens(
        model, n, prompt=prompt, steps=steps, sampler=sampler, temperature=temperature,
        top_p=top_p, length=length, seed=seed, label=label, guidance=guidance,
    )  # fmt: skip
    return [model.tokenizer.decode(row) for row in samples.tokens.cpu()]  # specials dropped


def _condition(
    model: LoadedTextModel, n: int, label: str | int | None, guidance: float
) -> Tensor | None:
    """The ``(n,)`` label tensor of a labelled run (``None``: unconditional)."""
    if model.class_names is None:
        if label is not None or guidance > 0:
            raise UserError("a label or guidance was given, but this model has no classes")
        return None
    if label is None:
        if guidance > 0:
            raise UserError("guidance needs a label to guide towards")
        return None
    if isinstance(label, str) and label in model.class_names:
        index = model.class_names.index(label)
    elif str(label).isdigit() and int(label) < len(model.class_names):
        index = int(label)
    else:
        raise UserError(f"unknown label {label!r}: this model knows {', '.join(model.class_names)}")
    return torch.full((n,), index, dtype=torch.long, device=model.device)


# ---------------------------------------------------------------- evaluation


def held_out_rows(model: LoadedTextModel) -> tuple[Tensor, Tensor, Tensor | None, TextSplit]:
    """``(tokens, loss_mask, labels, split)``: the held-out split packed like the training data."""
    _, held, _ = load_splits(model.config)
    if not held.documents:
        raise UserError("this run's data has no held-out text")
    tokens, loss_mask, labels = pack_split(held, model.tokenizer, model.context)
    return tokens, loss_mask, labels, held


def _count_form(cfg: TextConfig) -> bool:
    """Whether ``cfg``'s bound can be drawn through the number of masked tokens: MDLM whose
    network does not read ``t``."""
    return cfg.diffusion.kind == "mdlm" and not cfg.time_conditioning


@torch.inference_mode()
def evaluate(
    model: LoadedTextModel,
    n_sequences: int = 256,
    seed: int = 0,
    *,
    time_samples: int = 4,
    batch_size: int = 64,
) -> dict[str, Any]:
    """Negative log-likelihood per token on ``n_sequences`` held-out rows, spread evenly over the
    held-out split: for ``ar`` the exact value, for diffusion kinds the NELBO (a bound: an upper
    bound on the true NLL), estimated with ``time_samples`` draws per row spread over the noise
    levels (D3PM kinds: their ``T``-step ``L_vb``; the others: the continuous-time bound of their
    process). MDLM with a time-agnostic network (the default) is scored in the bound's mask-count
    form (:func:`mask_count_loss`: the same bound, lower variance); it is trained in the time form,
    which trained better (docs/BENCHMARKS.md). Labelled runs are scored given each row's label.

    Returns ``kind``, ``step``, ``bound`` (True for diffusion), ``sequences``, ``tokens``
    (scored), ``nats_per_token`` and its Monte Carlo/row-sampling ``nats_per_token_stderr``
    (ratio estimator), ``bits_per_token``, ``perplexity`` (``exp`` of nats per token),
    ``split_tokens`` and ``split_characters`` (whole held-out split) and
    ``bits_per_character = nats_per_token * split_tokens / split_characters / ln 2``.
    """
    if n_sequences < 1 or time_samples < 1:
        raise UserError("n_sequences and time_samples must be at least 1")
    tokens, loss_mask, labels, held = held_out_rows(model)
    rows = torch.linspace(0, len(tokens) - 1, min(n_sequences, len(tokens))).round().long()
    device = model.device
    generator = torch.Generator(device).manual_seed(seed)
    process, d = model.process, model.config.diffusion
    repeats = 1 if process is None else time_samples
    sums, counts = [], []
    for chunk in rows.split(batch_size):
        # Row r's draws sit len(chunk) apart in the batch: in strata 1 / repeats apart.
        x0 = tokens[chunk].to(device).repeat(repeats, 1)
        mask = loss_mask[chunk].to(device).repeat(repeats, 1)
        cond = None if labels is None else labels[chunk].to(device).repeat(repeats)
        if process is None:
            token_nll = ar_token_nll(model.net, x0, cond) * mask
        elif d.kind in DISCRETE_TIME_KINDS:
            token_nll = d3pm_loss(model.net, process, x0, d.T, loss_mask=mask, cond=cond,
                                  generator=generator).token_nelbo  # fmt: skip
        else:
            objective = mask_count_loss if _count_form(model.config) else continuous_time_loss
            token_nll = objective(model.net, process, x0, loss_mask=mask, cond=cond,
                                  generator=generator).token_nelbo  # fmt: skip
        sums.append(token_nll.double().sum(1).view(repeats, -1).mean(0))
        counts.append(loss_mask[chunk].sum(1).double())
    row_sums, row_counts = torch.cat(sums).cpu(), torch.cat(counts)
    nats = float(row_sums.sum() / row_counts.sum())
    stderr = float((row_sums - nats * row_counts).square().sum().sqrt() / row_counts.sum())
    split_tokens, split_characters = int(loss_mask.sum()), held.characters
    return {
        "kind": model.kind,
        "step": model.step,
        "bound": process is not None,
        "sequences": len(rows),
        "tokens": int(row_counts.sum()),
        "nats_per_token": nats,
        "nats_per_token_stderr": stderr,
        "bits_per_token": nats / math.log(2.0),
        "perplexity": math.exp(nats),
        "split_tokens": split_tokens,
        "split_characters": split_characters,
        "bits_per_character": bits_per_character(nats, split_tokens, split_characters),
    }


# ---------------------------------------------------------------- demo

DEMO_PRESET = "text-demo"
DEMO_PROMPT = "KING.\nWhat"


def training_flops(cfg: TextConfig, vocab_size: int, steps: int) -> float:
    """Estimated training FLOPs: ``6 N`` per token for the ``N`` weights of the matrix products
    (``12 w^2`` per block and the ``V w`` output head; forward and backward) plus ``12 L w`` per
    token and layer for attention (``2 L w`` FLOPs each for ``QK^T`` and ``AV``, times 3 with
    the backward)."""
    m, L = cfg.model, cfg.data.length
    dense = m.depth * 12 * m.width**2 + vocab_size * m.width
    per_token = 6 * dense + 12 * m.depth * L * m.width
    return float(per_token * cfg.train.batch_size * L * steps)


def demo(out: Path, quiet: bool = False) -> str:
    """``difflab demo --text``: train an MDLM and an autoregressive model of the same size for
    the same wall-clock budget on the built-in Shakespeare (characters; preset ``text-demo``),
    then report passages from each (unconditional and from a prompt) and each one's held-out
    perplexity (bound) and bits per character. Writes ``out/report.md`` and returns its text;
    the runs go to ``out/mdlm`` and ``out/ar`` (replaced if present)."""
    out = Path(out)
    start = time.perf_counter()
    results, models = {}, {}
    for kind in ("mdlm", "ar"):
        run = out / kind
        if (run / FILENAME).exists():
            shutil.rmtree(run)  # the demo always starts afresh in its own folders
        cfg = load_text_config(DEMO_PRESET, [f"diffusion.kind={kind}", f"train.out={run}"])
        results[kind] = train(cfg, progress=not quiet)
        models[kind] = load_model(run)
    train_seconds = time.perf_counter() - start
    lines = _demo_report(models, results, train_seconds)
    lines.append(f"\nWhole demo: {time.perf_counter() - start:.0f} s.")
    report = "\n".join(lines) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / REPORT_FILE).write_text(report)
    return report


def _demo_report(
    models: dict[str, LoadedTextModel], results: dict[str, TrainResult], train_seconds: float
) -> list[str]:
    names = {"mdlm": "MDLM (masked diffusion)", "ar": "Autoregressive baseline"}
    mdlm = models["mdlm"]
    cfg, m = mdlm.config, mdlm.config.model
    params = count_parameters(mdlm.net)
    flops = training_flops(cfg, mdlm.tokenizer.vocab_size, cfg.train.steps)
    lines = [
        "# difflab text demo: masked diffusion vs autoregressive on Shakespeare",
        "",
        f"Both models: the same transformer (width {m.width}, depth {m.depth}, "
        f"{m.num_heads} heads, {params / 1e6:.2f} M parameters), characters "
        f"(vocabulary {mdlm.tokenizer.vocab_size}), context {cfg.data.length}, batch "
        f"{cfg.train.batch_size}, at most {cfg.train.steps} steps or "
        f"{cfg.train.max_minutes:g} minutes each (about {flops / 1e12:.1f} TFLOP for "
        f"{cfg.train.steps} steps); training took {train_seconds:.0f} s in all.",
        "",
        "Held-out text: Macbeth and Twelfth Night. MDLM gives an upper bound (NELBO) on its "
        "negative log-likelihood; the autoregressive model its exact value.",
        "",
        "| model | steps | train s | nats/token | perplexity | bits/char |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    samples = {}
    for kind, model in models.items():
        ev = evaluate(model, n_sequences=128, seed=0)
        bound = "<= " if ev["bound"] else ""
        lines.append(
            f"| {names[kind]} | {results[kind].steps} | {results[kind].seconds:.0f} | "
            f"{bound}{ev['nats_per_token']:.3f} ± {ev['nats_per_token_stderr']:.3f} | "
            f"{bound}{ev['perplexity']:.2f} | {bound}{ev['bits_per_character']:.3f} |"
        )
        samples[kind] = (
            generate(model, 2, seed=1),
            generate(model, 2, prompt=DEMO_PROMPT, seed=2),
        )
    for kind, (free, prompted) in samples.items():
        sampler = "key/value cache" if kind == "ar" else (
            f"{cfg.sample.sampler} sampler, {cfg.sample.steps} steps"
        )  # fmt: skip
        lines += ["", f"## {names[kind]} ({sampler})", "", "Unconditional:"]
        lines += [_fence(text) for text in free]
        lines += ["", f"From the prompt {DEMO_PROMPT!r}:"]
        lines += [_fence(text) for text in prompted]
    return lines


def _fence(text: str) -> str:
    return f"\n```\n{text}\n```"
