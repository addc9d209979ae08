"""The dense twin of CG: one Cholesky factorisation of ``K + noise I`` (float64), with the one
piece of advice every caller gives when ``K + noise I`` is not positive definite.

Every in-memory path (solve up to its direct size, the sweep, the estimators, SLQ's exact
log-determinant) factors here, so a failure reads the same everywhere.
"""

from __future__ import annotations

import math
from typing import Any, Literal, TypeVar, overload

import numpy as np
import scipy.linalg
from numpy.typing import ArrayLike, NDArray

from .._blas import SYRK_MAX_N
from .cg import check_rhs

__all__ = ["POTRF_MAX_N", "cholesky_factor", "cholesky_in_place", "dense_solve", "positive_definite_advice"]

_Float = TypeVar("_Float", NDArray[np.float64], NDArray[np.float32])

#: The largest order handed to one LAPACK ``potrf`` call; larger matrices are factorised in blocks
#: of this order (OpenBLAS's parallel ``potrf`` overruns a buffer above it: :mod:`nngp_dask._blas`).
POTRF_MAX_N = SYRK_MAX_N
#: Rows of the strips the blocked factorisation solves and updates at a time (its scratch)
_STRIP = 2048


def _check_noise(noise: Any) -> float:
    if isinstance(noise, bool) or not isinstance(noise, (int, float, np.integer, np.floating)):
        raise ValueError(f"noise: expected a number >= 0, got {noise!r}")
    noise = float(noise)
    if not (math.isfinite(noise) and noise >= 0):
        raise ValueError(f"noise: expected a finite number >= 0, got {noise!r}")
    return noise


def _check_square(k: ArrayLike, name: str = "k") -> NDArray:
    arr = np.asarray(k)
    if arr.ndim != 2 or arr.shape[0] != arr.shape[1] or arr.shape[0] == 0:
        raise ValueError(f"{name}: expected a non-empty square 2-D array (n, n), got shape {arr.shape}")
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"{name}: expected a real numeric array, got dtype {arr.dtype}")
    return arr


def positive_definite_advice(noise: float, detail: str, *, mean_diag: float | None = None) -> str:
    """The one message for a ``K + noise I`` that is not positive definite.

    Every dense path (Cholesky, eigendecomposition) and every caller (solve, the sweep, the
    estimators, SLQ) reports the failure with this text, so the fix reads the same everywhere.

    Parameters
    ----------
    noise : float
        The noise that failed.
    detail : str
        What failed, e.g. the factorisation's own message or the smallest eigenvalue.
    mean_diag : float, optional
        Mean of the kernel diagonal: the suggested noise is at least ``1e-6`` of it.

    Returns
    -------
    str
    """
    floor = (1e-6 * mean_diag if mean_diag is not None else 0.0) or 1e-6
    return (f"k + noise I: expected a positive definite matrix, {detail} with noise={noise:g}. Increase noise "
            f"(the jitter added to the kernel diagonal), e.g. to {max(noise * 10, floor):.3g}, or build the "
            "kernel in float64.")


def cholesky_factor(k: ArrayLike, noise: float, *, overwrite_k: bool = False) -> tuple[NDArray[np.float64], bool]:
    """Cholesky factor of ``k + noise I`` in float64, as :func:`scipy.linalg.cho_factor` returns it.

    The one dense factorisation of the package (solve, predict, the sweep, the estimators, SLQ's
    exact twin all call it).

    Parameters
    ----------
    k : array_like, shape (n, n)
        Symmetric kernel matrix, float32 or float64; not modified (its upper triangle is read),
        unless ``overwrite_k``.
    noise : float
        ``>= 0``, added to the diagonal.
    overwrite_k : bool
        Factorise a C-ordered float64 ``k`` in place (as scipy's ``overwrite_a``): no copy, so
        the peak memory is ``k`` alone; ``c`` is then a view of ``k``. Other ``k`` are copied.

    Returns
    -------
    (c, lower) : (ndarray, shape (n, n), bool)
        ``lower`` is True: the lower triangle of ``c`` holds ``L`` with ``L L^T = k + noise I``
        (the rest of ``c`` is unused).

    Raises
    ------
    numpy.linalg.LinAlgError
        (a ValueError) when ``k + noise I`` is not positive definite, with the fix
        (:func:`positive_definite_advice`).
    ValueError
        When ``k`` is not square, not real or not finite, or ``noise`` is not a number >= 0.
    """
    k_arr = _check_square(k)
    # One float64 copy (or k itself), factorised in place: peak memory is k plus one n x n
    # float64. k is symmetric, so the transpose of the C-ordered copy is the Fortran-ordered one
    # LAPACK wants (a transposing copy took ten times as long).
    in_place = overwrite_k and k_arr.dtype == np.float64 and k_arr.flags.c_contiguous
    a = k_arr.T if in_place else np.array(k_arr, dtype=np.float64).T
    if not np.all(np.isfinite(a)):
        raise ValueError("k: expected finite values, got NaN or Inf")
    noise = _check_noise(noise)
    mean_diag = float(np.mean(np.diagonal(a)))  # for the advice: the factorisation overwrites it
    a[np.diag_indices_from(a)] += noise
    try:
        return cholesky_in_place(a), True
    except np.linalg.LinAlgError as exc:
        raise np.linalg.LinAlgError(
            positive_definite_advice(noise, f"the Cholesky factorisation failed ({exc})", mean_diag=mean_diag)
        ) from exc


def cholesky_in_place(a: _Float) -> _Float:
    """Overwrite the lower triangle of the symmetric positive definite ``a`` with its Cholesky factor.

    One LAPACK ``potrf`` up to :data:`POTRF_MAX_N`; above it, by blocks of that order (a
    right-looking factorisation: ``potrf`` on each diagonal block, triangular solves below it,
    GEMM updates of the blocks right of it, all in place), so OpenBLAS never sees an order its
    threaded ``syrk`` overruns (:mod:`nngp_dask._blas`). Scratch: one diagonal block and a few
    strips of :data:`_STRIP` rows (~0.9 GB at blocks of 8,192).

    Parameters
    ----------
    a : ndarray, shape (n, n), float64 (or float32)
        Fortran-ordered for speed (a C-ordered one works, slower). Only its lower triangle is
        meaningful afterwards, as with :func:`scipy.linalg.cho_factor`.

    Returns
    -------
    ndarray
        The factor in its lower triangle: ``a`` itself, except for a C-ordered ``a`` of at most
        :data:`POTRF_MAX_N` rows, which LAPACK factorises in a Fortran-ordered copy.

    Raises
    ------
    numpy.linalg.LinAlgError
        ``a`` is not positive definite.
    ValueError
        ``a`` is not a square float64 or float32 array (it is overwritten, so it is not converted).
    """
    _check_square(a, "a")
    if a.dtype not in (np.float32, np.float64):
        raise ValueError(f"a: expected a float32 or float64 array (factorised in place), got dtype {a.dtype}")
    n = a.shape[0]
    if n <= POTRF_MAX_N:
        return scipy.linalg.cho_factor(a, lower=True, overwrite_a=True, check_finite=False)[0]
    edges = [(s, min(s + POTRF_MAX_N, n)) for s in range(0, n, POTRF_MAX_N)]
    for k, (c0, c1) in enumerate(edges):
        top = np.array(a[c0:c1, c0:c1], order="F")  # contiguous: factorised in place, then reused below
        try:
            scipy.linalg.cho_factor(top, lower=True, overwrite_a=True, check_finite=False)
        except np.linalg.LinAlgError as exc:
            raise np.linalg.LinAlgError(f"{exc} (in the diagonal block of rows {c0}-{c1 - 1})") from None
        a[c0:c1, c0:c1] = top
        for r0 in range(c1, n, _STRIP):
            r1 = min(r0 + _STRIP, n)
            a[r0:r1, c0:c1] = scipy.linalg.solve_triangular(top, a[r0:r1, c0:c1].T, lower=True,
                                                            check_finite=False).T
        del top
        for j0, j1 in edges[k + 1:]:
            for r0 in range(j0, n, _STRIP):
                r1 = min(r0 + _STRIP, n)
                a[r0:r1, j0:j1] -= a[r0:r1, c0:c1] @ a[j0:j1, c0:c1].T
    return a


@overload
def dense_solve(k: ArrayLike, b: ArrayLike, noise: float, *, return_logdet: Literal[False] = ...
                ) -> NDArray[np.float64]: ...
@overload
def dense_solve(k: ArrayLike, b: ArrayLike, noise: float, *, return_logdet: Literal[True]
                ) -> tuple[NDArray[np.float64], float]: ...
@overload
def dense_solve(k: ArrayLike, b: ArrayLike, noise: float, *, return_logdet: bool
                ) -> NDArray[np.float64] | tuple[NDArray[np.float64], float]: ...


def dense_solve(k: ArrayLike, b: ArrayLike, noise: float, *, return_logdet: bool = False
                ) -> NDArray[np.float64] | tuple[NDArray[np.float64], float]:
    """Direct solve ``(k + noise I)^{-1} b`` by Cholesky, float64: the in-memory twin of CG.

    Parameters
    ----------
    k : array_like, shape (n, n)
        Symmetric kernel matrix (its upper triangle is read).
    b : array_like, shape (n,) or (n, m)
    noise : float
        ``>= 0``, added to the diagonal.
    return_logdet : bool
        Also return ``log det(k + noise I)`` (free from the same factor).

    Returns
    -------
    x : ndarray, shape of ``b``
    logdet : float, only with ``return_logdet``

    Raises
    ------
    numpy.linalg.LinAlgError
        (a ValueError) when the factorisation fails, advising to increase ``noise``.
    """
    factor = cholesky_factor(k, noise)
    b_arr = check_rhs(b)
    n = factor[0].shape[0]
    if b_arr.shape[0] != n:
        raise ValueError(f"b: expected {n} rows (the size of k), got shape {b_arr.shape}")
    x = scipy.linalg.cho_solve(factor, b_arr, check_finite=False)
    if return_logdet:
        return x, float(2.0 * np.sum(np.log(np.diag(factor[0]))))
    return x
