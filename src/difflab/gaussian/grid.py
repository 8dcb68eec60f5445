"""What every Gaussian sampler shares (``samplers.py``, ``sde.py``, ``langevin.py``): the
validated grid of sampling times with the schedule's values there, and the per-step callback.

A grid is ``1 >= t_0 > t_1 > ... > t_n = 0``: ``n`` steps, the last onto the data. At each time
it holds ``alpha_i = alpha(t_i)``, ``sigma_i = sigma(t_i)`` and the half log-SNR
``ell_i = log(alpha_i / sigma_i) = lambda(t_i) / 2`` (``+inf`` at ``t_n = 0``), in float64 on the
host, so a sampler computes its step weights once, before its loop (docs/design.md notation).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from difflab.gaussian.schedules import Schedule

Callback = Callable[[int, float, Tensor, Tensor], None]
"""``callback(i, t, x_t, x0)``: the step index ``i``, the time ``t`` (a float) at which the
denoiser was first evaluated in that step, the state ``x_t`` there and the denoiser's data
estimate ``x0``."""


class Grid:
    """The times ``ts`` (validated as above) for ``schedule``.

    Attributes: ``ts`` (float64 CPU tensor of ``n + 1`` times), ``n``, and as float64 host lists
    ``t``, ``alpha``, ``sigma`` and ``ell``; ``alpha_t`` and ``sigma_t`` are the float64 tensors.
    """

    def __init__(self, schedule: Schedule, ts: Tensor | Sequence[float]):
        ts = torch.as_tensor(ts, dtype=torch.float64).detach().cpu()
        if ts.ndim != 1 or len(ts) < 2:
            raise ValueError("ts must be a 1-D sequence of at least two times (one step)")
        if float(ts[-1]) != 0.0:
            raise ValueError(f"ts must end with exactly 0 (the data), got {float(ts[-1])}")
        if not bool((ts[:-1] > ts[1:]).all()):
            raise ValueError("ts must be strictly decreasing")
        if float(ts[0]) > 1.0:
            raise ValueError(f"times must lie in [0, 1], got ts[0] = {float(ts[0])}")
        self.schedule = schedule
        self.ts = ts
        self.n = len(ts) - 1
        alpha, sigma = schedule.alpha_sigma(ts)
        self.alpha_t, self.sigma_t = alpha.to(torch.float64), sigma.to(torch.float64)
        self.t: list[float] = ts.tolist()
        self.alpha: list[float] = self.alpha_t.tolist()
        self.sigma: list[float] = self.sigma_t.tolist()
        self.ell: list[float] = (self.alpha_t.log() - self.sigma_t.log()).tolist()

    def on(self, x: Tensor) -> list[Tensor]:
        """Each ``t_i`` as a ``(B,)`` float64 tensor on ``x``'s device (one transfer)."""
        return list(self.ts.to(x.device)[:, None].expand(-1, x.shape[0]).unbind())
