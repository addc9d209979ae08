"""A prediction scored: targets as regressed and mapped back, accuracy or RMSE, and the
predictive distribution's NLPD and interval coverage (with the fitted amplitude and as built)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..gp import COVERAGE_LEVELS, accuracy, confusion_matrix, coverage, encode_labels, nlpd, predict_labels, rmse
from .datasets import Dataset

__all__ = ["Targets", "evaluate", "targets_of"]


@dataclass
class Targets:
    """Regression targets as solved (standardised, or one-hot for classification) and how to map
    predictions back."""

    y_train: np.ndarray
    classes: np.ndarray | None
    mean: float = 0.0
    scale: float = 1.0


def targets_of(ds: Dataset, task: str) -> Targets:
    """The dataset's training targets as the GP regresses them."""
    if task == "classification":
        labels = np.asarray(ds.y_train).astype(np.int64).ravel()
        classes = np.unique(labels)
        return Targets(encode_labels(labels, classes)[1], classes)
    y = np.asarray(ds.y_train, dtype=np.float64).ravel()
    mean, scale = float(y.mean()), float(y.std()) or 1.0
    return Targets((y - mean) / scale, None, mean, scale)


def _uncertainty(truth: np.ndarray, mu: np.ndarray, var: np.ndarray, noise: float, unit: float,
                 amplitude: float | None) -> dict[str, Any]:
    """NLPD and interval coverage of the predictive distribution ``N(mu, s (var + noise) unit)``,
    ``s`` the fitted amplitude (1 with ``amplitude`` None), and as built (``s = 1``) beside it;
    ``noise_variance`` is the observation noise ``s noise unit`` in the targets' units."""
    v = (var + noise) * unit
    v = v[:, None] if mu.ndim == 2 else v
    s = 1.0 if amplitude is None else float(amplitude)
    # the noise in the targets' units: the kernel's own scale is free, so solver.noise alone reads oddly
    out = {"nlpd": nlpd(truth, mu, s * v), "coverage": {"levels": list(COVERAGE_LEVELS),
                                                       "observed": coverage(truth, mu, s * v)},
           "noise_variance": s * noise * unit}
    if amplitude is not None:
        out |= {"amplitude": s, "nlpd_unfitted": nlpd(truth, mu, v), "coverage_unfitted": coverage(truth, mu, v)}
    return out


def evaluate(task: str, y_test: np.ndarray, mean: np.ndarray, var: np.ndarray | None, noise: float,
             targets: Targets, amplitude: float | None = None) -> dict[str, Any]:
    """Metrics of a prediction: accuracy and confusion (classification); RMSE and standardised RMSE
    (regression, in the targets' original units). With ``var``, also the mean negative log
    predictive density (NLPD) and the observed coverage of central intervals (classification: of
    the regressed one-hot targets, entry by entry), with the variance scaled by ``amplitude``
    (:func:`nngp_dask.gp.amplitude_mle`; None: unscaled) and, for comparison, unscaled."""
    if task == "classification":
        assert targets.classes is not None  # classification targets carry their classes
        pred = predict_labels(mean, targets.classes)
        truth = np.asarray(y_test).astype(np.int64).ravel()
        out = {"accuracy": accuracy(truth, pred), "errors": int(np.sum(pred != truth)),
               "confusion": confusion_matrix(truth, pred, targets.classes), "classes": targets.classes.tolist()}
        if var is not None:
            out |= _uncertainty(encode_labels(truth, targets.classes)[1], mean, var, noise, 1.0, amplitude)
        return out
    y = np.asarray(y_test, dtype=np.float64).ravel()
    mu = mean.ravel() * targets.scale + targets.mean
    err = rmse(y, mu)
    out = {"rmse": err, "srmse": err / float(np.std(y) or 1.0)}
    if var is not None:
        out |= _uncertainty(y, mu, var, noise, targets.scale ** 2, amplitude)
    return out
