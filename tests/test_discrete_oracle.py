"""The exact denoiser, and the bounds (continuous time and D3PM) evaluated with it.

Data: a random distribution on all 27 sequences of 3 tokens over a 3-token alphabet (plus a mask
for the masked and hybrid processes), Dirichlet(0.3) so that tokens are strongly dependent.
Everything is enumerated: 4^3 = 64 noisy states, 27 clean sequences.
"""

import itertools

import numpy as np
import pytest
import torch

from difflab.discrete.objectives import (
    continuous_time_loss,
    d3pm_loss,
    draw_times,
    mask_count_loss,
)
from difflab.discrete.oracle import ExactDenoiser, enumerate_sequences
from difflab.discrete.process import HybridProcess, MaskedProcess, TokenProcess, UniformProcess
from difflab.discrete.schedules import CosineSchedule, DiscreteTimeSchedule, LogLinearSchedule

F64 = torch.float64
L = 3


def setup(process: TokenProcess, seed: int = 0) -> ExactDenoiser:
    sequences = enumerate_sequences(process.data_tokens.nonzero().flatten(), L)
    probs = np.random.default_rng(seed).dirichlet(np.full(len(sequences), 0.3))
    return ExactDenoiser(process, sequences, torch.tensor(probs / probs.sum()))


PROCESSES = {
    "masked": lambda: MaskedProcess(4, 3),
    "masked-cosine": lambda: MaskedProcess(4, 0, CosineSchedule()),
    "uniform": lambda: UniformProcess(3),
    "uniform-cosine": lambda: UniformProcess(3, CosineSchedule(eps=0.01)),
    "hybrid": lambda: HybridProcess(4, 3, p_uniform=0.3),
    # two data tokens and a mask: 8 sequences, 27 states (keeps the quadrature test fast)
    "hybrid-small": lambda: HybridProcess(3, 2, p_uniform=0.3),
}


@pytest.mark.parametrize("name", ["masked", "uniform", "hybrid"])
def test_oracle_is_bayes(name):
    """p(x_0^i = v | x_t) against an explicit sum over sequences with the marginal matrix."""
    process = PROCESSES[name]()
    oracle = setup(process)
    V = process.vocab_size
    states = enumerate_sequences(torch.arange(V), L)
    for t in (0.15, 0.6, 0.97):
        Q = process.marginal_matrix(torch.tensor(t, dtype=F64))
        for z in states[
            torch.randperm(len(states), generator=torch.Generator().manual_seed(1))[:8]
        ]:
            weights = oracle.probs * Q[oracle.sequences, z].prod(-1)
            if float(weights.sum()) == 0.0:
                continue  # a state the process cannot produce
            brute = torch.zeros(L, V, dtype=F64)
            for k, x in enumerate(oracle.sequences):
                brute[torch.arange(L), x] += weights[k]
            brute /= weights.sum()
            got = oracle.marginals(z.unsqueeze(0), t)[0]
            assert torch.allclose(got, brute, atol=1e-12)
    logits = oracle(states, torch.full((len(states),), 0.5))
    assert logits.dtype == torch.float32 and logits.shape == (len(states), L, V)
    if process.mask_id is not None:
        assert bool(torch.isneginf(logits[..., process.mask_id]).all())


def test_masked_oracle_does_not_depend_on_time():
    # The masked posterior given the visible tokens is the same at every t in (0, 1], so a
    # masked denoiser needs no time input (MDLM).
    process = MaskedProcess(4, 3)
    oracle = setup(process)
    states = enumerate_sequences(torch.arange(4), L)  # every state is reachable here
    a = oracle.marginals(states, 0.1)
    b = oracle.marginals(states, 1.0)  # prompts at t = 1: taken as the limit t -> 1
    assert torch.allclose(a, b, atol=1e-12)


# ---------------------------------------------------------------------------- continuous time


def quadrature(points: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Gauss-Legendre on geometric panels towards both ends of [0, 1].

    The integrands behave like log(1/t) at t -> 0 (uniform noise) and have structure on the scale
    alpha_1 = 1e-3 at t -> 1 (uniform, hybrid). Panels [2^-(k+1), 2^-k] / 2 for k < 36 towards 0
    and k < 12 towards 1, each end closed by one panel of width 2^-37 (resp. 2^-13) that touches
    it: errors below 1e-9 for these integrands.
    """
    g, w = np.polynomial.legendre.leggauss(points)

    def panels(count: int) -> tuple[np.ndarray, np.ndarray]:
        edges = [2.0**-k for k in range(count + 1)] + [0.0]
        xs = [(a - b) / 2 * g + (a + b) / 2 for a, b in itertools.pairwise(edges)]
        ws = [(a - b) / 2 * w for a, b in itertools.pairwise(edges)]
        return 0.5 * np.concatenate(xs), 0.5 * np.concatenate(ws)

    x0, w0 = panels(36)
    x1, w1 = panels(12)
    return torch.tensor(np.concatenate([x0, 1 - x1])), torch.tensor(np.concatenate([w0, w1]))


def expected_rate(
    process: TokenProcess, oracle: ExactDenoiser, t: torch.Tensor, model=None
) -> torch.Tensor:
    """E_{x_0 ~ p} E_{x_t ~ q_t} sum_i l_t(x_t^i, x_0^i) at each time in ``t``, by enumeration,
    for the exact denoiser or, if given, the denoiser ``model`` (its logits through SUBS)."""
    V = process.vocab_size
    states = enumerate_sequences(torch.arange(V), L)
    seqs, p = oracle.sequences, oracle.probs
    n, S, K = len(t), len(states), len(seqs)
    z, tz = states.repeat(n, 1), t.repeat_interleave(S)
    if model is None:
        log_x0 = torch.log(oracle.marginals(z, tz))
    else:
        log_x0 = process.x0_log_probs(model(z, tz), z)
    q = process.marginal_matrix(t)[:, seqs[:, None, :], states[None, :, :]].prod(-1)  # (n, K, S)
    # Score every (x_0, x_t) pair at once: tokens laid out as (n, K * S * L).
    log_x0 = log_x0.reshape(n, 1, S, L, V).expand(n, K, S, L, V).reshape(n, -1, V)
    z = states.reshape(1, 1, S, L).expand(n, K, S, L).reshape(n, -1)
    x0 = seqs.reshape(1, K, 1, L).expand(n, K, S, L).reshape(n, -1)
    rate = process.loss_rate(log_x0, z, x0, t).reshape(n, K, S, L).sum(-1)
    rate = torch.where(q > 0, rate, torch.zeros_like(rate))  # unreachable states carry no mass
    return (p[None, :, None] * q * rate).sum((1, 2))


def prior_gap(process: TokenProcess, oracle: ExactDenoiser) -> float:
    """KL(q_1 || pi_1^L) between the sequence law at t = 1 and the sampler's prior."""
    V = process.vocab_size
    states = enumerate_sequences(torch.arange(V), L)
    Q1 = process.marginal_matrix(torch.tensor(1.0, dtype=F64))
    q1 = (oracle.probs[:, None] * Q1[oracle.sequences[:, None, :], states[None]].prod(-1)).sum(0)
    prior = process.prior_probs()[states].prod(-1)
    return float(torch.xlogy(q1, q1).sum() - torch.xlogy(q1, prior).sum())


@pytest.mark.parametrize("name", [n for n in PROCESSES if n != "hybrid"])
def test_continuous_bound_with_exact_denoiser_is_nll_plus_prior_gap(name):
    """E_x NELBO(x) = H(p) + KL(q_1 || pi^L) exactly when the denoiser is exact.

    Why: with the exact posterior marginals, the model's reverse rates equal the true reverse
    rates of the sequence process (one token jumps at a time in continuous time, and the true
    rate depends on the other tokens only through p(x_0^i | x_t)), so the path-space KL between
    the forward process and the model reduces to the KL between their laws at t = 1. Hence the
    bound is >= the true NLL H(p), and the gap is only the prior mismatch: 0 for the masked
    process (all-mask at t = 1), about alpha_1-sized for uniform/hybrid (alpha_1 = eps).
    Evaluated by quadrature over t and enumeration over x_0 and x_t: agreement to 1e-6.
    """
    process = PROCESSES[name]()
    oracle = setup(process)
    t, w = quadrature()
    integral = float((expected_rate(process, oracle, t) * w).sum())
    prior_term = float((oracle.probs * process.prior_kl(oracle.sequences).sum(-1)).sum())
    nelbo = integral + prior_term
    nll = oracle.entropy()
    gap = prior_gap(process, oracle)
    assert nelbo >= nll - 1e-9
    assert abs(nelbo - (nll + gap)) < 1e-6, (nelbo, nll, gap)
    assert gap < (1e-12 if process.absorbing else 1e-3)


@pytest.mark.parametrize("name", ["masked", "uniform", "hybrid"])
def test_continuous_time_loss_estimates_the_exact_integrand(name):
    """The objective end to end (corruption, model call, SUBS, rate, prior, reduction) at fixed t:
    its mean over x_0 ~ p and x_t ~ q_t matches the enumerated value within 5 standard errors."""
    process = PROCESSES[name]()
    oracle = setup(process)
    g = torch.Generator().manual_seed(2)
    n = 6000
    x0 = oracle.sequences[torch.multinomial(oracle.probs, n, replacement=True, generator=g)]
    prior_term = float((oracle.probs * process.prior_kl(oracle.sequences).sum(-1)).sum())
    for t in (0.25, 0.8):
        out = continuous_time_loss(
            oracle, process, x0, t=torch.full((n,), t, dtype=torch.float32), generator=g
        )
        per_sequence = out.token_nelbo.sum(-1).double()
        exact = float(expected_rate(process, oracle, torch.tensor([t], dtype=F64))) + prior_term
        se = float(per_sequence.std()) / n**0.5
        assert abs(float(per_sequence.mean()) - exact) < 5 * se + 1e-6, (t, exact, se)
        assert torch.allclose(out.loss, out.token_nelbo.mean())
        assert float(out.num_tokens) == n * L


class StateTable:
    """A time-agnostic denoiser with random logits for every noisy sequence (any x_t -> (L, V))."""

    def __init__(self, V: int, seed: int = 0):
        self.V = V
        g = torch.Generator().manual_seed(seed)
        self.table = 2.0 * torch.randn(V**L, L, V, generator=g, dtype=F64)

    def __call__(self, x_t, t, cond=None):
        index = (x_t * self.V ** torch.arange(L - 1, -1, -1)).sum(-1)
        return self.table[index]


@pytest.mark.parametrize("name", ["masked", "masked-cosine"])
@pytest.mark.parametrize("denoiser", ["exact", "random"])
def test_mask_count_loss_estimates_the_continuous_bound(name, denoiser):
    """For a denoiser that does not read t, mask_count_loss is an unbiased estimate of the same
    bound as continuous_time_loss (the count form sums the time integral in closed form), whatever
    the schedule: its mean over x_0 ~ p matches the bound by quadrature within 5 standard errors,
    for the exact denoiser (bound = H(p)) and for a random one (bound > H(p)). Its variance is
    lower than that of continuous_time_loss with stratified times."""
    process = PROCESSES[name]()
    oracle = setup(process)
    model = oracle if denoiser == "exact" else StateTable(process.vocab_size)
    t, w = quadrature()
    bound = float((expected_rate(process, oracle, t, None if model is oracle else model) * w).sum())
    if denoiser == "exact":
        assert abs(bound - oracle.entropy()) < 1e-6
    else:
        assert bound > oracle.entropy() + 0.5
    g = torch.Generator().manual_seed(7)
    n = 6000
    x0 = oracle.sequences[torch.multinomial(oracle.probs, n, replacement=True, generator=g)]
    count = mask_count_loss(model, process, x0, generator=g)
    timed = continuous_time_loss(model, process, x0, generator=g)
    per_sequence = count.token_nelbo.sum(-1).double()
    se = float(per_sequence.std()) / n**0.5
    assert abs(float(per_sequence.mean()) - bound) < 5 * se, (bound, se)
    assert float(per_sequence.std()) < 0.8 * float(timed.token_nelbo.sum(-1).double().std())
    assert torch.allclose(count.loss, count.token_nelbo.mean())
    # Every row has l of its L tokens masked, l stratified over 1..L across the batch, t = l / L.
    masked_counts = torch.round(count.t.double() * L).long()
    assert torch.equal(torch.bincount(masked_counts, minlength=L + 1)[1:], torch.full((L,), n // L))


def test_mask_count_loss_masks_exactly_l_tokens():
    """The masked set has exactly l counted tokens and padding is masked at rate l / n."""
    process = MaskedProcess(6, 5)
    seen = []

    def spy(x_t, t, cond=None):
        seen.append((x_t.clone(), t.clone()))
        return torch.zeros(*x_t.shape, 6)

    B, Lx = 4000, 12
    x0 = torch.randint(5, (B, Lx), generator=torch.Generator().manual_seed(0))
    n = torch.randint(1, Lx + 1, (B,), generator=torch.Generator().manual_seed(1))
    loss_mask = torch.arange(Lx) < n.unsqueeze(-1)
    out = mask_count_loss(spy, process, x0, loss_mask=loss_mask,
                          generator=torch.Generator().manual_seed(2))  # fmt: skip
    x_t, t = seen[0]
    masked = x_t == 5
    counted = (masked & loss_mask).sum(1).double()
    assert torch.allclose(t.double(), counted / n, atol=1e-6)
    assert bool((counted >= 1).all()) and bool((counted <= n).all())
    # Padding is masked at the row's rate: the mean of masked - rate over padded positions is 0.
    pad = ~loss_mask
    excess = (masked.double() - (counted / n).unsqueeze(-1))[pad]
    assert abs(float(excess.mean())) < 5 * float(excess.std()) / excess.numel() ** 0.5
    # Uniform logits over the 5 data tokens: each masked counted token costs (n / l) log 5.
    expected = torch.where(
        masked & loss_mask, (n / counted).unsqueeze(-1) * torch.log(torch.tensor(5.0)), 0.0
    )
    assert torch.allclose(out.token_nelbo.double(), expected.double(), rtol=1e-5)
    with pytest.raises(ValueError, match="masked process"):
        mask_count_loss(spy, UniformProcess(5), x0)


# ---------------------------------------------------------------------------- D3PM


def d3pm_exact_bound(process: TokenProcess, oracle: ExactDenoiser, T: int) -> float:
    """E_x L_vb(x) = sum_k E KL(q(x_{k-1} | x_k, x_0) || p(x_{k-1} | x_k)) + prior, enumerated."""
    V = process.vocab_size
    states = enumerate_sequences(torch.arange(V), L)
    seqs, p = oracle.sequences, oracle.probs
    S, K = len(states), len(seqs)
    z = states.repeat(K, 1)
    x0 = seqs.repeat_interleave(S, 0)
    total = 0.0
    for k in range(1, T + 1):
        t, s = k / T, (k - 1) / T
        log_x0 = torch.log(oracle.marginals(z, t))
        kl = process.reverse_kl(log_x0, z, x0, s, t).reshape(K, S, L).sum(-1)
        q = process.marginal_matrix(torch.tensor(t, dtype=F64))[seqs[:, None], states[None]]
        q = q.prod(-1)
        total += float((p[:, None] * q * torch.where(q > 0, kl, torch.zeros_like(kl))).sum())
    return total + float((p * process.prior_kl(seqs).sum(-1)).sum())


@pytest.mark.parametrize("name", ["masked", "uniform"])
def test_d3pm_bound_with_exact_denoiser(name):
    """D3PM's discrete-time bound is >= NLL, tightens as T grows, towards the continuous one."""
    process = PROCESSES[name]()
    oracle = setup(process)
    nll = oracle.entropy()
    continuous = nll + prior_gap(process, oracle)
    bounds = [d3pm_exact_bound(process, oracle, T) for T in (2, 8, 64)]
    assert all(b >= continuous - 1e-9 for b in bounds)
    assert bounds[0] > bounds[1] > bounds[2]
    # The excess comes from unmasking/jumping several tokens in one step: O(1/T).
    assert bounds[2] - continuous < 0.5 * (bounds[1] - continuous)
    assert bounds[2] - continuous < 0.05


def test_d3pm_loss_estimates_the_exact_bound():
    """d3pm_loss: the mean of token_nelbo (T KL_k at a stratified k, plus prior) over x_0 ~ p is
    the exact L_vb(T) within 5 standard errors; the hybrid loss adds ce_weight * CE."""
    process = UniformProcess(3, LogLinearSchedule())
    oracle = setup(process)
    T, n = 4, 8000
    g = torch.Generator().manual_seed(3)
    x0 = oracle.sequences[torch.multinomial(oracle.probs, n, replacement=True, generator=g)]
    out = d3pm_loss(oracle, process, x0, T, ce_weight=0.5, generator=g)
    per_sequence = out.token_nelbo.sum(-1).double()
    exact = d3pm_exact_bound(process, oracle, T)
    se = float(per_sequence.std()) / n**0.5
    assert abs(float(per_sequence.mean()) - exact) < 5 * se
    assert float(out.loss) > float(out.token_nelbo.mean())  # + 0.5 CE > 0
    # k is stratified over the batch: every step appears n / T times.
    counts = torch.bincount((out.t * T).round().long(), minlength=T + 1)[1:]
    assert torch.equal(counts, torch.full((T,), n // T))


def test_d3pm_loss_takes_the_steps_of_a_discrete_schedule():
    process = MaskedProcess(4, 3, DiscreteTimeSchedule.absorbing(5))
    oracle = setup(process)
    out = d3pm_loss(oracle, process, oracle.sequences, generator=torch.Generator().manual_seed(6))
    assert set((out.t * 5).round().long().tolist()) <= {1, 2, 3, 4, 5}
    with pytest.raises(ValueError, match="num_steps"):
        d3pm_loss(oracle, MaskedProcess(4, 3), oracle.sequences)


# ---------------------------------------------------------------------------- plumbing


class PerPositionModel(torch.nn.Module):
    """logits[b, i] depend only on x_t[b, i] and t[b]: padding cannot leak into other tokens."""

    def __init__(self, V: int):
        super().__init__()
        self.table = torch.nn.Embedding(V, V)
        self.time = torch.nn.Linear(1, V)

    def forward(self, x_t, t, cond=None):
        return self.table(x_t) + self.time(t.unsqueeze(-1)).unsqueeze(1)


@pytest.mark.parametrize("objective", ["continuous", "count", "d3pm"])
def test_loss_mask_excludes_padding(objective):
    process = MaskedProcess(6, 5)
    torch.manual_seed(0)
    model = PerPositionModel(6)
    x0 = torch.randint(5, (4, 10))
    loss_mask = torch.arange(10) < torch.tensor([10, 7, 3, 5]).unsqueeze(-1)
    other = torch.where(loss_mask, x0, (x0 + 1) % 5)  # change every padded token

    def run(tokens):
        g = torch.Generator().manual_seed(4)
        if objective == "continuous":
            return continuous_time_loss(model, process, tokens, loss_mask=loss_mask, generator=g)
        if objective == "count":
            return mask_count_loss(model, process, tokens, loss_mask=loss_mask, generator=g)
        return d3pm_loss(model, process, tokens, 16, loss_mask=loss_mask, generator=g)

    a, b = run(x0), run(other)
    assert torch.equal(a.loss, b.loss)
    assert torch.equal(a.token_nelbo, b.token_nelbo)
    assert float(a.num_tokens) == float(loss_mask.sum())
    assert bool((a.token_nelbo[~loss_mask] == 0).all())
    assert float(a.loss.detach()) > 0
    # No gradient reaches the logits of padded positions.
    logits = []
    handle = model.table.register_forward_hook(lambda m, i, o: logits.append(o))
    out = run(x0)
    handle.remove()
    logits[0].retain_grad()
    out.loss.backward()
    assert float(logits[0].grad[~loss_mask].abs().max()) == 0.0
    assert float(logits[0].grad[loss_mask].abs().max()) > 0.0


def test_draw_times_are_stratified():
    g = torch.Generator().manual_seed(5)
    B = 16
    t = draw_times(B, generator=g)
    assert t.dtype == torch.float32 and float(t.min()) > 0 and float(t.max()) <= 1
    # One time in each stratum ((k - 1) / B, k / B].
    strata = torch.ceil(t.double() * B).long()
    assert torch.equal(strata.sort().values, torch.arange(1, B + 1))
    plain = draw_times(1000, stratified=False, generator=g)
    assert float(plain.min()) > 0 and float(plain.max()) <= 1
