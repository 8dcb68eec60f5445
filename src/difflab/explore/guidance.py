"""Tab 4, guidance (seeds 000, 002): the geometry of classifier-free guidance and the
fidelity/diversity trade-off.

On the class-conditional 2-D mixture (:data:`~difflab.explore.data.CLASSES_2D`, exact oracle)
the page shows, at a time ``t`` and a scale ``w`` (seed 002's convention, ``w = 0`` is
conditional sampling), three scores at a grid of points: the conditional ``grad log q_t(x | y)``,
the unconditional ``grad log q_t(x)`` and the guided one of
:class:`~difflab.gaussian.guidance.ClassifierFreeGuidance`, which is
``(1 + w) grad log q_t(x | y) - w grad log q_t(x)``; and samples of the guided denoiser
(DDIM, :data:`GUIDED_STEPS` steps) with their

- accuracy: the fraction whose exact class posterior ``p(k | x_0)`` at ``t = 0`` is largest for
  ``y`` (``oracle.class_posterior``),
- diversity: ``sqrt(tr Cov)`` of the samples over that of the class ``N(m_y, C_y)`` (1 for exact
  conditional samples; guidance shrinks it).

On a class-conditional digits run it draws guided digits through the run's own sampling and
reads them with the digits judge (:mod:`difflab.evaluate.digits_classifier`): the accuracy is
the fraction read as ``y``, the diversity the spread ``sqrt(tr Cov)`` of the judge's features
(:func:`~difflab.evaluate.precision_recall.within_class_spread`).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from matplotlib.figure import Figure
from torch import Tensor

from difflab.errors import UserError
from difflab.explore.data import arrows, density_contours, grid_points, image_panel, new_figure
from difflab.gaussian.guidance import ClassifierFreeGuidance
from difflab.gaussian.oracles import GaussianMixtureOracle
from difflab.gaussian.samplers import SAMPLERS, time_grid

#: DDIM steps of the guided samples in 2-D.
GUIDED_STEPS = 30
#: Guided samples drawn in 2-D.
GUIDED_SAMPLES = 400
#: Digits drawn per guidance scale on a trained model.
DIGITS_SAMPLES = 40
COLOURS = ("tab:blue", "tab:orange", "tab:green")


@dataclass
class GuidanceView:
    """The three score fields at ``points`` and the guided samples with their numbers."""

    points: Tensor
    conditional: Tensor
    unconditional: Tensor
    guided: Tensor
    samples: Tensor
    numbers: dict[str, float]


def guidance_view(
    oracle: GaussianMixtureOracle, label: int, w: float, t: float, seed: int = 0
) -> GuidanceView:
    """Scores at ``t`` and guided samples for class ``label`` at scale ``w`` (module
    docstring)."""
    K = oracle.num_components
    if not 0 <= label < K:
        raise UserError(f"the class must be one of 0..{K - 1}, got {label}")
    if not math.isfinite(w) or w < 0:
        raise UserError(f"the guidance scale must be a finite number >= 0, got {w}")
    guided = ClassifierFreeGuidance(oracle, w, null_label=K)
    points = grid_points(3.0, 9)
    times = torch.full((len(points),), t, dtype=torch.float64)
    mine = {"class_labels": torch.full((len(points),), label)}
    null = {"class_labels": torch.full((len(points),), K)}
    with torch.inference_mode():
        scores = [den(points, times, c).score for den, c in
                  ((oracle, mine), (oracle, null), (guided, mine))]  # fmt: skip
    samples = guided_samples(oracle, label, w, seed)
    posterior = oracle.class_posterior(samples, 0.0)
    own = oracle.covs[label].trace()
    numbers = {
        "accuracy": float((posterior.argmax(1) == label).double().mean()),
        "diversity": float((samples.var(0).sum() / own).sqrt()),
        "w": w,
    }
    return GuidanceView(points, *scores, samples, numbers)


@functools.lru_cache(maxsize=64)
def guided_samples(oracle: GaussianMixtureOracle, label: int, w: float, seed: int) -> Tensor:
    """:data:`GUIDED_SAMPLES` draws of the guided oracle for ``label`` at scale ``w`` (DDIM,
    :data:`GUIDED_STEPS` steps, from seeded prior noise), float64."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(GUIDED_SAMPLES, *oracle.shape, generator=gen, dtype=torch.float64)
    den = ClassifierFreeGuidance(oracle, w, null_label=oracle.num_components)
    cond = {"class_labels": torch.full((GUIDED_SAMPLES,), label)}
    ts = time_grid(oracle.schedule, GUIDED_STEPS)
    return SAMPLERS["ddim"](den, x * oracle.schedule.prior_std, ts, cond=cond)


def guidance_figure(view: GuidanceView, oracle: GaussianMixtureOracle, label: int, t: float):
    """Left: seed 002's geometry, the conditional (blue), unconditional (grey) and guided (red)
    scores as arrows of ``sigma_t grad log q_t`` over the class's density at ``t``; right: the
    guided samples over the data's classes."""
    fig = new_figure(10, 4.4)
    left, right = fig.subplots(1, 2)
    sigma = float(oracle.schedule.alpha_sigma(torch.tensor(t, dtype=torch.float64))[1])
    density_contours(left, oracle, t, 3.0, label=label, cmap="Blues")
    fields = ((view.unconditional, "gray", "unconditional"),
              (view.conditional, "tab:blue", f"conditional y={label}"),
              (view.guided, "tab:red", f"guided w={view.numbers['w']:g}"))  # fmt: skip
    longest = max(float((sigma * f).norm(dim=1).max()) for f, _, _ in fields)
    for field, colour, name in fields:
        arrows(left, view.points, sigma * field, colour, longest, name)
    left.legend(fontsize=7, loc="upper right")
    left.set_title(f"scores at t = {t:.2f} (arrows: sigma_t grad log q_t)", fontsize=9)
    for k in range(oracle.num_components):
        density_contours(right, oracle, 0.0, 3.0, label=k, cmap="Greys")
    s = view.samples
    right.plot(s[:, 0], s[:, 1], ".", ms=3, color=COLOURS[label % len(COLOURS)])
    n = view.numbers
    right.set_title(f"guided samples: accuracy {n['accuracy']:.3f}, diversity "
                    f"{n['diversity']:.3f}", fontsize=9)  # fmt: skip
    for ax in (left, right):
        ax.set_xlim(-3, 3)
        ax.set_ylim(-3, 3)
        ax.set_aspect("equal")
    return fig


# ---------------------------------------------------------------- a trained digits model


def digits_guidance(run, label: int, w: float, steps: int = 20, seed: int = 0):
    """``(images, numbers)``: :data:`DIGITS_SAMPLES` digits of class ``label`` drawn by the
    class-conditional digits ``run`` with guidance ``w`` (DDIM, ``steps`` steps), with their
    ``accuracy`` and ``diversity`` as read by the digits judge."""
    from difflab.evaluate.digits_classifier import load_digits_classifier
    from difflab.evaluate.precision_recall import within_class_spread

    model = run.model
    if getattr(model, "shape", None) != (1, 8, 8) or getattr(model, "class_names", None) is None:
        raise UserError(f"{run.path} is not a class-conditional digits run: the digits judge "
                        "reads 8x8 digits of 10 classes")  # fmt: skip
    samples = run.sample(DIGITS_SAMPLES, sampler="ddim", steps=steps, label=label,
                         guidance=w, seed=seed).x  # fmt: skip
    judge = load_digits_classifier()
    x = samples.float().cpu()
    features = judge.features(x)
    numbers = {
        "accuracy": judge.accuracy(x, torch.full((len(x),), label)),
        "diversity": float(within_class_spread(features, torch.zeros(len(x)), 1)[0]),
        "w": w,
    }
    return samples, numbers


def digits_figure(samples: Tensor, numbers: dict[str, float], label: int) -> Figure:
    """The guided digits in a grid of 4 rows, titled with their judged numbers."""
    fig = new_figure(6, 2.8)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.88, wspace=0.08, hspace=0.08)
    axes = fig.subplots(4, 10)
    for ax, x in zip(axes.flat, samples, strict=False):
        image_panel(ax, x, "")
    fig.suptitle(f"class {label}, w = {numbers['w']:g}: accuracy {numbers['accuracy']:.3f}, "
                 f"diversity {numbers['diversity']:.3f} (judge features)", fontsize=9)  # fmt: skip
    return fig
