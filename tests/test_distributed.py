"""Many processes (torchrun, gloo, 2 processes on the CPU), accumulation and precision.

One 2-process job (``distributed_job.py`` under ``python -m torch.distributed.run``) runs every
scenario below through ``difflab``'s command line; the 1-process references train in this
process. The reference of 2 processes with ``accumulate=K`` is 1 process with ``accumulate=2K``:
both draw a step's global batch as the same 2K micro-batch streams (see ``trainer.py``), so
their weights agree up to float rounding.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import difflab
from difflab.cli import main
from difflab.config import TrainConfig
from difflab.errors import UserError
from difflab.train import distributed
from difflab.train.checkpoint import load_checkpoint
from difflab.train.trainer import Trainer, autocast_dtype

JOB = Path(__file__).with_name("distributed_job.py")
SRC = str(Path(difflab.__file__).parents[1])
IMAGE = ["digits-tiny", "model.unet.channels=8", "model.unet.num_heads=2", "diffusion.T=20",
         "train.batch_size=16", "train.lr_schedule=constant", "train.warmup=2",
         "train.log_every=1", "train.ckpt_every=3"]  # fmt: skip
TEXT = ["text-tiny", "train.batch_size=8", "train.log_every=1"]
RUN_FILES = {"checkpoint.safetensors", "config.json", "loss.csv", "loss_curve.png", ".lock"}


def _torchrun(records: Path, commands: list[dict], timeout: float):
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(JOB), str(records), json.dumps(commands)],
        capture_output=True, text=True, timeout=timeout, env=env,
        start_new_session=True,  # a signal torchrun's processes send their group stays there
    )  # fmt: skip


def _train(*args: str) -> None:
    with pytest.raises(SystemExit) as info:
        main(["train", *args, "--quiet"])
    assert info.value.code == 0


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """The 2-process runs, each ``(name, command line)``; returns the root and the records."""
    root = tmp_path_factory.mktemp("ddp")
    (root / "records").mkdir()
    runs = {
        "image": [*IMAGE, "train.steps=3"],
        "image-acc2": [*IMAGE, "train.steps=3", "train.accumulate=2"],
        "text": [*TEXT, "train.steps=3"],
        "text-acc2": [*TEXT, "train.steps=3", "train.accumulate=2"],
        "full": [*IMAGE, "train.steps=6"],
        "part": [*IMAGE, "train.steps=3"],
        "part-resumed": [*IMAGE, "train.steps=6", "--resume"],
        "half": [*IMAGE, "train.steps=3"],
        "classifier": [*IMAGE, "train.steps=2", "classifier.channels=8", "--recipe", "classifier"],
        "cascade": [*IMAGE, "train.steps=2", "--recipe", "cascade", "cascade.low_res=4"],
        "text-to-digit": [*IMAGE, "train.steps=2", "--recipe", "text-to-digit"],
        "interrupted": [*IMAGE, "train.steps=20", "train.ckpt_every=100"],
    }
    commands = []
    for name, args in runs.items():
        out = root / name.removesuffix("-resumed")
        commands.append({"argv": ["train", *args, f"train.out={out}", "--quiet"]})
    commands[-1]["interrupt_at"] = 2  # rank 1 alone gets SIGINT while computing step 3
    done = _torchrun(root / "records", commands, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    records = {
        name: [torch.load(root / "records" / f"{i}.rank{r}.pt") for r in (0, 1)]
        for i, name in enumerate(runs)
    }
    return root, records, done


def _assert_same_weights(a: Path, b: Path, exact: bool = False) -> None:
    ca, cb = load_checkpoint(a), load_checkpoint(b)
    assert ca.step == cb.step
    for group in ("model", "ema"):
        x, y = getattr(ca, group), getattr(cb, group)
        assert x.keys() == y.keys()
        for k in x:
            if exact:
                assert torch.equal(x[k], y[k]), (group, k)
            else:
                torch.testing.assert_close(x[k], y[k], rtol=1e-4, atol=2e-6, msg=f"{group}.{k}")


@pytest.mark.parametrize(
    ("name", "args", "accumulate"),
    [
        ("image", IMAGE, 2),
        ("image-acc2", IMAGE, 4),
        ("text", TEXT, 2),
        ("text-acc2", TEXT, 4),
    ],
)
def test_two_processes_train_what_one_process_trains_on_the_same_global_batch(
    job, tmp_path, name, args, accumulate
):
    root, _, _ = job
    _train(*args, "train.steps=3", f"train.accumulate={accumulate}", f"train.out={tmp_path}")
    _assert_same_weights(root / name, tmp_path)
    # ... and training moved the weights: the comparison is not between two initialisations.
    start = load_checkpoint(tmp_path)
    assert any(not torch.equal(start.model[k], start.ema[k]) for k in start.model)


def test_ema_is_equal_on_both_processes_and_only_rank_0_writes(job):
    root, records, done = job
    for name, (rank0, rank1) in records.items():
        assert rank1["checkpoints_written"] == 0, name
        assert rank0["checkpoints_written"] >= 1, name
        for a, b in zip(rank0["ema"], rank1["ema"], strict=True):
            assert torch.equal(a, b), name
    for name in ("image", "full", "part", "half"):
        assert {p.name for p in (root / name).iterdir()} == RUN_FILES
    assert {p.name for p in (root / "text").iterdir()} == RUN_FILES | {"tokenizer.json"}
    assert done.stdout.count("trained 3 steps") == 6  # rank 0 reports, rank 1 is quiet
    assert done.stdout.count("trained 2 steps") == 3


def test_every_recipe_trains_under_torchrun(job):
    root, records, _ = job
    for name in ("classifier", "text-to-digit"):
        assert load_checkpoint(root / name).step == 2
        assert {p.name for p in (root / name).iterdir()} == RUN_FILES
    for stage in ("base", "sr"):
        assert load_checkpoint(root / "cascade" / stage).step == 2
    assert [r["checkpoints_written"] for r in records["cascade"]] == [2, 0]  # one per stage


def test_a_stop_request_to_one_process_stops_both_at_the_same_step(job):
    root, records, done = job
    rank0, rank1 = records["interrupted"]
    assert rank0["code"] == rank1["code"] == 130
    assert rank0["step"] == rank1["step"] == 4  # requested in step 3, agreed at step 4
    assert load_checkpoint(root / "interrupted").step == 4
    assert done.stderr.count("difflab: interrupted at step 4") == 1  # said by rank 0 only


def test_a_resumed_two_process_run_equals_the_uninterrupted_one(job):
    root, _, _ = job
    _assert_same_weights(root / "full", root / "part", exact=True)
    full, part = ((root / n / "loss.csv").read_text().splitlines() for n in ("full", "part"))
    assert [r.split(",")[:2] for r in full] == [r.split(",")[:2] for r in part]


def test_a_two_process_run_resumed_by_one_process_keeps_the_global_batch(job, tmp_path):
    root, _, _ = job
    import shutil

    shutil.copytree(root / "half", tmp_path / "half")
    assert load_checkpoint(tmp_path / "half").extra["streams"] == 2
    # One process with accumulate=2 draws the same two streams per step: the continuation
    # is the uninterrupted 2-process run's.
    _train(*IMAGE, "train.steps=6", "train.accumulate=2", f"train.out={tmp_path / 'half'}",
           "--resume")  # fmt: skip
    _assert_same_weights(root / "full", tmp_path / "half")
    # With accumulate=1 its one stream draws the whole global batch (other rows, same size).
    shutil.copytree(root / "half", tmp_path / "one")
    _train(*IMAGE, "train.steps=4", f"train.out={tmp_path / 'one'}", "--resume")
    assert load_checkpoint(tmp_path / "one").extra["streams"] == 1


def test_a_process_that_fails_ends_the_job_with_one_line(tmp_path):
    (tmp_path / "records").mkdir()
    argv = ["train", *IMAGE, "train.steps=6", f"train.out={tmp_path / 'run'}", "--quiet"]
    done = _torchrun(tmp_path / "records", [{"argv": argv, "fail_at": 2}], timeout=300)
    assert done.returncode != 0
    lines = [ln for ln in (done.stdout + done.stderr).splitlines() if "difflab" in ln.lower()]
    ours = [ln for ln in lines if ln.startswith("difflab:")]
    assert ours == ["difflab: error: rank 1 of 2: the loss of this process could not be computed"]
    assert "Traceback" not in done.stderr.split("difflab: error:")[0]


# ---------------------------------------------------------------- one process


def _toy_trainer(tmp_path, **train):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 16), nn.SiLU(), nn.Linear(16, 1))
    x = torch.randn(64, 3, generator=torch.Generator().manual_seed(1))

    def loss_fn(net, batch, gen):
        out = net(batch[0] + 0.01 * torch.randn(batch[0].shape, generator=gen))
        assert out.dtype == torch.float32  # the loss reads float32 whatever the precision
        return ((out - batch[0].sum(1, keepdim=True)) ** 2).mean()

    settings = {"steps": 40, "batch_size": 16, "lr": 3e-2, "warmup": 2, "log_every": 10,
                "ckpt_every": 20, "device": "cpu", **train}  # fmt: skip
    cfg = TrainConfig(out=str(tmp_path), **settings)
    return Trainer(model, loss_fn, (x,), cfg, {"recipe": "toy", "config": {}}, tmp_path)


def _losses(folder: Path) -> list[float]:
    return [float(r.split(",")[1]) for r in (folder / "loss.csv").read_text().split()[1:]]


def test_bf16_autocast_trains_like_fp32_with_float32_weights(tmp_path):
    for precision in ("bf16", "fp32"):
        _toy_trainer(tmp_path / precision, precision=precision).fit(progress=False)
    ckpt = load_checkpoint(tmp_path / "bf16")
    assert all(t.dtype == torch.float32 and bool(t.isfinite().all()) for t in ckpt.ema.values())
    bf16, fp32 = _losses(tmp_path / "bf16"), _losses(tmp_path / "fp32")
    assert bf16[-1] < 0.05 * bf16[0]  # it learns ...
    assert bf16 != fp32  # ... in bfloat16 (the arithmetic did change) ...
    torch.testing.assert_close(torch.tensor(bf16), torch.tensor(fp32), rtol=0.05, atol=0)


def test_accumulation_is_the_mean_over_micro_batches(tmp_path):
    """One step with accumulate=2 moves the weights as the mean of the two micro-batch
    gradients, each drawn from its stream's generator (seeded by derived_seed)."""
    trainer = _toy_trainer(tmp_path, accumulate=2, steps=1, grad_clip=0.0)
    torch.manual_seed(0)  # the toy's initial weights, again
    net = nn.Sequential(nn.Linear(3, 16), nn.SiLU(), nn.Linear(16, 1))
    x = trainer.tensors[0]
    grads = []
    for stream in (0, 1):
        gen = torch.Generator().manual_seed(distributed.derived_seed(0, 0, stream))
        idx = torch.randint(64, (8,), generator=gen)
        loss = trainer.loss_fn(net, (x[idx],), gen)
        grads.append(torch.autograd.grad(loss, list(net.parameters())))
    trainer.fit(progress=False)
    # AdamW's first step with bias correction moves each weight by lr * g / (|g| + eps).
    for p0, p1, g0, g1 in zip(net.parameters(), trainer.model.parameters(), *grads, strict=True):
        g = (g0 + g1) / 2
        expected = p0.detach() - 3e-2 * 0.5 * g / (g.abs() + 1e-8)  # warmup: lr / 2 at step 0
        torch.testing.assert_close(p1.detach(), expected, rtol=1e-4, atol=1e-6)


def test_derived_seeds_keep_stream_0_and_differ_elsewhere():
    assert distributed.derived_seed(7, 0, 0) == 7
    seeds = {distributed.derived_seed(7, p, i, s) for p in (0, 1) for i in (1, 2) for s in (0, 5)}
    assert len(seeds) == 8 and all(0 <= s < 2**63 for s in seeds)


def test_compile_trains_the_same_weights_as_eager(tmp_path):
    eager = _toy_trainer(tmp_path / "eager", steps=3)
    eager.fit(progress=False)
    compiled = _toy_trainer(tmp_path / "compiled", steps=3, compile=True)
    compiled.fit(progress=False)
    for a, b in zip(eager.model.parameters(), compiled.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_a_network_that_does_not_compile_is_one_line(tmp_path, monkeypatch):
    def failing_compile(net):
        def forward(*args, **kwargs):
            raise torch._dynamo.exc.BackendCompilerFailed(
                failing_compile, OSError("no cc found"), None
            )

        return forward

    monkeypatch.setattr(torch, "compile", failing_compile)
    with pytest.raises(UserError, match=r"could not compile the network \(no cc found\); train "
                       r"without it: train.compile=false"):  # fmt: skip
        _toy_trainer(tmp_path, compile=True).fit(progress=False)


def test_batch_must_split_over_processes_and_micro_batches(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(UserError, match=r"multiple of the number of processes \(4\) times "
                       r"train.accumulate \(2\)"):  # fmt: skip
        _toy_trainer(tmp_path, accumulate=2, batch_size=12)


def test_bf16_on_a_gpu_without_it_is_refused_with_the_reason(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation: False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "Tesla T4")
    cuda = torch.device("cuda", 0)
    with pytest.raises(UserError, match=r"Tesla T4 has 7.5: use train.precision=fp32"):
        autocast_dtype("bf16", cuda)
    assert autocast_dtype("auto", cuda) is None
    assert autocast_dtype("auto", torch.device("cpu")) is None
    assert autocast_dtype("bf16", torch.device("cpu")) is torch.bfloat16


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "digits-tiny", "train.accumulate=0"], "train.accumulate must be at least 1"),
        (["train", "digits-tiny", "train.batch_size=10", "train.accumulate=4"],
         "train.batch_size=10 must be a multiple of train.accumulate=4"),
        (["train", "digits-tiny", "train.precision=fp16"],
         "train.precision must be one of auto, bf16, fp32, got 'fp16'"),
        (["train", "digits-tiny", "train.compile=maybe"], "train.compile has an impossible value"),
    ],
)  # fmt: skip
def test_bad_distributed_settings_are_one_line(args, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main([*args, f"train.out={tmp_path / 'run'}", "--quiet"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("command", ["sample", "eval", "demo"])
def test_commands_other_than_train_refuse_to_run_under_torchrun(command, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(SystemExit) as info:
        main([command] + (["somewhere"] if command != "demo" else []))
    err = capsys.readouterr().err
    assert info.value.code == 2
    assert err == (f"difflab: error: rank 1 of 2: difflab {command} runs in one process: start "
                   "it without torchrun (only difflab train uses many)\n")  # fmt: skip


def test_a_job_without_torchrun_s_variables_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(SystemExit) as info:
        main(["train", "digits-tiny", f"train.out={tmp_path / 'run'}", "--quiet"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1, err
    assert "MASTER_ADDR expected, but not set): start it with torchrun" in err
