"""The glyphs judge: network contract, augmentation, cache round trip, and a brief training run
that must already read the colours far above chance (the full judge is never trained here)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import difflab.evaluate.glyphs_judge as gj
from difflab.data.glyphs import COLOUR_PAIRS, FAMILIES, LATIN, PALETTE, generate
from difflab.nets.judge import GLYPHS_FEATURE_DIM, GLYPHS_HEADS, GlyphsJudge

# The brief run: 2048 training glyphs, 10 epochs of batches of 128 (160 steps, ~7 s on 2 cores).
BRIEF_EPOCHS = 10
# It must close at least half the gap from chance to perfect on both colour heads. Measured on
# 1000 test glyphs: colour 0.903, background 1.000 (chance 0.184 for each).
BAR = 0.5


@pytest.fixture(scope="module")
def test_glyphs():
    return generate("test", 1000, seed=0)


def test_judge_shapes_and_input_check(test_glyphs):
    judge = GlyphsJudge().eval()
    x = gj.glyphs_to_tensor(test_glyphs.images[:16])
    assert x.shape == (16, 3, 32, 32) and x.min() >= -1 and x.max() <= 1
    features = judge.features(x)
    assert features.shape == (16, GLYPHS_FEATURE_DIM) and torch.isfinite(features).all()
    predicted = judge.predict(x)
    sizes = {"character": len(LATIN), "family": len(FAMILIES), "colour": len(PALETTE)}
    sizes["background"] = len(PALETTE)
    assert tuple(predicted) == GLYPHS_HEADS
    for name, classes in sizes.items():
        assert predicted[name].shape == (16,) and predicted[name].dtype == torch.int64
        assert judge(x)[name].shape == (16, classes)
        assert int(predicted[name].min()) >= 0 and int(predicted[name].max()) < classes
    assert not features.requires_grad and torch.is_inference(features)
    assert torch.equal(judge.predict(x.double())["character"], predicted["character"])
    with pytest.raises(ValueError, match=r"\(N, 3, 32, 32\)"):
        judge.predict(x[:, :1])


def test_random_shift_is_a_bordered_translation():
    x = torch.randn(300, 3, 32, 32)
    shifted = gj._random_shift(x, torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(x, (gj.MAX_SHIFT,) * 4, mode="replicate")
    side = 2 * gj.MAX_SHIFT + 1
    crops = [padded[:, :, i : i + 32, j : j + 32] for i in range(side) for j in range(side)]
    matches = torch.stack([(shifted == c).flatten(1).all(1) for c in crops], dim=1)
    assert torch.all(matches.sum(1) == 1)  # each image is exactly one of the 25 translations
    assert torch.all(matches.sum(0) > 0)  # and every translation occurs (12 expected each)


def test_cache_round_trip_and_unreadable_file(tmp_path, monkeypatch, test_glyphs):
    small = generate("train", 256, seed=0)
    monkeypatch.setattr(gj, "glyphs_dataset", lambda split, seed, cache_dir: small)
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    trained = gj.load_glyphs_judge(tmp_path)  # 256 glyphs, EPOCHS epochs: a few steps
    assert torch.equal(torch.rand(3), expected_next)  # the caller's random state is untouched
    path = gj.cache_path(tmp_path)
    assert path.name == f"glyphs_judge_v{gj.CACHE_VERSION}_seed0.safetensors" and path.exists()
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file is left

    def untrained(*args, **kwargs):
        raise AssertionError("the cached judge must be loaded, not retrained")

    monkeypatch.setattr(gj, "train_glyphs_judge", untrained)
    reloaded = gj.load_glyphs_judge(tmp_path)
    x = gj.glyphs_to_tensor(test_glyphs.images[:64])
    assert torch.equal(reloaded.features(x), trained.features(x))
    for name in GLYPHS_HEADS:
        assert torch.equal(reloaded(x)[name], trained(x)[name])
    monkeypatch.undo()

    monkeypatch.setattr(gj, "glyphs_dataset", lambda split, seed, cache_dir: small)
    path.write_bytes(b"not safetensors")
    with pytest.warns(UserWarning, match="retraining the glyphs judge"):
        retrained = gj.load_glyphs_judge(tmp_path)
    assert torch.equal(retrained.features(x), trained.features(x))  # seeded: the same weights


def test_brief_training_reads_colours_far_above_chance(test_glyphs):
    judge = gj.train_glyphs_judge(generate("train", 2048, seed=0), seed=0, epochs=BRIEF_EPOCHS)
    accuracy = gj.judge_accuracies(judge, test_glyphs)
    # Chance: the best constant guess, the most frequent colour of the uniform pair draw.
    for name, column in (("colour", 0), ("background", 1)):
        chance = np.bincount(COLOUR_PAIRS[:, column]).max() / len(COLOUR_PAIRS)
        assert accuracy[name] >= chance + BAR * (1 - chance), (name, accuracy, chance)
