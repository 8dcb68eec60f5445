"""``diffusion.kind=latent-text``: Gaussian diffusion in the latent space of a text autoencoder
(LD4LG, Lovelace et al. 2023; PLANNER, Zhang et al. 2023; TEncDM, Shabalin et al. 2024; COSMOS,
Meshchaninov et al. 2025; seeds 000 and 003).

One run, two stages (``difflab train text-shakespeare diffusion.kind=latent-text``):

1. **The autoencoder** (:class:`~difflab.nets.text_autoencoder.TextAutoencoder`: ``K`` latent
   vectors of width ``d`` per row, each pooled from ``L / K`` tokens after transformer blocks
   over the row, decoded non-autoregressively) trains for
   ``latent_text.ae_steps`` steps on the run's rows with the cross-entropy of the decoded
   tokens, into ``RUN/autoencoder/``. Its latents are corrupted while it trains, COSMOS-style,
   so that the decoder reads the imperfect latents a diffusion sampler ends with:

   - Gaussian noise ``z <- z + sigma_b eps`` with ``sigma_b ~ U(0, ae_noise)`` per row (on
     latents of unit std, ``ae_noise = 0.2`` by default): a sampled latent is off by a little
     everywhere, and a decoder that has only seen exact latents may map a nearby point to
     another text; the uniform level keeps clean latents (``sigma_b`` near 0) in the mix, so
     exact reconstruction is still what it learns;
   - masking: each latent vector is zeroed with probability ``ae_mask`` (0.1), so that the text
     is spread over the ``K`` vectors and one badly sampled vector does not lose its words.

   Neither applies outside this stage's loss: encoding for the diffusion stage, sampling and
   evaluation use the clean ``z = E(w)``.

   The stage is part of the run rather than a separate run named by key (as the image
   ``latent.autoencoder=RUN`` is) because a text run learns its tokenizer from its own training
   split: an autoencoder of another run would have to share it id for id, and one command then
   trains what sampling needs.

2. **The latent scale** ``s = 1 / std(z)`` is measured over every coordinate of the training
   rows' clean latents under the trained (EMA) encoder and stored with the weights; the
   encoder's layer norm makes it close to 1 already, the measurement makes it exact on the
   training data. **Diffusion** then trains on ``z_0 = s E(w)`` (each batch encoded as it is
   drawn) with the autoencoder frozen: ``z_t = alpha_t z_0 + sigma_t eps`` with a schedule of
   the library (``diffusion.schedule``, empty: ``cosine-logsnr``), a parameterization
   (``diffusion.prediction``, empty: ``x0``) and the plain MSE of that parameterization
   (:func:`~difflab.gaussian.objectives.loss_fn`), the denoiser an
   :class:`~difflab.nets.embedding_transformer.EmbeddingTransformer` over the ``K`` latents,
   self-conditioned unless ``diffusion.self_condition=false``
   (:class:`~difflab.gaussian.self_conditioning.SelfConditionedTraining`). ``train.max_minutes``
   bounds the two stages together: the diffusion stage gets what the autoencoder left.

Sampling draws ``z_0`` with a Gaussian sampler of the library from ``N(0, prior_std^2 I)``
(self-conditioned: :class:`~difflab.gaussian.self_conditioning.SelfConditioned`), decodes
``argmax_w p(w | z_0 / s)`` at every position at once and cuts each row at its first ``<eos>``.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from difflab.data.text import BOS_ID, EOS_ID, PAD_ID, pack_texts
from difflab.discrete.samplers import truncate_at_eos
from difflab.errors import UserError
from difflab.evaluate.text_metrics import (
    distinct_n,
    generative_perplexity,
    unigram_entropy,
    valid_token_mask,
)
from difflab.gaussian.objectives import loss_fn, sample_times
from difflab.gaussian.parameterization import Denoiser, DenoiserFn
from difflab.gaussian.samplers import SAMPLERS
from difflab.gaussian.schedules import Schedule
from difflab.gaussian.self_conditioning import SelfConditioned, SelfConditionedTraining
from difflab.nets.embedding_transformer import EmbeddingTransformer
from difflab.nets.text_autoencoder import LatentTextNet, TextAutoencoder
from difflab.recipes import Evaluation, flag, positive_int, seed_value
from difflab.recipes.text.config import DEFAULT_PREDICTION, GAUSSIAN_SAMPLERS, TextConfig
from difflab.recipes.text.continuous import line_rows
from difflab.train.checkpoint import FILENAME, load_checkpoint
from difflab.train.trainer import Trainer, TrainResult

KIND = "latent-text"
#: The folder of the autoencoder stage inside the run.
AUTOENCODER_FOLDER = "autoencoder"
#: Defaults of the ``latent_text`` section (:class:`~.config.LatentTextSection`).
TOKENS_PER_LATENT = 4
DEFAULT_DIM = 16
DEFAULT_AE_DEPTH = 2
DEFAULT_AE_STEPS = 1000
DEFAULT_AE_NOISE = 0.2
DEFAULT_AE_MASK = 0.1
#: Rows encoded or decoded per network call outside training.
CHUNK = 256
#: The most training rows the latent scale is measured on.
SCALE_ROWS = 4096
#: ``difflab eval``: the most passages it samples to judge (``min(n, EVAL_SAMPLES)``).
EVAL_SAMPLES = 64


# ---------------------------------------------------------------- options and network


@dataclasses.dataclass(frozen=True)
class LatentOptions:
    """The ``latent_text`` section with its defaults filled in."""

    latents: int
    dim: int
    ae_depth: int
    ae_steps: int
    ae_noise: float
    ae_mask: float


def options(cfg: TextConfig) -> LatentOptions:
    s = cfg.latent_text

    def pick(value: Any, default: Any) -> Any:
        return default if value is None else value

    return LatentOptions(
        latents=pick(s.latents, default_latents(cfg.data.length)),
        dim=pick(s.dim, DEFAULT_DIM),
        ae_depth=pick(s.ae_depth, DEFAULT_AE_DEPTH),
        ae_steps=pick(s.ae_steps, DEFAULT_AE_STEPS),
        ae_noise=pick(s.ae_noise, DEFAULT_AE_NOISE),
        ae_mask=pick(s.ae_mask, DEFAULT_AE_MASK),
    )


def default_latents(length: int) -> int:
    """The largest divisor of ``length`` at most ``length / TOKENS_PER_LATENT`` (at least 1)."""
    return max(k for k in range(1, max(1, length // TOKENS_PER_LATENT) + 1) if length % k == 0)


def prediction(cfg: TextConfig) -> str:
    return cfg.diffusion.prediction or DEFAULT_PREDICTION


def self_conditioned(cfg: TextConfig) -> bool:
    """``diffusion.self_condition``, on when empty."""
    return cfg.diffusion.self_condition is not False


def build_net(cfg: TextConfig, vocab_size: int) -> LatentTextNet:
    """The autoencoder and the denoiser of the model's width, depth and heads."""
    m, o = cfg.model, options(cfg)
    autoencoder = TextAutoencoder(
        vocab_size, cfg.data.length, o.latents, o.dim, width=m.width, depth=o.ae_depth,
        num_heads=m.num_heads, dropout=m.dropout,
    )  # fmt: skip
    denoiser = EmbeddingTransformer(
        o.dim, o.latents, width=m.width, depth=m.depth, num_heads=m.num_heads,
        dropout=m.dropout, self_condition=self_conditioned(cfg),
    )  # fmt: skip
    return LatentTextNet(autoencoder, denoiser)


# ---------------------------------------------------------------- the autoencoder stage


def corrupt(
    z: Tensor, noise: float, mask: float, generator: torch.Generator | None = None
) -> Tensor:
    """The latents ``z (B, K, d)`` as the autoencoder's decoder reads them while it trains:
    ``z + sigma_b eps`` with ``sigma_b ~ U(0, noise)`` per row, then each latent vector zeroed
    with probability ``mask`` (module docstring)."""
    B, K, _ = z.shape
    sigma = noise * torch.rand(B, 1, 1, generator=generator, device=z.device, dtype=z.dtype)
    eps = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
    kept = torch.rand(B, K, 1, generator=generator, device=z.device) >= mask
    return torch.where(kept, z + sigma * eps, torch.zeros_like(z))


def reconstruction_nll(autoencoder: TextAutoencoder, tokens: Tensor, loss_mask: Tensor,
                       z: Tensor) -> Tensor:  # fmt: skip
    """``-log p(w | z)`` per counted token of ``tokens (B, L)``, the decoder reading ``z``."""
    logits = autoencoder.decode(z).float()
    nll = F.cross_entropy(logits.transpose(1, 2), tokens, reduction="none")
    return (nll * loss_mask).sum() / loss_mask.sum().clamp_min(1)


def autoencoder_loss(o: LatentOptions) -> Any:
    """``loss(autoencoder, (tokens, loss_mask), generator)``: the reconstruction cross-entropy
    of the corrupted latents (:func:`corrupt`), nats per counted token."""

    def loss(net: nn.Module, batch: tuple[Tensor, ...], generator: torch.Generator) -> Tensor:
        ae: Any = net
        tokens, loss_mask = batch[0], batch[1]
        z = corrupt(ae.encode(tokens), o.ae_noise, o.ae_mask, generator)
        return reconstruction_nll(ae, tokens, loss_mask, z)

    return loss


@torch.no_grad()
def encode_rows(net: LatentTextNet, tokens: Tensor, scaled: bool = True) -> Tensor:
    """The clean latents ``(N, K, d)`` of ``tokens (N, L)`` (``s z`` when ``scaled``, else
    ``z``), in chunks of :data:`CHUNK` rows."""
    device = net.embed.weight.device
    parts = []
    for rows in tokens.split(CHUNK):
        z = net.autoencoder.encode(rows.to(device))
        parts.append(net.latent_scale * z if scaled else z)
    return torch.cat(parts)


@torch.no_grad()
def decode_tokens(net: LatentTextNet, z0: Tensor) -> Tensor:
    """``argmax_w p(w_i | z_0 / s)`` at every position, ``(N, L)`` ids."""
    return torch.cat([net.decode(part).argmax(-1) for part in z0.split(CHUNK)])


def measure_latent_scale(net: LatentTextNet, tokens: Tensor) -> float:
    """``s = 1 / std(z)`` over every coordinate of the clean latents of at most
    :data:`SCALE_ROWS` rows spread evenly over ``tokens``."""
    rows = torch.linspace(0, len(tokens) - 1, min(SCALE_ROWS, len(tokens))).round().long()
    return float(1.0 / encode_rows(net, tokens[rows], scaled=False).double().std())


# ---------------------------------------------------------------- the diffusion stage


def latent_diffusion_loss(
    denoiser: DenoiserFn,
    z0: Tensor,
    *,
    self_condition: bool,
    stratified: bool,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The plain MSE of the denoiser's parameterization on ``z_t = alpha_t z_0 + sigma_t eps``
    (:func:`~difflab.gaussian.objectives.loss_fn`), ``t`` uniform (``stratified``: one per
    stratum of the batch); the network also reads a previous estimate when ``self_condition``
    (:class:`~difflab.gaussian.self_conditioning.SelfConditionedTraining`)."""
    schedule = denoiser.schedule
    t = sample_times(schedule, z0.shape[0], time_sampling="stratified" if stratified else "iid",
                     generator=generator, device=z0.device)  # fmt: skip
    eps = torch.randn(z0.shape, generator=generator, device=z0.device, dtype=z0.dtype)
    if self_condition:
        denoiser = SelfConditionedTraining(denoiser, generator)
    return loss_fn(denoiser, z0, None, t=t, eps=eps)  # type: ignore[arg-type]


def make_latent_loss(cfg: TextConfig, schedule: Schedule, autoencoder: TextAutoencoder,
                     scale: float) -> Any:  # fmt: skip
    """``loss(net, (tokens, loss_mask), generator)`` for the trainer: the rows encoded by the
    frozen ``autoencoder`` to ``z_0 = scale z`` (clean, without gradient), then
    :func:`latent_diffusion_loss`. Encoding each batch as it is drawn costs one encoder call per
    step, against encoding every training row before the first."""
    stratified = cfg.diffusion.stratified is not False

    def loss(net: nn.Module, batch: tuple[Tensor, ...], generator: torch.Generator) -> Tensor:
        with torch.no_grad():
            z0 = scale * autoencoder.eval().encode(batch[0])
        return latent_diffusion_loss(
            Denoiser(net, schedule, prediction(cfg)), z0,  # type: ignore[arg-type]
            self_condition=self_conditioned(cfg), stratified=stratified, generator=generator,
        )  # fmt: skip

    return loss


# ---------------------------------------------------------------- training, both stages


def check_fresh(out: Path) -> None:
    """A run that stopped in its autoencoder stage is continued with ``--resume`` only."""
    if (out / AUTOENCODER_FOLDER / FILENAME).exists():
        raise UserError(f"{out / AUTOENCODER_FOLDER} holds the autoencoder stage of an "
                        "earlier run: pass --resume to continue it or choose another "
                        "train.out")  # fmt: skip


def train(
    cfg: TextConfig,
    net: LatentTextNet,
    schedule: Schedule,
    rows: tuple[Tensor, Tensor],
    meta: dict[str, Any],
    out: Path,
    *,
    resume: bool,
    progress: bool,
) -> TrainResult:
    """Both stages (module docstring) on the training ``rows`` ``(tokens, loss_mask)``: the
    autoencoder into ``out/autoencoder`` (skipped on ``resume`` once it has its steps), then
    the diffusion model into ``out``. The result's ``seconds`` counts both stages run now."""
    o, ae_out = options(cfg), out / AUTOENCODER_FOLDER
    ae_train = dataclasses.replace(cfg.train, steps=o.ae_steps, out=str(ae_out), max_minutes=0.0)
    ae_meta = {**meta, "recipe": "text-autoencoder"}  # not a run to sample: a stage of one
    start = time.perf_counter()
    ae_saved = (ae_out / FILENAME).exists()
    if ae_saved and load_checkpoint(ae_out).step >= o.ae_steps:
        ema = load_checkpoint(ae_out).ema
    else:
        ae_trainer = Trainer(net.autoencoder, autoencoder_loss(o), rows, ae_train, ae_meta, ae_out)
        ae_trainer.fit(resume=resume and ae_saved, progress=progress)
        ema = ae_trainer.ema_state()  # every process holds it (rank 0 wrote the checkpoint)
    ae_seconds = time.perf_counter() - start
    net.autoencoder.load_state_dict(ema)
    net.autoencoder.requires_grad_(False).eval()
    scale = measure_latent_scale(net, rows[0])
    net.latent_scale.fill_(scale)
    train_cfg = cfg.train
    if train_cfg.max_minutes:
        left = train_cfg.max_minutes - ae_seconds / 60
        if left <= 0:
            raise UserError(f"train.max_minutes={train_cfg.max_minutes:g} ran out in the "
                            f"autoencoder stage ({ae_seconds:.0f} s for latent_text.ae_steps="
                            f"{o.ae_steps}): continue with --resume and more minutes, or "
                            "lower latent_text.ae_steps")  # fmt: skip
        train_cfg = dataclasses.replace(train_cfg, max_minutes=left)
    meta = {**meta, "latent_scale": scale}
    loss = make_latent_loss(cfg, schedule, net.autoencoder, scale)
    trainer = Trainer(net, loss, rows, train_cfg, meta, out)
    result = trainer.fit(resume=resume and (out / FILENAME).exists(), progress=progress)
    return dataclasses.replace(result, seconds=result.seconds + ae_seconds)


# ---------------------------------------------------------------- sampling


@torch.inference_mode()
def sample_latents(model: Any, n: int, *, steps: int, sampler: str, seed: int) -> Tensor:
    """``n`` data latents ``z_0 (n, K, d)`` drawn by ``sampler`` over ``steps`` steps of ``t``
    from ``N(0, prior_std^2 I)``."""
    net: LatentTextNet = model.net
    device = model.device
    generator = torch.Generator(device).manual_seed(seed)
    denoiser: DenoiserFn = Denoiser(net, model.process, prediction(model.config))
    if net.self_condition:
        denoiser = SelfConditioned(denoiser)
    shape = (n, net.denoiser.length, net.denoiser.dim)
    z = torch.randn(shape, generator=generator, device=device) * model.process.prior_std
    return SAMPLERS[sampler](denoiser, z, model.process.timesteps(steps), generator=generator)


def sample_tokens(model: Any, n: int, *, steps: int, sampler: str, seed: int) -> Tensor:
    """``(n, L)`` ids of ``n`` sampled rows decoded at once, each cut after its first ``<eos>``
    (then ``<pad>``)."""
    z0 = sample_latents(model, n, steps=steps, sampler=sampler, seed=seed)
    return truncate_at_eos(decode_tokens(model.net, z0).cpu(), EOS_ID, PAD_ID)[0]


def sample_texts(
    model: Any,
    n: int,
    *,
    prompt: str | None,
    length: int | None,
    steps: int | None,
    sampler: str | None,
    clamp: bool | None,
    seed: int | None,
    others: dict[str, Any],
) -> list[str]:
    """The texts of :meth:`TextRecipe.sample`: ``n`` passages of at most ``length`` tokens (one
    decoded row each). ``prompt`` and ``clamp`` do not apply (the latents describe the whole
    row, and are not word vectors to snap to), nor does an option of ``others`` that is given."""
    given = {"prompt": prompt, "clamp": clamp, **others}
    for name, value in given.items():
        if value is not None:
            raise UserError(f"{flag(name)} does not apply to diffusion.kind={KIND}")
    if sampler is not None and sampler not in GAUSSIAN_SAMPLERS:
        raise UserError(f"{flag('sampler')} must be one of {', '.join(GAUSSIAN_SAMPLERS)} for "
                        f"diffusion.kind={KIND}, got {sampler!r}")  # fmt: skip
    cfg = model.config
    length = (cfg.sample.length or model.context) if length is None else length
    if positive_int("length", length) > model.context:
        raise UserError(f"--length must be at most the context ({model.context} tokens) for "
                        f"diffusion.kind={KIND}: it decodes one row")  # fmt: skip
    tokens = sample_tokens(
        model, n, steps=cfg.sample_steps if steps is None else positive_int("steps", steps),
        sampler=cfg.sampler if sampler is None else sampler,
        seed=cfg.sample.seed if seed is None else seed_value(seed),
    )  # fmt: skip
    tokens = truncate_at_eos(tokens[:, :length], EOS_ID, PAD_ID)[0]
    return [model.tokenizer.decode(row) for row in tokens]


# ---------------------------------------------------------------- evaluation


def held_out_rows(model: Any, documents: list[str]) -> tuple[Tensor, Tensor]:
    """``(tokens, loss_mask)`` of the held-out ``documents`` in the run's row form (packed, or
    whole lines with ``diffusion.lines``)."""
    if model.config.diffusion.lines:
        return line_rows(documents, model.tokenizer, model.context)
    packed = pack_texts(documents, model.tokenizer, model.context)
    return packed.tokens, packed.loss_mask


@torch.no_grad()
def reconstruction(net: LatentTextNet, tokens: Tensor, loss_mask: Tensor) -> tuple[float, float]:
    """``(exact, accuracy)`` of decoding the clean latents of ``tokens``: the share of rows
    whose every counted token comes back, and the share of counted tokens that do."""
    decoded = decode_tokens(net, encode_rows(net, tokens)).cpu()
    right = (decoded == tokens) | ~loss_mask
    accuracy = float(right[loss_mask].float().mean()) if bool(loss_mask.any()) else 1.0
    return float(right.all(1).float().mean()), accuracy


def sample_quality(tokens: Tensor, judge: nn.Module | None = None) -> dict[str, float]:
    """Unigram entropy (nats), distinct-2 and distinct-3 of sampled rows, and their perplexity
    under a causal ``judge`` network when given (:mod:`difflab.evaluate.text_metrics`)."""
    mask = valid_token_mask(tokens, EOS_ID, PAD_ID)
    mask[:, 0] |= ~mask.any(1)  # an empty row counts its first token, so every row has one
    figures = {"unigram_entropy": unigram_entropy(tokens, mask),
               "distinct_2": distinct_n(tokens, 2, mask),
               "distinct_3": distinct_n(tokens, 3, mask)}  # fmt: skip
    if judge is not None:
        device = next(judge.parameters()).device
        figures["gen_perplexity"] = generative_perplexity(
            lambda x: judge(x), tokens.to(device), mask.to(device), BOS_ID
        )
    return figures


@torch.inference_mode()
def score_held_out(
    model: Any,
    documents: list[str],
    *,
    n: int,
    seed: int,
    t_samples: int | None,
    judge: Any = None,
) -> Evaluation:
    """On ``n`` held-out rows spread over the held-out split: ``latent_loss``, the diffusion
    loss on their latents (``t_samples`` draws of ``t`` each, empty: 4; not a likelihood
    bound: ``bound`` is False), ``latent_std`` (the standard deviation of their data latents
    ``s z``, 1 on the training rows), ``reconstruction_exact`` and ``reconstruction_accuracy``
    (:func:`reconstruction`); and on ``min(n, EVAL_SAMPLES)`` passages sampled with the run's
    sampler and steps, :func:`sample_quality` (``gen_perplexity`` under ``judge``, an ``ar``
    text model of the same tokenizer, when given)."""
    positive_int("n", n)
    repeats = 4 if t_samples is None else positive_int("t_samples", t_samples)
    seed = seed_value(seed)
    if not documents:
        raise UserError("this run's data has no held-out text")
    tokens, loss_mask = held_out_rows(model, documents)
    rows = torch.linspace(0, len(tokens) - 1, min(n, len(tokens))).round().long()
    tokens, loss_mask = tokens[rows], loss_mask[rows]
    net, cfg = model.net, model.config
    z0 = encode_rows(net, tokens)
    generator = torch.Generator(model.device).manual_seed(seed)
    denoiser = Denoiser(net, model.process, prediction(cfg))
    loss = sum(
        float(latent_diffusion_loss(denoiser, part, self_condition=net.self_condition,
                                    stratified=False, generator=generator)) * len(part)
        for _ in range(repeats) for part in z0.split(CHUNK)
    ) / (repeats * len(z0))  # fmt: skip
    exact, accuracy = reconstruction(net, tokens, loss_mask)
    samples = sample_tokens(model, min(n, EVAL_SAMPLES), steps=cfg.sample_steps,
                            sampler=cfg.sampler, seed=seed)  # fmt: skip
    metrics: dict[str, Any] = {
        "kind": model.kind, "step": model.step, "bound": False, "sequences": len(rows),
        "latent_loss": loss, "latent_std": float(z0.double().std()),
        "reconstruction_exact": exact, "reconstruction_accuracy": accuracy,
        "samples": len(samples), **sample_quality(samples, judge),
    }  # fmt: skip
    summary = ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                        for k, v in metrics.items())  # fmt: skip
    return Evaluation(metrics, summary)


def check_judge(model: Any, judge: Any) -> None:
    """A judge is an ``ar`` text model with this run's tokenizer."""
    if judge.kind != "ar":
        raise UserError(f"--judge must be an ar text run, got diffusion.kind={judge.kind}")
    if judge.tokenizer.vocab_size != model.tokenizer.vocab_size or any(
        judge.tokenizer.decode([i]) != model.tokenizer.decode([i])
        for i in range(model.tokenizer.vocab_size)
    ):
        raise UserError("--judge must have the same tokenizer as the run it judges")
