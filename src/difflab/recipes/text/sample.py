"""Generation from a trained text model: passages of any length, from a prompt, for a label.

A passage holds ``length`` tokens, the prompt included, and ends before its first ``<eos>``; the
prompt is its given prefix, never noised. Diffusion kinds run a token sampler of
:data:`~difflab.discrete.samplers.TOKEN_SAMPLERS` over the grid ``t_i = 1 - i / steps`` in
windows of the model's context (:func:`~difflab.discrete.samplers.semi_autoregressive_sample`):
the first fills the context after the prompt, each later one keeps the last
``context - block`` tokens given and adds ``block`` new ones (a passage that fits the context is
one window; ``semi-ar`` is cached ancestral sampling inside the windows). ``ar`` samples token
by token with a key/value cache in the same windows
(:func:`~difflab.discrete.autoregressive.autoregressive_sample`) and stops once every row has
ended. A labelled run samples given a label; with guidance ``w > 0`` the diffusion kinds use
classifier-free guidance ``log p_w(x_0 | x_t, c) = (1 + w) log p(x_0 | x_t, c) - w log p(x_0 |
x_t)`` (:func:`~difflab.discrete.samplers.classifier_free_guidance`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from difflab.config import choose
from difflab.data.text import BOS_ID, EOS_ID, PAD_ID, UNK_ID, Tokenizer
from difflab.discrete.autoregressive import autoregressive_sample
from difflab.discrete.samplers import (
    TOKEN_SAMPLERS,
    DiscreteSamples,
    classifier_free_guidance,
    semi_autoregressive_sample,
    uniform_times,
)
from difflab.errors import UserError
from difflab.recipes import class_labels, finite, flag, positive_int
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
    prompt_tokens = encode_prompt(model.tokenizer, prompt, s.length, n, model.device)
    cond = class_condition(model, label, n, s.guidance)
    generator = torch.Generator(model.device).manual_seed(s.seed)
    draw = draw_autoregressive if model.process is None else draw_diffusion
    return draw(model, (n, s.length), s, prompt_tokens, cond, generator)


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
        seed=s.seed if seed is None else _seed(seed),
    )


def _nucleus(top_p: float) -> float:
    value = finite("top_p", top_p)
    if not 0.0 < value <= 1.0:
        raise UserError(f"{flag('top_p')} must be in (0, 1], got {top_p!r}")
    return value


def _seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise UserError(f"{flag('seed')} must be a whole number >= 0, got {seed!r}")
    return seed


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
) -> DiscreteSamples:
    """``x_i ~ p(x_i | <bos>, x_<i)`` token by token; stops once every row has ended."""
    return autoregressive_sample(
        model.net, shape, context_length=model.context, block_length=s.block, prompt=prompt,
        bos_id=BOS_ID, temperature=s.temperature, top_p=s.top_p, cond=cond, eos_id=EOS_ID,
        pad_id=PAD_ID, generator=generator, device=model.device,
    )  # fmt: skip


def draw_diffusion(
    model: LoadedTextModel,
    shape: tuple[int, int],
    s: Settings,
    prompt: Tensor | None,
    cond: Tensor | None,
    generator: torch.Generator,
) -> DiscreteSamples:
    """The sampler ``s.sampler`` over ``s.steps`` steps in each window, guided when
    ``s.guidance > 0``; a progress bar counts the steps when there are several windows."""
    denoiser: Any = model.net
    if s.guidance > 0:
        denoiser = classifier_free_guidance(model.net, s.guidance, torch.tensor(model.num_classes))
    given = 0 if prompt is None else prompt.shape[1]
    windows = window_count(given, shape[1], model.context, s.block)
    with tqdm(total=windows * s.steps, desc="sampling", unit="step",
              disable=True if windows == 1 else None) as bar:  # fmt: skip
        try:
            return semi_autoregressive_sample(
                denoiser, model.process, shape, uniform_times(s.steps),
                context_length=model.context, block_length=s.block, prompt=prompt, cond=cond,
                temperature=s.temperature, top_p=s.top_p, eos_id=EOS_ID, pad_id=PAD_ID,
                generator=generator, device=model.device, callback=_ticks(bar),
                **_inner_sampler(s.sampler),
            )  # fmt: skip
        except ValueError as e:
            raise UserError(f"sampler {s.sampler}: {e}") from None


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
