"""Compiled, fused NNGP/NTK recursion (private).

Each row of a block is loaded once into a row buffer, runs through every layer
there (the buffer stays in L1/L2 cache) and is written once: one pass over memory
whatever the depth. Arithmetic is float64 in registers whatever the storage dtype, with strict
IEEE semantics (no fastmath): float32 storage loses only the final rounding.

The per-layer loop over a row is vectorised by LLVM (4 lanes with AVX2), once what stops a
vectoriser is out of it: ``arccos`` and ``arcsin`` are :func:`_acos` and :func:`_asin` (fdlibm's
rational approximation, within 1 and 2 ulp of libm's, whose calls kept the loop scalar), square
roots take arguments LLVM can see are non-negative (otherwise it keeps the libm call, which may
set ``errno``), and the kernels compile with NumPy's error model (Python's model tests every
division for zero).

The closed-form families share one compiled kernel: a closure per family would be simpler to
write but Numba cannot cache closures, and every worker process would then spend ~20 s
compiling. The layer loop branches on the family code inside; LLVM does not unswitch that
branch but if-converts it (every family's dual computed, one selected), so :func:`_layer_row`
also calls the (inlined) loop with the two-slope code as a constant: ReLU and its kin, what most
runs use, then compute only their own dual. The Hermite-series family has its own Horner loop.

Compile once, run anywhere: the compiled kernels take float64 rows only (one specialisation,
whatever the storage dtype: :func:`recurse_block` converts a few rows at a time in and out) and
are serial and ``nogil``: a driver runs blocks of rows on a thread pool, a single-threaded Dask
worker calls them directly. Numba's ``parallel=True`` compiled 2-3x slower, once per dtype, and
its thread pool tied every process to the ``NUMBA_NUM_THREADS`` it first saw. A first run
therefore compiles each kernel once, and every later process loads it from Numba's cache.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np
from numba import njit

from .activations import FAMILY_ERF, FAMILY_HERMITE, FAMILY_STEP, FAMILY_TWO_SLOPE

_INV_TWO_PI = 1.0 / (2.0 * math.pi)
# fdlibm's e_acos.c and e_asin.c (Sun Microsystems, 1993: "Permission to use, copy, modify, and
# distribute this software is freely granted, provided that this notice is preserved"): asin and
# acos from a rational approximation of asin on [0, 1/2], R(z) = P(z) / Q(z), z = x^2 or (1 - |x|) / 2.
_PIO2_HI, _PIO2_LO = 1.57079632679489655800e+00, 6.12323399573676603587e-17
_PS = (1.66666666666666657415e-01, -3.25565818622400915405e-01, 2.01212532134862925881e-01,
       -4.00555345006794114027e-02, 7.91534994289814532176e-04, 3.47933107596021167570e-05)
_QS = (-2.40339491173441421878e+00, 2.02094576023350569471e+00, -6.88283971605453293030e-01,
       7.70381505559019352791e-02)


@njit(cache=True, inline="always", error_model="numpy")
def _asin_reduced(x):
    # (|x| < 1/2, R(z), sqrt(z)). fdlibm's branches are all computed and one is selected (here
    # and in the callers), so that a loop over x vectorises. Without fdlibm's split of sqrt(z)
    # into high and low words for |x| > 1/2 (bit operations), acos is within 1 ulp of libm's and
    # asin within 2 (tests/test_kernel_core.py), where fdlibm's are within 1.
    ax = abs(x)
    small = ax < 0.5
    z_small = x * x
    z_large = (1.0 - ax) * 0.5
    z = z_small if small else z_large
    p = z * (_PS[0] + z * (_PS[1] + z * (_PS[2] + z * (_PS[3] + z * (_PS[4] + z * _PS[5])))))
    q = 1.0 + z * (_QS[0] + z * (_QS[1] + z * (_QS[2] + z * _QS[3])))
    return small, p / q, math.sqrt(abs(z))


@njit(cache=True, inline="always", error_model="numpy")
def _acos(x):
    small, r, s = _asin_reduced(x)
    near_zero = _PIO2_HI - (x - (_PIO2_LO - x * r))
    near_one = 2.0 * (s + s * r)
    near_minus_one = math.pi - 2.0 * (s + (s * r - _PIO2_LO))
    large = near_one if x > 0.0 else near_minus_one
    return near_zero if small else large


@njit(cache=True, inline="always", error_model="numpy")
def _asin(x):
    small, r, s = _asin_reduced(x)
    near_zero = x + x * r
    large = _PIO2_HI - (2.0 * (s + s * r) - _PIO2_LO)
    signed = large if x > 0.0 else -large
    return near_zero if small else signed


# --- scalar dual kernels -----------------------------------------------------------------------
# dual(c, k12, s1, s2, p0, p1) -> (E[phi(u) phi(v)], E[phi'(u) phi'(v)]), where c is the
# correlation already clipped to [-1, 1] (exactly 1 for a point paired with itself, because
# kernels like the step's have a square-root singularity there that would turn rounding in c
# into visible error, layer after layer), s = sqrt(k_ii).


@njit(cache=True, inline="always", error_model="numpy")
def _dual_two_slope(c, k12, s1, s2, p0, p1):
    # a for x < 0, b for x > 0; J(c) = sqrt(1 - c^2) + (pi - theta) c (Cho & Saul 2009).
    aa_bb = p0 * p0 + p1 * p1
    ab2 = 2.0 * p0 * p1
    sin_t = math.sqrt(abs(max(1.0 - c * c, 0.0)))  # abs: see the module's docstring
    theta = _acos(c)
    j_plus = sin_t + (math.pi - theta) * c
    j_minus = sin_t - theta * c
    e = s1 * s2 * (aa_bb * j_plus - ab2 * j_minus) * _INV_TWO_PI
    ed = (aa_bb * (math.pi - theta) + ab2 * theta) * _INV_TWO_PI
    return e, ed


@njit(cache=True, inline="always", error_model="numpy")
def _dual_identity(c, k12, s1, s2, p0, p1):
    return k12, 1.0


@njit(cache=True, inline="always", error_model="numpy")
def _dual_step(c, k12, s1, s2, p0, p1):
    # A point of zero variance has u = 0 exactly and step(0) = 0 (``Step`` is 1[x > 0]), so its
    # row is 0, as in the network; the formula would give the limit from positive variance.
    e = (math.pi - _acos(c)) * _INV_TWO_PI
    return (e if s1 * s2 > 0.0 else 0.0), math.inf


@njit(cache=True, inline="always", error_model="numpy")
def _dual_erf(c, k12, s1, s2, p0, p1):
    # Williams (1998); (1 + 2 k11)(1 + 2 k22) - 4 k12^2 >= 1 by Cauchy-Schwarz.
    d12 = (1.0 + 2.0 * s1 * s1) * (1.0 + 2.0 * s2 * s2)
    arg = min(max(2.0 * k12 / math.sqrt(abs(d12)), -1.0), 1.0)
    rest = max(d12 - 4.0 * k12 * k12, 1.0)
    return (2.0 / math.pi) * _asin(arg), (4.0 / math.pi) / math.sqrt(abs(rest))


@njit(cache=True, inline="always", error_model="numpy")
def _dual(family, c, k12, s1, s2, p0, p1):
    if family == FAMILY_TWO_SLOPE:
        return _dual_two_slope(c, k12, s1, s2, p0, p1)
    if family == FAMILY_ERF:
        return _dual_erf(c, k12, s1, s2, p0, p1)
    if family == FAMILY_STEP:
        return _dual_step(c, k12, s1, s2, p0, p1)
    return _dual_identity(c, k12, s1, s2, p0, p1)


@njit(cache=True, inline="always", error_model="numpy")
def _layer_loop(kb, tb, j0, start, si, ri, s_j, r_j, layer, wv, bv, family, p0, p1, ntk):
    for q in range(start, kb.shape[0]):
        j = j0 + q
        k12 = kb[q]
        c = min(max(k12 * ri * r_j[layer, j], -1.0), 1.0)
        e, ed = _dual(family, c, k12, si, s_j[layer, j], p0, p1)
        k_new = bv + wv * e
        if ntk:
            tb[q] = k_new + wv * tb[q] * ed
        kb[q] = k_new


@njit(cache=True, inline="always", error_model="numpy")
def _layer_row(kb, tb, i, j0, s_i, s_j, r_i, r_j, layer, wv, bv, family, p0, p1, ntk, diagonal):
    si, ri = s_i[layer, i], r_i[layer, i]
    start = 1 if diagonal else 0
    # the two-slope copy computes only its own dual (module docstring); each copy adds ~5 s to
    # the first run's compilation
    if family == FAMILY_TWO_SLOPE:
        _layer_loop(kb, tb, j0, start, si, ri, s_j, r_j, layer, wv, bv, FAMILY_TWO_SLOPE, p0, p1, ntk)
    else:
        _layer_loop(kb, tb, j0, start, si, ri, s_j, r_j, layer, wv, bv, family, p0, p1, ntk)
    if diagonal:
        e, ed = _dual(family, 1.0, si * si, si, si, p0, p1)
        k_new = bv + wv * e
        if ntk:
            tb[0] = k_new + wv * tb[0] * ed
        kb[0] = k_new


@njit(cache=True, error_model="numpy")
def _row(gram, k0_i, ii, i, j0, s_i, s_j, r_i, r_j, depth, w0, wv, bv, family, p0, p1, ntk, all_depths,
         diagonal, out_k, out_t):
    # ii: the row in ``gram`` / ``out_*`` (a block of rows); i: the row of the whole block
    width = gram.shape[1] - j0
    kb = np.empty(width)
    tb = np.empty(width if ntk else 1)
    _layer0(gram, k0_i, ii, i, j0, w0, bv, diagonal, kb)
    if ntk:
        tb[:] = kb
    for layer in range(depth):
        if all_depths:
            _store(out_k, out_t, kb, tb, layer, ii, j0, ntk)
        _layer_row(kb, tb, i, j0, s_i, s_j, r_i, r_j, layer, wv, bv, family, p0, p1, ntk, diagonal)
    _store(out_k, out_t, kb, tb, depth if all_depths else 0, ii, j0, ntk)


@njit(cache=True, nogil=True, error_model="numpy")
def _closed_rows(gram, row0, k0_i, s_i, s_j, r_i, r_j, depth, w0, wv, bv, family, p0, p1, ntk, all_depths, upper,
                 out_k, out_t):
    for ii in range(gram.shape[0]):
        i = row0 + ii
        _row(gram, k0_i, ii, i, i if upper else 0, s_i, s_j, r_i, r_j, depth, w0, wv, bv, family, p0, p1, ntk,
             all_depths, upper, out_k, out_t)


@njit(cache=True, nogil=True, error_model="numpy")
def _closed_points(k, s, family, p0, p1, out_e, out_ed):
    for i in range(k.shape[0]):
        e, ed = _dual(family, 1.0, s[i] * s[i], s[i], s[i], p0, p1)
        out_e[i] = e
        out_ed[i] = ed


@njit(cache=True, inline="always", error_model="numpy")
def _layer0(gram, k0_i, ii, i, j0, w0, bv, diagonal, kb):
    """Row ``i`` of ``K^0 = bias_var + weight_var / d <x_i, x_j>`` from ``j0`` on, into ``kb``.

    On the diagonal of a symmetric block the entry is taken from the per-point
    diagonal ``k0_i`` (what :func:`nngp_dask.diagonals` computed from the same point):
    the BLAS Gram diagonal can differ from it by an ulp, and the NTK diagonal,
    which carries ``Theta^0`` through every layer, would then differ too.
    """
    for q in range(kb.shape[0]):
        kb[q] = bv + w0 * gram[ii, j0 + q]
    if diagonal:
        kb[0] = k0_i[i]


@njit(cache=True, inline="always", error_model="numpy")
def _store(out_k, out_t, kb, tb, layer, ii, j0, ntk):
    for q in range(kb.shape[0]):
        out_k[layer, ii, j0 + q] = kb[q]
    if ntk:
        for q in range(kb.shape[0]):
            out_t[layer, ii, j0 + q] = tb[q]


# --- the Hermite-series family ----------------------------------------------------------------


@njit(cache=True, error_model="numpy")
def _hermite_row(gram, k0_i, ii, i, j0, r_i, r_j, ha_i, ha_j, hb_i, hb_j, depth, w0, wv, bv, ntk, all_depths,
                 diagonal, out_k, out_t):
    # ha_*: (L, K + 1, n) so that the Horner step over a row is a contiguous, vectorised loop.
    width = gram.shape[1] - j0
    kb = np.empty(width)
    tb = np.empty(width if ntk else 1)
    cb = np.empty(width)
    acc = np.empty(width)
    dacc = np.empty(width if ntk else 1)
    _layer0(gram, k0_i, ii, i, j0, w0, bv, diagonal, kb)
    if ntk:
        tb[:] = kb
    degree = ha_i.shape[1] - 1
    for layer in range(depth):
        if all_depths:
            _store(out_k, out_t, kb, tb, layer, ii, j0, ntk)
        ri = r_i[layer, i]
        for q in range(width):
            cb[q] = min(max(kb[q] * ri * r_j[layer, j0 + q], -1.0), 1.0)
            acc[q] = 0.0
        if diagonal:
            cb[0] = 1.0
        if ntk:
            dacc[:] = 0.0
        for k in range(degree, -1, -1):
            a_ik = ha_i[layer, k, i]
            for q in range(width):
                acc[q] = acc[q] * cb[q] + a_ik * ha_j[layer, k, j0 + q]
            if ntk:
                b_ik = hb_i[layer, k, i]
                for q in range(width):
                    dacc[q] = dacc[q] * cb[q] + b_ik * hb_j[layer, k, j0 + q]
        for q in range(width):
            k_new = bv + wv * acc[q]
            if ntk:
                tb[q] = k_new + wv * tb[q] * dacc[q]
            kb[q] = k_new
    _store(out_k, out_t, kb, tb, depth if all_depths else 0, ii, j0, ntk)


@njit(cache=True, nogil=True, error_model="numpy")
def _hermite_rows(gram, row0, k0_i, r_i, r_j, ha_i, ha_j, hb_i, hb_j, depth, w0, wv, bv, ntk, all_depths, upper,
                  out_k, out_t):
    for ii in range(gram.shape[0]):
        i = row0 + ii
        _hermite_row(gram, k0_i, ii, i, i if upper else 0, r_i, r_j, ha_i, ha_j, hb_i, hb_j, depth, w0, wv, bv, ntk,
                     all_depths, upper, out_k, out_t)


# --- blocks of rows, in float64, on threads ----------------------------------------------------
_CHUNK_BYTES = 1 << 20  # float64 rows converted at a time: stays in L2


def threads() -> int:
    """Threads of the in-process recursion: Numba's setting (``NUMBA_NUM_THREADS``, default every
    core; ``numba.set_num_threads`` lowers it), 1 in the embedded cluster's workers."""
    return max(1, numba.get_num_threads())


def _rows_f64(a, r0, r1, writable):
    """Rows ``r0:r1`` of the last two axes of ``a`` as a C-contiguous float64 array: a view when
    ``a`` already is one, else a copy (``writable`` copies start as zeros: an ``upper`` block
    leaves the entries below its diagonal unwritten, and they are copied back too)."""
    view = a[..., r0:r1, :]
    if view.dtype == np.float64 and view.flags.c_contiguous:
        return view, False
    if writable:
        return np.zeros(view.shape), True
    return np.ascontiguousarray(view, dtype=np.float64), True


def recurse_block(gram, k0_i, s_i, s_j, r_i, r_j, ha_i, ha_j, hb_i, hb_j, depth, w0, wv, bv, family, p0, p1,
                  ntk, all_depths, upper, out_k, out_t):
    """Run the recursion over a block of input inner products ``<x_i, x_j>`` (``w0 = weight_var / d``).

    ``k0_i``: (m,) float64 layer-0 diagonal ``K^0(x_i, x_i)`` of the rows, used for the
    diagonal entries of an ``upper`` block so that they equal :func:`nngp_dask.diagonals`
    exactly (the NTK carries ``Theta^0`` through every layer). ``s_*``, ``r_*``: (L, m or n)
    square roots of the per-layer diagonals and their inverses (0 where the variance is 0).
    ``ha_*``, ``hb_*``: (L, K + 1, m or n) series coefficients (family HERMITE only).
    ``out_k`` / ``out_t``: (L + 1 or 1, m, n), float32 or float64; ``out_k`` may alias ``gram``
    (a row is read before it is written). With ``upper`` (a diagonal block of a symmetric matrix)
    only ``j >= i`` is computed, and the rest of the rows is left undefined. Blocks of rows run on
    :func:`threads` threads.
    """
    m, n = gram.shape
    layers = out_k.shape[0]
    rows = max(1, min(m, _CHUNK_BYTES // (8 * n * (layers + (layers if ntk else 0) + 1))))
    hermite = family == FAMILY_HERMITE

    def run(r0):
        r1 = min(m, r0 + rows)
        g, _ = _rows_f64(gram, r0, r1, False)
        ok, copy_k = _rows_f64(out_k, r0, r1, True)
        ot, copy_t = _rows_f64(out_t, r0, r1, True) if ntk else (_NO_T, False)
        if hermite:
            _hermite_rows(g, r0, k0_i, r_i, r_j, ha_i, ha_j, hb_i, hb_j, depth, w0, wv, bv, ntk, all_depths, upper,
                          ok, ot)
        else:
            _closed_rows(g, r0, k0_i, s_i, s_j, r_i, r_j, depth, w0, wv, bv, family, p0, p1, ntk, all_depths, upper,
                         ok, ot)
        with np.errstate(over="ignore"):  # float32 storage of a value beyond its range: inf, as in the kernel
            if copy_k:
                out_k[..., r0:r1, :] = ok
            if copy_t:
                out_t[..., r0:r1, :] = ot

    starts = range(0, m, rows)
    workers = min(threads(), len(starts))
    if workers == 1:
        for r0 in starts:
            run(r0)
    else:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(run, starts))


_NO_T = np.empty((1, 1, 1))


def dual_points(k, s, ha, hb, family, p0, p1, out_e, out_ed):
    """The duals of the pairs (x_i, x_i) of one layer (correlation exactly 1), sharing the tiles' code.

    ``ha`` / ``hb``: (1, K + 1, n) series coefficients (family HERMITE).
    """
    if family == FAMILY_HERMITE:
        # the same summation order as the tiles' Horner loop at c = 1
        out_e[:] = 0.0
        out_ed[:] = 0.0
        for k in range(ha.shape[1] - 1, -1, -1):
            out_e += ha[0, k] * ha[0, k]
            out_ed += hb[0, k] * hb[0, k]
    else:
        _closed_points(k, s, family, p0, p1, out_e, out_ed)


@njit(cache=True, nogil=True, error_model="numpy")
def mirror_upper(a):
    """Copy the upper triangle of each square ``a[d]`` into its lower triangle, in cache blocks."""
    n = a.shape[-1]
    bs = 64
    nb = (n + bs - 1) // bs
    for d in range(a.shape[0]):
        for bi in range(nb):
            for bj in range(bi + 1):
                for i in range(bi * bs, min((bi + 1) * bs, n)):
                    for j in range(bj * bs, min((bj + 1) * bs, i)):
                        a[d, i, j] = a[d, j, i]


def empty_hermite(depth: int, n: int) -> np.ndarray:
    """Placeholder coefficient array for the closed-form families."""
    return np.zeros((max(depth, 1), 1, n))
