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

Many processes (``torchrun``, see :mod:`difflab.train.distributed`): the network is wrapped in
``DistributedDataParallel``; ``train.batch_size`` is the global batch, split into
``world_size * train.accumulate`` equal micro-batches, one per *stream*: stream
``j = rank * accumulate + k`` is the k-th micro-batch of process ``rank`` and has its own
generator (seeded :func:`~difflab.train.distributed.derived_seed`), which draws its rows, times
and noise. Gradients of the ``accumulate`` micro-batches of a process are summed without
synchronising (``no_sync``) and averaged over the processes once, on the last one; so a step is
the mean loss over the global batch, and a run depends on its number of streams, not on how
they are spread: 2 processes with ``accumulate=1`` train what 1 process with ``accumulate=2``
trains (up to float rounding). Every process holds the same weights, optimiser state and EMA;
rank 0 alone touches the run folder (lock, log, checkpoints, progress bar), and a resumed run
reads the checkpoint on rank 0 and hands it to the others, so no shared disk is needed.

What a resume guarantees: with the same number of streams it continues the uninterrupted run's
draws exactly (bit for bit in one process); with another (a different ``torchrun
--nproc_per_node`` or ``train.accumulate``) the global batch, weights, optimiser, EMA, step and
learning rate continue, the streams the checkpoint holds continue theirs, and a new stream
starts from a seed derived from the run seed, its number and the step, so the data order is
not the one the uninterrupted run would have seen. Under many processes, a stop request (Ctrl-C,
SIGTERM, ``train.max_minutes``) of any process is acted on by all one step later (the requests
are summed in the background); alone, the trainer stops after the current step.

Arithmetic: ``train.precision=bf16`` runs the network's forward pass under ``torch.autocast``
to bfloat16 and hands its outputs to the loss in float32 (the weights, optimiser and EMA stay
float32); ``train.compile`` compiles the network with ``torch.compile``; on GPUs, convolutional
networks are kept channels-last. Nothing in the step waits for the device: the loss is read
back only for a log row.
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
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from difflab.config import TrainConfig, flatten
from difflab.errors import UserError
from difflab.files import file_error, make_folder, remove_stale_temp_files, write_text
from difflab.train import distributed
from difflab.train.checkpoint import (
    CONFIG_FILENAME,
    FILENAME,
    Checkpoint,
    load_checkpoint,
    optimizer_state,
    resolve_checkpoint,
    save_checkpoint,
    write_config_file,
)
from difflab.train.distributed import World, derived_seed

LossFn = Callable[[nn.Module, tuple[Tensor, ...], torch.Generator], Tensor]
LOG_NAME = "loss.csv"
LOG_HEADER = "step,loss,lr,seconds\n"
LOCK_NAME = ".lock"

#: Train settings a resumed run may change: how long it runs, how it reports, and the learning
#: rate (the fix for a run that diverged: resume from its last good checkpoint with a lower one).
#: How a step is computed may change too: the micro-batches, the arithmetic, compilation.
RESUMABLE_KEYS = ("steps", "log_every", "ckpt_every", "max_minutes", "device", "lr",
                  "accumulate", "precision", "compile")  # fmt: skip


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


def resolve_device(name: str, world: World | None = None) -> torch.device:
    """The device of ``train.device`` (or ``--device``): ``auto`` is CUDA where present; under
    many processes each takes the GPU of its ``LOCAL_RANK``."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N")
    if device.type == "cpu":
        return device
    count = torch.cuda.device_count()
    if world is not None and world.size > 1:
        if world.local_rank >= count:
            raise UserError(f"torchrun started process {world.local_rank} on a machine with "
                            f"{count} CUDA devices: start at most {count} per machine "
                            "(--nproc_per_node)")  # fmt: skip
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    elif (device.index or 0) >= count:
        raise UserError(f"the device {name!r} was asked for, but this machine has {count} CUDA "
                        "devices")  # fmt: skip
    return device


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The dtype the network computes in for ``train.precision`` on ``device`` (``None``:
    float32, no autocast). ``auto`` is bf16 on a GPU that computes in bfloat16 natively
    (compute capability 8.0 or later), fp32 elsewhere; ``bf16`` on an older GPU is refused
    (PyTorch would emulate it, slower than fp32); on a CPU, ``bf16`` is autocast there."""
    if precision == "fp32" or (precision == "auto" and device.type == "cpu"):
        return None
    if device.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
        if precision == "auto":
            return None
        major, minor = torch.cuda.get_device_capability(device)
        raise UserError(
            f"train.precision=bf16 needs a GPU that computes in bfloat16 (compute capability "
            f"8.0 or later); {torch.cuda.get_device_name(device)} has {major}.{minor}: use "
            "train.precision=fp32"
        )
    return torch.bfloat16


class MixedPrecision(nn.Module):
    """``net`` whose forward pass runs under ``torch.autocast(device, dtype)`` and returns its
    floating-point outputs in float32, so that the loss (or a sampler's update) that reads
    them computes in float32."""

    def __init__(self, net: nn.Module, device: torch.device, dtype: torch.dtype):
        super().__init__()
        self.net, self.device_type, self.dtype = net, device.type, dtype

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with torch.autocast(self.device_type, self.dtype):
            out = self.net(*args, **kwargs)
        return _float32(out)


def sampling_precision(cfg: TrainConfig) -> AbstractContextManager[Any]:
    """The arithmetic of sampling a run trained with ``cfg``: on GPUs that compute in
    bfloat16, autocast to it unless the run trained in fp32 (``train.precision``); float32
    elsewhere (CUDA autocast leaves a model on the CPU untouched)."""
    bf16 = (
        cfg.precision != "fp32"
        and torch.cuda.is_available()
        and torch.cuda.is_bf16_supported(including_emulation=False)
    )
    return torch.autocast("cuda", torch.bfloat16) if bf16 else nullcontext()


def load_ema(net: nn.Module, ema: dict[str, Tensor], path: str | Path, device: str) -> nn.Module:
    """``net`` with the EMA weights of a checkpoint, on ``device``, in eval mode (channels-last
    when it is a convolutional network on a GPU). Non-finite weights (a diverged run) and
    weights that do not fit the network (a checkpoint from another config) are a
    :class:`UserError`."""
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
    return _to_device(net, resolve_device(device)).eval()


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

    ``loss_fn(network, batch, generator)`` returns the scalar loss of one micro-batch;
    ``batch`` is the tuple of ``tensors`` indexed by rows drawn with ``generator`` (its
    stream's, which also draws the times and noise); ``network`` is ``model`` as the step
    runs it (under DDP, autocast, compiled), to be called, not inspected. ``run_config``
    (``"recipe"``, the nested ``"config"`` and whatever else rebuilds the model) is stored in
    every checkpoint so that ``difflab sample`` can rebuild the model.
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
        self.world = distributed.world()
        self.streams = self.world.size * cfg.accumulate
        if cfg.batch_size % self.streams:
            raise UserError(
                f"train.batch_size={cfg.batch_size} must be a multiple of the number of "
                f"processes ({self.world.size}) times train.accumulate ({cfg.accumulate}): "
                f"each of the {self.streams} micro-batches of a step has the same size"
            )
        distributed.setup()
        self.micro_batch = cfg.batch_size // self.streams
        self.device = resolve_device(cfg.device, self.world)
        self.model = _to_device(model, self.device)
        self.network = self._network(autocast_dtype(cfg.precision, self.device))
        self.loss_fn = loss_fn
        self.tensors = tuple(t.to(self.device) for t in tensors)
        self.run_config = run_config
        self.out = Path(out)
        self.params = list(self.model.parameters())
        self.weights = [p.detach() for p in self.params]  # views: they follow the updates
        self.ema = [w.clone() for w in self.weights]
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        # The streams of this process: stream rank * accumulate + k draws micro-batch k.
        first = self.world.rank * cfg.accumulate
        self.stream_ids = list(range(first, first + cfg.accumulate))
        self.generators = [torch.Generator(self.device) for _ in self.stream_ids]
        self.step = 0
        self.saved_step: int | None = None  # the step of the run's last good checkpoint
        # Sum of the steps' global mean losses since the last log row (this process's share of
        # it) and their count: part of the resumable state.
        self._running = torch.zeros((), device=self.device)
        self._n_running = 0
        self._votes: Callable[[], Tensor] | None = None  # the stop requests being summed

    def _network(self, dtype: torch.dtype | None) -> nn.Module:
        """``model`` as the step calls it: autocast (``dtype``), then DDP over the processes,
        then ``torch.compile``."""
        net: nn.Module = self.model
        if dtype is not None:
            net = MixedPrecision(net, self.device, dtype)
        if self.world.size > 1:
            ids = None if self.device.type == "cpu" else [self.device.index]
            net = DistributedDataParallel(net, device_ids=ids)
        if self.cfg.compile:
            net = torch.compile(net)
        return net

    @property
    def main(self) -> bool:
        """Whether this process writes the run folder and prints (rank 0)."""
        return self.world.rank == 0

    # ------------------------------------------------------------------ the loop
    def fit(self, resume: bool = False, progress: bool = True) -> TrainResult:
        """Train up to ``train.steps`` (or until ``train.max_minutes``), logging every
        ``log_every`` and checkpointing every ``ckpt_every`` steps and at the end."""
        cfg = self.cfg
        if resume and self.main:
            resolve_checkpoint(self.out)  # no run to resume: say so before creating anything
        with self._lock():
            self._begin(resume)
            start, start_step = time.perf_counter(), self.step
            with (
                self._log() as log,
                _progress_bar(cfg, self.step, progress and self.main) as bar,
                _stop_requests() as stop,
            ):
                self.model.train()
                while self.step < cfg.steps:
                    try:
                        lr = self.optimisation_step()
                    except torch._dynamo.exc.BackendCompilerFailed as e:
                        raise UserError(
                            f"train.compile=true: torch.compile could not compile the network "
                            f"({_reason(e.inner_exception)}); train without it: "
                            "train.compile=false"
                        ) from None
                    late = bool(cfg.max_minutes) and (time.perf_counter() - start) / 60 > (
                        cfg.max_minutes
                    )
                    stopping, late = self._agree(bool(stop), late)
                    if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                        self._log_row(log, bar, lr, time.perf_counter() - start)
                    bar.update(1)
                    if self.step % cfg.ckpt_every == 0 and self.step < cfg.steps:
                        self.save()
                    if stopping:
                        raise Interrupted(self.step, self.save())
                    if late:
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
    @contextmanager
    def _lock(self) -> Iterator[None]:
        """Rank 0 holds the run folder's lock for the block; the other processes touch no
        file."""
        if not self.main:
            yield
            return
        with _lock(make_folder(self.out)):
            yield

    def _begin(self, resume: bool) -> None:
        """Clear what killed runs left, then restore the checkpoint or start afresh, and write
        ``config.json`` (the files: rank 0 only)."""
        if self.main:
            remove_stale_temp_files(self.out, (FILENAME, CONFIG_FILENAME, LOG_NAME))
        if resume:
            self._restore(distributed.from_main(lambda: load_checkpoint(self.out)))
        else:
            if self.main and (self.out / FILENAME).exists():
                raise UserError(
                    f"{self.out} already holds a run: pass --resume to continue it "
                    "or choose another train.out"
                )
            torch.manual_seed(derived_seed(self.cfg.seed, 1, self.world.rank))
            for stream, generator in zip(self.stream_ids, self.generators, strict=True):
                generator.manual_seed(derived_seed(self.cfg.seed, 0, stream))
            if self.main:
                write_text(self.out / LOG_NAME, LOG_HEADER)
        if self.main:
            write_config_file(self.out, self.run_config)

    def optimisation_step(self) -> float:
        """One AdamW step on the global batch (this process's ``accumulate`` micro-batches,
        gradients averaged over the processes on the last), then the EMA update; returns the
        learning rate."""
        cfg = self.cfg
        lr = cfg.lr * learning_rate_factor(self.step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        last = len(self.generators) - 1
        for k, generator in enumerate(self.generators):
            idx = torch.randint(self.tensors[0].shape[0], (self.micro_batch,),
                                device=self.device, generator=generator)  # fmt: skip
            batch = tuple(t[idx] for t in self.tensors)
            with self._no_sync() if k < last else nullcontext():
                loss = self.loss_fn(self.network, batch, generator)
                (loss / cfg.accumulate).backward()
            self._running += loss.detach() / self.streams
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
        self.optimizer.step()
        self.step += 1
        decay = min(cfg.ema, (1 + self.step) / (10 + self.step))
        torch._foreach_lerp_(self.ema, self.weights, 1.0 - decay)
        self._n_running += 1
        return lr

    def _no_sync(self) -> AbstractContextManager[Any]:
        """Gradients of this micro-batch stay local (DDP's ``no_sync``; alone: nothing)."""
        net = getattr(self.network, "_orig_mod", self.network)  # under torch.compile
        return net.no_sync() if isinstance(net, DistributedDataParallel) else nullcontext()

    def _agree(self, stop: bool, late: bool) -> tuple[bool, bool]:
        """Whether to stop (Ctrl-C or SIGTERM) and whether ``train.max_minutes`` has passed,
        agreed by every process: alone, at once; under many, each step's requests are summed
        in the background (gloo, CPU memory: no wait for the GPU) and acted on by all at the
        next step, when they read the sum."""
        if self.world.size == 1:
            return stop, late
        votes = torch.tensor([stop, late], dtype=torch.int32)
        previous, self._votes = self._votes, distributed.start_sum(votes)
        if previous is None:
            return False, False
        stop_votes, late_votes = previous().tolist()
        return stop_votes > 0, late_votes > 0

    def _log_row(self, log: TextIO | None, bar: tqdm, lr: float, elapsed: float) -> None:
        """Append the mean loss since the last row (over every process's micro-batches) to
        ``loss.csv``; a non-finite mean stops the run (its last checkpoint is kept)."""
        mean = float(distributed.all_sum(self._running.clone())) / self._n_running
        if not math.isfinite(mean):
            raise self._diverged(f"the loss became {mean}")
        if log is not None:
            try:
                csv.writer(log).writerow([self.step, repr(mean), f"{lr:.6g}", f"{elapsed:.2f}"])
                log.flush()
            except OSError as e:
                raise file_error(e, self.out / LOG_NAME) from None
        bar.set_postfix(loss=f"{mean:.4f}", lr=f"{lr:.2e}")
        self._running.zero_()
        self._n_running = 0

    def save(self) -> Path:
        """Checkpoint the current step (written by rank 0), unless the weights are no longer
        finite: then the last good checkpoint stays and the run stops with a
        :class:`UserError`. Every process takes part: their random states go in too."""
        model = self.model.state_dict()
        if not _all_finite([*model.values(), *self.ema]):
            raise self._diverged("the weights became non-finite")
        rng = self._rng_state()
        running = float(distributed.all_sum(self._running.clone()))
        path = self.out / FILENAME
        if self.main:
            save_checkpoint(
                path,
                config=self.run_config,
                step=self.step,
                model=model,
                ema=self.ema_state(),
                optimizer=self.optimizer,
                rng=rng,
                extra={
                    "running_loss": running,
                    "running_count": self._n_running,
                    "streams": self.streams,
                },
            )
        self.saved_step = self.step
        return path

    def _restore(self, ckpt: Checkpoint) -> None:
        """Continue from ``ckpt`` (rank 0's, read from ``out``): weights, EMA, optimiser,
        random states, log."""
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
        step = ckpt.step
        try:
            self.model.load_state_dict(ckpt.model)
            self.optimizer.load_state_dict(optimizer_state(ckpt))
            for stream, generator in zip(self.stream_ids, self.generators, strict=True):
                if (state := ckpt.rng.get(_rng_key("generator", stream))) is not None:
                    generator.set_state(state)
                else:  # a stream the saved run did not have: a fresh seed (see module doc)
                    generator.manual_seed(derived_seed(self.cfg.seed, 0, stream, step))
            rank = self.world.rank
            if (state := ckpt.rng.get(_rng_key("torch", rank))) is not None:
                torch.set_rng_state(state)
            else:
                torch.manual_seed(derived_seed(self.cfg.seed, 1, rank, step))
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            raise UserError(
                f"the checkpoint in {self.out} does not fit this model: {_reason(e)}"
            ) from None
        self.ema = [ckpt.ema[n].to(self.device) for n in names]
        cuda = ckpt.rng.get(_rng_key("cuda", self.world.rank))
        if cuda is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(cuda, self.device)
        self.step = self.saved_step = step
        # The saved sum is the whole job's: rank 0 carries it on, the others start from zero.
        self._running.fill_(ckpt.extra.get("running_loss", 0.0) if self.main else 0.0)
        self._n_running = ckpt.extra.get("running_count", 0)
        if self.main:
            _truncate_log(self.out / LOG_NAME, self.step)

    @contextmanager
    def _log(self) -> Iterator[TextIO | None]:
        if not self.main:
            yield None
            return
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
        """The random states of every process, gathered (one collective): ``generator`` for
        stream 0 and ``generator_<j>`` for stream j; ``torch`` and ``cuda`` (the global RNGs)
        for rank 0 and ``torch_<r>``, ``cuda_<r>`` for rank r."""
        own = [(_rng_key("generator", j), g.get_state())
               for j, g in zip(self.stream_ids, self.generators, strict=True)]  # fmt: skip
        own.append((_rng_key("torch", self.world.rank), torch.get_rng_state()))
        if self.device.type == "cuda":
            own.append((_rng_key("cuda", self.world.rank), torch.cuda.get_rng_state(self.device)))
        flat = torch.cat([state.flatten() for _, state in own])
        sizes = [state.numel() for _, state in own]
        rng = {}
        for rank, gathered in enumerate(distributed.all_gather(flat)):
            first = rank * self.cfg.accumulate
            keys = [_rng_key("generator", first + k) for k in range(self.cfg.accumulate)]
            keys += [_rng_key(name, rank) for name in ("torch", "cuda")][: len(sizes) - len(keys)]
            rng.update(zip(keys, torch.split(gathered, sizes), strict=True))
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


def _rng_key(name: str, index: int) -> str:
    """``name`` for stream or rank 0 (what one process always saved), ``name_<index>`` else."""
    return name if index == 0 else f"{name}_{index}"


def _float32(out: Any) -> Any:
    """A network's output with its floating-point tensors in float32 (tuples, lists and dicts
    of them too)."""
    if isinstance(out, Tensor):
        return out.float() if out.is_floating_point() else out
    if isinstance(out, (tuple, list)):
        return type(out)(_float32(o) for o in out)
    if isinstance(out, dict):
        return {k: _float32(v) for k, v in out.items()}
    return out


def _to_device(net: nn.Module, device: torch.device) -> nn.Module:
    """``net`` on ``device``; channels-last on a GPU when it convolves (faster kernels)."""
    net = net.to(device)
    if device.type == "cuda" and any(isinstance(m, nn.Conv2d) for m in net.modules()):
        net = net.to(memory_format=torch.channels_last)
    return net


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
    :data:`RESUMABLE_KEYS` may differ. A key the checkpoint lacks and that is empty now is no
    difference: it is one added to the config since, whose empty value keeps the run as it was."""
    a, b = flatten(_comparable(saved)), flatten(_comparable(now))
    absent = object()
    out = []
    for key in sorted(a.keys() | b.keys()):
        old, new = a.get(key, absent), b.get(key, absent)
        if old != new and not (old is absent and new is None):
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
