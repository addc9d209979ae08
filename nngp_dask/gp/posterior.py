"""The GP posterior at test points: one mean and one latent variance for every caller.

For training inputs ``X`` with kernel ``K``, noise variance ``noise`` and ``alpha = (K + noise I)^{-1} Y``,
the posterior of the latent function at test inputs ``X*`` is (Rasmussen & Williams 2006, eqs. 2.25-2.26)

    mean = K(X*, X) alpha
    var  = diag K(X*, X*) - diag(K(X*, X) (K + noise I)^{-1} K(X, X*))

The variance's reduction term can come from a Cholesky factor, from solved vectors (CG, or
any solver), from an eigendecomposition of ``K`` or from a low-rank factor of it; each is
one function here, and :func:`nngp_dask.gp.predict`, the sweep and the estimators call them.
Pure functions on arrays: they know nothing of tiles, stores or Dask, so a streamed caller
calls them once per block of test points.

Every variance is clipped at 0: rounding can take ``prior - reduction`` a little below zero
where the posterior is nearly certain, and a negative variance would poison every log density.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg
from numpy.typing import ArrayLike, NDArray

__all__ = ["posterior_mean", "variance_from_cholesky", "variance_from_eigh", "variance_from_reduction",
           "variance_from_solve", "variance_lowrank"]


def posterior_mean(k_cross: ArrayLike, alpha: ArrayLike) -> NDArray[np.float64]:
    """``K(X*, X) alpha``.

    Parameters
    ----------
    k_cross : array_like, shape (m, n)
        Test x train kernel block (any float dtype; multiplied in float64).
    alpha : array_like, shape (n, k)
        ``(K + noise I)^{-1} Y``.

    Returns
    -------
    ndarray, shape (m, k)
    """
    return np.asarray(k_cross, dtype=np.float64) @ np.asarray(alpha, dtype=np.float64)


def variance_from_solve(prior: ArrayLike, k_cross_t: NDArray, solved: NDArray) -> NDArray[np.float64]:
    """Latent variance from solved vectors: ``prior - sum_i k*_i s_i`` per test point.

    Parameters
    ----------
    prior : array_like, shape (m,)
        ``K(x*, x*)`` for each test point.
    k_cross_t : ndarray, shape (n, m)
        ``K(X, X*)``: one column per test point.
    solved : ndarray, shape (n, m)
        ``(K + noise I)^{-1} K(X, X*)`` (from CG, a Cholesky factor or :func:`nngp_dask.gp.solve`).

    Returns
    -------
    ndarray, shape (m,), clipped at 0
    """
    return np.maximum(np.asarray(prior, dtype=np.float64) - np.einsum("ij,ij->j", k_cross_t, solved), 0.0)


def variance_from_cholesky(prior: ArrayLike, k_cross_t: NDArray, lower: NDArray) -> NDArray[np.float64]:
    """Latent variance from the Cholesky factor ``L L^T = K + noise I``: ``prior - ||L^{-1} k*||^2``.

    One triangular solve per block (half the work of solving with ``L L^T``).

    Parameters
    ----------
    prior : array_like, shape (m,)
    k_cross_t : ndarray, shape (n, m)
        ``K(X, X*)``.
    lower : ndarray, shape (n, n)
        ``L`` in its lower triangle (the rest is not read), as
        :func:`nngp_dask.linalg.dense.cholesky_factor` returns it.

    Returns
    -------
    ndarray, shape (m,), clipped at 0
    """
    v = scipy.linalg.solve_triangular(lower, k_cross_t, lower=True, check_finite=False)
    return variance_from_reduction(prior, np.einsum("ij,ij->j", v, v))


def variance_from_reduction(prior: ArrayLike, reduction: ArrayLike) -> NDArray[np.float64]:
    """``prior - reduction``, clipped at 0: the last step of every exact variance here.

    Parameters
    ----------
    prior : array_like, shape (m,)
    reduction : array_like, shape (m,)
        ``k*^T (K + noise I)^{-1} k*`` per test point (e.g. ``||L^{-1} k*||^2`` from an
        out-of-core factor, :mod:`nngp_dask.gp.tiled_variance`).

    Returns
    -------
    ndarray, shape (m,)
    """
    return np.maximum(np.asarray(prior, dtype=np.float64) - np.asarray(reduction, dtype=np.float64), 0.0)


def variance_from_eigh(prior: ArrayLike, k_cross_u: NDArray, weights: NDArray) -> NDArray[np.float64]:
    """Latent variance from ``K = U diag(lambda) U^T``: ``prior - sum_j (k*^T u_j)^2 / (lambda_j + noise)``.

    Parameters
    ----------
    prior : array_like, shape (m,)
    k_cross_u : ndarray, shape (m, n)
        ``K(X*, X) U``, computed once for every noise.
    weights : ndarray, shape (n,)
        ``1 / (lambda + noise)``.

    Returns
    -------
    ndarray, shape (m,), clipped at 0
    """
    return np.maximum(np.asarray(prior, dtype=np.float64) - (k_cross_u * k_cross_u) @ weights, 0.0)


def variance_lowrank(prior: ArrayLike, projections: NDArray, factor: NDArray, noise: float) -> NDArray[np.float64]:
    """Latent variance with ``K`` replaced by a low-rank factor ``F F^T`` (orthogonal columns).

    Projects ``k*`` on the span of ``F = U diag(s)``:
    ``k^T (K + noise I)^{-1} k ~= sum_i (u_i^T k)^2 / (s_i^2 + noise)`` with
    ``u_i^T k = (f_i^T k) / s_i``. Cheap, but not a bound: the factor's own error can push
    the reduction either way, and on kin40k some variances come out 0 (median error 70 %,
    benchmarks/RESULTS.md section 12); ``predict(variance="dense")`` is exact up to 16,384 points.

    Parameters
    ----------
    prior : array_like, shape (m,)
    projections : ndarray, shape (m, r)
        ``K(X*, X) F``.
    factor : ndarray, shape (n, r)
        ``F`` (columns of zero norm are skipped).
    noise : float

    Returns
    -------
    ndarray, shape (m,), clipped at 0
    """
    s2 = np.sum(factor * factor, axis=0)
    keep = s2 > 0
    reduction = np.sum(projections[:, keep] ** 2 / (s2[keep] * (s2[keep] + noise)), axis=1)
    return np.maximum(np.asarray(prior, dtype=np.float64) - reduction, 0.0)
