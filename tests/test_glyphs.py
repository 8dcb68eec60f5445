"""The glyphs data set: deterministic renders, held-out concepts, captions, colours, the cache."""

from __future__ import annotations

import numpy as np
import pytest

from difflab.data import glyphs as G
from difflab.data.images import load_dataset
from difflab.errors import UserError

N = 200


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """A private, empty glyphs cache for every test."""
    monkeypatch.setenv("DIFFLAB_CACHE", str(tmp_path))
    return tmp_path


@pytest.fixture(scope="module")
def train():
    return G.generate("train", N, seed=0)


@pytest.fixture(scope="module")
def concepts():
    return G.generate("concepts", N, seed=0)


def test_rendering_is_deterministic_per_seed(train):
    again = G.generate("train", N, seed=0)
    np.testing.assert_array_equal(again.images, train.images)
    np.testing.assert_array_equal(again.labels, train.labels)
    other = G.generate("train", N, seed=1)
    assert (other.images != train.images).any(axis=(1, 2, 3)).mean() > 0.9
    test = G.generate("test", N, seed=0)
    assert (test.images != train.images).any(axis=(1, 2, 3)).mean() > 0.9


def test_held_out_concepts_only_in_the_concepts_split(train, concepts):
    greek = train.labels >= len(G.LATIN)
    assert not greek.any()
    assert not (train.attributes["family"] == G.HELD_OUT_FAMILY).any()
    assert set(np.unique(train.attributes["family"])) == set(range(G.HELD_OUT_FAMILY))
    c_greek = concepts.labels >= len(G.LATIN)
    typewriter = concepts.attributes["family"] == G.HELD_OUT_FAMILY
    assert c_greek.any() and typewriter.any()
    # Every concepts glyph is a Greek letter or typewriter, never both (CM has no Greek).
    np.testing.assert_array_equal(c_greek, ~typewriter)
    assert set(np.unique(concepts.attributes["family"][c_greek])) <= set(G.GREEK_FAMILIES)


def test_captions_match_attributes(train, concepts):
    for glyphs in (train, concepts):
        for i, text in enumerate(glyphs.captions()[:50]):
            a = glyphs.attribute_row(i)
            char = G.CHARACTERS[glyphs.labels[i]]
            assert f" {G.FAMILIES[a['family']]} " in text
            assert f" {char} on " in text
            assert text.endswith(f" {G.COLOUR_NAMES[a['background']]} background")
            size_and_colour = f"{G.SIZES[a['size']][0]} {G.COLOUR_NAMES[a['colour']]} "
            assert text.split(" ", 1)[1].startswith(size_and_colour)
            assert (" bold " in text) == bool(a["weight"])
            assert (" italic " in text) == bool(a["slant"])
    red_g = {"family": 2, "weight": 1, "slant": 0, "colour": 2, "background": 8, "size": 2}
    assert G.caption(G.CHARACTERS.index("G"), red_g) == (
        "a large red bold serif capital G on a pale blue background"
    )
    orange_alpha = {**red_g, "weight": 0, "slant": 1, "colour": 6, "background": 0, "size": 0}
    assert G.caption(G.CHARACTERS.index("α"), orange_alpha) == (
        "a small orange italic serif Greek letter α on a black background"
    )


def test_pixels_show_the_attributed_colours(train):
    images = train.images
    assert images.dtype == np.uint8 and images.shape == (N, 32, 32, 3)
    fg = G.COLOURS[train.attributes["colour"]].astype(float)
    bg = G.COLOURS[train.attributes["background"]].astype(float)
    assert (G.contrast_ratio(fg, bg) >= G.MIN_CONTRAST).all()
    for image, background in zip(images, bg, strict=True):
        colours, counts = np.unique(image.reshape(-1, 3), axis=0, return_counts=True)
        np.testing.assert_array_equal(colours[counts.argmax()], background)
    # Coverage of each pixel along the background -> glyph colour line: the ink reaches (nearly)
    # the glyph colour, and every pixel lies on that line (a blend of the two colours).
    d = fg - bg
    pixels = images.astype(float) - bg[:, None, None]
    coverage = (pixels * d[:, None, None]).sum(-1) / (d * d).sum(-1)[:, None, None]
    assert coverage.reshape(N, -1).max(1).min() > 0.85
    assert coverage.min() > -0.01 and coverage.max() < 1.01
    off_line = pixels - coverage[..., None] * d[:, None, None]
    assert np.abs(off_line).max() <= 1.5  # rounding to 8 bits only
    ink = (coverage > 0.3).reshape(N, -1).mean(1)
    assert ink.min() > 0.005 and ink.max() < 0.6


def test_different_characters_differ():
    chars = [G.CHARACTERS.index(c) for c in "0OoIl1Q"]
    n = len(chars)
    attrs = {k: np.zeros(n, dtype=np.int16) for k in G.ATTRIBUTES}
    attrs["colour"][:] = 0
    attrs["background"][:] = 1
    images = G.render(np.array(chars), attrs).astype(int)
    distance = np.abs(images[:, None] - images[None]).sum(axis=(2, 3, 4))
    assert (distance[~np.eye(n, dtype=bool)] > 0).all()
    # Faces of one character differ too, and a face a family lacks is refused.
    faces = {k: np.zeros(3, dtype=np.int16) for k in G.ATTRIBUTES}
    faces["background"][:] = 1
    faces["family"][:] = [0, 2, 5]
    by_font = G.render(np.full(3, G.CHARACTERS.index("a")), faces).astype(int)
    assert np.abs(by_font[0] - by_font[1]).sum() > 0 and np.abs(by_font[1] - by_font[2]).sum() > 0
    with pytest.raises(UserError, match="no bold"):
        G.face_index(G.HELD_OUT_FAMILY, 1, 0)


def test_load_dataset_glyphs(monkeypatch):
    monkeypatch.setitem(G.SPLITS, "train", 300)
    data = load_dataset("glyphs")
    assert data.x.shape == (300, 3, 32, 32)
    assert data.class_names == list(G.LATIN) and data.num_classes == 62
    assert data.labels.min() >= 0 and data.labels.max() < 62
    assert data.x.min() >= -1.0 and data.x.max() <= 1.0
    k = (data.x + 1) * 255 / 2
    assert (k - k.round()).abs().max() < 1e-4  # on the 8-bit grid
    np.testing.assert_array_equal(
        data.labels.numpy(), G.generate("train", 300, seed=0).labels.astype(np.int64)
    )


def test_cache_is_reused_and_a_corrupt_one_rebuilt(cache, monkeypatch):
    first = G.glyphs_dataset("test", seed=3, n=50)
    path = G.cache_path("test", 50, 3)
    assert path.parent == cache and path.exists() and f"_v{G.CACHE_VERSION}_" in path.name

    def no_generation(*args):
        raise AssertionError("generated again instead of reading the cache")

    with monkeypatch.context() as patch:
        patch.setattr(G, "generate", no_generation)
        reread = G.glyphs_dataset("test", seed=3, n=50)
    np.testing.assert_array_equal(reread.images, first.images)
    path.write_bytes(b"PK\x03\x04 not a zip")
    with pytest.warns(UserWarning, match="regenerating the glyphs"):
        rebuilt = G.glyphs_dataset("test", seed=3, n=50)
    np.testing.assert_array_equal(rebuilt.images, first.images)
    with np.load(path) as f:
        np.testing.assert_array_equal(f["images"], first.images)
    assert not list(cache.glob(".*.tmp"))
    with pytest.raises(UserError, match="unknown glyphs split"):
        G.glyphs_dataset("validation")
