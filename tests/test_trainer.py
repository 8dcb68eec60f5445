"""The trainer: reproducibility, exact resume, atomic checkpoints, learning-rate schedule."""

import csv
import dataclasses
import os
import signal

import pytest
import torch
from torch import nn

from difflab.config import TrainConfig
from difflab.errors import UserError
from difflab.train.checkpoint import load_checkpoint
from difflab.train.trainer import Interrupted, Trainer, learning_rate_factor


def _toy(tmp_path, name, steps, **kw):
    """A small regression with dropout, so that both the generator and the global RNG matter."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 32), nn.Dropout(0.2), nn.SiLU(), nn.Linear(32, 1))
    x = torch.randn(200, 3, generator=torch.Generator().manual_seed(1))
    y = x.sum(1, keepdim=True) ** 2

    def loss_fn(m, batch, gen):
        xb, yb = batch
        noise = torch.randn(xb.shape, generator=gen) * 0.01
        return ((m(xb + noise) - yb) ** 2).mean()

    cfg = TrainConfig(steps=steps, batch_size=16, lr=1e-2, warmup=3, log_every=1, ckpt_every=7,
                      ema=0.9, out=str(tmp_path / name), **kw)  # fmt: skip
    run_config = {"recipe": "toy", "config": {"train": dataclasses.asdict(cfg)}}
    return Trainer(model, loss_fn, (x, y), cfg, run_config, tmp_path / name)


def _losses(path):
    with open(path) as f:
        return [(int(r["step"]), r["loss"]) for r in csv.DictReader(f)]


def test_resume_reproduces_the_uninterrupted_run_exactly(tmp_path):
    full = _toy(tmp_path, "full", 20)
    full.fit(progress=False)
    part = _toy(tmp_path, "part", 20)
    inner = part.loss_fn

    def interrupt_at_10(m, batch, gen):
        if part.step == 9:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C: step 10 finishes, then a checkpoint
        return inner(m, batch, gen)

    part.loss_fn = interrupt_at_10
    with pytest.raises(Interrupted):
        part.fit(progress=False)
    # ... and garbage written after the checkpoint (as after a crash) must be dropped on resume.
    with open(tmp_path / "part" / "loss.csv", "a") as f:
        f.write("11,999.0,0.01,1.0\n")
    assert load_checkpoint(tmp_path / "part").step == 10
    resumed = _toy(tmp_path, "part", 20)
    resumed.fit(resume=True, progress=False)
    assert _losses(tmp_path / "full" / "loss.csv") == _losses(tmp_path / "part" / "loss.csv")
    a, b = load_checkpoint(tmp_path / "full"), load_checkpoint(tmp_path / "part")
    for k in a.ema:
        assert torch.equal(a.ema[k], b.ema[k])
        assert torch.equal(a.model[k], b.model[k])


def test_training_reduces_the_loss_and_ema_lags(tmp_path):
    tr = _toy(tmp_path, "run", 60)
    tr.fit(progress=False)
    losses = [float(v) for _, v in _losses(tmp_path / "run" / "loss.csv")]
    assert sum(losses[-10:]) < 0.5 * sum(losses[:10])
    ck = load_checkpoint(tmp_path / "run")
    assert ck.step == 60
    assert any(not torch.equal(ck.ema[k], ck.model[k]) for k in ck.model)


def test_second_fit_refuses_to_overwrite_and_resume_checks_config(tmp_path):
    _toy(tmp_path, "run", 5).fit(progress=False)
    with pytest.raises(UserError, match="already holds a run"):
        _toy(tmp_path, "run", 5).fit(progress=False)
    other = _toy(tmp_path, "run", 5)
    other.run_config = {**other.run_config, "recipe": "something else"}
    with pytest.raises(UserError, match=r'different config \(recipe is "toy" in the checkpoint'):
        other.fit(resume=True, progress=False)


def test_ctrl_c_saves_a_checkpoint_at_the_completed_step(tmp_path):
    tr = _toy(tmp_path, "run", 50)
    inner = tr.loss_fn
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN under nohup, else Python's default

    def loss_then_interrupt(m, batch, gen):
        if tr.step == 12:
            os.kill(os.getpid(), signal.SIGINT)  # as if the user pressed Ctrl-C mid-step
        return inner(m, batch, gen)

    tr.loss_fn = loss_then_interrupt
    with pytest.raises(Interrupted) as info:
        tr.fit(progress=False)
    assert info.value.step == 13  # the step in flight is finished, then saved
    assert load_checkpoint(tmp_path / "run").step == 13
    assert signal.getsignal(signal.SIGINT) is before  # the handler it found is back


def test_corrupt_checkpoint_is_a_user_error(tmp_path):
    (tmp_path / "checkpoint.safetensors").write_bytes(b"not a checkpoint at all")
    with pytest.raises(UserError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path)
    with pytest.raises(UserError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing")


def test_learning_rate_warmup_then_cosine():
    cfg = TrainConfig(steps=110, warmup=10, lr_schedule="cosine")
    assert learning_rate_factor(0, cfg) == pytest.approx(0.1)
    assert learning_rate_factor(9, cfg) == pytest.approx(1.0)
    assert learning_rate_factor(60, cfg) == pytest.approx(0.5)
    assert learning_rate_factor(110, cfg) == pytest.approx(0.0, abs=1e-12)
    cfg.lr_schedule = "constant"
    assert learning_rate_factor(100, cfg) == 1.0
