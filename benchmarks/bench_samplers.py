"""Sampler benchmark (issue 3): oracle error against NFE, per-step overhead, digits quality.

1. Oracle error: data from a Gaussian mixture (8 components in ``--dim`` dimensions, linear
   betas, T = 1000) whose exact denoiser drives every sampler. Two errors per NFE budget
   (5, 10, 20, 50, 100):
   - ODE error (deterministic samplers): mean L2 distance from the exact probability-flow
     endpoint of the same starting noise (DPM-Solver++(3M) with 2000 log-SNR steps);
   - sliced W2 (64 directions) between the samples and as many exact draws, next to the floor
     (the same distance between two exact samples).
   difflab's samplers and the diffusers schedulers run on the same grid (``trailing`` integer
   timesteps, diffusers' timestep tau = difflab step tau + 1), and difflab's ODE solvers also on
   their recommended grids (Karras rho = 7 for Euler/Heun, uniform log-SNR for the exponential
   integrators). A sampler takes as many steps as fit the budget: Heun (NFE + 1) // 2,
   singlestep DPM-Solver-k (NFE - 1) // k + 1, the others NFE; the NFE actually spent is counted.
   On the trailing grid the last positive time is 1/NFE and every sampler (as in diffusers)
   ends with the jump to x0_hat from there, whose own error against the flow endpoint is
   O(sigma_ve(1/NFE)^2) and bounds what higher orders can gain; a floor row shows it. A grid
   uniform in t also keeps O(1) steps in log-SNR near the data (from t = 2/NFE to 1/NFE,
   h = log(2) / 2 for every NFE), so no solver reaches its asymptotic order on it; the
   log-SNR and Karras rows show the orders (and tests/test_samplers.py measures them).
2. Overhead: the time per denoiser call of everything but the network (a network returning
   zeros), difflab's sampler against diffusers' ``scheduler.step`` loop, as a ratio. difflab's
   time includes its ``Denoiser`` (parameterization conversion, which diffusers does inside
   ``step``); the sampler's own share is shown beside it, and for the stochastic samplers the
   time of the one ``torch.randn`` per step that both libraries draw. All are timed in
   interleaved rounds, the fastest round counting.
3. With ``--checkpoint`` (a digits run of the image recipe): Frechet distance (pixels and the
   digits classifier's features) against held-out digits at 10 and 20 NFE for every sampler,
   next to 1000-step DDPM.

Usage::

    python benchmarks/bench_samplers.py --out runs/bench-samplers.png [--checkpoint RUN]
        [--dim 32] [--samples 2000] [--device cpu]

Prints markdown tables; writes the error-vs-NFE plot to ``--out``.
"""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from difflab.gaussian import samplers as S
from difflab.gaussian.oracles import GaussianMixtureOracle
from difflab.gaussian.parameterization import Denoiser, Prediction
from difflab.gaussian.schedules import linear_beta

try:
    import diffusers
except ImportError:  # the benchmark still runs difflab's half
    diffusers = None

NFES = (5, 10, 20, 50, 100)
T = 1000
SCHEDULE = linear_beta(T, 1e-4, 0.02)
F64 = torch.float64


# ================================================================================================
# Methods: difflab samplers and diffusers schedulers behind one interface
# ================================================================================================


@dataclass
class Method:
    label: str
    deterministic: bool
    #: run(model, x, nfe_budget, generator) -> samples; model(x, tau) gives eps at timestep tau
    run: Callable[[Callable, Tensor, int, torch.Generator], Tensor]


class Counter:
    """The oracle as a network of diffusers' timestep (eps at t = (tau + 1) / T), counting calls."""

    def __init__(self, oracle: GaussianMixtureOracle):
        self.oracle, self.calls = oracle, 0

    def eps_at_timestep(self, x: Tensor, tau: Tensor | float) -> Tensor:
        self.calls += 1
        t = torch.full((x.shape[0],), (float(tau) + 1) / T, dtype=F64)
        return self.oracle(x, t).eps

    def denoiser(self):
        """difflab's view of the same oracle (a DenoiserFn that counts)."""

        def call(x_t, t, cond=None, *, alpha_sigma=None):
            self.calls += 1
            return self.oracle(x_t, t, cond, alpha_sigma=alpha_sigma)

        call.schedule = self.oracle.schedule
        return call


def _steps(name: str, options: dict, nfe: int) -> int:
    if name == "heun":
        return (nfe + 1) // 2
    if name == "dpm_solver":
        return (nfe - 1) // options.get("order", 2) + 1
    return nfe


def difflab_method(name: str, grid: str, **options) -> Method:
    sampler = S.SAMPLERS[name]

    def run(counter: Counter, x: Tensor, nfe: int, gen: torch.Generator) -> Tensor:
        ts = S.time_grid(SCHEDULE, _steps(name, options, nfe), grid)
        return sampler(counter.denoiser(), x, ts, generator=gen, **options)

    opts = ",".join(f"{k}={v}" for k, v in options.items())
    deterministic = name not in ("ddpm", "dpmpp_2m_sde") and options.get("eta", 0) == 0
    return Method(f"difflab {name}{f'({opts})' if opts else ''} [{grid}]", deterministic, run)


def diffusers_method(
    label: str,
    cls_name: str,
    deterministic: bool,
    ve_state: bool = False,
    two_per_step: bool = False,
    **config,
) -> Method:
    """A diffusers scheduler on difflab's float64 alpha_bar with trailing timesteps."""

    def run(counter: Counter, x: Tensor, nfe: int, gen: torch.Generator) -> Tensor:
        sched = _diffusers_scheduler(cls_name, **config)
        sched.set_timesteps((nfe + 1) // 2 if two_per_step else nfe)
        kwargs = {} if deterministic or ve_state else {"generator": gen}
        if ve_state:  # k-diffusion state y = x / alpha, model input scale_model_input(y)
            y = x * (1 + sched.sigmas[0].double() ** 2).sqrt()
            for tau in sched.timesteps:
                eps = counter.eps_at_timestep(sched.scale_model_input(y, tau), tau)
                y = sched.step(eps, tau, y, **kwargs).prev_sample
            return y.double()
        for tau in sched.timesteps:
            x = sched.step(counter.eps_at_timestep(x, tau), tau, x, **kwargs).prev_sample
        return x.double()

    return Method(f"diffusers {label}", deterministic, run)


def _diffusers_scheduler(cls_name: str, **config):
    sched = getattr(diffusers, cls_name)(
        num_train_timesteps=T,
        beta_schedule="linear",
        beta_start=1e-4,
        beta_end=0.02,
        prediction_type="epsilon",
        timestep_spacing="trailing",
        **config,
    )
    sched.betas, sched.alphas = SCHEDULE.betas.clone(), SCHEDULE.alphas.clone()
    sched.alphas_cumprod = SCHEDULE.alpha_bar.clone()
    return sched


def all_methods() -> list[Method]:
    methods = [
        difflab_method("ddpm", "trailing"),
        difflab_method("ddim", "trailing"),
        difflab_method("euler", "trailing"),
        difflab_method("heun", "trailing"),
        difflab_method("dpm_solver", "trailing", order=2),
        difflab_method("dpm_solver", "trailing", order=3),
        difflab_method("dpmpp_2m", "trailing"),
        difflab_method("dpmpp_3m", "trailing"),
        difflab_method("dpmpp_2m_sde", "trailing"),
        difflab_method("unipc", "trailing", order=2),
        difflab_method("unipc", "trailing", order=3),
        difflab_method("euler", "karras"),
        difflab_method("heun", "karras"),
        difflab_method("dpm_solver", "log-snr", order=3),
        difflab_method("dpmpp_2m", "log-snr"),
        difflab_method("dpmpp_3m", "log-snr"),
        difflab_method("unipc", "log-snr", order=3),
    ]
    if diffusers is None:
        return methods
    return [
        *methods,
        diffusers_method("DDPMScheduler", "DDPMScheduler", False, clip_sample=False),
        diffusers_method(
            "DDIMScheduler", "DDIMScheduler", True, clip_sample=False, set_alpha_to_one=True
        ),
        diffusers_method("EulerDiscreteScheduler", "EulerDiscreteScheduler", True, ve_state=True),
        diffusers_method(
            "HeunDiscreteScheduler", "HeunDiscreteScheduler", True, ve_state=True, two_per_step=True
        ),
        diffusers_method(
            "DPMSolverMultistep 2M",
            "DPMSolverMultistepScheduler",
            True,
            algorithm_type="dpmsolver++",
            solver_order=2,
        ),
        diffusers_method(
            "DPMSolverMultistep 3M",
            "DPMSolverMultistepScheduler",
            True,
            algorithm_type="dpmsolver++",
            solver_order=3,
        ),
        diffusers_method(
            "DPMSolverMultistep 2M-SDE",
            "DPMSolverMultistepScheduler",
            False,
            algorithm_type="sde-dpmsolver++",
            solver_order=2,
        ),
        diffusers_method(
            "UniPCMultistep (bh2, 2)", "UniPCMultistepScheduler", True, solver_order=2
        ),
        diffusers_method(
            "UniPCMultistep (bh2, 3)", "UniPCMultistepScheduler", True, solver_order=3
        ),
    ]


# ================================================================================================
# 1. Oracle error against NFE
# ================================================================================================


def mixture(dim: int, seed: int = 0) -> GaussianMixtureOracle:
    gen = torch.Generator().manual_seed(seed)
    means = 1.5 * torch.randn(8, dim, generator=gen, dtype=F64)
    stds = 0.3 + 0.4 * torch.rand(8, generator=gen, dtype=F64)
    weights = 0.5 + torch.rand(8, generator=gen, dtype=F64)
    return GaussianMixtureOracle(means, stds, weights, SCHEDULE)


def sliced_w2(a: Tensor, b: Tensor, directions: Tensor) -> float:
    pa, pb = (a @ directions).sort(0).values, (b @ directions).sort(0).values
    return float(((pa - pb) ** 2).mean().sqrt())


def oracle_errors(dim: int, n: int) -> tuple[dict, dict, dict, float]:
    oracle = mixture(dim)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, dim, generator=gen, dtype=F64)
    exact = oracle.sample(n, gen)
    directions = torch.randn(dim, 64, generator=gen, dtype=F64)
    directions /= directions.norm(dim=0)
    floor = sliced_w2(exact, oracle.sample(n, gen), directions)
    flow = S.dpm_solver_pp(oracle, x, S.log_snr_times(SCHEDULE, 2000, sigma_min=1e-4), order=3)
    ode, sw, spent = {}, {}, {}
    for method in all_methods():
        for nfe in NFES:
            counter = Counter(oracle)
            out = method.run(counter, x, nfe, torch.Generator().manual_seed(2))
            spent[method.label, nfe] = counter.calls
            sw[method.label, nfe] = sliced_w2(out, exact, directions)
            if method.deterministic:
                ode[method.label, nfe] = float((out - flow).norm(dim=1).mean())
        print(f"  ran {method.label}", flush=True)
    # Every sampler's last step jumps to x0_hat from its last positive time: on the trailing
    # grid t = 1/NFE, and even the exact flow followed by that jump is this far from the endpoint.
    for nfe in NFES:
        sigma_last = float(SCHEDULE.sigma_ve(SCHEDULE.timesteps(nfe, "trailing")[-2]))
        grid = S.log_snr_times(SCHEDULE, 400, sigma_min=sigma_last)
        jumped = S.dpm_solver_pp(oracle, x, grid, order=3)
        ode[JUMP_FLOOR, nfe] = float((jumped - flow).norm(dim=1).mean())
        spent[JUMP_FLOOR, nfe] = nfe
    return ode, sw, spent, floor


JUMP_FLOOR = "floor: exact flow to the last trailing time, then the jump to x0_hat"


def table(title: str, values: dict, spent: dict) -> str:
    labels = list(dict.fromkeys(label for label, _ in values))
    lines = [
        f"### {title}",
        "",
        "| sampler | " + " | ".join(f"NFE {n}" for n in NFES) + " |",
        "|---|" + "---:|" * len(NFES),
    ]
    for label in labels:
        cells = []
        for nfe in NFES:
            v = values.get((label, nfe))
            used = spent[label, nfe]
            cells.append("-" if v is None else f"{v:.2e}" + (f" ({used})" if used != nfe else ""))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(ode: dict, sw: dict, spent: dict, floor: float, out: Path) -> None:
    """Both errors against NFE, one colour per sampler (solid difflab, dashed diffusers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(label for label, _ in [*sw, *ode]))
    colours = dict(zip(labels, plt.cm.turbo([i / len(labels) for i in range(len(labels))]),
                       strict=True))  # fmt: skip
    fig, axes = plt.subplots(1, 2, figsize=(18, 7))
    for ax, values, title in (
        (axes[0], ode, "ODE error vs the exact flow endpoint"),
        (axes[1], sw, "sliced W2 vs exact samples"),
    ):
        for label in dict.fromkeys(label for label, _ in values):
            nfes = [spent[label, n] for n in NFES if (label, n) in values]
            errs = [values[label, n] for n in NFES if (label, n) in values]
            style = ":" if label == JUMP_FLOOR else "-" if label.startswith("difflab") else "--"
            ax.loglog(nfes, errs, style, color=colours[label], marker="o", ms=3, label=label)
        ax.set_xlabel("NFE")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    axes[1].axhline(floor, color="k", lw=0.8, ls=":", label="sampling floor (exact vs exact)")
    handles = {h.get_label(): h for ax in axes for h in ax.get_lines()}
    fig.legend(handles.values(), handles.keys(), loc="center right", fontsize=7)
    fig.tight_layout(rect=(0, 0, 0.78, 1))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)


# ================================================================================================
# 2. Overhead per denoiser call
# ================================================================================================

OVERHEAD_PAIRS = [  # difflab sampler, diffusers scheduler and config, k-diffusion state
    ("ddpm", "DDPMScheduler", {"clip_sample": False}, False),
    ("ddim", "DDIMScheduler", {"clip_sample": False, "set_alpha_to_one": True}, False),
    ("euler", "EulerDiscreteScheduler", {}, True),
    ("heun", "HeunDiscreteScheduler", {}, True),
    ("dpmpp_2m", "DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}, False),
    ("dpmpp_2m_sde", "DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}, False),
    ("unipc", "UniPCMultistepScheduler", {}, False),
]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _best_of(fns: dict[str, Callable[[], int]], device: torch.device, repeats: int) -> dict:
    """Shortest wall time of each ``fn`` per call of the network it reports, over ``repeats``
    rounds in which every ``fn`` runs once in turn (so that a slow spell of a shared machine
    hits all of them alike)."""
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for key, fn in fns.items():
            _sync(device)
            start = time.perf_counter()
            calls = fn()
            _sync(device)
            best[key] = min(best[key], (time.perf_counter() - start) / calls)
    return best


class _Fixed:
    """A DenoiserFn with no work at all: it returns one precomputed Prediction (zeros)."""

    def __init__(self, x: Tensor):
        self.schedule = SCHEDULE
        one = torch.ones((), dtype=x.dtype, device=x.device)
        self.prediction = Prediction(x, one, one, x0=torch.zeros_like(x), eps=torch.zeros_like(x))

    def __call__(self, x_t: Tensor, t: Tensor, cond=None, *, alpha_sigma=None) -> Prediction:
        return self.prediction


def _difflab_loop(
    name: str, x: Tensor, n: int, device: torch.device, bare: bool = False
) -> Callable[[], int]:
    """difflab's sampler with a network returning zeros behind a Denoiser (parameterization
    conversion and schedule evaluation included), or with no denoiser work at all (bare)."""
    zeros = _Fixed(x) if bare else Denoiser(lambda x, c, **k: torch.zeros_like(x), SCHEDULE, "eps")
    ts = SCHEDULE.timesteps(n)
    gen = torch.Generator(device).manual_seed(0)

    def run() -> int:
        S.SAMPLERS[name](zeros, x, ts, generator=gen)
        return 2 * n - 1 if name == "heun" else n

    return run


def _diffusers_loop(sched, x: Tensor, n: int, ve_state: bool, device) -> Callable[[], int]:
    def run() -> int:
        sched.set_timesteps(n, device=device)  # also resets the multistep solvers' history
        y = x
        for tau in sched.timesteps:
            model_in = sched.scale_model_input(y, tau) if ve_state else y
            y = sched.step(torch.zeros_like(model_in), tau, y).prev_sample
        return len(sched.timesteps)

    return run


#: The samplers that draw one Gaussian noise tensor per step (both libraries by ``torch.randn``).
STOCHASTIC = ("ddpm", "dpmpp_2m_sde")


def overhead(shape: tuple[int, ...], device: torch.device, steps: int = 50, repeats: int = 15):
    """Per network call: difflab's whole sampler call (its precomputation included) against
    diffusers' loop of ``scale_model_input`` + ``step`` (``set_timesteps`` subtracted).

    For the stochastic samplers the time of the noise draw both make (one ``torch.randn`` of
    ``x``'s shape) is also reported, and the ratio with it taken out of both sides."""
    x = torch.randn(shape, device=device)
    gen = torch.Generator(device).manual_seed(0)

    def draw() -> int:
        torch.randn(shape, generator=gen, device=device)
        return 1

    rows = []
    for name, cls_name, config, ve_state in OVERHEAD_PAIRS:
        n = (steps + 1) // 2 if name == "heun" else steps
        fns = {
            "difflab": _difflab_loop(name, x, n, device),
            "bare": _difflab_loop(name, x, n, device, True),
            "draw": draw,
        }
        if diffusers is not None:
            sched = _diffusers_scheduler(cls_name, **config)
            fns["diffusers"] = _diffusers_loop(sched, x, n, ve_state, device)
            fns["setup"] = lambda s=sched, k=n: s.set_timesteps(k, device=device) or 1
        calls = {key: fn() for key, fn in fns.items()}  # warm-up
        row = {"sampler": name, **_best_of(fns, device, repeats)}
        if diffusers is not None:
            row["diffusers"] -= row.pop("setup") / calls["diffusers"]
            row["ratio"] = row["difflab"] / row["diffusers"]
            if name in STOCHASTIC:
                draw_time = row["draw"]
                row["ratio_without_draw"] = (row["difflab"] - draw_time) / (
                    row["diffusers"] - draw_time
                )
        if name not in STOCHASTIC:
            del row["draw"]
        rows.append(row)
    return rows


def overhead_table(shape: tuple[int, ...], rows: list[dict]) -> str:
    lines = [
        f"### Overhead per denoiser call, x of shape {shape} (network returns zeros)",
        "",
        "| sampler | difflab (us) | of which sampler alone (us) | diffusers step (us) | ratio "
        "| noise draw (us) | ratio without the draw |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ours = f"{1e6 * r['difflab']:.0f} | {1e6 * r['bare']:.0f}"
        theirs = f"{1e6 * r['diffusers']:.0f} | {r['ratio']:.2f}" if "diffusers" in r else "- | -"
        draw = f"{1e6 * r['draw']:.0f} | {r['ratio_without_draw']:.2f}" if "draw" in r else "- | -"
        lines.append(f"| {r['sampler']} | {ours} | {theirs} | {draw} |")
    return "\n".join(lines)


# ================================================================================================
# 3. Digits model quality
# ================================================================================================


#: The samplers of the digits table: the score-SDE family (``pc``, ``annealed_langevin``, ...)
#: needs far more than 20 NFE and is measured on the oracle only.
FAST_SAMPLERS = ("ddpm", "ddim", "euler", "heun", "dpm_solver", "dpmpp_2m", "dpmpp_3m",
                 "dpmpp_2m_sde", "unipc")  # fmt: skip


def digits_quality(
    checkpoint: Path, device: str, n_per_class: int, grids: tuple[str, ...] = ("trailing",)
) -> str:
    import difflab
    from difflab.data.images import digits_split
    from difflab.evaluate.digits_classifier import load_digits_classifier
    from difflab.evaluate.frechet import frechet_distance_from_samples

    run = difflab.load(checkpoint, device)
    if run.recipe.name != "image":
        raise SystemExit(f"{checkpoint} is a {run.recipe.name} run, not of the image recipe")
    _, held_out = digits_split()
    judge = load_digits_classifier()
    labels = torch.arange(10).repeat_interleave(n_per_class)
    schedule = run.model.denoiser.schedule

    def fd(name: str, nfe: int, grid: str, **options) -> tuple[float, float]:
        # The run's own x_0 threshold (static for images); starting noise from seed 0.
        samples = run.sample(
            len(labels),
            sampler=name,
            steps=_steps(name, options, nfe),
            grid=grid,
            label=labels,
            seed=0,
            sampler_options=options,
        )
        out = samples.x.clamp(-1, 1).cpu()
        pixels = frechet_distance_from_samples(out.flatten(1), held_out.x.flatten(1))
        feats = frechet_distance_from_samples(judge.features(out), judge.features(held_out.x))
        return pixels, feats

    full = schedule.T or T  # DDPM on the whole training grid (1000 steps if continuous)
    base = fd("ddpm", full, "trailing")
    lines = [
        "### Digits model: Frechet distance to held-out digits",
        "",
        f"DDPM with {full} steps: pixels {base[0]:.3f}, features {base[1]:.3f}; "
        f"{len(labels)} class-conditional samples per row.",
        "",
        "| sampler | grid | NFE | FD pixels | x DDPM | FD features | x DDPM |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name, grid in [(n, g) for g in grids for n in FAST_SAMPLERS]:
        if grid != "trailing" and name in ("ddpm", "ddim"):
            continue  # they step on the training grid
        for nfe in (10, 20):
            pix, feat = fd(name, nfe, grid)
            lines.append(
                f"| {name} | {grid} | {nfe} | {pix:.3f} | {pix / base[0]:.2f} | "
                f"{feat:.3f} | {feat / base[1]:.2f} |"
            )
        print(f"  ran {name}", flush=True)
    return "\n".join(lines)


# ================================================================================================


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/bench-samplers.png"))
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--device", default="cpu", help="device for the overhead timings")
    parser.add_argument("--checkpoint", type=Path, help="a digits run for the quality table")
    parser.add_argument("--n-per-class", type=int, default=100)
    parser.add_argument("--skip-errors", action="store_true")
    parser.add_argument("--skip-overhead", action="store_true")
    parser.add_argument(
        "--grids", default="trailing,karras", help="time grids of the digits table (comma list)"
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    version = diffusers.__version__ if diffusers is not None else "not installed"
    cpu = platform.processor() or platform.machine()
    print(
        f"# Samplers: torch {torch.__version__}, diffusers {version}, {cpu}, "
        f"{torch.get_num_threads()} threads"
    )

    if not args.skip_errors:
        print(f"\n## Oracle error: {args.dim}-D mixture of 8 Gaussians, {args.samples} samples")
        ode, sw, spent, floor = oracle_errors(args.dim, args.samples)
        print()
        print(table("ODE error (mean L2 to the exact flow endpoint); (k) = NFE spent", ode, spent))
        print()
        print(table(f"Sliced W2 to exact samples (floor {floor:.3f})", sw, spent))
        plot(ode, sw, spent, floor, args.out)
        print(f"\nplot: {args.out}")

    device = torch.device(args.device)
    if not args.skip_overhead:
        print(f"\n## Overhead on {device}")
        for shape in ((16, 2), (4, 4, 64, 64)):
            print()
            print(overhead_table(shape, overhead(shape, device)))

    if args.checkpoint is not None:
        if not args.checkpoint.exists():
            print(f"\n{args.checkpoint} does not exist: digits quality skipped")
        else:
            print()
            grids = tuple(args.grids.split(","))
            print(digits_quality(args.checkpoint, args.device, args.n_per_class, grids))
    print(
        f"\ncommand: python benchmarks/bench_samplers.py --out {args.out} --dim {args.dim} "
        f"--samples {args.samples} --device {args.device}"
        + (f" --checkpoint {args.checkpoint} --grids {args.grids}" if args.checkpoint else "")
        + (" --skip-errors" if args.skip_errors else "")
        + (" --skip-overhead" if args.skip_overhead else "")
    )


if __name__ == "__main__":
    main()
