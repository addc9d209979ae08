"""A Cholesky factorisation of ``K + noise I`` one block column (panel) at a time, for matrices
whose factor does not fit in memory.

Left-looking: panel ``j`` (rows ``c0:``, columns ``c0:c1``) is read from ``K``, updated with every
earlier panel of the factor (one GEMM each), then factorised (``potrf`` on its top block, a
triangular solve below it) and handed to ``save``. Only two panels are in memory at a time
(``2 n w`` floats), the earlier ones come back through ``load``; the caller decides where they
live (scratch files for :func:`nngp_dask.gp.predict`, a list in the tests). ``n^3 / 3`` flops,
like the dense factorisation, in GEMMs of ``(n - c0) x w x w``.

:func:`forward_sum_squares` then gives ``||L^{-1} b||^2`` per column of ``b`` in one pass over
the panels: the reduction term of the GP's latent variance (:func:`nngp_dask.gp.posterior`).
Pure functions: the kernel's panels and the factor's come and go through callables.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import scipy.linalg
from numpy.typing import NDArray

from .dense import cholesky_in_place, positive_definite_advice

__all__ = ["blocked_cholesky", "forward_sum_squares", "panel_bounds"]


def panel_bounds(n: int, width: int) -> Iterator[tuple[int, int]]:
    """``(c0, c1)`` of each panel of ``width`` columns (the last one ragged)."""
    return ((c0, min(c0 + width, n)) for c0 in range(0, n, width))


def blocked_cholesky(
    kernel_panel: Callable[[int, int], NDArray],
    n: int,
    width: int,
    noise: float,
    save: Callable[[int, NDArray], None],
    load: Callable[[int, int], NDArray],
    *,
    dtype: type[np.floating] = np.float64,
    beat: Callable[[int], None] | None = None,
) -> float:
    """Factorise ``K + noise I = L L^T`` panel by panel; return ``log det(K + noise I)``.

    Parameters
    ----------
    kernel_panel : callable ``(c0, c1) -> ndarray, shape (n - c0, c1 - c0)``
        ``K[c0:, c0:c1]`` (any float dtype; updated in ``dtype``).
    n, width : int
        Order of ``K``; panel width (the last panel is ragged).
    noise : float
        Added to the diagonal.
    save : callable ``(j, panel)``
        Keeps panel ``j`` of ``L``: ``L[c0:, c0:c1]`` (``dtype``, its top block lower triangular).
    load : callable ``(j, row0) -> ndarray``
        Rows ``row0:`` (of the whole matrix) of a saved panel ``j``.
    dtype : {numpy.float64, numpy.float32}
        The precision of the updates and of the factor (the log-determinant is summed in float64).
    beat : callable ``(columns_done)``, optional
        Called after each panel.

    Raises
    ------
    numpy.linalg.LinAlgError
        ``K + noise I`` is not positive definite (with the package's one piece of advice).
    ValueError
        ``dtype`` is neither float64 nor float32 (before any panel is read).
    """
    if np.dtype(dtype) not in (np.float32, np.float64):
        raise ValueError(f"dtype: expected numpy.float64 or numpy.float32, got {dtype!r}")
    logdet = 0.0
    bounds = list(panel_bounds(n, width))
    for j, (c0, c1) in enumerate(bounds):
        panel = np.array(kernel_panel(c0, c1), dtype=dtype)
        for k in range(j):
            earlier = load(k, c0)  # L[c0:, block k]
            panel -= earlier @ earlier[:c1 - c0].T
        top = panel[:c1 - c0]
        top[np.diag_indices_from(top)] += noise
        try:
            top[:] = np.tril(cholesky_in_place(np.array(top, order="F")))
        except np.linalg.LinAlgError as exc:
            raise np.linalg.LinAlgError(positive_definite_advice(
                noise, f"the factorisation failed in columns {c0}-{c1 - 1} ({exc})")) from None
        if c1 < n:
            panel[c1 - c0:] = scipy.linalg.solve_triangular(top, panel[c1 - c0:].T, lower=True,
                                                            check_finite=False).T
        logdet += 2.0 * float(np.log(np.diagonal(top), dtype=np.float64).sum())
        save(j, panel)
        if beat is not None:
            beat(c1)
    return logdet


def forward_sum_squares(rhs: NDArray, n: int, width: int, load: Callable[[int, int], NDArray]) -> NDArray[np.float64]:
    """``||L^{-1} b||^2`` for each column ``b`` of ``rhs``, one pass over the saved panels.

    Parameters
    ----------
    rhs : ndarray, shape (n, m)
        Overwritten (it holds the forward substitution's running right-hand side); of the
        panels' dtype, in which the substitution runs (the sums of squares are float64).
    n, width : int
        As given to :func:`blocked_cholesky`.
    load : callable ``(j, row0) -> ndarray``
        As given to :func:`blocked_cholesky`.

    Returns
    -------
    ndarray, shape (m,)
    """
    total = np.zeros(rhs.shape[1])
    for j, (c0, c1) in enumerate(panel_bounds(n, width)):
        panel = load(j, c0)
        w = scipy.linalg.solve_triangular(panel[:c1 - c0], rhs[c0:c1], lower=True, check_finite=False)
        total += np.einsum("ij,ij->j", w, w, dtype=np.float64)
        if c1 < n:
            rhs[c1:] -= panel[c1 - c0:] @ w
    return total
