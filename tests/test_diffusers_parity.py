"""Parity with the reference implementation: diffusers' schedulers (test-only dependency).

Identical schedule (linear betas, T = 1000), identical timesteps and identical model outputs
(an exact mixture oracle's eps, evaluated wherever either library asks), so every trajectory
must agree to 1e-5. Measured (diffusers 0.42.1): DDPM and DDIM agree to 1e-12 (float64
throughout); Euler, Heun and DPM-Solver++ to 6e-7, the float32 in which diffusers keeps sigmas
and computes DPM-Solver steps. Index convention: difflab's discrete step i (1-based, t = i / T) is
diffusers' timestep tau = i - 1 (0-based index into ``alphas_cumprod``), so diffusers' timesteps
``tau_k`` become difflab times ``(tau_k + 1) / T`` followed by the final 0.

Deliberate differences, each pinned by a test below:
- diffusers' DDIM with ``set_alpha_to_one=False`` (Stable Diffusion's configuration) ends at
  ``alpha_bar_1`` instead of 1: its last step is the identity and leaves the noise of step 1
  (std sqrt(beta_1) = 0.01) in the output. difflab always ends at t = 0 on the data estimate.
- diffusers' Euler with churn evaluates the model before adding the churn noise and reuses that
  output at the churned point; difflab evaluates at the churned point (Karras et al. 2022,
  Algorithm 2), so they agree only without churn.
- diffusers' DPM-Solver++(3M) weighs the second divided difference by half the exact
  quadratic's coefficient; difflab integrates the quadratic exactly (third order, see
  test_samplers); the two agree on 2M and differ by O(h^3) per step at 3M.
- diffusers' UniPC (bh1 and bh2 alike) weighs the slope of a linear interpolant by B(h) / 2
  instead of its exact exponential quadrature, and lowers the order of its last steps; difflab's
  ``unipc`` does both only with ``bh2=True, lower_order_final=True`` (then they agree to 1e-14
  once diffusers' sigmas are float64), and by default solves the order conditions exactly.
"""

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from difflab.gaussian import samplers as S  # noqa: E402
from difflab.gaussian.oracles import GaussianMixtureOracle  # noqa: E402
from difflab.gaussian.schedules import linear_beta  # noqa: E402

T = 1000
SCHEDULE = linear_beta(T, 1e-4, 0.02)
CONFIG = {"num_train_timesteps": T, "beta_schedule": "linear", "beta_start": 1e-4,
          "beta_end": 0.02, "prediction_type": "epsilon"}  # fmt: skip
F64 = torch.float64
TOL = {"rtol": 0, "atol": 1e-5}


def _oracle() -> GaussianMixtureOracle:
    means = torch.tensor([[1.5, -0.5, 0.0], [-1.0, 1.0, 0.5], [0.0, -1.5, 1.0]], dtype=F64)
    return GaussianMixtureOracle(means, torch.tensor([0.3, 0.5, 0.4]), None, SCHEDULE)


ORACLE = _oracle()


def _eps(x: torch.Tensor, tau) -> torch.Tensor:
    """The shared model: eps at diffusers timestep tau, i.e. difflab time (tau + 1) / T."""
    t = torch.full((x.shape[0],), (float(tau) + 1) / T, dtype=F64)
    return ORACLE(x, t).eps


def _times(timesteps: torch.Tensor) -> torch.Tensor:
    return torch.cat([(timesteps.to(F64) + 1) / T, torch.zeros(1, dtype=F64)])


def _start(n: int = 16) -> torch.Tensor:
    return torch.randn(n, 3, generator=torch.Generator().manual_seed(0), dtype=F64)


def _scheduler(cls, n: int, **options):
    """A diffusers scheduler on difflab's float64 alpha_bar (diffusers keeps float32, which
    alone moves a 1000-step DDPM trajectory by 3e-5), with its timesteps set for n steps."""
    scheduler = cls(**CONFIG, **options)
    scheduler.betas, scheduler.alphas = SCHEDULE.betas.clone(), SCHEDULE.alphas.clone()
    scheduler.alphas_cumprod = SCHEDULE.alpha_bar.clone()
    scheduler.set_timesteps(n)
    return scheduler


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def _run_vp(scheduler, x: torch.Tensor, **step_kwargs) -> torch.Tensor:
    """diffusers' loop for schedulers that work on x_t itself (DDPM, DDIM, DPM-Solver)."""
    for tau in scheduler.timesteps:
        x = scheduler.step(_eps(x, tau), tau, x, **step_kwargs).prev_sample
    return x


def _run_ve(scheduler, x_vp: torch.Tensor, **step_kwargs) -> torch.Tensor:
    """diffusers' loop for the k-diffusion-style schedulers (Euler, Heun), whose state is
    y = x / alpha = x sqrt(1 + sigma^2) and whose model input is scale_model_input(y)."""
    y = x_vp * (1 + scheduler.sigmas[0].double() ** 2).sqrt()
    for tau in scheduler.timesteps:
        eps = _eps(scheduler.scale_model_input(y, tau), tau)
        y = scheduler.step(eps, tau, y, **step_kwargs).prev_sample
    return y


@pytest.mark.parametrize(
    "spacing,n",
    [(s, n) for s in ("leading", "trailing", "linspace") for n in (10, 50, 999, 1000)],
)
def test_sampling_timesteps_are_diffusers_timesteps_shifted_by_one(spacing, n):
    sched = diffusers.DDIMScheduler(**CONFIG, timestep_spacing=spacing)
    sched.set_timesteps(n)
    ours = SCHEDULE.timesteps(n, spacing)
    assert ours[-1] == 0
    assert (ours[:-1] * T - 1).round().long().tolist() == sched.timesteps.tolist()


@pytest.mark.parametrize("variance,diffusers_variance", [("beta_tilde", "fixed_small"),
                                                         ("beta", "fixed_large")])  # fmt: skip
@pytest.mark.parametrize("n", [20, 1000])
def test_ddpm_matches_ddpm_scheduler(variance, diffusers_variance, n):
    """Same generator, same noise draws (one per step except the last, in order)."""
    sched = _scheduler(diffusers.DDPMScheduler, n, variance_type=diffusers_variance,
                       clip_sample=False)  # fmt: skip
    x = _start()
    theirs = _run_vp(sched, x, generator=_gen())
    ours = S.ddpm(ORACLE, x, _times(sched.timesteps), variance=variance, generator=_gen())
    torch.testing.assert_close(ours, theirs, **TOL)


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_ddim_matches_ddim_scheduler(eta, spacing):
    sched = _scheduler(diffusers.DDIMScheduler, 25, clip_sample=False, set_alpha_to_one=True,
                       timestep_spacing=spacing)  # fmt: skip
    x = _start()
    theirs = _run_vp(sched, x, eta=eta, generator=_gen())
    ours = S.ddim(ORACLE, x, _times(sched.timesteps), eta=eta, generator=_gen())
    torch.testing.assert_close(ours, theirs, **TOL)


def test_ddim_without_alpha_one_keeps_the_last_steps_noise():
    """set_alpha_to_one=False: diffusers' final step maps x at t = 1/T to itself, so its output
    is difflab's state at the last step (the callback's x_t), not the data estimate."""
    sched = _scheduler(diffusers.DDIMScheduler, 25, clip_sample=False, set_alpha_to_one=False)
    sched.final_alpha_cumprod = SCHEDULE.alpha_bar[0].clone()  # float64 as well
    x = _start()
    theirs = _run_vp(sched, x)
    states = []
    ours = S.ddim(
        ORACLE, x, _times(sched.timesteps), callback=lambda i, t, x_t, x0: states.append(x_t)
    )
    torch.testing.assert_close(states[-1], theirs, **TOL)
    assert (ours - theirs).abs().max() > 1e-4  # sigma_1 eps_hat: the noise difflab removes


def test_euler_matches_euler_discrete_scheduler():
    sched = _scheduler(diffusers.EulerDiscreteScheduler, 25, timestep_spacing="trailing")
    x = _start()
    ours = S.euler(ORACLE, x, _times(sched.timesteps))
    torch.testing.assert_close(ours, _run_ve(sched, x), **TOL)


def test_euler_with_churn_differs_where_diffusers_reuses_the_unchurned_output():
    sched = _scheduler(diffusers.EulerDiscreteScheduler, 25, timestep_spacing="trailing")
    x = _start()
    theirs = _run_ve(sched, x, s_churn=10.0, generator=_gen())
    ours = S.euler(ORACLE, x, _times(sched.timesteps), s_churn=10.0, generator=_gen())
    assert (ours - theirs).abs().max() > 1e-3


def test_heun_matches_heun_discrete_scheduler():
    sched = _scheduler(diffusers.HeunDiscreteScheduler, 20, timestep_spacing="trailing")
    x = _start()
    ours = S.heun(ORACLE, x, _times(sched.timesteps[::2]))
    torch.testing.assert_close(ours, _run_ve(sched, x), **TOL)


@pytest.mark.parametrize("n", [10, 25])
def test_dpm_solver_pp_2m_matches_dpm_solver_multistep_scheduler(n):
    sched = _scheduler(
        diffusers.DPMSolverMultistepScheduler, n, algorithm_type="dpmsolver++", solver_order=2,
        solver_type="midpoint", timestep_spacing="trailing", final_sigmas_type="zero",
    )  # fmt: skip
    x = _start()
    ours = S.dpm_solver_pp(ORACLE, x, _times(sched.timesteps), order=2)
    torch.testing.assert_close(ours, _run_vp(sched, x), **TOL)


def test_dpm_solver_pp_2m_sde_matches_sde_dpmsolver_pp():
    """diffusers draws this scheduler's noise in float32, so both get the same float64 draws
    (difflab's order: one per step) through ``variance_noise``; diffusers also computes this
    step in float32, which the 1e-5 tolerance covers."""
    sched = _scheduler(
        diffusers.DPMSolverMultistepScheduler, 25, algorithm_type="sde-dpmsolver++",
        solver_order=2, solver_type="midpoint", timestep_spacing="trailing",
        final_sigmas_type="zero",
    )  # fmt: skip
    x = _start()
    gen = _gen()
    noises = [torch.randn(x.shape, generator=gen, dtype=F64) for _ in sched.timesteps]
    theirs = x
    for tau, noise in zip(sched.timesteps, noises, strict=True):
        theirs = sched.step(_eps(theirs, tau), tau, theirs, variance_noise=noise).prev_sample
    ours = S.dpm_solver_pp(ORACLE, x, _times(sched.timesteps), order=2, sde=True,
                           generator=_gen())  # fmt: skip
    torch.testing.assert_close(ours, theirs.double(), **TOL)


def test_dpm_solver_pp_3m_differs_from_diffusers_at_third_order():
    """Both take the same first two steps (orders 1 and 2); from the third step on, diffusers'
    3M update differs from the exact integral of the quadratic interpolant by a term
    alpha_s (h^2 / 2 - h + 1 - e^{-h}) b2 = O(h^3) per step (b2 the second divided
    difference), so the trajectories part, by less as the steps shrink."""
    gaps = []
    for n in (20, 40):
        sched = _scheduler(
            diffusers.DPMSolverMultistepScheduler, n, algorithm_type="dpmsolver++",
            solver_order=3, timestep_spacing="trailing", lower_order_final=False,
            final_sigmas_type="zero",
        )  # fmt: skip
        x = _start()
        ours = S.dpm_solver_pp(ORACLE, x, _times(sched.timesteps), order=3)
        gaps.append(float((ours - _run_vp(sched, x)).abs().max()))
    assert gaps[0] > 1e-4 and gaps[1] < gaps[0] / 2, gaps


def _unipc_scheduler(n: int, order: int):
    """diffusers' UniPC bh2 on a trailing grid, its sigmas recomputed in float64 from
    ``alpha_bar`` (it keeps them in float32, 1e-7 apart), ending at sigma = 0."""
    sched = _scheduler(
        diffusers.UniPCMultistepScheduler, n, solver_order=order, solver_type="bh2",
        timestep_spacing="trailing", lower_order_final=True, final_sigmas_type="zero",
    )  # fmt: skip
    alpha_bar = SCHEDULE.alpha_bar[sched.timesteps.long()]
    sched.sigmas = torch.cat([((1 - alpha_bar) / alpha_bar).sqrt(), torch.zeros(1, dtype=F64)])
    return sched


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("n", [5, 10, 25])
def test_unipc_bh2_with_lower_order_final_matches_unipc_multistep_scheduler(order, n):
    sched, x = _unipc_scheduler(n, order), _start()
    ours = S.unipc(ORACLE, x, _times(sched.timesteps), order=order, bh2=True,
                   lower_order_final=True)  # fmt: skip
    torch.testing.assert_close(ours, _run_vp(sched, x), rtol=0, atol=1e-10)


@pytest.mark.parametrize("options", [{"bh2": True}, {"lower_order_final": True}])
def test_unipc_differs_from_diffusers_without_either_option(options):
    """Each option alone leaves a difference: the exact slope weights, or order 3 to the end."""
    sched, x = _unipc_scheduler(10, 3), _start()
    ours = S.unipc(ORACLE, x, _times(sched.timesteps), order=3, **options)
    assert float((ours - _run_vp(sched, x)).abs().max()) > 1e-4
