"""One process of a test job started by ``torchrun`` (``python -m torch.distributed.run``) from
``test_distributed.py``: runs ``difflab`` command lines one after the other, as
``torchrun -m difflab`` would, and records what each process did for the test to check.

Usage: ``distributed_job.py RECORDS COMMANDS_JSON [FAIL_AT_STEP]``. ``RECORDS`` is a folder
(not a run folder) where every process writes, after each command, ``<i>.rank<r>.pt``: its
trainer's EMA weights and how many checkpoints it wrote. ``FAIL_AT_STEP`` makes rank 1 raise
a ``UserError`` in its loss at that step (a process that fails mid-run).
"""

import json
import os
import sys
from pathlib import Path

import torch

from difflab import cli
from difflab.errors import UserError
from difflab.train import trainer

records, commands = Path(sys.argv[1]), json.loads(sys.argv[2])
fail_at = int(sys.argv[3]) if len(sys.argv) > 3 else None
rank = int(os.environ["RANK"])
seen: dict[str, object] = {"checkpoints_written": 0, "ema": None}

save_checkpoint = trainer.save_checkpoint


def counted_save_checkpoint(*args, **kwargs):
    seen["checkpoints_written"] += 1
    return save_checkpoint(*args, **kwargs)


trainer.save_checkpoint = counted_save_checkpoint
Trainer_save = trainer.Trainer.save


def save_and_record(self):
    path = Trainer_save(self)
    seen["ema"] = [e.detach().clone() for e in self.ema]
    return path


trainer.Trainer.save = save_and_record

if fail_at is not None:
    fit = trainer.Trainer.fit

    def failing_fit(self, *args, **kwargs):
        loss_fn = self.loss_fn

        def loss(net, batch, generator):
            if rank == 1 and self.step == fail_at:
                raise UserError("the loss of this process could not be computed")
            return loss_fn(net, batch, generator)

        self.loss_fn = loss
        return fit(self, *args, **kwargs)

    trainer.Trainer.fit = failing_fit

for i, argv in enumerate(commands):
    seen["checkpoints_written"], seen["ema"] = 0, None
    try:
        cli.main(argv)
    except SystemExit as e:
        if e.code not in (0, None):
            raise
    torch.save(seen, records / f"{i}.rank{rank}.pt")
