"""Input validation and per-example normalisation (the boundary of the kernel core)."""

from __future__ import annotations

from typing import Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = ["NORMALIZATIONS", "check_inputs", "normalize", "first_nonfinite_row", "nonfinite_message", "InputError"]

Normalization = Literal["none", "unit_norm", "standardize"]
NORMALIZATIONS: tuple[str, ...] = ("none", "unit_norm", "standardize")


class InputError(ValueError):
    """Inputs that cannot be used (wrong shape, type, or non-finite values)."""


def first_nonfinite_row(x: NDArray) -> int | None:
    """Index of the first row holding NaN or Inf, or None."""
    bad = ~np.isfinite(x).all(axis=tuple(range(1, x.ndim)))
    return int(np.argmax(bad)) if bad.any() else None


def nonfinite_message(x: NDArray, name: str, *, row_offset: int = 0, what: str = "values") -> str | None:
    """``"x: row 17 holds NaN or Inf (nan at column 2); expected finite values"`` for the first
    non-finite entry of ``x`` (rows counted from ``row_offset``), or None when all are finite."""
    row = first_nonfinite_row(x)
    if row is None:
        return None
    flat = np.asarray(x[row]).ravel()
    col = int(np.argmax(~np.isfinite(flat)))
    at = f" at column {col}" if np.ndim(x) > 1 else ""
    return f"{name}: row {row + row_offset} holds NaN or Inf ({float(flat[col])!r}{at}); expected finite {what}"


def check_inputs(x: ArrayLike, name: str = "x", *, features: int | None = None, row_offset: int = 0) -> NDArray:
    """Validate a block of inputs: 2-D, numeric, non-empty, finite, ``features`` columns.

    Parameters
    ----------
    x : array_like, shape (n, d)
    name : str
        Name used in error messages.
    features : int, optional
        Required number of columns (to match the other side of a kernel).
    row_offset : int
        Added to row indices in error messages (for chunked ingestion).

    Returns
    -------
    ndarray
        ``x`` as a floating-point array (float64 unless already float32/float64).

    Raises
    ------
    InputError
        Naming the field, the value received and what was expected.
    """
    arr = np.asarray(x)
    if arr.dtype.kind not in "biuf":
        raise InputError(f"{name}: expected a numeric array, got dtype {arr.dtype}")
    if arr.ndim != 2:
        raise InputError(f"{name}: expected a 2-D array (n_samples, n_features), got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise InputError(f"{name}: expected a non-empty array, got shape {arr.shape}")
    if features is not None and arr.shape[1] != features:
        raise InputError(f"{name}: expected {features} features (as the training inputs), got {arr.shape[1]}")
    if arr.dtype.kind != "f":
        arr = arr.astype(np.float64)
    bad = nonfinite_message(arr, name, row_offset=row_offset)
    if bad is not None:
        raise InputError(bad)
    return arr


def normalize(x: NDArray, method: Normalization | str = "none") -> NDArray:
    """Per-example normalisation, applied identically to training and test inputs.

    ``"none"``
        unchanged;
    ``"unit_norm"``
        each example scaled to ``||x||^2 = d`` so that ``<x, x> / d = 1`` (Lee et al. 2018
        normalise every example to a common norm; with the ``weight_var / d`` input layer
        this keeps ``K^0`` independent of the dimension). Zero rows stay zero;
    ``"standardize"``
        each example shifted to mean 0 and scaled to variance 1 (so also ``<x, x> / d = 1``).
        Constant rows become zero.

    Raises :class:`InputError` naming the row and column of the first NaN or Inf (checked before
    normalising, which would otherwise hide it in a row of zeros).
    """
    if method not in NORMALIZATIONS:
        raise InputError(f"normalization: expected one of {list(NORMALIZATIONS)}, got {method!r}")
    if method == "none":
        return x
    x = np.asarray(x, dtype=np.float64)
    # before normalising: a NaN or Inf would otherwise turn its whole row into zeros, silently
    bad = nonfinite_message(x, "x")
    if bad is not None:
        raise InputError(bad)
    keep = np.ones((len(x), 1), dtype=bool)
    if method == "standardize":
        # a constant row is zero after centring only up to rounding (its mean need not be its
        # value exactly); dividing that residue by its tiny norm would make a row of +-1 noise
        keep = np.ptp(x, axis=1, keepdims=True) > 0
        x = x - x.mean(axis=1, keepdims=True)
    norm = np.sqrt((x * x).mean(axis=1, keepdims=True))
    return np.divide(x, norm, out=np.zeros_like(x), where=keep & (norm > 0))
