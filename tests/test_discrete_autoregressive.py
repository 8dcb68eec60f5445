"""Autoregressive sampling with a key/value cache: the same tokens as recomputing the whole
prefix for every token, EOS handling and early stopping, windows beyond the context, nucleus."""

from __future__ import annotations

import torch

from difflab.discrete.autoregressive import EOS_CHECK_EVERY, autoregressive_sample
from difflab.discrete.samplers import adjust_log_probs, sample_categorical
from difflab.nets.transformer import TextTransformer

VOCAB, LENGTH = 23, 32
EOS, PAD = 2, 0


def randomized(model: TextTransformer, seed: int = 0) -> TextTransformer:
    """Every parameter drawn at random (the zero adaLN gates of the initialisation would make
    every block the identity)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model.eval()


def draw(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator):
    return sample_categorical(adjust_log_probs(logits.log_softmax(-1), temperature, top_p), gen)


def test_cache_equals_naive_recomputation():
    model = randomized(TextTransformer(VOCAB, LENGTH, width=32, depth=2, causal=True))
    prompt = torch.randint(0, VOCAB, (4, 3), generator=torch.Generator().manual_seed(1))
    for temperature, top_p in [(0.0, 1.0), (1.0, 1.0), (0.8, 0.9)]:
        out = autoregressive_sample(
            model, (4, 23), context_length=LENGTH, block_length=LENGTH, prompt=prompt,
            temperature=temperature, top_p=top_p, generator=torch.Generator().manual_seed(5),
        )  # fmt: skip
        gen = torch.Generator().manual_seed(5)
        seq = prompt
        with torch.no_grad():
            for _ in range(20):  # no cache: rerun the whole sequence for every new token
                nxt = draw(model(seq)[:, -1], temperature, top_p, gen)
                seq = torch.cat([seq, nxt[:, None]], dim=1)
        assert torch.equal(out.tokens, seq) and out.nfe == 20


def test_stops_once_every_row_has_emitted_eos_and_pads_after_it():
    model = randomized(TextTransformer(VOCAB, 128, width=32, depth=2, causal=True))
    with torch.no_grad():
        model.head.bias[EOS] += 4.0  # makes EOS likely enough that every row ends early
    prompt = torch.full((6, 1), 1)
    options = {"context_length": 128, "block_length": 128, "prompt": prompt}
    free = autoregressive_sample(
        model, (6, 101), generator=torch.Generator().manual_seed(1), **options
    ).tokens
    out = autoregressive_sample(
        model, (6, 101), generator=torch.Generator().manual_seed(1), eos_id=EOS, pad_id=PAD,
        **options,
    )  # fmt: skip
    assert out.nfe < 100 and out.nfe % EOS_CHECK_EVERY == 0  # stopped early, at a check
    lengths = []
    for row_free, row in zip(free, out.tokens, strict=True):
        end = int((row_free == EOS).nonzero()[0])
        lengths.append(end)
        assert torch.equal(row[: end + 1], row_free[: end + 1])  # same text up to its EOS
        assert bool((row[end + 1 :] == PAD).all())
    assert out.lengths.tolist() == [end + 1 for end in lengths]
    assert len(set(lengths)) > 1 and max(lengths) < 1 + out.nfe  # rows of different lengths


def test_windows_beyond_the_context_start_with_bos_and_keep_the_prompt():
    """A model that reads only the previous token and copies it + 1 (mod V): every window,
    whatever it re-reads, continues the count, and each network call sees at most the context
    plus BOS."""
    seen = []

    class Successor:
        def new_cache(self, batch_size, capacity):
            seen.append(capacity)
            return None

        def __call__(self, x, cond=None, cache=None):
            return torch.nn.functional.one_hot((x + 1) % VOCAB, VOCAB).float() * 50.0

    prompt = torch.tensor([[5, 6]])
    out = autoregressive_sample(
        Successor(), (1, 30), context_length=8, block_length=3, prompt=prompt, bos_id=0,
        temperature=0.0,
    )  # fmt: skip
    assert out.tokens.tolist() == [[(5 + i) % VOCAB for i in range(30)]]
    assert out.nfe == 28 and max(seen) == 1 + 8


def test_nucleus_sampling_keeps_the_smallest_set_reaching_top_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log().expand(4000, -1)
    gen = torch.Generator().manual_seed(0)
    draws = draw(logits, 1.0, 0.75, gen)
    assert set(draws.tolist()) == {0, 1}  # 0.5 < 0.75 <= 0.5 + 0.3
    freq = (draws == 0).float().mean()
    # Renormalised nucleus: P(0) = 0.5 / 0.8 = 0.625; binomial s.d. sqrt(.625 .375 / 4000) = .0077
    assert abs(float(freq) - 0.625) < 4 * 0.0077
    assert torch.equal(draw(logits[:3], 0.0, 1.0, gen), torch.zeros(3, dtype=torch.long))
