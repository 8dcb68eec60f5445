"""Tab 3, the reverse process of a trained image model: ``x_t`` and the estimate ``x_0_hat``
side by side at every step (seed 001's "denoising" figure on the user's own model).

The frames come from the run's own sampling (:meth:`difflab.recipes.Run.sample`) with its
``callback(i, t, x_t, x0)``, so every sampler, step count, class and guidance scale the recipe
takes is available, refused the same way as on the command line; the last frame is the sample
itself at ``t = 0``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

from matplotlib.figure import Figure
from torch import Tensor

from difflab.errors import UserError
from difflab.explore.data import image_panel, new_figure

#: The most steps the tab runs (each is kept as a frame).
MAX_STEPS = 1000
#: Images drawn together (one row of the picture).
ROW = 4


@dataclass
class ReverseFrames:
    """``times[i]``, ``x_t[i]`` and ``x0[i]`` for every step ``i``, then ``t = 0`` with the
    samples as both."""

    times: list[float]
    x_t: list[Tensor]
    x0: list[Tensor]


def reverse_frames(run, *, steps: int, **options) -> ReverseFrames:
    """Draw :data:`ROW` samples from ``run`` (a loaded image run) with ``steps`` steps and the
    recipe's sampling ``options`` (``sampler``, ``label``, ``guidance``, ``prompt``, ``seed``,
    ...), recording every step. A recipe whose sampling reports no steps is refused."""
    if "callback" not in inspect.signature(run.recipe.sample).parameters:
        raise UserError(
            f"{run.path} is a run of the {run.recipe.name} recipe, whose sampling does not "
            "report its steps: the reverse process shows image runs"
        )
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
        raise UserError(f"the step count must be a whole number in 1..{MAX_STEPS}, got {steps!r}")
    frames = ReverseFrames([], [], [])

    def record(i: int, t: float, x_t: Tensor, x0: Tensor) -> None:
        frames.times.append(float(t))
        frames.x_t.append(x_t.detach().float().cpu())
        frames.x0.append(x0.detach().float().cpu())

    samples = run.sample(ROW, steps=steps, callback=record, **options)
    if samples.x is None or samples.x.ndim != 4:
        raise UserError(f"{run.path} draws vectors, not images: open it in the score tab")
    final = samples.x.detach().float().cpu()
    frames.times.append(0.0)
    frames.x_t.append(final)
    frames.x0.append(final)
    return frames


def reverse_figure(frames: ReverseFrames, index: int) -> Figure:
    """Frame ``index``: the :data:`ROW` states ``x_t`` (top) and estimates ``x_0_hat``
    (bottom) at that step."""
    if not 0 <= index < len(frames.times):
        raise UserError(f"the frame must lie in 0..{len(frames.times) - 1}, got {index}")
    x_t, x0 = frames.x_t[index], frames.x0[index]
    fig = new_figure(2.0 * len(x_t), 4.4)
    axes = fig.subplots(2, len(x_t), squeeze=False)
    t = frames.times[index]
    for j in range(len(x_t)):
        image_panel(axes[0, j], x_t[j], f"x_t, t = {t:.3f}")
        image_panel(axes[1, j], x0[j], "x_0 estimate")
    fig.suptitle(f"step {index} of {len(frames.times) - 1}", fontsize=9)
    return fig


def distance_to_sample(frames: ReverseFrames, index: int) -> float:
    """``mean |x0_hat(t_i) - x_0|``: how far the estimate at step ``index`` is from the sample
    the run ends on (0 at the last frame)."""
    return float((frames.x0[index] - frames.x0[-1]).abs().mean())
