"""Data loaders: values on the 8-bit grid, labels from folders, and clear errors on bad input."""

import numpy as np
import pytest
import torch
from PIL import Image

from difflab.data.images import (
    ArrayData,
    array_file,
    digits,
    digits_split,
    image_folder,
    load_dataset,
    toy_2d,
)
from difflab.errors import UserError
from difflab.recipes import load_config


def test_digits_are_on_the_8bit_grid_with_labels():
    d = digits()
    assert d.x.shape == (1797, 1, 8, 8) and d.num_classes == 10
    k = (d.x + 1) * 127.5
    assert torch.allclose(k, k.round(), atol=1e-4) and d.x.min() == -1 and d.x.max() == 1
    from sklearn.datasets import load_digits

    raw = load_digits().images
    assert torch.allclose(k[:, 0].round(), torch.from_numpy(np.rint(raw * 255 / 16)).float())


def test_digit_split_is_a_fixed_stratified_partition():
    train, test = digits_split()
    assert len(train) == 1437 and len(test) == 360
    # Train and held-out together are exactly the 1,797 digits (as a multiset of image-label rows).
    from sklearn.datasets import load_digits

    raw = load_digits()
    k = torch.cat([train.x, test.x]).flatten(1) * 127.5 + 127.5
    rows = torch.cat([k.round(), torch.cat([train.labels, test.labels])[:, None].float()], 1)
    expected = np.concatenate(
        [np.rint(raw.images.reshape(-1, 64) * 255 / 16), raw.target[:, None]], 1
    )
    sort = lambda a: a[np.lexsort(a.T[::-1])]  # noqa: E731
    np.testing.assert_array_equal(sort(rows.numpy()), sort(expected))
    # Stratified: each class is held out in proportion 0.2, to within one digit.
    assert np.all(np.abs(np.bincount(test.labels.numpy()) - 0.2 * np.bincount(raw.target)) < 1)
    # Fixed by the seed, and the seed matters.
    assert torch.equal(digits_split()[1].labels, test.labels)
    assert not torch.equal(digits_split(seed=1)[1].labels, test.labels)


@pytest.mark.parametrize("name", ["moons", "swissroll", "8gaussians", "checkerboard"])
def test_toys_are_2d_and_roughly_unit_scale(name):
    d = toy_2d(name, 5000)
    assert d.x.shape == (5000, 2)
    assert 0.3 < float(d.x.std()) < 2.0 and float(d.x.abs().max()) < 4


def _png(path, size=(6, 6), mode="L", value=128):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value).save(path)


def test_image_folder_labels_from_subfolders_and_resize(tmp_path):
    _png(tmp_path / "cats" / "a.png", value=0)
    _png(tmp_path / "dogs" / "b.png", value=255)
    _png(tmp_path / "dogs" / "c.png", size=(12, 12), value=255)
    d = image_folder(tmp_path, image_size=4)
    assert d.x.shape == (3, 1, 4, 4) and d.class_names == ["cats", "dogs"]
    assert d.labels.tolist() == [0, 1, 1]
    assert float(d.x[0].max()) == -1.0 and float(d.x[1].min()) == 1.0


def test_image_folder_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        image_folder(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="contains no images"):
        image_folder(tmp_path / "empty")
    _png(tmp_path / "mixed" / "a.png", size=(4, 4))
    _png(tmp_path / "mixed" / "b.png", size=(5, 5))
    with pytest.raises(UserError, match="mixed sizes"):
        image_folder(tmp_path / "mixed")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"this is not a png")
    with pytest.raises(UserError, match="cannot read image"):
        image_folder(tmp_path / "bad")


def test_array_files(tmp_path):
    x = np.random.default_rng(0).uniform(-1, 1, (10, 2)).astype(np.float32)
    np.save(tmp_path / "a.npy", x)
    assert torch.allclose(array_file(tmp_path / "a.npy").x, torch.from_numpy(x))
    np.savez(tmp_path / "b.npz", x=(x + 1) * 100, labels=np.arange(10) % 3)
    with pytest.raises(UserError, match=r"lie in \[-1, 1\]"):
        array_file(tmp_path / "b.npz")
    np.savez(tmp_path / "c.npz", x=np.zeros((10, 1, 2, 2), np.uint8), y=np.arange(10) % 3)
    d = array_file(tmp_path / "c.npz")
    assert d.num_classes == 3 and float(d.x.max()) == -1.0
    np.savez(tmp_path / "d.npz", images=x)
    with pytest.raises(UserError, match="no array named 'x'"):
        array_file(tmp_path / "d.npz")
    (tmp_path / "e.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(UserError, match="cannot read array file"):
        array_file(tmp_path / "e.npy")


def test_config_rejects_unknown_keys_and_impossible_values(tmp_path):
    _, cfg = load_config(
        "digits", ["train.steps=7", "model.unet.channel_mults=[1,2,2]", "train.lr=1e-3"]
    )
    assert (cfg.train.steps, cfg.model.unet.channel_mults, cfg.train.lr) == (7, [1, 2, 2], 1e-3)
    for bad, message in [
        (["train.stepz=3"], "unknown config key train.stepz"),
        (["train.steps=-1"], "train.steps must be at least 1"),
        (["sample.eta=1.5"], r"sample.eta must be in \[0, 1\]"),
        (["sample.sampler=heun", "sample.eta=0.5"], "sample.eta does not apply"),
        (["optim.lr=1"], "unknown config section optim"),
        (["model.dit.depth=2"], "model.dit does not apply to model.kind=unet"),
        (["diffusion.schedule=edm", "diffusion.T=10"], "diffusion.T does not apply"),
        (["train.lr=fast"], "train.lr has an impossible value"),
        (["steps=3"], "must look like section.key=value"),
    ]:
        with pytest.raises(UserError, match=message):
            load_config("digits", bad)
    with pytest.raises(UserError, match="neither a preset"):
        load_config(str(tmp_path / "missing.yaml"))
    (tmp_path / "broken.yaml").write_text("train: [unclosed")
    with pytest.raises(UserError, match="cannot parse"):
        load_config(str(tmp_path / "broken.yaml"))


# ---------------------------------------------------------------- image modes


def _values(path, **kw):
    """The [-1, 1] pixels of a folder holding just ``path``, as levels ``k = 255 (x + 1) / 2``."""
    d = image_folder(path.parent, **kw)
    return ((d.x + 1) * 127.5).round().to(torch.int64)


def test_16bit_png_round_trips_its_values(tmp_path):
    levels = np.arange(256, dtype=np.uint16).reshape(16, 16)
    Image.fromarray(levels * 257).save(tmp_path / "a.png")  # 257 k: the 16-bit form of level k
    assert Image.open(tmp_path / "a.png").mode == "I;16"
    d = image_folder(tmp_path)
    assert torch.equal(d.x[0, 0], torch.from_numpy(levels * (2 / 255) - 1).float())
    # Any 16-bit value lands on the nearest 8-bit level: scaled by 65535, never clipped.
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 65536, (8, 8), dtype=np.uint16)
    Image.fromarray(raw).save(tmp_path / "a.png")
    assert torch.equal(_values(tmp_path / "a.png")[0, 0], torch.from_numpy(np.rint(raw / 257.0)))


def test_palette_cmyk_rgba_la_and_1bit_images(tmp_path):
    rgb = np.random.default_rng(1).integers(0, 256, (4, 4, 3), dtype=np.uint8)
    expected = torch.from_numpy(rgb.transpose(2, 0, 1).astype(np.int64))
    folder = tmp_path / "p"
    folder.mkdir()
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=256).save(
        folder / "a.png"
    )
    palette = Image.open(folder / "a.png")
    assert palette.mode == "P"
    assert torch.equal(_values(folder / "a.png")[0], torch.from_numpy(
        np.asarray(palette.convert("RGB")).transpose(2, 0, 1).astype(np.int64)))  # fmt: skip
    rgba = np.concatenate([rgb, np.full((4, 4, 1), 255, np.uint8)], axis=2)
    (tmp_path / "rgba").mkdir()
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba" / "a.png")
    assert torch.equal(_values(tmp_path / "rgba" / "a.png")[0], expected)
    (tmp_path / "cmyk").mkdir()
    cmyk = np.zeros((2, 2, 4), np.uint8)
    cmyk[0, 0] = (255, 0, 0, 0)  # cyan
    Image.fromarray(cmyk, "CMYK").save(tmp_path / "cmyk" / "a.tif")
    got = _values(tmp_path / "cmyk" / "a.tif")[0]
    assert got[:, 0, 0].tolist() == [0, 255, 255] and got[:, 1, 1].tolist() == [255, 255, 255]
    (tmp_path / "la").mkdir()
    Image.fromarray(np.stack([rgb[..., 0], np.full((4, 4), 255, np.uint8)], 2), "LA").save(
        tmp_path / "la" / "a.png"
    )
    assert torch.equal(_values(tmp_path / "la" / "a.png")[0, 0], expected[0])
    (tmp_path / "bits").mkdir()
    Image.fromarray(rgb[..., 0] > 127).save(tmp_path / "bits" / "a.png")
    assert Image.open(tmp_path / "bits" / "a.png").mode == "1"
    assert torch.equal(_values(tmp_path / "bits" / "a.png")[0, 0], 255 * (expected[0] > 127))


def test_a_folder_mixing_modes_is_scaled_per_image(tmp_path):
    Image.new("L", (2, 2), 51).save(tmp_path / "a.png")
    Image.fromarray(np.full((2, 2), 51 * 257, np.uint16)).save(tmp_path / "b.png")
    Image.new("RGB", (2, 2), (51, 102, 153)).save(tmp_path / "c.png")
    k = ((image_folder(tmp_path).x + 1) * 127.5).round()
    assert k.shape == (3, 3, 2, 2)
    assert k[:2].unique().tolist() == [51.0]  # grey images repeated on the three channels
    assert k[2, :, 0, 0].tolist() == [51.0, 102.0, 153.0]
    grey = ((image_folder(tmp_path, channels=1).x + 1) * 127.5).round()
    assert grey.shape == (3, 1, 2, 2)
    assert grey[2, 0, 0, 0] == round(0.299 * 51 + 0.587 * 102 + 0.114 * 153)


def test_transparent_float_and_32bit_images_are_refused(tmp_path):
    cases = {
        "rgba": (Image.new("RGBA", (2, 2), (10, 20, 30, 128)), "png", "transparent pixels"),
        "float": (Image.fromarray(np.ones((2, 2), np.float32)), "tif", "floating-point"),
        "int32": (Image.fromarray(np.full((2, 2), 70000, np.int32)), "tif", "32-bit integers"),
    }
    palette = Image.new("P", (2, 2), 0)
    palette.info["transparency"] = 0
    cases["palette"] = (palette, "png", "transparent pixels")
    for name, (im, suffix, message) in cases.items():
        (tmp_path / name).mkdir()
        im.save(tmp_path / name / f"a.{suffix}")
        with pytest.raises(UserError, match=f"image .*{name}.a.{suffix} .*{message}"):
            image_folder(tmp_path / name)


def test_decompression_bombs_are_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    _png(tmp_path / "warn" / "a.png", size=(12, 12))  # over the limit: Pillow only warns
    _png(tmp_path / "error" / "a.png", size=(15, 15))  # over twice the limit: Pillow raises
    for name in ("warn", "error"):
        with pytest.raises(UserError, match=f"image .*{name}.a.png is too large to read safely"):
            image_folder(tmp_path / name)


def test_image_size_must_be_positive_and_only_for_folders(tmp_path):
    _png(tmp_path / "a.png")
    for bad in (0, -3):
        with pytest.raises(UserError, match=r"data\.image_size must be a positive integer"):
            image_folder(tmp_path, image_size=bad)
    with pytest.raises(UserError, match=r"data\.image_size resizes folder images only"):
        load_dataset("digits", image_size=16)
    with pytest.raises(UserError, match=r"data\.path is read by folder and array data only"):
        load_dataset("moons", path=str(tmp_path))
    assert load_dataset("folder", str(tmp_path), 3).x.shape == (1, 1, 3, 3)


# ---------------------------------------------------------------- splits


def test_a_folder_of_one_image_loads_but_cannot_be_split(tmp_path):
    _png(tmp_path / "a.png", value=255)
    d = image_folder(tmp_path)
    assert len(d) == 1 and float(d.x.min()) == 1.0
    assert len(d.split(0.0)[0]) == 1
    with pytest.raises(UserError, match="holds out 1 of the 1 examples and leaves none"):
        d.split(0.2)


def test_impossible_splits_are_one_line_each():
    data = digits()
    for held_out in (1.0, 1.5, -0.1, float("nan")):
        with pytest.raises(UserError, match=r"data.held_out must be in \[0, 1\)"):
            data.split(held_out)
    with pytest.raises(UserError, match="holds out 1797 of the 1797 examples and leaves none"):
        data.split(0.9999)
    with pytest.raises(UserError, match="each side needs one of each of the 10 classes"):
        data.split(0.001)
    with pytest.raises(UserError, match=r"data\.split_seed must be an integer"):
        data.split(0.2, seed=-1)
    lonely = ArrayData(torch.zeros(5, 2), torch.tensor([0, 0, 1, 1, 2]), ["a", "b", "c"])
    with pytest.raises(UserError, match="class 'c' has a single example"):
        lonely.split(0.4)


# ---------------------------------------------------------------- array files


def test_array_file_refuses_bad_labels_without_allocating(tmp_path):
    x = np.zeros((4, 2), np.float32)
    for labels, message in [
        (np.array([0.0, 1.0, 0.0, 1.0]), "labels must be integer class indices, got float64"),
        (np.array(["a", "b", "a", "b"]), "labels must be integer class indices, got <U1"),
        (np.array(3), r"one per example, shape \(4,\), got \(\)"),
        (np.array([0, 1, 2, 10**15]), r"K at most the 4 examples, got values in 0..10+$"),
        (np.array([0, -1, 1, 0]), r"got values in -1..1"),
    ]:
        np.savez(tmp_path / "a.npz", x=x, labels=labels)
        with pytest.raises(UserError, match=message):
            array_file(tmp_path / "a.npz")
    np.savez(tmp_path / "a.npz", x=x, labels=np.array([0, 1, 1, 3]))
    assert array_file(tmp_path / "a.npz").num_classes == 4


def test_array_file_refuses_what_it_cannot_read_honestly(tmp_path):
    (tmp_path / "a.npy").write_text("1,2,3\n4,5,6\n")
    with pytest.raises(UserError, match="is not a NumPy array file") as info:
        array_file(tmp_path / "a.npy")
    assert "pickle" not in str(info.value)
    np.save(tmp_path / "c.npy", np.zeros((3, 2), np.complex64))
    with pytest.raises(UserError, match="holds complex values"):
        array_file(tmp_path / "c.npy")
    np.save(tmp_path / "i.npy", np.zeros((3, 2), np.int64))
    with pytest.raises(UserError, match="holds int64 values: expected floats"):
        array_file(tmp_path / "i.npy")
    np.save(tmp_path / "e.npy", np.zeros((3, 0), np.float32))
    with pytest.raises(UserError, match="non-empty array"):
        array_file(tmp_path / "e.npy")
    (tmp_path / "z.npz").write_bytes(b"PK\x03\x04 and then nothing a zip file needs")
    with pytest.raises(UserError, match="cannot read array file"):
        array_file(tmp_path / "z.npz")
