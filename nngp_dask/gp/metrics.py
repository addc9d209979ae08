"""Scores of a prediction: accuracy, RMSE and NLPD, each defined once.

The pipeline's report, the sweep's selection criteria and the benchmarks all call these, so
a number in a report and the same number in a sweep table mean the same thing.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

__all__ = ["COVERAGE_LEVELS", "accuracy", "confusion_matrix", "coverage", "nlpd", "rmse"]


def accuracy(y_true: ArrayLike, y_pred: ArrayLike) -> float:
    """Fraction of predictions equal to the truth.

    Parameters
    ----------
    y_true, y_pred : array_like, shape (m,)
        Labels (or class indices; -1 for a class the model never saw counts as an error).

    Returns
    -------
    float
    """
    return float(np.mean(np.asarray(y_pred) == np.asarray(y_true)))


def rmse(y_true: ArrayLike, mean: ArrayLike) -> float:
    """Root mean squared error over every entry.

    Parameters
    ----------
    y_true, mean : array_like, same shape (m,) or (m, k)

    Returns
    -------
    float
    """
    err = np.asarray(mean, dtype=np.float64) - np.asarray(y_true, dtype=np.float64)
    return float(np.sqrt(np.mean(err * err)))


def nlpd(y_true: ArrayLike, mean: ArrayLike, var: ArrayLike) -> float:
    """Mean negative log predictive density of Gaussian predictions (lower is better).

    ``mean over entries of 0.5 log(2 pi var) + (y - mean)^2 / (2 var)``.

    Parameters
    ----------
    y_true, mean : array_like, shape (m,) or (m, k)
    var : array_like, broadcastable to ``mean``
        Predictive variance of the observations: the latent variance plus the noise.

    Returns
    -------
    float
        ``inf`` when a variance is 0 (noise 0 at a point the posterior is certain of).
    """
    err = np.asarray(mean, dtype=np.float64) - np.asarray(y_true, dtype=np.float64)
    s2 = np.asarray(var, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(np.mean(0.5 * np.log(2.0 * math.pi * s2) + err * err / (2.0 * s2)))


def confusion_matrix(y_true: ArrayLike, y_pred: ArrayLike, classes: Any) -> list[list[int]]:
    """Counts of (true class, predicted class); true labels outside ``classes`` are left out.

    Parameters
    ----------
    y_true, y_pred : array_like, shape (m,)
    classes : sequence, length C

    Returns
    -------
    list of list of int, C x C (rows: true class)
    """
    idx = {c: i for i, c in enumerate(classes)}
    conf = np.zeros((len(idx),) * 2, dtype=np.int64)
    for t, p in zip(np.asarray(y_true), np.asarray(y_pred)):
        if t in idx:
            conf[idx[t], idx[p]] += 1
    return conf.tolist()


#: Central-interval probabilities of :func:`coverage` (and of the reliability diagram).
COVERAGE_LEVELS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)


def coverage(y_true: ArrayLike, mean: ArrayLike, var: ArrayLike,
             levels: tuple[float, ...] = COVERAGE_LEVELS) -> list[float]:
    """Observed fraction of entries inside each central interval of Gaussian predictions.

    A calibrated prediction puts a fraction ``p`` of the truths inside its central ``p`` interval
    ``mean +- z_p sqrt(var)``, ``z_p = Phi^{-1}((1 + p) / 2)``: observed against expected is the
    reliability diagram.

    Parameters
    ----------
    y_true, mean : array_like, shape (m,) or (m, k)
    var : array_like, broadcastable to ``mean``
        Predictive variance of the observations (latent plus noise).
    levels : tuple of float
        Probabilities in (0, 1).

    Returns
    -------
    list of float, one per level
    """
    from scipy.special import ndtri

    err = np.abs(np.asarray(mean, dtype=np.float64) - np.asarray(y_true, dtype=np.float64))
    sd = np.broadcast_to(np.sqrt(np.asarray(var, dtype=np.float64)), err.shape)
    return [float(np.mean(err <= ndtri(0.5 + 0.5 * p) * sd)) for p in levels]
