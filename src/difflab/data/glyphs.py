"""Glyphs: a built-in 32x32 colour world of rendered characters with attributes and captions.

Each image is one character drawn with one of the TrueType fonts that ship inside matplotlib
(``matplotlib/mpl-data/fonts/ttf``) through Pillow (``ImageFont.truetype``, ``ImageDraw``), in
a glyph colour on a background colour from :data:`PALETTE`, at one of three sizes, rotated by a
few degrees and shifted by a few pixels. Its label is the character; its attributes are

- ``family``: an index into :data:`FAMILIES` (DejaVu Sans, Sans Mono, Serif, STIX General and
  Computer Modern roman, sans and typewriter),
- ``weight`` (0 regular, 1 bold) and ``slant`` (0 upright, 1 italic), where the family has that
  face (:data:`FACES` lists every font file used),
- ``colour`` and ``background``: indices into :data:`PALETTE` whose WCAG contrast ratio is at
  least :data:`MIN_CONTRAST`,
- ``size``: an index into :data:`SIZES`,
- ``rotation`` in whole degrees (``|r| <= 10``), ``dx`` and ``dy`` in pixels (``|d| <= 3``),

and its caption (:func:`caption`) reads them, e.g. "a large red bold serif capital G on a pale
blue background". Two concepts are held out of the training and test splits on purpose, for
fine-tuning: the Computer Modern typewriter family and the Greek letters. They appear only in the
``concepts`` split (Latin characters and digits in typewriter, Greek letters in the families
that have them).

Rendering: each distinct (character, face, size) mask is drawn once by Pillow at twice the final
resolution, with its ink box centred; the rotation and shift of the whole batch are then one
``grid_sample`` call, and a 2x2 average brings the masks to 32x32 (supersampled edges). Colours
are blended as ``pixel = round(background + mask * (colour - background))``. Everything follows
from the seed (NumPy's ``default_rng``), so one seed gives identical pixels.

:func:`glyphs_dataset` caches each split under ``$DIFFLAB_CACHE`` or ``~/.cache/difflab`` as a
compressed ``.npz`` of uint8 images ``(N, 32, 32, 3)``, labels and attribute arrays, named with
:data:`CACHE_VERSION` (so a stale cache is never read) and written atomically.
"""

from __future__ import annotations

import string
import warnings
import zipfile
import zlib
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from difflab.errors import UserError
from difflab.files import cache_folder, write_atomically

# Bump when anything that changes the pixels, labels or attributes changes: it names the cache
# files, so a stale data set is never read.
CACHE_VERSION = 1
RESOLUTION = 32
SUPERSAMPLE = 2

#: Characters of the training and test splits (class labels ``0..61``): digits, capitals,
#: lower case.
LATIN = string.digits + string.ascii_uppercase + string.ascii_lowercase
#: Greek letters, held out for the ``concepts`` split (those not shaped like a Latin letter).
GREEK = "ΓΔΘΛΞΠΣΦΨΩαβγδεζηθλμξπρσφψω"
#: Every character; a label is an index into this string (Latin first, so the training labels
#: index it too).
CHARACTERS = LATIN + GREEK

#: Font families as captions name them; the last one is held out of training.
FAMILIES = ("sans", "mono", "serif", "stix", "cm roman", "cm sans", "cm typewriter")
HELD_OUT_FAMILY = FAMILIES.index("cm typewriter")
#: Size names and their font sizes in pixels (at 32x32).
SIZES = (("small", 18), ("medium", 22), ("large", 26))
MAX_ROTATION = 10
MAX_SHIFT = 3
MIN_CONTRAST = 3.0

#: Named colours (sRGB) for glyphs and backgrounds.
PALETTE = (
    ("black", (0, 0, 0)),
    ("white", (255, 255, 255)),
    ("red", (220, 30, 30)),
    ("green", (20, 150, 50)),
    ("blue", (30, 60, 220)),
    ("yellow", (250, 220, 40)),
    ("orange", (245, 130, 20)),
    ("purple", (130, 40, 160)),
    ("pale blue", (170, 210, 250)),
    ("pink", (250, 160, 200)),
)
COLOUR_NAMES = tuple(name for name, _ in PALETTE)
COLOURS = np.array([rgb for _, rgb in PALETTE], dtype=np.uint8)

#: Every font face: (family index, weight, slant, file name in matplotlib's ttf folder).
FACES = (
    (0, 0, 0, "DejaVuSans.ttf"),
    (0, 1, 0, "DejaVuSans-Bold.ttf"),
    (0, 0, 1, "DejaVuSans-Oblique.ttf"),
    (0, 1, 1, "DejaVuSans-BoldOblique.ttf"),
    (1, 0, 0, "DejaVuSansMono.ttf"),
    (1, 1, 0, "DejaVuSansMono-Bold.ttf"),
    (1, 0, 1, "DejaVuSansMono-Oblique.ttf"),
    (1, 1, 1, "DejaVuSansMono-BoldOblique.ttf"),
    (2, 0, 0, "DejaVuSerif.ttf"),
    (2, 1, 0, "DejaVuSerif-Bold.ttf"),
    (2, 0, 1, "DejaVuSerif-Italic.ttf"),
    (2, 1, 1, "DejaVuSerif-BoldItalic.ttf"),
    (3, 0, 0, "STIXGeneral.ttf"),
    (3, 1, 0, "STIXGeneralBol.ttf"),
    (3, 0, 1, "STIXGeneralItalic.ttf"),
    (3, 1, 1, "STIXGeneralBolIta.ttf"),
    (4, 0, 0, "cmr10.ttf"),
    (4, 1, 0, "cmb10.ttf"),
    (4, 0, 1, "cmti10.ttf"),
    (5, 0, 0, "cmss10.ttf"),
    (6, 0, 0, "cmtt10.ttf"),
)
#: Families whose fonts have the Greek letters (DejaVu and STIX; Computer Modern maps none).
GREEK_FAMILIES = (0, 1, 2, 3)
ATTRIBUTES = ("family", "weight", "slant", "colour", "background", "size", "rotation", "dx", "dy")
SPLITS = {"train": 50_000, "test": 10_000, "concepts": 10_000}


@dataclass
class Glyphs:
    """Rendered glyphs: ``images`` uint8 ``(N, 32, 32, 3)``, ``labels`` indices into
    :data:`CHARACTERS`, and one integer array per name in :data:`ATTRIBUTES`."""

    images: np.ndarray
    labels: np.ndarray
    attributes: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.labels)

    def captions(self) -> list[str]:
        """The caption of every image (:func:`caption`)."""
        return [caption(int(c), self.attribute_row(i)) for i, c in enumerate(self.labels)]

    def attribute_row(self, i: int) -> dict[str, int]:
        """The attributes of image ``i`` as a dict of ints."""
        return {name: int(values[i]) for name, values in self.attributes.items()}


def caption(label: int, attributes: dict[str, int]) -> str:
    """The English caption of a glyph: article, size, colour, weight and slant (named only when
    bold or italic), family, kind and character, background. E.g. ``caption`` of a large red
    bold upright serif "G" on pale blue is "a large red bold serif capital G on a pale blue
    background"."""
    char = CHARACTERS[label]
    if char in string.digits:
        kind = "digit"
    elif char in GREEK:
        kind = "Greek capital" if char.isupper() else "Greek letter"
    else:
        kind = "capital" if char.isupper() else "letter"
    words = [
        SIZES[attributes["size"]][0],
        COLOUR_NAMES[attributes["colour"]],
        *(["bold"] if attributes["weight"] else []),
        *(["italic"] if attributes["slant"] else []),
        FAMILIES[attributes["family"]],
        kind,
        char,
        "on",
        _article(COLOUR_NAMES[attributes["background"]]),
        COLOUR_NAMES[attributes["background"]],
        "background",
    ]
    return f"{_article(words[0])} {' '.join(words)}"


def _article(word: str) -> str:
    """The indefinite article of ``word``: "an" before a vowel, else "a"."""
    return "an" if word[0] in "aeiou" else "a"


def contrast_ratio(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """WCAG 2 contrast ratio ``(L1 + 0.05) / (L2 + 0.05)`` of sRGB colours (``L1 >= L2`` their
    relative luminances), broadcast over leading axes."""

    def luminance(rgb: np.ndarray) -> np.ndarray:
        c = np.asarray(rgb, dtype=np.float64) / 255.0
        linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
        return linear @ np.array([0.2126, 0.7152, 0.0722])

    la, lb = luminance(a), luminance(b)
    return (np.maximum(la, lb) + 0.05) / (np.minimum(la, lb) + 0.05)


#: Allowed (colour, background) index pairs: distinct colours with enough contrast.
COLOUR_PAIRS = np.argwhere(contrast_ratio(COLOURS[:, None], COLOURS[None, :]) >= MIN_CONTRAST)


def font_folder() -> Path:
    """matplotlib's folder of TrueType fonts."""
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


@cache
def _font(face: int, size: int):
    """The Pillow font of ``FACES[face]`` at ``size`` pixels (cached)."""
    from PIL import ImageFont

    return ImageFont.truetype(str(font_folder() / FACES[face][3]), size)


@cache
def _mask(char: str, face: int, size: int) -> np.ndarray:
    """Coverage in ``[0, 1]`` of ``char`` in ``FACES[face]`` at font size ``size`` (in 32x32
    pixels), drawn at :data:`SUPERSAMPLE` times the resolution with its ink box centred."""
    from PIL import Image, ImageDraw

    side = RESOLUTION * SUPERSAMPLE
    font = _font(face, size * SUPERSAMPLE)
    left, top, right, bottom = font.getbbox(char)
    canvas = Image.new("L", (side, side), 0)
    origin = ((side - (right - left)) / 2 - left, (side - (bottom - top)) / 2 - top)
    ImageDraw.Draw(canvas).text(origin, char, fill=255, font=font)
    return np.asarray(canvas, dtype=np.float32) / 255.0


def sample_attributes(n: int, rng: np.random.Generator, split: str) -> tuple[np.ndarray, dict]:
    """``(labels, attributes)`` of ``n`` glyphs of ``split`` drawn from ``rng``.

    ``train``/``test``: a Latin character or digit, uniformly; a family other than typewriter,
    uniformly, then one of its faces uniformly. ``concepts``: half Latin characters in the
    typewriter family, half Greek letters in the families that have them. In all splits the
    (colour, background) pair is uniform over :data:`COLOUR_PAIRS`, and size, rotation and shift
    uniform over their ranges.
    """
    families = np.array([f for f, *_ in FACES])
    counts = np.bincount(families, minlength=len(FAMILIES))
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    if split == "concepts":
        greek = rng.random(n) < 0.5
        labels = np.where(
            greek,
            len(LATIN) + rng.integers(0, len(GREEK), n),
            rng.integers(0, len(LATIN), n),
        )
        family = np.where(
            greek, np.array(GREEK_FAMILIES)[rng.integers(0, len(GREEK_FAMILIES), n)],
            HELD_OUT_FAMILY,
        )  # fmt: skip
    else:
        labels = rng.integers(0, len(LATIN), n)
        family = rng.integers(0, HELD_OUT_FAMILY, n)
    face = starts[family] + (rng.random(n) * counts[family]).astype(np.int64)
    pair = COLOUR_PAIRS[rng.integers(0, len(COLOUR_PAIRS), n)]
    attributes = {
        "family": family,
        "weight": np.array([w for _, w, _, _ in FACES])[face],
        "slant": np.array([s for _, _, s, _ in FACES])[face],
        "colour": pair[:, 0],
        "background": pair[:, 1],
        "size": rng.integers(0, len(SIZES), n),
        "rotation": rng.integers(-MAX_ROTATION, MAX_ROTATION + 1, n),
        "dx": rng.integers(-MAX_SHIFT, MAX_SHIFT + 1, n),
        "dy": rng.integers(-MAX_SHIFT, MAX_SHIFT + 1, n),
    }
    return labels, {k: v.astype(np.int16) for k, v in attributes.items()}


def face_index(family: int, weight: int, slant: int) -> int:
    """The index in :data:`FACES` of a family's face; a missing face is a :class:`UserError`."""
    for i, (f, w, s, _) in enumerate(FACES):
        if (f, w, s) == (family, weight, slant):
            return i
    raise UserError(
        f"the {FAMILIES[family]} family has no {('regular', 'bold')[weight]} "
        f"{('upright', 'italic')[slant]} face"
    )


def render(labels: np.ndarray, attributes: dict[str, np.ndarray], chunk: int = 8192) -> np.ndarray:
    """uint8 images ``(N, 32, 32, 3)`` of the glyphs ``labels`` (indices into
    :data:`CHARACTERS`) with ``attributes`` (see the module docstring), ``chunk`` at a time.

    The supersampled mask of each (character, face, size) is rotated by ``rotation`` degrees
    about the centre and shifted by ``(dx, dy)`` pixels (bilinear ``grid_sample``, zeros outside),
    averaged 2x2 down to 32x32, and blends ``background + mask * (colour - background)``.
    """
    labels = np.asarray(labels)
    n = len(labels)
    faces = np.array(
        [face_index(int(f), int(w), int(s)) for f, w, s in
         zip(attributes["family"], attributes["weight"], attributes["slant"], strict=True)]
    ) if n else np.zeros(0, dtype=np.int64)  # fmt: skip
    sizes = np.asarray(attributes["size"])
    keys = np.stack([labels, faces, sizes], 1) if n else np.zeros((0, 3), dtype=np.int64)
    unique, which = np.unique(keys, axis=0, return_inverse=True)
    masks = torch.from_numpy(
        np.stack([_mask(CHARACTERS[c], int(f), SIZES[s][1]) for c, f, s in unique])
        if len(unique)
        else np.zeros((0, RESOLUTION * SUPERSAMPLE, RESOLUTION * SUPERSAMPLE), np.float32)
    )
    angle = torch.from_numpy(np.deg2rad(np.asarray(attributes["rotation"], dtype=np.float64)))
    # affine_grid maps output coordinates in [-1, 1] to input ones: the inverse of the motion.
    cos, sin = torch.cos(angle), torch.sin(angle)
    shift = 2.0 / RESOLUTION
    tx = -torch.from_numpy(np.asarray(attributes["dx"], dtype=np.float64)) * shift
    ty = -torch.from_numpy(np.asarray(attributes["dy"], dtype=np.float64)) * shift
    theta = torch.stack(
        [torch.stack([cos, sin, cos * tx + sin * ty], 1),
         torch.stack([-sin, cos, -sin * tx + cos * ty], 1)], 1
    ).float()  # fmt: skip
    fg = torch.from_numpy(COLOURS[np.asarray(attributes["colour"])].astype(np.float32))
    bg = torch.from_numpy(COLOURS[np.asarray(attributes["background"])].astype(np.float32))
    which_t = torch.from_numpy(np.asarray(which).reshape(-1))
    out = np.empty((n, RESOLUTION, RESOLUTION, 3), dtype=np.uint8)
    side = RESOLUTION * SUPERSAMPLE
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        m = masks[which_t[lo:hi]].unsqueeze(1)
        grid = F.affine_grid(theta[lo:hi], [hi - lo, 1, side, side], align_corners=False)
        m = F.grid_sample(m, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        m = F.avg_pool2d(m, SUPERSAMPLE).permute(0, 2, 3, 1)
        pixels = bg[lo:hi, None, None] + m * (fg[lo:hi, None, None] - bg[lo:hi, None, None])
        out[lo:hi] = pixels.round().clamp(0, 255).to(torch.uint8).numpy()
    return out


def generate(split: str, n: int, seed: int = 0) -> Glyphs:
    """``n`` glyphs of ``split`` (``train``, ``test`` or ``concepts``) from ``seed``; each split
    draws from its own stream ``default_rng([seed, k])``, so the splits differ for one seed."""
    if split not in SPLITS:
        raise UserError(f"unknown glyphs split {split!r}: choose {', '.join(SPLITS)}")
    rng = np.random.default_rng([seed, list(SPLITS).index(split)])
    labels, attributes = sample_attributes(n, rng, split)
    return Glyphs(render(labels, attributes), labels.astype(np.int16), attributes)


def cache_path(split: str, n: int, seed: int, cache_dir: str | Path | None = None) -> Path:
    """Where :func:`glyphs_dataset` keeps a split:
    ``<cache_dir>/glyphs_v<CACHE_VERSION>_<split>_n<n>_seed<seed>.npz``."""
    return cache_folder(cache_dir) / f"glyphs_v{CACHE_VERSION}_{split}_n{n}_seed{seed}.npz"


def glyphs_dataset(
    split: str = "train", seed: int = 0, n: int | None = None, cache_dir: str | Path | None = None
) -> Glyphs:
    """The glyphs of ``split`` (``n`` defaults to :data:`SPLITS`: 50,000 train, 10,000 test and
    10,000 held-out ``concepts``), read from the cache (:func:`cache_path`), or generated and
    cached atomically when the file is missing or unreadable (with a warning when unreadable)."""
    if split not in SPLITS:
        raise UserError(f"unknown glyphs split {split!r}: choose {', '.join(SPLITS)}")
    n = SPLITS[split] if n is None else n
    path = cache_path(split, n, seed, cache_dir)
    if path.exists():
        try:
            with np.load(path, allow_pickle=False) as f:
                glyphs = Glyphs(f["images"], f["labels"], {k: f[k] for k in ATTRIBUTES})
            if glyphs.images.shape != (n, RESOLUTION, RESOLUTION, 3):
                raise ValueError(f"images of shape {glyphs.images.shape}")
            return glyphs
        except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as e:
            warnings.warn(f"regenerating the glyphs: cannot read {path} ({e})", stacklevel=2)
    glyphs = generate(split, n, seed)
    write_atomically(
        path,
        lambda f: np.savez_compressed(
            f, images=glyphs.images, labels=glyphs.labels, **glyphs.attributes
        ),
    )
    return glyphs
