"""What the explorer's pages show: the data sets of the forward-process tab, the exact mixtures
(:class:`~difflab.gaussian.oracles.GaussianMixtureOracle`) of the score and guidance tabs, and
the figure helpers they share.

A known mixture ``x_0 ~ sum_k w_k N(m_k, C_k)`` has every noised marginal in closed form,
``q_t = sum_k w_k N(alpha_t m_k, alpha_t^2 C_k + sigma_t^2 I)`` (seed 002), so the pages draw
``q(z_t)`` and the score exactly for those; the other data sets (2-D toys, digits, glyphs) are
shown through draws of ``x_t = alpha_t x_0 + sigma_t eps``.
"""

from __future__ import annotations

import functools
import io
import math

import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image
from torch import Tensor

from difflab.data.glyphs import generate as generate_glyphs
from difflab.data.images import TOYS, digits, toy_2d
from difflab.errors import UserError
from difflab.gaussian.oracles import GaussianMixtureOracle
from difflab.gaussian.schedules import SCHEDULES, Schedule, make_schedule

#: The 1-D example of seed 001's forward-process figure: two Gaussian bumps.
MIXTURE_1D = "1-D mixture (seed 001)"
#: Eight Gaussians on a ring of radius 1.5 (the ``8gaussians`` toy, known in closed form).
MIXTURE_2D = "2-D mixture (8 Gaussians)"
#: Three overlapping labelled Gaussians: the class-conditional 2-D data of the guidance tab.
CLASSES_2D = "2-D classes (3 Gaussians)"

#: Every data set of the forward-process tab, 1-D and 2-D first.
DATASETS = (MIXTURE_1D, MIXTURE_2D, *(t for t in TOYS if t != "8gaussians"), "digits", "glyphs")


def schedule(name: str) -> Schedule:
    """The schedule ``name`` of :data:`~difflab.gaussian.schedules.SCHEDULES` with its
    default parameters; an unknown name is a :class:`UserError`."""
    if name not in SCHEDULES:
        raise UserError(f"unknown schedule {name!r}: choose one of {', '.join(SCHEDULES)}")
    return make_schedule(name)


def mixture(name: str, sched: Schedule) -> GaussianMixtureOracle:
    """The exact oracle of the known mixture ``name`` under the forward process ``sched``."""
    if name == MIXTURE_1D:
        return GaussianMixtureOracle(
            torch.tensor([[-1.5], [1.0]]), torch.tensor([0.3, 0.5]), torch.tensor([0.4, 0.6]), sched
        )
    if name == MIXTURE_2D:
        angles = torch.arange(8, dtype=torch.float64) * (2 * math.pi / 8)
        means = 1.5 * torch.stack([angles.cos(), angles.sin()], 1)
        return GaussianMixtureOracle(means, 0.1, None, sched)
    if name == CLASSES_2D:
        means = torch.tensor([[-1.0, -0.5], [1.0, -0.5], [0.0, 1.0]])
        return GaussianMixtureOracle(means, torch.tensor([0.45, 0.45, 0.45]), None, sched)
    raise UserError(
        f"{name!r} is not a known mixture: choose one of {MIXTURE_1D}, {MIXTURE_2D}, {CLASSES_2D}"
    )


def data_examples(name: str, n: int, seed: int = 0) -> tuple[Tensor, list[str] | None]:
    """``n`` examples ``x_0`` of the data set ``name`` (float64; images in ``[-1, 1]``) and,
    for images, what each one shows (its class or character)."""
    if name not in DATASETS:
        raise UserError(f"unknown data set {name!r}: choose one of {', '.join(DATASETS)}")
    gen = torch.Generator().manual_seed(seed)
    if name in (MIXTURE_1D, MIXTURE_2D):
        return mixture(name, schedule("cosine")).sample(n, gen), None
    if name == "digits":
        data = _digits()
        idx = torch.randperm(len(data.x), generator=gen)[:n]
        names = data.class_names or []
        return data.x[idx].double(), [names[int(c)] for c in data.labels[idx]]
    if name == "glyphs":
        from difflab.data.glyphs import CHARACTERS

        glyphs = generate_glyphs("test", n, seed)
        x = torch.from_numpy(glyphs.images).permute(0, 3, 1, 2).double() * (2 / 255) - 1
        return x, [CHARACTERS[int(c)] for c in glyphs.labels]
    return toy_2d(name, n, seed).x.double(), None


@functools.lru_cache(maxsize=1)
def _digits():
    """The digits, read once per process."""
    return digits()


# ---------------------------------------------------------------- figures


def new_figure(width: float, height: float) -> Figure:
    """A matplotlib figure drawn off-screen (no pyplot state, so requests never share one),
    with fixed margins (a layout engine would double the time to draw it)."""
    fig = Figure(figsize=(width, height), dpi=80)
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.13, top=0.9, wspace=0.3, hspace=0.35)
    return fig


def figure_image(fig: Figure) -> Image.Image:
    """The figure rendered as a PNG picture."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def image_panel(ax, x: Tensor, title: str) -> None:
    """One ``(C, H, W)`` image in ``[-1, 1]`` (clipped) on the axes ``ax``."""
    pixels = ((x.detach().double().cpu().clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()
    if pixels.shape[2] == 1:
        ax.imshow(pixels[..., 0], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    else:
        ax.imshow(pixels, interpolation="nearest")
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])


def log_snr_panel(ax, sched: Schedule, t: float) -> None:
    """``lambda(t) = log(alpha^2 / sigma^2)`` over ``t in (0, 1]`` with the current ``t``."""
    ts = torch.linspace(0.005, 1.0, 200, dtype=torch.float64)
    ax.plot(ts.numpy(), sched.log_snr(ts).numpy(), color="black", lw=1)
    lam = float(sched.log_snr(torch.tensor(t, dtype=torch.float64)))
    if math.isfinite(lam):
        ax.plot([t], [lam], "o", color="crimson")
    ax.set_xlabel("t")
    ax.set_title("logSNR(t)", fontsize=9)


def grid_points(limit: float, n: int) -> Tensor:
    """The ``n x n`` points of ``[-limit, limit]^2``, ``(n^2, 2)`` float64, rows along x."""
    axis = torch.linspace(-limit, limit, n, dtype=torch.float64)
    gx, gy = torch.meshgrid(axis, axis, indexing="xy")
    return torch.stack([gx.reshape(-1), gy.reshape(-1)], 1)


def arrows(ax, points: Tensor, field: Tensor, colour: str, longest: float, label: str = "") -> None:
    """The vectors ``field`` at ``points`` as arrows, drawn so that a vector of length
    ``longest`` spans one grid step (every field of one panel shares ``longest``)."""
    step = float((points[1] - points[0]).norm())
    ax.quiver(
        points[:, 0],
        points[:, 1],
        field[:, 0],
        field[:, 1],
        color=colour,
        angles="xy",
        scale_units="xy",
        scale=max(longest, 1e-12) / step,
        width=0.005,
        label=label,
    )


def density_contours(
    ax,
    oracle: GaussianMixtureOracle,
    t: float,
    limit: float,
    label: int | None = None,
    cmap: str = "Blues",
) -> None:
    """Filled contours of the exact ``q_t`` of a 2-D mixture (of the class ``label`` if given)."""
    points = grid_points(limit, 60)
    labels = None if label is None else torch.full((len(points),), label)
    density = oracle.log_prob(points, t, labels).exp().reshape(60, 60).numpy()
    axis = np.linspace(-limit, limit, 60)
    ax.contourf(axis, axis, density, levels=12, cmap=cmap, alpha=0.6)
