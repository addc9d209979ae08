"""Independent oracles for kernel values (no code shared with the closed forms or the series).

Every oracle is vectorised over entries: ``dual(k11, k22, k12)`` takes arrays of any (common)
shape and returns ``E[fn(u) fn(v)]`` per entry, so :func:`reference_kernel` evaluates one whole
layer in a handful of NumPy calls instead of a Python loop over pairs.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

from nngp_dask import Architecture

# entries evaluated per NumPy call (bounds the (entries, nodes, nodes) temporaries to ~40 MB)
_CHUNK_VALUES = 5_000_000


def _chunked(fn: Callable, per_entry: int, *arrays: np.ndarray) -> np.ndarray:
    """``fn`` over flattened, broadcast ``arrays`` in chunks; result in the broadcast shape."""
    arrays = np.broadcast_arrays(*(np.asarray(a, dtype=np.float64) for a in arrays))
    shape = arrays[0].shape
    flat = [a.ravel() for a in arrays]
    size = flat[0].size
    step = max(1, _CHUNK_VALUES // per_entry)
    out = np.empty(size)
    for start in range(0, size, step):
        out[start : start + step] = fn(*(a[start : start + step] for a in flat))
    return out.reshape(shape)


def polar_dual(fn: Callable, homogeneity: int, k11, k22, k12, nodes: int = 64) -> np.ndarray:
    """``E[fn(u) fn(v)]`` for a positively homogeneous ``fn`` (``fn(l x) = l^p fn(x)``, l > 0), exactly.

    With ``u = s1 z1``, ``v = s2 (c z1 + r z2)`` and z in polar coordinates the radial
    integral is the moment ``2^(q/2) Gamma(q/2 + 1)`` (q = 2p) and the angular one is a
    piecewise-smooth function whose breakpoints (u = 0 at pi/2, 3 pi/2; v = 0 at w0, w0 + pi)
    are known: Gauss-Legendre on each piece is accurate to round-off. Shares nothing with
    the arc-cosine formulas. Vectorised over entries (arrays broadcast together).
    """
    t, wt = np.polynomial.legendre.leggauss(nodes)
    q = 2 * homogeneity
    radial = 2.0 ** (q / 2) * math.gamma(q / 2 + 1)

    def one(k11, k22, k12):
        s1, s2 = np.sqrt(k11), np.sqrt(k22)
        with np.errstate(divide="ignore", invalid="ignore"):
            c = np.where(s1 * s2 > 0, np.clip(k12 / (s1 * s2), -1.0, 1.0), 0.0)
        c = np.where((k11 == k22) & (k22 == k12), 1.0, c)  # a point with itself: exactly 1
        r = np.sqrt(np.maximum(1.0 - c * c, 0.0))
        w0 = np.arctan2(-c, r) % math.pi  # c cos w + r sin w = 0
        fixed = np.broadcast_to([0.0, math.pi / 2, 3 * math.pi / 2, 2 * math.pi], (c.size, 4))
        breaks = np.sort(np.concatenate([fixed, w0[:, None], (w0 + math.pi)[:, None]], axis=1), axis=1)
        lo, hi = breaks[:, :-1, None], breaks[:, 1:, None]  # (N, 5, 1); empty pieces weigh 0
        om = 0.5 * (hi - lo) * t + 0.5 * (hi + lo)  # (N, 5, nodes)
        u = s1[:, None, None] * np.cos(om)
        v = s2[:, None, None] * (c[:, None, None] * np.cos(om) + r[:, None, None] * np.sin(om))
        total = np.einsum("npk,k->n", 0.5 * (hi - lo) * fn(u) * fn(v), wt)
        return total * radial / (2 * math.pi)

    return _chunked(one, 5 * nodes, k11, k22, k12)


def gauss_hermite_2d(fn: Callable, k11, k22, k12, degree: int = 200) -> np.ndarray:
    """``E[fn(u) fn(v)]`` by a tensor Gauss-Hermite rule over the Cholesky factor (smooth fn).

    Converges geometrically for smooth ``fn`` while the variances stay moderate (for erf,
    degree 200 is at round-off up to variance ~3 but only ~1e-6 at variance 10): tests keep
    their inputs in that range. Vectorised over entries (arrays broadcast together).
    """
    z, w = np.polynomial.hermite_e.hermegauss(degree)
    w = w / math.sqrt(2 * math.pi)

    def one(k11, k22, k12):
        l11 = np.sqrt(k11)
        with np.errstate(divide="ignore", invalid="ignore"):
            l21 = np.where(l11 > 0, k12 / l11, 0.0)
        l22 = np.sqrt(np.maximum(k22 - l21 * l21, 0.0))
        fu = fn(l11[:, None] * z)  # (N, degree): u depends on z1 only
        fv = fn(l21[:, None, None] * z[:, None] + l22[:, None, None] * z[None, :])  # (N, z1, z2)
        return np.einsum("ni,nij,i,j->n", fu, fv, w, w)

    return _chunked(one, degree * degree, k11, k22, k12)


def reference_kernel(arch: Architecture, x: np.ndarray, dual: Callable, dual_deriv: Callable | None = None):
    """Pairwise float64 recursion of docs/DESIGN.md section 2 with a vectorised oracle ``dual(k11, k22, k12)``.

    Returns (K, Theta) with Theta None when ``dual_deriv`` is None.
    """
    n, d = x.shape
    k = arch.bias_var + arch.weight_var * (x @ x.T) / d
    t = k.copy()
    for _ in range(arch.depth):
        diag = np.diag(k).copy()
        k11, k22 = diag[:, None], diag[None, :]
        k_new = arch.bias_var + arch.weight_var * dual(k11, k22, k)
        if dual_deriv is not None:
            t = k_new + arch.weight_var * t * dual_deriv(k11, k22, k)
        k = k_new
    return k, (t if dual_deriv is not None else None)


def dense_matmat(k: np.ndarray, noise: float) -> Callable[[np.ndarray], np.ndarray]:
    """``V -> (K + noise I) V`` in float64: the in-memory twin of ``StoredKernelOperator.matmat``."""
    k64 = np.asarray(k, dtype=np.float64)

    def matmat(v: np.ndarray) -> np.ndarray:
        return k64 @ v + noise * v

    return matmat
