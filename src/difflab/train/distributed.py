"""Many processes through ``torch.distributed``: the job that ``torchrun`` starts.

``torchrun --nproc_per_node=N -m difflab train ...`` (and the same with ``--nnodes`` and
``--rdzv-endpoint`` across machines) starts N processes per machine and tells each, in its
environment, its ``RANK`` in ``0..WORLD_SIZE-1``, its ``LOCAL_RANK`` on its machine and where
to meet the others (``MASTER_ADDR``/``MASTER_PORT``). :func:`setup` joins them into one process
group: gloo for tensors in CPU memory and, where CUDA is present, NCCL for tensors on GPUs
(``cpu:gloo,cuda:nccl``), so the same job trains on ``train.device=cpu`` or ``cuda``. A process
started without ``torchrun`` is a job of one: nothing here talks to anyone.

Randomness: every process draws from its own streams, seeded by :func:`derived_seed` from the
run's ``train.seed``, so a job is reproducible and no two processes draw the same noise.

Failures: the first process of a job that fails says why in one line (:func:`claim_failure`
decides which, through the job's rendezvous store); the others, whose next collective breaks
when that process leaves, end quietly (:func:`failed_elsewhere`); ``torchrun`` then stops the
job. Only rank 0 writes files and prints (:func:`is_main`, :func:`from_main`).
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from difflab.errors import UserError

T = TypeVar("T")

_FAILURES = "difflab/failures"  # a counter in the rendezvous store: how many processes failed
_state: dict[str, Any] = {}  # "store" once setup() has joined a job; "failed" once this one has


@dataclass(frozen=True)
class World:
    """This process's place in its job: ``rank`` of ``size`` processes, ``local_rank`` on its
    machine (the GPU it uses)."""

    rank: int
    size: int
    local_rank: int


def world() -> World:
    """The job this process belongs to, from ``torchrun``'s environment (one process without)."""
    values = {}
    for key, default in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)):
        text = os.environ.get(key, str(default))
        if not text.isdigit():
            raise UserError(f"the environment variable {key}={text!r} is not a whole number "
                            "(torchrun sets it)")  # fmt: skip
        values[key] = int(text)
    if values["RANK"] >= values["WORLD_SIZE"]:
        raise UserError(f"RANK={values['RANK']} is not below WORLD_SIZE={values['WORLD_SIZE']}")
    return World(values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"])


def is_main() -> bool:
    """Whether this process is rank 0, the one that writes files and prints."""
    return world().rank == 0


def setup() -> World:
    """Join the job's process group (once; a job of one joins nothing). The group is left at
    exit (:func:`cleanup`)."""
    w = world()
    if w.size > 1 and not dist.is_initialized():
        try:
            store, rank, size = next(dist.rendezvous("env://"))
        except ValueError as e:  # a variable torchrun sets is missing
            raise UserError(
                f"WORLD_SIZE={w.size} asks for a job of many processes, but the "
                f"variables torchrun sets are incomplete ({str(e).split(': ')[-1]}): "
                "start it with torchrun"
            ) from None
        cuda = torch.cuda.is_available() and dist.is_nccl_available()
        dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo", store=store,
                                rank=rank, world_size=size)  # fmt: skip
        _state["store"] = store
        atexit.register(cleanup)
    return w


def cleanup() -> None:
    """Leave the process group (a process that exits without it aborts in gloo's threads)."""
    if dist.is_initialized():
        dist.destroy_process_group()
    _state.pop("store", None)


def derived_seed(seed: int, purpose: int, index: int, step: int = 0) -> int:
    """The seed of random stream ``index`` (``purpose`` 0: the data and noise streams of the
    trainer; 1: a process's global RNG) for a run seeded ``seed``, first used at ``step``.
    Stream 0 of a run started afresh is seeded with ``seed`` itself, so a run of one process
    draws what it always drew; every other stream gets 63 bits from ``numpy``'s
    ``SeedSequence([seed, purpose, index, step])``, unrelated to the seeds of other runs."""
    if index == 0 and step == 0:
        return seed
    words = np.random.SeedSequence([seed, purpose, index, step]).generate_state(2, np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


# ---------------------------------------------------------------- collectives (no-ops alone)


def all_sum(tensor: Tensor) -> Tensor:
    """``tensor`` summed over the processes, in place."""
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


def start_sum(tensor: Tensor) -> Callable[[], Tensor]:
    """Begin summing ``tensor`` over the processes in the background (in place); returns the
    function that waits for the sum and gives it."""
    if not dist.is_initialized():
        return lambda: tensor
    work = dist.all_reduce(tensor, async_op=True)

    def result() -> Tensor:
        work.wait()
        return tensor

    return result


def all_gather(tensor: Tensor) -> list[Tensor]:
    """Every process's ``tensor`` (same shape everywhere), in rank order."""
    if not dist.is_initialized():
        return [tensor]
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor)
    return parts


def from_main(make: Callable[[], T]) -> T:
    """``make()`` run on rank 0 only, its result (any picklable object) given to every process:
    for what one process must decide and the others follow (a tokenizer learned from the data,
    a checkpoint read from rank 0's disk)."""
    if not dist.is_initialized():
        return make()
    box = [make() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]  # type: ignore[return-value]


# ---------------------------------------------------------------- failures


def claim_failure() -> bool:
    """Record that this process failed; whether it is the first of its job to (then it says
    why; the others stay quiet). Always true outside a job."""
    _state["failed"] = True
    store = _state.get("store")
    if store is None:
        return True
    try:
        return store.add(_FAILURES, 1) == 1
    except RuntimeError:  # torch.distributed.DistError included
        return True  # the store is gone: better two lines than none


def failed_elsewhere() -> bool:
    """Whether another process of this job has failed (so a broken collective here is its
    consequence, already explained by that process)."""
    store = _state.get("store")
    if store is None or _state.get("failed"):
        return False
    try:
        return store.check([_FAILURES])
    except RuntimeError:  # torch.distributed.DistError included
        return False
