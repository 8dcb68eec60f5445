"""Reflow on a 2-D toy: the exact flow of a two-component Gaussian mixture (the oracle's
velocity on the linear path) has curved paths; a network trained with the flow-matching loss on
the noise-sample pairs that flow generates has measurably straighter ones, and one Euler step
of it lands much nearer the flow's own endpoints."""

from __future__ import annotations

import torch

from difflab.gaussian.objectives import loss_fn
from difflab.gaussian.oracles import GaussianMixtureOracle
from difflab.gaussian.parameterization import Denoiser
from difflab.gaussian.rectified_flow import reflow_pairs, straightness
from difflab.gaussian.samplers import ddim
from difflab.gaussian.schedules import make_schedule
from difflab.nets.mlp import MLPDenoiserNet

F64 = torch.float64
PATH = make_schedule("rectified-flow")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _toy_flow() -> Denoiser:
    means = torch.tensor([[-1.5, 0.0], [1.5, 0.0]], dtype=F64)
    oracle = GaussianMixtureOracle(means, 0.2, None, PATH)
    return Denoiser(oracle.as_network("flow"), PATH, "flow")


def test_straightness_is_zero_for_a_straight_flow_and_positive_for_a_curved_one():
    """A velocity field constant along each path (u = A x_1, so x_t = x_1 + (t - 1) A x_1
    is a straight line at constant speed) has S = 0; the mixture's flow has S > 0."""
    a = torch.tensor([[0.5, 0.2], [-0.1, 0.8]], dtype=F64)

    def constant_along_paths(x_t, c_noise, **cond):  # x_1 from x_t = (I + (t - 1) A) x_1
        t = c_noise[:, None, None] / 1000.0
        m = torch.eye(2, dtype=F64) + (t - 1) * a
        return torch.einsum("ij,bj->bi", a, torch.linalg.solve(m, x_t[..., None])[..., 0])

    x = torch.randn(64, 2, generator=_gen(0), dtype=F64)
    ts = torch.linspace(1.0, 0.0, 17, dtype=F64)
    straight = Denoiser(constant_along_paths, PATH, "flow")
    assert float(straightness(straight, x, ts).max()) < 1e-20
    assert float(straightness(_toy_flow(), x, ts).mean()) > 0.05


def test_one_reflow_straightens_the_paths_of_a_2d_toy():
    """Pairs (eps, Phi(eps)) from 32 Euler steps of the exact flow; an MLP trained 400 Adam
    steps on them (float32). Measured: straightness 0.49 -> 0.0014, one-step squared error
    against the flow's endpoints 1.13 -> 0.021."""
    torch.manual_seed(0)
    teacher = _toy_flow()
    noise = torch.randn(2048, 2, generator=_gen(1), dtype=F64)
    pairs = reflow_pairs(teacher, noise, steps=32).float()
    net = MLPDenoiserNet(2, hidden=32, depth=2)
    student = Denoiser(net, PATH, "flow")
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    gen = _gen(2)
    for step in range(400):
        idx = torch.randint(len(noise), (256,), generator=gen)
        loss = loss_fn(student, pairs[idx], eps=noise[idx].float(), generator=gen)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step == 280:
            for group in optimizer.param_groups:
                group["lr"] = 5e-4
    net.eval()
    test_noise = torch.randn(512, 2, generator=_gen(3), dtype=F64)
    ts = torch.linspace(1.0, 0.0, 17, dtype=F64)
    before = float(straightness(teacher, test_noise, ts).mean())
    with torch.no_grad():
        after = float(straightness(student, test_noise.float(), ts).mean())
    assert after < 0.1 * before, (before, after)
    # one Euler step from the same noise, against the flow's own 32-step endpoints
    target = reflow_pairs(teacher, test_noise, steps=32)
    one_step = torch.linspace(1.0, 0.0, 2, dtype=F64)
    teacher_error = float((ddim(teacher, test_noise, one_step) - target).square().mean())
    with torch.no_grad():
        landed = ddim(student, test_noise.float(), one_step).double()
    student_error = float((landed - target).square().mean())
    assert student_error < 0.1 * teacher_error, (teacher_error, student_error)
