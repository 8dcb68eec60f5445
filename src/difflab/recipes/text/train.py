"""Training data, network, process and loss of the text recipe, and the model a run loads into.

Data: the documents of the training split (:func:`load_splits`) are tokenized by a tokenizer
learned on them (saved with the run as ``tokenizer.json``) and cut into rows of ``data.length``
tokens from the stream ``<bos> doc <eos> <bos> doc ...`` (``loss_mask`` is False only on the
padding of the last row; labelled documents are packed class by class, so that every row has one
label). The diffusion kinds score all ``L`` tokens of a row; the autoregressive model reads
``<bos> x_1 .. x_{L-1}`` and predicts ``x_1 .. x_L``, so it also scores all ``L`` tokens, and
the two are compared per token on the same rows.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import difflab.recipes.text.continuous as continuous
import difflab.recipes.text.latent_text as latent_text
from difflab.config import to_dict
from difflab.data.text import (
    BOS_ID,
    MASK_ID,
    Tokenizer,
    load_documents,
    load_text_documents,
    pack_texts,
    split_documents,
)
from difflab.discrete.block import block_diffusion_loss
from difflab.discrete.objectives import continuous_time_loss, d3pm_loss
from difflab.discrete.process import HybridProcess, MaskedProcess, TokenProcess, UniformProcess
from difflab.discrete.schedules import make_token_schedule
from difflab.errors import UserError
from difflab.files import write_bytes
from difflab.gaussian.schedules import Schedule
from difflab.nets.transformer import TextTransformer
from difflab.recipes.image import drop_labels
from difflab.recipes.text.config import (
    CONFIG_VERSION,
    KINDS,
    TOKENIZERS,
    TextConfig,
    TextDataConfig,
    TextDiffusionConfig,
    given,
)
from difflab.train.checkpoint import CONFIG_FILENAME, FILENAME
from difflab.train.trainer import LOCK_NAME, LOG_NAME

TOKENIZER_FILE = "tokenizer.json"
#: Every file a text run writes into its folder.
RUN_FILES = (FILENAME, CONFIG_FILENAME, LOG_NAME, LOCK_NAME, TOKENIZER_FILE)


# ---------------------------------------------------------------- data


@dataclass
class TextSplit:
    """Documents of one split, with class labels when the run has them."""

    documents: list[str]
    labels: list[int] | None

    @property
    def characters(self) -> int:
        return sum(len(d) for d in self.documents)


def load_splits(data: TextDataConfig) -> tuple[TextSplit, TextSplit, list[str] | None]:
    """``(train, held_out, class_names)`` by the fixed split of :func:`split_documents`
    (labelled data is split class by class)."""
    if not data.labels:
        documents = load_documents(data.source, text_field=data.text_field)
        train_docs, held_docs = split_documents(documents)
        return TextSplit(train_docs, None), TextSplit(held_docs, None), None
    root = Path(data.source)
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


def build_tokenizer(data: TextDataConfig, documents: list[str]) -> Tokenizer:
    """The ``data.tokenizer`` learned from ``documents`` (the training split)."""
    return TOKENIZERS[data.tokenizer].train(documents, **data.tokenizer_options())


def save_tokenizer(tokenizer: Tokenizer, path: Path) -> Path:
    """Write ``tokenizer`` to ``path`` whole or not at all (what its own ``save`` writes, moved
    into place by :func:`~difflab.files.write_bytes`)."""
    with tempfile.TemporaryDirectory() as folder:
        draft = Path(folder) / path.name
        tokenizer.save(draft)
        return write_bytes(path, draft.read_bytes())


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


def run_metadata(
    cfg: TextConfig, tokenizer: Tokenizer, class_names: list[str] | None
) -> dict[str, Any]:
    """What a text checkpoint records to rebuild its model: the recipe, the config, the
    vocabulary size and the class names (labelled runs)."""
    return {
        "recipe": "text",
        "config_version": CONFIG_VERSION,
        "config": to_dict(cfg),
        "vocab_size": tokenizer.vocab_size,
        "class_names": class_names,
    }


# ---------------------------------------------------------------- network, process, loss


def build_process(d: TextDiffusionConfig, vocab_size: int) -> TokenProcess | Schedule | None:
    """The token process of ``diffusion.kind`` over ``vocab_size`` ids (``None`` for ``ar``; the
    Gaussian schedule for the ``gaussian`` kinds)."""
    process = KINDS[d.kind].process
    if process is None:
        return None
    if process == "gaussian":
        return continuous.build_schedule(d)
    schedule = make_token_schedule(d.schedule_name, **d.schedule_options())
    if process == "masked":
        return MaskedProcess(vocab_size, MASK_ID, schedule)
    if process == "hybrid":
        return HybridProcess(vocab_size, MASK_ID, schedule, **given(p_uniform=d.p_uniform))
    return UniformProcess(vocab_size, schedule)


def build_net(cfg: TextConfig, vocab_size: int, num_classes: int | None) -> nn.Module:
    """The transformer: bidirectional for diffusion, causal for ``ar``. The causal model's
    context has one more position, for the ``<bos>`` it reads before the ``L`` tokens of a row.
    The ``gaussian`` kinds: the embedding and its denoiser (:func:`.continuous.build_net`);
    ``latent-text`` the autoencoder and its denoiser (:func:`.latent_text.build_net`)."""
    if cfg.diffusion.kind == latent_text.KIND:
        return latent_text.build_net(cfg, vocab_size)
    if cfg.diffusion.gaussian:
        return continuous.build_net(cfg, vocab_size)
    m, causal = cfg.model, cfg.diffusion.kind == "ar"
    return TextTransformer(
        vocab_size, cfg.data.length + int(causal), width=m.width, depth=m.depth,
        num_heads=m.num_heads, dropout=m.dropout, causal=causal,
        time_conditioning=cfg.time_conditioning, num_classes=num_classes,
    )  # fmt: skip


def count_parameters(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def ar_token_nll(net: nn.Module, tokens: Tensor, cond: Tensor | None = None) -> Tensor:
    """``-log p(x_i | <bos>, x_1..x_{i-1})`` for every token of ``tokens (B, L)``, ``(B, L)``
    float32: the causal ``net`` reads ``<bos> x_1 .. x_{L-1}``."""
    inputs = torch.cat([torch.full_like(tokens[:, :1], BOS_ID), tokens[:, :-1]], dim=1)
    logits = net(inputs, cond=cond).float()
    return torch.nn.functional.cross_entropy(logits.transpose(1, 2), tokens, reduction="none")


def make_loss(
    cfg: TextConfig, process: TokenProcess | Schedule | None, num_classes: int | None
) -> Callable[[nn.Module, tuple[Tensor, ...], torch.Generator], Tensor]:
    """``loss(model, (tokens, loss_mask[, labels]), generator)`` for the trainer, in nats per
    counted token: next-token cross-entropy for ``ar``; D3PM's ``L_vb + lambda CE`` over ``T``
    steps for the D3PM kinds; the block bound for ``block``; the continuous-time bound of the
    process otherwise. Labels are replaced by the null label with probability ``cond_drop``. The
    ``gaussian`` kinds: seed 000's loss (:func:`.continuous.make_loss`)."""
    d = cfg.diffusion
    if isinstance(process, Schedule):
        return continuous.make_loss(cfg, process)

    def loss(model: nn.Module, batch: tuple[Tensor, ...], generator: torch.Generator) -> Tensor:
        tokens, loss_mask = batch[0], batch[1]
        cond = None
        if num_classes is not None:
            cond = drop_labels(batch[2], num_classes, cfg.cond_drop, generator)
        if process is None:
            nll = ar_token_nll(model, tokens, cond)
            return (nll * loss_mask).sum() / loss_mask.sum().clamp_min(1)
        options = {"loss_mask": loss_mask, "cond": cond, "generator": generator}
        if d.kind == "block":  # BD3-LM: every block in one two-stream call
            options.update(given(stratified=d.stratified), mask_range=cfg.mask_range)
            return block_diffusion_loss(model, process, tokens, cfg.block_size, **options).loss
        if KINDS[d.kind].discrete_time:
            options.update(given(ce_weight=d.hybrid_lambda))
            return d3pm_loss(model, process, tokens, d.T, **options).loss
        options.update(given(stratified=d.stratified))
        return continuous_time_loss(model, process, tokens, **options).loss

    return loss


# ---------------------------------------------------------------- the loaded model


@dataclass
class LoadedTextModel:
    """A trained text model: the EMA network (eval mode), its tokenizer, its token process
    (``None`` for ``ar``, the Gaussian schedule for the ``gaussian`` kinds), the run's config,
    class names (labelled runs), training step and folder."""

    net: nn.Module
    tokenizer: Tokenizer
    process: Any
    config: TextConfig
    class_names: list[str] | None
    step: int
    folder: Path | None = None

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
