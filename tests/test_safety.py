"""Nothing lost, nothing silent: the run folder under divergence, a second trainer, resume from a
moved folder, SIGTERM, a full disk and file modes; atomic writes of user files."""

import csv
import dataclasses
import errno
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from difflab.config import TrainConfig
from difflab.errors import UserError
from difflab.files import write_atomically, write_text
from difflab.train.checkpoint import load_checkpoint, save_checkpoint
from difflab.train.trainer import LOCK_NAME, Trainer, load_ema


def _trainer(out, steps, model_config=None, **kw):
    """A small regression with dropout; ``out`` as the user spelled it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 16), nn.Dropout(0.2), nn.SiLU(), nn.Linear(16, 1))
    x = torch.randn(100, 3, generator=torch.Generator().manual_seed(1))
    y = x.sum(1, keepdim=True) ** 2

    def loss_fn(m, batch, gen):
        xb, yb = batch
        return ((m(xb + 0.01 * torch.randn(xb.shape, generator=gen)) - yb) ** 2).mean()

    args = dict(steps=steps, batch_size=8, lr=1e-2, warmup=2, log_every=1, ckpt_every=5, ema=0.9)
    cfg = TrainConfig(**{**args, **kw}, out=str(out))
    config = {"train": dataclasses.asdict(cfg), "model": model_config or {"width": 16}}
    return Trainer(model, loss_fn, (x, y), cfg, {"recipe": "toy", "config": config}, Path(out))


def _rows(folder):
    with open(Path(folder) / "loss.csv") as f:
        return [(r["step"], r["loss"]) for r in csv.DictReader(f)]


def test_a_diverging_run_keeps_its_last_good_checkpoint(tmp_path):
    # The loss is logged rarely, so only the check before each save can see the NaN weights.
    tr = _trainer(tmp_path / "run", 20, log_every=100)
    inner = tr.loss_fn
    tr.loss_fn = lambda m, b, g: inner(m, b, g) * (float("nan") if tr.step == 7 else 1.0)
    with pytest.raises(UserError) as info:
        tr.fit(progress=False)
    message = str(info.value)
    assert "the weights became non-finite at step 10" in message
    assert "the checkpoint of step 5" in message and "lower train.lr" in message
    kept = load_checkpoint(tmp_path / "run")
    assert kept.step == 5
    assert all(bool(t.isfinite().all()) for t in [*kept.model.values(), *kept.ema.values()])
    load_ema(_trainer(tmp_path / "other", 1).model, kept.ema, tmp_path / "run", "cpu")


def test_a_run_diverging_before_its_first_checkpoint_says_none_was_written(tmp_path):
    tr = _trainer(tmp_path / "run", 20)
    tr.loss_fn = lambda m, b, g: torch.full((), float("inf"), requires_grad=True)
    with pytest.raises(UserError, match="the loss became inf at step 1; no checkpoint was written"):
        tr.fit(progress=False)
    assert not (tmp_path / "run" / "checkpoint.safetensors").exists()


def test_load_ema_refuses_non_finite_weights_and_names_load_errors(tmp_path):
    net = nn.Linear(2, 2)
    ema = {k: v.clone() for k, v in net.state_dict().items()}
    ema["weight"][0, 1] = float("nan")
    with pytest.raises(UserError, match=r"non-finite weights \(weight\): its training diverged"):
        load_ema(net, ema, tmp_path, "cpu")
    with pytest.raises(UserError, match=r"does not match .*size mismatch for weight") as info:
        load_ema(net, {"weight": torch.zeros(3, 2), "bias": torch.zeros(2)}, tmp_path, "cpu")
    assert "\n" not in str(info.value)


def test_the_run_folder_is_locked_for_the_whole_fit(tmp_path):
    out = tmp_path / "run"
    tr = _trainer(out, 6)
    inner = tr.loss_fn
    seen = []

    def try_the_lock(m, batch, gen):  # a second open file description, as another process has
        with open(out / LOCK_NAME) as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                seen.append("free")
            except BlockingIOError:
                seen.append("held")
        return inner(m, batch, gen)

    tr.loss_fn = try_the_lock
    tr.fit(progress=False)
    assert seen == ["held"] * 6
    with open(out / LOCK_NAME) as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released after fit


def test_a_second_trainer_on_a_locked_folder_is_refused(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import fcntl, sys
            f = open({str(out / LOCK_NAME)!r}, "a")
            fcntl.flock(f, fcntl.LOCK_EX)
            print("locked", flush=True)
            sys.stdin.read()
        """)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(UserError, match="is in use by another training") as info:
            _trainer(out, 3).fit(progress=False)
        assert "\n" not in str(info.value)
        assert not (out / "checkpoint.safetensors").exists()
    finally:
        holder.communicate("", timeout=60)
    _trainer(out, 3).fit(progress=False)  # the holder is gone: the folder is free again


@pytest.mark.parametrize("spelling", ["./runs/x", "runs/x/", "absolute", "moved"])
def test_resume_accepts_any_spelling_of_the_folder_and_a_moved_one(tmp_path, monkeypatch, spelling):
    monkeypatch.chdir(tmp_path)
    _trainer("full", 16, lr_schedule="constant").fit(progress=False)
    _trainer("runs/x", 8, lr_schedule="constant").fit(progress=False)
    out = {"absolute": str(tmp_path / "runs" / "x"), "moved": "elsewhere/y"}.get(spelling, spelling)
    if spelling == "moved":
        Path("elsewhere").mkdir()
        shutil.move("runs/x", "elsewhere/y")
    # A constant learning rate: raising train.steps continues exactly the 16-step run.
    result = _trainer(out, 16, lr_schedule="constant").fit(resume=True, progress=False)
    assert result.steps == 16 and not result.stopped_early
    assert _rows(out) == _rows("full")
    assert json.loads((Path(out) / "config.json").read_text())["train"]["out"] == out


def test_resume_with_a_different_config_names_the_differing_keys(tmp_path):
    _trainer(tmp_path / "run", 3).fit(progress=False)
    changed = _trainer(tmp_path / "run", 6, model_config={"width": 32, "depth": 2}, warmup=5)
    with pytest.raises(UserError) as info:
        changed.fit(resume=True, progress=False)
    message = str(info.value)
    assert "model.depth is absent in the checkpoint but 2 now" in message
    assert "model.width is 16 in the checkpoint but 32 now" in message
    assert "train.warmup is 2 in the checkpoint but 5 now" in message
    assert "train.steps is" not in message and "train.out is" not in message
    assert load_checkpoint(tmp_path / "run").step == 3


def test_resume_refuses_a_missing_run_without_creating_it(tmp_path):
    with pytest.raises(UserError, match="no checkpoint at"):
        _trainer(tmp_path / "nothing", 3).fit(resume=True, progress=False)
    assert not (tmp_path / "nothing").exists()


def test_stale_temporary_files_of_killed_writes_are_removed(tmp_path):
    out = tmp_path / "run"
    _trainer(out, 3).fit(progress=False)
    stale = [out / ".checkpoint.safetensors.1f2e3d.tmp", out / ".config.json.0a0b0c.tmp"]
    for p in stale:
        p.write_bytes(b"left by kill -9")
    (out / "notes.tmp").write_text("the user's own file")
    _trainer(out, 6).fit(resume=True, progress=False)
    assert not any(p.exists() for p in stale)
    assert (out / "notes.tmp").read_text() == "the user's own file"


def test_sigterm_saves_a_checkpoint_at_the_step_reached(tmp_path):
    out = tmp_path / "run"
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_safety import _trainer
        from difflab.train.trainer import Interrupted

        tr = _trainer({str(out)!r}, 10**9, ckpt_every=10**9)
        inner = tr.loss_fn

        def announce(m, batch, gen):
            if tr.step == 3:
                print("training", flush=True)
            return inner(m, batch, gen)

        tr.loss_fn = announce
        try:
            tr.fit(progress=False)
        except Interrupted as e:
            print(e.step, flush=True)
    """)
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline() == "training\n"
    child.send_signal(signal.SIGTERM)
    rest, _ = child.communicate(timeout=120)
    assert child.returncode == 0
    step = int(rest)
    assert step >= 4
    assert load_checkpoint(out).step == step


class _FailingFile:
    """A file whose first write stores half the data and then fails with ``error``."""

    def __init__(self, f, error):
        self.f, self.error = f, error

    def write(self, data):
        self.f.write(data[: len(data) // 2])
        raise self.error

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def _fail_writes_of(monkeypatch, name, error):
    """Make :func:`difflab.files.write_atomically` fail half-way through writing ``name``."""

    def fake_open(file, mode="r", *args, **kwargs):
        f = open(file, mode, *args, **kwargs)  # noqa: SIM115 (the caller closes it)
        return _FailingFile(f, error) if f".{name}." in str(file) else f

    monkeypatch.setattr("difflab.files.open", fake_open, raising=False)


@pytest.mark.parametrize(
    ("error", "message"),
    [
        (OSError(errno.ENOSPC, "No space left on device"),
         "the disk is full: .* [(]the previous checkpoint.safetensors is intact[)]"),
        (OSError(errno.EIO, "Input/output error"), "checkpoint.safetensors: Input/output error"),
        (PermissionError(errno.EACCES, "Permission denied"), "^permission denied: .*checkpoint"),
    ],
)  # fmt: skip
def test_a_failed_checkpoint_write_leaves_the_previous_files_intact(
    tmp_path, monkeypatch, error, message
):
    out = tmp_path / "run"
    _trainer(out, 5).fit(progress=False)
    before = (out / "checkpoint.safetensors").read_bytes()
    _fail_writes_of(monkeypatch, "checkpoint.safetensors", error)
    with pytest.raises(UserError, match=message):
        _trainer(out, 10).fit(resume=True, progress=False)
    assert (out / "checkpoint.safetensors").read_bytes() == before
    assert load_checkpoint(out).step == 5
    assert json.loads((out / "config.json").read_text())["recipe"] == "toy"
    assert sorted(p.name for p in out.iterdir()) == [
        ".lock", "checkpoint.safetensors", "config.json", "loss.csv"
    ]  # fmt: skip


def test_a_full_disk_while_writing_the_config_leaves_it_intact(tmp_path, monkeypatch):
    out = tmp_path / "run"
    _trainer(out, 5).fit(progress=False)
    before = (out / "config.json").read_bytes()
    _fail_writes_of(monkeypatch, "config.json", OSError(errno.ENOSPC, "No space left"))
    with pytest.raises(UserError, match=r"the disk is full: .* \(the previous config.json is"):
        _trainer(out, 10).fit(resume=True, progress=False)
    assert (out / "config.json").read_bytes() == before
    assert load_checkpoint(out).step == 5


def test_a_full_disk_while_writing_a_user_file(tmp_path):
    path = tmp_path / "samples.txt"
    write_text(path, "the samples of yesterday\n")

    def fills_the_disk(f):
        f.write(b"half of today's")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(UserError, match=r"the disk is full: .* \(the previous samples.txt is"):
        write_atomically(path, fills_the_disk)
    with pytest.raises(UserError, match=r"the disk is full: .* \(nothing was written\)"):
        write_atomically(tmp_path / "new.npz", fills_the_disk)
    assert path.read_text() == "the samples of yesterday\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["samples.txt"]


def test_an_output_path_below_a_file_is_one_line(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(UserError, match="a file of that name exists"):
        write_text(tmp_path / "notes.txt" / "samples.txt", "x")
    with pytest.raises(UserError, match=r"notes\.txt/a: Not a directory"):
        write_text(tmp_path / "notes.txt" / "a" / "samples.txt", "x")


def test_run_files_get_the_umask_mode(tmp_path):
    previous = os.umask(0o002)
    try:
        _trainer(tmp_path / "run", 3).fit(progress=False)
        write_text(tmp_path / "samples.txt", "x")
    finally:
        os.umask(previous)
    for name in ("run/checkpoint.safetensors", "run/config.json", "run/loss.csv", "samples.txt"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o664, name


def test_config_json_is_a_config_file_with_the_recipe(tmp_path):
    tr = _trainer(tmp_path / "run", 2)
    tr.fit(progress=False)
    written = json.loads((tmp_path / "run" / "config.json").read_text())
    assert written == {"recipe": "toy", **tr.run_config["config"]}
    assert load_checkpoint(tmp_path / "run").config == tr.run_config  # the header: the reference


def test_max_minutes_reports_that_training_stopped_early(tmp_path):
    result = _trainer(tmp_path / "run", 50, max_minutes=1e-12).fit(progress=False)
    assert result.stopped_early and result.steps == 1
    assert load_checkpoint(tmp_path / "run").step == 1
    result = _trainer(tmp_path / "run", 3).fit(resume=True, progress=False)
    assert not result.stopped_early and result.steps == 3


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        ({"step": "seven"}, "corrupt header: invalid literal"),
        ({"step": None}, "corrupt header: 'step' is missing"),
        ({"config": "{not json"}, "its run config is not JSON"),
        ({"config": "[1, 2]"}, "its run config is not a mapping"),
    ],
)
def test_corrupt_checkpoint_headers_are_one_line(tmp_path, metadata, message):
    header = {"format": "difflab-checkpoint-1", "config": "{}", "step": "3",
              "param_groups": "[]", **metadata}  # fmt: skip
    header = {k: v for k, v in header.items() if v is not None}
    save_file({"model.w": torch.zeros(2)}, str(tmp_path / "checkpoint.safetensors"), header)
    with pytest.raises(UserError, match=message):
        load_checkpoint(tmp_path)


def test_resume_from_a_checkpoint_without_rng_state_is_refused(tmp_path):
    out = tmp_path / "run"
    _trainer(out, 3).fit(progress=False)
    ckpt = load_checkpoint(out)
    save_checkpoint(out / "checkpoint.safetensors", config=ckpt.config, step=3, model=ckpt.model,
                    ema=ckpt.ema, optimizer=None, rng={})  # fmt: skip
    with pytest.raises(UserError, match=r"cannot be resumed: it lacks rng\.generator, rng\.torch"):
        _trainer(out, 6).fit(resume=True, progress=False)
