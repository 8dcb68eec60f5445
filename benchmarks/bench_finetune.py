"""Benchmark of fine-tuning a trained glyphs text-to-image run on two concepts held out of its
training (issue 15; seed 004, "Fine-tuning"): the Computer Modern typewriter font as a style
(token ``<tt>``) and the Greek capital Omega as a subject ("a [V] letter"), 8 training pictures
each rendered by :mod:`difflab.data.glyphs`, taught by each method: LoRA, textual inversion,
LoRA over that textual inversion's token (pivotal tuning), DreamBooth with and without prior
preservation, DreamBooth-LoRA. The training pictures are
captioned in the folder's ``metadata.jsonl`` (``--captions``): by default each picture twice
(two files), once with its colours ("a yellow {} letter on a red background") and once with
the concept's prompt, so that the token carries the concept and not the 8 pictures' colours;
``named`` names all a picture shows (size, weight, slant, family too), and ``--db-captions``
gives DreamBooth and DreamBooth-LoRA captions of their own kind.

What the glyphs judge can read: its character head knows the 62 Latin classes and its family
head was trained on the six families of the training split, so it can name neither concept (the
typewriter family's logit was never trained; no Greek class exists). Concept fidelity is read by
two linear probes (logistic regression) on the judge's frozen 128-d features, trained here on
real rendered glyphs: typewriter capital A (what every typewriter prompt asks for) against the
capital A of the six training families, and Omega (any Greek-capable family) against Latin
glyphs and the other Greek letters; their accuracies on held-out real glyphs are printed with
the results, and the base run's own rate on the same prompts is the floor each method is
compared with. (A first typewriter probe, any Latin character in typewriter against the
training families, had 17.5% false positives and called none of a LoRA's slab-serif A's
typewriter; the capital-A probe has about 1% and calls 7 of 8 of them typewriter.)

Per concept and method: concept fidelity (the probe's share of samples of the concept prompts,
and each prompt's share: an identifier that one prompt reads as another word shows there),
prompt fidelity (the judge's glyph colour, background colour and weight against the prompt, on
the coloured concept prompts), prior drift (the judged Frechet distance to real glyphs rendered
for the same prompts, :func:`prompt_renders`, and to real test glyphs, and the mean prompt
adherence over the six heads on 10 ordinary prompts without the token, before and after:
textual inversion leaves those outputs bit-identical by construction and is not resampled;
where the method's word is one the run knows and some ordinary prompts say it, as "mono" for
the typewriter, the FD over the other prompts too), the leak (the probe's share of samples of
the class prompt without the concept's word, "a capital A" or "a letter", before and after:
what prior preservation protects),
trainable parameters, file size and fine-tuning time. Then two LoRAs (the font, plain or
pivotal, and a pink-on-purple colour style, each with its own trigger word) at 0.5 / 0.5
against each alone, and a grid of prompts x methods. DreamBooth's prior is drawn for the
training captions without the identifier, the class prompt, or varied captions of the class
or of every character (``--class-prompts``, :func:`class_prompts`); ``--identifier`` replaces
the concept's identifier.

Usage (one thread; every size is an option, the defaults are the short run of BENCHMARKS.md):
``OMP_NUM_THREADS=1 python benchmarks/bench_finetune.py --base runs/t2i-latent-v --out
runs/bench/finetune``; ``--methods`` runs some of the methods only (the two-LoRA rows need
``lora`` or ``lora-over-ti``), ``--targets`` chooses LoRA's and DreamBooth-LoRA's targets.
Writes ``OUT/results.json``, ``OUT/grid.png``, ``OUT/combined.png`` and the concept folders,
adapters, embeddings and DreamBooth runs under ``OUT``; prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import string
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from difflab.data.glyphs import (
    CHARACTERS,
    COLOUR_NAMES,
    COLOUR_PAIRS,
    FAMILIES,
    GREEK,
    LATIN,
    SIZES,
    caption,
    glyphs_dataset,
    render,
    sample_attributes,
)
from difflab.errors import UserError
from difflab.evaluate.frechet import frechet_distance_from_samples
from difflab.evaluate.glyphs_judge import glyphs_to_tensor, load_glyphs_judge
from difflab.recipes import finetune as ft
from difflab.recipes import load
from difflab.recipes.text_to_image import parse_prompt, prompt_adherence
from difflab.viz.images import save_grid

SUBJECT_CHAR = "Ω"
CONCEPTS = {
    # name: training prompt template, LoRA / textual-inversion token and word, DreamBooth
    # identifier, class prompt and the class's characters, a training caption naming the
    # picture's colours (--captions described or mixed) and one naming all it shows as the
    # training split's captions do (--captions named), prompts of the evaluation ({} where
    # the token goes)
    "typewriter": {
        "prompt": "a {} capital A",
        "token": "<tt>",
        "init_word": "mono",
        "identifier": "mono",
        "class_prompt": "a capital A",
        "class_characters": "A",
        "described": "a {colour} {{}} capital A on a {background} background",
        "named": "a {size} {colour} {style}{{}} capital A on a {background} background",
        "plain": ["a {} capital A"],
        "coloured": [
            "a red {} capital A on a white background",
            "a yellow {} capital A on a blue background",
        ],
    },
    "omega": {
        "prompt": "a {} letter",
        "token": "<om>",
        "init_word": "U",  # its closest Latin shape; a 90-sample sweep: U 86%, n 81%, O 76%
        # a word the run knows but never reads alone (only in "cm roman"), as DreamBooth's
        # rare tokens; "O" took the round capitals with it (G, C drew Omegas; runs/ft57), and
        # "pale" is a colour word: "a yellow pale letter on a blue background" drew pale blue
        # glyphs, no Omega (runs/f8-s0-3)
        "identifier": "roman",
        "class_prompt": "a letter",
        "class_characters": string.ascii_lowercase,
        "described": "a {colour} {{}} letter on a {background} background",
        "named": "a {size} {colour} {style}{family} {{}} letter on a {background} background",
        "plain": ["a {} letter"],
        "coloured": [
            "a red {} letter on a white background",
            "a yellow {} letter on a blue background",
        ],
    },
}
#: The training captions' kinds (:func:`write_folder`).
CAPTIONS = ("both", "named", "mixed", "described", "plain")
#: Ordinary prompts without any token: the prior each method should keep.
ORDINARY = (
    "a red bold serif capital G on a white background",
    "a green italic sans letter q on a black background",
    "a large yellow mono digit 7 on a purple background",
    "a white stix capital R on a blue background",
    "a small orange bold cm roman letter k on a white background",
    "a black cm sans capital W on a pink background",
    "a blue mono capital A on a yellow background",
    "a pink sans digit 3 on a green background",
    "a purple serif letter e on a pale blue background",
    "a white bold mono capital M on a red background",
)
#: "lora-over-ti": LoRA trained over the textual-inversion embedding of the same run (pivotal
#: tuning: ``finetune_lora(..., embeddings=...)``), the token read with the embedding's rows.
METHODS = ("lora", "textual-inversion", "lora-over-ti", "dreambooth", "dreambooth-no-prior",
           "dreambooth-lora")  # fmt: skip


# ------------------------------------------------------------------ pictures of the concepts

OMEGA = CHARACTERS.index(SUBJECT_CHAR)
GREEK_LABELS = np.arange(len(CHARACTERS) - len(GREEK), len(CHARACTERS))


def rendered(kind: str, n: int, seed: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """``n`` rendered glyphs (uint8 ``(n, 32, 32, 3)``) and their attributes, of ``kind``:
    ``typewriter-A`` (capital A in the typewriter family, the ``concepts`` split's), ``omega``
    (Omega in a family that has it), ``greek`` (the other Greek letters), ``A`` (a capital A of
    the training families), ``pink-A`` (the same, pink on purple)."""
    rng = np.random.default_rng([seed, 7])
    split = "train" if kind in ("A", "pink-A") else "concepts"
    labels, attributes = sample_attributes(4 * n + 64, rng, split)
    greek = labels >= GREEK_LABELS[0]
    keep = greek if kind in ("omega", "greek") else ~greek
    labels, attributes = labels[keep][:n], {k: v[keep][:n] for k, v in attributes.items()}
    if kind in ("typewriter-A", "A", "pink-A"):
        labels[:] = CHARACTERS.index("A")
    elif kind == "omega":
        labels[:] = OMEGA
    elif kind == "greek":
        labels = rng.choice(GREEK_LABELS[GREEK_LABELS != OMEGA], n)
    if kind == "pink-A":
        pair = (COLOUR_NAMES.index("pink"), COLOUR_NAMES.index("purple"))
        assert any(tuple(p) == pair for p in COLOUR_PAIRS)
        attributes["colour"][:], attributes["background"][:] = pair
    assert len(labels) == n
    return render(labels, attributes), attributes


def prompt_renders(prompts: tuple[str, ...], n: int, seed: int) -> np.ndarray:
    """``n`` rendered glyphs for each prompt, grouped by prompt: what it names (character,
    family, weight, slant, colours, size) fixed, the rest (face within those, rotation, shift,
    what it does not name) drawn as the training split draws them; an unnamed weight or slant
    is regular or upright, as :func:`prompt_adherence` reads it."""
    rng = np.random.default_rng([seed, 11])
    pictures = []
    for prompt in prompts:
        labels, attributes = sample_attributes(n, rng, "train")
        named = parse_prompt(prompt)
        labels[:] = named["character"]  # the Latin characters come first in CHARACTERS
        for key in ("family", "weight", "slant", "colour", "background"):
            if key in named:
                attributes[key][:] = named[key]
        sizes = [i for i, (word, _) in enumerate(SIZES) if word in prompt.split()]
        if sizes:
            attributes["size"][:] = sizes[0]
        pictures.append(render(labels, attributes))
    return np.concatenate(pictures)


def class_prompts(concept: dict, kind: str, n: int, seed: int) -> list[str] | None:
    """DreamBooth's class captions: ``captions``, none given, so each training caption without
    the identifier (:func:`difflab.recipes.finetune.without_identifier`); ``class``, the
    concept's class prompt ("a capital A"); ``varied``, ``n`` captions of the class's
    characters as the training split captions its glyphs (size, colours, weight, slant and
    family drawn), none with the identifier: a prior over the class's variety; ``dataset``,
    the same over every Latin character (digits, capitals, letters): a prior over all the
    base draws."""
    if kind == "captions":
        return None
    if kind == "class":
        return [concept["class_prompt"]]
    characters = LATIN if kind == "dataset" else concept["class_characters"]
    rng = np.random.default_rng([seed, 13])
    chosen: list[str] = []
    while len(chosen) < n:
        _, attributes = sample_attributes(1, rng, "train")
        char = characters[rng.integers(len(characters))]
        text = caption(CHARACTERS.index(char), {k: int(v[0]) for k, v in attributes.items()})
        if concept["identifier"].lower() not in text.lower().split():
            chosen.append(text)
    return chosen


def write_folder(
    pictures: tuple[np.ndarray, dict[str, np.ndarray]],
    folder: Path,
    concept: dict | None = None,
    captions: str = "plain",
) -> Path:
    """The pictures as PNG files in ``folder``; unless ``captions`` is ``plain``, a caption for
    each in ``folder/metadata.jsonl`` (``difflab finetune`` reads it): the ``concept``'s
    ``described`` template with the picture's colours (``described``: every picture;
    ``mixed``: every other one, the rest its plain ``prompt``; ``both``: every picture, and a
    copy of it, ``{i}-plain.png``, with the plain ``prompt``), or as ``both`` with its
    ``named`` template, which names all the picture shows as the training split's captions do
    (size, colours, weight, slant and, for a subject, family): the identifier is left only
    the shape (``named``)."""
    images, attributes = pictures
    folder.mkdir(parents=True, exist_ok=True)
    twice = captions in ("both", "named")
    for i, picture in enumerate(images):
        Image.fromarray(picture).save(folder / f"{i}.png")
        if twice:
            Image.fromarray(picture).save(folder / f"{i}-plain.png")
    if captions == "plain":
        return folder
    lines = []
    for i in range(len(images)):
        words = {key: COLOUR_NAMES[attributes[key][i]] for key in ("colour", "background")}
        words |= {"size": SIZES[attributes["size"][i]][0],
                  "family": FAMILIES[attributes["family"][i]],
                  "style": "bold " * attributes["weight"][i]
                  + "italic " * attributes["slant"][i]}  # fmt: skip
        plain = captions == "mixed" and i % 2
        template = concept["named" if captions == "named" else "described"]
        text = concept["prompt"] if plain else template.format(**words)
        lines.append(json.dumps({"file_name": f"{i}.png", "text": text}) + "\n")
        if twice:
            lines.append(json.dumps({"file_name": f"{i}-plain.png", "text": concept["prompt"]})
                         + "\n")  # fmt: skip
    (folder / ft.CAPTIONS).write_text("".join(lines))
    return folder


# ------------------------------------------------------------------ the probes


class Probe:
    """Logistic regression on the judge's standardised features (L2 1e-3, L-BFGS)."""

    def __init__(self, judge, positives: torch.Tensor, negatives: torch.Tensor):
        self.judge = judge
        f = torch.cat([judge.features(positives), judge.features(negatives)]).double()
        y = torch.cat([torch.ones(len(positives)), torch.zeros(len(negatives))]).double()
        self.mean, self.std = f.mean(0), f.std(0) + 1e-6
        z = (f - self.mean) / self.std
        w = torch.zeros(z.shape[1] + 1, dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.LBFGS([w], max_iter=500, line_search_fn="strong_wolfe")

        def closure():
            optimizer.zero_grad()
            logits = z @ w[:-1] + w[-1]
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y)
            loss = loss + 1e-3 * w[:-1].square().sum()
            loss.backward()
            return loss

        optimizer.step(closure)
        self.w = w.detach()

    def says(self, x: torch.Tensor) -> torch.Tensor:
        z = (self.judge.features(x).double() - self.mean) / self.std
        return (z @ self.w[:-1] + self.w[-1]) > 0


def probes(judge, n: int) -> tuple[dict[str, Probe], dict[str, dict[str, float]]]:
    """The typewriter and Omega probes: ``n`` typewriter capital A's against ``n`` capital A's
    of the training families; ``n`` Omegas against ``n`` training-split glyphs and ``n / 2``
    other Greek letters; and their true- and false-positive rates on as many held-out real
    glyphs (other seeds; the test split)."""
    latin = {0: glyphs_dataset("train").images[:n], 1: glyphs_dataset("test").images[:n]}
    made, checks = {}, {}
    for concept in ("typewriter", "omega"):
        sets = []
        for k in (0, 1):
            if concept == "typewriter":
                positives = rendered("typewriter-A", n, 10 + k)[0]
                negatives = [rendered("A", n, 30 + k)[0]]
            else:
                positives = rendered("omega", n, 10 + k)[0]
                negatives = [latin[k], rendered("greek", n // 2, 20 + k)[0]]
            sets.append((glyphs_to_tensor(positives),
                         glyphs_to_tensor(np.concatenate(negatives))))  # fmt: skip
        probe = made[concept] = Probe(judge, *sets[0])
        pos, neg = sets[1]
        checks[concept] = {"true_positive": float(probe.says(pos).double().mean()),
                           "false_positive": float(probe.says(neg).double().mean()),
                           "held_out": [len(pos), len(neg)]}  # fmt: skip
    return made, checks


# ------------------------------------------------------------------ fine-tuning and sampling


def finetune(
    method: str, concept: dict, base: Path, images: Path, out: Path, a, embedding: str | None
) -> dict:
    """Teach ``concept`` to ``base`` by ``method``; what it wrote, its size, time and trained
    parameters (``embedding``: the concept's textual-inversion file, for ``lora-over-ti``)."""
    prompt = None if (images / ft.CAPTIONS).exists() else concept["prompt"]
    common = dict(images=images, prompt=prompt, steps=a.steps, seed=a.seed,
                  device="cpu", progress=False)  # fmt: skip
    dreambooth = dict(token=concept["identifier"],
                      class_prompt=class_prompts(concept, a.class_prompts, a.class_images, a.seed),
                      num_class_images=a.class_images, class_guidance=a.class_guidance,
                      prior_target=a.prior_target, train_text_encoder=a.db_text_encoder,
                      **common)  # fmt: skip
    wall, cpu = time.perf_counter(), time.process_time()
    if method == "lora":
        result = ft.finetune_lora(base, token=concept["token"], init_word=concept["init_word"],
                                  rank=a.rank, targets=a.targets, lr=a.lora_lr,
                                  out=out.with_suffix(".safetensors"), **common)  # fmt: skip
    elif method == "lora-over-ti":
        result = ft.finetune_lora(base, token=concept["token"], embeddings=[embedding],
                                  rank=a.rank, targets=a.targets, lr=a.pivot_lr or a.lora_lr,
                                  out=out.with_suffix(".safetensors"), **common)  # fmt: skip
    elif method == "textual-inversion":
        result = ft.finetune_embedding(base, token=concept["token"], lr=a.ti_lr,
                                       init_word=concept["init_word"], vectors=a.ti_vectors,
                                       out=out.with_suffix(".safetensors"), **common)  # fmt: skip
    elif method == "dreambooth-lora":
        result = ft.finetune_dreambooth(base, rank=a.rank, targets=a.targets, lr=a.lora_lr,
                                        out=out.with_suffix(".safetensors"),
                                        **dreambooth)  # fmt: skip
    elif method == "dreambooth-no-prior":
        result = ft.finetune_dreambooth(base, prior_weight=0.0, lr=a.db_lr, out=out,
                                        **dreambooth | {"class_guidance": None,
                                                        "prior_target": "pictures"})  # fmt: skip
    else:
        result = ft.finetune_dreambooth(base, prior_weight=a.prior_weight, lr=a.db_lr, out=out,
                                        **dreambooth)  # fmt: skip
    path = result.path
    size = (path / "checkpoint.safetensors" if path.is_dir() else path).stat().st_size
    return {"path": str(path), "embedding": embedding, "bytes": size, "trainable": result.trainable,
            "base_params": result.base_params, "seconds": time.perf_counter() - wall,
            "cpu_seconds": time.process_time() - cpu, "final_loss": result.final_loss}  # fmt: skip


def tuned(method: str, base: Path, record: dict | None, concept: dict | None):
    """The run to sample and the word its concept prompts carry."""
    if record is None:
        return load(base, "cpu"), concept["identifier"] if concept else None
    if method in ("lora", "lora-over-ti", "dreambooth-lora"):
        run = load(base, "cpu")
        if record["embedding"]:
            ft.apply_embeddings(run, [record["embedding"]])
        words = ft.apply_adapters(run, [record["path"]])
        if method == "lora-over-ti":  # the token is the embedding's word
            return run, concept["token"]
        return run, words.get(concept["token"], concept["identifier"]) if concept else None
    if method == "textual-inversion":
        run = load(base, "cpu")
        ft.apply_embeddings(run, [record["path"]])
        return run, concept["token"]
    return load(record["path"], "cpu"), concept["identifier"]


def draw(run, prompts: list[str], per_prompt: int, seed: int, a) -> torch.Tensor:
    """``per_prompt`` samples of each prompt, grouped by prompt."""
    return run.sample(per_prompt * len(prompts), prompt=prompts, seed=seed, steps=a.sample_steps,
                      guidance=a.guidance).x.float()  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", type=Path, default=Path("runs/t2i-latent-v"))
    p.add_argument("--out", type=Path, default=Path("runs/bench/finetune"))
    p.add_argument("--images", type=int, default=8, help="training pictures per concept")
    p.add_argument("--steps", type=int, default=200, help="fine-tuning steps of every method")
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--targets", default=ft.DEFAULT_TARGETS, help="LoRA and DreamBooth-LoRA")
    p.add_argument("--methods", type=lambda text: text.split(","), default=list(METHODS),
                   help="comma list of " + ", ".join(METHODS))  # fmt: skip
    p.add_argument("--lora-lr", type=float, default=2e-3, help="LoRA and DreamBooth-LoRA")
    p.add_argument("--pivot-lr", type=float, default=None, help="lora-over-ti (--lora-lr)")
    p.add_argument("--ti-lr", type=float, default=1e-2, help="textual inversion")
    p.add_argument("--ti-vectors", type=int, default=1, help="textual inversion's vectors")
    p.add_argument("--db-lr", type=float, default=1e-4, help="DreamBooth")
    p.add_argument("--class-images", type=int, default=8)
    p.add_argument(
        "--class-prompts",
        choices=("captions", "class", "varied", "dataset"),
        default="class",
        help="DreamBooth's prior: the training captions without the identifier, the class "
        "prompt, or a varied caption per picture of the class or of any character",
    )
    p.add_argument(
        "--class-guidance",
        type=float,
        default=None,
        help="DreamBooth's class pictures' guidance (the run's default)",
    )
    p.add_argument(
        "--db-text-encoder",
        action="store_true",
        help="DreamBooth and DreamBooth-LoRA tune the text encoder too",
    )
    p.add_argument("--prior-weight", type=float, default=1.0, help="DreamBooth with prior")
    p.add_argument("--prior-target", choices=ft.PRIOR_TARGETS, default="pictures",
                   help="DreamBooth's prior term: the class pictures, or the frozen run's "
                   "prediction at them")  # fmt: skip
    p.add_argument("--identifier", help="DreamBooth's identifier (the concept's own)")
    p.add_argument("--concepts", type=lambda text: text.split(","), default=list(CONCEPTS),
                   help="comma list of " + ", ".join(CONCEPTS))  # fmt: skip
    p.add_argument("--samples", type=int, default=12, help="samples per concept prompt")
    p.add_argument("--drift-samples", type=int, default=6, help="samples per ordinary prompt")
    p.add_argument("--sample-steps", type=int, default=10, help="DPM-Solver++(2M) steps")
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--probe-n", type=int, default=600, help="real glyphs per probe class")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--captions", choices=CAPTIONS, default="both",
                   help="training captions: each picture twice, with its colours and with the "
                   "concept's prompt (both); the same with all it shows named as the training "
                   "split names it (named); every other picture's names its colours, the rest "
                   "are the concept's prompt (mixed); every picture's names them (described); "
                   "all the concept's prompt (plain)")  # fmt: skip
    p.add_argument("--db-captions", choices=CAPTIONS, help="DreamBooth's and DreamBooth-LoRA's "
                   "training captions (--captions)")  # fmt: skip
    a = p.parse_args()
    if unknown := set(a.methods) - set(METHODS):
        p.error(f"unknown methods {', '.join(sorted(unknown))}: choose from {', '.join(METHODS)}")
    if (
        "lora-over-ti" in a.methods
        and "textual-inversion" not in a.methods[: a.methods.index("lora-over-ti")]
    ):
        p.error("lora-over-ti trains over the textual-inversion embedding: list "
                "textual-inversion before it")  # fmt: skip
    if unknown := set(a.concepts) - set(CONCEPTS):
        p.error(f"unknown concepts {', '.join(sorted(unknown))}: choose from "
                f"{', '.join(CONCEPTS)}")  # fmt: skip
    try:
        ft.parse_targets(a.targets)
    except UserError as e:
        p.error(str(e))
    torch.set_num_threads(1)
    if a.out.exists():
        shutil.rmtree(a.out)
    a.out.mkdir(parents=True)
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    judge = load_glyphs_judge()
    probe, probe_checks = probes(judge, a.probe_n)
    real = judge.features(glyphs_to_tensor(glyphs_dataset("test").images[:1000]))
    asked = judge.features(glyphs_to_tensor(prompt_renders(ORDINARY, 100, a.seed)))
    asked_by_prompt = asked.reshape(len(ORDINARY), 100, -1)
    pictures = {"typewriter": rendered("typewriter-A", a.images, 1),
                "omega": rendered("omega", a.images, 2)}  # fmt: skip
    folders = {name: write_folder(pictures[name], a.out / name, CONCEPTS[name], a.captions)
               for name in pictures}  # fmt: skip
    folders["pink"] = write_folder(rendered("pink-A", a.images, 3), a.out / "pink")
    db_captions = a.db_captions or a.captions
    db_folders = {name: folders[name] if db_captions == a.captions else
                  write_folder(pictures[name], a.out / f"{name}-{db_captions}", CONCEPTS[name],
                               db_captions) for name in pictures}  # fmt: skip

    def drift(run) -> tuple[dict, torch.Tensor]:
        """The run's drift on the ordinary prompts, and the judge's features of its samples."""
        x = draw(run, list(ORDINARY), a.drift_samples, a.seed + 1, a)
        prompts = [q for q in ORDINARY for _ in range(a.drift_samples)]
        adherence = prompt_adherence(judge, x, prompts)
        features = judge.features(x)
        return {"fd": frechet_distance_from_samples(features, real),
                "fd_asked": frechet_distance_from_samples(features, asked),
                "adherence": float(np.mean(list(adherence.values()))),
                **adherence}, features  # fmt: skip

    def without_word(before: torch.Tensor, after: torch.Tensor, word: str) -> dict:
        """The FD to the renders, before and after, over the ordinary prompts without the
        method's word: a word the run knows (LoRA's, DreamBooth's identifier) is redefined on
        purpose, and the prompts that say it draw the concept."""
        keep = [i for i, q in enumerate(ORDINARY) if word not in q.split()]

        def fd(features: torch.Tensor) -> float:
            dim = features.shape[-1]
            f = features.reshape(len(ORDINARY), -1, dim)[keep].reshape(-1, dim)
            return frechet_distance_from_samples(f, asked_by_prompt[keep].reshape(-1, dim))

        return {"word": word, "prompts": len(keep), "before": fd(before),
                "after": fd(after)}  # fmt: skip

    def concept_metrics(run, word: str, concept: dict, name: str) -> tuple[dict, torch.Tensor]:
        templates = [*concept["plain"], *concept["coloured"]]
        x = draw(run, [t.format(word) for t in templates], a.samples, a.seed, a)
        first_coloured = len(concept["plain"]) * a.samples
        asked = [t.format("") for t in concept["coloured"] for _ in range(a.samples)]
        shares = prompt_adherence(judge, x[first_coloured:], asked)
        says = probe[name].says(x).double()
        return {"concept": float(says.mean()),
                "concept_coloured": float(says[first_coloured:].mean()),
                "concept_per_prompt": [float(s.mean()) for s in says.split(a.samples)],
                **{k: shares[k] for k in ("colour", "background", "weight")}}, x  # fmt: skip

    def leak(run, concept: dict, name: str) -> float:
        """The share of the class prompt's samples ("a capital A", "a letter": the concept
        prompt without its word) that the probe calls the concept: the language drift that
        DreamBooth's prior term is there to stop (Ruiz et al.'s PRES)."""
        x = draw(run, [concept["class_prompt"]], a.samples, a.seed + 3, a)
        return float(probe[name].says(x).double().mean())

    results: dict = {"probes": probe_checks, "settings": vars(a) | {"base": str(a.base),
                                                                    "out": str(a.out)}}  # fmt: skip
    base_run, _ = tuned("base", a.base, None, None)
    results["base_drift"], base_features = drift(base_run)
    again = judge.features(draw(base_run, list(ORDINARY), a.drift_samples, a.seed + 2, a))
    results["base_drift_other_seeds_fd"] = frechet_distance_from_samples(again, real)
    results["base_drift_other_seeds_fd_asked"] = frechet_distance_from_samples(again, asked)
    methods = a.methods
    identifier = {"identifier": a.identifier} if a.identifier else {}
    rows: dict[str, list[torch.Tensor]] = {m: [] for m in ("base", *methods)}
    for name in a.concepts:
        concept, record = CONCEPTS[name] | identifier, {}
        metrics, x = concept_metrics(base_run, concept["identifier"], concept, name)
        record["base"] = {"metrics": metrics, "leak": leak(base_run, concept, name)}
        rows["base"].append(grid_part(x, a.samples))
        for method in methods:
            print(f"{name}: {method} ...", flush=True)
            embedding = record.get("textual-inversion", {}).get("path")
            folder = (db_folders if method.startswith("dreambooth") else folders)[name]
            made = finetune(method, concept, a.base, folder, a.out / f"{name}-{method}", a,
                            embedding if method == "lora-over-ti" else None)  # fmt: skip
            run, word = tuned(method, a.base, made, concept)
            made["metrics"], x = concept_metrics(run, word, concept, name)
            if method != "textual-inversion":  # its other outputs are provably unchanged
                (made["drift"], features), made["leak"] = drift(run), leak(run, concept, name)
                if any(word in q.split() for q in ORDINARY):
                    made["drift"]["without_word"] = without_word(base_features, features, word)
            rows[method].append(grid_part(x, a.samples))
            record[method] = made
            print(json.dumps(made), flush=True)
        results[name] = record
    fonts = {m: r for m, r in results.get("typewriter", {}).items()
             if m in ("lora", "lora-over-ti")}  # fmt: skip
    if fonts:  # the font LoRAs above are one of two
        results["combined"] = combined(a, folders, judge, probe["typewriter"], fonts)
    grid = torch.cat([torch.cat(rows[m], 0) for m in ("base", *methods)])
    save_grid(grid, a.out / "grid.png", nrow=len(grid) // (1 + len(methods)))
    results["wall_seconds"] = time.perf_counter() - start_wall
    results["cpu_seconds"] = time.process_time() - start_cpu
    results["machine"] = f"{platform.machine()}, torch {torch.__version__}"
    (a.out / "results.json").write_text(json.dumps(results, indent=1))
    print(tables(results))


def grid_part(x: torch.Tensor, per_prompt: int) -> torch.Tensor:
    """Two samples of the plain prompt and of the first coloured one (of one method)."""
    return torch.cat([x[:2], x[per_prompt : per_prompt + 2]])


def combined(a, folders: dict, judge, typewriter: Probe, fonts: dict) -> dict:
    """The font and a pink-on-purple colour style (<op>, read as "medium", a word no ordinary
    prompt has: each adapter its own trigger word, as users combine them) as two LoRAs: each
    alone at 1, the font alone at 0.5 (its share in the pair at 0.5 / 0.5 without the
    colour's), and both at 0.5 / 0.5 and at 1 / 1: the share of "a <op> <tt> capital A"
    samples in the typewriter font, in pink, on purple. ``fonts``: the typewriter records of
    ``lora`` (the font read as "mono") and of ``lora-over-ti`` (pivotal: its embedding loaded
    as it is, the adapter alone scaled, the font read as "<tt>"), those the run trained. The
    first 8 samples of each setting, a row each, go to ``OUT/combined.png``."""
    pink = a.out / "pink-lora.safetensors"
    ft.finetune_lora(a.base, images=folders["pink"], prompt="a {} capital A", token="<op>",
                     init_word="medium", rank=a.rank, targets=a.targets, lr=a.lora_lr,
                     steps=a.steps, seed=a.seed, out=pink, device="cpu",
                     progress=False)  # fmt: skip

    rows = []

    def shares(specs: list[str], embedding: str | None, word: str) -> dict:
        run = load(a.base, "cpu")
        if embedding:
            ft.apply_embeddings(run, [embedding])
        ft.apply_adapters(run, specs)
        x = draw(run, [f"a medium {word} capital A"], 2 * a.samples, a.seed, a)
        rows.append(x[:8])
        read = judge.predict(x)
        return {
            "typewriter": float(typewriter.says(x).double().mean()),
            "pink": float((read["colour"] == COLOUR_NAMES.index("pink")).double().mean()),
            "purple": float((read["background"] == COLOUR_NAMES.index("purple")).double().mean()),
        }

    result = {"colour alone": shares([f"{pink}:1"], None, "mono")}
    for method, record in fonts.items():
        font, word = record["path"], "mono" if method == "lora" else "<tt>"
        label = "font" if method == "lora" else "pivotal font"
        for name, specs in (
            (f"{label} alone", [f"{font}:1"]),
            (f"{label} alone at 0.5", [f"{font}:0.5"]),
            (f"{label} and colour at 0.5 / 0.5", [f"{font}:0.5", f"{pink}:0.5"]),
            (f"{label} and colour at 1 / 1", [f"{font}:1", f"{pink}:1"]),
        ):
            result[name] = shares(specs, record["embedding"], word)
    save_grid(torch.cat(rows), a.out / "combined.png", nrow=8)
    return result


def tables(r: dict) -> str:
    """Markdown tables of the results."""
    lines = ["| concept | method | concept fidelity (probe; per prompt) | prompt fidelity: "
             "colour / background / weight | prior drift: FD to renders of the prompts, before "
             "-> after (relative); FD to test glyphs | adherence "
             "before -> after | class prompt drawn as the concept (leak) | trainable params | "
             "file | time (CPU s) |",
             "|---|---|---:|---|---|---|---|---:|---:|---:|"]  # fmt: skip
    before = r["base_drift"]
    for name in r["settings"]["concepts"]:
        for method in ("base", *r["settings"]["methods"]):
            m = r[name][method]
            q = m["metrics"]
            fidelity = (f"{q['colour']:.0%} / {q['background']:.0%} / "
                        f"{q['weight']:.0%}")  # fmt: skip
            shares = " / ".join(f"{p:.0%}" for p in q["concept_per_prompt"])
            concept = f"{q['concept']:.0%} ({shares})"
            if method == "base":
                lines.append(f"| {name} | base (no fine-tuning) | {concept} | "
                             f"{fidelity} | {before['fd_asked']:.0f}; test glyphs "
                             f"{before['fd']:.0f} | {before['adherence']:.1%} "
                             f"| {m['leak']:.0%} | | | |")  # fmt: skip
                continue
            if "drift" in m:
                d = m["drift"]
                drift = (f"{before['fd_asked']:.0f} -> {d['fd_asked']:.0f} "
                         f"({d['fd_asked'] / before['fd_asked'] - 1:+.0%}); test glyphs "
                         f"{before['fd']:.0f} -> {d['fd']:.0f} "
                         f"({d['fd'] / before['fd'] - 1:+.0%})")  # fmt: skip
                if w := d.get("without_word"):
                    drift += (f"; the {w['prompts']} prompts without '{w['word']}' "
                              f"{w['before']:.0f} -> {w['after']:.0f} "
                              f"({w['after'] / w['before'] - 1:+.0%})")  # fmt: skip
                adherence = f"{before['adherence']:.1%} -> {d['adherence']:.1%}"
                leaked = f"{r[name]['base']['leak']:.0%} -> {m['leak']:.0%}"
            else:
                drift, adherence, leaked = "unchanged (bit-identical)", "unchanged", "unchanged"
            share = m["trainable"] / m["base_params"]
            lines.append(f"| {name} | {method} | {concept} | {fidelity} | {drift} | "
                         f"{adherence} | {leaked} | {m['trainable']:,} ({share:.2%}) | "
                         f"{m['bytes']:,} B | {m['cpu_seconds']:.0f} |")  # fmt: skip
    if "combined" in r:  # only with a typewriter LoRA
        lines += ["", "| LoRAs on 'a <op> <tt> capital A' | typewriter (probe) | pink | purple "
                  "background |", "|---|---:|---:|---:|"]  # fmt: skip
        for label, s in r["combined"].items():
            lines.append(f"| {label} | {s['typewriter']:.0%} | {s['pink']:.0%} | "
                         f"{s['purple']:.0%} |")  # fmt: skip
    checks = r["probes"]
    lines += ["", "probes on held-out real glyphs: " + "; ".join(
        f"{k} true positives {v['true_positive']:.1%}, false positives {v['false_positive']:.1%}"
        for k, v in checks.items())]  # fmt: skip
    lines.append(f"base FD at other seeds (noise): to renders of the prompts "
                 f"{r['base_drift_other_seeds_fd_asked']:.0f}, to test glyphs "
                 f"{r['base_drift_other_seeds_fd']:.0f}; "
                 f"wall {r['wall_seconds']:.0f} s, CPU {r['cpu_seconds']:.0f} s")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    main()
