"""Compiled products of one stored tile with thin float64 blocks (private).

CG multiplies every upper tile K_IJ by V twice: ``K_IJ V_J`` into block I and ``K_IJ^T V_I``
into block J. Converting a float32 tile to float64 and calling BLAS twice moves three times the
tile's bytes through memory and runs at a third of the speed of NumPy's float32 product. Here
each tile row is read once, widened to float64 in registers, and used for both products while
it is in L1: the cost of a float32 GEMV pass with float64 accumulation, which CG needs (float32
accumulation makes the operator nonlinear and CG diverges on MNIST kernels).

The vectors are transposed, (k, n), so the loop over a tile row is contiguous in the tile, in V
and in the output; four rows at a time amortise each load and store of the output row. Only
reassociation and contraction are allowed (so LLVM vectorises the row sums); NaN and Inf
propagate as in IEEE arithmetic.
"""

from __future__ import annotations

import numpy as np
from numba import njit
from numpy.typing import NDArray

__all__ = ["expand_add_t", "factor_products", "project_t", "tile_matmat_t"]

_FAST = {"reassoc", "contract", "nsz", "arcp"}


@njit(cache=True, nogil=True, fastmath=_FAST)
def _kernel(k, v_t, out_t, r0, c0, rows, columns, scale):  # pragma: no cover - compiled
    # rows:    out_t[t, r0 + r] += scale * k[r, :] . v_t[t, c0:c0 + b]
    # columns: out_t[t, c0 + c] += scale * k[:, c] . v_t[t, r0:r0 + a]
    # Loops run over 1-D row views (k[r], v_t[t][c0:c0 + b]): indexing the 2-D arrays with
    # offsets inside the loop stops LLVM vectorising it (4x slower, measured).
    a, b = k.shape
    nrhs = v_t.shape[0]
    r = 0
    while r < a:
        n_rows = min(4, a - r)
        g = r0 + r
        k0r = k[r]
        k1r = k[r + 1] if n_rows > 1 else k0r  # duplicates of row r stand in for missing rows;
        k2r = k[r + 2] if n_rows > 2 else k0r  # their sums are discarded and their weights are 0
        k3r = k[r + 3] if n_rows > 3 else k0r
        for t in range(nrhs):
            vt = v_t[t]
            ot = out_t[t]
            s0 = 0.0
            s1 = 0.0
            s2 = 0.0
            s3 = 0.0
            if columns:
                oc = ot[c0:c0 + b]
                w0 = scale * vt[g]
                w1 = scale * vt[g + 1] if n_rows > 1 else 0.0
                w2 = scale * vt[g + 2] if n_rows > 2 else 0.0
                w3 = scale * vt[g + 3] if n_rows > 3 else 0.0
                if rows:
                    vc = vt[c0:c0 + b]
                    for c in range(b):
                        k0 = np.float64(k0r[c])
                        k1 = np.float64(k1r[c])
                        k2 = np.float64(k2r[c])
                        k3 = np.float64(k3r[c])
                        x = vc[c]
                        s0 += k0 * x
                        s1 += k1 * x
                        s2 += k2 * x
                        s3 += k3 * x
                        oc[c] += k0 * w0 + k1 * w1 + k2 * w2 + k3 * w3
                else:
                    for c in range(b):
                        oc[c] += (np.float64(k0r[c]) * w0 + np.float64(k1r[c]) * w1
                                  + np.float64(k2r[c]) * w2 + np.float64(k3r[c]) * w3)
            else:
                vc = vt[c0:c0 + b]
                for c in range(b):
                    x = vc[c]
                    s0 += np.float64(k0r[c]) * x
                    s1 += np.float64(k1r[c]) * x
                    s2 += np.float64(k2r[c]) * x
                    s3 += np.float64(k3r[c]) * x
            if rows:
                ot[g] += scale * s0
                if n_rows > 1:
                    ot[g + 1] += scale * s1
                if n_rows > 2:
                    ot[g + 2] += scale * s2
                if n_rows > 3:
                    ot[g + 3] += scale * s3
        r += n_rows


def tile_matmat_t(k: NDArray, v_t: NDArray[np.float64], out_t: NDArray[np.float64], rows: int, cols: int, *,
                  transpose_too: bool, offset: float = 0.0, scale: float = 1.0) -> None:
    """Accumulate one tile's products into ``out_t``, in float64, reading the tile once.

    With the tile ``K = offset + scale * k`` at rows ``rows:rows+a`` and columns ``cols:cols+b``
    of the full matrix, ``out_t[:, rows:rows+a] += (K @ v_t[:, cols:cols+b].T).T`` and, with
    ``transpose_too`` (an off-diagonal tile of a symmetric matrix), also
    ``out_t[:, cols:cols+b] += (K.T @ v_t[:, rows:rows+a].T).T``.

    A quantised tile (int16 ``k`` with its ``offset`` and ``scale``) is never widened in memory:
    ``K v = scale (k v) + offset (sum of v)``, the first term in the compiled pass (the scale
    applied to each row's sum and to the vectors' entries, not to the tile's), the second a sum
    over the vectors.

    Parameters
    ----------
    k : ndarray, shape (a, b)
        The tile, float32, float64 or int16.
    v_t : ndarray, shape (nrhs, n), float64, C-contiguous
        The vectors, transposed.
    out_t : ndarray, shape (nrhs, n), float64, C-contiguous
        Updated in place.
    rows, cols : int
        The tile's offsets in the full matrix.
    transpose_too : bool
    offset, scale : float
        What ``k`` stands for (:class:`~nngp_dask.store.PackedTile`).
    """
    if not (v_t.flags.c_contiguous and out_t.flags.c_contiguous):
        raise ValueError("v_t, out_t: non-contiguous; expected C-contiguous (nrhs, n) float64 arrays")
    _kernel(np.ascontiguousarray(k), v_t, out_t, rows, cols, True, transpose_too, float(scale))
    if offset:
        a, b = k.shape
        out_t[:, rows:rows + a] += offset * v_t[:, cols:cols + b].sum(axis=1, keepdims=True)
        if transpose_too:
            out_t[:, cols:cols + b] += offset * v_t[:, rows:rows + a].sum(axis=1, keepdims=True)


def _row_spans(n: int, threads: int) -> list[tuple[int, int]]:
    bounds = np.linspace(0, n, max(1, threads) + 1).astype(np.int64)
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def project_t(f: NDArray, r_t: NDArray[np.float64], *, first: int = 0, threads: int = 2) -> NDArray[np.float64]:
    """``(F^T R)^T``, shape (m, r), in float64, for a float32 (or float64) factor ``F`` (n, r) and
    the vectors ``R`` = rows ``first:first + n`` of ``r_t.T`` (``r_t`` (m, n'), the vectors
    transposed). One pass over ``F``, its rows split over ``threads`` threads (the compiled loops
    release the GIL). No BLAS: OpenBLAS's threads spin on for a while after a call and would take
    the cores from the compiled loops (and from the workers' tile products) that follow."""
    from concurrent.futures import ThreadPoolExecutor

    if not (f.flags.c_contiguous and r_t.flags.c_contiguous):
        raise ValueError("f, r_t: non-contiguous; expected C-contiguous arrays")
    spans = _row_spans(f.shape[0], threads)
    parts = [np.zeros((r_t.shape[0], f.shape[1])) for _ in spans]
    with ThreadPoolExecutor(max(1, len(spans))) as pool:
        # the tile kernel's column sums, weights from r_t
        list(pool.map(lambda k: _kernel(f[spans[k][0]:spans[k][1]], r_t, parts[k], first + spans[k][0], 0, False,
                                        True, 1.0), range(len(spans))))
    c_t = parts[0] if parts else np.zeros((r_t.shape[0], f.shape[1]))
    for p in parts[1:]:
        c_t += p
    return c_t


def expand_add_t(f: NDArray, c_t: NDArray[np.float64], out_t: NDArray[np.float64], *, first: int = 0,
                 threads: int = 2) -> None:
    """``out_t[:, first:first + n] += (F C)^T`` for a float32 (or float64) factor ``F`` (n, r) and
    ``c_t`` = ``C^T`` (m, r), in float64: one pass over ``F`` (the tile kernel's row sums), its
    rows split over ``threads`` threads."""
    from concurrent.futures import ThreadPoolExecutor

    if not (f.flags.c_contiguous and c_t.flags.c_contiguous and out_t.flags.c_contiguous):
        raise ValueError("f, c_t, out_t: non-contiguous; expected C-contiguous arrays")
    spans = _row_spans(f.shape[0], threads)
    with ThreadPoolExecutor(max(1, len(spans))) as pool:
        list(pool.map(lambda k: _kernel(f[spans[k][0]:spans[k][1]], c_t, out_t, first + spans[k][0], 0, True, False,
                                        1.0), range(len(spans))))


def factor_products(f: NDArray, r_t: NDArray[np.float64], coef: NDArray[np.float64], out_t: NDArray[np.float64],
                    *, threads: int = 2) -> None:
    """``out_t += (F diag(coef) F^T R)^T`` for a float32 (or float64) factor ``F``, in float64.

    Each of the two passes (:func:`project_t`, :func:`expand_add_t`) reads ``F`` once and widens
    it in registers, so a float32 factor costs half the memory traffic of a float64 one and no
    float64 copy is ever made; they are the tile products' loops (four rows at a time, so each
    output row is loaded and stored once per four factor rows: 1.55x faster than one row at a
    time, RESULTS.md section 21).

    Parameters
    ----------
    f : ndarray, shape (n, r), C-contiguous
    r_t : ndarray, shape (m, n), float64, C-contiguous
        The vectors, transposed.
    coef : ndarray, shape (r,), float64
    out_t : ndarray, shape (m, n), float64, C-contiguous
        Updated in place.
    threads : int
    """
    if not (f.flags.c_contiguous and r_t.flags.c_contiguous and out_t.flags.c_contiguous):
        raise ValueError("f, r_t, out_t: non-contiguous; expected C-contiguous arrays")
    c_t = project_t(f, r_t, threads=threads)
    c_t *= coef[None, :]
    expand_add_t(f, c_t, out_t, threads=threads)
