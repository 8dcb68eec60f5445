"""The ``gaussian`` kinds of the text recipe: continuous diffusion on learned word embeddings.

- ``diffusion.kind=diffusion-lm`` (Li et al. 2022; seed 000): the rows of the text, embedded by
  ``E`` and diffused by a Gaussian schedule of the library (Diffusion-LM's ``sqrt`` by
  default), denoised by :class:`~difflab.nets.embedding_transformer.EmbeddingDiffusionNet`
  (``x_0``-prediction by default) and rounded back to words; trained end to end with seed
  000's loss (:func:`~difflab.gaussian.embedding.embedding_diffusion_loss`). Sampling runs a
  Gaussian sampler of the library (:data:`~difflab.recipes.text.config.GAUSSIAN_SAMPLERS`)
  with the clamping trick (``sample.clamp``), then rounds.
- ``diffusion.kind=diffuseq`` (Gong et al. 2023): the same model on the sequence-to-sequence
  task :data:`TASK`, by partial noising: a row is ``[source; target]``, half each, and only
  the target is diffused; the source is re-imposed at every step of sampling.
- ``diffusion.self_condition=true`` (Chen et al. 2023; seed 003), for both: the network also
  reads its previous estimate of ``x_0``.

The task, ``unshuffle``: the source is a line of the text with its words in a random order
(seeded by the line's place), the target the line itself; scored by chrF against the line
(sacrebleu's ``CHRF``: character orders 1-6, ``beta = 2``, whitespace removed). Lines of 3 words
or more that fit half a row are used.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from difflab.data.text import EOS_ID, PAD_ID, UNK_ID, Tokenizer, pack_texts
from difflab.discrete.samplers import truncate_at_eos
from difflab.errors import UserError
from difflab.gaussian.control import Guide, LikelihoodGuidance, controlled_ddpm
from difflab.gaussian.embedding import (
    Clamped,
    SourceReimposed,
    embedding_diffusion_loss,
    round_to_tokens,
)
from difflab.gaussian.parameterization import Denoiser, DenoiserFn
from difflab.gaussian.samplers import SAMPLERS
from difflab.gaussian.schedules import Schedule, make_schedule
from difflab.gaussian.self_conditioning import SelfConditioned
from difflab.nets.embedding_transformer import EmbeddingDiffusionNet
from difflab.recipes import Evaluation, flag, positive_int, seed_value
from difflab.recipes.text.config import (
    DEFAULT_EMBED_DIM,
    DEFAULT_PREDICTION,
    GAUSSIAN_SAMPLERS,
    TextConfig,
    TextDiffusionConfig,
)

#: The sequence-to-sequence task of ``diffuseq`` (module docstring).
TASK = "unshuffle"
#: The fewest words of a line of the task.
MIN_WORDS = 3
#: ``diffuseq``'s evaluation: at most this many held-out pairs decoded, each by minimum Bayes
#: risk over this many samples.
MBR_ROWS = 64
MBR_SAMPLES = 4


# ---------------------------------------------------------------- model and loss


def embed_dim(cfg: TextConfig) -> int:
    return cfg.diffusion.embed_dim or DEFAULT_EMBED_DIM


def prediction(cfg: TextConfig) -> str:
    return cfg.diffusion.prediction or DEFAULT_PREDICTION


def build_schedule(d: TextDiffusionConfig) -> Schedule:
    """The Gaussian schedule ``diffusion.schedule`` (empty: ``sqrt``)."""
    return make_schedule(d.schedule_name)


def build_net(cfg: TextConfig, vocab_size: int) -> EmbeddingDiffusionNet:
    """The embedding ``E (V, embed_dim)`` and its denoiser of the model's size."""
    m = cfg.model
    return EmbeddingDiffusionNet(
        vocab_size, embed_dim(cfg), cfg.data.length, width=m.width, depth=m.depth,
        num_heads=m.num_heads, dropout=m.dropout,
        self_condition=bool(cfg.diffusion.self_condition),
    )  # fmt: skip


def make_loss(cfg: TextConfig, schedule: Schedule) -> Any:
    """``loss(model, (tokens, loss_mask[, noise_mask]), generator)`` for the trainer: seed 000's
    loss, per counted token (``noise_mask``: ``diffuseq``'s target positions)."""
    stratified = cfg.diffusion.stratified is not False

    def loss(model: nn.Module, batch: tuple[Tensor, ...], generator: torch.Generator) -> Tensor:
        noise_mask = batch[2] if len(batch) > 2 else None
        return embedding_diffusion_loss(
            model, schedule, batch[0], prediction=prediction(cfg), loss_mask=batch[1],
            noise_mask=noise_mask, stratified=stratified, generator=generator,
        ).loss  # type: ignore[arg-type]  # fmt: skip

    return loss


# ---------------------------------------------------------------- rows of whole lines

#: ``diffusion.lines``: row ``j`` holds lines ``j .. j + k - 1`` of the text, ``k = 1 + (j mod
#: LINES_PER_ROW)`` (the trailing ones that do not fit dropped), then ``<eos>`` and ``<pad>``.
LINES_PER_ROW = 4


def line_rows(documents: list[str], tokenizer: Tokenizer, length: int) -> tuple[Tensor, Tensor]:
    """``(tokens (N, L), loss_mask)`` of ``diffusion.lines``: passages of 1 to
    :data:`LINES_PER_ROW` whole non-empty lines joined by newlines, each ending in ``<eos>`` and
    padded (every position counted: the end is generated too, which length control needs).
    Lines too long for a row start none."""
    lines = [line.strip() for doc in documents for line in doc.splitlines() if line.strip()]
    encoded = tokenizer.encode_batch(lines) if lines else []
    newline = tokenizer.encode("\n")
    rows = []
    for j in range(len(lines)):
        row: list[int] = []
        for i in range(j, min(j + 1 + j % LINES_PER_ROW, len(lines))):
            nxt = [*row, *newline, *encoded[i]] if row else list(encoded[i])
            if len(nxt) >= length:
                break
            row = nxt
        if row:
            rows.append([*row, EOS_ID] + [PAD_ID] * (length - len(row) - 1))
    if not rows:
        raise UserError(f"no line of the text fits data.length={length} with its <eos>")
    tokens = torch.tensor(rows, dtype=torch.long)
    return tokens, torch.ones_like(tokens, dtype=torch.bool)


# ---------------------------------------------------------------- the task of diffuseq


@dataclass
class TaskRows:
    """Rows ``[source; target]`` of the task: ``tokens (N, L)``, ``loss_mask`` (every position
    is counted: the target's ``<eos>`` and padding are generated too), ``noise_mask`` (True on
    the target half) and the pairs' text."""

    tokens: Tensor
    loss_mask: Tensor
    noise_mask: Tensor
    sources: list[str]
    targets: list[str]


def unshuffle_pairs(documents: list[str]) -> list[tuple[str, str]]:
    """``(shuffled line, line)`` for each line of ``documents`` with at least :data:`MIN_WORDS`
    words, in order; line ``i``'s words are shuffled by ``random.Random(i)``."""
    pairs = []
    lines = [" ".join(line.split()) for doc in documents for line in doc.splitlines()]
    for i, line in enumerate(line for line in lines if len(line.split()) >= MIN_WORDS):
        words = line.split()
        random.Random(i).shuffle(words)
        pairs.append((" ".join(words), line))
    return pairs


def task_rows(documents: list[str], tokenizer: Tokenizer, length: int) -> TaskRows:
    """The pairs of :func:`unshuffle_pairs` whose source and target each fit half a row with
    their ``<eos>``: the source fills positions ``0..L/2-1``, the target ``L/2..L-1``, each
    followed by ``<eos>`` and ``<pad>``."""
    half = length // 2
    rows, sources, targets = [], [], []
    for source, target in unshuffle_pairs(documents):
        src, tgt = tokenizer.encode(source), tokenizer.encode(target)
        if len(src) < half and len(tgt) < length - half:
            row = [PAD_ID] * length
            row[: len(src) + 1] = [*src, EOS_ID]
            row[half : half + len(tgt) + 1] = [*tgt, EOS_ID]
            rows.append(row)
            sources.append(source)
            targets.append(target)
    if not rows:
        raise UserError(f"no line of the text fits the task {TASK} in data.length={length}")
    tokens = torch.tensor(rows, dtype=torch.long)
    noise_mask = torch.zeros_like(tokens, dtype=torch.bool)
    noise_mask[:, half:] = True
    return TaskRows(tokens, torch.ones_like(noise_mask), noise_mask, sources, targets)


# ---------------------------------------------------------------- chrF and minimum Bayes risk


def chrf_metric() -> Any:
    """sacrebleu's chrF (Popović 2015) with its defaults: for each character order ``n = 1..6``
    (whitespace removed) the precision ``P_n`` and recall ``R_n`` of the n-gram multisets, averaged
    over the orders present on both sides into ``P`` and ``R``, then ``chrF = 100 (1 + beta^2) P R
    / (beta^2 P + R)`` with ``beta = 2``; a corpus score sums the counts over its pairs first."""
    try:
        from sacrebleu.metrics import CHRF
    except ImportError:
        raise UserError("chrF needs the `sacrebleu` package: pip install 'difflab[text]'") from None
    return CHRF()


def corpus_chrf(hypotheses: list[str], references: list[str]) -> float:
    """The corpus chrF of ``hypotheses`` against one reference each, in ``[0, 100]``."""
    return float(chrf_metric().corpus_score(hypotheses, [references]).score)


def minimum_bayes_risk(candidates: list[str]) -> int:
    """The index of the candidate with the highest mean sentence chrF against the others
    (minimum Bayes risk decoding with ``1 - chrF`` as the risk; the first on ties)."""
    metric = chrf_metric()
    means = [
        sum(metric.sentence_score(c, [o]).score for j, o in enumerate(candidates) if j != i)
        for i, c in enumerate(candidates)
    ]
    return max(range(len(candidates)), key=lambda i: (means[i], -i))


# ---------------------------------------------------------------- sampling


def denoiser_of(model: Any, clamp: bool, guide: Guide | None = None) -> DenoiserFn:
    """The trained network as a denoiser for the samplers: self-conditioned when trained so,
    guided by ``guide`` when given, then clamped to the embeddings when ``clamp``."""
    net = model.net
    denoiser: DenoiserFn = Denoiser(net, model.process, prediction(model.config))
    if net.self_condition:
        denoiser = SelfConditioned(denoiser)
    if guide is not None and not guide.steps:
        denoiser = LikelihoodGuidance(denoiser, guide.log_likelihood, guide.scale)
    if clamp:
        denoiser = Clamped(denoiser, net.embed.weight.detach())
    return denoiser


@torch.inference_mode()
def sample_rows(
    model: Any,
    n: int,
    *,
    steps: int,
    sampler: str,
    clamp: bool,
    seed: int,
    given: Tensor | None = None,
    given_mask: Tensor | None = None,
    sampler_options: dict[str, Any] | None = None,
    guide: Guide | None = None,
) -> tuple[Tensor, Tensor]:
    """``(tokens (n, L), x0 (n, L, d))``: ``n`` rows of the model's context drawn by ``sampler``
    over ``steps`` equal steps of ``t`` from the prior, then rounded. ``given (n, L)`` ids are
    re-imposed where ``given_mask`` is True (a prompt; ``diffuseq``'s source); ``guide``
    steers every step: by the score (:func:`denoiser_of`), or with ``guide.steps`` by gradient
    steps on each ``x_{t-1}`` of DDPM's sampler (:func:`~difflab.gaussian.control.controlled_ddpm`,
    which takes the place of ``sampler``)."""
    net = model.net
    device = model.device
    generator = torch.Generator(device).manual_seed(seed)
    denoiser = denoiser_of(model, clamp, guide)
    if given is not None:
        denoiser = SourceReimposed(denoiser, net.embed(given.to(device)), given_mask.to(device))
    shape = (n, model.context, net.embed.embedding_dim)
    x = torch.randn(shape, generator=generator, device=device) * model.process.prior_std
    ts = model.process.timesteps(steps)
    if guide is not None and guide.steps:
        x0 = controlled_ddpm(denoiser, x, ts, guide, generator=generator)
    else:
        x0 = SAMPLERS[sampler](denoiser, x, ts, generator=generator, **(sampler_options or {}))
    tokens = round_to_tokens(net, x0)
    if given is not None:
        tokens = torch.where(given_mask.to(device), given.to(device), tokens)
    return tokens, x0


def generate(
    model: Any,
    n: int,
    *,
    prompt: str | None,
    length: int,
    steps: int,
    sampler: str,
    clamp: bool,
    seed: int,
    guide: Guide | None = None,
) -> list[str]:
    """``n`` passages of at most ``length`` tokens (one window of the context), each cut before
    its first ``<eos>``; ``prompt`` is re-imposed as their beginning; ``guide`` steers them."""
    if length > model.context:
        raise UserError(f"--length must be at most the context ({model.context} tokens) for "
                        f"diffusion.kind={model.kind}: it samples one window")  # fmt: skip
    given = given_mask = None
    if prompt:
        ids = model.tokenizer.encode(prompt)
        if UNK_ID in ids:
            raise UserError("the prompt has characters outside this model's vocabulary")
        if len(ids) >= length:
            raise UserError(f"the prompt has {len(ids)} tokens; the length ({length}) must "
                            "exceed it")  # fmt: skip
        given = torch.full((n, model.context), PAD_ID, dtype=torch.long)
        given[:, : len(ids)] = torch.tensor(ids)
        given_mask = torch.zeros_like(given, dtype=torch.bool)
        given_mask[:, : len(ids)] = True
    tokens, _ = sample_rows(model, n, steps=steps, sampler=sampler, clamp=clamp, seed=seed,
                            given=given, given_mask=given_mask, guide=guide)  # fmt: skip
    tokens, _ = truncate_at_eos(tokens[:, :length].cpu(), EOS_ID, PAD_ID)
    return [model.tokenizer.decode(row) for row in tokens]


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
    guide: Guide | None = None,
) -> list[str]:
    """The texts of :meth:`TextRecipe.sample` for a ``gaussian`` kind, the options left empty
    taken from the run's ``sample`` section; an option of ``others`` that is given is refused
    (it does not apply). ``diffusion-lm``: passages, ``prompt`` their beginning; ``diffuseq``:
    the target the model writes for the source ``prompt`` (its task, :data:`TASK`). ``guide``:
    control of ``diffusion-lm`` (:mod:`.control`)."""
    for name, value in others.items():
        if value is not None:
            raise UserError(f"{flag(name)} does not apply to diffusion.kind={model.kind}")
    cfg = model.config
    if sampler is not None and sampler not in GAUSSIAN_SAMPLERS:
        raise UserError(f"{flag('sampler')} must be one of {', '.join(GAUSSIAN_SAMPLERS)} for "
                        f"diffusion.kind={model.kind}, got {sampler!r}")  # fmt: skip
    if guide is not None and guide.steps:
        if sampler not in (None, "ddpm"):
            raise UserError(f"{flag('control_steps')} takes gradient steps on each x_(t-1) of "
                            f"DDPM's ancestral sampler: {flag('sampler')} {sampler} does not "
                            "apply")  # fmt: skip
        sampler = "ddpm"
    options = {
        "steps": cfg.sample_steps if steps is None else positive_int("steps", steps),
        "sampler": cfg.sampler if sampler is None else sampler,
        "clamp": clamp_of(cfg) if clamp is None else bool(clamp),
        "seed": cfg.sample.seed if seed is None else seed_value(seed),
    }
    if model.kind == "diffuseq":
        if length is not None:
            raise UserError(f"{flag('length')} does not apply to diffuseq: it writes the target "
                            "half of its context")  # fmt: skip
        if not prompt:
            raise UserError(f"diffuseq needs the source in {flag('prompt')} (its task: {TASK}, "
                            "restore a line from its shuffled words)")  # fmt: skip
        return translate(model, [prompt] * n, **options)
    length = (cfg.sample.length or model.context) if length is None else length
    return generate(model, n, prompt=prompt, length=positive_int("length", length), guide=guide,
                    **options)  # fmt: skip


def clamp_of(cfg: TextConfig) -> bool:
    """``sample.clamp``, on when empty."""
    return cfg.sample.clamp is not False


def source_rows(model: Any, sources: list[str]) -> tuple[Tensor, Tensor]:
    """``(given, given_mask)`` rows holding each source and its ``<eos>`` in the first half."""
    half = model.context // 2
    given = torch.full((len(sources), model.context), PAD_ID, dtype=torch.long)
    for row, source in zip(given, sources, strict=True):
        ids = model.tokenizer.encode(source)
        if UNK_ID in ids:
            raise UserError(f"the source {source!r} has characters outside the vocabulary")
        if len(ids) >= half:
            raise UserError(f"the source has {len(ids)} tokens; at most {half - 1} fit")
        row[: len(ids) + 1] = torch.tensor([*ids, EOS_ID])
    given_mask = torch.zeros_like(given, dtype=torch.bool)
    given_mask[:, :half] = True
    return given, given_mask


def translate(
    model: Any, sources: list[str], *, steps: int, sampler: str, clamp: bool, seed: int
) -> list[str]:
    """``diffuseq``: the target written for each source (its second half, up to ``<eos>``)."""
    given, given_mask = source_rows(model, sources)
    tokens, _ = sample_rows(model, len(sources), steps=steps, sampler=sampler, clamp=clamp,
                            seed=seed, given=given, given_mask=given_mask)  # fmt: skip
    targets, _ = truncate_at_eos(tokens[:, model.context // 2 :].cpu(), EOS_ID, PAD_ID)
    return [model.tokenizer.decode(row) for row in targets]


def translate_mbr(
    model: Any, sources: list[str], samples: int, *, steps: int, sampler: str, clamp: bool,
    seed: int,
) -> list[str]:  # fmt: skip
    """``diffuseq`` with minimum Bayes risk decoding: ``samples`` targets per source (one batch,
    each its own noise), keeping the one of highest mean chrF against the others."""
    drawn = translate(model, [s for s in sources for _ in range(samples)], steps=steps,
                      sampler=sampler, clamp=clamp, seed=seed)  # fmt: skip
    groups = [drawn[i : i + samples] for i in range(0, len(drawn), samples)]
    return [group[minimum_bayes_risk(group)] for group in groups]


@torch.inference_mode()
def score_held_out(
    model: Any, documents: list[str], *, n: int, seed: int, t_samples: int | None
) -> Evaluation:
    """The loss terms on ``n`` held-out rows spread over the held-out split, ``t_samples`` draws
    of ``t`` each (empty: 4): ``x0_mse``, ``embedding``, ``rounding`` and their sum ``loss``
    (an objective, not a likelihood bound: ``bound`` is False). ``diffuseq`` also decodes the
    first ``min(n, MBR_ROWS)`` held-out pairs with :data:`MBR_SAMPLES` samples each (the run's
    sampler, steps and clamping) and scores them: ``chrf`` (corpus chrF against the lines)
    and ``chrf_source`` (the shuffled source itself, the score of copying)."""
    positive_int("n", n)
    repeats = 4 if t_samples is None else positive_int("t_samples", t_samples)
    if not documents:
        raise UserError("this run's data has no held-out text")
    if model.kind == "diffuseq":
        task = task_rows(documents, model.tokenizer, model.context)
        tokens, loss_mask, noise_mask = task.tokens, task.loss_mask, task.noise_mask
    elif model.config.diffusion.lines:
        (tokens, loss_mask), noise_mask = line_rows(documents, model.tokenizer, model.context), None
    else:
        packed = pack_texts(documents, model.tokenizer, model.context)
        tokens, loss_mask, noise_mask = packed.tokens, packed.loss_mask, None
    rows = torch.linspace(0, len(tokens) - 1, min(n, len(tokens))).round().long()
    generator = torch.Generator(model.device).manual_seed(seed_value(seed))
    terms = {"x0_mse": 0.0, "embedding": 0.0, "rounding": 0.0}
    for _ in range(repeats):
        for chunk in rows.split(64):
            result = embedding_diffusion_loss(
                model.net, model.process, tokens[chunk].to(model.device),
                prediction=prediction(model.config), loss_mask=loss_mask[chunk].to(model.device),
                noise_mask=None if noise_mask is None else noise_mask[chunk].to(model.device),
                generator=generator,
            )  # fmt: skip
            for key in terms:
                terms[key] += float(getattr(result, key)) * len(chunk) / (len(rows) * repeats)
    metrics: dict[str, Any] = {"kind": model.kind, "step": model.step, "bound": False,
                               "sequences": len(rows), **terms}  # fmt: skip
    metrics["loss"] = sum(terms.values())
    if model.kind == "diffuseq":
        picked = rows[: min(len(rows), MBR_ROWS)].tolist()
        cfg = model.config
        outputs = translate_mbr(
            model, [task.sources[i] for i in picked], MBR_SAMPLES, steps=cfg.sample_steps,
            sampler=cfg.sampler, clamp=clamp_of(cfg), seed=seed,
        )  # fmt: skip
        references = [task.targets[i] for i in picked]
        metrics["chrf"] = corpus_chrf(outputs, references)
        metrics["chrf_source"] = corpus_chrf([task.sources[i] for i in picked], references)
    summary = ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                        for k, v in metrics.items())  # fmt: skip
    return Evaluation(metrics, summary)
