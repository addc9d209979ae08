"""Figures of predictive uncertainty: errors against the predictive std, and interval coverage."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from numpy.typing import ArrayLike

from .base import figure, save_figure

__all__ = ["calibration", "reliability"]


def calibration(abs_error: ArrayLike, predictive_std: ArrayLike, path: str | Path = "calibration.png",
                *, bins: int = 12) -> Path:
    """Predictive standard deviation against absolute error.

    Points (a random subsample of at most 5000), the mean absolute error in quantile bins of
    the predictive std, the line ``sqrt(2/pi) s`` (the mean of ``|N(0, s^2)|``: where a
    calibrated Gaussian's bins fall) and ``y = x``. Log axes when the values span more than
    two decades.

    Parameters
    ----------
    abs_error, predictive_std : array_like, same size (flattened)
    bins : int

    Returns
    -------
    Path
    """
    e = np.abs(np.asarray(abs_error, dtype=np.float64)).ravel()
    s = np.asarray(predictive_std, dtype=np.float64).ravel()
    if e.shape != s.shape:
        raise ValueError(f"predictive_std: expected {e.size} values like abs_error, got {s.size}")
    keep = np.isfinite(e) & np.isfinite(s) & (s >= 0)
    e, s = e[keep], s[keep]
    if e.size == 0:
        raise ValueError("abs_error: expected at least one finite value")
    fig = figure((5.6, 5.0), layout="constrained")
    ax = fig.subplots()
    # each axis on a log scale only when its own values span more than two decades: a narrow
    # range of stds (0.13-0.28) on a log axis got one overlapping label per minor tick
    xlog, ylog = (v.size > 0 and v.max() / v.min() > 100.0 for v in (s[s > 0], e[e > 0]))
    shown = np.random.default_rng(0).permutation(e.size)[:5000]
    ax.scatter(s[shown], e[shown], s=5, alpha=max(0.05, min(0.5, 300.0 / shown.size)), color="C0", linewidths=0,
               label="points")
    nb = int(max(1, min(bins, e.size // 5 if e.size >= 5 else 1)))
    edges = np.unique(np.quantile(s, np.linspace(0.0, 1.0, nb + 1)))
    if edges.size >= 2:
        which = np.clip(np.searchsorted(edges, s, side="right") - 1, 0, edges.size - 2)
        ms = np.array([s[which == b].mean() for b in range(edges.size - 1) if np.any(which == b)])
        me = np.array([e[which == b].mean() for b in range(edges.size - 1) if np.any(which == b)])
        ax.plot(ms, me, "o-", color="C3", label="binned mean |error|")
    else:  # every std equal
        ax.plot([s.mean()], [e.mean()], "o", color="C3", label="mean |error|")
    s_pos = s[s > 0]
    lo = float(s_pos.min()) if s_pos.size else 1e-3
    hi = float(s_pos.max()) if s_pos.size else 1.0
    grid = np.geomspace(lo, hi, 100) if xlog else np.linspace(0.0 if not ylog else lo, hi, 100)
    ax.plot(grid, math.sqrt(2.0 / math.pi) * grid, color="k", linewidth=1.0,
            label="calibrated: $\\sqrt{2/\\pi}\\,s$")
    ax.plot(grid, grid, color="0.5", linewidth=0.8, linestyle="--", label="y = x")
    from matplotlib.ticker import LogLocator, NullFormatter

    for log_axis, axis, scale in ((xlog, ax.xaxis, ax.set_xscale), (ylog, ax.yaxis, ax.set_yscale)):
        if log_axis:
            scale("log")
            axis.set_major_locator(LogLocator(base=10.0))
            axis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("predictive std $s$")
    ax.set_ylabel("absolute error")
    ratio = e.mean() / (math.sqrt(2.0 / math.pi) * s.mean()) if s.mean() > 0 else float("nan")
    ax.set_title(f"{e.size} predictions: mean |error| {ratio:.2f}x a calibrated Gaussian's", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(True, alpha=0.3)
    return save_figure(fig, path)


def reliability(levels: ArrayLike, observed: dict[str, ArrayLike], path: str | Path = "reliability.png") -> Path:
    """Reliability diagram: observed against expected coverage of central intervals
    (:func:`nngp_dask.gp.coverage`), a curve per labelled prediction; below the diagonal the
    intervals are too narrow, above it too wide.

    Parameters
    ----------
    levels : array_like, shape (p,)
        Expected coverage, in (0, 1).
    observed : dict of str to array_like, each shape (p,)
    """
    lv = np.asarray(levels, dtype=np.float64)
    if lv.ndim != 1 or lv.size == 0 or np.any((lv <= 0) | (lv >= 1)):
        raise ValueError(f"levels: expected a non-empty 1-D array of probabilities in (0, 1), got {lv!r}")
    fig = figure((5.2, 5.0), layout="constrained")
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], color="0.5", linewidth=0.8, linestyle="--", label="calibrated")
    for k, (label, obs) in enumerate(observed.items()):
        ob = np.asarray(obs, dtype=np.float64)
        if ob.shape != lv.shape:
            raise ValueError(f"observed[{label!r}]: expected {lv.size} values like levels, got {ob.size}")
        ax.plot(lv, ob, "o-", color=f"C{k}", label=label)
    ax.set(xlim=(0, 1), ylim=(0, 1.02))
    ax.set(xlabel="expected coverage of the central interval", ylabel="observed coverage")
    ax.set_title("reliability of the predictive intervals", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(True, alpha=0.3)
    return save_figure(fig, path)
