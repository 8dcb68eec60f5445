"""Speculative decoding with a diffusion drafter (:mod:`difflab.discrete.speculative`): on a
vocabulary and length small enough to enumerate every sequence, its output law is the
autoregressive target's (chi-square test and total variation under a concentration bound, for
a bad drafter, a good one and an exact one, in both exact drafter modes); greedy decoding is the
target's greedy text token for token, across windows and EOS."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from scipy.stats import chi2

from difflab.discrete.autoregressive import autoregressive_sample
from difflab.discrete.process import MaskedProcess
from difflab.discrete.samplers import adjust_log_probs
from difflab.discrete.speculative import _Drafter, check_draft_steps, speculative_sample
from difflab.nets.transformer import TextTransformer

VOCAB, MASK, BOS = 4, 3, 0  # the target never emits MASK: data tokens are 0, 1, 2
LENGTH, SAMPLES, DELTA = 4, 30_000, 1e-4


def randomized(model: TextTransformer, seed: int, scale: float) -> TextTransformer:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return model.eval()


def make_target(seed: int = 0, context: int = LENGTH) -> TextTransformer:
    net = randomized(TextTransformer(VOCAB, context + 1, width=16, depth=1, causal=True), seed, 0.4)
    with torch.no_grad():
        net.head.bias[MASK] = -1e4
    return net


def bad_drafter(seed: int = 7) -> TextTransformer:
    """A random bidirectional network: its proposals are far from the target's law."""
    net = TextTransformer(VOCAB, 8, width=16, depth=1, time_conditioning=False)
    return randomized(net, seed, 0.8)


def good_drafter(target: TextTransformer, noise: float):
    """``q`` = the target's next-token logits at the first masked position (given the tokens
    before it), plus a fixed perturbation of size ``noise`` (0: the target's law exactly)."""
    bias = noise * torch.randn(VOCAB, generator=torch.Generator().manual_seed(3))

    def model(x, t, cond):
        first = int((x == MASK).long().argmax(1)[0])
        read = torch.cat([torch.full_like(x[:, :1], BOS), x[:, :first]], dim=1)
        logits = torch.zeros(*x.shape, VOCAB)
        logits[:, first:] = (target(read)[:, -1] + bias)[:, None]
        return logits

    return model


def target_law(target: TextTransformer, temperature: float, top_p: float) -> dict:
    """The exact law of ``LENGTH`` tokens after ``<bos>``: every sequence of data tokens."""
    seqs = torch.tensor(list(itertools.product(range(MASK), repeat=LENGTH)))
    with torch.no_grad():
        reads = torch.cat([torch.full_like(seqs[:, :1], BOS), seqs[:, :-1]], dim=1)
        log_p = adjust_log_probs(target(reads).log_softmax(-1), temperature, top_p)
        log_law = log_p.gather(-1, seqs[..., None]).squeeze(-1).sum(1)
    return {tuple(s.tolist()): float(p) for s, p in zip(seqs, log_law.exp(), strict=True)}


def fit(samples: torch.Tensor, law: dict) -> tuple[float, float, float]:
    """``(chi-square p-value, total variation, its concentration bound)`` of the rows of
    ``samples`` against ``law``; bins expected below 5 are pooled for the chi-square. The bound
    ``1/2 sqrt(K / N) + sqrt(log(1 / DELTA) / (2 N))`` holds with probability 1 - DELTA
    (the mean of the empirical TV, then McDiarmid: one sample moves it by at most 1 / N)."""
    n = len(samples)
    counts = dict.fromkeys(law, 0)
    for row in samples.tolist():
        counts[tuple(row)] = counts.get(tuple(row), 0) + 1  # an unknown row is a failure
    assert set(counts) == set(law), "a sequence outside the target's support"
    tv = 0.5 * sum(abs(counts[s] / n - p) for s, p in law.items())
    bound = 0.5 * math.sqrt(len(law) / n) + math.sqrt(math.log(1 / DELTA) / (2 * n))
    big = [s for s, p in law.items() if p * n >= 5]
    observed = [counts[s] for s in big] + [n - sum(counts[s] for s in big)]
    expected = [law[s] * n for s in big] + [n - sum(law[s] * n for s in big)]
    if expected[-1] < 1e-9:
        observed, expected = observed[:-1], expected[:-1]
    stat = sum((o - e) ** 2 / e for o, e in zip(observed, expected, strict=True))
    return float(chi2.sf(stat, len(observed) - 1)), tv, bound


def speculate(target, drafter, draft_length, draft_steps, temperature=1.0, top_p=1.0, seed=0,
              drafter_context=8):  # fmt: skip
    return speculative_sample(
        target, drafter, MaskedProcess(VOCAB, MASK), (SAMPLES, LENGTH), context_length=LENGTH,
        block_length=LENGTH, drafter_context=drafter_context, draft_length=draft_length,
        draft_steps=draft_steps, bos_id=BOS, temperature=temperature, top_p=top_p,
        generator=torch.Generator().manual_seed(seed),
    )  # fmt: skip


@pytest.mark.parametrize(
    ("drafter", "draft_length", "draft_steps", "temperature", "top_p", "window"),
    [
        ("bad", 2, 2, 1.0, 1.0, 8),  # left to right
        ("bad", 3, 1, 1.0, 1.0, 8),  # one parallel step
        ("bad", 3, 3, 0.7, 0.9, 8),  # temperature and nucleus on both laws
        ("bad", 2, 1, 1.0, 1.0, 3),  # a drafter that reads the last token only: q is still
        # a function of the past, so the law stays exact
        ("good", 3, 3, 1.0, 1.0, 8),
        ("exact", 3, 3, 1.0, 1.0, 8),  # every draft accepted: the bonus token's law too
    ],
)
def test_output_law_is_the_targets(drafter, draft_length, draft_steps, temperature, top_p, window):
    target = make_target()
    net = {"bad": bad_drafter(), "good": good_drafter(target, 0.5)}.get(drafter)
    if net is None:
        net = good_drafter(target, 0.0)
    law = target_law(target, temperature, top_p)
    result = speculate(target, net, draft_length, draft_steps, temperature, top_p,
                       drafter_context=window)  # fmt: skip
    p_value, tv, bound = fit(result.tokens, law)
    assert p_value > DELTA and tv < bound, (p_value, tv, bound)
    assert result.drafted > 0 and result.rounds > 0
    if drafter == "exact":
        assert result.acceptance_rate > 0.999
    elif drafter == "good":
        assert result.acceptance_rate > 0.6  # a good drafter is accepted most of the time
    else:
        assert result.acceptance_rate < 0.8


def test_the_bad_drafter_alone_fails_the_same_test():
    """The test has power: the drafter's own proposals, unverified, are rejected by it."""
    target = make_target()
    law = target_law(target, 1.0, 1.0)
    draft = _Drafter(bad_drafter(), MaskedProcess(VOCAB, MASK), 8, LENGTH, 1.0, None,
                     torch.Generator().manual_seed(0))  # fmt: skip
    with torch.inference_mode():
        proposals, _ = draft(torch.zeros(SAMPLES, 0, dtype=torch.long), LENGTH)
    p_value, tv, bound = fit(proposals, law)
    assert p_value < DELTA and tv > bound


@pytest.mark.parametrize("draft_steps", ["parallel", "left-to-right"])
def test_greedy_is_the_targets_greedy_text(draft_steps):
    context, length, block, eos = 12, 40, 5, 2
    target = randomized(TextTransformer(VOCAB, context + 1, width=16, depth=2, causal=True), 1, 0.3)
    drafter = bad_drafter()
    prompt = torch.tensor([[1, 2, 1], [2, 2, 0], [0, 1, 1]])
    for eos_id in (None, eos):
        options = dict(context_length=context, block_length=block, prompt=prompt, bos_id=BOS,
                       temperature=0.0, eos_id=eos_id, pad_id=1)  # fmt: skip
        ar = autoregressive_sample(target, (3, length), **options)
        spec = speculative_sample(
            target, drafter, MaskedProcess(VOCAB, MASK), (3, length), drafter_context=8,
            draft_length=4, draft_steps=1 if draft_steps == "parallel" else 4, **options,
        )  # fmt: skip
        assert torch.equal(spec.tokens, ar.tokens)
        assert torch.equal(spec.lengths, ar.lengths)
        assert spec.rounds > 0


def test_other_drafter_step_counts_are_refused():
    check_draft_steps(4, 1)
    check_draft_steps(4, 4)
    for steps in (2, 3, 5):
        with pytest.raises(ValueError, match="would not be exact"):
            check_draft_steps(4, steps)
