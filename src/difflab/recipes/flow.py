"""Recipe ``flow``: flow matching / rectified flow (Lipman et al. 2023; Liu et al. 2023; seed 000
points to both) as one more parameterization and schedule of the image recipe's denoiser.

The path is the straight line ``x_t = (1 - t) x_0 + t eps`` (the ``rectified-flow`` schedule,
``alpha = 1 - t``, ``sigma = t``) and the network predicts its velocity
``u = dx_t / dt = alpha' x_0 + sigma' eps = eps - x_0`` (``diffusion.prediction=flow``), trained
with the flow-matching loss ``||u_hat - (eps - x_0)||^2`` (weighting ``simple``, which is
``flow`` for a velocity network). The velocity converts exactly into ``x_0`` and ``eps``
(``x_0 = x_t - t u``, ``eps = x_t + (1 - t) u``), so every sampler, classifier-free guidance
and thresholding of the image recipe apply unchanged; the default sampler ``euler`` is Euler's
method on the flow ODE ``dx/dt = u`` (on this path the same map as DDIM with ``eta = 0``).

Everything else (data, network, training, sampling options, bits/dim) is the image recipe's.
The recipe differs from ``--recipe image diffusion.schedule=rectified-flow
diffusion.prediction=flow sample.sampler=euler`` in three ways: it refuses another prediction
(a flow run predicts velocities, which ``difflab distill RUN --method reflow`` relies on), it
records ``flow`` in its checkpoints, and ``--recipe flow`` on an image preset (``digits``)
replaces that preset's schedule, prediction, weighting and sampler by these defaults before the
user's ``key=value`` overrides apply (:meth:`FlowRecipe.adopt`); any other schedule may be given
(``diffusion.schedule=cosine``: the velocity of that path, from the schedule's derivatives).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from difflab.config import check
from difflab.errors import UserError
from difflab.recipes.image import DiffusionConfig, ImageConfig, ImageRecipe, SampleConfig

#: The keys an image preset sets that mean another model here, with this recipe's values
#: (``None``: the key is removed, so the default applies).
ADOPTED = {
    "diffusion": {"schedule": "rectified-flow", "prediction": "flow", "weighting": "simple",
                  "T": None, "shift": None, "sigma_data": None},
    "sample": {"sampler": "euler", "eta": None, "grid": None},
}  # fmt: skip


@dataclass
class FlowDiffusionConfig(DiffusionConfig):
    """The image recipe's ``diffusion`` section with the linear path and the velocity target as
    defaults; ``prediction`` must stay ``flow``."""

    schedule: str = "rectified-flow"
    prediction: str = "flow"

    def validate(self) -> None:
        check(
            self.prediction == "flow",
            f"the flow recipe trains a velocity (diffusion.prediction=flow); for "
            f"diffusion.prediction={self.prediction} use --recipe image",
        )
        super().validate()


@dataclass
class FlowSampleConfig(SampleConfig):
    """The image recipe's ``sample`` section with Euler on the flow ODE as the default."""

    sampler: str = "euler"


@dataclass
class FlowConfig(ImageConfig):
    """The whole config of the flow recipe: the image recipe's, with flow defaults."""

    SELF_CONDITIONING: ClassVar[bool] = True  # the image recipe's loss and sampling

    diffusion: FlowDiffusionConfig = field(default_factory=FlowDiffusionConfig)
    sample: FlowSampleConfig = field(default_factory=FlowSampleConfig)


class FlowRecipe(ImageRecipe):
    name = "flow"
    config_type = FlowConfig
    preset = "digits"
    demo_files = ()
    adopted = ADOPTED

    def demo(self, out: Path, *, quiet: bool = False, steps: int | None = None) -> str:
        raise UserError("the flow recipe has no demo: train one with difflab train digits "
                        "--recipe flow")  # fmt: skip


RECIPE = FlowRecipe()
