"""The one training loop of difflab, for every recipe (images, vectors, text).

AdamW with linear warm-up then constant or cosine learning rate, gradient clipping, an EMA of
the weights (``ema_t = d_t ema_{t-1} + (1 - d_t) theta_t`` with ``d_t = min(ema, (1+t)/(10+t))``),
a progress bar, a CSV loss log and atomic checkpoints (``checkpoint.py``).

Reproducibility: one ``torch.Generator`` draws every batch index, time and noise; its state, the
global RNG (dropout) and the optimiser are saved in the checkpoint, so ``resume=True`` continues
with exactly the losses of an uninterrupted run. A resumed run may also change the keys in
:data:`RESUMABLE_KEYS` (e.g. raise ``train.steps``; the cosine learning rate then stretches) and
``train.out`` (the folder may be spelled differently, moved or copied).

Safety of the run folder: the trainer holds an exclusive lock on it (``.lock``) for the whole
run, so a second training into the same folder is refused; it removes the temporary files of
writes that a killed run left behind; it checks that the weights and their EMA are finite before
every save, so a diverging run never replaces its last good checkpoint. Ctrl-C and SIGTERM
finish the current step, save a checkpoint and raise :class:`Interrupted`.
"""

from __future__ import annotations

import csv
import fcntl
import json
import math
import os
import signal
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from difflab.config import TrainConfig
from difflab.errors import UserError
from difflab.files import file_error, make_folder, remove_stale_temp_files, write_text
from difflab.train.checkpoint import (
    CONFIG_FILENAME,
    FILENAME,
    load_checkpoint,
    optimizer_state,
    resolve_checkpoint,
    save_checkpoint,
    write_config_file,
)

LossFn = Callable[[nn.Module, tuple[Tensor, ...], torch.Generator], Tensor]
LOG_NAME = "loss.csv"
LOG_HEADER = "step,loss,lr,seconds\n"
LOCK_NAME = ".lock"

#: Train settings a resumed run may change: how long it runs, how it reports, and the learning
#: rate (the fix for a run that diverged: resume from its last good checkpoint with a lower one).
RESUMABLE_KEYS = ("steps", "log_every", "ckpt_every", "max_minutes", "device", "lr")


class Interrupted(Exception):
    """Training stopped by Ctrl-C or SIGTERM after saving a checkpoint at ``step``."""

    def __init__(self, step: int, path: Path):
        super().__init__(f"interrupted at step {step}; checkpoint saved to {path}")
        self.step, self.path = step, path


@dataclass
class TrainResult:
    """``stopped_early``: ``train.max_minutes`` ended the run before ``train.steps`` (continue it
    with ``resume=True``)."""

    steps: int
    seconds: float
    checkpoint: Path
    log: Path
    images_per_second: float
    stopped_early: bool


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and (device.index or 0) >= (count := torch.cuda.device_count()):
        raise UserError(f"the device {name!r} was asked for, but this machine has {count} CUDA "
                        "devices")  # fmt: skip
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N")
    return device


def load_ema(net: nn.Module, ema: dict[str, Tensor], path: str | Path, device: str) -> nn.Module:
    """``net`` with the EMA weights of a checkpoint, on ``device``, in eval mode. Non-finite
    weights (a diverged run) and weights that do not fit the network (a checkpoint from another
    config) are a :class:`UserError`."""
    bad = [name for name, t in ema.items() if not _all_finite([t])]
    if bad:
        raise UserError(
            f"{path} holds non-finite weights ({bad[0]}"
            f"{f' and {len(bad) - 1} more' if len(bad) > 1 else ''}): its training diverged; "
            "use an earlier checkpoint or train again with a lower train.lr"
        )
    try:
        net.load_state_dict(ema)
    except RuntimeError as e:
        raise UserError(
            f"{path} does not match the model its config describes: {_reason(e)}"
        ) from None
    return net.to(resolve_device(device)).eval()


def learning_rate_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of ``cfg.lr`` at optimiser step ``step`` (0-based)."""
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    if cfg.lr_schedule == "constant":
        return 1.0
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class Trainer:
    """Train ``model`` on in-memory ``tensors`` (sampled with replacement) with ``loss_fn``.

    ``loss_fn(model, batch, generator)`` returns the scalar loss of one batch; ``batch`` is the
    tuple of ``tensors`` indexed by a random batch of rows. ``run_config`` (``"recipe"``, the
    nested ``"config"`` and whatever else rebuilds the model) is stored in every checkpoint so
    that ``difflab sample`` can rebuild the model.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        tensors: tuple[Tensor, ...],
        cfg: TrainConfig,
        run_config: dict[str, Any],
        out: Path,
    ):
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.model = model.to(self.device)
        self.loss_fn = loss_fn
        self.tensors = tuple(t.to(self.device) for t in tensors)
        self.run_config = run_config
        self.out = Path(out)
        self.params = list(self.model.parameters())
        self.weights = [p.detach() for p in self.params]  # views: they follow the updates
        self.ema = [w.clone() for w in self.weights]
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.generator = torch.Generator(self.device)
        self.autocast = torch.autocast("cuda", torch.bfloat16, enabled=self.device.type == "cuda")
        self.step = 0
        self.saved_step: int | None = None  # the step of the run's last good checkpoint
        # Sum and count of the losses since the last log row (part of the resumable state).
        self._running = torch.zeros((), device=self.device)
        self._n_running = 0

    # ------------------------------------------------------------------ the loop
    def fit(self, resume: bool = False, progress: bool = True) -> TrainResult:
        """Train up to ``train.steps`` (or until ``train.max_minutes``), logging every
        ``log_every`` and checkpointing every ``ckpt_every`` steps and at the end."""
        cfg = self.cfg
        if resume:
            resolve_checkpoint(self.out)  # no run to resume: say so before creating anything
        with _lock(make_folder(self.out)):
            self._begin(resume)
            start, start_step = time.perf_counter(), self.step
            with (
                self._log() as log,
                _progress_bar(cfg, self.step, progress) as bar,
                _stop_requests() as stop,
            ):
                self.model.train()
                while self.step < cfg.steps:
                    lr = self._optimisation_step()
                    if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                        self._log_row(log, bar, lr, time.perf_counter() - start)
                    bar.update(1)
                    if self.step % cfg.ckpt_every == 0 and self.step < cfg.steps:
                        self.save()
                    if stop:
                        raise Interrupted(self.step, self.save())
                    if cfg.max_minutes and (time.perf_counter() - start) / 60 > cfg.max_minutes:
                        bar.write(f"stopping at step {self.step}: train.max_minutes reached")
                        break
            path = self.save()
        seconds = time.perf_counter() - start
        return TrainResult(
            steps=self.step,
            seconds=seconds,
            checkpoint=path,
            log=self.out / LOG_NAME,
            images_per_second=(self.step - start_step) * cfg.batch_size / max(seconds, 1e-9),
            stopped_early=self.step < cfg.steps,
        )

    # ------------------------------------------------------------------ its stages
    def _begin(self, resume: bool) -> None:
        """Clear what killed runs left, then restore the checkpoint or start afresh, and write
        ``config.json``."""
        remove_stale_temp_files(self.out, (FILENAME, CONFIG_FILENAME, LOG_NAME))
        if resume:
            self._restore()
        else:
            if (self.out / FILENAME).exists():
                raise UserError(
                    f"{self.out} already holds a run: pass --resume to continue it "
                    "or choose another train.out"
                )
            torch.manual_seed(self.cfg.seed)
            self.generator.manual_seed(self.cfg.seed)
            write_text(self.out / LOG_NAME, LOG_HEADER)
        write_config_file(self.out, self.run_config)

    def _optimisation_step(self) -> float:
        """One AdamW step on a random batch, then the EMA update; returns the learning rate."""
        cfg = self.cfg
        lr = cfg.lr * learning_rate_factor(self.step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        idx = torch.randint(self.tensors[0].shape[0], (cfg.batch_size,), device=self.device,
                            generator=self.generator)  # fmt: skip
        batch = tuple(t[idx] for t in self.tensors)
        with self.autocast:
            loss = self.loss_fn(self.model, batch, self.generator)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
        self.optimizer.step()
        self.step += 1
        decay = min(cfg.ema, (1 + self.step) / (10 + self.step))
        torch._foreach_lerp_(self.ema, self.weights, 1.0 - decay)
        self._running += loss.detach()
        self._n_running += 1
        return lr

    def _log_row(self, log: TextIO, bar: tqdm, lr: float, elapsed: float) -> None:
        """Append the mean loss since the last row to ``loss.csv``; a non-finite mean stops
        the run (its last checkpoint is kept)."""
        mean = float(self._running) / self._n_running
        if not math.isfinite(mean):
            raise self._diverged(f"the loss became {mean}")
        try:
            csv.writer(log).writerow([self.step, repr(mean), f"{lr:.6g}", f"{elapsed:.2f}"])
            log.flush()
        except OSError as e:
            raise file_error(e, self.out / LOG_NAME) from None
        bar.set_postfix(loss=f"{mean:.4f}", lr=f"{lr:.2e}")
        self._running.zero_()
        self._n_running = 0

    def save(self) -> Path:
        """Checkpoint the current step, unless the weights are no longer finite: then the last
        good checkpoint stays and the run stops with a :class:`UserError`."""
        model = self.model.state_dict()
        if not _all_finite([*model.values(), *self.ema]):
            raise self._diverged("the weights became non-finite")
        path = self.out / FILENAME
        save_checkpoint(
            path,
            config=self.run_config,
            step=self.step,
            model=model,
            ema=self.ema_state(),
            optimizer=self.optimizer,
            rng=self._rng_state(),
            extra={"running_loss": float(self._running), "running_count": self._n_running},
        )
        self.saved_step = self.step
        return path

    def _restore(self) -> None:
        """Continue from the checkpoint in ``out``: weights, EMA, optimiser, RNGs, log."""
        ckpt = load_checkpoint(self.out)
        if differences := _config_differences(ckpt.config, self.run_config):
            raise UserError(
                f"the checkpoint in {self.out} was trained with a different config "
                f"({'; '.join(differences)}): resume with the same config, or choose another "
                "train.out"
            )
        names = [n for n, _ in self.model.named_parameters()]
        missing = [f"ema.{n}" for n in names if n not in ckpt.ema]
        missing += [f"rng.{k}" for k in ("generator", "torch") if k not in ckpt.rng]
        if missing:
            raise UserError(
                f"the checkpoint in {self.out} cannot be resumed: it lacks "
                f"{', '.join(missing[:3])}{' and more' if len(missing) > 3 else ''}"
            )
        try:
            self.model.load_state_dict(ckpt.model)
            self.optimizer.load_state_dict(optimizer_state(ckpt))
            self.generator.set_state(ckpt.rng["generator"])
            torch.set_rng_state(ckpt.rng["torch"])
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            raise UserError(
                f"the checkpoint in {self.out} does not fit this model: {_reason(e)}"
            ) from None
        self.ema = [ckpt.ema[n].to(self.device) for n in names]
        if "cuda" in ckpt.rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(ckpt.rng["cuda"], self.device)
        self.step = self.saved_step = ckpt.step
        self._running.fill_(ckpt.extra.get("running_loss", 0.0))
        self._n_running = ckpt.extra.get("running_count", 0)
        _truncate_log(self.out / LOG_NAME, self.step)

    @contextmanager
    def _log(self) -> Iterator[TextIO]:
        path = self.out / LOG_NAME
        try:
            log = path.open("a", newline="")
        except OSError as e:
            raise file_error(e, path) from None
        with log:
            yield log

    def _diverged(self, what: str) -> UserError:
        if self.saved_step is None:
            kept = "no checkpoint was written"
        else:
            kept = f"the checkpoint of step {self.saved_step} in {self.out} is kept"
        return UserError(
            f"{what} at step {self.step}; {kept}: lower train.lr (now {self.cfg.lr:g})"
            + ("" if self.saved_step is None else " and pass --resume to continue from it")
        )

    # ------------------------------------------------------------------ state
    def ema_state(self) -> dict[str, Tensor]:
        names = [n for n, _ in self.model.named_parameters()]
        state = dict(zip(names, self.ema, strict=True))
        saved = self.model.state_dict()  # the persistent buffers (not DiT's position table)
        state.update({n: b for n, b in self.model.named_buffers() if n in saved})
        return state

    def _rng_state(self) -> dict[str, Tensor]:
        rng = {"generator": self.generator.get_state(), "torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return rng


# ---------------------------------------------------------------------- helpers


@contextmanager
def _lock(folder: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``folder/.lock`` for the block (the kernel releases it if
    the process dies), so that no two trainings write into one run folder."""
    path = folder / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise file_error(e, path) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(
                f"{folder} is in use by another training (it holds {path}): wait for it to "
                "finish, or choose another train.out"
            ) from None
        except OSError as e:
            raise file_error(e, path) from None
        yield
    finally:
        os.close(fd)


@contextmanager
def _stop_requests() -> Iterator[list[int]]:
    """Within the block, Ctrl-C (SIGINT) and SIGTERM (sent by schedulers and ``docker stop``)
    only append their number to the yielded list, which the loop checks after each step; a
    second signal of the same kind acts at once (its previous handler is back)."""
    requested: list[int] = []
    previous: dict[int, Any] = {}

    def request_stop(signum: int, frame: Any) -> None:
        requested.append(signum)
        signal.signal(signum, previous[signum])

    for signum in (signal.SIGINT, signal.SIGTERM):
        previous[signum] = signal.signal(signum, request_stop)
    try:
        yield requested
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _progress_bar(cfg: TrainConfig, step: int, progress: bool) -> tqdm:
    return tqdm(total=cfg.steps, initial=step, disable=not progress, unit="step",
                dynamic_ncols=True)  # fmt: skip


def _all_finite(tensors: Iterable[Tensor]) -> bool:
    """Whether every floating-point tensor holds only finite values (one device sync)."""
    flags = [t.isfinite().all() for t in tensors if t.is_floating_point()]
    return not flags or bool(torch.stack(flags).all())


def _reason(error: Exception) -> str:
    """A PyTorch loading error on one line: ``load_state_dict`` puts the reason after a first
    line "Error(s) in loading state_dict for Net:"."""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    text = "; ".join(lines[1:] or lines)
    return text if len(text) <= 400 else text[:397] + "..."


def _config_differences(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """The differences that forbid resuming a run saved with ``saved`` under ``now``, one per
    dotted key (``model.channels is 32 in the checkpoint but 64 now``); ``train.out`` and
    :data:`RESUMABLE_KEYS` may differ."""
    a, b = _flat(_comparable(saved)), _flat(_comparable(now))
    absent = object()
    out = []
    for key in sorted(a.keys() | b.keys()):
        old, new = a.get(key, absent), b.get(key, absent)
        if old != new:
            name = key.removeprefix("config.")
            shown = ["absent" if v is absent else json.dumps(v) for v in (old, new)]
            out.append(f"{name} is {shown[0]} in the checkpoint but {shown[1]} now")
    return out


def _comparable(run_config: dict[str, Any]) -> dict[str, Any]:
    """A JSON copy of the run config without ``train.out`` and :data:`RESUMABLE_KEYS`."""
    cfg = json.loads(json.dumps(run_config))
    train = cfg.get("config", {}).get("train", {})
    for key in (*RESUMABLE_KEYS, "out"):
        train.pop(key, None)
    return cfg


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}} -> {"a.b": 1}`` (lists stay values)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _truncate_log(path: Path, step: int) -> None:
    """Drop log rows written after ``step`` (they belong to the part of the run being redone)."""
    try:
        lines = path.read_text().splitlines(keepends=True) if path.exists() else []
    except OSError as e:
        raise file_error(e, path) from None
    kept = [ln for ln in lines[1:] if (row := _row_step(ln)) is not None and row <= step]
    write_text(path, LOG_HEADER + "".join(kept))


def _row_step(line: str) -> int | None:
    """The step of a ``loss.csv`` row, ``None`` for a torn or foreign line."""
    head = line.split(",", 1)[0]
    return int(head) if head.isdigit() and line.endswith("\n") else None
