"""Exact denoisers for discrete diffusion, by enumeration (for tests and for measuring samplers).

When the data distribution ``p(x_0)`` is known on a small set of sequences (a tiny vocabulary
and length, so that ``V^L`` sequences can be listed), the exact denoiser of any token process is

    p(x_0^i = v | x_t) = sum_{x : x^i = v} p(x) lik(x) / sum_x p(x) lik(x),
    lik(x) = prod_l q_t(x_t^l | x^l),

with ``q_t(z | x)`` the process's marginal matrix (:meth:`TokenProcess.marginal_matrix`). It is
the optimum of every bound in :mod:`difflab.discrete.objectives`, so a sampler driven by it must
reproduce ``p(x_0)``. :class:`ExactDenoiser` returns it as logits, the contract of every denoiser
(``model(x_t, t, cond) -> (B, L, V)`` logits), so it drops into every sampler.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from difflab.discrete.process import TokenProcess
from difflab.discrete.samplers import TokenDenoiser, adjust_log_probs


def enumerate_sequences(tokens: Tensor | list[int], length: int) -> Tensor:
    """All ``len(tokens) ** length`` sequences over ``tokens``, ``(K, length)`` long, in
    lexicographic order of token position in ``tokens``."""
    tokens = torch.as_tensor(tokens, dtype=torch.long)
    rows = list(itertools.product(range(len(tokens)), repeat=length))
    return tokens[torch.tensor(rows, dtype=torch.long).reshape(-1, length)]


class ExactDenoiser:
    """``p(x_0^i | x_t)`` by enumeration over ``sequences`` with probabilities ``probs``.

    ``sequences`` is ``(K, L)`` long (tokens of the data, never the mask), ``probs`` is ``(K,)``
    and sums to one. Calling it returns float32 logits ``log p(x_0^i = v | x_t)``, ``-inf`` where
    the probability is zero; ``cond`` is ignored. Everything is computed in float64. At ``t = 1``
    the posterior is taken as its limit ``t -> 1`` (evaluated at ``t = 1 - 1e-9``), so that states
    the process cannot reach at exactly ``t = 1`` (given prompt tokens in an all-mask prior)
    are still well defined.
    """

    def __init__(self, process: TokenProcess, sequences: Tensor, probs: Tensor):
        probs = torch.as_tensor(probs, dtype=torch.float64)
        sequences = torch.as_tensor(sequences, dtype=torch.long)
        if sequences.ndim != 2 or probs.shape != sequences.shape[:1]:
            raise ValueError("need sequences of shape (K, L) and probs of shape (K,)")
        if abs(float(probs.sum()) - 1.0) > 1e-9 or bool((probs < 0).any()):
            raise ValueError("probs must be a probability vector")
        if not bool(process.data_tokens[sequences].all()):
            raise ValueError("sequences may not contain the mask token")
        self.process = process
        self.sequences = sequences
        self.probs = probs
        self.length = sequences.shape[1]
        self.calls = 0  # number of times the denoiser was evaluated (for caching tests)
        self._log_p = torch.log(probs)
        V = process.vocab_size
        self._one_hot = torch.nn.functional.one_hot(sequences, V).to(torch.float64)  # (K, L, V)
        if V**self.length > 2**16:
            raise ValueError(f"{V}^{self.length} states is too many to enumerate")
        self._states = enumerate_sequences(torch.arange(V), self.length)  # code = sum x_l V^(L-1-l)
        self._place = V ** torch.arange(self.length - 1, -1, -1)

    def posterior(self, x_t: Tensor, t: Tensor | float) -> Tensor:
        """``p(x_0 = sequences[k] | x_t)``, ``(B, K)`` float64."""
        B, n = x_t.shape
        if n != self.length:
            raise ValueError(f"the oracle knows sequences of length {self.length}, got {n}")
        t = torch.as_tensor(t, dtype=torch.float64).cpu().expand(B).clamp(max=1.0 - 1e-9)
        times, which = torch.unique(t, return_inverse=True)
        log_q = torch.log(self.process.marginal_matrix(times))  # (T, V, V): [., x, z]
        # log q_t(x_t^l | x_0^l = v) for every value v: (B, V, L)
        per_value = log_q[which].gather(2, x_t.cpu().unsqueeze(1).expand(B, log_q.shape[1], n))
        loglik = per_value[:, self.sequences, torch.arange(n)].sum(-1)  # (B, K)
        return torch.softmax(loglik + self._log_p, dim=1)

    def marginals(self, x_t: Tensor, t: Tensor | float) -> Tensor:
        """``p(x_0^i = v | x_t)``, ``(B, L, V)`` float64.

        When all rows share one time (as in a sampler), the posterior of each of the ``V^L``
        states is computed once and looked up.
        """
        t = torch.as_tensor(t, dtype=torch.float64).cpu().expand(x_t.shape[0])
        if len(t) > 0 and bool((t == t[0]).all()):
            table = torch.einsum("bk,klv->blv", self.posterior(self._states, t[0]), self._one_hot)
            return table[(x_t.cpu() * self._place).sum(-1)]
        return torch.einsum("bk,klv->blv", self.posterior(x_t, t), self._one_hot)

    def __call__(self, x_t: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        self.calls += 1
        logits = torch.log(self.marginals(x_t, t)).to(torch.float32)
        return logits.to(x_t.device)

    def entropy(self) -> float:
        """``H(p) = -sum p log p`` in nats: the true negative log-likelihood per sequence."""
        return float(-(torch.xlogy(self.probs, self.probs)).sum())

    def log_prob(self, x0: Tensor) -> Tensor:
        """``log p(x_0)`` for ``(B, L)`` sequences (``-inf`` outside the support)."""
        match = (x0.cpu().unsqueeze(1) == self.sequences.unsqueeze(0)).all(-1)  # (B, K)
        p = (match.to(torch.float64) * self.probs).sum(-1)
        return torch.log(p)


def ancestral_law(
    model: TokenDenoiser,
    process: TokenProcess,
    length: int,
    times: Tensor | Sequence[float],
    *,
    cond: Any = None,
    fixed_tokens: Tensor | None = None,
    fixed_mask: Tensor | None = None,
    temperature: float = 1.0,
    top_p: float | None = None,
) -> tuple[Tensor, Tensor]:
    """The exact output law of :func:`~difflab.discrete.samplers.ancestral_sample`, by enumeration.

    Propagates a distribution over all ``V^L`` states through the factorised reverse steps
    ``T_i[z, z'] = prod_l p(z'_l | z)`` from ``t_i`` to ``t_{i+1}`` of the grid ``times`` (from 1
    to 0; :meth:`TokenProcess.reverse_probs` with the denoiser's ``x_theta`` after
    temperature/top-p), starting from the prior, with positions in
    ``fixed_mask`` (``(L,)``, one pattern for all) held at ``fixed_tokens`` (``(L,)``). The
    distance of this law from the data distribution is the sampler's discretisation error, with
    no sampling noise. ``cond`` (if any) must describe one sequence; it is expanded to the
    ``V^L`` states. Returns ``(states (V^L, L), probs (V^L,))`` in float64.
    """
    V = process.vocab_size
    if V**length > 2**12:
        raise ValueError(f"{V}^{length} states is too many to enumerate")
    states = enumerate_sequences(torch.arange(V), length)
    S = states.shape[0]
    fixed = torch.zeros(length, dtype=torch.bool) if fixed_mask is None else fixed_mask.cpu()
    given = torch.zeros(length, dtype=torch.long) if fixed_tokens is None else fixed_tokens.cpu()
    consistent = ((states == given) | ~fixed).all(-1)
    prior = process.prior_probs()[states]
    law = torch.where(fixed, 1.0, prior).prod(-1) * consistent
    if cond is not None:
        cond = cond.expand(S, *cond.shape[1:]) if isinstance(cond, Tensor) else cond
    positions = torch.arange(length)
    for t, s in itertools.pairwise(torch.as_tensor(times, dtype=torch.float64).tolist()):
        t_vec = torch.full((S,), t, dtype=torch.float32)
        log_x0 = process.x0_log_probs(model(states, t_vec, cond).double(), states)
        x0_probs = adjust_log_probs(log_x0, temperature, top_p).exp()
        step = process.reverse_probs(x0_probs, states, s, t)  # (S, L, V)
        step = torch.where(fixed.unsqueeze(-1), torch.nn.functional.one_hot(given, V), step)
        law = law @ step[:, positions, states].prod(-1)  # (S,) @ (S, S')
    return states, law


def empirical_distribution(samples: Tensor, sequences: Tensor) -> Tensor:
    """Frequencies of each of ``sequences`` (``(K, L)``) among ``samples`` (``(N, L)``), ``(K,)``.

    Samples outside ``sequences`` are not counted, so the result sums to less than one then
    (and the total variation against a distribution on ``sequences`` sees the missing mass).
    """
    base = int(max(int(samples.max()), int(sequences.max()))) + 1
    weights = base ** torch.arange(samples.shape[1] - 1, -1, -1, dtype=torch.float64)
    codes = (samples.cpu().to(torch.float64) * weights).sum(-1)
    ref = (sequences.to(torch.float64) * weights).sum(-1)
    hits = (codes.unsqueeze(1) == ref.unsqueeze(0)).to(torch.float64).sum(0)
    return hits / samples.shape[0]


def total_variation(p: Tensor, q: Tensor) -> float:
    """``TV(p, q) = sum |p - q| / 2``, counting mass missing from either vector."""
    diff = (p.to(torch.float64) - q.to(torch.float64)).abs().sum()
    missing = abs(float(p.sum()) - float(q.sum()))
    return 0.5 * (float(diff) + missing)


def tv_sampling_bound(num_outcomes: int, num_samples: int, failure_prob: float = 1e-6) -> float:
    """A bound on ``TV(empirical, p)`` for ``N`` i.i.d. samples from ``p`` on ``K`` outcomes.

    ``E TV <= (1/2) sum_k sqrt(p_k / N) <= (1/2) sqrt(K / N)`` (Jensen, then Cauchy-Schwarz),
    and TV moves by at most ``1/N`` when one sample changes, so McDiarmid adds
    ``sqrt(log(1/delta) / (2N))`` with probability ``1 - delta``.
    """
    return 0.5 * math.sqrt(num_outcomes / num_samples) + math.sqrt(
        math.log(1.0 / failure_prob) / (2.0 * num_samples)
    )
