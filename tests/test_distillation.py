"""Progressive distillation's maths (seed 004, Algorithm 2): the target x~ makes one student DDIM
step land exactly where two teacher DDIM steps land; on Gaussian data, where the teacher's
2-step map is affine, a student trained on the loss reproduces the teacher's 2N-step sampler in
N steps."""

from __future__ import annotations

import pytest
import torch

from difflab.gaussian import samplers as S
from difflab.gaussian.distillation import (
    ddim_step,
    distillation_weight,
    progressive_loss,
    progressive_target,
)
from difflab.gaussian.oracles import GaussianOracle
from difflab.gaussian.parameterization import Denoiser, Prediction
from difflab.gaussian.schedules import make_schedule

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _nonlinear_net(dim: int, seed: int):
    """A fixed random nonlinear function of (x_t, t): no linearity makes the identity hold."""
    gen = _gen(seed)
    w1, w2 = torch.randn(2, dim, dim, generator=gen, dtype=F64)

    def net(x_t, c_noise, **cond):
        return torch.tanh(x_t @ w1 + c_noise[:, None] / 1000.0) @ w2

    return net


@pytest.mark.parametrize(
    ("schedule", "kind"),
    [("cosine", "eps"), ("cosine-logsnr", "v"), ("rectified-flow", "flow"), ("vp-linear", "x0")],
)
def test_one_student_step_to_the_target_lands_where_two_teacher_ddim_steps_land(schedule, kind):
    """With student = teacher and N -> N/2: for every student step t_2k -> t_2k+2 of the
    teacher's 2N-step DDIM trajectory, a DDIM step with x0 = x~ from z_t_2k reaches the
    teacher's z_t_2k+2 (closed form; 1e-6 in float64), whatever the teacher predicts."""
    sched = make_schedule(schedule)
    teacher = Denoiser(_nonlinear_net(3, 0), sched, kind)
    ts = sched.timesteps(8)  # the teacher's 8 steps; the student's are every other one
    states = []
    z = torch.randn(5, 3, generator=_gen(1), dtype=F64)
    final = S.ddim(teacher, z, ts, callback=lambda i, t, x_t, x0: states.append(x_t))
    states.append(final)
    for k in range(4):
        t, t_mid, t_next = (torch.full((5,), float(ts[2 * k + j]), dtype=F64) for j in range(3))
        z_t = states[2 * k]
        x_tilde = progressive_target(teacher, z_t, (t, t_mid, t_next))
        alpha, sigma = sched.alpha_sigma(t)
        student = Prediction(z_t, alpha[:, None], sigma[:, None], x0=x_tilde)
        landed = ddim_step(student, *sched.alpha_sigma(t_next))
        torch.testing.assert_close(landed, states[2 * k + 2], rtol=0, atol=1e-6)


def test_distillation_weights_are_truncated_snr_and_v_mse():
    alpha = torch.tensor([0.1, 0.6, 0.99], dtype=F64)
    sigma = (1 - alpha**2).sqrt()
    snr = alpha**2 / sigma**2
    torch.testing.assert_close(distillation_weight(alpha, sigma, "truncated-snr"),
                               torch.maximum(snr, torch.ones_like(snr)))  # fmt: skip
    torch.testing.assert_close(distillation_weight(alpha, sigma, "v"), 1 + snr)  # VP: 1 + SNR
    with pytest.raises(ValueError, match="unknown weighting"):
        distillation_weight(alpha, sigma, "snr")


class _AffineStudent(torch.nn.Module):
    """x0_hat = A_k z + b_k for the student step k whose time is t (one affine map per step):
    exactly the family the teacher's 2-step map of Gaussian data belongs to."""

    def __init__(self, grid: torch.Tensor, dim: int):
        super().__init__()
        self.grid = grid
        self.A = torch.nn.Parameter(torch.eye(dim, dtype=F64).repeat(len(grid), 1, 1))
        self.b = torch.nn.Parameter(torch.zeros(len(grid), dim, dtype=F64))

    def forward(self, x_t, c_noise, **cond):
        k = (c_noise[:, None] / 1000.0 - self.grid[None]).abs().argmin(1)
        return torch.einsum("bij,bj->bi", self.A[k], x_t) + self.b[k]


def test_a_student_trained_to_the_exact_target_reproduces_the_two_step_map():
    """Teacher: the exact denoiser of N(mu, Sigma) on the cosine log-SNR schedule, 4 DDIM
    steps. Student: an x0 predictor (affine per step) trained with L-BFGS on the progressive
    loss. Its 2-step DDIM sampler then equals the teacher's 4-step one on fresh noise."""
    sched = make_schedule("cosine-logsnr")
    mean = torch.tensor([0.4, -0.2], dtype=F64)
    cov = torch.tensor([[0.25, 0.08], [0.08, 0.16]], dtype=F64)
    teacher = GaussianOracle(mean, cov, sched)
    teacher_times = sched.timesteps(4)
    student_net = _AffineStudent(teacher_times[0:-1:2], 2)
    student = Denoiser(student_net, sched, "x0")
    x0 = teacher.sample(512, _gen(2))
    optimizer = torch.optim.LBFGS(
        student_net.parameters(),
        max_iter=200,
        tolerance_grad=1e-12,
        tolerance_change=1e-15,
        line_search_fn="strong_wolfe",
    )

    def closure():
        optimizer.zero_grad()
        loss = progressive_loss(student, teacher, x0, teacher_times, generator=_gen(3))
        loss.backward()
        return loss

    def loss_now() -> float:
        with torch.no_grad():
            return float(progressive_loss(student, teacher, x0, teacher_times, generator=_gen(3)))

    before = loss_now()
    for _ in range(5):
        optimizer.step(closure)
    after = loss_now()
    assert after < 1e-12 * max(before, 1.0)
    z = torch.randn(256, 2, generator=_gen(4), dtype=F64)
    with torch.no_grad():
        two = S.ddim(student, z, teacher_times[0::2])
    four = S.ddim(teacher, z, teacher_times)
    torch.testing.assert_close(two, four, rtol=0, atol=1e-5)
    # and not trivially: the teacher's 2-step sampler is far from its 4-step one
    assert float((S.ddim(teacher, z, teacher_times[0::2]) - four).abs().max()) > 1e-2
