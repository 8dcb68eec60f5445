"""TextTransformer: rotary relative positions, causal and bidirectional attention, KV-cache
decoding against recomputation, time/class conditioning, initialisation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from difflab.nets.transformer import TextTransformer, apply_rotary, rotary_angles

VOCAB, LENGTH = 23, 32


def randomized(model: TextTransformer, std: float = 0.1, seed: int = 0) -> TextTransformer:
    """Every parameter drawn at random. At initialisation the zero adaLN gates make every block
    the identity (attention then has no effect at all), which would let the attention tests
    pass vacuously."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model.eval()


def tokens(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- rotary embeddings


def test_rotary_scores_depend_only_on_relative_position():
    torch.manual_seed(0)
    attn = randomized(TextTransformer(VOCAB, LENGTH, width=64, depth=1, num_heads=2)).blocks[0]
    h = torch.randn(1, 12, 64)
    q, k, _ = attn.attn.qkv(h).view(1, 12, 3, 2, 32).permute(2, 0, 3, 1, 4).unbind(0)

    def scores(positions: torch.Tensor) -> torch.Tensor:
        cos, sin = rotary_angles(positions, 32)
        return apply_rotary(q, cos, sin) @ apply_rotary(k, cos, sin).transpose(-1, -2)

    base = scores(torch.arange(12))
    for shift in (1, 7, 100):  # the same tokens placed further along: same scores
        torch.testing.assert_close(scores(torch.arange(12) + shift), base, rtol=1e-5, atol=1e-4)
    # Stretching the positions changes every relative offset, hence the scores.
    assert (scores(2 * torch.arange(12)) - base).abs().max() > 1.0
    # A rotation: norms are preserved, and position 0 is the identity.
    cos, sin = rotary_angles(torch.arange(12), 32)
    torch.testing.assert_close(apply_rotary(q, cos, sin).norm(dim=-1), q.norm(dim=-1))
    torch.testing.assert_close(apply_rotary(q, cos, sin)[..., 0, :], q[..., 0, :])


# ---------------------------------------------------------------- attention masks


def test_causal_logits_ignore_the_future_and_bidirectional_ones_do_not():
    x = tokens(2, LENGTH)
    x_changed = x.clone()
    x_changed[:, 20] = (x[:, 20] + 1) % VOCAB
    with torch.no_grad():
        causal = randomized(TextTransformer(VOCAB, LENGTH, width=32, depth=2, causal=True))
        before, after = causal(x), causal(x_changed)
        assert torch.equal(before[:, :20], after[:, :20])  # bit-identical past
        assert (before[:, 20:] - after[:, 20:]).abs().amax(dim=-1).min() > 1e-3  # every later one

        bidir = randomized(TextTransformer(VOCAB, LENGTH, width=32, depth=2))
        t = torch.full((2,), 0.5)
        before, after = bidir(x, t), bidir(x_changed, t)
        assert (before[:, :20] - after[:, :20]).abs().amax(dim=-1).min() > 1e-3


# ---------------------------------------------------------------- KV cache


def test_kv_cache_decoding_equals_recomputation_step_by_step():
    model = randomized(TextTransformer(VOCAB, LENGTH, width=48, depth=3, num_heads=3, causal=True))
    x = tokens(3, 24)
    with torch.no_grad():
        full = model(x)
        cache = model.new_cache(3, 24)
        chunks = [model(x[:, :5], cache=cache)]  # prefill a 5-token prompt at once
        chunks += [model(x[:, i : i + 1], cache=cache) for i in range(5, 20)]  # one by one
        chunks.append(model(x[:, 20:], cache=cache))  # then a 4-token chunk after the prefix
    assert cache.length == 24
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, rtol=0, atol=1e-5)


# ---------------------------------------------------------------- conditioning


def test_time_conditioning_can_be_switched_off():
    x = tokens(2, 16)
    t0, t1 = torch.tensor([0.1, 0.2]), torch.tensor([0.9, 0.6])
    with torch.no_grad():
        agnostic = randomized(TextTransformer(VOCAB, LENGTH, 32, 2, time_conditioning=False))
        torch.testing.assert_close(agnostic(x, t0), agnostic(x, t1), rtol=0, atol=0)
        torch.testing.assert_close(agnostic(x, None), agnostic(x, t1), rtol=0, atol=0)
        timed = randomized(TextTransformer(VOCAB, LENGTH, 32, 2))
        assert (timed(x, t0) - timed(x, t1)).abs().max() > 1e-2
        torch.testing.assert_close(timed(x, torch.tensor(0.3)), timed(x, torch.full((2,), 0.3)))
    with pytest.raises(ValueError, match="pass t"):
        timed(x)


def test_class_conditioning_with_null_label():
    x = tokens(2, 16)
    t = torch.full((2,), 0.5)
    for time_conditioning in (True, False):
        model = randomized(
            TextTransformer(
                VOCAB, LENGTH, 32, 2, time_conditioning=time_conditioning, num_classes=3
            )
        )
        with torch.no_grad():
            a, b = model(x, t, torch.tensor([0, 0])), model(x, t, torch.tensor([1, 1]))
            assert (a - b).abs().max() > 1e-2
            null = torch.full((2,), model.null_class)
            torch.testing.assert_close(model(x, t, None), model(x, t, null), rtol=0, atol=0)
    with pytest.raises(ValueError, match="num_classes"):
        TextTransformer(VOCAB, LENGTH, 32, 1)(x, t, torch.tensor([0, 0]))


# ---------------------------------------------------------------- construction and training


def test_initialisation_tying_and_limits():
    untied = TextTransformer(VOCAB, LENGTH, 32, 2)
    x = tokens(2, 16)
    assert torch.equal(untied(x, torch.rand(2)), torch.zeros(2, 16, VOCAB))  # uniform at init
    tied = TextTransformer(VOCAB, LENGTH, 32, 2, tie_embeddings=True)
    count = sum(p.numel() for p in untied.parameters()) - sum(p.numel() for p in tied.parameters())
    assert count == VOCAB * 32 + VOCAB and tied.head is None
    with pytest.raises(ValueError, match="no time input"):
        TextTransformer(VOCAB, LENGTH, causal=True, time_conditioning=True)
    with pytest.raises(ValueError, match="context"):
        untied(tokens(1, LENGTH + 1), torch.rand(1))
    with pytest.raises(ValueError, match="exceeds the context"):
        TextTransformer(VOCAB, LENGTH, 32, 1, causal=True).new_cache(1, 4 + LENGTH)


@pytest.mark.parametrize("causal", [True, False])
def test_a_few_adam_steps_fit_a_fixed_batch(causal):
    """From the zero-gated initialisation the network learns: 60 steps on one batch take the
    loss from log V = 3.14 to a fraction of it."""
    torch.manual_seed(0)
    model = TextTransformer(VOCAB, LENGTH, 32, 2, causal=causal, dropout=0.1)
    x = tokens(8, 16)
    t = torch.rand(8)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(60):
        logits = model(x) if causal else model(x, t)
        pred, target = (logits[:, :-1], x[:, 1:]) if causal else (logits, x)
        loss = F.cross_entropy(pred.reshape(-1, VOCAB), target.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert abs(losses[0] - torch.log(torch.tensor(float(VOCAB)))) < 1e-4
    assert losses[-1] < 0.3 * losses[0]
