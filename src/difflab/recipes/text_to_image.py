"""Recipe ``text-to-image``: glyphs drawn from their captions (issue 12, part 2).

Each training glyph of :mod:`difflab.data.glyphs` comes with its caption, "a large red bold serif
capital G on a pale blue background". The captions are read word by word into a fixed vocabulary
(:data:`VOCAB`: the caption words and the 62 characters; the held-out "typewriter" family and the
Greek letters are not in it), encoded by a small transformer (:class:`~difflab.nets.text_encoder.
TextEncoder`) trained jointly with the denoiser, and read by the denoiser through
cross-attention: a U-Net (``model.kind=unet``) or a DiT (``model.kind=dit``) built with a
``context_dim`` (seed 004: "more complex conditioning ... pass through cross attention blocks"),
and through the mean of the caption's states added to the noise-level embedding that every block
reads (as Imagen does with its pooled text embedding): the global attributes, the colours, are
learnt much sooner that way than through the cross-attention alone.

Every caption word belongs to one attribute :data:`GROUPS` (size, colour, weight, slant, family,
the "on a ... background" phrase; the article, the kind and the character always stay). Training
drops each attribute of a caption with probability ``text_encoder.word_drop`` (closing the gap,
so a shorter caption reads as a caption the user could write: "a red capital G") and the whole
caption with probability ``diffusion.cond_drop``; the empty caption, whose cross-attention output
is exactly zero, is the null condition of classifier-free guidance at sampling (seed 002:
``eps~ = (1 + w) eps(z, c) - w eps(z)``).

Latent text-to-image (latent diffusion, seeds 002 and 004; preset ``glyphs-text-latent``): with
``latent.autoencoder=RUN`` the same denoiser and text encoder learn the scaled latents
``latent_scale * mu(x)`` of the frozen autoencoder of that run instead of the pixels (8x8x8
with the ``autoencoder`` preset, instead of 32x32x3), and sampling decodes what it draws,
``x = D(z_0 / latent_scale)``, as the ``latent`` recipe does (:mod:`difflab.recipes.latent`;
no x_0 threshold: latents are unbounded, which is why that preset predicts ``v``: an eps model's
x_0 estimate explodes near ``t = 1``).

``evaluate`` draws one sample per caption of the glyphs ``test`` split and lets the glyphs judge
(:mod:`difflab.evaluate.glyphs_judge`) read each attribute back: the share of samples whose
character, family, weight, slant, glyph colour and background colour match their own prompt,
against the same samples read against shuffled prompts (what matching by chance gives), and the
Frechet distance in the judge's features to real test glyphs with its floor (real training glyphs
against the same test glyphs).
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from difflab.config import check
from difflab.data.glyphs import (
    COLOUR_NAMES,
    FAMILIES,
    HELD_OUT_FAMILY,
    LATIN,
    SIZES,
    caption,
    glyphs_dataset,
)
from difflab.data.images import ArrayData
from difflab.errors import UserError
from difflab.evaluate.frechet import frechet_distance_from_samples
from difflab.evaluate.glyphs_judge import glyphs_to_tensor, load_glyphs_judge
from difflab.gaussian.objectives import make_objective
from difflab.gaussian.parameterization import Denoiser
from difflab.nets.judge import GLYPHS_HEADS
from difflab.nets.text_encoder import TextConditionedNet, TextEncoder
from difflab.recipes import (
    RUN_FILES,
    Evaluation,
    Recipe,
    Samples,
    load_network,
    positive_int,
    reading_metadata,
    seed_value,
)
from difflab.recipes.autoencoder import LoadedAutoencoder
from difflab.recipes.image import (
    ImageConfig,
    build_denoiser,
    build_net,
    check_output_memory,
    config_from_run,
    draw,
    guidance_settings,
    guided_denoiser,
    run_metadata,
    sampler_settings,
    threshold_settings,
)
from difflab.recipes.latent import (
    LatentSection,
    autoencoder_of_run,
    decode,
    decoding_callback,
    encode_training_images,
)
from difflab.recipes.text_to_digit import TextEncoderConfig, split_prompts
from difflab.train.trainer import LOCK_NAME, Trainer, TrainResult
from difflab.viz.images import save_grid, save_loss_curve

# ================================================================================================
# Captions as tokens
# ================================================================================================

PAD = 0
ARTICLE = "a"  # "an" reads as "a": dropping a word may change the article a caption needs
KINDS = ("digit", "capital", "letter")
SIZE_WORDS = tuple(name for name, _ in SIZES)
COLOUR_WORDS = tuple(dict.fromkeys(w for name in COLOUR_NAMES for w in name.split()))
FAMILY_WORDS = tuple(
    dict.fromkeys(w for i, f in enumerate(FAMILIES) if i != HELD_OUT_FAMILY for w in f.split())
)
WORDS = ("<pad>", ARTICLE, "on", "background", *SIZE_WORDS, *COLOUR_WORDS, "bold", "italic",
         *FAMILY_WORDS, *KINDS)  # fmt: skip
#: Token ids: the words, then one token per character (written ``char:G``).
VOCAB: tuple[str, ...] = (*WORDS, *(f"char:{c}" for c in LATIN))
MAX_TOKENS = 16
_TOKEN = {word: i for i, word in enumerate(VOCAB)}

#: Attribute groups of caption words; group 0 (article, kind, character) is never dropped.
GROUPS = ("always", "size", "colour", "weight", "slant", "family", "background")
_GROUP_OF = {
    **dict.fromkeys(SIZE_WORDS, 1),
    **dict.fromkeys(COLOUR_WORDS, 2),
    "bold": 3,
    "italic": 4,
    **dict.fromkeys(FAMILY_WORDS, 5),
}


def _words(text: str) -> list[str]:
    """The words of ``text``: lower-cased, except a single character right after a kind word
    (``capital G``) or one that is no word (``q``), which is that character."""
    out: list[str] = []
    for raw in re.findall(r"[A-Za-z0-9]+", text):
        word = raw.lower()
        if len(raw) == 1 and ((out and out[-1] in KINDS) or word not in _TOKEN):
            word = f"char:{raw}"
        out.append("a" if word == "an" else word)
    return out


def tokenize(texts: Sequence[str], added: Sequence[str] = ()) -> tuple[Tensor, Tensor]:
    """``(tokens, groups)``, both ``(N, MAX_TOKENS)`` long, left-aligned and padded: the token
    id of each word and the index in :data:`GROUPS` of the attribute it names (the words from
    "on" to "background" name the background). ``added``: pseudo-words of textual inversion
    (lower case), one entry per new row, read as ids ``len(VOCAB), len(VOCAB) + 1, ...``
    (group 0); a word listed ``k`` times has ``k`` vectors and reads as its ``k`` ids in a row.
    Raises ``ValueError`` for unknown words and captions longer than :data:`MAX_TOKENS` ids."""
    ids = {word: [i] for word, i in _TOKEN.items()}
    for i, word in enumerate(added):
        ids.setdefault(word, []).append(len(VOCAB) + i)
    tokens, groups = [], []
    for text in texts:
        words = _words(text)
        unknown = sorted({w for w in words if w not in ids})
        if unknown:
            raise ValueError(
                f"unknown words {unknown} in {text!r}; the captions use: {', '.join(WORDS[1:])}, "
                "and a digit or Latin letter after digit, capital or letter"
            )
        background = words.index("on") if "on" in words else len(words)
        word_ids = [i for w in words for i in ids[w]]
        group = [_GROUP_OF.get(w, 0) if i < background else 6 for i, w in enumerate(words)]
        group = [g for w, g in zip(words, group, strict=True) for _ in ids[w]]
        if len(word_ids) > MAX_TOKENS:
            raise ValueError(f"{text!r} has {len(word_ids)} words; at most {MAX_TOKENS}")
        pad = [PAD] * (MAX_TOKENS - len(word_ids))
        tokens.append(word_ids + pad)
        groups.append(group + pad)
    return (torch.tensor(tokens, dtype=torch.long).reshape(-1, MAX_TOKENS),
            torch.tensor(groups, dtype=torch.long).reshape(-1, MAX_TOKENS))  # fmt: skip


def drop_attributes(tokens: Tensor, groups: Tensor, p: float, generator: torch.Generator) -> Tensor:
    """``tokens`` with each attribute group of each caption dropped with probability ``p`` and
    the remaining words closed up to the left (a stable sort of kept before dropped)."""
    dropped = torch.rand(tokens.shape[0], len(GROUPS), device=tokens.device, generator=generator)
    dropped = dropped < p
    dropped[:, 0] = False
    keep = (tokens != PAD) & ~dropped.gather(1, groups)
    order = torch.sort((~keep).to(torch.uint8), dim=1, stable=True).indices
    return torch.where(keep, tokens, PAD).gather(1, order)


def parse_prompt(prompt: str) -> dict[str, int]:
    """The judged attributes a caption names, as indices: ``character`` (into the Latin
    characters), ``family``, ``colour`` and ``background`` when named, ``weight`` and ``slant``
    always (a caption names bold and italic only when they hold)."""
    words = _words(prompt)
    background = words.index("on") if "on" in words else len(words)
    before, after = " ".join(words[:background]), " ".join(words[background:])
    named: dict[str, int] = {"weight": int("bold" in words), "slant": int("italic" in words)}
    chars = [w[5:] for w in words if w.startswith("char:")]
    if len(chars) == 1:
        named["character"] = LATIN.index(chars[0])
    families = [i for i, f in enumerate(FAMILIES) if re.search(rf"(?<!cm )\b{f}\b", before)]
    if len(families) == 1:
        named["family"] = families[0]
    for key, text in (("colour", before), ("background", after)):
        colours = [i for i, c in enumerate(COLOUR_NAMES) if re.search(rf"(?<!pale )\b{c}\b", text)]
        if len(colours) == 1:
            named[key] = colours[0]
    return named


# ================================================================================================
# Model
# ================================================================================================


@dataclass
class TextToImageConfig(ImageConfig):
    """The image recipe's config plus the text encoder (``word_drop``: the probability of
    dropping each attribute of a caption in training) and, for latent text-to-image,
    ``latent.autoencoder`` (see the module docstring)."""

    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    latent: LatentSection = field(default_factory=LatentSection)

    def validate(self) -> TextToImageConfig:
        super().validate()
        recipe = "the text-to-image recipe"
        check(self.data.name == "glyphs",
              f"{recipe} trains on data.name=glyphs, not {self.data.name}")  # fmt: skip
        check(self.data.held_out == 0, f"data.held_out does not apply to {recipe}: it "
              "evaluates on the glyphs test split; set data.held_out=0")  # fmt: skip
        check(self.model.kind in ("unet", "dit"),
              f"{recipe} needs model.kind=unet or dit, not {self.model.kind}")  # fmt: skip
        self.text_encoder.validate()
        check(not self.latent.autoencoder or self.sample.threshold in (None, "none"),
              "sample.threshold does not apply to latent models: latents are not "
              "bounded")  # fmt: skip
        return self


def build_text_net(cfg: TextToImageConfig, shape: tuple[int, ...]) -> TextConditionedNet:
    """The U-Net or DiT of ``model`` cross-attending to a text encoder of ``text_encoder``."""
    t = cfg.text_encoder
    net = build_net(cfg.model, shape, None, context_dim=t.dim, pooled_context=True)
    return TextConditionedNet(TextEncoder(len(VOCAB), MAX_TOKENS, t.dim, t.depth, t.num_heads), net)


def make_loss(cfg: TextToImageConfig):
    """``loss(model, (x0, tokens, groups), generator)``: drop attributes (``word_drop``), then
    whole captions (``diffusion.cond_drop``), then the objective of the parameterization."""
    d, word_drop = cfg.diffusion, cfg.text_encoder.word_drop
    objective = make_objective(d.prediction, d.weighting)

    def loss(model: nn.Module, batch: tuple[Tensor, ...], generator: torch.Generator) -> Tensor:
        x0, tokens, groups = batch
        tokens = drop_attributes(tokens, groups, word_drop, generator)
        drop_all = torch.rand(x0.shape[0], device=x0.device, generator=generator) < d.cond_drop
        tokens = torch.where(drop_all[:, None], PAD, tokens)
        return objective(build_denoiser(model, d), x0, {"tokens": tokens}, generator)

    return loss


@dataclass
class TextToImageModel:
    """A trained text-to-image model (EMA weights) and what sampling needs."""

    denoiser: Denoiser
    config: TextToImageConfig
    shape: tuple[int, ...]
    step: int
    autoencoder: LoadedAutoencoder | None = None
    class_names: None = None
    #: Pseudo-words of textual-inversion embeddings added to the text encoder's vocabulary.
    added_words: tuple[str, ...] = ()

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.net.parameters()).device


#: Classifier-free guidance scale of sampling when none is given.
DEFAULT_GUIDANCE = 3.0

#: The glyphs demo's autoencoder folder, inside the demo's, and the two trainings' budgets (about
#: 2.5 and 6 minutes on 2 cores), with their settings where they differ from the presets': a
#: higher learning rate for the short runs, smaller batches for the latent model (more steps).
DEMO_AUTOENCODER = "autoencoder"
DEMO_AUTOENCODER_STEPS = 2400
DEMO_AUTOENCODER_TRAINING = ("train.lr=0.003",)
DEMO_STEPS = 1600
DEMO_MINUTES = 7
DEMO_TRAINING = ("train.batch_size=64", "train.lr=0.002", "train.warmup=50")

#: The prompts of the demo's grid (one row each).
DEMO_PROMPTS = (
    "a red bold serif capital G on a pale blue background",
    "a green italic sans letter q on a black background",
    "a large yellow mono digit 7 on a purple background",
    "a white stix capital R on a blue background",
    "a small orange bold cm roman letter k on a white background",
    "a black cm sans capital W on a pink background",
)


class TextToImageRecipe(Recipe):
    name = "text-to-image"
    config_type = TextToImageConfig
    preset = "glyphs-text"
    data = "images"
    demo_files = (*RUN_FILES, LOCK_NAME, "prompts.png",
                  *(f"{DEMO_AUTOENCODER}/{name}" for name in (*RUN_FILES, LOCK_NAME)))  # fmt: skip

    def config_from_run(self, meta: dict[str, Any]) -> TextToImageConfig:
        return config_from_run(self.config_type, meta)

    def build(self, cfg: TextToImageConfig, meta: dict[str, Any]) -> TextConditionedNet:
        if tuple(meta.get("vocab", ())) != VOCAB:
            raise UserError("this run was trained with another caption vocabulary")
        return build_text_net(cfg, tuple(meta["shape"]))

    def train(
        self, cfg: TextToImageConfig, *, resume: bool = False, progress: bool = True
    ) -> TrainResult:
        glyphs = glyphs_dataset("train")
        data, extra = ArrayData(glyphs_to_tensor(glyphs.images)), {}
        if cfg.latent.autoencoder:
            data, extra = encode_training_images(cfg.latent.autoencoder, data, cfg.data.name,
                                                 cfg.train.device)  # fmt: skip
        tokens, groups = tokenize(glyphs.captions())
        meta = run_metadata(self.name, cfg, data, vocab=list(VOCAB), **extra)
        torch.manual_seed(cfg.train.seed)  # network initialisation
        net = self.build(cfg, meta)
        trainer = Trainer(net, make_loss(cfg), (data.x, tokens, groups), cfg.train, meta,
                          Path(cfg.train.out))  # fmt: skip
        return trainer.fit(resume=resume, progress=progress)

    def load(self, path: Path, device: str = "auto") -> TextToImageModel:
        cfg, meta, net, step = load_network(self, path, device)
        with reading_metadata(path):
            shape = tuple(meta["shape"])
        ae = autoencoder_of_run(path, device) if cfg.latent.autoencoder else None
        return TextToImageModel(build_denoiser(net, cfg.diffusion), cfg, shape, step, ae)

    def sample(
        self,
        model: TextToImageModel,
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
        """Glyphs for ``prompt`` (captions separated by ``;`` or a list): the ``n`` samples are
        shared out in order, one grid row per prompt, with classifier-free guidance of scale
        ``w = guidance`` (default 3) against the empty caption; at 0 the unconditional pass is
        skipped. ``callback(step, t, x_t, x0)`` sees every step (decoded pictures for a latent
        model)."""
        prompts = split_prompts(prompt, self.name, DEMO_PROMPTS[0])
        s = model.config.sample
        ae = model.autoencoder
        if ae is not None:
            if threshold not in (None, "none"):
                raise UserError("--threshold does not apply to latent runs: latents are not "
                                "bounded")  # fmt: skip
            threshold = "none"
            check_output_memory(n, ae.shape)
            callback = decoding_callback(ae, model.denoiser.schedule, callback)
        sampler, steps, grid, options = sampler_settings(s, sampler, steps, grid, eta,
                                                         sampler_options)  # fmt: skip
        guidance, convention = guidance_settings(guidance, convention, DEFAULT_GUIDANCE)
        threshold, percentile = threshold_settings(threshold, percentile, s.threshold, model.shape)
        seed = s.seed if seed is None else seed_value(seed)
        per_prompt = -(-n // len(prompts))
        tokens = _tokens(shared_out(prompts, n), model.added_words).to(model.device)
        empty = torch.full((1, MAX_TOKENS), PAD, dtype=torch.long, device=model.device)
        den = guided_denoiser(model, guidance=guidance, convention=convention,
                              threshold=threshold, percentile=percentile,
                              null_cond={"tokens": empty})  # fmt: skip
        x = draw(model, den, n, {"tokens": tokens}, sampler=sampler, steps=steps, grid=grid,
                 seed=seed, options=options, callback=callback)  # fmt: skip
        if ae is not None:
            x = decode(ae, x).cpu()
        return Samples(x=x, nrow=per_prompt if len(prompts) > 1 else min(10, n))

    def evaluate(
        self,
        model: TextToImageModel,
        *,
        n: int = 500,
        guidance: float | None = None,
        sampler: str | None = None,
        steps: int | None = None,
        seed: int = 0,
        progress: bool = True,
    ) -> Evaluation:
        """Prompt adherence and judged FD of one sample for each of the first ``n`` captions of
        the glyphs test split (see the module's docstring)."""
        positive_int("n", n)
        seed = seed_value(seed)
        test = glyphs_dataset("test")
        if n > len(test):
            raise UserError(f"--n must be at most {len(test)}, the glyphs test split's size")
        prompts = [caption(int(c), test.attribute_row(i)) for i, c in enumerate(test.labels[:n])]
        chunks = []
        for lo in tqdm(range(0, n, EVAL_CHUNK), desc="eval (sampling)", disable=not progress):
            part = prompts[lo : lo + EVAL_CHUNK]
            samples = self.sample(model, len(part), prompt=part, guidance=guidance,
                                  sampler=sampler, steps=steps, seed=seed + lo)  # fmt: skip
            chunks.append(samples.x.float().cpu())
        x = torch.cat(chunks)
        judge = load_glyphs_judge()
        shuffled = [
            prompts[i] for i in torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        ]
        own, chance = prompt_adherence(judge, x, prompts), prompt_adherence(judge, x, shuffled)
        real_test = glyphs_to_tensor(test.images[:n])
        real_train = glyphs_to_tensor(glyphs_dataset("train").images[:n])
        fd = frechet_distance_from_samples(judge.features(x), judge.features(real_test))
        floor = frechet_distance_from_samples(judge.features(real_train), judge.features(real_test))
        metrics: dict[str, Any] = {f"adherence_{k}": v for k, v in own.items()}
        metrics |= {f"shuffled_{k}": v for k, v in chance.items()}
        metrics |= {"fd": fd, "fd_floor": floor, "samples": n}
        shares = ", ".join(f"{k} {own[k]:.1%} (shuffled {chance[k]:.1%})" for k in own)
        summary = (f"prompt adherence on {n} test captions: {shares}; judged FD {fd:.2f} "
                   f"(floor {floor:.2f})")  # fmt: skip
        return Evaluation(metrics, summary)

    def demo(self, out: Path, *, quiet: bool = False, steps: int | None = None) -> str:
        """Latent text-to-image in under 10 minutes on 2 cores: the ``autoencoder`` preset for
        :data:`DEMO_AUTOENCODER_STEPS` steps into ``out/autoencoder``, then the
        ``glyphs-text-latent`` preset on its latents for :data:`DEMO_STEPS` steps (stopped
        after :data:`DEMO_MINUTES` minutes at the latest) into ``out`` (``steps`` replaces both
        step counts); then a grid of the demo prompts (rows) by seeds (columns) and the loss
        curve."""
        from difflab.recipes import get, load_config

        start = time.perf_counter()
        autoencoder = get("autoencoder")
        _, ae_cfg = load_config("autoencoder", [
            f"train.out={out / DEMO_AUTOENCODER}",
            f"train.steps={DEMO_AUTOENCODER_STEPS if steps is None else steps}",
            *DEMO_AUTOENCODER_TRAINING,
        ], recipe=autoencoder.name)  # fmt: skip
        ae_result = autoencoder.train(ae_cfg, progress=not quiet)
        _, cfg = load_config("glyphs-text-latent", [
            f"train.out={out}", f"latent.autoencoder={out / DEMO_AUTOENCODER}",
            f"train.steps={DEMO_STEPS if steps is None else steps}",
            f"train.max_minutes={DEMO_MINUTES}",
            *DEMO_TRAINING,
        ], recipe=self.name)  # fmt: skip
        result = self.train(cfg, progress=not quiet)
        model = self.load(out)
        seeds = 8
        x = self.sample(model, seeds * len(DEMO_PROMPTS), prompt=list(DEMO_PROMPTS)).x
        lines = [
            f"demo finished in {time.perf_counter() - start:.0f} s (autoencoder: "
            f"{ae_result.steps} steps; latent text-to-image model: {result.steps} steps, "
            f"{result.images_per_second:.0f} images/s)",
            f"prompts (rows) x seeds (columns): {save_grid(x, out / 'prompts.png', nrow=seeds)}",
            *(f"  row {i + 1}: {p}" for i, p in enumerate(DEMO_PROMPTS)),
            f"loss curve: {save_loss_curve(result.log, out / 'loss_curve.png')}",
            f"checkpoint: {result.checkpoint} (its autoencoder: {ae_result.checkpoint})",
            f'try: difflab sample {out} --prompt "a blue italic serif letter e on a yellow '
            'background" --guidance 3',
        ]
        return "\n".join(lines)


#: Samples drawn per call in ``evaluate``.
EVAL_CHUNK = 250


def shared_out(prompts: Sequence[str], n: int) -> list[str]:
    """The caption of each of ``n`` samples: ``prompts`` in order, ``ceil(n / k)`` samples each
    of the ``k`` (the last ones fewer where ``k`` does not divide ``n``)."""
    per_prompt = -(-n // len(prompts))
    return [text for text in prompts for _ in range(per_prompt)][:n]


def _tokens(prompts: list[str], added: tuple[str, ...] = ()) -> Tensor:
    try:
        return tokenize(prompts, added)[0]
    except ValueError as e:
        raise UserError(str(e)) from None


def prompt_adherence(judge: nn.Module, x: Tensor, prompts: Sequence[str]) -> dict[str, float]:
    """Per judged attribute, the share of samples ``x`` ``(N, 3, 32, 32)`` whose attribute as
    the judge reads it is the one their prompt names (among the prompts that name it)."""
    if len(prompts) != x.shape[0]:
        raise ValueError(f"{x.shape[0]} samples but {len(prompts)} prompts")
    read = {k: v.cpu() for k, v in judge.predict(x).items()}
    asked = [parse_prompt(p) for p in prompts]
    shares = {}
    for head in GLYPHS_HEADS:
        rows = [i for i, a in enumerate(asked) if head in a]
        if rows:
            want = torch.tensor([asked[i][head] for i in rows])
            shares[head] = float((read[head][rows] == want).double().mean())
    return shares


RECIPE = TextToImageRecipe()
