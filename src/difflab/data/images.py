"""Continuous training data: 8x8 digits, 2-D toy distributions, image folders, array files.

Every loader returns an :class:`ArrayData`: ``x`` as float32 in ``[-1, 1]`` (images
``(N, C, H, W)``, vectors ``(N, D)``) and optional integer ``labels``. Image data lies on the
8-bit grid ``x = 2 k / 255 - 1``, ``k in 0..255``, which the bound's discretized decoder assumes.
"""

from __future__ import annotations

import math
import warnings
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from difflab.data.glyphs import LATIN, glyphs_dataset
from difflab.errors import UserError
from difflab.files import file_error

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

TOYS = ("moons", "swissroll", "8gaussians", "checkerboard")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@dataclass
class ArrayData:
    """A dataset held in memory: ``x`` in ``[-1, 1]`` and optional ``labels`` in ``0..K-1``."""

    x: Tensor
    labels: Tensor | None = None
    class_names: list[str] | None = None

    @property
    def num_classes(self) -> int | None:
        return None if self.class_names is None else len(self.class_names)

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of one example."""
        return tuple(self.x.shape[1:])

    def __len__(self) -> int:
        return self.x.shape[0]

    def split(self, held_out: float, seed: int = 0) -> tuple[ArrayData, ArrayData]:
        """A fixed random ``(train, held_out)`` split, stratified by label when there are labels
        (scikit-learn's ``train_test_split`` with ``random_state=seed``). ``held_out`` is the
        fraction held out, ``ceil(held_out * N)`` examples; splits that leave no training
        example, or that cannot keep every class on both sides, are a :class:`UserError`."""
        from sklearn.model_selection import train_test_split

        if not 0.0 <= held_out < 1.0:
            raise UserError(f"data.held_out must be in [0, 1), got {held_out}")
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
            raise UserError(f"data.split_seed must be an integer in 0..2**32-1, got {seed!r}")
        if held_out == 0.0:
            return self, self._take(torch.zeros(0, dtype=torch.long))
        n = len(self)
        n_test = math.ceil(held_out * n)
        if n - n_test < 1:
            raise UserError(
                f"data.held_out={held_out} holds out {n_test} of the {n} examples and leaves "
                "none to train on: lower data.held_out (0 holds out nothing)"
            )
        stratify = None if self.labels is None else self.labels.numpy()
        if self.labels is not None:
            self._check_stratifiable(self.labels, held_out, n_test)
        train, test = train_test_split(
            np.arange(n), test_size=n_test, stratify=stratify, random_state=seed
        )
        return self._take(torch.from_numpy(train)), self._take(torch.from_numpy(test))

    def _check_stratifiable(self, labels: Tensor, held_out: float, n_test: int) -> None:
        """A stratified split puts every class on both sides: each needs two examples, and each
        side at least as many examples as there are classes."""
        counts = torch.bincount(labels)
        present = counts[counts > 0]
        names = self.class_names or [str(k) for k in range(len(counts))]
        if (counts == 1).any():
            lonely = names[int(torch.nonzero(counts == 1)[0])]
            raise UserError(
                f"class {lonely!r} has a single example, which a split stratified by class "
                "cannot put on both sides: add examples or set data.held_out=0"
            )
        n_train = len(self) - n_test
        if min(n_test, n_train) < len(present):
            raise UserError(
                f"data.held_out={held_out} splits the {len(self)} examples into {n_train} to "
                f"train on and {n_test} held out, but each side needs one of each of the "
                f"{len(present)} classes: choose data.held_out so that both sides have at "
                f"least {len(present)}, or 0"
            )

    def _take(self, idx: Tensor) -> ArrayData:
        labels = None if self.labels is None else self.labels[idx]
        return ArrayData(self.x[idx], labels, self.class_names)


def to_8bit_grid(values: np.ndarray, max_value: float) -> Tensor:
    """Map intensities in ``[0, max_value]`` to the 8-bit grid, then to ``[-1, 1]``:
    ``k = round(255 v / max_value)``, ``x = 2 k / 255 - 1``."""
    k = np.rint(np.asarray(values, dtype=np.float64) * (255.0 / max_value))
    return torch.from_numpy(k * (2.0 / 255.0) - 1.0).float()


def digits() -> ArrayData:
    """scikit-learn's 1,797 handwritten digits, ``(N, 1, 8, 8)``, intensities 0..16 put on the
    8-bit grid (``k = round(255 v / 16)``), labels 0..9."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = to_8bit_grid(bunch.images, 16.0).unsqueeze(1)
    labels = torch.from_numpy(bunch.target).long()
    return ArrayData(x, labels, [str(d) for d in range(10)])


def digits_split(held_out: float = 0.2, seed: int = 0) -> tuple[ArrayData, ArrayData]:
    """The fixed, class-stratified train / held-out split of the digits (1,437 / 360 by default)
    used by training, evaluation, the digits classifier and the benchmarks."""
    return digits().split(held_out, seed)


# ---------------------------------------------------------------- 2-D toys


def toy_2d(name: str, n: int = 10_000, seed: int = 0) -> ArrayData:
    """2-D toy distributions, standardised to roughly unit scale: ``moons``, ``swissroll``,
    ``8gaussians``, ``checkerboard``."""
    rng = np.random.default_rng(seed)
    if name == "moons":
        from sklearn.datasets import make_moons

        pts, _ = make_moons(n, noise=0.05, random_state=seed)
        pts = (pts - [0.5, 0.25]) / [0.87, 0.5]
    elif name == "swissroll":
        from sklearn.datasets import make_swiss_roll

        pts3, _ = make_swiss_roll(n, noise=0.5, random_state=seed)
        pts = pts3[:, [0, 2]] / 7.5
    elif name == "8gaussians":
        angles = 2 * math.pi * rng.integers(0, 8, n) / 8
        centres = np.stack([np.cos(angles), np.sin(angles)], 1) * 1.5
        pts = centres + 0.1 * rng.standard_normal((n, 2))
    elif name == "checkerboard":
        x1 = rng.uniform(-2, 2, n)
        x2 = rng.uniform(0, 1, n) + rng.integers(0, 2, n) * 2 - 2 + (np.floor(x1) % 2)
        pts = np.stack([x1, x2], 1) / 1.15
    else:
        raise UserError(
            f"unknown toy {name!r}: choose moons, swissroll, 8gaussians or checkerboard"
        )
    return ArrayData(torch.from_numpy(np.asarray(pts)).float())


# ---------------------------------------------------------------- files

#: Pillow modes read as one grey channel (after an opaque alpha channel is dropped).
GREY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N"}
#: Pillow modes read through RGB.
COLOUR_MODES = {"RGB", "RGBX", "RGBA", "RGBa", "P", "PA", "CMYK", "YCbCr", "HSV"}
SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N"}
ALPHA_MODES = {"LA", "La", "PA", "RGBA", "RGBa"}


def image_files(root: Path) -> list[Path]:
    """The image files under ``root``, in the order :func:`image_folder` reads them."""
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


def image_folder(path: str | Path, image_size: int | None = None, channels: int = 0) -> ArrayData:
    """Every image under ``path``; labels from first-level sub-folder names when there are any.

    Each image is scaled to ``[0, 1]`` at its own bit depth (8-bit values / 255, 16-bit ones
    / 65535; palette, CMYK, YCbCr and HSV images through RGB; an alpha channel is dropped when
    every pixel is opaque, and an image with transparent pixels is refused), resized (bicubic)
    to a square of side ``image_size`` when given, and put on the 8-bit grid. Without
    ``image_size`` all images must share one size. ``channels`` forces 1 (grey, ITU-R 601 luma)
    or 3 (RGB); 0 keeps grey if every image is grey. Images whose range is unknown (floats,
    32-bit integers) are refused: nothing is clipped silently.
    """
    from PIL import Image

    if image_size is not None and (
        isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1
    ):
        raise UserError(f"data.image_size must be a positive integer, got {image_size!r}")
    if image_size is not None and image_size**2 > (Image.MAX_IMAGE_PIXELS or math.inf):
        raise UserError(
            f"data.image_size={image_size} asks for images of {image_size**2:,} pixels, more "
            f"than difflab reads safely ({Image.MAX_IMAGE_PIXELS:,}, as for image files)"
        )
    if channels not in (0, 1, 3):
        raise UserError(f"channels must be 0 (as the images are), 1 or 3, got {channels!r}")
    root = Path(path)
    if not root.exists():
        raise UserError(f"image folder {root} does not exist")
    if not root.is_dir():
        raise UserError(f"{root} is not a folder")
    files = image_files(root)
    if not files:
        raise UserError(
            f"image folder {root} contains no images ({', '.join(sorted(IMAGE_SUFFIXES))})"
        )
    subdirs = sorted(
        {p.relative_to(root).parts[0] for p in files if len(p.relative_to(root).parts) > 1}
    )
    labelled = bool(subdirs) and all(len(p.relative_to(root).parts) > 1 for p in files)
    arrays = [_image_on_8bit_grid(p, image_size, grey=channels == 1) for p in files]
    sizes = sorted({f"{a.shape[2]}x{a.shape[1]}" for a in arrays})
    if len(sizes) > 1:
        raise UserError(
            f"images in {root} have mixed sizes ({', '.join(sizes[:3])}): "
            "set data.image_size to resize them"
        )
    if channels == 3 or any(a.shape[0] == 3 for a in arrays):
        arrays = [np.repeat(a, 3, axis=0) if a.shape[0] == 1 else a for a in arrays]
    x = to_8bit_grid(np.stack(arrays), 255.0)
    if not labelled:
        return ArrayData(x)
    labels = torch.tensor([subdirs.index(p.relative_to(root).parts[0]) for p in files])
    return ArrayData(x, labels, subdirs)


def _image_on_8bit_grid(p: Path, image_size: int | None, grey: bool) -> np.ndarray:
    """``(C, H, W)`` uint8 levels ``k = round(255 v)`` of the image file ``p`` (``C`` is 1 for
    grey images or when ``grey``, else 3), resized first when ``image_size`` is given."""
    from PIL import Image

    v = _intensities(_open_image(p), p)
    if grey and v.shape[0] == 3:
        v = np.tensordot(np.array([0.299, 0.587, 0.114]), v, axes=1)[None]
    if image_size is not None and v.shape[1:] != (image_size, image_size):
        size, bicubic = (image_size, image_size), Image.Resampling.BICUBIC
        v = np.stack([np.asarray(Image.fromarray(c.astype(np.float32)).resize(size, bicubic))
                      for c in v])  # fmt: skip
        v = np.clip(v, 0.0, 1.0)  # bicubic overshoots near edges, as in 8-bit resizing
    return np.rint(v * 255.0).astype(np.uint8)


def _open_image(p: Path) -> PILImage:
    """The decoded image file ``p``; unreadable, oversized or denied files are a UserError."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            # Pillow warns above MAX_IMAGE_PIXELS and fails above twice that: refuse both.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(p) as im:
                im.load()
                return im
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise UserError(f"image {p} is too large to read safely: {e}") from None
    except PermissionError as e:
        raise file_error(e, p) from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise UserError(f"cannot read image {p}: {e}") from None


def _intensities(im: PILImage, p: Path) -> np.ndarray:
    """``(C, H, W)`` float intensities in ``[0, 1]`` of a Pillow image at its own bit depth
    (``C`` is 1 for grey modes, 3 for colour ones), or a UserError naming ``p``."""
    fmt = im.format
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ALPHA_MODES:
        if np.asarray(im.getchannel(len(im.getbands()) - 1)).min() < 255:
            raise UserError(
                f"image {p} has transparent pixels, which difflab will not composite onto a "
                "guessed background: flatten it (or the folder) onto the background you want"
            )
        im = im.getchannel(0) if im.mode in GREY_MODES else im.convert("RGB")
    if im.mode in ("1", "L"):
        return np.asarray(im.convert("L"), dtype=np.float64)[None] / 255.0
    if im.mode in SIXTEEN_BIT_MODES or (im.mode == "I" and fmt == "PNG"):  # PNG: at most 16 bits
        return np.asarray(im, dtype=np.float64)[None] / 65535.0
    if im.mode in COLOUR_MODES:
        return np.asarray(im.convert("RGB"), dtype=np.float64).transpose(2, 0, 1) / 255.0
    kind = {"F": "floating-point values", "I": "32-bit integers"}.get(im.mode, "values")
    raise UserError(
        f"image {p} holds {kind} (Pillow mode {im.mode}) whose range difflab cannot know: "
        "save it as an 8- or 16-bit grey or RGB image"
    )


def array_file(path: str | Path) -> ArrayData:
    """A ``.npy`` array of examples, or an ``.npz`` with ``x`` (and optionally ``labels`` or ``y``).

    Values must already lie in ``[-1, 1]`` (float) or be ``uint8`` (mapped to the 8-bit grid);
    labels are integers ``0..K-1`` with ``K`` at most the number of examples.
    """
    p = Path(path)
    if not p.is_file():
        raise UserError(f"array file {p} does not exist")
    try:
        with open(p, "rb") as f:
            magic = f.read(6)
    except OSError as e:
        raise file_error(e, p) from None
    if magic != b"\x93NUMPY" and not magic.startswith(b"PK\x03\x04"):
        raise UserError(f"{p} is not a NumPy array file (.npy, or .npz holding an array 'x')")
    try:
        loaded = np.load(p, allow_pickle=False)
        if isinstance(loaded, np.ndarray):
            arr, labels = loaded, None
        else:
            with loaded:
                names = loaded.files
                if "x" not in names:
                    raise UserError(f"{p} has no array named 'x' (found {', '.join(names)})")
                arr = loaded["x"]
                label_name = next((n for n in ("labels", "y") if n in names), None)
                labels = None if label_name is None else loaded[label_name]
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise UserError(f"cannot read array file {p}: {e}") from None
    x = _examples(arr, p)
    if labels is None:
        return ArrayData(x)
    y = _class_indices(labels, len(x), p)
    return ArrayData(x, y, [str(i) for i in range(int(y.max()) + 1)])


def _examples(arr: np.ndarray, p: Path) -> Tensor:
    """``x`` of an array file in ``[-1, 1]``: uint8 on the 8-bit grid, or floats already there."""
    if arr.ndim < 2 or arr.size == 0:
        raise UserError(f"{p} must hold a non-empty array of shape (N, ...), got {arr.shape}")
    if arr.dtype == np.uint8:
        return to_8bit_grid(arr, 255.0)
    if arr.dtype.kind != "f":
        kind = "complex" if arr.dtype.kind == "c" else str(arr.dtype)
        raise UserError(f"{p} holds {kind} values: expected floats in [-1, 1] or uint8 pixels")
    if not np.isfinite(arr).all() or np.abs(arr).max() > 1.0 + 1e-6:
        raise UserError(f"{p}: float data must be finite and lie in [-1, 1]")
    return torch.from_numpy(np.asarray(arr, dtype=np.float32))


def _class_indices(labels: np.ndarray, n: int, p: Path) -> Tensor:
    """Labels as class indices ``0..K-1`` with ``K <= n`` (so a stray huge value cannot make
    an embedding table of that size), one per example."""
    if labels.dtype.kind not in "iu":
        raise UserError(f"{p}: labels must be integer class indices, got {labels.dtype} values")
    if labels.shape != (n,):
        raise UserError(f"{p}: labels must be one per example, shape ({n},), got {labels.shape}")
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= n:
        raise UserError(
            f"{p}: labels must be class indices 0..K-1 with K at most the {n} examples, "
            f"got values in {low}..{high}"
        )
    return torch.from_numpy(labels.astype(np.int64))


def glyphs() -> ArrayData:
    """The 50,000 training glyphs of :mod:`difflab.data.glyphs` (seed 0, cached),
    ``(N, 3, 32, 32)`` on the 8-bit grid, labelled by character (class names the 62 digits and
    Latin letters)."""
    data = glyphs_dataset("train")
    # 2 k / 255 - 1 in float32 directly: to_8bit_grid's float64 copy would take 1.2 GB here.
    x = torch.from_numpy(data.images).permute(0, 3, 1, 2).float().mul_(2.0 / 255.0).sub_(1.0)
    return ArrayData(x, torch.from_numpy(data.labels.astype(np.int64)), list(LATIN))


def load_dataset(name: str, path: str | None = None, image_size: int | None = None) -> ArrayData:
    """Resolve ``data.name`` of a config: ``digits``, ``glyphs``, a toy name, ``folder`` or
    ``array``; ``path`` and ``image_size`` given to a dataset that does not read them are
    refused."""
    if name not in ("digits", "glyphs", *TOYS, "folder", "array"):
        raise UserError(
            f"unknown dataset {name!r}: choose digits, glyphs, {', '.join(TOYS)}, "
            "folder (data.path=DIR) or array (data.path=FILE.npy|.npz)"
        )
    if image_size is not None and name != "folder":
        raise UserError(f"data.image_size resizes folder images only; data.name={name} has none")
    if name in ("folder", "array") and not path:
        raise UserError(f"data.name={name} needs data.path")
    if path and name not in ("folder", "array"):
        raise UserError(f"data.path is read by folder and array data only, not data.name={name}")
    if name == "digits":
        return digits()
    if name == "glyphs":
        return glyphs()
    if name in TOYS:
        return toy_2d(name)
    return image_folder(path, image_size) if name == "folder" else array_file(path)
