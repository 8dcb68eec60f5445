"""Recipe ``text-to-digit``: text-conditioned digits, with captions written from each digit's
measured properties.

Every training digit gets a caption from its label and two measured properties (issue 4):

- *thickness* from the stroke mass ``m = mean((x + 1) / 2)`` (the share of ink): ``thin`` in the
  lowest third of its class, ``thick`` in the highest third, no word in between;
- *slant* from the image moments: with ink weights ``w = (x + 1) / 2``, column ``c`` and row
  ``r`` (downwards), the shear ``k = -mu_cr / mu_rr`` (``mu_cr = sum w (c - c_bar)(r - r_bar) /
  sum w``, ``mu_rr`` likewise) is the horizontal shift of the strokes per row upwards, positive
  when a digit leans right; ``slanted`` in the highest third of its class, ``upright`` in the
  lowest third, no word in between.

The terciles are those of the training split, per class (a one is thinner than an eight by
nature; a "thick one" is thick for a one), and are stored with the model, so that generated
digits are measured against the same thresholds. Captions read "a thick slanted seven",
"an upright eight", "a thin three", "a four".

The model is a U-Net whose attention blocks cross-attend to the states of a small text encoder
(word embeddings, learned positions, pre-norm transformer layers) trained jointly with it (seed
004: "more complex conditioning ... pass through cross attention blocks"). Training drops each
attribute word with probability ``word_drop`` (so "a thin three" leaves the slant free) and the
whole caption with probability ``diffusion.cond_drop`` (the empty caption is the null condition,
whose cross-attention output is exactly zero), which makes classifier-free guidance available at
sampling (:class:`~difflab.gaussian.guidance.ClassifierFreeGuidance` with ``null_cond`` the
empty caption's tokens).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from difflab.config import check
from difflab.data.images import ArrayData
from difflab.errors import UserError
from difflab.gaussian.objectives import make_objective
from difflab.gaussian.parameterization import Denoiser
from difflab.nets.text_encoder import TextConditionedNet, TextEncoder
from difflab.recipes import Evaluation, Recipe, Samples, load_network, reading_metadata, seed_value
from difflab.recipes.image import (
    ImageConfig,
    build_denoiser,
    build_unet,
    config_from_run,
    data_splits,
    draw,
    guidance_settings,
    guided_denoiser,
    run_metadata,
    sampler_settings,
    threshold_settings,
)
from difflab.train.trainer import Trainer, TrainResult

RECIPE = "text-to-digit"
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
THICKNESS_WORDS = ("thin", "thick")  # lowest and highest tercile of the stroke mass
SLANT_WORDS = ("upright", "slanted")  # lowest and highest tercile of the shear
PAD = 0
VOCAB: tuple[str, ...] = ("<pad>", "a", "an", *THICKNESS_WORDS, *SLANT_WORDS, *DIGIT_WORDS)
MAX_TOKENS = 6
_TOKEN = {word: i for i, word in enumerate(VOCAB)}
_NUMERALS = {str(d): word for d, word in enumerate(DIGIT_WORDS)}


# ================================================================================================
# Measured properties and captions
# ================================================================================================


def stroke_mass(x: Tensor) -> Tensor:
    """Share of ink ``mean((x + 1) / 2)`` of each image ``(N, 1, H, W)`` in ``[-1, 1]``,
    ``(N,)`` float64 (values outside ``[-1, 1]`` are clipped first)."""
    return _ink(x).mean(dim=(1, 2))


def slant(x: Tensor) -> Tensor:
    """Shear ``-mu_cr / mu_rr`` of each image ``(N, 1, H, W)``: columns of ink moved per row
    upwards, positive when the digit leans right (see the module docstring). ``(N,)`` float64;
    0 for an image without vertical extent."""
    w = _ink(x)
    height, width = w.shape[-2:]
    r = torch.arange(height, dtype=w.dtype, device=w.device)[:, None]
    c = torch.arange(width, dtype=w.dtype, device=w.device)[None, :]
    total = w.sum(dim=(1, 2)).clamp(min=1e-12)
    r_bar = (w * r).sum(dim=(1, 2)) / total
    c_bar = (w * c).sum(dim=(1, 2)) / total
    dr = r - r_bar[:, None, None]
    dc = c - c_bar[:, None, None]
    mu_cr = (w * dc * dr).sum(dim=(1, 2)) / total
    mu_rr = (w * dr**2).sum(dim=(1, 2)) / total
    return torch.where(mu_rr > 1e-12, -mu_cr / mu_rr.clamp(min=1e-12), torch.zeros_like(mu_rr))


def _ink(x: Tensor) -> Tensor:
    if x.ndim != 4 or x.shape[1] != 1:
        raise ValueError(f"expected grey images (N, 1, H, W), got {tuple(x.shape)}")
    return (x[:, 0].to(torch.float64).clamp(-1.0, 1.0) + 1.0) / 2.0


@dataclass(frozen=True)
class Thresholds:
    """Per-class terciles ``(10, 2)`` of the stroke mass and of the slant (lower, upper)."""

    mass: Tensor
    slant: Tensor

    @classmethod
    def fit(cls, x: Tensor, labels: Tensor) -> Thresholds:
        """The 1/3 and 2/3 quantiles of each class's stroke mass and slant."""
        q = torch.tensor([1.0 / 3.0, 2.0 / 3.0], dtype=torch.float64)
        mass, shear = stroke_mass(x), slant(x)
        per_class = [labels == k for k in range(len(DIGIT_WORDS))]
        if any(not bool(m.any()) for m in per_class):
            raise ValueError("every digit 0..9 needs at least one example to fit thresholds")
        return cls(
            torch.stack([torch.quantile(mass[m], q) for m in per_class]),
            torch.stack([torch.quantile(shear[m], q) for m in per_class]),
        )

    def to_dict(self) -> dict[str, list[list[float]]]:
        return {"mass": self.mass.tolist(), "slant": self.slant.tolist()}

    @classmethod
    def from_dict(cls, d: dict[str, list[list[float]]]) -> Thresholds:
        return cls(
            torch.tensor(d["mass"], dtype=torch.float64),
            torch.tensor(d["slant"], dtype=torch.float64),
        )


@dataclass(frozen=True)
class Attributes:
    """Per-image properties as word indices: ``digit`` in 0..9, ``thickness`` and ``slant`` in
    ``{-1: lowest tercile, 0: middle, 1: highest tercile}`` (thin/thick, upright/slanted)."""

    digit: Tensor
    thickness: Tensor
    slant: Tensor


def measure(x: Tensor, digits: Tensor, thresholds: Thresholds) -> Attributes:
    """Thickness and slant terciles of images ``x`` read as the digits ``digits`` ``(N,)``."""
    digits = digits.long().cpu()
    x = x.cpu()

    def tercile(value: Tensor, cuts: Tensor) -> Tensor:
        lo, hi = cuts[digits, 0], cuts[digits, 1]
        return (value > hi).long() - (value < lo).long()

    return Attributes(
        digits, tercile(stroke_mass(x), thresholds.mass), tercile(slant(x), thresholds.slant)
    )


def caption(digit: int, thickness: int = 0, slant_: int = 0) -> str:
    """``"a thick slanted seven"``: the article, the named attributes (``-1``/``1``; ``0`` names
    none) and the digit word."""
    words = []
    if thickness:
        words.append(THICKNESS_WORDS[thickness > 0])
    if slant_:
        words.append(SLANT_WORDS[slant_ > 0])
    words.append(DIGIT_WORDS[digit])
    article = "an" if words[0][0] in "aeiou" else "a"
    return " ".join([article, *words])


def captions(attributes: Attributes) -> list[str]:
    """One caption per image, from its measured attributes (deterministic)."""
    return [
        caption(d, t, s)
        for d, t, s in zip(
            attributes.digit.tolist(),
            attributes.thickness.tolist(),
            attributes.slant.tolist(),
            strict=True,
        )
    ]


def parse_prompt(prompt: str) -> Attributes:
    """The digit and attributes a prompt names (``0`` for an attribute it leaves free), as
    one-element :class:`Attributes`. Raises ``ValueError`` for a prompt without exactly one digit
    or with contradictory attributes (unknown words are :func:`tokenize`'s concern)."""
    words = _words(prompt)
    digits = [DIGIT_WORDS.index(w) for w in words if w in DIGIT_WORDS]
    if len(digits) != 1:
        raise ValueError(f"the prompt {prompt!r} must name exactly one digit (zero..nine)")
    if all(w in words for w in THICKNESS_WORDS) or all(w in words for w in SLANT_WORDS):
        raise ValueError(f"the prompt {prompt!r} names contradictory attributes")
    thickness = ("thick" in words) - ("thin" in words)
    shear = ("slanted" in words) - ("upright" in words)
    return Attributes(torch.tensor([digits[0]]), torch.tensor([thickness]), torch.tensor([shear]))


def split_prompts(prompt: str | Sequence[str] | None, recipe: str, example: str) -> list[str]:
    """The captions of ``--prompt`` (separated by ``;``, or a list), blanks dropped; none is a
    :class:`UserError` that shows ``example``."""
    if prompt is None:
        raise UserError(f"a {recipe} model needs --prompt, e.g. '{example}'")
    prompts = [p.strip() for p in prompt.split(";")] if isinstance(prompt, str) else list(prompt)
    prompts = [p for p in prompts if p]
    if not prompts:
        raise UserError("--prompt holds no caption")
    return prompts


def tokenize(texts: Sequence[str]) -> Tensor:
    """Word ids ``(N, MAX_TOKENS)``, left-aligned and padded with ``PAD``; the empty caption is
    all padding. Words are lower-cased, punctuation is ignored and numerals read as digit words
    ("a thin 3"). Raises ``ValueError`` for unknown words or over-long captions."""
    rows = []
    for text in texts:
        words = _words(text)
        unknown = sorted({w for w in words if w not in _TOKEN})
        if unknown:
            known = ", ".join(VOCAB[1:])
            raise ValueError(f"unknown words {unknown} in {text!r}; the vocabulary is: {known}")
        if len(words) > MAX_TOKENS:
            raise ValueError(f"{text!r} has {len(words)} words; at most {MAX_TOKENS}")
        rows.append([_TOKEN[w] for w in words] + [PAD] * (MAX_TOKENS - len(words)))
    return torch.tensor(rows, dtype=torch.long).reshape(len(rows), MAX_TOKENS)


def _words(text: str) -> list[str]:
    return [_NUMERALS.get(w, w) for w in re.findall(r"[a-z0-9]+", text.lower())]


def caption_variants(attributes: Attributes) -> Tensor:
    """Tokens ``(N, 4, MAX_TOKENS)`` of each caption with its attribute words kept or dropped:
    variant ``2 a + b`` drops the thickness word if ``a = 1`` and the slant word if ``b = 1``."""
    variants = []
    for drop_thickness in (0, 1):
        for drop_slant in (0, 1):
            dropped = Attributes(
                attributes.digit,
                attributes.thickness * (1 - drop_thickness),
                attributes.slant * (1 - drop_slant),
            )
            variants.append(tokenize(captions(dropped)))
    return torch.stack(variants, dim=1)


# ================================================================================================
# Model
# ================================================================================================


@dataclass
class TextEncoderConfig:
    """The text encoder (width, layers, heads) and the caption dropout of training: each
    attribute word is dropped with probability ``word_drop``."""

    dim: int = 64
    depth: int = 2
    num_heads: int = 4
    word_drop: float = 0.25

    def validate(self) -> None:
        check(self.dim >= 1 and self.depth >= 1 and self.num_heads >= 1,
              "text_encoder.dim, depth and num_heads must be at least 1")  # fmt: skip
        check(self.dim % self.num_heads == 0,
              "text_encoder.num_heads must divide text_encoder.dim")  # fmt: skip
        check(0.0 <= self.word_drop < 1.0, "text_encoder.word_drop must be in [0, 1)")


@dataclass
class TextToDigitConfig(ImageConfig):
    """The image recipe's config plus the text encoder."""

    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)

    def validate(self) -> TextToDigitConfig:
        super().validate()
        check(
            self.data.name == "digits",
            f"the text-to-digit recipe trains on data.name=digits, not {self.data.name}",
        )
        check(self.model.kind == "unet", "the text-to-digit recipe needs model.kind=unet")
        self.text_encoder.validate()
        return self


def build_net(cfg: TextToDigitConfig, shape: tuple[int, ...]) -> TextConditionedNet:
    """The U-Net of ``model.unet`` cross-attending to a text encoder of ``text_encoder``."""
    t = cfg.text_encoder
    try:
        unet = build_unet(cfg.model.net, shape, None, context_dim=t.dim)
    except ValueError as e:
        raise UserError(f"model.unet: {e}") from None
    encoder = TextEncoder(len(VOCAB), MAX_TOKENS, t.dim, t.depth, t.num_heads, pad=PAD)
    return TextConditionedNet(encoder, unet)


# ================================================================================================
# Training, loading, sampling
# ================================================================================================


def training_captions(data: ArrayData) -> tuple[Thresholds, Tensor]:
    """Thresholds fitted on ``data`` and the token variants ``(N, 4, L)`` of its captions."""
    if data.labels is None:
        raise UserError("text-to-digit training needs labelled digits")
    thresholds = Thresholds.fit(data.x, data.labels)
    return thresholds, caption_variants(measure(data.x, data.labels, thresholds))


def make_loss(cfg: TextToDigitConfig) -> Callable:
    """``loss(model, (x0, variants), generator)``: pick each caption's word-dropout variant, drop
    whole captions to the empty one with probability ``diffusion.cond_drop``, then the objective
    of the parameterization."""
    d, word_drop = cfg.diffusion, cfg.text_encoder.word_drop
    objective = make_objective(d.prediction, d.weighting)

    def loss(model: nn.Module, batch: tuple[Tensor, ...], generator: torch.Generator) -> Tensor:
        x0, variants = batch
        B, device = x0.shape[0], x0.device
        drop_words = torch.rand(B, 2, device=device, generator=generator) < word_drop
        which = 2 * drop_words[:, 0].long() + drop_words[:, 1].long()
        tokens = variants[torch.arange(B, device=device), which]
        drop_all = torch.rand(B, device=device, generator=generator) < d.cond_drop
        tokens = torch.where(drop_all[:, None], torch.full_like(tokens, PAD), tokens)
        return objective(build_denoiser(model, d), x0, {"tokens": tokens}, generator)

    return loss


@dataclass
class TextToDigitModel:
    """A trained text-to-digit model (EMA weights) and what sampling and measuring need."""

    denoiser: Denoiser
    config: TextToDigitConfig
    shape: tuple[int, ...]
    thresholds: Thresholds
    step: int
    class_names: None = None

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.net.parameters()).device


class TextToDigitRecipe(Recipe):
    name = "text-to-digit"
    config_type = TextToDigitConfig
    preset = "digits"
    data = "images"

    def config_from_run(self, meta: dict[str, Any]) -> TextToDigitConfig:
        if not meta.get("config_version"):  # difflab 0.1 kept the encoder's size beside it
            meta = {**meta, "config": {**meta["config"], "text_encoder": meta["text"]}}
        return config_from_run(self.config_type, meta)

    def build(self, cfg: TextToDigitConfig, meta: dict[str, Any]) -> TextConditionedNet:
        if tuple(meta.get("vocab", VOCAB)) != VOCAB:
            raise UserError("this run was trained with another caption vocabulary")
        return build_net(cfg, tuple(meta["shape"]))

    def train(
        self, cfg: TextToDigitConfig, *, resume: bool = False, progress: bool = True
    ) -> TrainResult:
        data, _ = data_splits(cfg.data)
        thresholds, variants = training_captions(data)
        meta = run_metadata(self.name, cfg, data, vocab=list(VOCAB),
                            thresholds=thresholds.to_dict())  # fmt: skip
        meta["class_names"] = None  # conditioned on captions, not on class labels
        torch.manual_seed(cfg.train.seed)  # network initialisation
        net = self.build(cfg, meta)
        trainer = Trainer(net, make_loss(cfg), (data.x, variants), cfg.train, meta,
                          Path(cfg.train.out))  # fmt: skip
        return trainer.fit(resume=resume, progress=progress)

    def load(self, path: Path, device: str = "auto") -> TextToDigitModel:
        cfg, meta, net, step = load_network(self, path, device)
        with reading_metadata(path):
            thresholds = Thresholds.from_dict(meta["thresholds"])
            shape = tuple(meta["shape"])
        return TextToDigitModel(build_denoiser(net, cfg.diffusion), cfg, shape, thresholds, step)

    def sample(
        self,
        model: TextToDigitModel,
        n: int,
        *,
        prompt: str | Sequence[str] | None = None,
        guidance: float | None = None,
        convention: str | None = None,
        sampler: str | None = None,
        steps: int | None = None,
        grid: str | None = None,
        eta: float | None = None,
        sampler_options: dict[str, Any] | None = None,
        threshold: str | None = None,
        percentile: float | None = None,
        seed: int | None = None,
        callback: Any = None,
    ) -> Samples:
        """Digits for ``prompt`` (captions separated by ``;`` or a list, cycled over the ``n``
        samples), with classifier-free guidance of scale ``w = guidance`` (default 2) against
        the empty caption; at 0 the unconditional pass is skipped. ``callback(step, t, x_t,
        x0)`` sees every step."""
        s = model.config.sample
        prompts = split_prompts(prompt, "text-to-digit", "a thin three")
        try:
            tokens = tokenize(prompts)
            for p in prompts:
                parse_prompt(p)  # one digit, no contradiction: what the captions were
        except ValueError as e:
            raise UserError(str(e)) from None
        sampler, steps, grid, options = sampler_settings(s, sampler, steps, grid, eta,
                                                         sampler_options)  # fmt: skip
        guidance, convention = guidance_settings(guidance, convention, DEFAULT_GUIDANCE)
        threshold, percentile = threshold_settings(threshold, percentile, s.threshold, model.shape)
        seed = s.seed if seed is None else seed_value(seed)
        device = model.device
        tokens = tokens.repeat(-(-n // len(prompts)), 1)[:n].to(device)
        empty = torch.full((1, MAX_TOKENS), PAD, dtype=torch.long, device=device)
        den = guided_denoiser(model, guidance=guidance, convention=convention,
                              threshold=threshold, null_cond={"tokens": empty},
                              percentile=percentile)  # fmt: skip
        x = draw(model, den, n, {"tokens": tokens}, sampler=sampler, steps=steps, grid=grid,
                 seed=seed, options=options, callback=callback)  # fmt: skip
        return Samples(x=x, nrow=min(10, n))

    def evaluate(self, model: TextToDigitModel, **options: Any) -> Evaluation:
        raise UserError("a text-to-digit run has no likelihood evaluation yet")


#: Classifier-free guidance scale of text-to-digit sampling when none is given.
DEFAULT_GUIDANCE = 2.0


@dataclass(frozen=True)
class Adherence:
    """Shares of samples whose measured properties match what their prompt names: the digit (as
    read by an independent classifier), the thickness and the slant (among prompts that name
    them), and everything named at once."""

    digit: float
    thickness: float
    slant: float
    all: float


def prompt_adherence(
    x: Tensor,
    prompts: Sequence[str],
    thresholds: Thresholds,
    read_digit: Callable[[Tensor], Tensor],
) -> Adherence:
    """How well samples ``x`` ``(N, 1, H, W)`` follow their ``prompts`` (``N`` of them).

    ``read_digit(x) -> (N,)`` labels, e.g. ``DigitsClassifier.predict``. Thickness and slant are
    measured against ``thresholds`` for the digit the prompt asks for. A shuffled-prompt baseline
    is the same call with the prompts permuted.
    """
    if len(prompts) != x.shape[0]:
        raise ValueError(f"{x.shape[0]} samples but {len(prompts)} prompts")
    asked = [parse_prompt(p) for p in prompts]
    digit = torch.cat([a.digit for a in asked])
    thickness = torch.cat([a.thickness for a in asked])
    shear = torch.cat([a.slant for a in asked])
    got = measure(x, digit, thresholds)
    ok_digit = read_digit(x).cpu() == digit
    ok_thickness = got.thickness == thickness
    ok_slant = got.slant == shear
    named_t, named_s = thickness != 0, shear != 0
    ok_all = ok_digit & (ok_thickness | ~named_t) & (ok_slant | ~named_s)

    def share(ok: Tensor, among: Tensor) -> float:
        return float(ok[among].double().mean()) if bool(among.any()) else float("nan")

    everyone = torch.ones_like(ok_digit)
    return Adherence(
        share(ok_digit, everyone),
        share(ok_thickness, named_t),
        share(ok_slant, named_s),
        share(ok_all, everyone),
    )


RECIPE = TextToDigitRecipe()
