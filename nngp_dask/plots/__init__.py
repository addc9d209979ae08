"""Figures for validation and reports (PNG files; matplotlib is optional).

Every function draws on its own :class:`matplotlib.figure.Figure` with the Agg canvas (no
pyplot state, no window, safe in threads and on headless machines), writes one PNG of a
fixed pixel size (``figsize * dpi``) and returns its path. matplotlib is imported inside the
functions, so ``import nngp_dask.plots`` works without it; calling a function then raises
:class:`ImportError` with the install hint.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import ArrayLike

from .base import MATPLOTLIB_HINT, figure, save_figure
from .uncertainty import calibration, reliability

if TYPE_CHECKING:  # pragma: no cover - annotations only: plots draws, it computes nothing
    from ..validation import JointSamples, ValidationResult

__all__ = ["MATPLOTLIB_HINT", "figure", "save_figure", "joint_distribution", "error_vs_width", "cg_residuals",
           "kernel_heatmap", "predicted_vs_true", "confusion_matrix", "calibration", "reliability"]

def _ellipse(cov: np.ndarray, radius: float, points: int = 200) -> np.ndarray:
    """Points of ``{z : z^T cov^{-1} z = radius^2}``, shape (2, points)."""
    lam, vec = np.linalg.eigh(np.asarray(cov, dtype=np.float64))
    t = np.linspace(0.0, 2.0 * math.pi, points)
    circle = np.stack([np.cos(t), np.sin(t)])
    return vec @ (np.sqrt(np.maximum(lam, 0.0))[:, None] * circle) * radius


# --------------------------------------------------------------------------------------------
# The correspondence


def joint_distribution(samples: JointSamples, path: str | Path = "joint_distribution.png") -> Path:
    """The classic NNGP picture: outputs ``(f(x1), f(x2))`` of random networks, one panel per width,
    under the 1, 2, 3-sigma contours of the NNGP Gaussian ``N(0, K(x_pair))``.

    Narrow networks give visibly non-Gaussian joint distributions (a sharp peak at the origin
    and heavy tails: a product of few Gaussian factors); as the width grows the cloud fills the
    Gaussian's ellipses. Each panel's corner gives the sample variances and correlation.

    Parameters
    ----------
    samples : JointSamples
        From :func:`nngp_dask.validation.joint_samples` (the networks are sampled there).
    path : str or Path

    Returns
    -------
    Path
    """
    k = np.asarray(samples.kernel, dtype=np.float64)
    widths, arch, networks = samples.widths, samples.architecture, samples.networks
    scale = math.sqrt(max(k[0, 0], k[1, 1], 1e-300))
    lim = 4.0 * scale
    fig = figure((3.2 * len(widths), 3.6), layout="constrained")
    axes = fig.subplots(1, len(widths), squeeze=False)[0]
    corr_nngp = k[0, 1] / math.sqrt(k[0, 0] * k[1, 1]) if k[0, 0] * k[1, 1] > 0 else 0.0
    for i, (ax, w, f, cov) in enumerate(zip(axes, widths, samples.outputs, samples.covariances)):
        ax.hexbin(f[:, 0], f[:, 1], gridsize=40, extent=(-lim, lim, -lim, lim), cmap="Blues", mincnt=1,
                  bins="log", linewidths=0.0)
        for r, style in zip((1.0, 2.0, 3.0), ("-", "--", ":")):
            e = _ellipse(k, r)
            ax.plot(e[0], e[1], color="C3", linestyle=style, linewidth=1.2,
                    label=f"{r:g}$\\sigma$" if i == 0 else None)
        corr = cov[0, 1] / math.sqrt(cov[0, 0] * cov[1, 1]) if cov[0, 0] * cov[1, 1] > 0 else float("nan")
        ax.set_title(f"width {w}")
        ax.text(0.03, 0.97, f"var {cov[0, 0]:.2f}, {cov[1, 1]:.2f}\ncorr {corr:.2f}", transform=ax.transAxes,
                va="top", fontsize=8)
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
        ax.set_xlabel("$f(x_1)$")
        if i == 0:
            ax.set_ylabel("$f(x_2)$")
    axes[0].legend(loc="lower right", fontsize=7, title="NNGP", title_fontsize=7)
    fig.suptitle(
        f"{networks} random networks per width ({arch.activation.name}, depth {arch.depth}) vs the NNGP Gaussian: "
        f"var {k[0, 0]:.2f}, {k[1, 1]:.2f}, corr {corr_nngp:.2f}",
        fontsize=10,
    )
    return save_figure(fig, path)


def error_vs_width(result: ValidationResult, path: str | Path = "error_vs_width.png") -> Path:
    """Log-log convergence of a :class:`~nngp_dask.validation.ValidationResult`.

    Left: the relative error against width with its fitted line and the Monte Carlo noise
    floor, and the finite-width bias (control variate, with its fitted line and the
    reference slope -1). Right: at the largest width, the error against the number of
    networks with its fit and the reference slope -1/2.

    Returns
    -------
    Path
    """
    fig = figure((11.0, 4.4), layout="constrained")
    ax, ax2 = fig.subplots(1, 2)
    w = np.asarray(result.widths, dtype=np.float64)
    err = np.asarray(result.errors)
    floor = np.asarray(result.noise_floors)
    ax.loglog(w, err, "o-", color="C0", label="relative error $\\|\\hat C - K\\|_F / \\|K\\|_F$")
    ax.fill_between(w, np.maximum(floor, 1e-300), np.full_like(floor, max(floor.min(), 1e-300) * 1e-3),
                    color="C0", alpha=0.12, label="below Monte Carlo noise floor")
    ax.loglog(w, floor, "--", color="C0", linewidth=1.0)
    if result.error_fit is not None:
        ax.loglog(w, result.error_fit(w), ":", color="C0", label=f"fit, slope {result.error_fit.slope:+.2f}")
    resolved = np.asarray(result.resolved, dtype=bool)
    bias = np.asarray(result.biases)
    if resolved.any():
        bf = np.asarray(result.bias_floors)
        ax.errorbar(w[resolved], bias[resolved], yerr=2 * bf[resolved], fmt="s", color="C1", markersize=4,
                    capsize=2, label="finite-width bias (control variate, $\\pm 2$ s.e.)")
        if result.bias_fit is not None:
            ax.loglog(w, result.bias_fit(w), "-", color="C1", linewidth=1.0,
                      label=f"fit, slope {result.bias_fit.slope:+.2f}")
        ref = bias[resolved][0] * (w / w[resolved][0]) ** -1.0
        ax.loglog(w, ref, color="0.5", linewidth=0.8, linestyle=(0, (1, 3)), label="slope $-1$")
    positive = np.concatenate([err[err > 0], floor[floor > 0], bias[resolved]])
    if positive.size:
        ax.set_ylim(positive.min() / 3, positive.max() * 3)
    ax.set_xscale("log", base=2)
    ax.set(xlabel="width", ylabel="relative Frobenius error")
    ax.set_title(f"{result.networks[-1]} networks per width ({result.estimator} estimator)", fontsize=10)
    ax.legend(fontsize=7, loc="lower left")
    ax.grid(True, which="major", alpha=0.3)

    m = np.asarray(result.sample_sizes, dtype=np.float64)
    se = np.asarray(result.sample_errors)
    if m.size:
        ax2.loglog(m, se, "o-", color="C2", label="RMS error over disjoint blocks")
        if result.sample_fit is not None:
            ax2.loglog(m, result.sample_fit(m), ":", color="C2", label=f"fit, slope {result.sample_fit.slope:+.2f}")
        ax2.loglog(m, se[0] * (m / m[0]) ** -0.5, color="0.5", linewidth=0.8, linestyle=(0, (1, 3)),
                   label="slope $-1/2$")
        ax2.legend(fontsize=7, loc="lower left")
    ax2.set_xscale("log", base=2)
    ax2.set(xlabel="networks", ylabel="relative Frobenius error")
    ax2.set_title(f"width {result.widths[-1]}", fontsize=10)
    ax2.grid(True, which="major", alpha=0.3)
    arch = result.architecture
    fig.suptitle(f"NNGP vs finite networks: {arch.activation.name}, depth {arch.depth}, "
                 f"$\\sigma_w^2$={arch.weight_var:g}, $\\sigma_b^2$={arch.bias_var:g}", fontsize=11)
    return save_figure(fig, path)


# --------------------------------------------------------------------------------------------
# Solver and kernel diagnostics


def cg_residuals(residuals: ArrayLike, path: str | Path = "cg_residuals.png") -> Path:
    """Relative residual norm per conjugate-gradient iteration, one line per right-hand side.

    Parameters
    ----------
    residuals : array_like, shape (iters + 1, k) or (iters + 1,)
        Residual norms ``||r_i||`` (row 0 the initial residual). Each column is divided by its
        row 0, so relative residuals (row 0 equal to 1) are drawn unchanged.

    Returns
    -------
    Path
    """
    r = np.asarray(residuals, dtype=np.float64)
    if r.ndim == 1:
        r = r[:, None]
    if r.ndim != 2 or r.shape[0] < 1:
        raise ValueError(f"residuals: expected shape (iters + 1, k), got {np.shape(residuals)}")
    r0 = np.where(r[0] > 0, r[0], 1.0)
    rel = np.abs(r) / r0
    rel = np.where(rel > 0, rel, np.nan)  # log axis: exact zeros are not drawn
    fig = figure((6.4, 4.4), layout="constrained")
    ax = fig.subplots()
    it = np.arange(r.shape[0])
    k = r.shape[1]
    if k <= 10:
        for j in range(k):
            ax.semilogy(it, rel[:, j], linewidth=1.2, label=f"column {j}")
        ax.legend(fontsize=7)
    else:
        ax.semilogy(it, rel, color="C0", linewidth=0.6, alpha=max(0.05, min(0.6, 20.0 / k)))
        with np.errstate(all="ignore"):
            ax.semilogy(it, np.nanmax(rel, axis=1), color="C3", linewidth=1.5, label="worst column")
            ax.semilogy(it, np.nanmedian(rel, axis=1), color="k", linewidth=1.5, label="median column")
        ax.legend(fontsize=7)
    ax.set(xlabel="iteration", ylabel="relative residual $\\|r_i\\| / \\|r_0\\|$")
    final = np.nanmax(rel[-1]) if np.isfinite(rel[-1]).any() else 0.0
    ax.set_title(f"conjugate gradients: {k} right-hand side{'s' if k != 1 else ''}, "
                 f"{r.shape[0] - 1} iterations, final {final:.1e}", fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    return save_figure(fig, path)


def kernel_heatmap(k_sample: ArrayLike, path: str | Path = "kernel_heatmap.png",
                   labels: ArrayLike | None = None, *, targets: ArrayLike | None = None,
                   kind: str = "nngp", correlation: bool = False) -> Path:
    """Heat map of a kernel matrix (a sample of rows and columns), sorted by class when ``labels``
    are given and by target value when ``targets`` are, so that the structure shows.

    Parameters
    ----------
    k_sample : array_like, shape (m, n)
        Square when ``labels`` or ``targets`` are given.
    labels : array_like of int or str, shape (m,), optional
        Classes of the rows/columns (or one-hot rows, shape (m, c)): rows and columns are
        sorted by class (stable), class boundaries are drawn and ticks name the classes.
    targets : array_like of float, shape (m,) or (m, k), optional
        Regression targets of the rows/columns (the first column when 2-D): rows and columns are
        sorted by it, and the axes say so.
    kind : str
        ``"nngp"`` or ``"ntk"``, named on the colour bar.
    correlation : bool
        Draw ``k_ij / sqrt(k_ii k_jj)`` (square samples): without the inputs' norms, which
        otherwise paint every row and column as a stripe, the similarity structure shows.

    Returns
    -------
    Path
    """
    k = np.asarray(k_sample, dtype=np.float64)
    if k.ndim != 2:
        raise ValueError(f"k_sample: expected a 2-D array, got shape {k.shape}")
    if correlation and k.shape[0] == k.shape[1]:
        d = np.sqrt(np.maximum(np.diag(k), 1e-300))
        k = k / d[:, None] / d[None, :]
    lab = None
    if labels is not None:
        lab = np.asarray(labels)
        if lab.ndim == 2:
            lab = lab.argmax(axis=1)
        if lab.shape != (k.shape[0],) or k.shape[0] != k.shape[1]:
            raise ValueError(f"labels: expected shape ({k.shape[0]},) for a square kernel sample, got "
                             f"{np.shape(labels)} with kernel {k.shape}")
        order = np.argsort(lab, kind="stable")
        k, lab = k[np.ix_(order, order)], lab[order]
    elif targets is not None:
        t = np.asarray(targets, dtype=np.float64)
        t = t[:, 0] if t.ndim == 2 else t
        if t.shape != (k.shape[0],) or k.shape[0] != k.shape[1]:
            raise ValueError(f"targets: expected shape ({k.shape[0]},) for a square kernel sample, got "
                             f"{np.shape(targets)} with kernel {k.shape}")
        order = np.argsort(t, kind="stable")
        k = k[np.ix_(order, order)]
    fig = figure((6.0, 5.2), layout="constrained")
    ax = fig.subplots()
    finite = k[np.isfinite(k)]
    if finite.size and finite.min() < 0 < finite.max():
        v = float(np.abs(finite).max())
        im = ax.imshow(k, cmap="RdBu_r", vmin=-v, vmax=v, interpolation="nearest")
    else:  # colours for the off-diagonal values: the larger k(x, x) would flatten them
        square = k.shape[0] == k.shape[1] and k.shape[0] > 1
        off = k[~np.eye(k.shape[0], k.shape[1], dtype=np.bool_)] if square else finite
        off = off[np.isfinite(off)]
        top = float(np.percentile(off, 99.5)) if off.size else None
        im = ax.imshow(k, cmap="viridis", interpolation="nearest", vmax=top)
    what = "correlation (k_ij / sqrt(k_ii k_jj))" if correlation else "$k(x_i, x_j)$"
    fig.colorbar(im, ax=ax, shrink=0.85, label=f"{kind.upper()} kernel {what}",
                 extend="max" if finite.size and float(finite.max()) > im.norm.vmax else "neither")
    if lab is None:
        by = ", sorted by target" if targets is not None else ""
        ax.set_xlabel(f"training point $j${by}")
        ax.set_ylabel(f"training point $i${by}")
    if lab is not None and lab.size:
        change = np.flatnonzero(lab[1:] != lab[:-1]) + 1
        for c in change:
            ax.axhline(c - 0.5, color="w", linewidth=0.8)
            ax.axvline(c - 0.5, color="w", linewidth=0.8)
        starts = np.concatenate([[0], change])
        ends = np.concatenate([change, [lab.size]])
        if starts.size <= 30:
            centres = (starts + ends - 1) / 2.0
            names = [str(lab[s]) for s in starts]
            ax.set_xticks(centres, names, fontsize=7)
            ax.set_yticks(centres, names, fontsize=7)
        ax.set_xlabel("class")
        ax.set_ylabel("class")
    ax.set_title(f"{kind.upper()} kernel of {k.shape[0]} x {k.shape[1]} training points"
                 + (" (sorted by class)" if lab is not None else " (sorted by target)" if targets is not None else ""),
                 fontsize=10)
    return save_figure(fig, path)


# --------------------------------------------------------------------------------------------
# Predictions


def predicted_vs_true(y_true: ArrayLike, y_pred: ArrayLike, path: str | Path = "predicted_vs_true.png") -> Path:
    """Regression: predicted against true targets with the line y = x, RMSE and R^2 in the title.

    Multi-output targets (shape (n, k)) are drawn together, one colour per output (up to 10).

    Returns
    -------
    Path
    """
    yt = np.asarray(y_true, dtype=np.float64)
    yp = np.asarray(y_pred, dtype=np.float64)
    if yt.shape != yp.shape:
        raise ValueError(f"y_pred: expected the shape of y_true {yt.shape}, got {yp.shape}")
    if yt.size == 0:
        raise ValueError("y_true: expected at least one target")
    if yt.ndim == 1:
        yt, yp = yt[:, None], yp[:, None]
    yt, yp = yt.reshape(yt.shape[0], -1), yp.reshape(yp.shape[0], -1)
    fig = figure((5.2, 5.0), layout="constrained")
    ax = fig.subplots()
    alpha = max(0.1, min(0.8, 300.0 / yt.shape[0]))
    if yt.shape[1] <= 10:
        for j in range(yt.shape[1]):
            ax.scatter(yt[:, j], yp[:, j], s=8, alpha=alpha, linewidths=0,
                       label=f"output {j}" if yt.shape[1] > 1 else None)
        if yt.shape[1] > 1:
            ax.legend(fontsize=7, markerscale=2)
    else:
        ax.scatter(yt.ravel(), yp.ravel(), s=6, alpha=alpha, linewidths=0)
    lo = float(min(np.nanmin(yt), np.nanmin(yp)))
    hi = float(max(np.nanmax(yt), np.nanmax(yp)))
    pad = 0.05 * (hi - lo or 1.0)
    ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="k", linewidth=0.8, label="y = x")
    ax.set_xlim(lo - pad, hi + pad)
    ax.set_ylim(lo - pad, hi + pad)
    ax.set_aspect("equal")
    rmse = float(np.sqrt(np.nanmean((yp - yt) ** 2)))
    ss_tot = float(np.nansum((yt - np.nanmean(yt, axis=0)) ** 2))
    r2 = 1.0 - float(np.nansum((yp - yt) ** 2)) / ss_tot if ss_tot > 0 else float("nan")
    ax.set(xlabel="true", ylabel="predicted")
    ax.set_title(f"{yt.shape[0]} points: RMSE {rmse:.3g}, $R^2$ {r2:.3f}", fontsize=10)
    ax.grid(True, alpha=0.3)
    return save_figure(fig, path)


def confusion_matrix(y_true: ArrayLike, y_pred: ArrayLike, n_classes: int,
                     path: str | Path = "confusion_matrix.png") -> Path:
    """Classification: confusion matrix (rows true class, columns predicted), coloured by row fraction,
    counts written in the cells when there are at most 20 classes; accuracy in the title.

    ``y_true`` and ``y_pred`` are integer labels, or 2-D scores / one-hot rows (argmax taken).

    Returns
    -------
    Path
    """
    yt, yp = np.asarray(y_true), np.asarray(y_pred)
    if yt.ndim == 2:
        yt = yt.argmax(axis=1)
    if yp.ndim == 2:
        yp = yp.argmax(axis=1)
    if yt.shape != yp.shape or yt.ndim != 1:
        raise ValueError(f"y_pred: expected labels of the shape of y_true {yt.shape}, got {yp.shape}")
    if isinstance(n_classes, bool) or not isinstance(n_classes, (int, np.integer)) or n_classes < 1:
        raise ValueError(f"n_classes: expected an integer >= 1, got {n_classes!r}")
    yt, yp = yt.astype(np.int64), yp.astype(np.int64)
    for name, arr in (("y_true", yt), ("y_pred", yp)):
        if arr.size and (arr.min() < 0 or arr.max() >= n_classes):
            raise ValueError(f"{name}: expected labels in [0, {n_classes}), got range [{arr.min()}, {arr.max()}]")
    counts = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(counts, (yt, yp), 1)
    rows = counts.sum(axis=1, keepdims=True)
    frac = np.divide(counts, rows, out=np.zeros(counts.shape), where=rows > 0)
    size = min(4.0 + 0.35 * n_classes, 12.0)
    fig = figure((size + 1.0, size), layout="constrained")
    ax = fig.subplots()
    im = ax.imshow(frac, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(im, ax=ax, shrink=0.85, label="fraction of the true class")
    if n_classes <= 20:
        for i in range(n_classes):
            for j in range(n_classes):
                ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=7 if n_classes > 6 else 11,
                        color="w" if frac[i, j] > 0.5 else "k")
        ax.set_xticks(range(n_classes))
        ax.set_yticks(range(n_classes))
    acc = float(np.trace(counts)) / max(int(counts.sum()), 1)
    ax.set(xlabel="predicted class", ylabel="true class")
    ax.set_title(f"{yt.size} points: accuracy {100 * acc:.2f} %", fontsize=10)
    return save_figure(fig, path)
