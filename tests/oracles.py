"""Independent oracles for kernel values (no code shared with the closed forms)."""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

from nngp_dask import Architecture


def polar_dual(fn: Callable, homogeneity: int, k11: float, k22: float, k12: float, nodes: int = 64) -> float:
    """``E[fn(u) fn(v)]`` for a positively homogeneous ``fn`` (``fn(l x) = l^p fn(x)``, l > 0), exactly.

    With ``u = s1 z1``, ``v = s2 (c z1 + r z2)`` and z in polar coordinates the radial
    integral is the moment ``2^(q/2) Gamma(q/2 + 1)`` (q = 2p) and the angular one is a
    piecewise-smooth function whose breakpoints (u = 0, v = 0) are known: Gauss-Legendre
    on each piece is accurate to round-off. Shares nothing with the arc-cosine formulas.
    """
    s1, s2 = math.sqrt(k11), math.sqrt(k22)
    c = max(-1.0, min(1.0, k12 / (s1 * s2))) if s1 * s2 > 0 else 0.0
    if k11 == k22 == k12:  # a point with itself: exactly 1, not 1 - rounding
        c = 1.0
    r = math.sqrt(max(1.0 - c * c, 0.0))
    breaks = [0.0, math.pi / 2, 3 * math.pi / 2, 2 * math.pi]
    w0 = math.atan2(-c, r) % math.pi  # c cos w + r sin w = 0
    breaks += [w0, w0 + math.pi]
    breaks = sorted(set(b % (2 * math.pi) for b in breaks) | {2 * math.pi})
    t, wt = np.polynomial.legendre.leggauss(nodes)
    total = 0.0
    for lo, hi in zip(breaks[:-1], breaks[1:]):
        if hi - lo < 1e-15:
            continue
        om = 0.5 * (hi - lo) * t + 0.5 * (hi + lo)
        u = s1 * np.cos(om)
        v = s2 * (c * np.cos(om) + r * np.sin(om))
        total += 0.5 * (hi - lo) * np.sum(wt * fn(u) * fn(v))
    q = 2 * homogeneity
    radial = 2.0 ** (q / 2) * math.gamma(q / 2 + 1)
    return total * radial / (2 * math.pi)


def gauss_hermite_2d(fn: Callable, k11: float, k22: float, k12: float, degree: int = 200) -> float:
    """``E[fn(u) fn(v)]`` by a tensor Gauss-Hermite rule over the Cholesky factor (smooth fn)."""
    z, w = np.polynomial.hermite_e.hermegauss(degree)
    w = w / math.sqrt(2 * math.pi)
    l11 = math.sqrt(k11)
    l21 = k12 / l11 if l11 > 0 else 0.0
    l22 = math.sqrt(max(k22 - l21 * l21, 0.0))
    u = l11 * z[:, None] + 0.0 * z[None, :]
    v = l21 * z[:, None] + l22 * z[None, :]
    return float(np.einsum("ij,i,j->", fn(u) * fn(v), w, w))


def reference_kernel(arch: Architecture, x: np.ndarray, dual: Callable, dual_deriv: Callable | None = None):
    """Pairwise float64 recursion of DESIGN.md section 2 with an oracle ``dual(k11, k22, k12)``.

    Returns (K, Theta) with Theta None when ``dual_deriv`` is None.
    """
    n, d = x.shape
    k = arch.bias_var + arch.weight_var * (x @ x.T) / d
    t = k.copy()
    for _ in range(arch.depth):
        diag = np.diag(k).copy()
        e = np.array([[dual(diag[i], diag[j], k[i, j]) for j in range(n)] for i in range(n)])
        k_new = arch.bias_var + arch.weight_var * e
        if dual_deriv is not None:
            ed = np.array([[dual_deriv(diag[i], diag[j], k[i, j]) for j in range(n)] for i in range(n)])
            t = k_new + arch.weight_var * t * ed
        k = k_new
    return k, (t if dual_deriv is not None else None)
