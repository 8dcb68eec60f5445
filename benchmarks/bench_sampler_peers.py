"""Deterministic samplers against k-diffusion and diffusers at every budget (issue 14).

Two exact oracles, the same 16-D mixture of 8 Gaussians under two processes:

- ``vp``: DDPM's linear betas, T = 1000 (``sigma_ve`` from 0.01 at t = 1/T to 157 at t = 1);
- ``edm``: EDM's VE process (``sigma`` from 0.002 to 80).

From the same starting noise every sampler runs with the exact denoiser, evaluated at exactly
the noise level the sampler asks for (so the table compares solvers and grids, not the
quantisation of a discrete network), and its output is compared with the exact endpoint of the
probability-flow ODE (DPM-Solver++(3M) with 2000 log-SNR steps down to sigma_ve = 1e-5; the same
with 1000 steps differs from it by the "reference error" printed). Error: mean L2 distance per
sample. The budget is the number of denoiser calls; a sampler takes as many steps as fit, and
the calls it actually made are counted (every method below spends exactly the budget unless
marked).

Each library runs its samplers on its own grids with the problem's noise range:
k-diffusion on ``get_sigmas_karras`` (rho = 7), ``get_sigmas_exponential`` and (vp) difflab's
``trailing`` grid; diffusers' ``DPMSolverMultistep``, ``UniPCMultistep``, ``DEISMultistep`` and
``DPMSolverSinglestep`` (vp: trailing, Karras or Lu lambdas, and their default lower-order final
steps) and ``EDMDPMSolverMultistep`` / ``EDMEuler`` (edm: Karras or exponential).

Usage::

    python benchmarks/bench_sampler_peers.py [--samples 1000] [--budgets 5,6,8,...]
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from difflab.gaussian import samplers as S
from difflab.gaussian.oracles import GaussianMixtureOracle
from difflab.gaussian.schedules import EDMSchedule, Schedule, linear_beta

sys.path.insert(0, str(Path(__file__).parent))
import peer_kdiffusion

try:
    import diffusers

    diffusers.utils.logging.set_verbosity_error()  # its notes on lower_order_final, per call
except ImportError:
    diffusers = None

F64 = torch.float64
BUDGETS = (5, 6, 8, 10, 12, 15, 20, 25, 30, 40, 50)


# ================================================================================================
# Problems
# ================================================================================================


@dataclass
class Problem:
    name: str
    schedule: Schedule
    oracle: GaussianMixtureOracle
    x: Tensor  # starting noise at t = 1 in difflab's state x_t
    reference: Tensor  # exact flow endpoint
    reference_error: float
    sigma_min: float  # the range of sigma_ve the grids span
    sigma_max: float

    def sigma_ve(self, t: float) -> float:
        return float(self.schedule.sigma_ve(torch.tensor(t, dtype=F64)))

    def t_of_sigma(self, sigma: float) -> float:
        return float(self.schedule.t_of_sigma_ve(torch.tensor(float(sigma), dtype=F64)))


def make_problem(name: str, n: int, dim: int = 16) -> Problem:
    schedule: Schedule = linear_beta(1000) if name == "vp" else EDMSchedule(0.002, 80.0)
    gen = torch.Generator().manual_seed(0)
    means = 1.5 * torch.randn(8, dim, generator=gen, dtype=F64)
    stds = 0.3 + 0.4 * torch.rand(8, generator=gen, dtype=F64)
    weights = 0.5 + torch.rand(8, generator=gen, dtype=F64)
    oracle = GaussianMixtureOracle(means, stds, weights, schedule)
    x = schedule.prior_std * torch.randn(n, dim, generator=gen, dtype=F64)

    def flow(steps: int) -> Tensor:
        return S.dpm_solver_pp(oracle, x, S.log_snr_times(schedule, steps, sigma_min=1e-5), order=3)

    reference = flow(2000)
    error = float((flow(1000) - reference).norm(dim=1).mean())
    one = torch.ones((), dtype=F64)
    lo = 1.0 / schedule.T if schedule.T is not None else None
    sigma_min = float(schedule.sigma_ve(one * lo)) if lo else 0.002
    return Problem(
        name, schedule, oracle, x, reference, error, sigma_min, float(schedule.sigma_ve(one))
    )


class Counter:
    """The oracle behind each library's model interface, counting calls."""

    def __init__(self, problem: Problem):
        self.p, self.calls = problem, 0

    def difflab(self):
        def call(x_t, t, cond=None, *, alpha_sigma=None):
            self.calls += 1
            return self.p.oracle(x_t, t, cond, alpha_sigma=alpha_sigma)

        call.schedule = self.p.schedule
        return call

    def at_sigma(self, x: Tensor, sigma: float) -> tuple[Tensor, float]:
        """The prediction at difflab state ``x`` and noise level ``sigma_ve``, and alpha."""
        self.calls += 1
        t = torch.full((x.shape[0],), self.p.t_of_sigma(sigma), dtype=F64)
        alpha, sigma_t = self.p.schedule.alpha_sigma(t[0])
        return self.p.oracle(x, t, alpha_sigma=(alpha, sigma_t)), float(alpha)

    def k_model(self, y: Tensor, sigma: Tensor) -> Tensor:
        """k-diffusion's model(y, sigma) -> x0, with y = x / alpha (the VE state)."""
        s = float(sigma[0])
        alpha = 1 / math.sqrt(1 + s**2) if self.p.schedule.T else 1.0  # VP: alpha^2 = 1/(1+s^2)
        return self.at_sigma(alpha * y, s)[0].x0


@dataclass
class Method:
    library: str
    label: str
    #: run(counter, budget) -> samples, or None when the budget does not fit
    run: Callable[[Counter, int], Tensor | None]


# ================================================================================================
# difflab
# ================================================================================================


def _calls_per_step(name: str, options: dict) -> int:
    if name == "heun":
        return 2
    if name == "dpm_solver":
        return options.get("order", 2)
    return 1


def difflab_method(name: str, grid: str, **options) -> Method:
    def run(c: Counter, budget: int) -> Tensor | None:
        k = _calls_per_step(name, options)
        steps = (budget - 1) // k + 1  # k calls per step but the last
        ts = S.time_grid(c.p.schedule, steps, grid)
        return S.SAMPLERS[name](c.difflab(), c.p.x, ts, **options)

    opts = ",".join(f"{k}={v}" for k, v in options.items())
    return Method("difflab", f"{name}{f'({opts})' if opts else ''} [{grid}]", run)


def difflab_methods(vp: bool) -> list[Method]:
    grids = ["karras", "log-snr", *(["trailing", "linspace"] if vp else [])]
    out = []
    for grid in grids:
        out += [
            difflab_method("dpmpp_2m", grid),
            difflab_method("dpmpp_3m", grid),
            difflab_method("unipc", grid, order=2),
            difflab_method("unipc", grid, order=3),
            difflab_method("unipc", grid, order=3, lower_order_final=True),
            difflab_method("unipc", grid, order=3, lower_order_final=True, bh2=True),
            difflab_method("ipndm", grid, order=3),
            difflab_method("ipndm", grid, order=4),
            difflab_method("lms", grid, order=3),
            difflab_method("lms", grid, order=4),
            difflab_method("lms", grid, order=4, corrector=False),
        ]
    return out


# ================================================================================================
# k-diffusion
# ================================================================================================


def _k_sigmas(kd, p: Problem, grid: str, n: int) -> Tensor:
    if grid == "karras":
        return kd.get_sigmas_karras(n, p.sigma_min, p.sigma_max, rho=7.0).to(F64)
    if grid == "exponential":
        return kd.get_sigmas_exponential(n, p.sigma_min, p.sigma_max).to(F64)
    if grid == "discrete":  # k-diffusion's DiscreteSchedule.get_sigmas: uniform in the index,
        # log sigma interpolated between the T training levels
        log_sigmas = p.schedule.sigma_ve(torch.arange(1, 1001, dtype=F64) / 1000).log()
        index = torch.linspace(999, 0, n, dtype=F64)
        lo = index.floor().long().clamp(max=998)
        w = index - lo
        return kd.append_zero(((1 - w) * log_sigmas[lo] + w * log_sigmas[lo + 1]).exp())
    ts = p.schedule.timesteps(n, "trailing")  # difflab's trailing grid, as sigma_ve
    return p.schedule.sigma_ve(ts).to(F64)


K_SAMPLERS = {  # name: (function, options, calls per step but the last)
    "euler": ("sample_euler", {}, 1),
    "heun": ("sample_heun", {}, 2),
    "dpm_2": ("sample_dpm_2", {}, 2),
    "lms": ("sample_lms", {}, 1),
    "dpmpp_2m": ("sample_dpmpp_2m", {}, 1),
    "dpmpp_2m_sde(eta=0)": ("sample_dpmpp_2m_sde", {"eta": 0.0}, 1),
    "dpmpp_2m_sde(eta=0,heun)": ("sample_dpmpp_2m_sde", {"eta": 0.0, "solver_type": "heun"}, 1),
    "dpmpp_3m_sde(eta=0)": ("sample_dpmpp_3m_sde", {"eta": 0.0}, 1),
    "dpmpp_2s_ancestral(eta=0)": ("sample_dpmpp_2s_ancestral", {"eta": 0.0}, 2),
}


def kdiffusion_method(kd, name: str, grid: str) -> Method:
    fn_name, options, k = K_SAMPLERS[name]

    def run(c: Counter, budget: int) -> Tensor | None:
        sigmas = _k_sigmas(kd, c.p, grid, (budget - 1) // k + 1)
        y = c.p.x * math.sqrt(1 + c.p.sigma_ve(1.0) ** 2) if c.p.schedule.T else c.p.x
        return getattr(kd, fn_name)(c.k_model, y, sigmas, disable=True, **options)

    return Method("k-diffusion", f"{name} [{grid}]", run)


def kdiffusion_fast(kd) -> Method:
    def run(c: Counter, budget: int) -> Tensor | None:
        y = c.p.x * math.sqrt(1 + c.p.sigma_ve(1.0) ** 2) if c.p.schedule.T else c.p.x
        return kd.sample_dpm_fast(c.k_model, y, c.p.sigma_min, c.p.sigma_max, budget, disable=True)

    return Method("k-diffusion", "dpm_fast [log-snr]", run)


def kdiffusion_methods(kd, vp: bool) -> list[Method]:
    grids = ["karras", "exponential", *(["discrete", "trailing"] if vp else [])]
    return [kdiffusion_method(kd, n, g) for g in grids for n in K_SAMPLERS] + [kdiffusion_fast(kd)]


# ================================================================================================
# diffusers
# ================================================================================================


def _vp_scheduler(cls_name: str, p: Problem, **config):
    sched = getattr(diffusers, cls_name)(
        num_train_timesteps=1000,
        beta_schedule="linear",
        beta_start=1e-4,
        beta_end=0.02,
        prediction_type="epsilon",
        **config,
    )
    sched.betas, sched.alphas = p.schedule.betas.clone(), p.schedule.alphas.clone()
    sched.alphas_cumprod = p.schedule.alpha_bar.clone()
    return sched


def diffusers_vp(label: str, cls_name: str, extra_call: bool = False, **config) -> Method:
    """A VP scheduler: state x_t, model eps at the scheduler's own ``sigmas[i]`` (sigma_ve), or
    at its timestep's ``alpha_bar`` (t = (tau + 1) / T) for one without sigmas (PNDM, whose
    PLMS run makes one call more than it has steps)."""

    def run(c: Counter, budget: int) -> Tensor | None:
        sched = _vp_scheduler(cls_name, c.p, **config)
        sched.set_timesteps(budget - 1 if extra_call else budget)
        sigmas = sched.sigmas.to(F64).tolist() if hasattr(sched, "sigmas") else None
        x = c.p.x
        for i, tau in enumerate(sched.timesteps):
            s = sigmas[i] if sigmas else c.p.sigma_ve((float(tau) + 1) / 1000)
            eps = c.at_sigma(x, s)[0].eps
            x = sched.step(eps, tau, x).prev_sample.to(F64)
        return x

    return Method("diffusers", label, run)


def diffusers_edm(label: str, cls_name: str, **config) -> Method:
    """An EDM scheduler: state x (VE), model output F with D = c_skip x + c_out F."""

    def run(c: Counter, budget: int) -> Tensor | None:
        sched = getattr(diffusers, cls_name)(sigma_min=0.002, sigma_max=80.0, **config)
        sched.set_timesteps(budget)
        sigmas = sched.sigmas.to(F64).tolist()
        x = c.p.x
        for i, tau in enumerate(sched.timesteps):
            s = sigmas[i]
            pred = c.at_sigma(x, s)[0]
            c_skip = 0.25 / (s**2 + 0.25)
            c_out = s * 0.5 / math.sqrt(s**2 + 0.25)
            x = sched.step((pred.x0 - c_skip * x) / c_out, tau, x).prev_sample.to(F64)
        return x

    return Method("diffusers", label, run)


def diffusers_methods(vp: bool) -> list[Method]:
    if diffusers is None:
        return []
    if not vp:
        out = []
        for sched in ("karras", "exponential"):
            out += [
                diffusers_edm(
                    f"EDMDPMSolverMultistep {o}M [{sched}]",
                    "EDMDPMSolverMultistepScheduler",
                    solver_order=o,
                    sigma_schedule=sched,
                )
                for o in (2, 3)
            ]
            out.append(
                diffusers_edm(f"EDMEuler [{sched}]", "EDMEulerScheduler", sigma_schedule=sched)
            )
        return out
    grids = {
        "trailing": {"timestep_spacing": "trailing"},
        "karras": {"use_karras_sigmas": True},
        "lu": {"use_lu_lambdas": True},
    }
    out = []
    for grid, g in grids.items():
        for o in (2, 3):
            out.append(
                diffusers_vp(
                    f"DPMSolverMultistep {o}M [{grid}]",
                    "DPMSolverMultistepScheduler",
                    solver_order=o,
                    **g,
                )
            )
        if grid == "lu":
            continue
        for bh in ("bh2",):  # bh1 returns NaN from its step into sigma = 0 (diffusers 0.42.1)
            for o in (2, 3):
                out.append(
                    diffusers_vp(
                        f"UniPCMultistep {bh} {o} [{grid}]",
                        "UniPCMultistepScheduler",
                        solver_order=o,
                        solver_type=bh,
                        **g,
                    )
                )
        out.append(
            diffusers_vp(f"DEISMultistep 3 [{grid}]", "DEISMultistepScheduler", solver_order=3, **g)
        )
    out.append(
        diffusers_vp(
            "DPMSolverSinglestep 3 [default]", "DPMSolverSinglestepScheduler", solver_order=3
        )
    )
    out.append(
        diffusers_vp(
            "DPMSolverSinglestep 3 [karras]",
            "DPMSolverSinglestepScheduler",
            solver_order=3,
            use_karras_sigmas=True,
        )
    )
    for spacing in ("leading", "trailing"):
        out.append(
            diffusers_vp(
                f"PNDM (PLMS) [{spacing}]",
                "PNDMScheduler",
                True,
                skip_prk_steps=True,
                set_alpha_to_one=True,
                timestep_spacing=spacing,
            )
        )
    return out


# ================================================================================================


def errors(problem: Problem, methods: list[Method], budgets) -> dict:
    """``{(library, label, budget): (error, calls)}``."""
    out = {}
    for m in methods:
        for b in budgets:
            c = Counter(problem)
            try:
                y = m.run(c, b)
            except Exception as e:  # a peer's scheduler refusing a configuration
                print(f"  {m.library} {m.label} @ {b}: {type(e).__name__}: {e}", flush=True)
                continue
            if y is None or c.calls > b:
                continue
            err = float((y.to(F64) - problem.reference).norm(dim=1).mean())
            out[m.library, m.label, b] = (err if math.isfinite(err) else math.inf, c.calls)
    return out


def best_table(problem: Problem, results: dict, budgets) -> str:
    lines = [
        f"### {problem.name}: best deterministic sampler per library and budget",
        "",
        "| calls | difflab best | error | k-diffusion best | error | diffusers best | error "
        "| peers' best / difflab's |",
        "|---:|---|---:|---|---:|---|---:|---:|",
    ]
    for b in budgets:
        cells, best = [], {}
        for lib in ("difflab", "k-diffusion", "diffusers"):
            rows = [
                (e, label, calls)
                for (li, label, bb), (e, calls) in results.items()
                if li == lib and bb == b
            ]
            if not rows:
                cells.append("- | -")
                continue
            e, label, calls = min(rows)
            best[lib] = e
            cells.append(f"{label}{'' if calls == b else f' ({calls} calls)'} | {e:.2e}")
        peers = min((best[k] for k in ("k-diffusion", "diffusers") if k in best), default=math.nan)
        ratio = peers / best["difflab"] if "difflab" in best else math.nan
        lines.append(f"| {b} | " + " | ".join(cells) + f" | {ratio:.3f} |")
    return "\n".join(lines)


def full_table(problem: Problem, results: dict, budgets) -> str:
    labels = list(dict.fromkeys((lib, label) for lib, label, _ in results))
    lines = [
        f"### {problem.name}: every method (error; calls in brackets where fewer than the budget)",
        "",
        "| library | sampler [grid] | " + " | ".join(str(b) for b in budgets) + " |",
        "|---|---|" + "---:|" * len(budgets),
    ]
    for lib, label in labels:
        cells = []
        for b in budgets:
            v = results.get((lib, label, b))
            cells.append("-" if v is None else f"{v[0]:.1e}" + ("" if v[1] == b else f" ({v[1]})"))
        lines.append(f"| {lib} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--budgets", default=",".join(map(str, BUDGETS)))
    parser.add_argument("--problems", default="vp,edm")
    parser.add_argument("--libraries", default="difflab,k-diffusion,diffusers")
    parser.add_argument("--full", action="store_true", help="also print every method's row")
    args = parser.parse_args()
    budgets = [int(b) for b in args.budgets.split(",")]
    kd, kd_version = peer_kdiffusion.load()
    libraries = args.libraries.split(",")
    print(
        f"# Samplers against the peers: torch {torch.__version__}, k-diffusion {kd_version}, "
        f"diffusers {diffusers.__version__ if diffusers else 'not installed'}, "
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    )
    for name in args.problems.split(","):
        start = time.perf_counter()
        problem = make_problem(name, args.samples)
        vp = name == "vp"
        methods = []
        if "difflab" in libraries:
            methods += difflab_methods(vp)
        if kd is not None and "k-diffusion" in libraries:
            methods += kdiffusion_methods(kd, vp)
        if "diffusers" in libraries:
            methods += diffusers_methods(vp)
        results = errors(problem, methods, budgets)
        print(
            f"\n## {name}: sigma_ve {problem.sigma_min:.3g}..{problem.sigma_max:.3g}, "
            f"{args.samples} samples, reference error {problem.reference_error:.1e}, "
            f"{time.perf_counter() - start:.0f} s\n"
        )
        print(best_table(problem, results, budgets))
        if args.full:
            print()
            print(full_table(problem, results, budgets))
    print(
        f"\ncommand: python benchmarks/bench_sampler_peers.py --samples {args.samples} "
        f"--budgets {args.budgets} --problems {args.problems}" + (" --full" if args.full else "")
    )


if __name__ == "__main__":
    main()
