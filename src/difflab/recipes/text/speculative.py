"""``difflab sample RUN_AR --draft RUN_DLM --draft-length G --draft-steps S``: an autoregressive
run's passages drawn by speculative decoding with a masked diffusion drafter
(:mod:`difflab.discrete.speculative`), with exactly the law of the run's own sampler.

The target is an ``ar`` run, the drafter a run of a masked kind (``mdlm``, ``d3pm-absorbing``)
with the same tokenizer; neither may be labelled. ``G`` (empty: :data:`DEFAULT_DRAFT_LENGTH`)
tokens are proposed per round in ``S`` drafter calls, ``S = G`` (left to right, the default) or
``S = 1`` (one parallel step): the two modes in which the drafter's proposal probabilities are
its true conditionals; any other ``S`` is refused. The other options (prompt, length,
temperature, top-p, seed) are those of the run's own sampling (:mod:`.sample`).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from difflab.data.text import BOS_ID, EOS_ID, PAD_ID, Tokenizer
from difflab.discrete.process import MaskedProcess
from difflab.discrete.speculative import SpeculativeSamples, check_draft_steps, speculative_sample
from difflab.errors import UserError
from difflab.recipes import flag, positive_int
from difflab.recipes.text.sample import encode_prompt, rows_per_chunk, settings
from difflab.recipes.text.train import LoadedTextModel

#: ``--draft-length`` when left empty.
DEFAULT_DRAFT_LENGTH = 4


def check_speculative_options(
    draft: Any, draft_length: int | None, draft_steps: int | None
) -> None:
    """``--draft-length`` and ``--draft-steps`` apply with ``--draft`` only."""
    if draft is None:
        for name, value in (("draft_length", draft_length), ("draft_steps", draft_steps)):
            if value is not None:
                raise UserError(f"{flag(name)} applies to speculative decoding, with --draft only")


def speculative_tokens(
    model: LoadedTextModel,
    drafter: LoadedTextModel,
    n: int,
    *,
    draft_length: int | None = None,
    draft_steps: int | None = None,
    prompt: str | None = None,
    length: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    steps: int | None = None,
    sampler: str | None = None,
    label: Any = None,
    guidance: float | None = None,
    seed: int | None = None,
) -> SpeculativeSamples:
    """Token ids ``(n, length)`` of ``n`` passages of the ``ar`` run ``model``, drafted by
    ``drafter``; the options are those of :meth:`TextRecipe.sample`."""
    if model.process is not None:
        raise UserError(f"--draft applies to ar runs (the model that verifies the drafts); this "
                        f"is a {model.kind} run")  # fmt: skip
    if not isinstance(drafter.process, MaskedProcess):
        raise UserError(f"the drafter must be a masked diffusion run (mdlm or d3pm-absorbing); "
                        f"--draft names a {drafter.kind} run")  # fmt: skip
    if label is not None or model.class_names is not None or drafter.class_names is not None:
        raise UserError("--draft works with unlabelled runs only (data.labels off)")
    if not same_tokenizer(model.tokenizer, drafter.tokenizer):
        raise UserError("the drafter and the ar run have different tokenizers: train the drafter "
                        "on the same data.source and data.tokenizer")  # fmt: skip
    g = DEFAULT_DRAFT_LENGTH if draft_length is None else positive_int("draft_length", draft_length)
    calls = g if draft_steps is None else positive_int("draft_steps", draft_steps)
    if g >= drafter.context:
        raise UserError(f"{flag('draft_length')} must be less than the drafter's context "
                        f"({drafter.context} tokens), got {g}")  # fmt: skip
    try:
        check_draft_steps(g, calls)
    except ValueError as e:
        raise UserError(str(e).replace("draft steps", "--draft-steps", 1)) from None
    s = settings(model, length=length, temperature=temperature, top_p=top_p, steps=steps,
                 sampler=sampler, guidance=guidance, seed=seed)  # fmt: skip
    prompt_tokens = encode_prompt(model.tokenizer, prompt, s.length, n, model.device)
    generator = torch.Generator(model.device).manual_seed(s.seed)
    parts = []
    for rows in torch.arange(n).split(min(rows_per_chunk(model), rows_per_chunk(drafter))):
        parts.append(speculative_sample(
            model.net, drafter.net, drafter.process, (len(rows), s.length),
            context_length=model.context, block_length=s.block, drafter_context=drafter.context,
            draft_length=g, draft_steps=calls,
            prompt=None if prompt_tokens is None else prompt_tokens[rows], bos_id=BOS_ID,
            temperature=s.temperature, top_p=s.top_p, eos_id=EOS_ID, pad_id=PAD_ID,
            generator=generator, device=model.device,
        ))  # fmt: skip
    if len(parts) == 1:
        return parts[0]
    return SpeculativeSamples(
        torch.cat([p.tokens for p in parts]), torch.cat([p.lengths for p in parts]),
        sum(p.nfe for p in parts), sum(p.drafter_nfe for p in parts),
        sum(p.drafted for p in parts), sum(p.accepted for p in parts),
        sum(p.rounds for p in parts),
    )  # fmt: skip


def same_tokenizer(a: Tokenizer, b: Tokenizer) -> bool:
    """Whether the two tokenizers are the same (their saved files are byte for byte)."""
    with tempfile.TemporaryDirectory() as folder:
        a.save(Path(folder) / "a.json")
        b.save(Path(folder) / "b.json")
        return (Path(folder) / "a.json").read_bytes() == (Path(folder) / "b.json").read_bytes()
