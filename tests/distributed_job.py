"""One process of a test job started by ``torchrun`` (``python -m torch.distributed.run``) from
``test_distributed.py``: runs ``difflab`` command lines one after the other, as
``torchrun -m difflab`` would, and records what each process did for the test to check.

Usage: ``distributed_job.py RECORDS COMMANDS_JSON``. ``COMMANDS_JSON`` lists the commands,
each ``{"argv": [...]}`` with optionally ``"fail_at": step`` (rank 1 raises a ``UserError``
in its loss at that step: a process that fails mid-run) or ``"interrupt_at": step`` (rank 1
receives SIGINT then, as if Ctrl-C reached it alone). ``RECORDS`` is a folder (not a run
folder) where every process writes, after each command, ``<i>.rank<r>.pt``: its exit status,
its trainer's last EMA weights and step, and how many checkpoints it wrote.
"""

import json
import os
import signal
import sys
from pathlib import Path

import torch

from difflab import cli
from difflab.errors import UserError
from difflab.train import trainer

records, commands = Path(sys.argv[1]), json.loads(sys.argv[2])
rank = int(os.environ["RANK"])
seen: dict[str, object] = {}
faults: dict[str, int] = {}

save_checkpoint = trainer.save_checkpoint


def counted_save_checkpoint(*args, **kwargs):
    seen["checkpoints_written"] += 1
    return save_checkpoint(*args, **kwargs)


trainer.save_checkpoint = counted_save_checkpoint
Trainer_save = trainer.Trainer.save


def save_and_record(self):
    path = Trainer_save(self)
    seen["ema"], seen["step"] = [e.detach().clone() for e in self.ema], self.step
    return path


trainer.Trainer.save = save_and_record
fit = trainer.Trainer.fit


def fit_with_faults(self, *args, **kwargs):
    loss_fn = self.loss_fn

    def loss(net, batch, generator):
        if rank == 1 and self.step == faults.get("fail_at"):
            raise UserError("the loss of this process could not be computed")
        if rank == 1 and self.step == faults.get("interrupt_at"):
            os.kill(os.getpid(), signal.SIGINT)
        return loss_fn(net, batch, generator)

    self.loss_fn = loss
    return fit(self, *args, **kwargs)


trainer.Trainer.fit = fit_with_faults

for i, command in enumerate(commands):
    seen.update(checkpoints_written=0, ema=None, step=None, code=0)
    faults.clear()
    faults.update({k: v for k, v in command.items() if k != "argv"})
    try:
        cli.main(command["argv"])
    except SystemExit as e:
        seen["code"] = e.code or 0
    torch.save(seen, records / f"{i}.rank{rank}.pt")
    if seen["code"] not in (0, 130):
        sys.exit(seen["code"])
