"""Tab 1, the forward process (seed 001): ``q(x_t | x_0) = N(alpha_t x_0, sigma_t^2 I)``.

For a time ``t`` and a schedule the page shows draws ``x_t = alpha_t x_0 + sigma_t eps`` (the
same ``x_0`` and ``eps`` at every ``t``, so moving the slider moves only the time), the
diffusion kernel of one marked example (its mean ``alpha_t x_0`` and the band
``alpha_t x_0 +- 2 sigma_t``), ``logSNR(t) = log(alpha_t^2 / sigma_t^2)``, the regression target
of the chosen parameterization (:func:`~difflab.gaussian.parameterization.target`) and, for a
known mixture, the exact marginal ``q(z_t)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from matplotlib.figure import Figure
from torch import Tensor

from difflab.errors import UserError
from difflab.explore.data import (
    MIXTURE_1D,
    MIXTURE_2D,
    data_examples,
    density_contours,
    image_panel,
    log_snr_panel,
    mixture,
    new_figure,
    schedule,
)
from difflab.gaussian.parameterization import KINDS, target
from difflab.gaussian.process import marginal, q_sample

#: Examples drawn for the 1-D and 2-D pictures (images show one).
POINTS = 400


@dataclass
class ForwardView:
    """What the forward-process tab shows at one ``t``: the numbers and the draws."""

    numbers: dict[str, float]
    x0: Tensor  # (N, *shape) the examples
    x_t: Tensor  # (N, *shape) their noised versions
    target: Tensor  # (*shape,) the network's target for the marked example (index 0)
    captions: list[str] | None


def forward_view(
    data: str, schedule_name: str, prediction: str, t: float, seed: int = 0
) -> ForwardView:
    """The forward process of ``data`` at time ``t`` (see the module docstring).

    ``numbers`` holds ``alpha``, ``sigma``, ``log_snr``, ``sigma_ve`` at ``t``, the marked
    example's kernel mean and band (``mean``, ``band_low``, ``band_high``, per coordinate for
    1-D and 2-D data as ``mean[0]`` ...), and for a known mixture the exact mean and variance
    of ``q(z_t)`` along the first coordinate (``q_mean``, ``q_var``)."""
    if prediction not in KINDS:
        raise UserError(f"unknown parameterization {prediction!r}: choose one of {KINDS}")
    if not 0.0 < t <= 1.0:
        raise UserError(f"t must lie in (0, 1], got {t}")
    sched = schedule(schedule_name)
    x0, captions = data_examples(data, 1 if is_image_data(data) else POINTS, seed)
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=x0.dtype)
    tt = torch.tensor(t, dtype=torch.float64)
    alpha, sigma = (float(v) for v in sched.alpha_sigma(tt))
    kernel = marginal(sched, x0[:1], tt)
    x_t = q_sample(sched, x0, tt, eps)
    numbers = {
        "t": t,
        "alpha": alpha,
        "sigma": sigma,
        "log_snr": float(sched.log_snr(tt)),
        "sigma_ve": float(sched.sigma_ve(tt)),
    }
    if x0.ndim == 2:
        for i, m in enumerate(kernel.mean[0].tolist()):
            band = 2 * float(kernel.var.sqrt())
            numbers.update({f"mean[{i}]": m, f"band_low[{i}]": m - band,
                            f"band_high[{i}]": m + band})  # fmt: skip
    if data in (MIXTURE_1D, MIXTURE_2D):
        oracle = mixture(data, sched)
        m0 = oracle.weights @ oracle.means[:, 0]
        second = oracle.weights @ (oracle.covs[:, 0, 0] + oracle.means[:, 0] ** 2)
        numbers["q_mean"] = alpha * float(m0)
        numbers["q_var"] = alpha**2 * float(second - m0**2) + sigma**2
    marked = target(prediction, x0[:1], eps[:1], torch.tensor(alpha), torch.tensor(sigma))[0]
    return ForwardView(numbers, x0, x_t, marked, captions)


def is_image_data(data: str) -> bool:
    """Whether ``data`` is a set of images (the page shows one example, not a cloud)."""
    return data in ("digits", "glyphs")


def forward_figure(view: ForwardView, data: str, schedule_name: str, prediction: str) -> Figure:
    """The picture of :func:`forward_view`: the kernel and ``q(z_t)`` (1-D), the cloud of
    ``x_t`` with ``q_t``'s contours and the marked kernel's 2-sigma circle (2-D), or ``x_0``,
    the kernel mean, ``x_t`` and the target side by side (images); and ``logSNR(t)``."""
    sched = schedule(schedule_name)
    n = view.numbers
    t, alpha, sigma = n["t"], n["alpha"], n["sigma"]
    if view.x0.ndim == 4:
        fig = new_figure(10, 2.6)
        fig.subplots_adjust(bottom=0.2)
        axes = fig.subplots(1, 5)
        label = f" ({view.captions[0]})" if view.captions else ""
        image_panel(axes[0], view.x0[0], f"x_0{label}")
        image_panel(axes[1], alpha * view.x0[0], "kernel mean alpha_t x_0")
        image_panel(axes[2], view.x_t[0], f"x_t (2 sigma = {2 * sigma:.2f})")
        scale = view.target.abs().max().clamp(min=1e-12)
        image_panel(axes[3], view.target / scale, f"target {prediction} (/ {float(scale):.2g})")
        log_snr_panel(axes[4], sched, t)
        return fig
    fig = new_figure(10, 3.6)
    if view.x0.shape[1] == 1:
        axes = fig.subplots(1, 3, width_ratios=[2, 1.3, 1.2])
        _kernel_over_time(axes[0], view, sched)
        _marginal_1d(axes[1], view, data, sched)
    else:
        axes = fig.subplots(1, 2, width_ratios=[1.4, 1])
        _cloud_2d(axes[0], view, data, sched)
    log_snr_panel(axes[-1], sched, t)
    return fig


def _kernel_over_time(ax, view: ForwardView, sched) -> None:
    """Seed 001's picture: the marked ``x_0``'s kernel mean ``alpha(s) x_0`` and its band
    ``+- 2 sigma(s)`` over all times ``s``, and the draws ``x_t`` at the current ``t``."""
    ts = torch.linspace(0.0, 1.0, 200, dtype=torch.float64)
    alpha, sigma = sched.alpha_sigma(ts)
    x0 = float(view.x0[0, 0])
    mean = (alpha * x0).numpy()
    band = (2 * sigma).numpy()
    ax.fill_between(ts.numpy(), mean - band, mean + band, color="tab:blue", alpha=0.2,
                    label="alpha x_0 +- 2 sigma")  # fmt: skip
    ax.plot(ts.numpy(), mean, color="tab:blue", lw=1.5, label="kernel mean alpha x_0")
    t = view.numbers["t"]
    ax.plot([t] * len(view.x_t), view.x_t[:, 0].numpy(), ".", color="gray", ms=2, alpha=0.5)
    ax.axvline(t, color="crimson", lw=1)
    ax.set_xlabel("t")
    ax.set_ylabel("x")
    ax.set_title("forward process: diffusion kernel of the marked x_0", fontsize=9)
    ax.legend(fontsize=7, loc="upper left")


def _marginal_1d(ax, view: ForwardView, data: str, sched) -> None:
    """A histogram of the draws ``x_t`` and, for a known mixture, the exact ``q(z_t)``."""
    t = view.numbers["t"]
    ax.hist(view.x_t[:, 0].numpy(), bins=40, density=True, color="lightgray")
    if data == MIXTURE_1D:
        oracle = mixture(data, sched)
        lo, hi = float(view.x_t.min()) - 1, float(view.x_t.max()) + 1
        xs = torch.linspace(lo, hi, 300, dtype=torch.float64)[:, None]
        ax.plot(xs[:, 0].numpy(), oracle.log_prob(xs, t).exp().numpy(), color="tab:blue",
                label="exact q(z_t)")  # fmt: skip
        ax.legend(fontsize=7)
    ax.set_title(f"q(z_t) at t = {t:.2f}", fontsize=9)


def _cloud_2d(ax, view: ForwardView, data: str, sched) -> None:
    """The draws ``x_t``, ``q_t``'s exact contours for a known mixture, and the marked
    example's kernel: its mean and the circle of radius ``2 sigma_t``."""
    n = view.numbers
    limit = max(3.0, 2.5 * n["sigma"] + 2.5 * n["alpha"])
    if data == MIXTURE_2D:
        density_contours(ax, mixture(data, sched), n["t"], limit)
    ax.plot(view.x_t[:, 0].numpy(), view.x_t[:, 1].numpy(), ".", color="gray", ms=3, alpha=0.6)
    centre = (n["mean[0]"], n["mean[1]"])
    ax.plot(*view.x0[0].tolist(), "x", color="black", label="marked x_0")
    ax.plot(*centre, "o", color="crimson", label="kernel mean alpha x_0")
    radius = n["band_high[0]"] - n["mean[0]"]
    circle = torch.linspace(0, 2 * torch.pi, 100)
    ax.plot(centre[0] + radius * circle.cos(), centre[1] + radius * circle.sin(),
            color="crimson", lw=1, label="2 sigma")  # fmt: skip
    ax.set_xlim(-limit, limit)
    ax.set_ylim(-limit, limit)
    ax.set_aspect("equal")
    ax.legend(fontsize=7, loc="upper right")
    ax.set_title(f"x_t at t = {n['t']:.2f}", fontsize=9)
