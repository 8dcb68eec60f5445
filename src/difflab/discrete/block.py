"""Block diffusion (BD3-LM, Arriola et al. 2025): autoregressive over blocks of ``L'`` tokens,
masked diffusion inside a block,

    log p(x) = sum_b log p(x^b | x^{<b}),
    -log p(x^b | x^{<b}) <= E_{t ~ U(0, 1]} sum_{i in b} -alpha'_t / (1 - alpha_t)
                             1[x_t^i = m] (-log x_theta(x_0^i | x_t^b, x^{<b})),

each block with its own time ``t_b`` (MDLM's bound of seed 000 per block, given the clean blocks
before it). ``L' = 1`` makes every block one token: at ``t = 1`` (all masked, weight
``-alpha'_1 / (1 - alpha_1)``) the bound is the autoregressive cross-entropy; ``L' = L`` is one
block, MDLM's bound.

Training may clip the times (BD3-LM's "clipped" schedule): ``t_b ~ U[beta, omega]`` instead of
``U(0, 1]``, with the same weight ``-alpha'_t / (1 - alpha_t)``. Under the log-linear schedule
(``alpha_t = 1 - t``, block diffusion's) ``t`` is the mask rate, so the network trains only on
blocks with ``beta`` to ``omega`` of their tokens masked: the near-clean blocks (weight ``1/t``
large, few masked tokens) and the all-masked ones, whose terms vary most between draws, are left
out, which lowers the variance of the gradient for small blocks. The clipped loss is the
integrand's mean over ``[beta, omega]``, not a bound; the bound (evaluation) keeps ``U(0, 1]``.

Training is vectorised over all blocks in one network call (BD3-LM's two streams): the network
reads ``[x_t, x_0]`` (``2L`` tokens, both at positions ``0..L-1``) under :func:`two_stream_mask`,
so that the noisy block ``b`` sees itself and the clean blocks before it, and each clean block
sees the clean blocks up to itself; the logits of the ``x_t`` stream give ``x_theta`` (the
last layer computes the queries, MLP and logits of that stream alone: the clean stream's outputs
there are read by nothing).

Sampling (:func:`block_sample`) draws block after block: the clean blocks so far sit in a
key/value cache (their keys and values under the block-causal mask, as in training), the next
block starts all masked and is denoised by ancestral sampling (the ``cached`` sampler of
:mod:`difflab.discrete.samplers`) over ``steps`` steps, each call reading the cache and the block;
the finished block is then run once more, clean, to append its keys and values. Generation
stops after the block in which every row has emitted EOS.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import Tensor

from difflab.discrete.objectives import DiscreteLoss, _reduce, draw_times
from difflab.discrete.process import MaskedProcess
from difflab.discrete.samplers import (
    DiscreteSamples,
    ancestral_sample,
    truncate_at_eos,
    uniform_times,
)


class BlockTokenModel(Protocol):
    """``model(x (B, T), t, cond, attn_mask=..., positions=..., outputs=..., cache=...) ->
    logits (B, T or outputs, V)``: a bidirectional
    :class:`~difflab.nets.transformer.TextTransformer` that takes an attention mask, positions
    and the number of leading tokens whose logits are wanted (training) or a key/value cache
    (sampling)."""

    def __call__(self, x: Tensor, t: Any = None, cond: Any = None, **options: Any) -> Tensor: ...

    def new_cache(self, batch_size: int, capacity: int) -> Any: ...


def block_causal_mask(length: int, block_size: int, device: Any = None) -> Tensor:
    """``(L, L)`` bool: query ``i`` may attend to key ``j`` iff ``block(j) <= block(i)``."""
    block = torch.arange(length, device=device) // block_size
    return block[None, :] <= block[:, None]


def two_stream_mask(length: int, block_size: int, device: Any = None) -> tuple[Tensor, Tensor]:
    """The attention pattern over ``[x_t, x_0]``: a noisy query of block ``b`` sees the noisy
    keys of block ``b`` and the clean keys of blocks ``< b``; a clean query of block ``b`` sees
    the clean keys of blocks ``<= b``; no clean query sees a noisy key. As the network takes
    it, two bool masks: the noisy queries' ``(L, 2L)`` over all keys and the clean queries'
    ``(L, L)`` over the clean keys (the ``(L, L)`` block of noisy keys they never see is not
    computed)."""
    block = torch.arange(length, device=device) // block_size
    same = block[:, None] == block[None, :]
    before = block[None, :] < block[:, None]
    return torch.cat([same, before], dim=1), block_causal_mask(length, block_size, device)


def block_diffusion_loss(
    model: BlockTokenModel,
    process: MaskedProcess,
    x0: Tensor,
    block_size: int,
    *,
    loss_mask: Tensor | None = None,
    cond: Any = None,
    t: Tensor | None = None,
    stratified: bool = True,
    mask_range: tuple[float, float] | None = None,
    generator: torch.Generator | None = None,
) -> DiscreteLoss:
    """The block bound of the module docstring for ``x0 (B, L)`` in one network call.
    ``t`` ``(B, L / block_size)``: each block's time (default: drawn stratified over all the
    batch's blocks, from ``U(0, 1]`` or, with ``mask_range = (beta, omega)``, from
    ``U[beta, omega]``: the clipped training loss, module docstring). ``DiscreteLoss.t`` holds
    the mean time per row."""
    if not isinstance(process, MaskedProcess):
        raise ValueError("block diffusion needs the masked process")
    B, L = x0.shape
    if block_size < 1 or L % block_size:
        raise ValueError(f"the length {L} is not a multiple of the block size {block_size}")
    blocks = L // block_size
    if t is None:
        t = draw_times(B * blocks, stratified=stratified, generator=generator, device=x0.device)
        t = t.view(B, blocks)
        if mask_range is not None:
            t = clip_times(t, mask_range)
    elif mask_range is not None:
        raise ValueError("give the times t or a mask_range to draw them from, not both")
    t_token = t.double().repeat_interleave(block_size, dim=1)  # (B, L)
    u = torch.rand(x0.shape, generator=generator, device=x0.device, dtype=torch.float64)
    x_t = torch.where(u < process.alpha(t_token), x0, process.mask_id)
    positions = torch.arange(L, device=x0.device).repeat(2)
    mask = two_stream_mask(L, block_size, x0.device)
    logits = model(torch.cat([x_t, x0], dim=1), None, cond, attn_mask=mask, positions=positions,
                   outputs=L)  # fmt: skip
    log_x0 = process.x0_log_probs(logits.float(), x_t)
    tiny = torch.finfo(torch.float64).tiny
    weight = -process.alpha_prime(t_token) / (1.0 - process.alpha(t_token)).clamp_min(tiny)
    nll = -log_x0.gather(-1, x0.unsqueeze(-1)).squeeze(-1)
    rate = torch.where(x_t == process.mask_id, weight.to(nll.dtype) * nll, torch.zeros_like(nll))
    nelbo = rate + process.prior_kl(x0).to(rate.dtype)
    return _reduce(nelbo, nelbo, loss_mask, t.float().mean(1))


def clip_times(t: Tensor, mask_range: tuple[float, float]) -> Tensor:
    """``beta + (omega - beta) t``: times ``t ~ U(0, 1]`` carried onto ``(beta, omega]``
    (stratified times stay stratified)."""
    beta, omega = mask_range
    if not 0.0 <= beta < omega <= 1.0:
        raise ValueError(f"the mask range must have 0 <= beta < omega <= 1, got {mask_range}")
    return beta + (omega - beta) * t


@torch.inference_mode()
def block_sample(
    model: BlockTokenModel,
    process: MaskedProcess,
    shape: tuple[int, int],
    *,
    block_size: int,
    steps: int,
    prompt: Tensor | None = None,
    cond: Any = None,
    temperature: float = 1.0,
    top_p: float | None = None,
    eos_id: int | None = None,
    pad_id: int | None = None,
    kv_cache: bool = True,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    callback: Any = None,
) -> DiscreteSamples:
    """``shape = (B, length)`` tokens (``length`` at most the model's context) after the
    optional ``(B, P)`` ``prompt``, block by block (module docstring). Blocks are aligned to
    multiples of ``block_size`` from the first token; a block the prompt part-fills keeps its
    given tokens. ``kv_cache=False`` recomputes the clean prefix in every call (under the
    block-causal mask) instead of caching it: the same samples, slower. ``nfe`` counts network
    calls (the cached sampler skips the steps where no token can change)."""
    B, length = shape
    out = torch.zeros(B, 0, dtype=torch.long, device=device) if prompt is None else prompt
    given = out.shape[1]
    if given > length:
        raise ValueError(f"the prompt ({given} tokens) is longer than the sequence ({length})")
    times = uniform_times(steps)
    cache = model.new_cache(B, length) if kv_cache else None
    committed = 0  # tokens whose keys and values are in the cache
    start = given // block_size * block_size
    nfe = 0
    ended = torch.zeros(B, dtype=torch.bool, device=out.device)
    if eos_id is not None and given:
        ended = (out == eos_id).any(1)
    while start < length and not (eos_id is not None and bool(ended.all())):
        end = min(start + block_size, length)
        if cache is not None and committed < start:  # the clean blocks, block-causally
            mask = block_causal_mask(start - committed, block_size, out.device)
            seen = mask.new_ones(start - committed, committed)
            model(out[:, committed:start], None, cond, cache=cache,
                  attn_mask=torch.cat([seen, mask], dim=1))  # fmt: skip
            nfe, committed = nfe + 1, start
        fixed = torch.zeros(B, end - start, dtype=torch.bool, device=out.device)
        fixed[:, : out.shape[1] - start] = True
        tokens = torch.nn.functional.pad(out[:, start:], (0, end - out.shape[1]))
        denoiser = _block_denoiser(model, out[:, :start], block_size, cache)
        result = ancestral_sample(
            denoiser, process, (B, end - start), times, cond=cond, fixed_tokens=tokens,
            fixed_mask=fixed, temperature=temperature, top_p=top_p, cache=True,
            generator=generator, callback=callback,
        )  # fmt: skip
        out = torch.cat([out[:, :start], result.tokens], dim=1)
        nfe += result.nfe
        if eos_id is not None:
            ended = ended | (result.tokens == eos_id).any(1)
        start = end
    if eos_id is None:
        return DiscreteSamples(out, torch.full((B,), out.shape[1], device=out.device), nfe)
    fill = eos_id if pad_id is None else pad_id
    out = torch.nn.functional.pad(out, (0, length - out.shape[1]), value=fill)
    tokens, lengths = truncate_at_eos(out, eos_id, pad_id)
    return DiscreteSamples(tokens, lengths, nfe)


def _block_denoiser(model: BlockTokenModel, prefix: Tensor, block_size: int, cache: Any) -> Any:
    """``denoiser(x_block, t, cond)``: the block's logits given the clean ``prefix``, from the
    cache (whose length is restored after the call: the noisy keys are not kept) or recomputed
    under the block-causal mask."""
    P = prefix.shape[1]

    def cached(x: Tensor, t: Tensor, cond: Any) -> Tensor:
        length = cache.length
        logits = model(x, None, cond, cache=cache)
        cache.length = length
        return logits

    def recomputed(x: Tensor, t: Tensor, cond: Any) -> Tensor:
        n = P + x.shape[1]
        mask = block_causal_mask(n, block_size, x.device)  # the last block sees all of itself
        return model(torch.cat([prefix, x], dim=1), None, cond, attn_mask=mask)[:, P:]

    return recomputed if cache is None else cached
