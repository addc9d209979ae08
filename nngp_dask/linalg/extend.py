"""A Nystrom preconditioner carried over to a kernel that grew by appended rows.

A :class:`~nngp_dask.linalg.Nystrom` preconditioner of ``K`` (n x n) with landmarks ``S`` is
``M = F F^T + noise I`` with ``F = K[:, S] T`` (``T``, r x k, from the eigendecompositions of
``K[S, S]`` and of ``L^T L``; kept in its ``info``). When rows are appended to the inputs, the
landmarks are still rows of the grown kernel and ``K[S, S]`` is unchanged, so the Nystrom
approximation of the grown kernel *with the same landmarks* is

    F' = [F; K[new, S] T]:

only the new rows' kernel columns at the landmarks are computed (m x r kernel entries, where a
new build computes n x r and two r x r eigendecompositions and three (n, r) x (r, r) products).
``F'`` no longer has orthogonal columns, so it is applied by Woodbury with the Cholesky factor of
the small ``noise I + F'^T F'``, kept up to date as ``F^T F + G^T G``: ``M^{-1} R = (R - F'
(noise I + F'^T F')^{-1} F'^T R) / noise``, symmetric positive definite for any ``noise > 0``.

It is the same kind of preconditioner as a new one (a uniform Nystrom approximation, its landmarks
drawn from the rows the first one saw), so CG converges the same way; past a growth of
:data:`EXTEND_MAX_GROWTH` the new rows would be under-represented among the landmarks, and the
solve builds a new one instead.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.linalg
from numpy.typing import NDArray

from .dense import cholesky_factor
from .preconditioners import LowRank, Preconditioner
from .products import expand_add_t, project_t

__all__ = ["EXTEND_MAX_GROWTH", "ExtendedNystrom", "orthogonal_factor"]

#: A Nystrom preconditioner is extended while the system has at most this many times the rows its
#: landmarks were drawn from; beyond, a new one is built.
EXTEND_MAX_GROWTH = 1.25


class ExtendedNystrom(Preconditioner):
    """``M = F F^T + noise I`` for a factor ``F`` (n, k) with any columns, by Woodbury.

    Obtain with :meth:`extend`. ``F`` is held as the rows it was extended from, in their own
    precision (float32 as a solve stores them: the exact values the Woodbury form is built for,
    at half the bytes of a float64 copy), and the new rows in float64; each application is one
    compiled pass over each (:func:`~nngp_dask.linalg.products.project_t`, ``expand_add_t``, as
    a new Nystrom preconditioner's float32 columns) and an r x r triangular solve.
    ``lowrank_factor`` is ``F`` itself (``F F^T ~= K``, columns not orthogonal:
    :func:`orthogonal_factor` gives the ``U diag(s)`` form of its leading columns). ``info``
    holds ``landmarks``, ``transform``, ``gram`` (``F^T F``) and ``pool`` (the rows the
    landmarks were drawn from), so that it can be extended again.
    """

    orthogonal = False

    def __init__(self, old: NDArray, new: NDArray[np.float64], gram: NDArray[np.float64], noise: float, *,
                 info: dict[str, Any], threads: int = 2) -> None:
        if not (isinstance(noise, (int, float, np.floating)) and np.isfinite(noise) and noise > 0):
            raise ValueError(f"noise: expected a finite number > 0, got {noise!r}")
        if old.ndim != 2 or new.ndim != 2 or old.shape[1] != new.shape[1]:
            raise ValueError(f"old, new: expected (n0, k) and (m, k), got {old.shape} and {new.shape}")
        self._old = np.ascontiguousarray(old, dtype=old.dtype if old.dtype == np.float32 else np.float64)
        self._new = np.ascontiguousarray(new, dtype=np.float64)
        for a in (self._old, self._new):
            a.setflags(write=False)
        self.name, self.noise, self.threads = "nystrom", float(noise), int(threads)
        self.n, self.rank = old.shape[0] + new.shape[0], old.shape[1]
        self.info = dict(info, gram=gram)
        # explicitly inverted, once: an (r, r) product per application then runs in the compiled
        # loops; its rounding (cond(H) ~ s_1^2 / noise times eps) stays far below the smallest
        # eigenvalue of M^{-1} F's directions keep, noise / (s_1^2 + noise) relative
        chol = cholesky_factor(gram, self.noise)
        h_inv = scipy.linalg.cho_solve(chol, np.eye(gram.shape[0]), check_finite=False)
        self._h_inv = np.ascontiguousarray(0.5 * (h_inv + h_inv.T))

    @classmethod
    def extend(cls, factor: NDArray, gram: NDArray[np.float64] | None, transform: NDArray[np.float64],
               landmarks: NDArray[np.intp], new_columns: NDArray[np.float64], noise: float, *,
               pool: int) -> ExtendedNystrom:
        """Grow a Nystrom factor by the rows whose kernel columns at the landmarks are ``new_columns``.

        Parameters
        ----------
        factor : ndarray (n, k)
            ``F`` of the smaller kernel (a Nystrom ``lowrank_factor`` or an extended one), float32
            (kept so: as a solve stores it) or float64.
        gram : ndarray (k, k) or None
            ``F^T F``; None for a Nystrom factor with orthogonal columns (then it is their
            squared norms on the diagonal).
        transform : ndarray (r, k)
            ``T`` with ``F = K[:, landmarks] T``.
        landmarks : ndarray (r,)
            Indices, all below n.
        new_columns : ndarray (m, r)
            ``K[new rows, landmarks]``.
        noise : float
        pool : int
            The rows the landmarks were drawn from.
        """
        n, k = factor.shape
        if transform.shape[1] != k or new_columns.shape[1] != transform.shape[0] or landmarks.max(initial=0) >= n:
            raise ValueError(f"factor {factor.shape}, transform {transform.shape}, new_columns {new_columns.shape}: "
                             "expected (n, k), (r, k) and (m, r) with landmarks below n")
        g = new_columns @ transform
        if gram is None:
            gram = np.diag(np.einsum("ij,ij->j", factor, factor, dtype=np.float64))
        info = {"landmarks": landmarks, "transform": transform, "pool": pool}
        return cls(factor, g, gram + g.T @ g, noise, info=info)

    @property
    def nbytes(self) -> int:
        """Bytes of the held factor."""
        return self._old.nbytes + self._new.nbytes

    @property
    def lowrank_factor(self) -> NDArray[np.float64]:
        """``F`` (n, k), ``F F^T ~= K``, as one float64 array (a copy: :meth:`factor_block` copies
        only the columns asked for)."""
        return self.factor_block(0, self.rank)

    def factor_block(self, start: int, stop: int) -> NDArray[np.float64]:
        """Columns ``start:stop`` of :attr:`lowrank_factor` (float64)."""
        return np.vstack([np.asarray(self._old[:, start:stop], dtype=np.float64), self._new[:, start:stop]])

    def _apply(self, r: NDArray[np.float64]) -> NDArray[np.float64]:
        # M^{-1} R = R / noise - F (H^{-1} F^T R) / noise, H = noise I + F^T F; compiled passes only
        # (no BLAS call whose spinning threads would slow the passes after it: products.project_t)
        n0, th = self._old.shape[0], self.threads
        r_t = np.ascontiguousarray(r.T)
        c_t = project_t(self._old, r_t, threads=th)
        c_t += project_t(self._new, r_t, first=n0, threads=th)
        c_t = project_t(self._h_inv, c_t, threads=th)  # (H^{-1} C)^T, H^{-1} symmetric
        c_t *= -1.0 / self.noise
        out_t = r_t / self.noise
        expand_add_t(self._old, c_t, out_t, threads=th)
        expand_add_t(self._new, c_t, out_t, first=n0, threads=th)
        return np.ascontiguousarray(out_t.T)


def orthogonal_factor(factor: NDArray[np.float64]) -> NDArray[np.float64]:
    """``U diag(s)`` (descending ``s``) with the same ``F F^T`` as ``factor``'s columns (a thin QR and
    the SVD of its triangle): the form the low-rank predictive variance expects."""
    return LowRank(factor, 1.0).lowrank_factor
