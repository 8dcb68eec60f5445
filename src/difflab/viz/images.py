"""Pictures: sample grids (PNG), one PNG per sample, reverse-process animations (GIF) and loss
curves (PNG), each file written whole or not at all (:func:`difflab.files.write_atomically`)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from difflab.files import make_folder, write_atomically


def to_uint8(x: Tensor) -> np.ndarray:
    """``[-1, 1]`` images ``(N, C, H, W)`` to ``uint8`` ``(N, H, W, C)``."""
    x = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def grid_array(x: Tensor, nrow: int, scale: int = 1, pad: int = 1) -> np.ndarray:
    """Tile ``(N, C, H, W)`` images into rows of ``nrow`` with ``pad`` pixels of grey between,
    each pixel enlarged ``scale`` times (nearest), as a ``uint8`` array ``(H', W', C)``."""
    imgs = to_uint8(x)
    n, h, w, c = imgs.shape
    rows = (n + nrow - 1) // nrow
    out = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 128, np.uint8)
    for i, im in enumerate(imgs):
        r, col = divmod(i, nrow)
        out[pad + r * (h + pad) : pad + r * (h + pad) + h,
            pad + col * (w + pad) : pad + col * (w + pad) + w] = im  # fmt: skip
    if scale > 1:
        out = out.repeat(scale, 0).repeat(scale, 1)
    return out


def _image(arr: np.ndarray) -> Image.Image:
    return Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)


def save_grid(x: Tensor, path: str | Path, nrow: int, scale: int = 4) -> Path:
    """Save a grid of images as PNG (one row per ``nrow`` images)."""
    image = _image(grid_array(x, nrow, scale))
    return write_atomically(path, lambda f: image.save(f, format="PNG"))


def save_images(x: Tensor, folder: str | Path) -> list[Path]:
    """Save each image of ``(N, C, H, W)`` in ``[-1, 1]`` as its own 8-bit PNG
    ``folder/000000.png``, ... (the layout FID tools such as clean-fid read)."""
    make_folder(folder)
    paths = []
    for i, arr in enumerate(to_uint8(x)):
        image = _image(arr)
        paths.append(write_atomically(Path(folder) / f"{i:06d}.png",
                                      lambda f, im=image: im.save(f, format="PNG")))  # fmt: skip
    return paths


def save_animation(
    frames: list[tuple[Tensor, Tensor]], path: str | Path, scale: int = 4, ms: int = 80
) -> Path:
    """An animated GIF of the reverse process: each frame shows a row of ``x_t`` above a row of
    the current ``x_0`` estimate; the last frame is held for a second."""
    images = []
    for x_t, x0 in frames:
        both = torch.cat([x_t, x0.clamp(-1, 1)])
        images.append(_image(grid_array(both, nrow=x_t.shape[0], scale=scale)))
    durations = [ms] * (len(images) - 1) + [1000]
    return write_atomically(
        path,
        lambda f: images[0].save(
            f, format="GIF", save_all=True, append_images=images[1:], duration=durations, loop=0
        ),
    )


def save_loss_curve(log_csv: str | Path, path: str | Path) -> Path:
    """Plot the training loss log (``step,loss,...`` CSV) on a log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(log_csv) as f:
        rows = list(csv.DictReader(f))
    steps = [int(r["step"]) for r in rows]
    losses = [float(r["loss"]) for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot(steps, losses, lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    try:
        return write_atomically(path, lambda f: fig.savefig(f, format="png"))
    finally:
        plt.close(fig)
