"""Judged image quality (evaluate/judged.py): real images the reference has never seen score an
FD near the floor and the judge's own accuracy; uniform noise scores an FD far above it and
chance accuracy; shuffled labels drop the accuracy to chance. The glyphs variant needs the full
glyphs judge (trained on first use, about two minutes on 2 cores), so it is marked slow."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from difflab.data.glyphs import generate
from difflab.evaluate.glyphs_judge import glyphs_to_tensor
from difflab.evaluate.judged import judged_quality, real_images


def test_digits_real_images_score_near_the_floor_and_noise_far_above():
    # 360 training digits (another subset than the floor's) against the 360 held-out ones.
    x, labels = real_images("digits", "train", 360, seed=1)
    real = judged_quality(x, "digits", labels)
    assert real["n"] == real["floor_n"] == real["reference_n"] == 360
    # The plug-in FD of 360 samples in 64 dimensions varies a lot between subsets (measured:
    # 2.6 for this one, floor 6.4), so only the order of magnitude is asserted for real data.
    assert real["fd_ratio"] < 2.0
    assert real["accuracy"] > 0.95 and real["accuracy_real"] > 0.95
    noise = judged_quality(torch.rand_like(x) * 2 - 1, "digits", labels)
    assert noise["fd_floor"] == real["fd_floor"]  # the floor depends on n and the seed only
    assert noise["fd_ratio"] > 20  # measured 52
    assert noise["accuracy"] < 0.25  # chance 0.1 (all noise is read as one or two digits)
    shuffled = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))]
    assert judged_quality(x, "digits", shuffled)["accuracy"] < 0.25


def test_the_reference_itself_has_distance_zero_and_bad_input_is_refused():
    x, labels = real_images("digits", "held-out")
    same = judged_quality(x, "digits", labels)
    assert same["fd"] == pytest.approx(0.0, abs=1e-6)
    assert same["accuracy"] == same["accuracy_real"]
    with pytest.raises(ValueError, match=r"shape \(N, 1, 8, 8\)"):
        judged_quality(torch.zeros(4, 3, 8, 8), "digits")
    with pytest.raises(ValueError, match="one per image"):
        judged_quality(x[:4], "digits", labels[:3])
    with pytest.raises(ValueError, match="no judge for data 'moons'"):
        judged_quality(x, "moons")
    with pytest.raises(ValueError, match=r"reference_n must be in 2\.\.360"):
        judged_quality(x, "digits", reference_n=1000)


@pytest.mark.slow
def test_glyphs_fresh_renders_score_near_the_floor_and_noise_far_above():
    fresh = generate("test", 1000, seed=5)  # not the reference's seed: glyphs it never saw
    x = glyphs_to_tensor(fresh.images)
    labels = torch.from_numpy(fresh.labels.astype(np.int64))
    real = judged_quality(x, "glyphs", labels)
    assert real["reference_n"] == 10_000 and real["floor_n"] == 1000
    assert 0.8 < real["fd_ratio"] < 1.25  # measured 0.94
    assert abs(real["accuracy"] - real["accuracy_real"]) < 0.03  # measured 0.957 vs 0.967
    noise = judged_quality(torch.rand_like(x) * 2 - 1, "glyphs", labels)
    assert noise["fd_ratio"] > 20 and noise["accuracy"] < 0.1  # measured 111 and 0.02
