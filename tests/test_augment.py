"""Augmented training images (``data.augment = "shift"``) and the validation hold-out."""

from __future__ import annotations

import numpy as np
import pytest

from nngp_dask.kernels import InputError
from nngp_dask.pipeline import load_dataset
from nngp_dask.pipeline.augment import Shifted, shift_images
from nngp_dask.store import as_source


def _shift_by_loops(img: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """The oracle: out[y, x] = img[y - dy, x - dx] where that pixel exists, else 0."""
    h, w = img.shape
    out = np.zeros_like(img)
    for y in range(h):
        for x in range(w):
            if 0 <= y - dy < h and 0 <= x - dx < w:
                out[y, x] = img[y - dy, x - dx]
    return out


@pytest.mark.parametrize("dy, dx", [(1, 0), (0, -1), (-2, 2), (2, 1), (-1, -1)])
def test_shift_images_against_loops(dy, dx):
    imgs = np.random.default_rng(0).integers(1, 255, size=(3, 6, 5)).astype(np.uint8)
    got = shift_images(imgs, dy, dx)
    for k in range(3):
        np.testing.assert_array_equal(got[k], _shift_by_loops(imgs[k], dy, dx))


@pytest.mark.parametrize("flat", [True, False])
def test_shifted_rows_are_the_originals_then_their_shifted_copies(flat):
    rng = np.random.default_rng(1)
    imgs = rng.integers(1, 255, size=(23, 7, 7)).astype(np.uint8)
    x = imgs.reshape(23, 49) if flat else imgs
    src = Shifted(as_source(x), copies=2, shift=2, seed=5)
    assert src.shape == (69, *x.shape[1:])
    full = src.read(0, 69)
    np.testing.assert_array_equal(full[:23], x)
    assert np.abs(src.offsets).max() <= 2 and not np.any(np.all(src.offsets == 0, axis=1))
    for c in (1, 2):
        for i in range(23):
            dy, dx = src.offsets[(c - 1) * 23 + i]
            np.testing.assert_array_equal(full[c * 23 + i].reshape(7, 7), _shift_by_loops(imgs[i], dy, dx))
    # any slice, across the copies' boundaries, reads the same rows as the whole
    for a, b in [(0, 1), (20, 30), (22, 47), (45, 69), (5, 69), (40, 41), (69, 69)]:
        np.testing.assert_array_equal(src.read(a, b), full[a:b])
    # deterministic in the seed, and the seed matters
    np.testing.assert_array_equal(Shifted(as_source(x), 2, 2, seed=5).read(0, 69), full)
    assert not np.array_equal(Shifted(as_source(x), 2, 2, seed=6).read(23, 69), full[23:])


def test_shifted_refuses_what_is_not_an_image():
    with pytest.raises(InputError, match=r"data.augment: .*flattened square images, got rows of shape \(10,\)"):
        Shifted(as_source(np.zeros((4, 10))), 1, 1, 0)
    with pytest.raises(InputError, match="data.augment_shift: expected fewer pixels than"):
        Shifted(as_source(np.zeros((4, 3, 3))), 1, 3, 0)


def _npz(tmp_path, n=30, m=8):
    rng = np.random.default_rng(2)
    path = tmp_path / "digits.npz"
    np.savez(path, x_train=rng.integers(0, 255, (n, 6, 6)).astype(np.uint8), y_train=np.arange(n) % 3,
             x_test=rng.integers(0, 255, (m, 6, 6)).astype(np.uint8), y_test=np.arange(m) % 3)
    return path


def _data(path, **over):
    cfg = load_config_from(path, over)
    return load_dataset(cfg["data"], task="classification", seed=cfg["run"]["seed"])


def load_config_from(path, over):
    from nngp_dask.pipeline import resolve

    return resolve({"run": {"task": "classification"}, "data": {"source": "npz", "path": str(path)}},
                   {f"data.{k}": v for k, v in over.items()})


def test_validation_holds_out_the_last_training_rows_and_augment_copies_only_the_rest(tmp_path):
    path = _npz(tmp_path)
    raw = np.load(path)
    ds = _data(path, limit_train=25, validation=5, augment="shift", augment_copies=1, augment_shift=1)
    assert ds.x_train.shape == (40, 36) and ds.x_test.shape == (5, 36)  # npz rows come flattened
    np.testing.assert_array_equal(ds.x_test.read(0, 5), raw["x_train"][20:25].reshape(5, 36))  # not the test set
    np.testing.assert_array_equal(ds.y_test, raw["y_train"][20:25])
    np.testing.assert_array_equal(ds.x_train.read(0, 20), raw["x_train"][:20].reshape(20, 36))
    for i in range(20):
        dy, dx = ds.x_train.offsets[i]
        np.testing.assert_array_equal(ds.x_train.read(20 + i, 21 + i)[0].reshape(6, 6),
                                      _shift_by_loops(raw["x_train"][i], dy, dx))
    np.testing.assert_array_equal(ds.y_train, np.concatenate([raw["y_train"][:20]] * 2))
    assert "validation: the last 5 training points" in ds.description and "augmented: 1 copy" in ds.description
    plain = _data(path)
    assert plain.x_train.shape == (30, 36) and plain.x_test.shape == (8, 36)


def test_validation_larger_than_the_training_set_is_one_line(tmp_path):
    with pytest.raises(InputError, match="data.validation: expected fewer than the 30 training points, got 30"):
        _data(_npz(tmp_path), validation=30)


def test_augment_setting_is_checked(tmp_path):
    from nngp_dask.pipeline import ConfigError

    with pytest.raises(ConfigError, match="data.augment"):
        load_config_from(_npz(tmp_path), {"augment": "rotate"})
    with pytest.raises(ConfigError, match="data.augment_copies"):
        load_config_from(_npz(tmp_path), {"augment_copies": 0})
