"""Adaptation of an autoregressive model into a masked diffusion LM (:mod:`difflab.recipes.adapt`,
:mod:`difflab.nets.adapted`): at anneal step 0 the shifted network computes the AR model's
logits; the mask opens future edges at the scheduled rate and is bidirectional at the end; the
command end to end, and its refusals."""

from __future__ import annotations

import pytest
import torch
from cli_run import run as cli

import difflab
from difflab.data.text import BOS_ID, load_corpus
from difflab.nets.adapted import ShiftedTransformer, annealed_mask
from difflab.nets.transformer import TextTransformer

VOCAB, LENGTH = 13, 16


def ar_and_adapted(anneal_steps: int = 10) -> tuple[TextTransformer, ShiftedTransformer]:
    ar = TextTransformer(VOCAB, LENGTH + 1, width=32, depth=2, causal=True)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in ar.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    adapted = ShiftedTransformer(VOCAB, LENGTH, bos_id=BOS_ID, anneal_steps=anneal_steps,
                                 width=32, depth=2)  # fmt: skip
    missing, unexpected = adapted.load_state_dict(ar.state_dict(), strict=False)
    assert missing == ["anneal_step"] and not unexpected
    return ar.eval(), adapted.train()


def test_at_anneal_step_zero_the_adapted_network_is_the_ar_model():
    ar, adapted = ar_and_adapted()
    x = torch.randint(5, VOCAB, (4, LENGTH), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        mine = adapted(x, generator=torch.Generator().manual_seed(2))
        theirs = ar(torch.cat([torch.full_like(x[:, :1], BOS_ID), x], 1))[:, :-1]
    torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-5)
    assert int(adapted.anneal_step) == 1  # one training call: one step of the schedule
    with torch.no_grad():  # after it the mask opens future edges: the logits differ
        assert not torch.allclose(adapted.eval()(x), theirs, atol=1e-3)


def test_the_mask_anneals_from_causal_to_bidirectional():
    _, adapted = ar_and_adapted(anneal_steps=8)
    size, gen = 64, torch.Generator().manual_seed(0)
    causal = torch.ones(size, size, dtype=torch.bool).tril()
    future = ~causal
    for step in (0, 2, 4, 6, 8, 20):
        adapted.anneal_step.fill_(step)
        mask = adapted.attention_mask(size, gen)
        assert bool(mask[causal].all())  # every causal edge, always
        rate, expected = float(mask[future].double().mean()), min(1.0, step / 8)
        sd = (expected * (1 - expected) / int(future.sum())) ** 0.5
        assert abs(rate - expected) <= 5 * sd + 1e-12, (step, rate)
        assert int(adapted.anneal_step) == step + 1
    assert bool(mask.all())  # fully bidirectional at the end of annealing
    assert bool(adapted.eval().attention_mask(size).all())  # and whenever it is not training
    assert torch.equal(annealed_mask(5, 0.0), torch.ones(5, 5, dtype=torch.bool).tril())


# ---------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapt")
    (root / "text.txt").write_text(load_corpus()[100_000:130_000], encoding="utf-8")
    found = {}
    for kind in ("ar", "mdlm"):
        found[kind] = root / kind
        overrides = [f"data.source={root / 'text.txt'}", f"diffusion.kind={kind}", "train.steps=2"]
        difflab.train("text-tiny", overrides, out=str(found[kind]), progress=False)
    return found


def test_adapt_writes_an_ordinary_mdlm_run(runs, tmp_path, monkeypatch, capsys):
    out = tmp_path / "adapted"
    code, text, err = cli(monkeypatch, capsys, "adapt", str(runs["ar"]), "--out", str(out),
                          "--quiet", "train.steps=3", "adapt.anneal_steps=2")  # fmt: skip
    assert code == 0, err
    assert "adapted in 3 steps" in text
    run = difflab.load(out)
    assert run.recipe.name == "adapt" and run.model.kind == "mdlm"
    assert int(run.model.net.anneal_step) == 3 and not run.model.net.training
    assert run.config.adapt.source == str(runs["ar"])
    assert len(run.sample(2, prompt="To be", length=40, steps=4, sampler="confidence").texts) == 2
    assert run.evaluate(n=4).metrics["bound"]
    code, _, err = cli(monkeypatch, capsys, "sample", str(runs["ar"]), "--draft", str(out), "--n",
                       "2", "--out", str(tmp_path / "s"))  # fmt: skip
    assert code == 0, err
    code, _, err = cli(monkeypatch, capsys, "train", str(out), "--resume", "--quiet",
                       "train.steps=4")  # fmt: skip
    assert code == 0, err
    assert int(difflab.load(out).model.net.anneal_step) == 4


REFUSALS = [
    (["{ar}"], "give the folder of the adapted run with --out"),
    (["{mdlm}", "--out", "{out}"], "adaptation starts from an ar run"),
    (["{out}/none", "--out", "{out}"], "no run in"),
    (["{ar}", "--out", "{out}", "model.width=64"], "model.width is 32 in the ar run"),
    (["{ar}", "--out", "{out}", "data.length=16"], "data.length is 32 in the ar run"),
    (["{ar}", "--out", "{out}", "adapt.anneal_steps=-1"], "adapt.anneal_steps must be non-neg"),
    (["{ar}", "--out", "{out}", "diffusion.kind=udlm"], "the adapt recipe trains diffusion.kind"),
    (["{ar}", "--out", "{out}", "train.accumulate=2", "train.batch_size=8"],
     "train.accumulate must be 1"),
]  # fmt: skip


@pytest.mark.parametrize(("args", "message"), REFUSALS)
def test_refusals(runs, tmp_path, monkeypatch, capsys, args, message):
    words = [w.format(ar=runs["ar"], mdlm=runs["mdlm"], out=tmp_path / "new") for w in args]
    code, _, err = cli(monkeypatch, capsys, "adapt", *words, "--quiet")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and message in lines[0], err
    assert not (tmp_path / "new" / "checkpoint.safetensors").exists()
