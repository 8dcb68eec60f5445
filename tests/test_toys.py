"""The 2-D toy preset samples on its data by default (issue 11).

The ``moons`` preset is trained briefly (its parameterization, schedule and sampling defaults,
with a shorter run of a narrower network) and its samples are compared with the held-out split
by the Chamfer distance (mean distance from each sample to its nearest held-out point plus the
reverse, in data units). The bar is set by two references measured here, not by a tuned number:
the same distance for as many *training* points (what a perfect model scores) and for as many
draws of pure noise ``N(0, I)``; the samples must close three quarters of the gap between them.
Before the fix (eps-prediction on the cosine schedule, whose alpha(1) is 5e-5) every sampler
diverged from t = 1 to |x| ~ 1e4, and clipping x_0 to [-1, 1] pinned the samples to a box.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

import difflab
from difflab.recipes import load_config
from difflab.recipes.image import data_splits

N = 1000
# A brief run of the preset: its diffusion and sampling settings, fewer steps, a smaller net.
BRIEF = {"train.steps": 1000, "train.batch_size": 256, "model.mlp.hidden": 128}


def nearest(a: Tensor, b: Tensor) -> Tensor:
    """For each row of ``a``, the distance to its nearest row of ``b``."""
    return torch.cdist(a.double(), b.double()).min(1).values


def chamfer(samples: Tensor, reference: Tensor) -> float:
    return float(nearest(samples, reference).mean() + nearest(reference, samples).mean())


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices: more threads than one only contend on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def moons(tmp_path_factory):
    """``(run, held_out, bar)``: a brief run of the preset, the held-out points, and the
    largest Chamfer distance a model passes with."""
    out = tmp_path_factory.mktemp("moons")
    difflab.train("moons", BRIEF, out=str(out), progress=False)
    run = difflab.load(out, "cpu")
    train, held_out = data_splits(run.config.data)
    gen = torch.Generator().manual_seed(0)
    perfect = chamfer(train.x[torch.randperm(len(train), generator=gen)[:N]], held_out.x)
    noise = chamfer(torch.randn(N, 2, generator=gen), held_out.x)
    assert perfect < noise / 4  # the distance tells data from noise at all
    return run, held_out.x, perfect + (noise - perfect) / 4


def test_preset_defaults_are_the_fix():
    _, cfg = load_config("moons")
    assert cfg.diffusion.prediction == "v"
    assert cfg.sample.threshold in (None, "none")  # vectors are not clipped to [-1, 1]


@pytest.mark.parametrize(
    ("sampler", "grid"),
    [(None, None), ("dpmpp_2m", None), ("ddpm", None), ("heun", "karras")],
    ids=["default", "dpmpp_2m", "ddpm", "heun-karras"],
)
def test_samples_lie_on_held_out_data(moons, sampler, grid):
    run, held_out, bar = moons
    x = run.sample(N, sampler=sampler, grid=grid).x
    assert x.shape == (N, 2)
    assert bool(torch.isfinite(x).all())
    assert chamfer(x, held_out) < bar


def test_clipping_vectors_to_the_image_range_fails_the_bar(moons):
    """The bar is not vacuous: the former default (x_0 clipped to [-1, 1], for images) fails."""
    run, held_out, bar = moons
    assert chamfer(run.sample(N, threshold="static").x, held_out) > bar
