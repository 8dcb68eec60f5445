"""Held-out likelihood of a text model, in the units of :mod:`difflab.evaluate.text_metrics`.

With ``N`` nats per token, the perplexity (bound) is ``exp(N)`` and the bits per character
``N * (tokens / characters) / ln 2``, where tokens and characters are counted over the whole
held-out split. ``ar`` gives its exact negative log-likelihood; the diffusion kinds give their
NELBO, an upper bound on it, so the two are compared per token on the same rows.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from difflab.discrete.block import block_diffusion_loss
from difflab.discrete.objectives import continuous_time_loss, d3pm_loss, mask_count_loss
from difflab.errors import UserError
from difflab.evaluate.text_metrics import bits_per_character
from difflab.recipes import Evaluation, flag, positive_int, seed_value
from difflab.recipes.text.config import KINDS, TextConfig
from difflab.recipes.text.train import (
    LoadedTextModel,
    TextSplit,
    ar_token_nll,
    load_splits,
    pack_split,
)

#: Held-out rows scored per network call (one progress-bar tick), and the draws of the noise
#: level per row when ``t_samples`` is left empty. One call scores every draw of its rows, at
#: most ``EVAL_BATCH * TIME_SAMPLES`` of them (fewer rows per call for more draws), so
#: ``t_samples`` is at most that.
EVAL_BATCH = 64
TIME_SAMPLES = 4
MAX_TIME_SAMPLES = EVAL_BATCH * TIME_SAMPLES


def held_out_rows(model: LoadedTextModel) -> tuple[Tensor, Tensor, Tensor | None, TextSplit]:
    """``(tokens, loss_mask, labels, split)``: the held-out split packed like the training data."""
    _, held, _ = load_splits(model.config.data)
    if not held.documents:
        raise UserError("this run's data has no held-out text")
    tokens, loss_mask, labels = pack_split(held, model.tokenizer, model.context)
    return tokens, loss_mask, labels, held


def count_form(cfg: TextConfig) -> bool:
    """Whether ``cfg``'s bound can be drawn through the number of masked tokens: MDLM whose
    network does not read ``t``."""
    return cfg.diffusion.kind == "mdlm" and not cfg.time_conditioning


@torch.inference_mode()
def score_held_out(
    model: LoadedTextModel,
    *,
    n: int = 256,
    seed: int = 0,
    t_samples: int | None = None,
    progress: bool = False,
) -> Evaluation:
    """Negative log-likelihood per token on ``n`` held-out rows spread evenly over the held-out
    split: for ``ar`` the exact value, for the diffusion kinds the NELBO estimated with
    ``t_samples`` draws per row spread over the noise levels (empty: 4, at most
    :data:`MAX_TIME_SAMPLES`, with fewer rows per batch beyond 4; D3PM kinds: their
    ``T``-step ``L_vb``; the others: the continuous-time bound of their process). MDLM with a
    time-agnostic network (the default) is scored in the bound's mask-count form
    (:func:`mask_count_loss`: the same bound, lower variance); it is trained in the time form,
    which trained better (docs/BENCHMARKS.md). Labelled runs are scored given each row's label.

    Metrics: ``kind``, ``step``, ``bound`` (True for diffusion), ``sequences``, ``tokens``
    (scored), ``nats_per_token`` and its Monte Carlo/row-sampling ``nats_per_token_stderr``
    (ratio estimator), ``bits_per_token``, ``perplexity`` (``exp`` of nats per token),
    ``split_tokens`` and ``split_characters`` (whole held-out split) and
    ``bits_per_character = nats_per_token * split_tokens / split_characters / ln 2``.
    """
    positive_int("n", n)
    seed_value(seed)
    if model.process is not None:
        repeats = TIME_SAMPLES if t_samples is None else positive_int("t_samples", t_samples)
        if repeats > MAX_TIME_SAMPLES:
            raise UserError(f"{flag('t_samples')} must be at most {MAX_TIME_SAMPLES} (draws of "
                            f"the noise level per row, all in one batch), got {repeats:,}: "
                            f"score more rows with --n instead")  # fmt: skip
    elif t_samples is None:
        repeats = 1
    else:
        raise UserError(f"{flag('t_samples')} does not apply to ar models: their likelihood is "
                        "exact")  # fmt: skip
    tokens, loss_mask, labels, held = held_out_rows(model)
    rows = torch.linspace(0, len(tokens) - 1, min(n, len(tokens))).round().long()
    generator = torch.Generator(model.device).manual_seed(seed)
    sums, counts = [], []
    batch = EVAL_BATCH if repeats <= TIME_SAMPLES else max(1, MAX_TIME_SAMPLES // repeats)
    for chunk in tqdm(rows.split(batch), desc="eval", unit="batch", disable=not progress):
        # Row r's draws sit len(chunk) apart in the batch: in strata 1 / repeats apart.
        x0 = tokens[chunk].to(model.device).repeat(repeats, 1)
        mask = loss_mask[chunk].to(model.device).repeat(repeats, 1)
        cond = None if labels is None else labels[chunk].to(model.device).repeat(repeats)
        token_nll = _token_nll(model, x0, mask, cond, generator)
        sums.append(token_nll.double().sum(1).view(repeats, -1).mean(0))
        counts.append(loss_mask[chunk].sum(1).double())
    metrics = _metrics(model, torch.cat(sums).cpu(), torch.cat(counts), loss_mask, held)
    summary = ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                        for k, v in metrics.items())  # fmt: skip
    return Evaluation(metrics, summary)


def _token_nll(
    model: LoadedTextModel,
    x0: Tensor,
    mask: Tensor,
    cond: Tensor | None,
    generator: torch.Generator,
) -> Tensor:
    """``(B, L)`` nats per token of the rows ``x0``: exact for ``ar``, else one draw of the
    NELBO."""
    process, d = model.process, model.config.diffusion
    if process is None:
        return ar_token_nll(model.net, x0, cond) * mask
    if d.kind == "block":
        return block_diffusion_loss(model.net, process, x0, model.config.block_size,
                                    loss_mask=mask, generator=generator).token_nelbo  # fmt: skip
    if KINDS[d.kind].discrete_time:
        return d3pm_loss(model.net, process, x0, d.T, loss_mask=mask, cond=cond,
                         generator=generator).token_nelbo  # fmt: skip
    objective = mask_count_loss if count_form(model.config) else continuous_time_loss
    return objective(model.net, process, x0, loss_mask=mask, cond=cond,
                     generator=generator).token_nelbo  # fmt: skip


def _metrics(
    model: LoadedTextModel,
    row_sums: Tensor,
    row_counts: Tensor,
    loss_mask: Tensor,
    held: TextSplit,
) -> dict[str, Any]:
    """The figures of :func:`score_held_out` from each row's summed nats and token count."""
    nats = float(row_sums.sum() / row_counts.sum())
    stderr = float((row_sums - nats * row_counts).square().sum().sqrt() / row_counts.sum())
    split_tokens, split_characters = int(loss_mask.sum()), held.characters
    return {
        "kind": model.kind,
        "step": model.step,
        "bound": model.process is not None,
        "sequences": len(row_sums),
        "tokens": int(row_counts.sum()),
        "nats_per_token": nats,
        "nats_per_token_stderr": stderr,
        "bits_per_token": nats / math.log(2.0),
        "perplexity": math.exp(nats),
        "split_tokens": split_tokens,
        "split_characters": split_characters,
        "bits_per_character": bits_per_character(nats, split_tokens, split_characters),
    }
