"""What a reader of each figure needs: readable ticks, labelled axes and colour bars, sorted
rows, titles that state the real numbers. The figures are drawn for real; ``save_figure`` is
wrapped (it still writes the PNG) to keep the Figure for inspection."""

from __future__ import annotations

import numpy as np
import pytest

from nngp_dask import Architecture, kernel, plots
from nngp_dask.validation import default_inputs, joint_samples

pytest.importorskip("matplotlib")


@pytest.fixture
def drawn(monkeypatch):
    figures = []
    real = plots.save_figure

    def keep(fig, path):
        figures.append(fig)
        return real(fig, path)

    monkeypatch.setattr(plots, "save_figure", keep)
    monkeypatch.setattr(plots.uncertainty, "save_figure", keep)  # its own reference to the same function
    return figures


def _visible_labels(axis, fig) -> list:
    fig.canvas.draw()
    lo, hi = sorted(axis.axes.get_xlim() if axis.axis_name == "x" else axis.axes.get_ylim())
    return [t for t in axis.get_majorticklabels() + axis.get_minorticklabels()
            if t.get_visible() and t.get_text() and lo <= t.get_position()[0 if axis.axis_name == "x" else 1] <= hi]


def test_calibration_over_a_narrow_std_range_has_readable_ticks(tmp_path, rng, drawn):
    s = rng.uniform(0.13, 0.28, 500)  # the quickstart's range
    e = np.abs(rng.standard_normal(500)) * s * rng.uniform(0.001, 3, 500)  # errors over several decades
    plots.calibration(e, s, tmp_path / "cal.png")
    fig = drawn[-1]
    ax = fig.axes[0]
    assert ax.get_xscale() == "linear" and ax.get_yscale() == "log"
    labels = _visible_labels(ax.xaxis, fig)
    boxes = sorted((t.get_window_extent() for t in labels), key=lambda b: b.x0)
    assert 3 <= len(boxes) <= 12 and all(a.x1 < b.x0 for a, b in zip(boxes, boxes[1:])), "x labels overlap"


def test_regression_heatmap_is_labelled_and_sorted_by_target(tmp_path, rng, drawn):
    x = rng.standard_normal((40, 5))
    y = rng.standard_normal(40)
    k = kernel(Architecture(2, "relu", 1.6, 0.1), x, dtype="float64")
    plots.kernel_heatmap(k, tmp_path / "k.png", targets=y, kind="nngp", correlation=True)
    fig = drawn[-1]
    ax, bar = fig.axes
    assert "sorted by target" in ax.get_xlabel() and "sorted by target" in ax.get_ylabel()
    assert "NNGP" in bar.get_ylabel() and "correlation" in bar.get_ylabel()
    order = np.argsort(y, kind="stable")
    d = np.sqrt(np.diag(k))
    np.testing.assert_allclose(ax.images[0].get_array(), (k / np.outer(d, d))[np.ix_(order, order)])
    with pytest.raises(ValueError, match="targets: expected shape"):
        plots.kernel_heatmap(k, tmp_path / "bad.png", targets=y[:5])


def test_joint_title_states_the_networks_drawn(tmp_path, drawn):
    joint = joint_samples(Architecture(2, "relu", 2.0, 0.1), default_inputs(2, 8), [1, 8], networks=120, seed=0)
    plots.joint_distribution(joint, tmp_path / "joint.png")
    title = drawn[-1].get_suptitle()
    assert title.startswith("120 random networks per width")
