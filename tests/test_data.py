"""Data loaders: values on the 8-bit grid, labels from folders, and clear errors on bad input."""

import numpy as np
import pytest
import torch
from PIL import Image

from difflab.recipes import load_config
from difflab.data.images import array_file, digits, digits_split, image_folder, toy_2d
from difflab.errors import UserError


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
    (tmp_path / "e.npy").write_bytes(b"garbage")
    with pytest.raises(UserError, match="cannot read array file"):
        array_file(tmp_path / "e.npy")


def test_config_rejects_unknown_keys_and_impossible_values(tmp_path):
    _, cfg = load_config("digits", ["train.steps=7", "model.unet.channel_mults=[1,2,2]",
                                    "train.lr=1e-3"])
    assert (cfg.train.steps, cfg.model.unet.channel_mults, cfg.train.lr) == (7, [1, 2, 2], 1e-3)
    for bad, message in [
        (["train.stepz=3"], "unknown config key train.stepz"),
        (["train.steps=-1"], "train.steps must be at least 1"),
        (["sample.eta=1.5"], r"sample.eta must be in \[0, 1\]"),
        (["sample.sampler=heun", "sample.eta=0.5"], "sample.eta does not apply"),
        (["optim.lr=1"], "unknown config section optim"),
        (["model.dit.depth=2"], "model.dit does not apply to model.kind=unet"),
        (["diffusion.schedule=edm"], "diffusion.T does not apply"),
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
