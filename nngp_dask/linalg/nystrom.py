"""The r x r algebra of a Nystrom preconditioner whose kernel columns live elsewhere, and its
compact factor (float64 where rounding would matter, float32 elsewhere).

A distributed build (:mod:`nngp_dask.gp.nystrom_store`) reduces the ``n x r`` landmark columns
``C = K[:, S]`` to two ``r x r`` matrices, ``W = K[S, S]`` and the Gram ``C^T C``; this module
turns them into the ``r x k`` map ``T`` with ``F = C T = U diag(s)`` (orthogonal columns, ``s``
descending), the factor :class:`~nngp_dask.linalg.LowRank` applies by Woodbury. The maths is the
in-memory :class:`~nngp_dask.linalg.Nystrom`'s, ``L = C V diag(lambda^{-1/2})`` and ``F = L W2``
with ``L^T L = W2 diag(s^2) W2^T``, except that ``L^T L = T1^T (C^T C) T1`` is formed from
``C^T C`` (``3 n r^2`` flops in all instead of ``5 n r^2``, and ``C`` never leaves the workers).
That product carries the rounding of ``C^T C`` amplified by the condition number of the kept
part of ``W``; the eigenvalue cut-off ``rcond`` bounds it (the callers use at least the storage
precision's epsilon: below that, ``W``'s eigenvalues are not determined by the stored values).

Storage: the columns with ``s^2 > FLOAT64_RATIO * noise`` stay float64 and the rest are stored
float32. ``M^{-1} = (I - F diag(1 / (s^2 + noise)) F^T) / noise`` has its smallest eigenvalue
``noise / (s_1^2 + noise)`` along the leading columns, which float32 rounding (a relative
``2^-24`` per entry) of those columns could make negative; on the others the margin is at least
``1 / (FLOAT64_RATIO + 1)``, far above the perturbation (about ``2^-23 sqrt(r)``).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import scipy.linalg
from numpy.typing import NDArray

from .preconditioners import LowRank
from .products import factor_products

__all__ = ["FLOAT64_RATIO", "SplitLowRank", "nystrom_transform"]

#: Columns of the factor with ``s^2 > FLOAT64_RATIO * noise`` are kept in float64 (see module docstring).
FLOAT64_RATIO = 1024.0


def nystrom_transform(w: NDArray, gram_c: NDArray, *, rcond: float = 1e-10
                      ) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """``T`` (r, k) and ``s`` (k,), descending, with ``(C T)^T (C T) = diag(s^2)`` and
    ``(C T)(C T)^T = C W^+ C^T``.

    Parameters
    ----------
    w : ndarray, shape (r, r)
        ``K[S, S]``, the landmark rows of ``C``.
    gram_c : ndarray, shape (r, r)
        ``C^T C``, float64.
    rcond : float
        Eigenvalues of ``W`` below ``rcond * max`` are dropped (``W^+``); ``k`` is the count kept.

    Returns
    -------
    t, s : ndarray
    """
    w = 0.5 * (np.asarray(w, dtype=np.float64) + np.asarray(w, dtype=np.float64).T)
    lam, v = scipy.linalg.eigh(w, check_finite=False)
    keep = lam > rcond * max(float(lam[-1]), 0.0)
    if not np.any(keep):
        return np.zeros((w.shape[0], 0)), np.zeros(0)
    t1 = v[:, keep] / np.sqrt(lam[keep])
    g = t1.T @ (np.asarray(gram_c, dtype=np.float64) @ t1)
    sig2, w2 = scipy.linalg.eigh(0.5 * (g + g.T), check_finite=False)
    return t1 @ w2[:, ::-1], np.sqrt(np.clip(sig2[::-1], 0.0, None))


class SplitLowRank(LowRank):
    """:class:`~nngp_dask.linalg.LowRank` with its factor ``F = U diag(s)`` held as a float64 block
    of leading columns and a float32 block of the rest (see module docstring).

    Parameters
    ----------
    f_hi : ndarray, shape (n, h), float64
        The leading ``h`` columns.
    f_lo : ndarray, shape (n, k - h), float32
        The others.
    s : ndarray, shape (k,)
        Descending; ``s^2`` the exact (float64) squared column norms the factor was built for.
    noise : float
        ``> 0``.
    name : str
    info : dict, optional
    threads : int
        Threads of the float32 products.
    """

    def __init__(self, f_hi: NDArray, f_lo: NDArray, s: NDArray, noise: float, *, name: str = "nystrom",
                 info: dict[str, Any] | None = None, threads: int = 2) -> None:
        noise = float(noise)
        if not (math.isfinite(noise) and noise > 0):
            raise ValueError(f"noise: expected a finite number > 0, got {noise!r}")
        s = np.asarray(s, dtype=np.float64)
        if f_hi.shape[0] != f_lo.shape[0] or f_hi.shape[1] + f_lo.shape[1] != s.size:
            raise ValueError(f"f_hi, f_lo: expected (n, h) and (n, {s.size} - h), got {f_hi.shape} and {f_lo.shape}")
        self.noise, self.n, self.name, self.info = noise, f_hi.shape[0], name, dict(info or {})
        self.rank, self.threads = int(s.size), int(threads)
        self._hi = np.ascontiguousarray(f_hi, dtype=np.float64)
        self._lo = np.ascontiguousarray(f_lo, dtype=np.float32)
        for a in (self._hi, self._lo, s):
            a.setflags(write=False)
        self._s = s
        self._coef = -1.0 / (noise * (s * s + noise))

    @property
    def float64_columns(self) -> int:
        """How many leading columns are stored in float64."""
        return self._hi.shape[1]

    @property
    def nbytes(self) -> int:
        """Bytes of the stored factor."""
        return self._hi.nbytes + self._lo.nbytes

    @property
    def lowrank_factor(self) -> NDArray[np.float64]:
        """``U diag(s)`` as one float64 (n, rank) array (a copy of twice the stored bytes;
        :meth:`factor_block` copies only the columns asked for)."""
        return self.factor_block(0, self.rank)

    def factor_block(self, start: int, stop: int) -> NDArray[np.float64]:
        h = self._hi.shape[1]
        return np.hstack([self._hi[:, start:min(stop, h)],
                          np.asarray(self._lo[:, max(start - h, 0):max(stop - h, 0)], dtype=np.float64)])

    def _apply(self, r: NDArray[np.float64]) -> NDArray[np.float64]:
        # both blocks in the compiled loops, the float64 one too: a BLAS call here left OpenBLAS's
        # threads spinning into the float32 pass after it (0.17-0.19 s against 0.13-0.15 s per application
        # at n = 60,000, rank 2,048, ten vectors)
        r_t = np.ascontiguousarray(r.T)
        out_t = r_t / self.noise
        h = self._hi.shape[1]
        for f, coef in ((self._hi, self._coef[:h]), (self._lo, self._coef[h:])):
            if f.shape[1]:
                factor_products(f, r_t, coef, out_t, threads=self.threads)
        return np.ascontiguousarray(out_t.T)
