"""Generation from a trained text model: passages of any length, from a prompt, for a label.

A passage holds ``length`` tokens, the prompt included, and ends before its first ``<eos>``; the
prompt is its given prefix, never noised. Diffusion kinds run a token sampler of
:data:`~difflab.discrete.samplers.TOKEN_SAMPLERS` over the grid ``t_i = 1 - i / steps`` in
windows of the model's context (:func:`~difflab.discrete.samplers.semi_autoregressive_sample`):
the first fills the context after the prompt, each later one keeps the last
``context - block`` tokens given and adds ``block`` new ones (a passage that fits the context is
one window; ``semi-ar`` is cached ancestral sampling inside the windows). ``ar`` samples token
by token with a key/value cache in the same windows
(:func:`~difflab.discrete.autoregressive.autoregressive_sample`). Both run one window at a time
and stop once every row has ended (its tokens after ``<eos>`` would be ``<pad>`` anyway), with a
progress bar on a terminal once sampling takes more than a moment; the passages are drawn in
chunks of rows that bound the memory of one network call (:func:`rows_per_chunk`: the same
samples as one batch whenever ``n`` fits one chunk), and a request of more tokens than
:data:`MAX_TOKENS` is refused. A labelled run samples given a label; with guidance ``w > 0`` the
diffusion kinds use classifier-free guidance
``log p_w(x_0 | x_t, c) = (1 + w) log p(x_0 | x_t, c) - w log p(x_0 | x_t)``
(:func:`~difflab.discrete.samplers.classifier_free_guidance`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from difflab.config import choose
from difflab.data.text import BOS_ID, EOS_ID, PAD_ID, UNK_ID, Tokenizer
from difflab.discrete.autoregressive import autoregressive_sample
from difflab.discrete.block import block_sample
from difflab.discrete.samplers import (
    TOKEN_SAMPLERS,
    DiscreteSamples,
    classifier_free_guidance,
    semi_autoregressive_sample,
    truncate_at_eos,
    uniform_times,
)
from difflab.errors import UserError
from difflab.recipes import class_labels, finite, flag, positive_int, seed_value
from difflab.recipes.text.train import LoadedTextModel


@dataclass(frozen=True)
class Settings:
    """The options of one request, checked, with the run's ``sample`` section filling the
    others (``steps`` and ``sampler`` are unused by ``ar``)."""

    length: int
    temperature: float
    top_p: float
    steps: int
    sampler: str
    guidance: float
    block: int
    seed: int


#: The most tokens one request returns (passages times length): their ids and text must fit in
#: memory at once.
MAX_TOKENS = 100_000_000
#: The floats one network call of a chunk of rows may hold (logits, activations, attention
#: scores): 2**27, half a GiB in float32.
CALL_BUDGET = 2**27
#: Seconds of sampling after which a progress bar appears (on a terminal): none for quick ones.
PROGRESS_DELAY = 2.0


def generate_tokens(
    model: LoadedTextModel,
    n: int,
    *,
    prompt: str | None = None,
    length: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    steps: int | None = None,
    sampler: str | None = None,
    label: Any = None,
    guidance: float | None = None,
    seed: int | None = None,
) -> DiscreteSamples:
    """Token ids ``(n, length)`` of ``n`` passages, each cut after its first ``<eos>`` (then
    ``<pad>``); the options are those of :meth:`TextRecipe.sample`."""
    s = settings(model, length=length, temperature=temperature, top_p=top_p, steps=steps,
                 sampler=sampler, guidance=guidance, seed=seed)  # fmt: skip
    if n * s.length > MAX_TOKENS:
        raise UserError(f"{n:,} passages of {s.length:,} tokens ({n * s.length:,} tokens) will "
                        f"not fit in memory; ask for at most {MAX_TOKENS:,} tokens in all "
                        f"(fewer passages or a shorter {flag('length')})")  # fmt: skip
    prompt_tokens = encode_prompt(model.tokenizer, prompt, s.length, n, model.device)
    cond = class_condition(model, label, n, s.guidance)
    generator = torch.Generator(model.device).manual_seed(s.seed)
    given = 0 if prompt_tokens is None else prompt_tokens.shape[1]
    chunks = torch.arange(n).split(rows_per_chunk(model))
    windows = window_count(given, s.length, model.context, s.block)
    if model.process is None:
        draw, total = draw_autoregressive, len(chunks) * (s.length - given)
        unit = "token"
    elif model.kind == "block":
        draw, total, unit = draw_block, len(chunks) * (s.length - given), "token"
    else:
        draw, total, unit = draw_diffusion, len(chunks) * windows * s.steps, "step"
    parts = []
    # On a terminal only (disable=None), and once sampling has taken PROGRESS_DELAY seconds.
    with tqdm(total=total, desc="sampling", unit=unit, disable=None, delay=PROGRESS_DELAY) as bar:
        for rows in chunks:
            part_prompt = None if prompt_tokens is None else prompt_tokens[rows]
            part_cond = None if cond is None else cond[rows]
            parts.append(draw(model, (len(rows), s.length), s, part_prompt, part_cond,
                              generator, bar))  # fmt: skip
    if len(parts) == 1:
        return parts[0]
    return DiscreteSamples(torch.cat([p.tokens for p in parts]),
                           torch.cat([p.lengths for p in parts]),
                           max(p.nfe for p in parts))  # fmt: skip


def rows_per_chunk(model: LoadedTextModel) -> int:
    """How many passages are drawn at once: as many as keep one network call within
    :data:`CALL_BUDGET` floats, counting per row ``L (V + 4 width + heads L)`` for a context of
    ``L`` tokens (logits over ``V`` ids, the widest activations, the attention scores)."""
    net = model.net
    tokens = model.context + 1  # the causal model also reads <bos>
    per_row = tokens * (model.tokenizer.vocab_size + 4 * net.width + net.num_heads * tokens)
    return max(1, CALL_BUDGET // per_row)


def decode(model: LoadedTextModel, samples: DiscreteSamples) -> list[str]:
    """The passages of ``samples`` as text (special tokens dropped)."""
    return [model.tokenizer.decode(row) for row in samples.tokens.cpu()]


# ---------------------------------------------------------------- the request


def settings(
    model: LoadedTextModel,
    *,
    length: int | None,
    temperature: float | None,
    top_p: float | None,
    steps: int | None,
    sampler: str | None,
    guidance: float | None,
    seed: int | None,
) -> Settings:
    """The options given, checked, else the run's: an option that does not apply to the model
    (``steps``, ``sampler`` or ``guidance`` for ``ar``, ``guidance`` without labels) is
    refused."""
    cfg = model.config
    s = cfg.sample
    if model.process is None:
        for name, value in (("steps", steps), ("sampler", sampler), ("guidance", guidance)):
            if value is not None:
                raise UserError(f"{flag(name)} does not apply to ar models: they sample token by "
                                "token with a key/value cache")  # fmt: skip
    if sampler is not None and model.kind == "block":
        raise UserError(f"{flag('sampler')} does not apply to block runs: they denoise block by "
                        "block with a key/value cache")  # fmt: skip
    if guidance is not None and model.class_names is None:
        raise UserError(f"{flag('guidance')} applies to labelled runs (data.labels) only")
    if sampler is not None:
        choose(flag("sampler"), sampler, TOKEN_SAMPLERS)
    return Settings(
        length=(s.length or model.context) if length is None else positive_int("length", length),
        temperature=s.temperature if temperature is None else finite("temperature", temperature, 0),
        top_p=s.top_p if top_p is None else _nucleus(top_p),
        steps=cfg.sample_steps if steps is None else positive_int("steps", steps),
        sampler=cfg.sampler if sampler is None else sampler,
        guidance=(s.guidance or 0.0) if guidance is None else finite("guidance", guidance, 0),
        block=cfg.block,
        seed=s.seed if seed is None else seed_value(seed),
    )


def _nucleus(top_p: float) -> float:
    value = finite("top_p", top_p)
    if not 0.0 < value <= 1.0:
        raise UserError(f"{flag('top_p')} must be in (0, 1], got {top_p!r}")
    return value


def encode_prompt(
    tokenizer: Tokenizer, prompt: str | None, length: int, n: int, device: torch.device
) -> Tensor | None:
    """The ``(n, P)`` ids of ``prompt`` for ``n`` passages (``None`` when empty); a character
    outside the vocabulary, or a prompt that leaves no room in ``length`` tokens, is refused."""
    if not prompt:
        return None
    ids = tokenizer.encode(prompt)
    if UNK_ID in ids:
        unknown = "".join(sorted({c for c in prompt if UNK_ID in tokenizer.encode(c)}))
        raise UserError(f"the prompt has characters outside this model's vocabulary: {unknown!r}")
    if len(ids) >= length:
        raise UserError(f"the prompt has {len(ids)} tokens; the length ({length}) must exceed it")
    return torch.tensor([ids], dtype=torch.long, device=device).expand(n, -1)


def class_condition(model: LoadedTextModel, label: Any, n: int, guidance: float) -> Tensor | None:
    """The ``(n,)`` labels of ``label`` (:func:`~difflab.recipes.class_labels`; ``None``:
    unconditional); guidance needs a label to guide towards."""
    labels = class_labels(label, model.class_names, n)
    if labels is None and guidance > 0:
        raise UserError(f"{flag('guidance')} needs a {flag('label')} to guide towards")
    return None if labels is None else labels.to(model.device)


# ---------------------------------------------------------------- the draws


def draw_autoregressive(
    model: LoadedTextModel,
    shape: tuple[int, int],
    s: Settings,
    prompt: Tensor | None,
    cond: Tensor | None,
    generator: torch.Generator,
    bar: tqdm,
) -> DiscreteSamples:
    """``x_i ~ p(x_i | <bos>, x_<i)`` token by token, one window at a time (:func:`in_windows`);
    ``bar`` counts the tokens."""

    def window(out: Tensor, end: int) -> DiscreteSamples:
        result = autoregressive_sample(
            model.net, (shape[0], end), context_length=model.context, block_length=s.block,
            prompt=out, bos_id=BOS_ID, temperature=s.temperature, top_p=s.top_p, cond=cond,
            eos_id=EOS_ID, pad_id=PAD_ID, generator=generator, device=model.device,
        )  # fmt: skip
        bar.update(end - out.shape[1])
        return result

    return in_windows(model, shape, s, prompt, window)


def draw_diffusion(
    model: LoadedTextModel,
    shape: tuple[int, int],
    s: Settings,
    prompt: Tensor | None,
    cond: Tensor | None,
    generator: torch.Generator,
    bar: tqdm,
) -> DiscreteSamples:
    """The sampler ``s.sampler`` over ``s.steps`` steps in each window (:func:`in_windows`),
    guided when ``s.guidance > 0``; ``bar`` counts the steps."""
    denoiser: Any = model.net
    if s.guidance > 0:
        denoiser = classifier_free_guidance(model.net, s.guidance, torch.tensor(model.num_classes))

    def window(out: Tensor, end: int) -> DiscreteSamples:
        try:
            return semi_autoregressive_sample(
                denoiser, model.process, (shape[0], end), uniform_times(s.steps),
                context_length=model.context, block_length=s.block, prompt=out, cond=cond,
                temperature=s.temperature, top_p=s.top_p, generator=generator,
                device=model.device, callback=_ticks(bar), **_inner_sampler(s.sampler),
            )  # fmt: skip
        except ValueError as e:
            raise UserError(f"sampler {s.sampler}: {e}") from None

    return in_windows(model, shape, s, prompt, window)


def draw_block(
    model: LoadedTextModel,
    shape: tuple[int, int],
    s: Settings,
    prompt: Tensor | None,
    cond: Tensor | None,
    generator: torch.Generator,
    bar: tqdm,
) -> DiscreteSamples:
    """Block diffusion: ``s.steps`` steps per block of ``diffusion.block_size`` tokens, with a
    key/value cache over the finished blocks (:func:`~difflab.discrete.block.block_sample`), one
    window at a time (:func:`in_windows`); ``bar`` counts the tokens."""

    def window(out: Tensor, end: int) -> DiscreteSamples:
        keep = min(out.shape[1], model.context - (end - out.shape[1]))
        result = block_sample(
            model.net, model.process, (shape[0], keep + end - out.shape[1]),
            block_size=model.config.block_size, steps=s.steps, prompt=out[:, out.shape[1] - keep :],
            temperature=s.temperature, top_p=s.top_p, eos_id=EOS_ID, generator=generator,
            device=model.device,
        )  # fmt: skip
        bar.update(end - out.shape[1])
        tokens = torch.cat([out, result.tokens[:, keep:]], dim=1)
        return DiscreteSamples(tokens, result.lengths, result.nfe)

    return in_windows(model, shape, s, prompt, window)


def in_windows(
    model: LoadedTextModel,
    shape: tuple[int, int],
    s: Settings,
    prompt: Tensor | None,
    window: Callable[[Tensor, int], DiscreteSamples],
) -> DiscreteSamples:
    """The ``(B, length)`` passages of ``shape`` after ``prompt``, one window per call of
    ``window(out, end)`` (which returns ``out`` followed by its tokens up to ``end``): the
    windows of one long call of the samplers, which carry their random numbers over through the
    generator, so the samples are theirs. Stops once every row holds an ``<eos>``: what would
    follow it is ``<pad>`` in the result anyway."""
    B, length = shape
    out = torch.zeros(B, 0, dtype=torch.long, device=model.device) if prompt is None else prompt
    nfe = 0
    while out.shape[1] < length and not bool((out == EOS_ID).any(1).all()):
        done = out.shape[1]
        end = min(length, done + max(s.block, model.context - done))
        result = window(out, end)
        out, nfe = result.tokens, nfe + result.nfe
    out = torch.nn.functional.pad(out, (0, length - out.shape[1]), value=PAD_ID)
    tokens, lengths = truncate_at_eos(out, EOS_ID, PAD_ID)
    return DiscreteSamples(tokens, lengths, nfe)


def window_count(prompt: int, length: int, context: int, block: int) -> int:
    """How many windows :func:`semi_autoregressive_sample` runs for ``length`` tokens after a
    ``prompt`` of that many: the first adds ``max(block, context - prompt)`` tokens, each later
    one ``block``."""
    first = max(block, context - prompt)
    return 1 + math.ceil(max(0, length - prompt - first) / block)


def _inner_sampler(name: str) -> dict[str, Any]:
    """The ``sampler`` option of the windows: the one named, except ``semi-ar``, which is the
    windowing itself (with cached ancestral sampling inside)."""
    sampler = TOKEN_SAMPLERS[name]
    return {} if sampler is semi_autoregressive_sample else {"sampler": sampler}


def _ticks(bar: tqdm) -> Any:
    """A sampler callback advancing ``bar`` once per step (``None`` when the bar is hidden)."""
    if bar.disable:
        return None

    def tick(*_: Any) -> None:
        bar.update()

    return tick
