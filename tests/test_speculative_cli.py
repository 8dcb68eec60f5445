"""``difflab sample RUN_AR --draft RUN_DLM``: end to end on seconds-long runs, greedy text equal
to the ar run's own, and every refusal in one line with nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest
from cli_run import run

import difflab
from difflab.data.text import load_corpus


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Tiny ``ar``, ``mdlm`` and ``udlm`` runs on one text, and an ``mdlm`` on another (whose
    characters differ)."""
    root = tmp_path_factory.mktemp("speculative")
    corpus = load_corpus()
    texts = {"same": corpus[100_000:130_000], "other": "abc def\n" * 2000}
    found = {}
    for name, text in texts.items():
        (root / f"{name}.txt").write_text(text, encoding="utf-8")
    for name, kind, text in [("ar", "ar", "same"), ("mdlm", "mdlm", "same"),
                             ("udlm", "udlm", "same"), ("other", "mdlm", "other")]:  # fmt: skip
        found[name] = root / name
        overrides = [f"data.source={root / text}.txt", f"diffusion.kind={kind}", "train.steps=2"]
        difflab.train("text-tiny", overrides, out=str(found[name]), progress=False)
    found["moons"] = root / "moons"  # a run of another recipe
    difflab.train("moons", ["train.steps=2", "train.batch_size=8", "model.mlp.hidden=8"],
                  out=str(found["moons"]), progress=False)  # fmt: skip
    return found


def test_greedy_speculative_text_is_the_ar_runs(runs, tmp_path, monkeypatch, capsys):
    ar, mdlm = str(runs["ar"]), str(runs["mdlm"])
    common = ["--n", "3", "--temperature", "0", "--length", "70", "--prompt", "To be"]
    code, _, err = run(monkeypatch, capsys, "sample", ar, *common, "--out", str(tmp_path / "a"))
    assert code == 0, err
    for steps in ("1", "5"):
        out = tmp_path / f"s{steps}"
        draft = ["--draft", mdlm, "--draft-length", "5", "--draft-steps", steps]
        code, _, err = run(monkeypatch, capsys, "sample", ar, *common, *draft, "--out", str(out))
        assert code == 0, err
        assert out.with_suffix(".txt").read_text() == (tmp_path / "a.txt").read_text()


def test_sampled_passages(runs, tmp_path, monkeypatch, capsys):
    stem = tmp_path / "s"
    code, out, err = run(monkeypatch, capsys, "sample", str(runs["ar"]), "--draft",
                         str(runs["mdlm"]), "--n", "2", "--out", str(stem))  # fmt: skip
    assert code == 0, err
    assert out.count("---\n") == 2 and stem.with_suffix(".txt").is_file()


REFUSALS = [
    ("{ar} --draft-length 3", "--draft-length applies to speculative decoding, with --draft"),
    ("{ar} --draft-steps 1", "--draft-steps applies to speculative decoding, with --draft"),
    ("{mdlm} --draft {mdlm}", "--draft applies to ar runs"),
    ("{ar} --draft {ar}", "the drafter must be a masked diffusion run"),
    ("{ar} --draft {udlm}", "the drafter must be a masked diffusion run"),
    ("{ar} --draft {other}", "different tokenizers"),
    ("{ar} --draft {mdlm} --draft-length 4 --draft-steps 2", "--draft-steps must be 1 (one"),
    ("{ar} --draft {mdlm} --draft-length 32", "must be less than the drafter's context (32"),
    ("{ar} --draft {mdlm} --draft-length 0", "--draft-length must be a whole number >= 1"),
    ("{ar} --draft {mdlm} --draft-steps 0", "--draft-steps must be a whole number >= 1"),
    ("{ar} --draft {mdlm} --steps 3", "--steps does not apply to ar models"),
    ("{ar} --draft {mdlm} --class 1", "--draft works with unlabelled runs only"),
    ("{ar} --draft {ar}/nowhere", "no checkpoint at"),
    ("{ar} --draft {moons}", "--draft needs a masked diffusion text run; "),
    ("{moons} --draft {mdlm}", "--draft does not apply to image runs"),
    ("{moons} --draft-length 2", "--draft-length does not apply to image runs"),
]


@pytest.mark.parametrize(("args", "message"), REFUSALS)
def test_refusals(runs, tmp_path, monkeypatch, capsys, args, message):
    stem = tmp_path / "s"
    words = args.format(**{k: str(v) for k, v in runs.items()}).split()
    code, _, err = run(monkeypatch, capsys, "sample", *words, "--out", str(stem))
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("difflab: error: ") and message in lines[0], err
    assert not stem.with_suffix(".txt").exists()
