"""Classification as regression: class labels to one-hot targets and posterior means back to labels.

Lee et al. (2018) regress zero-mean one-hot targets and predict the class of the largest
posterior mean. The one encoding here is theirs: ``1 - 1/C`` for the true class and ``-1/C``
for the others (0.9 / -0.1 for the C = 10 classes of MNIST and CIFAR-10), or plain 1 / 0 on
request. The shift is the same for every class, so both encodings predict the same classes;
RMSE, NLPD and the marginal likelihood differ.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = ["TARGETS", "class_index", "encode_labels", "one_hot_targets", "predict_labels"]

#: target encodings: "centered" (1 - 1/C, -1/C) and "onehot" (1, 0)
TARGETS: tuple[str, ...] = ("centered", "onehot")


def _levels(n_classes: int, targets: str) -> tuple[float, float]:
    if targets not in TARGETS:
        raise ValueError(f"targets: expected one of {list(TARGETS)}, got {targets!r}")
    return (1.0 - 1.0 / n_classes, -1.0 / n_classes) if targets == "centered" else (1.0, 0.0)


def one_hot_targets(index: NDArray[np.intp], n_classes: int, targets: str = "centered") -> NDArray[np.float64]:
    """Regression targets of a classification.

    Parameters
    ----------
    index : ndarray of int, shape (n,)
        Class index of each point, in ``[0, n_classes)``.
    n_classes : int
        ``C``.
    targets : {"centered", "onehot"}
        ``"centered"``: ``1 - 1/C`` for the true class and ``-1/C`` for the others (zero-mean
        rows; Lee et al. 2018); ``"onehot"``: 1 / 0.

    Returns
    -------
    ndarray, shape (n, n_classes), float64
    """
    hi, lo = _levels(n_classes, targets)
    index = np.asarray(index)
    y = np.full((index.shape[0], n_classes), lo)
    y[np.arange(index.shape[0]), index] = hi
    return y


def class_index(labels: ArrayLike, classes: NDArray) -> NDArray[np.intp]:
    """Position of each label in the sorted ``classes``; -1 for a label that is not one of them.

    Parameters
    ----------
    labels : array_like, shape (n,)
    classes : ndarray, shape (C,)
        Sorted, unique (``numpy.unique`` of the training labels).

    Returns
    -------
    ndarray of intp, shape (n,)
    """
    labels = np.asarray(labels)
    pos = np.clip(np.searchsorted(classes, labels), 0, classes.size - 1)
    return np.where(classes[pos] == labels, pos, -1).astype(np.intp)


def encode_labels(labels: ArrayLike, classes: NDArray, targets: str = "centered"
                  ) -> tuple[NDArray[np.intp], NDArray[np.float64]]:
    """Class indices and regression targets of labels; an unseen label's row is all "other class".

    Parameters
    ----------
    labels : array_like, shape (n,)
    classes : ndarray, shape (C,)
        Sorted, unique.
    targets : {"centered", "onehot"}

    Returns
    -------
    index : ndarray of intp, shape (n,)
        :func:`class_index` (-1 for labels not in ``classes``).
    y : ndarray, shape (n, C)
        :func:`one_hot_targets`; a label outside ``classes`` matches no class (its row is
        ``-1/C``, or 0 with ``"onehot"``), so it counts as an error, not as some other class.
    """
    index = class_index(labels, classes)
    y = one_hot_targets(np.maximum(index, 0), classes.size, targets)
    y[index < 0] = _levels(classes.size, targets)[1]
    return index, y


def predict_labels(scores: NDArray, classes: NDArray) -> NDArray:
    """The class of the largest posterior mean per row.

    Parameters
    ----------
    scores : ndarray, shape (m, C)
        Posterior means of the class targets.
    classes : ndarray, shape (C,)

    Returns
    -------
    ndarray, shape (m,), of the dtype of ``classes``
    """
    return classes[np.argmax(scores, axis=1)]
