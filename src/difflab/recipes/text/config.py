"""The text recipe's config: the sections ``data``, ``model``, ``diffusion``, ``train`` and
``sample`` of its YAML tree, typed and checked by :mod:`difflab.config`.

Valid names come from the registries: :data:`KINDS` (``diffusion.kind``), the token schedules of
:mod:`difflab.discrete.schedules` (``diffusion.schedule``), :data:`TOKENIZERS`
(``data.tokenizer``) and :data:`~difflab.discrete.samplers.TOKEN_SAMPLERS` (``sample.sampler``).
A key left empty takes its default, which may depend on another key (the schedule on the kind,
``sample.steps`` on ``data.length``); a key that does not apply to the run is refused, e.g.
``diffusion.T`` for a continuous-time kind with a continuous schedule, ``sample.sampler`` for
``ar``, ``sample.guidance`` without ``data.labels``. :func:`migrate` reads difflab 0.1's layout.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass, field
from typing import Any

from difflab.config import TrainConfig, check, check_seed, choose, from_dict
from difflab.data.text import SPECIAL_TOKENS, BPETokenizer, CharTokenizer
from difflab.discrete.samplers import TOKEN_SAMPLERS
from difflab.discrete.schedules import TOKEN_SCHEDULES

#: The version of this config's layout that checkpoints record (0.1's had no number).
CONFIG_VERSION = 2


@dataclass(frozen=True)
class Kind:
    """What a ``diffusion.kind`` is made of: its token process (``masked``, ``uniform`` or
    ``hybrid``; ``gaussian`` for diffusion on word embeddings, :mod:`.continuous`; ``None`` for
    the autoregressive baseline), its default schedule, whether it
    trains with D3PM's ``T``-step loss (else a continuous-time bound) and whether its network
    reads ``t`` by default."""

    process: str | None
    schedule: str | None
    discrete_time: bool = False
    time_conditioning: bool = True


#: Every ``diffusion.kind`` (the table of :mod:`difflab.recipes.text`).
KINDS = {
    "mdlm": Kind("masked", "log-linear", time_conditioning=False),
    "d3pm-absorbing": Kind("masked", "d3pm-absorbing", discrete_time=True, time_conditioning=False),
    "d3pm-uniform": Kind("uniform", "d3pm-cosine", discrete_time=True),
    "udlm": Kind("uniform", "log-linear"),
    "hybrid": Kind("hybrid", "log-linear"),
    "ar": Kind(None, None, time_conditioning=False),
    "diffusion-lm": Kind("gaussian", "sqrt"),
    "diffuseq": Kind("gaussian", "sqrt"),
    "latent-text": Kind("gaussian", "cosine-logsnr"),
    "block": Kind("masked", "log-linear", time_conditioning=False),
}
#: The schedules (:mod:`difflab.gaussian.schedules`) and samplers
#: (:mod:`difflab.gaussian.samplers`) of the ``gaussian`` kinds, and their defaults.
GAUSSIAN_SCHEDULES = ("sqrt", "cosine-logsnr", "linear-logsnr")
GAUSSIAN_SAMPLERS = ("ddim", "ddpm", "dpm_solver", "dpmpp_2m")
DEFAULT_GAUSSIAN_SAMPLER = "ddim"
#: ``diffusion.embed_dim`` and ``diffusion.prediction`` of the ``gaussian`` kinds when empty.
DEFAULT_EMBED_DIM = 16
DEFAULT_PREDICTION = "x0"
#: ``diffusion.block_size`` of ``block`` runs when left empty.
DEFAULT_BLOCK_SIZE = 4
#: ``diffusion.mask_range`` of ``block`` runs when left empty: BD3-LM's clipped schedule for
#: small blocks, training mask rates ``U[0.3, 0.8]``.
DEFAULT_MASK_RANGE = (0.3, 0.8)
#: Every ``data.tokenizer``; ``train(documents, **options)`` learns one from the training split.
TOKENIZERS = {"char": CharTokenizer, "bpe": BPETokenizer}
#: The smallest byte-level BPE vocabulary: the special tokens and the 256 bytes.
MIN_BPE_VOCAB = len(SPECIAL_TOKENS) + 256
#: The longest ``data.length``: every layer attends over all positions of a row, so memory and
#: time grow with its square; far beyond the contexts a model of this library is trained with.
MAX_LENGTH = 8192
#: ``sample.sampler`` when left empty, and ``diffusion.cond_drop`` of a labelled run.
DEFAULT_SAMPLER = "cached"
DEFAULT_COND_DROP = 0.1


def given(**options: Any) -> dict[str, Any]:
    """The options that are set: those left empty take the default of the function they go to."""
    return {key: value for key, value in options.items() if value is not None}


def schedule_takes_steps(name: str) -> bool:
    """Whether the token schedule ``name`` is a discrete-time one with ``T`` steps."""
    return "T" in inspect.signature(TOKEN_SCHEDULES[name]).parameters


@dataclass
class TextDataConfig:
    """Training text. ``source``: a built-in corpus (``shakespeare``), a ``.txt`` file, a folder
    of them, or a local Hugging Face dataset (saved folder or cached name; column
    ``text_field``). ``tokenizer``: one of :data:`TOKENIZERS`; ``bpe_vocab``: ids of the ``bpe``
    tokenizer, specials included (empty: 1024). ``length``: tokens per training row, the model's
    context (at most :data:`MAX_LENGTH`; training refuses one beyond the training text).
    ``labels``: the source is a folder whose immediate subfolders are classes (for
    classifier-free guidance)."""

    source: str = "shakespeare"
    tokenizer: str = "char"
    bpe_vocab: int | None = None
    length: int = 128
    labels: bool = False
    text_field: str = "text"

    def validate(self) -> None:
        check(
            bool(self.source), "data.source must name a corpus, a text file or folder, or a dataset"
        )
        choose("data.tokenizer", self.tokenizer, TOKENIZERS)
        if self.bpe_vocab is not None:
            check(self.tokenizer == "bpe", "data.bpe_vocab applies to data.tokenizer=bpe only")
            check(
                self.bpe_vocab >= MIN_BPE_VOCAB,
                f"data.bpe_vocab must be at least {MIN_BPE_VOCAB} "
                f"({len(SPECIAL_TOKENS)} special tokens + 256 bytes)",
            )
        check(self.length >= 2, "data.length must be at least 2")
        check(
            self.length <= MAX_LENGTH,
            f"data.length must be at most {MAX_LENGTH:,} tokens (the model's context: attention "
            f"over a row grows with its square), got {self.length:,}",
        )

    def tokenizer_options(self) -> dict[str, Any]:
        """The keyword options of ``TOKENIZERS[tokenizer].train``."""
        return given(vocab_size=self.bpe_vocab)


@dataclass
class TextModelConfig:
    """The :class:`~difflab.nets.transformer.TextTransformer`. ``time_conditioning``: adaLN on
    ``t``; empty means the kind's default (off for ``ar`` and the masked kinds, MDLM's
    time-agnostic denoiser; on for the uniform and hybrid kinds)."""

    width: int = 128
    depth: int = 4
    num_heads: int = 4
    dropout: float = 0.0
    time_conditioning: bool | None = None

    def validate(self) -> None:
        check(
            self.width >= 2 and self.depth >= 1 and self.num_heads >= 1,
            "model.width, model.depth and model.num_heads must be positive",
        )
        check(
            self.width % self.num_heads == 0 and (self.width // self.num_heads) % 2 == 0,
            "model.width / model.num_heads must be an even whole number (rotary embeddings)",
        )
        check(0.0 <= self.dropout < 1.0, "model.dropout must be in [0, 1)")


@dataclass
class TextDiffusionConfig:
    """The model kind (:data:`KINDS`) and its process and objective. ``schedule``: a token
    schedule (empty: the kind's). ``T``: the number of discrete time steps, of the D3PM kinds'
    loss and of the ``d3pm-*`` schedules (empty: the schedule's, 1000). ``hybrid_lambda``: the
    weight ``lambda`` of D3PM's auxiliary cross-entropy (D3PM kinds; empty: 0.01).
    ``p_uniform``: the hybrid's uniform share (empty: 0.1). ``stratified``: training times
    ``t_b = 1 - ((u + b / B) mod 1)`` spread over the batch rather than independent
    (continuous-time kinds; empty: on). ``cond_drop``: probability of the null label in
    training (labelled runs; empty: 0.1). The ``gaussian`` kinds (:mod:`.continuous`):
    ``embed_dim``, the size ``d`` of a word vector (empty: 16); ``prediction``, what the
    network predicts, ``x0``, ``eps`` or ``v`` (empty: ``x0``); ``self_condition``, the network
    also reads its previous estimate of ``x_0`` (empty: off); ``lines`` (``diffusion-lm``),
    rows of 1 to 4 whole lines ending in ``<eos>`` rather than the packed stream (empty: off;
    needed for length control, :mod:`.control`; ``latent-text`` takes it too); their
    ``schedule`` is one of :data:`GAUSSIAN_SCHEDULES` (empty: Diffusion-LM's ``sqrt``;
    ``cosine-logsnr`` for ``latent-text``, whose latents are not word vectors). ``latent-text``
    (:mod:`.latent_text`) has no ``embed_dim`` (its latents are sized in the ``latent_text``
    section) and is self-conditioned unless ``self_condition=false``. ``block_size``: tokens per
    block of ``kind=block`` (block diffusion, :mod:`difflab.discrete.block`; a divisor of
    ``data.length``; empty: 4). ``mask_range``: ``[beta, omega]``, the training mask rates
    of ``kind=block`` with the log-linear schedule, drawn from ``U[beta, omega]`` (BD3-LM's
    clipped schedule; the bound of ``eval`` keeps the full range; ``[0, 1]``: no clipping;
    empty: :data:`DEFAULT_MASK_RANGE`)."""

    kind: str = "mdlm"
    schedule: str | None = None
    T: int | None = None
    hybrid_lambda: float | None = None
    p_uniform: float | None = None
    stratified: bool | None = None
    cond_drop: float | None = None
    embed_dim: int | None = None
    prediction: str | None = None
    self_condition: bool | None = None
    lines: bool | None = None
    block_size: int | None = None
    mask_range: list[float] | None = None

    @property
    def gaussian(self) -> bool:
        """Whether the kind diffuses word embeddings with a Gaussian process."""
        return KINDS[self.kind].process == "gaussian"

    @property
    def schedule_name(self) -> str | None:
        """``schedule``, or the kind's when empty (``None`` for ``ar``: it has no process)."""
        return self.schedule or KINDS[self.kind].schedule

    @property
    def discrete_schedule(self) -> bool:
        """Whether the schedule is a discrete-time one, of ``T`` steps."""
        name = self.schedule_name
        return name is not None and not self.gaussian and schedule_takes_steps(name)

    def applies(self) -> dict[str, bool]:
        """Whether each of the process's keys applies to this kind (and schedule)."""
        kind = KINDS[self.kind]
        diffusion = kind.process is not None
        return {
            "schedule": diffusion,
            "T": kind.discrete_time or self.discrete_schedule,
            "hybrid_lambda": kind.discrete_time,
            "p_uniform": kind.process == "hybrid",
            "stratified": diffusion and not kind.discrete_time,
            "embed_dim": self.gaussian and self.kind != "latent-text",
            "prediction": self.gaussian,
            "self_condition": self.gaussian,
            "lines": self.kind in ("diffusion-lm", "latent-text"),
            "block_size": self.kind == "block",
            "mask_range": self.kind == "block" and self.schedule_name == "log-linear",
        }

    def validate(self) -> None:
        choose("diffusion.kind", self.kind, KINDS)
        if self.schedule is not None:
            schedules = GAUSSIAN_SCHEDULES if self.gaussian else TOKEN_SCHEDULES
            choose("diffusion.schedule", self.schedule, schedules)
        kind = KINDS[self.kind]
        for key, applies in self.applies().items():
            where = f"diffusion.kind={self.kind}"
            if key == "T" and kind.process is not None:
                where += f" with the continuous schedule {self.schedule_name}"
            if key == "mask_range" and self.kind == "block":
                where += f" with the {self.schedule_name} schedule (t is the mask rate under "
                where += "log-linear only)"
            check(
                getattr(self, key) is None or applies, f"diffusion.{key} does not apply to {where}"
            )
        check(
            self.T is not None or not kind.discrete_time or self.discrete_schedule,
            f"diffusion.kind={self.kind} with the continuous schedule {self.schedule_name} needs "
            "diffusion.T, its number of steps",
        )
        check(self.T is None or self.T >= 1, "diffusion.T must be at least 1")
        check(self.embed_dim is None or self.embed_dim >= 1, "diffusion.embed_dim must be >= 1")
        if self.prediction is not None:
            choose("diffusion.prediction", self.prediction, ("x0", "eps", "v"))
        check(self.block_size is None or self.block_size >= 1, "diffusion.block_size must be >= 1")
        check(
            self.mask_range is None
            or (len(self.mask_range) == 2 and 0.0 <= self.mask_range[0] < self.mask_range[1] <= 1),
            f"diffusion.mask_range must be [beta, omega] with 0 <= beta < omega <= 1, got "
            f"{self.mask_range}",
        )
        check(
            self.hybrid_lambda is None or self.hybrid_lambda >= 0,
            "diffusion.hybrid_lambda must be non-negative",
        )
        check(
            self.p_uniform is None or 0.0 < self.p_uniform < 1.0,
            "diffusion.p_uniform must be in (0, 1)",
        )
        check(
            self.cond_drop is None or 0.0 <= self.cond_drop < 1.0,
            "diffusion.cond_drop must be in [0, 1)",
        )

    def schedule_options(self) -> dict[str, Any]:
        """The keyword options of the schedule (``T`` where it takes it)."""
        return given(T=self.T) if self.discrete_schedule else {}


@dataclass
class LatentTextSection:
    """``diffusion.kind=latent-text`` only (:mod:`.latent_text`), each empty for its default:
    ``latents``, the ``K`` latent vectors of a row, a divisor of ``data.length`` (the largest
    divisor at most ``data.length / 4``: four tokens or more per latent); ``dim``,
    their width ``d`` (16); ``ae_depth``, blocks of the encoder and of the decoder (2);
    ``ae_steps``, steps of the autoencoder stage (1000); ``ae_noise``, the largest standard
    deviation of the Gaussian noise on the unit-std latents while the autoencoder trains (each
    row draws its own, uniform in ``[0, ae_noise]``; 0.2); ``ae_mask``, the probability that a
    latent vector is zeroed while it trains (0.1)."""

    latents: int | None = None
    dim: int | None = None
    ae_depth: int | None = None
    ae_steps: int | None = None
    ae_noise: float | None = None
    ae_mask: float | None = None

    def validate(self) -> None:
        for key in ("latents", "ae_depth", "ae_steps"):
            value = getattr(self, key)
            check(value is None or value >= 1, f"latent_text.{key} must be at least 1")
        check(self.dim is None or self.dim >= 2, "latent_text.dim must be at least 2 (each "
              "latent vector is layer-normalised)")  # fmt: skip
        check(self.ae_noise is None or self.ae_noise >= 0, "latent_text.ae_noise must be >= 0")
        check(self.ae_mask is None or 0 <= self.ae_mask < 1, "latent_text.ae_mask must be in "
              "[0, 1)")  # fmt: skip


@dataclass
class TextSampleConfig:
    """Defaults of sampling. ``sampler``: one of
    :data:`~difflab.discrete.samplers.TOKEN_SAMPLERS` (diffusion kinds; empty: ``cached``);
    ``steps`` per window (diffusion kinds; empty: ``data.length``, one per token of the
    context); ``temperature`` (0: greedy), ``top_p`` (1: off); ``length`` in tokens, prompt
    included (empty: ``data.length``); ``block``: new tokens per window beyond the context
    (empty: half the context); ``n`` passages drawn with ``seed``; ``guidance``:
    classifier-free guidance ``w`` (labelled diffusion runs; empty: 0). The ``gaussian`` kinds
    take a ``sampler`` of :data:`GAUSSIAN_SAMPLERS` (empty: ``ddim``) and ``clamp``, the
    clamping trick (empty: on)."""

    sampler: str | None = None
    steps: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    length: int | None = None
    block: int | None = None
    n: int = 4
    seed: int = 0
    guidance: float | None = None
    clamp: bool | None = None

    def validate(self) -> None:
        if self.sampler is not None:
            choose("sample.sampler", self.sampler, [*TOKEN_SAMPLERS, *GAUSSIAN_SAMPLERS])
        check(self.steps is None or self.steps >= 1, "sample.steps must be at least 1")
        check(self.temperature >= 0, "sample.temperature must be non-negative")
        check(0.0 < self.top_p <= 1.0, "sample.top_p must be in (0, 1]")
        check(self.length is None or self.length >= 1, "sample.length must be at least 1")
        check(self.block is None or self.block >= 1, "sample.block must be at least 1")
        check(self.n >= 1, "sample.n must be at least 1")
        check_seed("sample.seed", self.seed)
        check(self.guidance is None or self.guidance >= 0, "sample.guidance must be non-negative")


@dataclass
class TextTrainConfig(TrainConfig):
    """:class:`~difflab.config.TrainConfig` with the text recipe's defaults."""

    batch_size: int = 32
    lr: float = 1e-3
    out: str = "runs/text"


@dataclass
class TextConfig:
    """The whole config of the text recipe."""

    data: TextDataConfig = field(default_factory=TextDataConfig)
    model: TextModelConfig = field(default_factory=TextModelConfig)
    diffusion: TextDiffusionConfig = field(default_factory=TextDiffusionConfig)
    train: TextTrainConfig = field(default_factory=TextTrainConfig)
    sample: TextSampleConfig = field(default_factory=TextSampleConfig)
    latent_text: LatentTextSection = field(default_factory=LatentTextSection)

    def validate(self) -> TextConfig:
        for section in (self.data, self.model, self.diffusion, self.train, self.sample,
                        self.latent_text):  # fmt: skip
            section.validate()
        latents = self.latent_text.latents
        check(
            latents is None or self.data.length % latents == 0,
            f"latent_text.latents={latents} must divide data.length={self.data.length} (each "
            "latent pools a run of data.length / latents tokens)",
        )
        for key, value in vars(self.latent_text).items():
            check(
                value is None or self.diffusion.kind == "latent-text",
                f"latent_text.{key} applies to diffusion.kind=latent-text only",
            )
        ar, s = self.diffusion.kind == "ar", self.sample
        check(
            not (ar and self.model.time_conditioning),
            "model.time_conditioning cannot be on for diffusion.kind=ar (it has no time)",
        )
        for key in ("sampler", "steps", "guidance"):
            check(
                not ar or getattr(s, key) is None,
                f"sample.{key} does not apply to diffusion.kind=ar (it samples token by token "
                "with a key/value cache)",
            )
        for key, value in [("diffusion.cond_drop", self.diffusion.cond_drop),
                           ("sample.guidance", s.guidance)]:  # fmt: skip
            check(
                self.data.labels or value is None,
                f"{key} applies to labelled runs only (data.labels)",
            )
        check(
            s.block is None or s.block <= self.data.length, "sample.block must be in 1..data.length"
        )
        self._check_gaussian()
        if self.diffusion.kind == "block":
            self._validate_block()
        return self

    def _check_gaussian(self) -> None:
        """The keys of the ``gaussian`` kinds apply to them only, and theirs to no other."""
        d, s = self.diffusion, self.sample
        if not d.gaussian:
            check(s.clamp is None, f"sample.clamp does not apply to diffusion.kind={d.kind}")
            check(
                s.sampler is None or s.sampler in TOKEN_SAMPLERS,
                f"sample.sampler must be one of {', '.join(TOKEN_SAMPLERS)} for "
                f"diffusion.kind={d.kind} ({s.sampler} is a Gaussian sampler)",
            )
            return
        where = f"diffusion.kind={d.kind}"
        check(
            s.clamp is None or d.kind != "latent-text",
            f"sample.clamp does not apply to {where} (its latents are not word vectors)",
        )
        check(
            s.sampler is None or s.sampler in GAUSSIAN_SAMPLERS,
            f"sample.sampler must be one of {', '.join(GAUSSIAN_SAMPLERS)} for {where}",
        )
        check(not self.data.labels, f"data.labels does not apply to {where}")
        check(
            self.model.time_conditioning in (None, True),
            f"model.time_conditioning cannot be off for {where} (its denoiser reads t)",
        )
        check(s.block is None, f"sample.block does not apply to {where} (one window)")
        for key in ("temperature", "top_p"):
            check(
                getattr(s, key) == 1.0,
                f"sample.{key} does not apply to {where} (its rounding takes the likeliest word)",
            )

    def _validate_block(self) -> None:
        """Block diffusion: whole blocks per row, no time input, no labels, its own sampler."""
        size = self.block_size
        check(
            self.data.length % size == 0,
            f"diffusion.block_size={size} must divide data.length={self.data.length}",
        )
        check(
            not self.model.time_conditioning,
            "model.time_conditioning cannot be on for diffusion.kind=block (each block has its "
            "own time)",
        )
        check(not self.data.labels, "diffusion.kind=block trains on unlabelled text only")
        check(
            self.sample.sampler is None,
            "sample.sampler does not apply to diffusion.kind=block (it denoises block by block)",
        )

    @property
    def time_conditioning(self) -> bool:
        """``model.time_conditioning``, or the kind's default when empty."""
        if self.model.time_conditioning is not None:
            return self.model.time_conditioning
        return KINDS[self.diffusion.kind].time_conditioning

    @property
    def cond_drop(self) -> float:
        """``diffusion.cond_drop``, or its default when empty."""
        given_drop = self.diffusion.cond_drop
        return DEFAULT_COND_DROP if given_drop is None else given_drop

    @property
    def sampler(self) -> str:
        """``sample.sampler``, or ``cached`` (``ddim`` for the ``gaussian`` kinds) when empty."""
        default = DEFAULT_GAUSSIAN_SAMPLER if self.diffusion.gaussian else DEFAULT_SAMPLER
        return self.sample.sampler or default

    @property
    def block_size(self) -> int:
        """``diffusion.block_size``, or its default when empty."""
        return self.diffusion.block_size or DEFAULT_BLOCK_SIZE

    @property
    def mask_range(self) -> tuple[float, float] | None:
        """``diffusion.mask_range`` (``block`` with the log-linear schedule), or its default
        there when empty; ``None`` elsewhere."""
        if not self.diffusion.applies()["mask_range"]:
            return None
        given_range = self.diffusion.mask_range
        return DEFAULT_MASK_RANGE if given_range is None else tuple(given_range)

    @property
    def sample_steps(self) -> int:
        """``sample.steps``, or one per token of the context (of a block for ``block``) when
        empty."""
        if self.diffusion.kind == "block":
            return self.sample.steps or self.block_size
        return self.sample.steps or self.data.length

    @property
    def block(self) -> int:
        """``sample.block``, or half the context when empty."""
        return self.sample.block or max(1, self.data.length // 2)


def migrate(config: dict[str, Any]) -> dict[str, Any]:
    """A text config as difflab 0.1 recorded it, in today's layout: ``diffusion.antithetic``
    renamed ``diffusion.stratified``, and the keys that had no effect on the run (which are
    refused now) emptied."""
    config = json.loads(json.dumps(config))
    data, d, s = (config.setdefault(key, {}) for key in ("data", "diffusion", "sample"))
    if "antithetic" in d:
        d["stratified"] = d.pop("antithetic")
    if data.get("tokenizer", "char") != "bpe":
        data.pop("bpe_vocab", None)
    for key, applies in from_dict(TextDiffusionConfig, d, "diffusion").applies().items():
        if not applies:
            d.pop(key, None)
    if not data.get("labels"):
        d.pop("cond_drop", None)
        s.pop("guidance", None)
    if d.get("kind") == "ar":
        for key in ("sampler", "steps", "guidance"):
            s.pop(key, None)
    return config
