"""Figures: every function writes a non-empty PNG of the expected pixel size and returns its path."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from nngp_dask import Architecture, plots
from nngp_dask.validation import default_inputs, joint_samples, validate_kernel

mpl_image = pytest.importorskip("matplotlib.image")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _check_png(path, expected_shape):
    """A PNG file with the given (height, width) in pixels."""
    path = Path(path)
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    # IHDR: width and height as big-endian uint32 at bytes 16..24
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (height, width) == expected_shape
    img = mpl_image.imread(path)
    assert img.shape[:2] == expected_shape
    assert img.std() > 0.01  # something was drawn


@pytest.fixture(scope="module")
def result():
    return validate_kernel(Architecture(2, "relu", 2.0, 0.1), default_inputs(4, 8), max_width=64, networks=64)


def test_joint_distribution(tmp_path):
    arch = Architecture(2, "relu", 2.0, 0.1)
    x = default_inputs(2, 8)
    joint = joint_samples(arch, x, [1, 16], networks=300, seed=0)
    p = plots.joint_distribution(joint, path=tmp_path / "sub" / "joint.png")
    assert p == tmp_path / "sub" / "joint.png"
    _check_png(p, (360, 640))
    with pytest.raises(ValueError, match="x_pair"):
        joint_samples(arch, default_inputs(3, 8), [4], networks=10)


def test_error_vs_width(tmp_path, result):
    assert any(result.resolved)
    _check_png(plots.error_vs_width(result, tmp_path / "err.png"), (440, 1100))
    # depth 1: no bias to draw
    r1 = validate_kernel(Architecture(1, "erf"), default_inputs(3, 5), widths=(4, 8), networks=32)
    _check_png(plots.error_vs_width(r1, str(tmp_path / "err1.png")), (440, 1100))


def test_cg_residuals(tmp_path):
    it = np.arange(31)[:, None]
    res = 10.0 ** (-it * np.array([0.2, 0.3, 0.25]))
    _check_png(plots.cg_residuals(res * 5.0, tmp_path / "cg.png"), (440, 640))
    many = 10.0 ** (-it * np.linspace(0.1, 0.4, 40))
    many[-1, 0] = 0.0  # exact zero: not drawn, no error
    _check_png(plots.cg_residuals(many, tmp_path / "cg_many.png"), (440, 640))
    _check_png(plots.cg_residuals(res[:, 0], tmp_path / "cg1.png"), (440, 640))


def test_kernel_heatmap(tmp_path):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, size=30)
    f = rng.standard_normal((30, 5)) + 3 * np.eye(3)[labels] @ rng.standard_normal((3, 5))
    k = f @ f.T / 5
    _check_png(plots.kernel_heatmap(k, tmp_path / "k.png", labels=labels), (520, 600))
    _check_png(plots.kernel_heatmap(k, tmp_path / "k1.png", labels=np.eye(3)[labels]), (520, 600))
    _check_png(plots.kernel_heatmap(np.abs(k[:, :10]), tmp_path / "k2.png"), (520, 600))
    with pytest.raises(ValueError, match="labels"):
        plots.kernel_heatmap(k, tmp_path / "bad.png", labels=labels[:5])


def test_predicted_vs_true(tmp_path):
    rng = np.random.default_rng(1)
    y = rng.standard_normal(200)
    _check_png(plots.predicted_vs_true(y, y + 0.1 * rng.standard_normal(200), tmp_path / "r.png"), (500, 520))
    y2 = rng.standard_normal((50, 3))
    _check_png(plots.predicted_vs_true(y2, 0.9 * y2, tmp_path / "r2.png"), (500, 520))
    with pytest.raises(ValueError, match="y_pred"):
        plots.predicted_vs_true(y, y[:10], tmp_path / "bad.png")


def test_confusion_matrix(tmp_path):
    rng = np.random.default_rng(2)
    yt = rng.integers(0, 10, size=500)
    yp = np.where(rng.random(500) < 0.8, yt, rng.integers(0, 10, size=500))
    _check_png(plots.confusion_matrix(yt, yp, 10, tmp_path / "c.png"), (750, 850))
    scores = np.eye(10)[yp] + 0.01
    _check_png(plots.confusion_matrix(np.eye(10)[yt], scores, 10, tmp_path / "c1.png"), (750, 850))
    with pytest.raises(ValueError, match="labels in"):
        plots.confusion_matrix(yt, yp, 5, tmp_path / "bad.png")


def test_calibration(tmp_path):
    rng = np.random.default_rng(3)
    s = np.exp(rng.uniform(-4, 1, size=2000))  # spans > 2 decades: log axes
    e = np.abs(s * rng.standard_normal(2000))
    _check_png(plots.calibration(e, s, tmp_path / "cal.png"), (500, 560))
    s2 = rng.uniform(0.5, 1.0, size=100)
    _check_png(plots.calibration(np.abs(rng.standard_normal(100)), s2, tmp_path / "cal2.png"), (500, 560))
    _check_png(plots.calibration(np.ones(7), np.full(7, 0.5), tmp_path / "cal3.png"), (500, 560))


def test_reliability(tmp_path):
    levels = [0.1, 0.5, 0.9]
    _check_png(plots.reliability(levels, {"fitted": [0.12, 0.5, 0.88], "as built": [0.6, 0.95, 1.0]},
                                 tmp_path / "rel.png"), (500, 520))
    with pytest.raises(ValueError, match="levels: expected"):
        plots.reliability([0.0, 0.5], {"a": [0.1, 0.2]}, tmp_path / "bad.png")
    with pytest.raises(ValueError, match=r"observed\['a'\]: expected 3 values"):
        plots.reliability(levels, {"a": [0.1, 0.2]}, tmp_path / "bad.png")


def test_missing_matplotlib_gives_install_hint(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    with pytest.raises(ImportError, match=r"pip install 'nngp-dask\[plots\]'"):
        plots.cg_residuals(np.ones((3, 1)), tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
