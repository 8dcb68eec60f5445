"""The command line end to end on a seconds-long run, and its answers to bad input."""

import csv

import numpy as np
import pytest
from cli_run import run

from difflab.train.checkpoint import load_checkpoint, save_checkpoint


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny run shared by the tests below (trained in-process, ~seconds)."""
    import difflab

    out = tmp_path_factory.mktemp("run") / "tiny"
    difflab.train("digits-tiny", out=str(out), progress=False)
    return out


def test_train_sample_eval_end_to_end(trained, tmp_path, monkeypatch, capsys):
    with open(trained / "loss.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [5, 10, 15, 20]
    stem = tmp_path / "s"
    code, _, err = run(monkeypatch, capsys, "sample", str(trained), "--n", "12", "--steps", "5",
                         "--class", "3,7", "--out", str(stem))  # fmt: skip
    assert code == 0, err
    z = np.load(stem.with_suffix(".npz"))
    assert z["samples"].shape == (12, 1, 8, 8)
    assert z["samples"].min() >= 0 and z["samples"].max() <= 1
    assert z["labels"].tolist() == [3, 7] * 6
    assert stem.with_suffix(".png").stat().st_size > 0
    code, out, err = run(monkeypatch, capsys, "eval", str(trained), "--n", "8", "--t-samples", "4")
    assert code == 0, err
    bpd = float(out.split("bits/dim ")[1].split()[0])
    assert 0 < bpd < 20


def test_sampler_list_and_help(monkeypatch, capsys):
    code, out, _ = run(monkeypatch, capsys, "sample", "--list")
    assert code == 0 and "ddpm" in out and "ddim" in out
    for command in ("train", "sample", "eval", "demo"):
        code, out, _ = run(monkeypatch, capsys, command, "--help")
        assert code == 0 and "Usage" in out


def test_cli_resume_continues_and_may_extend_steps(tmp_path, monkeypatch, capsys):
    out = tmp_path / "r"
    args = ["train", "digits-tiny", f"train.out={out}", "train.steps=10", "--quiet"]
    assert run(monkeypatch, capsys, *args)[0] == 0
    code, _, err = run(monkeypatch, capsys, *args)
    assert code == 2 and "already holds a run" in err
    code, _, err = run(monkeypatch, capsys, *args[:-2], "train.steps=15", "--resume", "--quiet")
    assert code == 0, err
    assert load_checkpoint(out).step == 15
    code, _, err = run(
        monkeypatch, capsys, *args[:-2], "model.unet.channels=8", "--resume", "--quiet"
    )
    assert code == 2 and "different config" in err and "model.unet.channels" in err
    # the run folder itself is a config: every setting comes back, the folder may move
    moved = tmp_path / "moved"
    out.rename(moved)
    code, _, err = run(monkeypatch, capsys, "train", str(moved), "train.steps=20", "--resume",
                       "--quiet")  # fmt: skip
    assert code == 0, err
    assert load_checkpoint(moved).step == 20
    code, _, err = run(monkeypatch, capsys, "train", str(moved / "config.json"), "--quiet")
    assert code == 2 and "already holds a run" in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["sample", "/no/such/run"], "no checkpoint at /no/such/run"),
        (["sample", "{run}", "--eta", "1.5"], "--eta must be a finite number [0, 1]"),
        (["sample", "{run}", "--steps", "-3"], "--steps must be a whole number >= 1"),
        (["sample", "{run}", "--sampler", "magic"], "--sampler must be one of"),
        (["sample", "{run}", "--class", "11"], "unknown class '11'"),
        (["train", "digits-tiny", "train.stepz=3"], "unknown config key train.stepz"),
        (["train", "digits-tiny", "sample.eta=-1"], r"sample.eta must be in [0, 1]"),
        (["train", "digits-tiny", "data.name=folder", "data.path=/no/dir"], "does not exist"),
        (["eval", "/no/such/run"], "no checkpoint at"),
    ],
)
def test_bad_input_gets_one_line_and_exit_2(trained, monkeypatch, capsys, args, message):
    before = (trained / "checkpoint.safetensors").read_bytes()
    code, _, err = run(monkeypatch, capsys, *[a.format(run=trained) for a in args])
    assert code == 2
    assert err.startswith("difflab: error: ") and message in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert (trained / "checkpoint.safetensors").read_bytes() == before  # nothing lost


def test_checkpoint_that_does_not_fit_its_config(trained, tmp_path, monkeypatch, capsys):
    ck = load_checkpoint(trained)
    cfg = dict(ck.config)
    model = cfg["config"]["model"]
    cfg["config"] = {**cfg["config"], "model": {**model, "unet": {**model["unet"], "channels": 24}}}
    save_checkpoint(tmp_path / "checkpoint.safetensors", config=cfg, step=ck.step,
                    model=ck.model, ema=ck.ema, optimizer=None, rng={})  # fmt: skip
    code, _, err = run(monkeypatch, capsys, "sample", str(tmp_path), "--n", "2")
    assert code == 2 and "does not match the model its config describes" in err


def test_edm_run_with_heun_and_ode_likelihood(tmp_path, monkeypatch, capsys):
    out = tmp_path / "edm"
    args = ["train", "digits-tiny", f"train.out={out}", "diffusion.prediction=edm",
            "diffusion.schedule=edm", "diffusion.T=null", "--quiet"]  # fmt: skip
    assert run(monkeypatch, capsys, *args)[0] == 0
    code, _, err = run(monkeypatch, capsys, "sample", str(out), "--sampler", "heun", "--steps",
                       "4", "--n", "6", "--out", str(tmp_path / "s"))  # fmt: skip
    assert code == 0, err
    assert np.load(tmp_path / "s.npz")["samples"].shape == (6, 1, 8, 8)
    code, out_text, err = run(monkeypatch, capsys, "eval", str(out), "--method", "ode", "--n",
                              "4", "--ode-steps", "4")  # fmt: skip
    assert code == 0, err
    assert 0 < float(out_text.split("bits/dim ")[1].split()[0]) < 20
    code, _, err = run(monkeypatch, capsys, "eval", str(out), "--n", "4")
    assert code == 2 and "use --method ode" in err


def test_demo_text_dispatches_to_the_text_recipe(monkeypatch, capsys, tmp_path):
    """The text demo itself is exercised (on a tiny preset) in test_text_recipe.py; here: the
    command reaches it with its folder and prints its report."""
    from difflab.recipes import text

    seen = {}

    def fake_demo(out, *, quiet=False):
        seen.update(out=out, quiet=quiet)
        return "REPORT"

    monkeypatch.setattr(text.RECIPE, "demo", fake_demo)
    code, out, _ = run(monkeypatch, capsys, "demo", "--text", "--quiet", "--out", str(tmp_path))
    assert code == 0 and out.strip() == "REPORT"
    assert seen == {"out": tmp_path, "quiet": True}
    code, _, err = run(monkeypatch, capsys, "demo", "--text", "--steps", "3")
    assert code == 2 and "--steps does not apply to the text demo" in err


def test_demo_never_deletes_what_it_did_not_write(monkeypatch, capsys, tmp_path):
    """A folder holding someone's run and files is left alone (the demo takes a new name); a
    folder an earlier demo made has only the demo's own files replaced."""
    from difflab.recipes import image

    calls = []

    def fake_demo(out, *, quiet=False, steps=None):
        calls.append(out)
        (out / "checkpoint.safetensors").write_text("demo")
        return "REPORT"

    monkeypatch.setattr(image.RECIPE, "demo", fake_demo)
    mine = tmp_path / "runs"
    mine.mkdir()
    (mine / "checkpoint.safetensors").write_text("precious")
    (mine / "notes.txt").write_text("mine")
    code, out, err = run(monkeypatch, capsys, "demo", "--out", str(mine))
    assert code == 0, err
    assert calls == [tmp_path / "runs-2"] and "runs-2" in out
    assert (mine / "checkpoint.safetensors").read_text() == "precious"
    assert (mine / "notes.txt").read_text() == "mine"
    (calls[0] / "notes.txt").write_text("added later")
    code, _, err = run(monkeypatch, capsys, "demo", "--out", str(calls[0]))
    assert code == 0, err
    assert calls[1] == calls[0] and (calls[0] / "notes.txt").read_text() == "added later"


@pytest.mark.parametrize("recipe", ["cascade", "text-to-digit", "classifier"])
def test_recipes_train_and_sample_from_the_command_line(recipe, trained, tmp_path, monkeypatch,
                                                         capsys):  # fmt: skip
    out = tmp_path / recipe
    code, _, err = run(monkeypatch, capsys, "train", "digits-tiny", f"train.out={out}",
                       "train.steps=4", "--recipe", recipe, "--quiet")  # fmt: skip
    assert code == 0, err
    stem = tmp_path / "s"
    args = ["sample", str(out), "--n", "4", "--steps", "3", "--out", str(stem)]
    if recipe == "text-to-digit":
        args += ["--prompt", "a thin three; a thick seven", "--guidance", "1"]
    if recipe == "classifier":  # guide the shared tiny diffusion model with this classifier
        args = ["sample", str(trained), "--n", "4", "--steps", "3", "--class", "3",
                "--classifier", str(out), "--classifier-scale", "2",
                "--out", str(stem)]  # fmt: skip
    code, _, err = run(monkeypatch, capsys, *args)
    assert code == 0, err
    samples = np.load(stem.with_suffix(".npz"))["samples"]
    assert samples.shape == (4, 1, 8, 8) and np.isfinite(samples).all()
    if recipe == "cascade":
        assert (tmp_path / "s_low.png").exists()
    if recipe == "text-to-digit":
        code, _, err = run(monkeypatch, capsys, "sample", str(out), "--n", "2")
        assert code == 2 and "needs --prompt" in err
        code, _, err = run(monkeypatch, capsys, "sample", str(out), "--class", "3",
                           "--prompt", "a three")  # fmt: skip
        assert code == 2 and "--class does not apply to text-to-digit runs" in err


def test_the_digits_demo_runs_twice_in_its_own_folder(tmp_path, monkeypatch, capsys):
    """A second demo into the folder the first one made replaces the demo's files (and keeps
    the user's) instead of refusing the run it finds there."""
    out = tmp_path / "demo"
    for _ in range(2):
        code, report, err = run(monkeypatch, capsys, "demo", "--out", str(out), "--steps", "2",
                                "--quiet")  # fmt: skip
        assert code == 0, err
        assert "ran in" not in report and (out / "samples.png").stat().st_size > 0
        (out / "mine.txt").write_text("kept")
    assert (out / "mine.txt").read_text() == "kept"
    assert load_checkpoint(out).step == 2
