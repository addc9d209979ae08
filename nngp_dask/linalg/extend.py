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

__all__ = ["EXTEND_MAX_GROWTH", "ExtendedNystrom", "orthogonal_factor"]

#: A Nystrom preconditioner is extended while the system has at most this many times the rows its
#: landmarks were drawn from; beyond, a new one is built.
EXTEND_MAX_GROWTH = 1.25


class ExtendedNystrom(Preconditioner):
    """``M = F F^T + noise I`` for a factor ``F`` (n, k) with any columns, by Woodbury.

    Obtain with :meth:`extend`. ``lowrank_factor`` is ``F`` itself (``F F^T ~= K``, columns not
    orthogonal: :func:`orthogonal_factor` gives the ``U diag(s)`` form of its leading columns).
    ``info`` holds ``landmarks``, ``transform``, ``gram`` (``F^T F``) and ``pool`` (the rows the
    landmarks were drawn from), so that it can be extended again.
    """

    orthogonal = False

    def __init__(self, factor: NDArray[np.float64], gram: NDArray[np.float64], noise: float, *,
                 info: dict[str, Any]) -> None:
        if not (isinstance(noise, (int, float, np.floating)) and np.isfinite(noise) and noise > 0):
            raise ValueError(f"noise: expected a finite number > 0, got {noise!r}")
        self.name, self.noise, self.n, self.rank = "nystrom", float(noise), factor.shape[0], factor.shape[1]
        self._f = factor
        self._f.setflags(write=False)
        self.info = dict(info, gram=gram)
        self._chol = cholesky_factor(gram, self.noise)

    @classmethod
    def extend(cls, factor: NDArray[np.float64], gram: NDArray[np.float64] | None, transform: NDArray[np.float64],
               landmarks: NDArray[np.intp], new_columns: NDArray[np.float64], noise: float, *,
               pool: int) -> ExtendedNystrom:
        """Grow a Nystrom factor by the rows whose kernel columns at the landmarks are ``new_columns``.

        Parameters
        ----------
        factor : ndarray (n, k)
            ``F`` of the smaller kernel (a Nystrom ``lowrank_factor`` or an extended one).
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
            gram = np.diag(np.einsum("ij,ij->j", factor, factor))
        out = np.empty((n + g.shape[0], k))
        out[:n], out[n:] = factor, g
        return cls(out, gram + g.T @ g, noise, info={"landmarks": landmarks, "transform": transform, "pool": pool})

    @property
    def lowrank_factor(self) -> NDArray[np.float64]:
        """``F`` (n, k), ``F F^T ~= K``; read-only, not copied (it can be large)."""
        return self._f

    def _apply(self, r: NDArray[np.float64]) -> NDArray[np.float64]:
        c = scipy.linalg.cho_solve(self._chol, self._f.T @ r, check_finite=False)
        return (r - self._f @ c) / self.noise


def orthogonal_factor(factor: NDArray[np.float64]) -> NDArray[np.float64]:
    """``U diag(s)`` (descending ``s``) with the same ``F F^T`` as ``factor``'s columns (a thin QR and
    the SVD of its triangle): the form the low-rank predictive variance expects."""
    return LowRank(factor, 1.0).lowrank_factor
