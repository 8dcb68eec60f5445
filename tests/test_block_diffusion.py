"""Block diffusion (:mod:`difflab.discrete.block`): block size = length is MDLM's loss and block
size 1 (fully masked) the autoregressive loss, on the same batch and noise; the vectorised
two-stream call gives each block the logits the sampler computes from the clean prefix; the
key/value-cached sampler gives the samples of recomputation; the recipe end to end."""

from __future__ import annotations

import pytest
import torch
from cli_run import run as cli

import difflab
from difflab.data.text import BOS_ID, load_corpus
from difflab.discrete.block import (
    block_causal_mask,
    block_diffusion_loss,
    block_sample,
    clip_times,
    two_stream_mask,
)
from difflab.discrete.objectives import continuous_time_loss, draw_times
from difflab.discrete.process import MaskedProcess
from difflab.discrete.schedules import make_token_schedule
from difflab.nets.transformer import TextTransformer
from difflab.recipes.text.train import ar_token_nll

VOCAB, MASK, LENGTH = 11, 10, 16


def process() -> MaskedProcess:
    return MaskedProcess(VOCAB, MASK, make_token_schedule("log-linear"))


def network(seed: int = 0) -> TextTransformer:
    net = TextTransformer(VOCAB, LENGTH, width=32, depth=2, time_conditioning=False)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return net.eval()


def data(batch: int = 6) -> torch.Tensor:
    return torch.randint(0, MASK, (batch, LENGTH), generator=torch.Generator().manual_seed(1))


def dense_two_stream_mask(length: int, size: int) -> torch.Tensor:
    """The ``(2L, 2L)`` mask over ``[x_t, x_0]`` that :func:`two_stream_mask`'s pair stands for."""
    noisy, clean = two_stream_mask(length, size)
    return torch.cat([noisy, torch.cat([torch.zeros_like(clean), clean], 1)], 0)


def test_two_stream_mask_is_the_definition():
    L, size = 6, 2
    mask = dense_two_stream_mask(L, size)
    for q in range(2 * L):
        for k in range(2 * L):
            bq, bk = (q % L) // size, (k % L) // size
            noisy_q, noisy_k = q < L, k < L
            want = (
                (bq == bk)
                if noisy_q and noisy_k
                else (bk < bq)
                if noisy_q
                else (not noisy_k and bk <= bq)
            )
            assert bool(mask[q, k]) == want


def test_one_block_is_the_mdlm_loss():
    net, x0 = network(), data()
    mask = torch.ones_like(x0, dtype=torch.bool)
    mask[-1, 10:] = False
    block = block_diffusion_loss(net, process(), x0, LENGTH, loss_mask=mask,
                                 generator=torch.Generator().manual_seed(3))  # fmt: skip
    mdlm = continuous_time_loss(net, process(), x0, loss_mask=mask,
                                generator=torch.Generator().manual_seed(3))  # fmt: skip
    assert torch.equal(block.t, mdlm.t)
    torch.testing.assert_close(block.token_nelbo, mdlm.token_nelbo, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(block.loss, mdlm.loss, rtol=1e-5, atol=1e-6)


def test_blocks_of_one_fully_masked_are_the_autoregressive_loss():
    """With blocks of one token at ``t = 1`` every token is masked and sees the clean tokens
    before it: the bound is ``w_1 (-log p(x_i | x_<i))`` with ``w_1 = -alpha'_1 / (1 -
    alpha_1)``. The conditionals come from one model that sums the embeddings of the tokens it
    may see, read as the two streams (block) or after ``<bos>`` (autoregressive; ``<bos>`` and
    the mask embed alike, and the mask is never predicted)."""
    embed = torch.randn(VOCAB, VOCAB, generator=torch.Generator().manual_seed(2))
    embed[MASK] = embed[BOS_ID]
    embed[:, MASK] = -1e4  # the mask is never predicted (SUBS leaves it out)

    def two_streams(x, t, cond, attn_mask=None, positions=None, outputs=None):
        noisy_queries, _ = attn_mask  # (L, 2L): the rows of the outputs asked for
        return (noisy_queries.double() @ embed.double()[x])[:, :outputs]

    def autoregressive(inputs, cond=None):
        n = inputs.shape[1]
        return torch.ones(n, n).tril().double() @ embed.double()[inputs]

    x0 = data()
    p = process()
    block = block_diffusion_loss(two_streams, p, x0, 1, t=torch.ones(x0.shape))
    w = -p.alpha_prime(torch.tensor(1.0)) / (1 - p.alpha(torch.tensor(1.0)))
    ar = ar_token_nll(autoregressive, x0)
    torch.testing.assert_close(block.token_nelbo, (w * ar).to(block.token_nelbo.dtype))


@pytest.mark.parametrize("size", [1, 4, 16])
def test_each_block_sees_what_the_sampler_shows_it(size):
    """The two-stream call's logits for block ``b`` equal those of the clean prefix followed by
    the noisy block under the block-causal mask (what sampling computes)."""
    net, x0, p = network(), data(3), process()
    x_t = p.sample(x0, torch.full((3,), 0.6), torch.Generator().manual_seed(0))
    both = net(torch.cat([x_t, x0], 1), attn_mask=two_stream_mask(LENGTH, size),
               positions=torch.arange(LENGTH).repeat(2))[:, :LENGTH]  # fmt: skip
    for start in range(0, LENGTH, size):
        read = torch.cat([x0[:, :start], x_t[:, start : start + size]], 1)
        mask = block_causal_mask(read.shape[1], size)
        alone = net(read, attn_mask=mask)[:, start:]
        torch.testing.assert_close(both[:, start : start + size], alone, rtol=1e-4, atol=1e-5)
    only = net(torch.cat([x_t, x0], 1), attn_mask=two_stream_mask(LENGTH, size),
               positions=torch.arange(LENGTH).repeat(2), outputs=LENGTH)  # fmt: skip
    torch.testing.assert_close(only, both, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("size", [1, 4])
def test_the_two_stream_attention_equals_one_call_under_the_dense_mask(size):
    """Both streams' logits, and the gradients, of the two-call attention equal one attention
    call under the ``(2L, 2L)`` mask (which computes the noisy keys' scores for clean queries
    and masks them out)."""
    x0, p = data(3), process()
    x_t = p.sample(x0, torch.full((3,), 0.5), torch.Generator().manual_seed(2))
    tokens, positions = torch.cat([x_t, x0], 1), torch.arange(LENGTH).repeat(2)
    results = []
    for mask in (two_stream_mask(LENGTH, size), dense_two_stream_mask(LENGTH, size)):
        net = network()
        logits = net(tokens, attn_mask=mask, positions=positions)
        logits.square().mean().backward()
        results.append((logits, [q.grad for q in net.parameters()]))
    (split, split_grads), (dense, dense_grads) = results
    torch.testing.assert_close(split, dense, rtol=1e-5, atol=1e-6)
    for a, b in zip(split_grads, dense_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("size", [4, LENGTH])
def test_clipped_loss_is_the_integrand_at_times_in_range(size):
    """With ``mask_range`` the loss is the bound's integrand at times ``beta + (omega - beta) u``
    (the same noise, the same weight), every block's time lies in ``(beta, omega]``, and one
    block per row shows the batch still stratified over the range."""
    net, x0, p, r = network(), data(8), process(), (0.3, 0.8)
    clipped = block_diffusion_loss(net, p, x0, size, mask_range=r,
                                   generator=torch.Generator().manual_seed(5))  # fmt: skip
    g = torch.Generator().manual_seed(5)
    t = clip_times(draw_times(8 * LENGTH // size, generator=g).view(8, -1), r)
    assert bool((t > 0.3).all() and (t <= 0.8).all())
    given = block_diffusion_loss(net, p, x0, size, t=t, generator=g)
    torch.testing.assert_close(clipped.token_nelbo, given.token_nelbo, rtol=0, atol=0)
    torch.testing.assert_close(clipped.t, t.mean(1), rtol=0, atol=0)
    if size == LENGTH:
        strata = ((clipped.t - 0.3) / 0.5 * 8).ceil().long().sort().values
        assert torch.equal(strata, torch.arange(1, 9))
    full = block_diffusion_loss(net, p, x0, size, mask_range=(0.0, 1.0),
                                generator=torch.Generator().manual_seed(5))  # fmt: skip
    plain = block_diffusion_loss(net, p, x0, size, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(full.token_nelbo, plain.token_nelbo, rtol=0, atol=0)


def test_clipped_masks_only_rates_in_range():
    """Under the log-linear schedule the time is the mask rate: over many blocks of 16 tokens,
    the masked fraction of each lies within binomial reach of ``[0.3, 0.8]`` and its mean is
    0.55 (the range's middle), 5 standard errors apart at most."""
    seen = []

    def recorder(x, t, cond, attn_mask=None, positions=None, outputs=None):
        seen.append(x[:, :LENGTH] == MASK)
        return torch.zeros(x.shape[0], outputs, VOCAB)

    x0 = data(4000)
    block_diffusion_loss(recorder, process(), x0, LENGTH, mask_range=(0.3, 0.8),
                         generator=torch.Generator().manual_seed(0))  # fmt: skip
    rate = seen[0].double().mean(1)
    assert float(rate.min()) > 0.3 - 5 * (0.3 * 0.7 / LENGTH) ** 0.5
    assert float(rate.max()) < 0.8 + 5 * (0.8 * 0.2 / LENGTH) ** 0.5
    # Var = E[t(1-t)]/16 + Var(t) for t ~ U[0.3, 0.8]
    var = (0.55 - (0.55**2 + 0.5**2 / 12)) / LENGTH + 0.5**2 / 12
    assert abs(float(rate.mean()) - 0.55) < 5 * (var / 4000) ** 0.5
    with pytest.raises(ValueError, match="not both"):
        block_diffusion_loss(recorder, process(), x0, LENGTH, mask_range=(0.3, 0.8),
                             t=torch.ones(4000, 1))  # fmt: skip
    with pytest.raises(ValueError, match="0 <= beta < omega <= 1"):
        clip_times(torch.ones(3), (0.8, 0.3))


@pytest.mark.parametrize(("size", "prompt"), [(4, 6), (1, 0), (16, 3), (5, 2)])
def test_cached_sampler_equals_recomputation(size, prompt):
    net, p = network(), process()
    given = data(4)[:, :prompt] % 7 + 3  # no EOS (2) in the prompt
    runs = [
        block_sample(net, p, (4, LENGTH), block_size=size, steps=3, prompt=given, eos_id=2,
                     pad_id=0, kv_cache=cached, generator=torch.Generator().manual_seed(9))
        for cached in (True, False)
    ]  # fmt: skip
    assert torch.equal(runs[0].tokens, runs[1].tokens)
    assert torch.equal(runs[0].lengths, runs[1].lengths)
    assert torch.equal(runs[0].tokens[:, :prompt], given)
    assert not bool((runs[0].tokens == MASK).any())


# ---------------------------------------------------------------- the recipe


@pytest.fixture(scope="module")
def block_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("block")
    (root / "text.txt").write_text(load_corpus()[100_000:130_000], encoding="utf-8")
    out = root / "run"
    difflab.train("text-tiny", [f"data.source={root / 'text.txt'}", "diffusion.kind=block",
                                "diffusion.block_size=8", "train.steps=2"],
                  out=str(out), progress=False)  # fmt: skip
    return out


def test_recipe_trains_samples_and_evaluates(block_run, tmp_path, monkeypatch, capsys):
    run = difflab.load(block_run)
    texts = run.sample(3, prompt="To be", length=70, steps=2).texts
    assert len(texts) == 3 and all(t.startswith("To be") for t in texts)
    metrics = run.evaluate(n=8).metrics
    assert metrics["kind"] == "block" and metrics["bound"] and metrics["bits_per_character"] > 0
    code, _, err = cli(monkeypatch, capsys, "sample", str(block_run), "--n", "2", "--out",
                       str(tmp_path / "s"))  # fmt: skip
    assert code == 0, err


def test_the_bound_is_unchanged_by_the_training_range(block_run):
    """The run trained with the default clipped range [0.3, 0.8]; its evaluation is the
    full-range bound whatever the range recorded in its config."""
    run = difflab.load(block_run)
    model = run.model
    assert model.config.mask_range == (0.3, 0.8)
    before = run.evaluate(n=8, seed=3).metrics
    model.config.diffusion.mask_range = [0.0, 1.0]
    assert model.config.mask_range == (0.0, 1.0)
    after = run.evaluate(n=8, seed=3).metrics
    assert before["nats_per_token"] == after["nats_per_token"]


T = ["--quiet", "train.max_minutes=0.01"]
REFUSALS = [
    (["train", "text-tiny", "diffusion.kind=block", "diffusion.block_size=5", *T],
     "diffusion.block_size=5 must divide data.length=32"),
    (["train", "text-tiny", "diffusion.block_size=4", *T],
     "diffusion.block_size does not apply to diffusion.kind=mdlm"),
    (["train", "text-tiny", "diffusion.kind=block", "diffusion.block_size=0", *T],
     "diffusion.block_size must be >= 1"),
    (["train", "text-tiny", "diffusion.kind=block", "model.time_conditioning=true", *T],
     "model.time_conditioning cannot be on for diffusion.kind=block"),
    (["train", "text-tiny", "diffusion.kind=block", "sample.sampler=cached", *T],
     "sample.sampler does not apply to diffusion.kind=block"),
    (["sample", "{run}", "--sampler", "cached"], "--sampler does not apply to block runs"),
    (["train", "text-tiny", "diffusion.mask_range=[0.3,0.8]", *T],
     "diffusion.mask_range does not apply to diffusion.kind=mdlm"),
    (["train", "text-tiny", "diffusion.kind=block", "diffusion.schedule=cosine",
      "diffusion.mask_range=[0.3,0.8]", *T],
     "diffusion.mask_range does not apply to diffusion.kind=block with the cosine schedule"),
    (["train", "text-tiny", "diffusion.kind=block", "diffusion.mask_range=[0.8,0.3]", *T],
     "diffusion.mask_range must be [beta, omega] with 0 <= beta < omega <= 1"),
    (["train", "text-tiny", "diffusion.kind=block", "diffusion.mask_range=[0.3]", *T],
     "diffusion.mask_range must be [beta, omega]"),
    (["train", "text-tiny", "diffusion.kind=block", "diffusion.mask_range=[0,1.5]", *T],
     "diffusion.mask_range must be [beta, omega]"),
]  # fmt: skip


@pytest.mark.parametrize(("args", "message"), REFUSALS)
def test_refusals(block_run, tmp_path, monkeypatch, capsys, args, message):
    words = [w.format(run=block_run) for w in args]
    words += [f"train.out={tmp_path / 'new'}"] if words[0] == "train" else ["--out", str(tmp_path)]
    code, _, err = cli(monkeypatch, capsys, *words)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and message in lines[0], err
    assert not (tmp_path / "new").exists()
