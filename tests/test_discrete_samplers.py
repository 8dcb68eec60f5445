"""Samplers driven by the exact oracle reproduce the data distribution.

Data: a random Dirichlet(0.3) distribution on the 27 sequences of length 3 over 3 tokens (plus a
mask token for the masked and hybrid processes): strongly dependent tokens, so a sampler that
draws tokens independently is far off (total variation 0.40 for one step, see below).

How close is close: for N i.i.d. samples from p on K outcomes the empirical total variation is
at most ``sqrt(K / N) / 2 + sqrt(log(1/delta) / (2N))`` with probability 1 - delta
(``tv_sampling_bound``: Jensen and Cauchy-Schwarz for the mean, McDiarmid for the deviation);
N = 20000, K = 27, delta = 1e-6 gives 0.037. A sampler with finitely many steps is also biased
(several tokens move in one step); that bias is computed exactly by propagating the sampler's
law over all 4^3 states (``ancestral_law``), so the tests check both that the samples follow the
sampler's exact law (TV below the sampling bound) and that this law is within the bias of p.
"""

import itertools
import math

import numpy as np
import pytest
import torch

from difflab.discrete.oracle import (
    ExactDenoiser,
    ancestral_law,
    empirical_distribution,
    enumerate_sequences,
    total_variation,
    tv_sampling_bound,
)
from difflab.discrete.process import HybridProcess, MaskedProcess, TokenProcess, UniformProcess
from difflab.discrete.samplers import (
    adjust_log_probs,
    ancestral_sample,
    classifier_free_guidance,
    confidence_sample,
    prompt_to_fixed,
    sample_categorical,
    semi_autoregressive_sample,
    truncate_at_eos,
    uniform_times,
)

F64 = torch.float64
L = 3
N = 20000
BOUND = tv_sampling_bound(27, N)

PROCESSES = {
    "masked": lambda: MaskedProcess(4, 3),
    "uniform": lambda: UniformProcess(3),
    "hybrid": lambda: HybridProcess(4, 3, p_uniform=0.3),
}


def dirichlet(count: int, seed: int) -> torch.Tensor:
    probs = np.random.default_rng(seed).dirichlet(np.full(count, 0.3))
    return torch.tensor(probs / probs.sum())


def setup(process: TokenProcess, seed: int = 0) -> ExactDenoiser:
    sequences = enumerate_sequences(process.data_tokens.nonzero().flatten(), L)
    return ExactDenoiser(process, sequences, dirichlet(len(sequences), seed))


def law_on(sequences: torch.Tensor, states: torch.Tensor, law: torch.Tensor) -> torch.Tensor:
    """Restrict a law over all states to the data sequences (same order as ``sequences``)."""
    match = (sequences.unsqueeze(1) == states.unsqueeze(0)).all(-1)  # (K, S)
    return (match.to(F64) * law).sum(-1)


# ---------------------------------------------------------------------------- ancestral


@pytest.mark.parametrize("name", list(PROCESSES))
def test_ancestral_sampler_reproduces_the_data(name):
    process = PROCESSES[name]()
    oracle = setup(process)
    steps = 32
    out = ancestral_sample(
        oracle, process, (N, L), uniform_times(steps), generator=torch.Generator().manual_seed(0)
    )
    empirical = empirical_distribution(out.tokens, oracle.sequences)
    states, law = ancestral_law(oracle, process, L, uniform_times(steps))
    exact = law_on(oracle.sequences, states, law)
    bias = total_variation(exact, oracle.probs)  # masked 0.014, uniform 0.025, hybrid 0.022
    assert bias < 0.04
    assert total_variation(empirical, exact) < BOUND
    assert total_variation(empirical, oracle.probs) < BOUND + bias
    assert out.nfe == steps and out.tokens.shape == (N, L)
    assert torch.equal(out.lengths, torch.full((N,), L))


def test_discretisation_error_decays_like_one_over_steps():
    """Exact laws (no sampling noise): TV to p halves when the number of steps doubles, and one
    step (all tokens drawn independently from their marginals) is far off."""
    for name in ("masked", "uniform"):
        process = PROCESSES[name]()
        oracle = setup(process)
        tv = {}
        for steps in (1, 25, 50, 100):
            states, law = ancestral_law(oracle, process, L, uniform_times(steps))
            tv[steps] = total_variation(law_on(oracle.sequences, states, law), oracle.probs)
        assert tv[1] > 0.3
        assert 0.4 < tv[50] / tv[25] < 0.6 and 0.4 < tv[100] / tv[50] < 0.6
        if process.absorbing:  # one step from all-mask draws every token from its marginal
            marginals = oracle.marginals(torch.full((1, L), process.mask_id), 1.0)[0]
            independent = marginals[torch.arange(L), oracle.sequences].prod(-1)
            # (the oracle evaluates t = 1 as t = 1 - 1e-9)
            assert abs(tv[1] - total_variation(independent, oracle.probs)) < 1e-6


class TimeDependent:
    """A time-conditioned denoiser (the oracle plus a t-dependent logit tilt) that counts calls."""

    def __init__(self, oracle: ExactDenoiser):
        self.oracle = oracle
        self.calls = 0

    def __call__(self, x_t, t, cond=None):
        self.calls += 1
        tilt = torch.sin(7.0 * t)[:, None, None] * torch.tensor([0.5, -0.3, 0.2, 0.0])
        return self.oracle(x_t, t) + tilt


def test_cache_changes_the_number_of_calls_not_the_samples():
    process = PROCESSES["masked"]()
    model = TimeDependent(setup(process))
    steps, B = 100, 4
    results = {}
    for cache in (True, False):
        model.calls = 0
        out = ancestral_sample(
            model,
            process,
            (B, L),
            uniform_times(steps),
            cache=cache,
            generator=torch.Generator().manual_seed(7),
        )
        assert out.nfe == model.calls
        results[cache] = out
    assert torch.equal(results[True].tokens, results[False].tokens)
    assert results[False].nfe == steps
    assert results[True].nfe <= B * L  # at most one call per unmasking event
    other = ancestral_sample(
        model, process, (B, L), uniform_times(steps), generator=torch.Generator().manual_seed(8)
    )
    assert not torch.equal(other.tokens, results[True].tokens)


@pytest.mark.parametrize("name", ["uniform", "hybrid"])
def test_uniform_and_hybrid_samplers_correct_placed_tokens(name):
    process = PROCESSES[name]()
    oracle = setup(process)
    states = []
    out = ancestral_sample(
        oracle,
        process,
        (500, L),
        uniform_times(20),
        generator=torch.Generator(),
        callback=lambda i, t, x_t, x0: states.append(x_t.clone()),
    )
    corrections = 0
    for before, after in itertools.pairwise([*states, out.tokens]):
        changed = process.data_tokens[before] & process.data_tokens[after] & (after != before)
        corrections += int(changed.sum())
    assert corrections > 0


def test_masked_sampler_never_changes_an_unmasked_token():
    process = PROCESSES["masked"]()
    oracle = setup(process)
    seen = []
    out = ancestral_sample(
        oracle,
        process,
        (500, L),
        uniform_times(20),
        callback=lambda i, t, x_t, x0: seen.append(x_t),
    )
    seen.append(out.tokens)
    for before, after in itertools.pairwise(seen):
        placed = before != process.mask_id
        assert torch.equal(before[placed], after[placed])
    assert not bool((seen[-1] == process.mask_id).any())


def test_callback_contract():
    process = PROCESSES["uniform"]()
    steps = []
    times = uniform_times(8)
    ancestral_sample(
        setup(process), process, (5, L), times, callback=lambda *step: steps.append(step)
    )
    assert [i for i, *_ in steps] == list(range(8))
    assert [t for _, t, *_ in steps] == times[:-1].tolist()  # t = 1, ..., 1/8; the last s = 0
    _, _, x_t, x0 = steps[3]
    assert x_t.shape == x0.shape == (5, L) and x0.dtype == torch.long


# ---------------------------------------------------------------------------- conditioning


@pytest.mark.parametrize("name", list(PROCESSES))
def test_infilling_never_changes_given_tokens(name):
    process = PROCESSES[name]()
    oracle = setup(process)
    given = torch.tensor([False, True, False])
    fixed_tokens = torch.tensor([0, 2, 0]).expand(N if process.absorbing else 2000, L)
    fixed_mask = given.expand_as(fixed_tokens)
    steps = 24

    def check(i, t, x_t, x0):
        assert bool((x_t[:, 1] == 2).all()) and bool((x0[:, 1] == 2).all())

    out = ancestral_sample(
        oracle,
        process,
        tuple(fixed_tokens.shape),
        uniform_times(steps),
        fixed_tokens=fixed_tokens,
        fixed_mask=fixed_mask,
        generator=torch.Generator().manual_seed(1),
        callback=check,
    )
    assert bool((out.tokens[:, 1] == 2).all())
    states, law = ancestral_law(
        oracle, process, L, uniform_times(steps), fixed_tokens=fixed_tokens[0], fixed_mask=given
    )
    exact = law_on(oracle.sequences, states, law)
    empirical = empirical_distribution(out.tokens, oracle.sequences)
    assert total_variation(empirical, exact) < tv_sampling_bound(9, out.tokens.shape[0])
    if process.absorbing:
        # Clean given tokens condition the masked denoiser exactly: p(x | x^2 = 2).
        conditional = oracle.probs * (oracle.sequences[:, 1] == 2)
        conditional = conditional / conditional.sum()
        bias = total_variation(exact, conditional)
        assert bias < 0.03
        assert total_variation(empirical, conditional) < tv_sampling_bound(9, N) + bias


def test_prompt_to_fixed():
    tokens, mask = prompt_to_fixed(torch.tensor([[5, 6]]), 4)
    assert torch.equal(tokens, torch.tensor([[5, 6, 0, 0]]))
    assert torch.equal(mask, torch.tensor([[True, True, False, False]]))


def test_classifier_free_guidance_one_batched_call():
    """Class-conditional data p(x | y), y in {0, 1}, null label 2 -> p(x) = (p0 + p1) / 2."""
    process = PROCESSES["masked"]()
    sequences = enumerate_sequences(torch.arange(3), L)
    p0, p1 = dirichlet(27, 1), dirichlet(27, 2)
    oracles = [
        ExactDenoiser(process, sequences, p0),
        ExactDenoiser(process, sequences, p1),
        ExactDenoiser(process, sequences, (p0 + p1) / 2),
    ]
    batches = []

    def model(x_t, t, cond):
        batches.append(x_t.shape[0])
        out = torch.empty(*x_t.shape, 4)
        for label, oracle in enumerate(oracles):
            rows = cond == label
            out[rows] = oracle(x_t[rows], t[rows])
        return out

    scale = 1.5
    guided = classifier_free_guidance(model, scale, null_cond=torch.tensor(2))
    x_t = torch.tensor([[3, 3, 3], [0, 3, 3]])
    t = torch.full((2,), 0.5)
    cond = torch.tensor([1, 1])
    logits = guided(x_t, t, cond)
    assert batches == [4]
    lc = oracles[1](x_t, t).log_softmax(-1)
    lu = oracles[2](x_t, t).log_softmax(-1)
    expected = (1 + scale) * lc[..., :3] - scale * lu[..., :3]
    got = process.x0_log_probs(logits, x_t)[..., :3]
    masked = x_t == process.mask_id  # (unmasked positions are copied: SUBS)
    assert torch.allclose(got[masked], expected.log_softmax(-1)[masked], atol=1e-5)

    # Sampling: one doubled-batch call per step; w = 0 is the conditional model.
    times, n = uniform_times(12), N
    batches.clear()
    labels = torch.ones(n, dtype=torch.long)
    plain = classifier_free_guidance(model, 0.0, null_cond=torch.tensor(2))
    out = ancestral_sample(
        plain, process, (n, L), times, cond=labels, generator=torch.Generator().manual_seed(3)
    )
    assert batches == [2 * n] * out.nfe
    states, law = ancestral_law(plain, process, L, times, cond=torch.ones(1, dtype=torch.long))
    bias = total_variation(law_on(sequences, states, law), p1)
    assert total_variation(empirical_distribution(out.tokens, sequences), p1) < BOUND + bias
    # w = 1.5 follows the exact law of the guided sampler.
    out = ancestral_sample(
        guided, process, (n, L), times, cond=labels, generator=torch.Generator().manual_seed(4)
    )
    states, law = ancestral_law(guided, process, L, times, cond=torch.ones(1, dtype=torch.long))
    exact = law_on(sequences, states, law)
    assert total_variation(empirical_distribution(out.tokens, sequences), exact) < BOUND
    # Guidance sharpens towards the class: E log p1(x)/p0(x) grows.
    ratio = torch.log(p1 / p0)
    assert float((exact * ratio).sum()) > float((p1 * ratio).sum()) + 0.1


# ---------------------------------------------------------------------------- confidence


@pytest.mark.parametrize("confidence", ["random", "margin", "entropy"])
def test_confidence_orders_that_ignore_the_candidate_are_exact(confidence):
    """One token per step, in an order that depends only on the current state, with the token
    drawn from its exact conditional: any-order autoregressive sampling, exact for p."""
    process = PROCESSES["masked"]()
    oracle = setup(process)
    out = confidence_sample(
        oracle,
        process,
        (N, L),
        uniform_times(L),
        confidence=confidence,
        generator=torch.Generator().manual_seed(5),
    )
    assert total_variation(empirical_distribution(out.tokens, oracle.sequences), oracle.probs) < (
        BOUND
    )


def prob_confidence_law(oracle: ExactDenoiser, process: MaskedProcess) -> torch.Tensor:
    """Exact law of confidence='prob' with one token per step, by enumerating the candidates:
    every masked position draws c_i ~ x_theta^i; the position with the largest x_theta^i(c_i)
    (the first one on ties) keeps its candidate."""
    m = process.mask_id
    law = {(m,) * L: 1.0}
    for _ in range(L):
        nxt = {}
        for state, mass in law.items():
            masked = [i for i in range(L) if state[i] == m]
            probs = oracle.marginals(torch.tensor([state]), 1.0)[0]
            for values in itertools.product(range(3), repeat=len(masked)):
                weight = math.prod(float(probs[i, v]) for i, v in zip(masked, values, strict=True))
                if weight == 0.0:
                    continue
                scores = [float(probs[i, v]) for i, v in zip(masked, values, strict=True)]
                best = scores.index(max(scores))
                new = list(state)
                new[masked[best]] = values[best]
                nxt[tuple(new)] = nxt.get(tuple(new), 0.0) + mass * weight
        law = nxt
    return torch.tensor([law.get(tuple(x.tolist()), 0.0) for x in oracle.sequences], dtype=F64)


def test_confidence_prob_follows_its_exact_law_and_is_biased():
    process = PROCESSES["masked"]()
    oracle = setup(process)
    out = confidence_sample(
        oracle,
        process,
        (N, L),
        uniform_times(L),
        confidence="prob",
        generator=torch.Generator().manual_seed(6),
    )
    exact = prob_confidence_law(oracle, process)
    assert total_variation(empirical_distribution(out.tokens, oracle.sequences), exact) < BOUND
    assert total_variation(exact, oracle.probs) > 0.1  # a deliberate trade of diversity


def test_greedy_confidence_decoding():
    process = PROCESSES["masked"]()
    oracle = setup(process)
    out = confidence_sample(oracle, process, (4, L), uniform_times(L), temperature=0.0)
    state = torch.full((1, L), process.mask_id)
    for _ in range(L):  # most confident masked position, set to its argmax
        probs = oracle.marginals(state, 1.0)[0]
        best = probs.max(-1).values.masked_fill(state[0] != process.mask_id, -1.0)
        i = int(best.argmax())
        state[0, i] = int(probs[i].argmax())
    assert torch.equal(out.tokens, state.expand(4, L))


def test_confidence_unmasks_on_schedule():
    process = MaskedProcess(4, 3)
    oracle = setup(process)
    states = []
    out = confidence_sample(
        oracle, process, (2, L), uniform_times(3), callback=lambda i, t, x_t, x0: states.append(x_t)
    )
    masks = [int((x == 3).sum()) for x in [*states[1:], out.tokens]]  # after each step
    # 3 masked tokens per sequence, alpha = 1/3, 2/3, 1 after the steps: one token per step.
    assert masks == [4, 2, 0]
    with pytest.raises(ValueError, match="masked"):
        confidence_sample(oracle, UniformProcess(3), (2, L), uniform_times(2))


# ---------------------------------------------------------------------------- semi-AR


def test_semi_autoregressive_beyond_the_context_on_a_markov_chain():
    """Data: a stationary Markov chain on 2 tokens. The oracle knows windows of 3 tokens; with
    block_length 1 each new token is drawn given the previous two, i.e. from the chain's
    transition, so 6-token samples must follow the 6-token chain law (64 outcomes)."""
    process = MaskedProcess(3, 2)
    P = torch.tensor([[0.8, 0.2], [0.3, 0.7]], dtype=F64)
    stationary = torch.tensor([0.6, 0.4], dtype=F64)

    def chain(length):
        seqs = enumerate_sequences(torch.arange(2), length)
        probs = stationary[seqs[:, 0]] * P[seqs[:, :-1], seqs[:, 1:]].prod(-1)
        return seqs, probs

    oracle = ExactDenoiser(process, *chain(3))
    out = semi_autoregressive_sample(
        oracle,
        process,
        (N, 6),
        uniform_times(3),
        context_length=3,
        block_length=1,
        sampler=confidence_sample,
        confidence="random",  # one token per step: exact within each window
        generator=torch.Generator().manual_seed(9),
    )
    seqs6, probs6 = chain(6)
    assert out.nfe == 3 + 3 * 3
    tv = total_variation(empirical_distribution(out.tokens, seqs6), probs6)
    assert tv < tv_sampling_bound(64, N)
    # A prompt is kept and continued.
    prompted = semi_autoregressive_sample(
        oracle,
        process,
        (5, 5),
        uniform_times(4),
        context_length=3,
        block_length=2,
        prompt=torch.tensor([[1, 0]]).expand(5, 2),
    )
    assert bool((prompted.tokens[:, :2] == torch.tensor([1, 0])).all())
    assert not bool((prompted.tokens == 2).any())


# ---------------------------------------------------------------------------- building blocks


def test_adjust_log_probs():
    p = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=F64)
    lp = p.log()
    hot = adjust_log_probs(lp, temperature=0.5).exp()
    assert torch.allclose(hot, p**2 / (p**2).sum())
    nucleus = adjust_log_probs(lp, top_p=0.8).exp()  # 0.5 + 0.3 reaches 0.8
    assert torch.allclose(nucleus, torch.tensor([0.625, 0.375, 0, 0], dtype=F64))
    nucleus = adjust_log_probs(lp, top_p=0.81).exp()
    assert torch.allclose(nucleus, torch.tensor([0.5, 0.3, 0.15, 0], dtype=F64) / 0.95)
    assert torch.equal(
        adjust_log_probs(lp, top_p=0.1).exp(), torch.tensor([1.0, 0, 0, 0], dtype=F64)
    )
    assert torch.equal(
        adjust_log_probs(lp, temperature=0).exp(), torch.tensor([1.0, 0, 0, 0], dtype=F64)
    )


def test_temperature_and_nucleus_in_the_sampler():
    process = PROCESSES["masked"]()
    oracle = setup(process)
    times = uniform_times(12)
    opts = {"temperature": 0.7, "top_p": 0.8}
    out = ancestral_sample(
        oracle, process, (N, L), times, generator=torch.Generator().manual_seed(10), **opts
    )
    states, law = ancestral_law(oracle, process, L, times, **opts)
    exact = law_on(oracle.sequences, states, law)
    assert total_variation(empirical_distribution(out.tokens, oracle.sequences), exact) < BOUND
    assert total_variation(exact, oracle.probs) > 0.05  # it did change the distribution


def test_gumbel_max_categorical():
    g = torch.Generator().manual_seed(11)
    probs = torch.tensor([0.5, 0.25, 0.2, 0.05], dtype=F64)
    draws = sample_categorical(probs.log().expand(N, 4), g)
    freq = torch.bincount(draws, minlength=4).to(F64) / N
    assert 0.5 * float((freq - probs).abs().sum()) < tv_sampling_bound(4, N)
    never = sample_categorical(torch.tensor([0.0, -math.inf]).expand(1000, 2), g)
    assert int(never.sum()) == 0


def test_truncate_at_eos():
    tokens = torch.tensor([[4, 1, 0, 3, 0], [4, 4, 4, 4, 4], [0, 2, 2, 2, 2]])
    out, lengths = truncate_at_eos(tokens, eos_id=0, pad_id=9)
    assert torch.equal(lengths, torch.tensor([3, 5, 1]))
    assert torch.equal(out, torch.tensor([[4, 1, 0, 9, 9], [4, 4, 4, 4, 4], [0, 9, 9, 9, 9]]))


def test_sampler_truncates_at_eos():
    process = PROCESSES["masked"]()
    oracle = setup(process)
    out = ancestral_sample(
        oracle,
        process,
        (200, L),
        uniform_times(10),
        eos_id=1,
        pad_id=2,
        generator=torch.Generator(),
    )
    for row, length in zip(out.tokens.tolist(), out.lengths.tolist(), strict=True):
        assert 1 not in row[: length - 1]
        assert row[length:] == [2] * (L - length)
        assert length == L or row[length - 1] == 1
    assert int((out.lengths < L).sum()) > 0
