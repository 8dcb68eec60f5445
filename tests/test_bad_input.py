"""Bad input from the command line, one table: every command and every recipe.

Each row is something a demanding new user types: a usage slip, a config value the network or
the data cannot take, an unreadable, missing or damaged file, a request too large for memory, a
nonsense or NaN option, an option that does not apply. Every row must end with exit status 2,
exactly one line on stderr, ``difflab: error: ...``, that names the reason, and must leave every
file as it was (the runs it reads, the data, the folders around the output it asked for).

The runs are trained once for the module (2 steps, tiny sizes). Rows that need a file the user
may not read or write chmod it; as root, who may read and write anything, they run with the
effective user ``nobody``, so that the kernel refuses them as it would refuse anyone else.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import difflab
from difflab.cli import main

TINY = ["train.steps=2", "train.batch_size=8", "train.log_every=1", "model.unet.channels=8",
        "model.unet.num_heads=2", "diffusion.T=20", "sample.steps=2"]  # fmt: skip
MOONS = ["train.steps=2", "train.batch_size=8", "model.mlp.hidden=8", "model.mlp.depth=1",
         "diffusion.T=20", "sample.steps=2"]  # fmt: skip
NOBODY = 65534


# ---------------------------------------------------------------- the world the rows run in


@pytest.fixture(scope="module")
def world() -> Iterator[dict[str, str]]:
    """A folder readable by anyone holding one tiny run of every recipe, damaged copies of
    them, bad data and config files, and files the user may not read or write; returns the
    paths the rows name."""
    root = Path(tempfile.mkdtemp(prefix="difflab-bad-input-"))
    root.chmod(0o755)
    runs = root / "runs"
    for recipe in ("image", "classifier", "cascade", "text-to-digit"):
        difflab.train("digits-tiny", TINY + ["classifier.channels=8"] * (recipe == "classifier"),
                      recipe=recipe, out=str(runs / recipe), progress=False)  # fmt: skip
    difflab.train("moons", MOONS, out=str(runs / "moons"), progress=False)
    difflab.train("text-tiny", ["train.steps=2"], out=str(runs / "text"), progress=False)
    # Draw once, so that every module the denied rows use is imported while root may still
    # read the interpreter's files (the user nobody may not, where Python lives in /root).
    for run in ("image", "text"):
        difflab.load(runs / run, "cpu").sample(2).save(root / "warm-up" / run)
    paths = {name: str(runs / name) for name in (*RECIPES, "moons")}
    _damaged_runs(runs, root / "bad")
    _bad_data(root / "data")
    _denied(runs, root / "denied")
    (root / "a-file").write_text("not a folder\n")
    (root / "scratch").mkdir()
    paths.update({k: str(root / k) for k in ("bad", "data", "denied", "a-file", "scratch")})
    paths["root"] = str(root)
    yield paths
    (root / "denied" / "locked").chmod(0o755)  # for a user other than root to remove it
    shutil.rmtree(root)


def _damaged_runs(runs: Path, bad: Path) -> None:
    """Copies of the runs, each with one thing wrong in its checkpoint."""

    def damage(run: str, name: str, edit) -> None:
        folder = bad / name
        shutil.copytree(runs / run, folder)
        path = folder / "checkpoint.safetensors"
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        tensors = load_file(str(path))
        meta, tensors = edit(meta, json.loads(meta["config"]), tensors)
        save_file(tensors, str(path), metadata=meta)

    def header(**entries):
        return lambda meta, cfg, t: ({**meta, **entries}, t)

    def without(key):
        return lambda meta, cfg, t: ({k: v for k, v in meta.items() if k != key}, t)

    def config(edit):
        return lambda meta, cfg, t: ({**meta, "config": json.dumps(edit(cfg))}, t)

    def tensors(edit):
        return lambda meta, cfg, t: (meta, edit(t))

    def drop(prefix):
        return tensors(lambda t: {k: v for k, v in t.items() if not k.startswith(prefix)})

    damage("image", "json", header(config="{not json"))
    damage("image", "no-step", without("step"))
    damage("image", "step", header(step="two"))
    damage("image", "no-config", without("config"))
    damage("image", "foreign", without("format"))
    damage("image", "recipe", config(lambda c: {**c, "recipe": "magic"}))
    damage("image", "no-shape", config(lambda c: {k: v for k, v in c.items() if k != "shape"}))
    damage("image", "null-config", config(lambda c: {**c, "config": None}))
    damage("image", "no-held-out", config(lambda c: _set(c, "data", held_out=0.0)))
    damage("image", "edm", config(lambda c: _set(c, "diffusion", schedule="edm", T=None)))
    damage("image", "no-rng", drop("rng."))
    damage("image", "no-ema", drop("ema."))
    damage("image", "rng", tensors(lambda t: {**t, "rng.generator": t["rng.generator"][:3]}))
    damage("moons", "moons-classes",
           config(lambda c: {k: v for k, v in c.items() if k != "class_names"}))  # fmt: skip
    damage("text-to-digit", "t2d-thresholds",
           config(lambda c: {k: v for k, v in c.items() if k != "thresholds"}))  # fmt: skip
    damage("text", "text-json", header(config="[1,"))
    damage("text", "text-classes",
           config(lambda c: {k: v for k, v in c.items() if k != "class_names"}))  # fmt: skip
    damage("text", "text-null-config", config(lambda c: {**c, "config": None}))
    for name, data in (("truncated", None), ("garbage", b"hello")):
        shutil.copytree(runs / "image", bad / name)
        path = bad / name / "checkpoint.safetensors"
        path.write_bytes(data if data is not None else path.read_bytes()[:1000])
    shutil.copytree(runs / "cascade", bad / "cascade-no-sr")
    shutil.rmtree(bad / "cascade-no-sr" / "sr")


def _set(run_config: dict, section: str, **values) -> dict:
    """``run_config`` with keys of one section of its config set."""
    config = run_config["config"]
    return {**run_config, "config": {**config, section: {**config[section], **values}}}


def _bad_data(data: Path) -> None:
    """Image folders, array files, corpora and configs with one thing wrong each."""
    grey = Image.fromarray(np.zeros((8, 8), np.uint8))
    for name in ("one/a.png", "singles/a/x.png", "singles/b/x.png"):
        (data / name).parent.mkdir(parents=True, exist_ok=True)
        grey.save(data / name)
    (data / "not-image").mkdir()
    (data / "not-image" / "a.png").write_bytes(b"not a png")
    (data / "empty").mkdir()
    (data / "pngs").mkdir()  # what sample --format png wrote for an earlier --n 3
    for i in range(3):
        grey.save(data / "pngs" / f"{i:06d}.png")
    x = np.random.default_rng(0).uniform(-1, 1, (20, 2)).astype(np.float32)
    np.savez(data / "float-labels.npz", x=x, labels=np.arange(20) * 0.5)
    np.savez(data / "string-labels.npz", x=x, labels=np.array(["a"] * 20))
    np.savez(data / "huge-labels.npz", x=x, labels=np.full(20, 10**12))
    np.savez(data / "one-label.npz", x=x, labels=np.array(3))
    np.save(data / "complex.npy", x.astype(np.complex64))
    np.save(data / "nan.npy", x * np.nan)
    np.save(data / "objects.npy", np.array([1, "a"], dtype=object), allow_pickle=True)
    (data / "fake.npy").write_bytes(b"hello")
    (data / "binary.yaml").write_bytes(bytes(range(256)))
    (data / "list.yaml").write_text("- 1\n- 2\n")
    (data / "broken.yaml").write_text("train: [1\n")
    (data / "twice.yaml").write_text("train:\n  steps: 3\n  steps: 5\n")
    (data / "python.yaml").write_text("train: !!python/object:os.system {}\n")
    (data / "utf16.yaml").write_bytes("recipe: image\n".encode("utf-16"))
    (data / "cycle.yaml").write_text("sample:\n  grid: &g [*g]\n")
    # A billion laughs: each level lists the one before nine times, 9**9 strings in the end.
    levels = ['&l0 ["x","x","x","x","x","x","x","x","x"]']
    levels += [f"&l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 9)]
    (data / "bomb.yaml").write_text("sample:\n  grid:\n" + "".join(f"    - {v}\n" for v in levels))
    (data / "binary.txt").write_bytes(bytes(range(128, 256)) * 8)


def _denied(runs: Path, denied: Path) -> None:
    """Files and folders the user may not read or enter (mode 000) or write (0555)."""
    denied.mkdir()
    (denied / "config.yaml").write_text("recipe: image\n")
    np.save(denied / "array.npy", np.zeros((20, 2), np.float32))
    (denied / "corpus.txt").write_text("To be, or not to be, that is the question.\n" * 20)
    shutil.copytree(runs / "image", denied / "run")
    shutil.copytree(runs / "text", denied / "text-run")
    shutil.copytree(runs / "image", denied / "locked" / "run")
    for path in ("config.yaml", "array.npy", "corpus.txt", "run/checkpoint.safetensors",
                 "text-run/tokenizer.json", "locked"):  # fmt: skip
        (denied / path).chmod(0o000)
    for folder in ("out", "empty"):
        (denied / folder).mkdir()
        (denied / folder).chmod(0o555)


@contextmanager
def _as_a_user(denied: bool) -> Iterator[None]:
    """For a row that touches the denied files: as root, run it with the effective user and
    group ``nobody`` (root reads and writes through any mode)."""
    if not denied or os.geteuid() != 0:
        yield
        return
    os.setegid(NOBODY)
    os.seteuid(NOBODY)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


def _snapshot(root: Path) -> dict[str, tuple[int, ...]]:
    """Every path under ``root`` with its mode and inode, and for files their size and
    modification time (a write changes the time, an atomic replace the inode; a folder's own
    time changes with its entries, which are listed themselves)."""
    state = {}
    for p in root.rglob("*"):
        st = p.lstat()
        data = () if p.is_dir() else (st.st_size, st.st_mtime_ns)
        state[str(p)] = (st.st_mode, st.st_ino, *data)
    return state


# ---------------------------------------------------------------- the table

#: Every sampling option with a value, and the recipes that take it.
OPTIONS = {
    "--sampler": ("ddim", {"image", "cascade", "text-to-digit", "text"}),
    "--grid": ("karras", {"image", "cascade", "text-to-digit"}),
    "--eta": ("0.5", {"image", "cascade", "text-to-digit"}),
    "--opt": ("eta=0.5", {"image", "cascade", "text-to-digit"}),
    "--class": ("3", {"image", "cascade", "text"}),
    "--guidance": ("1", {"image", "cascade", "text-to-digit", "text"}),
    "--convention": ("gamma", {"image", "cascade", "text-to-digit"}),
    "--classifier": ("{classifier}", {"image"}),
    "--classifier-scale": ("2", {"image"}),
    "--threshold": ("dynamic", {"image", "cascade", "text-to-digit"}),
    "--percentile": ("0.9", {"image", "cascade", "text-to-digit"}),
    "--aug-level": ("0.2", {"cascade"}),
    "--prompt": ("'a three'", {"text-to-digit", "text"}),
    "--length": ("8", {"text"}),
    "--temperature": ("0.5", {"text"}),
    "--top-p": ("0.9", {"text"}),
}
RECIPES = ("image", "classifier", "cascade", "text-to-digit", "text")
NOT_TAKEN = [
    (f"sample {{{recipe}}} --n 2 --out {{scratch}}/s {option} {value}"
     + (" --prompt 'a three'" if recipe == "text-to-digit" and option != "--prompt" else ""),
     f"{option} does not apply to {recipe} runs")
    for option, (value, takes) in OPTIONS.items() for recipe in RECIPES if recipe not in takes
]  # fmt: skip

S = "--n 2 --out {scratch}/s"  # sample rows: two samples, written (if ever) into the scratch
#: train rows: a fresh run folder in the scratch, and seconds, not minutes, should one train
T = "--quiet train.out={scratch}/run train.max_minutes=0.01"
P = "--prompt 'a thin three'"  # the text-to-digit model needs one

#: (command line, a fragment of the one-line error that shows the reason). Rows naming
#: ``{denied}`` run as a user without root's rights.
ROWS = [
    # usage
    ("bogus", "No such command 'bogus'"),
    ("train --bogus", "No such option: --bogus"),
    ("sample", "give the run folder or checkpoint to sample from"),
    ("eval", "Missing argument 'run'"),
    ("sample {image} --n abc", "Invalid value for '--n'"),
    ("sample {image} --n 0", "must be a whole number >= 1, got 0"),
    ("sample {text} --n -3", "must be a whole number >= 1, got -3"),
    ("sample {image} --format jpg", "--format must be npz or png"),
    ("sample {moons} --format png " + S, "--format png applies to images only"),
    ("sample {text} --format png " + S, "--format png applies to images only"),
    ("sample {image} --device tpu " + S, "unknown device 'tpu'"),
    ("sample {image} --device cuda:99 " + S, "the device 'cuda:99' was asked for, but"),
    ("sample {image} --device meta " + S, "unknown device 'meta'"),
    ("sample {image} --opt x " + S, "--opt 'x' must look like key=value"),
    ("sample {classifier} " + S, "a classifier draws no samples"),
    ("train digits-tiny train.steps " + T, "override 'train.steps' must look like"),
    ("train digits-tiny steps=3 " + T, "override 'steps=3' must look like"),
    ("train digits-tiny train.steps.x=3 " + T, "config section train.steps must be a mapping"),
    ("train digits-tiny --recipe magic " + T, "recipe must be one of"),
    ("train digits-tiny recipe=magic " + T, "recipe must be one of"),
    ("demo --steps 0 --out {scratch}/demo", "--steps must be a whole number >= 1, got 0"),
    ("demo --steps -1 --out {scratch}/demo", "--steps must be a whole number >= 1, got -1"),
    # config values that used to reach a deep error
    ("train digits-tiny model.unet.num_heads=3 " + T, "num_heads=3 does not divide the attent"),
    ("train digits-tiny model.unet.num_heads=0 " + T, "num_heads must be a positive integer"),
    ("train digits-tiny model.unet.attn_resolutions=[3] " + T, "[3] match no level"),
    ("train digits-tiny model.unet.channels=0 " + T, "channels must be a positive integer"),
    ("train digits-tiny model.unet.channel_mults=[] " + T, "channel_mults must list at least"),
    ("train digits-tiny model.unet.dropout=1.5 " + T, "dropout must be in [0, 1)"),
    ("train digits-tiny model.kind=dit model.unet=null model.dit.patch_size=3 " + T,
     "image_size 8 is not divisible by patch_size 3"),
    ("train digits-tiny model.kind=dit model.unet=null model.dit.width=30 " + T,
     "sin-cos position embedding"),
    ("train digits-tiny --recipe cascade model.unet.num_heads=3 " + T,
     "model.unet: num_heads=3 does not divide"),
    ("train digits-tiny --recipe text-to-digit model.unet.num_heads=3 " + T,
     "model.unet: num_heads=3 does not divide"),
    ("train digits-tiny --recipe text-to-digit text_encoder.num_heads=3 " + T,
     "text_encoder.num_heads must divide text_encoder.dim"),
    ("train digits-tiny --recipe cascade cascade.low_res=3 " + T, "low_res=3 must divide the"),
    ("train digits-tiny --recipe cascade cascade.low_res=0 " + T, "low_res must be at least 1"),
    ("train digits-tiny --recipe classifier classifier.channel_mults=[1,2,2,2,2] " + T,
     "are not divisible by 16"),
    ("train digits-tiny data.held_out=0.99 " + T, "data.held_out must be in [0, 0.5]"),
    ("train digits-tiny data.split_seed=-1 " + T, "data.split_seed must be non-negative"),
    ("train digits-tiny data.image_size=8 " + T, "data.image_size applies to data.name=folder"),
    ("train digits-tiny data.name=folder data.path={data}/one data.image_size=0 " + T,
     "data.image_size must be >= 1"),
    ("train digits-tiny data.name=folder data.path={data}/one data.image_size=100000 " + T,
     "data.image_size=100000 asks for images of 10,000,000,000 pixels"),
    ("train digits-tiny data.path={data}/one " + T, "data.path does not apply to data.name"),
    ("train digits-tiny data.name=magic " + T, "unknown dataset 'magic'"),
    ("train digits-tiny train.seed=100000000000000000000000 " + T,
     "train.seed must be a whole number in 0..2**63-1"),
    ("train digits-tiny sample.seed=-1 " + T, "sample.seed must be a whole number in 0..2**63-1"),
    ("train digits-tiny train.lr=.nan " + T, "train.lr must be a finite number"),
    ("train digits-tiny diffusion.cond_drop=nan " + T, "diffusion.cond_drop must be a finite"),
    ("train digits-tiny train.steps=1.5 " + T, "train.steps has an impossible value 1.5"),
    ("train digits-tiny train.batch_size=0 " + T, "train.batch_size must be at least 1"),
    ("train digits-tiny diffusion.T=0 " + T, "diffusion.T must be at least 1"),
    ("train digits-tiny sample.guidance=-1 " + T, "sample.guidance must be non-negative"),
    ("train digits-tiny sample.sampler=heun sample.eta=0.5 " + T,
     "sample.eta does not apply to sample.sampler=heun"),
    ("train moons model.kind=unet model.mlp=null " + T, "needs square images (C, H, H)"),
    ("train moons --recipe cascade " + T, "the cascade recipe needs model.kind=unet"),
    ("train moons --recipe text-to-digit " + T, "trains on data.name=digits, not moons"),
    ("train moons --recipe text " + T, "the text recipe trains on text"),
    ("train text-tiny --recipe classifier " + T, "the classifier recipe trains on images"),
    ("train text-tiny model.num_heads=3 " + T, "must be an even whole number (rotary"),
    ("train text-tiny data.length=0 " + T, "data.length must be at least 2"),
    ("train text-tiny data.tokenizer=magic " + T, "data.tokenizer must be one of char, bpe"),
    ("train text-tiny diffusion.kind=magic " + T, "diffusion.kind must be one of"),
    ("train text-tiny train.seed=-1 " + T, "train.seed must be a whole number in 0..2**63-1"),
    ("train text-tiny sample.seed=100000000000000000000000 " + T,
     "sample.seed must be a whole number in 0..2**63-1"),
    ("train text-tiny sample.seed=-1 " + T, "sample.seed must be a whole number in 0..2**63-1"),
    ("train text-tiny data.length=100000000 " + T, "data.length must be at most 8,192 tokens"),
    # config files
    ("train {data}/binary.yaml " + T, "cannot read {data}/binary.yaml"),
    ("train {data}/utf16.yaml " + T, "cannot read {data}/utf16.yaml"),
    ("train {data}/list.yaml " + T, "must hold a mapping of sections"),
    ("train {data}/broken.yaml " + T, "cannot parse {data}/broken.yaml"),
    ("train {data}/twice.yaml " + T, "the key 'steps' is given twice"),
    ("train {data}/python.yaml " + T, "could not determine a constructor"),
    ("train {data}/cycle.yaml " + T, "sample.grid has an impossible value [[[...]]]"),
    ("train {data}/bomb.yaml " + T, "sample.grid has an impossible value [['x', 'x', 'x', 'x'"),
    ("train {data}/none.yaml " + T, "is neither a preset"),
    ("train {data} " + T, "is neither a preset"),
    # runs and outputs in the way
    ("train {image} --quiet", "already holds a run: pass --resume"),
    ("train {text} --quiet", "already holds a run: pass --resume"),
    ("train {image} --resume --quiet model.unet.channels=16", "channels is 8 in the checkpoint"),
    ("train {text} --resume --quiet data.length=16", "data.length is 32 in the checkpoint"),
    ("train {image} --resume --quiet --recipe cascade", "holds a run of the image recipe"),
    ("train digits-tiny --recipe text-to-digit --quiet train.out={classifier}",
     "holds a run of the classifier recipe"),
    ("train digits-tiny --resume " + T, "no checkpoint at {scratch}/run"),
    ("train {bad}/cascade-no-sr --resume --quiet train.steps=3", "no checkpoint at"),
    ("train digits-tiny --quiet train.out={a-file}", "a file of that name exists"),
    ("train digits-tiny --quiet train.out={a-file}/run", "Not a directory"),
    ("train digits-tiny --quiet train.out=/proc/run", "No such file or directory"),
    ("sample {image} --n 2 --out {a-file}/s", "a file of that name exists"),
    ("sample {image} --n 2 --out {a-file} --format png", "{a-file} is a file: one PNG per"),
    ("sample {image} --n 2 --out {data}/pngs --format png", "holds sample PNGs up to 000002.png"),
    ("sample {image} --n 2 --out /proc/s", "/proc/s.npz: No such file or directory"),
    ("sample {text} --n 2 --out /proc/s", "/proc/s.txt: No such file or directory"),
    ("sample {image} --n 2 --out ''", "names no file"),
    ("sample {image} --n 2 --out /", "names no file"),
    ("sample {image} --n 2 --out {image}/loss_curve", "is a file of the run in {image}"),
    ("sample {cascade}/sr " + S, "is one stage of a cascade"),
    ("sample {bad}/cascade-no-sr " + S, "no checkpoint at {bad}/cascade-no-sr/sr"),
    ("sample {scratch}/none " + S, "no checkpoint at {scratch}/none"),
    ("sample {image}/config.json " + S, "is not a readable checkpoint"),
    ("demo --out {a-file}", "a file of that name exists"),
    ("demo --out {a-file}/demo", "Not a directory"),
    # files the user may not read or write
    ("train {denied}/config.yaml " + T, "permission denied: {denied}/config.yaml"),
    ("train digits-tiny --quiet train.out={denied}/out/run", "permission denied"),
    ("train moons data.name=array data.path={denied}/array.npy " + T, "permission denied"),
    ("train text-tiny data.source={denied}/corpus.txt " + T,
     "permission denied: {denied}/corpus.txt"),
    ("sample {image} --n 2 --out {denied}/out/s", "permission denied: {denied}/out/s.npz"),
    ("sample {text} --n 2 --out {denied}/out/s", "permission denied: {denied}/out/s.txt"),
    ("sample {denied}/run " + S, "permission denied: {denied}/run/checkpoint.safetensors"),
    ("sample {denied}/text-run " + S, "permission denied: {denied}/text-run/tokenizer.json"),
    ("eval {denied}/run", "permission denied: {denied}/run/checkpoint.safetensors"),
    ("sample {denied}/locked/run " + S, "permission denied: {denied}/locked/run"),
    ("demo --out {denied}/empty", "permission denied: {denied}/empty/.difflab-demo"),
    # data
    ("train digits-tiny data.name=folder data.path={data}/one " + T, "leaves none to train on"),
    ("train digits-tiny data.name=folder data.path={data}/singles " + T, "a single example"),
    ("train digits-tiny data.name=folder data.path={data}/not-image " + T, "cannot read image"),
    ("train digits-tiny data.name=folder data.path={data}/empty " + T, "contains no images"),
    ("train digits-tiny data.name=folder data.path={data}/none " + T, "does not exist"),
    ("train moons data.name=array data.path={data}/float-labels.npz " + T,
     "labels must be integer class indices, got float64"),
    ("train moons data.name=array data.path={data}/string-labels.npz " + T,
     "labels must be integer class indices"),
    ("train moons data.name=array data.path={data}/huge-labels.npz " + T,
     "got values in 1000000000000..1000000000000"),
    ("train moons data.name=array data.path={data}/one-label.npz " + T,
     "labels must be one per example"),
    ("train moons data.name=array data.path={data}/complex.npy " + T, "holds complex values"),
    ("train moons data.name=array data.path={data}/nan.npy " + T, "must be finite"),
    ("train moons data.name=array data.path={data}/objects.npy " + T, "Object arrays cannot"),
    ("train moons data.name=array data.path={data}/fake.npy " + T, "is not a NumPy array file"),
    ("train text-tiny data.source={data}/binary.txt " + T, "is not UTF-8 text"),
    ("train text-tiny data.source={data}/empty " + T, "contains no .txt files"),
    ("train text-tiny data.source={data}/none.txt " + T, "does not exist"),
    # damaged checkpoints
    ("sample {bad}/json " + S, "its run config is not JSON"),
    ("sample {bad}/no-step " + S, "'step' is missing"),
    ("sample {bad}/step " + S, "corrupt header: invalid literal for int()"),
    ("sample {bad}/no-config " + S, "its run config is missing"),
    ("sample {bad}/foreign " + S, "is a safetensors file but not a difflab checkpoint"),
    ("sample {bad}/recipe " + S, "recipe must be one of"),
    ("sample {bad}/no-shape " + S, "is damaged (KeyError: 'shape')"),
    ("sample {bad}/null-config " + S, "is damaged (TypeError: its config is not a mapping)"),
    ("sample {bad}/no-ema " + S, "does not match the model its config describes"),
    ("sample {bad}/truncated " + S, "is not a readable checkpoint"),
    ("sample {bad}/garbage " + S, "is not a readable checkpoint"),
    ("sample {bad}/moons-classes " + S, "is damaged (KeyError: 'class_names')"),
    ("sample {bad}/t2d-thresholds " + S + " " + P, "is damaged (KeyError: 'thresholds')"),
    ("sample {bad}/text-json " + S, "its run config is not JSON"),
    ("sample {bad}/text-classes " + S, "is damaged (KeyError: 'class_names')"),
    ("sample {bad}/text-null-config " + S, "is damaged (TypeError: its config is not a mapping)"),
    ("eval {bad}/no-step", "'step' is missing"),
    ("train {bad}/no-rng --resume --quiet", "cannot be resumed: it lacks rng.generator"),
    ("train {bad}/rng --resume --quiet", "does not fit this model"),
    ("train {bad}/null-config --resume --quiet", "its config is not a mapping"),
    ("train {bad}/text-null-config --resume --quiet", "its config is not a mapping"),
    # too large for memory
    ("sample {text} --n 100000000 --out {scratch}/s", "will not fit in memory"),
    ("sample {moons} --n 2000000 --out {scratch}/s", "will not fit in memory"),
    ("sample {text} --n 10000 --length 100000 --out {scratch}/s",
     "(1,000,000,000 tokens) will not fit in memory"),
    ("eval {text} --t-samples 100000000", "--t-samples must be at most 256"),
    ("eval {image} --t-samples 100000000", "--t-samples must be below T = 20"),
    ("train digits-tiny train.batch_size=100000000000 " + T, "out of memory"),
    # nonsense and NaN options
    ("sample {cascade} --guidance nan " + S, "--guidance must be a finite number >= 0"),
    ("sample {text-to-digit} --guidance inf " + S + " " + P, "--guidance must be a finite"),
    ("sample {image} --classifier {classifier} --classifier-scale nan " + S,
     "--classifier-scale must be a finite number, got nan"),
    ("sample {cascade} --eta nan " + S, "--eta must be a finite number [0, 1]"),
    ("sample {image} --threshold dynamic --percentile 0 " + S, "--percentile must be a finite"),
    ("sample {cascade} --threshold dynamic --percentile 1.5 " + S, "--percentile must be a f"),
    ("sample {text-to-digit} --threshold dynamic --percentile nan " + S + " " + P,
     "--percentile must be a finite"),
    ("sample {image} --threshold magic " + S, "--threshold must be one of none, static"),
    ("sample {image} --threshold '' " + S, "--threshold must be one of none, static"),
    ("sample {image} --guidance 1 --convention magic " + S, "--convention must be one of w"),
    ("sample {cascade} --guidance 1 --convention magic " + S, "--convention must be one of w"),
    ("sample {text-to-digit} --guidance 1 --convention magic " + S + " " + P,
     "--convention must be one of w"),
    ("sample {image} --opt eta=nan " + S, "--opt eta must be a finite number"),
    ("sample {image} --opt eta=abc " + S, "--opt eta has an impossible value 'abc'"),
    ("sample {image} --opt eta=0.5 --eta 0.3 " + S, "--eta and --opt eta were both given"),
    ("sample {moons} --sampler euler --opt s_churn=abc " + S, "--opt s_churn has an imposs"),
    ("sample {image} --sampler magic " + S, "--sampler must be one of"),
    ("sample {text} --sampler magic " + S, "--sampler must be one of"),
    ("sample {cascade} --grid magic " + S, "--grid must be one of"),
    ("sample {image} --steps 0 " + S, "--steps must be a whole number >= 1"),
    ("sample {text} --steps 0 " + S, "--steps must be a whole number >= 1"),
    ("sample {image} --steps 100000000 " + S, "cannot take 100000000 sampling steps"),
    ("sample {image} --class 10 " + S, "unknown class '10'"),
    ("sample {cascade} --class , " + S, "unknown class ''"),
    ("sample {moons} --class 1 " + S, "this model is not class-conditional"),
    ("sample {moons} --guidance 1 " + S, "--guidance needs a class-conditional model"),
    ("sample {moons} --classifier {classifier} " + S, "knows other classes than this model"),
    ("sample {image} --classifier {scratch}/none " + S, "no checkpoint at {scratch}/none"),
    ("sample {image} --guidance 1e308 --threshold none " + S, "sampling diverged"),
    ("sample {cascade} --guidance 1e308 --threshold none " + S, "sampling diverged"),
    ("sample {image} --seed -1 " + S, "--seed must be a whole number in 0..2**63-1"),
    ("sample {cascade} --seed 100000000000000000000000 " + S, "--seed must be a whole number"),
    ("sample {text-to-digit} --seed -1 " + S + " " + P, "--seed must be a whole number"),
    ("sample {cascade} --aug-level nan " + S, "--aug-level must be a finite number [0, 1]"),
    ("sample {text-to-digit} " + S, "a text-to-digit model needs --prompt"),
    ("sample {text-to-digit} --prompt 'a purple three' " + S, "unknown words ['purple']"),
    ("sample {text-to-digit} --prompt 'a thin thick three' " + S, "contradictory attributes"),
    ("sample {text-to-digit} --prompt 'three four' " + S, "must name exactly one digit"),
    ("sample {text-to-digit} --prompt '!!!' " + S, "must name exactly one digit"),
    ("sample {text-to-digit} --prompt 'a a a a a a a three' " + S, "has 8 words; at most 6"),
    ("sample {text} --temperature nan " + S, "--temperature must be a finite number >= 0"),
    ("sample {text} --temperature -1 " + S, "--temperature must be a finite number >= 0"),
    ("sample {text} --top-p 0 " + S, "--top-p must be in (0, 1]"),
    ("sample {text} --top-p 2 " + S, "--top-p must be in (0, 1]"),
    ("sample {text} --length 0 " + S, "--length must be a whole number >= 1"),
    ("sample {text} --prompt 'snow ☃' " + S, "outside this model's vocabulary: '☃'"),
    ("sample {text} --prompt 'a long prompt' --length 4 " + S, "the length (4) must exceed it"),
    ("sample {text} --seed -1 " + S, "--seed must be a whole number in 0..2**63-1"),
    ("sample {text} --seed 100000000000000000000000 " + S, "--seed must be a whole number in 0"),
    ("sample {text} --class 1 " + S, "this model is not class-conditional"),
    ("sample {text} --guidance 1 " + S, "--guidance applies to labelled runs"),
    # eval
    ("eval {image} --method magic", "--method must be one of vlb, ode"),
    ("eval {image} --n 0", "--n must be a whole number >= 1"),
    ("eval {image} --t-samples 0", "--t-samples must be a whole number >= 1"),
    ("eval {image} --method ode --ode-steps 0", "--ode-steps must be a whole number >= 1"),
    ("eval {image} --method ode --probes 0", "--probes must be a whole number >= 1"),
    ("eval {image} --method ode --t-samples 3", "--t-samples applies to --method vlb only"),
    ("eval {image} --probes 2", "--ode-steps and --probes apply to --method ode only"),
    ("eval {image} --seed -1", "--seed must be a whole number in 0..2**63-1"),
    ("eval {moons}", "this run's data are vectors"),
    ("eval {bad}/no-held-out", "this run has no held-out data (data.held_out=0)"),
    ("eval {bad}/edm", "the variational bound needs a discrete-time schedule"),
    ("eval {cascade} --n 3", "a cascade has no likelihood evaluation yet"),
    ("eval {text-to-digit}", "a text-to-digit run has no likelihood evaluation yet"),
    ("eval {classifier} --method ode", "--method does not apply to classifier runs"),
    ("eval {classifier} --n 0", "--n must be a whole number >= 1"),
    ("eval {text} --t-samples 0", "--t-samples must be a whole number >= 1"),
    ("eval {text} --ode-steps 3", "--ode-steps does not apply to text runs"),
    ("eval {text} --seed 100000000000000000000000", "--seed must be a whole number in 0..2**63"),
    # options a recipe does not take
    *NOT_TAKEN,
]  # fmt: skip


@pytest.mark.parametrize(("command", "reason"), ROWS)
def test_bad_input_is_one_line_exit_2_and_changes_nothing(
    command, reason, world, monkeypatch, capsys
):
    args = shlex.split(command.format(**world))
    root, run = Path(world["root"]), Path(world["scratch"]) / "run"
    shutil.rmtree(run, ignore_errors=True)  # what an earlier train row may have begun
    monkeypatch.chdir(world["scratch"])  # a row that wrote relative paths would show here
    before = _snapshot(root)
    capsys.readouterr()
    with _as_a_user("{denied}" in command), pytest.raises(SystemExit) as info:
        main(args)
    out, err = capsys.readouterr()
    assert info.value.code == 2, (out, err)
    assert err.startswith("difflab: error: ") and err.count("\n") == 1, err
    assert reason.format(**world) in err, err
    after = _snapshot(root)
    changed = sorted(p for p in before.keys() | after.keys() if before.get(p) != after.get(p))
    # Only the run folder a train row asked for may have been begun.
    assert all(Path(p) == run or run in Path(p).parents for p in changed), changed
