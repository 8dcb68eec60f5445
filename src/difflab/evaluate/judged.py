"""Image quality of generated digits or glyphs as the built-in judges see it: the one way
difflab measures its image models (benchmarks, ``difflab eval`` of the latent recipe).

:func:`judged_quality` takes generated images in the data's own convention (``(N, C, H, W)`` in
``[-1, 1]``: ``(N, 1, 8, 8)`` digits, ``(N, 3, 32, 32)`` glyphs) and returns

- ``fd``: the Frechet distance (:mod:`difflab.evaluate.frechet`) between the judge's features of
  the images and those of ``reference_n`` real held-out images (the digits' held-out split of
  :func:`~difflab.data.images.digits_split`, the glyphs' ``test`` split);
- ``fd_floor``: the same distance from ``n`` real *training* images (a seeded random subset, the
  same ``n`` as the images judged, since the plug-in FD is biased upward by O(dim / n)) to the
  same reference: what a perfect model would score at this ``n``; ``fd_ratio = fd / fd_floor``;
- ``accuracy``: with intended class ``labels``, the share of images the judge reads as their
  label (the digit; the glyph's character, one of the 62 Latin classes), next to
  ``accuracy_real``, the judge's accuracy on the real reference images (its own ceiling).

The judges are :mod:`difflab.evaluate.digits_classifier` (64-d features) and
:mod:`difflab.evaluate.glyphs_judge` (128-d features), loaded from their caches (trained on
first use: seconds for digits, about two minutes on 2 cores for glyphs). The reference
statistics and floors are kept in memory for the process, so repeated calls cost only the
images' own features.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import torch
from torch import Tensor, nn

from difflab.evaluate.frechet import feature_statistics, frechet_distance

#: The data sets with a judge, and the shape of one image of each.
SHAPES = {"digits": (1, 8, 8), "glyphs": (3, 32, 32)}
#: Images read by a judge per batch.
CHUNK = 2048


@cache
def judge(data: str) -> nn.Module:
    """The judge of ``data`` (``digits``: the digits classifier; ``glyphs``: the glyphs judge)."""
    _check_data(data)
    if data == "digits":
        from difflab.evaluate.digits_classifier import load_digits_classifier

        return load_digits_classifier()
    from difflab.evaluate.glyphs_judge import load_glyphs_judge

    return load_glyphs_judge()


def real_images(
    data: str, split: str, n: int | None = None, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """``(x, labels)`` of real images of ``data`` in ``[-1, 1]``: its ``train`` split or its
    held-out one (any other ``split``); with ``n``, a random subset of ``n`` drawn with ``seed``
    (all of them when there are fewer)."""
    _check_data(data)
    if data == "digits":
        from difflab.data.images import digits_split

        part = digits_split()[0 if split == "train" else 1]
        images, labels = part.x, part.labels
    else:
        from difflab.data.glyphs import glyphs_dataset

        glyphs = glyphs_dataset("train" if split == "train" else "test")
        images, labels = glyphs.images, torch.from_numpy(glyphs.labels.astype("int64"))
    pick = torch.arange(len(labels))
    if n is not None:
        pick = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))[:n]
    if data == "digits":
        return images[pick], labels[pick]
    from difflab.evaluate.glyphs_judge import glyphs_to_tensor

    return glyphs_to_tensor(images[pick.numpy()]), labels[pick]


def read(data: str, x: Tensor) -> tuple[Tensor, Tensor]:
    """The judge's features ``(N, D)`` and class predictions ``(N,)`` of images ``x`` (clamped
    to ``[-1, 1]``), read in batches of :data:`CHUNK`."""
    _check_data(data)
    if x.ndim != 4 or tuple(x.shape[1:]) != SHAPES[data]:
        shape = "(N, " + ", ".join(map(str, SHAPES[data])) + ")"
        raise ValueError(f"{data} images must have shape {shape}, got {tuple(x.shape)}")
    net = judge(data)
    head = net.heads["character"] if data == "glyphs" else net.head
    features, classes = [], []
    with torch.inference_mode():
        for part in x.detach().split(CHUNK):
            f = net.features(part.float().clamp(-1, 1))
            features.append(f.cpu())
            classes.append(head(f).argmax(dim=1).cpu())
    return torch.cat(features), torch.cat(classes)


@cache
def _reference(data: str, reference_n: int | None) -> tuple[Tensor, Tensor, float, int]:
    """Mean and covariance of the judge's features of the first ``reference_n`` held-out
    images (all when ``None``), the judge's accuracy on them, and their number."""
    x, labels = real_images(data, "held-out")
    if reference_n is not None:
        if not 2 <= reference_n <= len(x):
            raise ValueError(f"reference_n must be in 2..{len(x)} for {data}, got {reference_n}")
        x, labels = x[:reference_n], labels[:reference_n]
    features, classes = read(data, x)
    mu, cov = feature_statistics(features)
    return mu, cov, float((classes == labels).double().mean()), len(x)


@cache
def _floor(data: str, n: int, reference_n: int | None, seed: int) -> tuple[float, int]:
    """FD from ``n`` real training images (a random subset drawn with ``seed``; all of them
    when there are fewer) to the reference, and the number used."""
    x, _ = real_images(data, "train", n, seed)
    mu, cov, _, _ = _reference(data, reference_n)
    features, _ = read(data, x)
    return frechet_distance(*feature_statistics(features), mu, cov), len(x)


def judged_quality(
    x: Tensor,
    data: str = "glyphs",
    labels: Tensor | None = None,
    reference_n: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """The judged quality of generated images ``x`` of ``data`` (``digits`` or ``glyphs``).

    ``labels``: the intended class of each image (indices into the data's classes) for the
    judge's accuracy; ``reference_n``: how many held-out real images form the reference (default
    all: 360 digits, 10,000 glyphs); ``seed`` picks the training images of the floor. Returns
    ``fd``, ``fd_floor``, ``fd_ratio``, ``accuracy`` (``None`` without labels),
    ``accuracy_real``, ``n``, ``floor_n`` (``n``, or the whole training set when it has fewer
    images) and ``reference_n``. Shapes and labels that do not fit are a ``ValueError``.
    """
    _check_data(data)
    if len(x) < 2:
        raise ValueError(f"a Frechet distance needs at least 2 images, got {len(x)}")
    features, classes = read(data, x)
    mu, cov, accuracy_real, m = _reference(data, reference_n)
    fd = frechet_distance(*feature_statistics(features), mu, cov)
    fd_floor, floor_n = _floor(data, len(x), reference_n, seed)
    accuracy = None
    if labels is not None:
        labels = torch.as_tensor(labels).long().cpu()
        if labels.shape != (len(x),):
            raise ValueError(f"labels must be one per image, shape ({len(x)},), got "
                             f"{tuple(labels.shape)}")  # fmt: skip
        accuracy = float((classes == labels).double().mean())
    return {
        "fd": fd,
        "fd_floor": fd_floor,
        "fd_ratio": fd / fd_floor,
        "accuracy": accuracy,
        "accuracy_real": accuracy_real,
        "n": len(x),
        "floor_n": floor_n,
        "reference_n": m,
    }


def _check_data(data: str) -> None:
    if data not in SHAPES:
        raise ValueError(f"no judge for data {data!r}: choose {' or '.join(SHAPES)}")
