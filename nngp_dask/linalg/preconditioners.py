"""Preconditioners for ``A = K + noise I``: identity, Jacobi, and low-rank (Woodbury) ones.

Each preconditioner is an immutable object with ``apply(R) -> M^{-1} R`` for ``R`` of
shape (n, m) (or (n,)), a ``name`` and a ``rank`` (the size of its low-rank part, 0 for
diagonal ones). The low-rank ones approximate ``K ~= L L^T`` with ``L`` (n, r) and apply

    M^{-1} = (L L^T + noise I)^{-1} = (I - L (noise I_r + L^T L)^{-1} L^T) / noise

(Woodbury). For stability the factor is stored in its SVD form, ``L = U diag(s) W^T`` with ``U``
(n, r) orthonormal columns (a thin QR of ``L`` followed by the SVD of the r x r triangle;
for Nystrom, the eigendecomposition of ``L^T L``), kept as ``F = U diag(s)``, so that

    M^{-1} R = U diag(1 / (s^2 + noise)) U^T R + (R - U U^T R) / noise,

which is symmetric positive definite for every ``noise > 0`` whatever the rank of ``L``,
and never forms an ill-conditioned r x r inverse. ``lowrank_factor`` returns ``U diag(s)``,
an (n, r) matrix with ``lowrank_factor @ lowrank_factor.T == L L^T ~= K`` (for a low-rank
posterior-variance approximation).

NNGP kernels have fast-decaying spectra, so a few hundred pivots capture most of ``K``
and cut CG iterations by a large factor; the cost is ``rank`` kernel columns to build and
``4 n r m`` flops per application.

References
----------
.. [1] H. Harbrecht, M. Peters, R. Schneider, "On the low-rank approximation by the pivoted
   Cholesky decomposition", Appl. Numer. Math. 62 (2012).
.. [2] J. R. Gardner, G. Pleiss, R. Wu, K. Q. Weinberger, A. G. Wilson, "Product kernel
   interpolation for scalable Gaussian processes" / "GPyTorch: Blackbox matrix-matrix Gaussian
   process inference", NeurIPS 2018, section 4 (pivoted Cholesky preconditioner).
.. [3] C. K. I. Williams and M. Seeger, "Using the Nystrom method to speed up kernel machines",
   NeurIPS 2001.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Self

import numpy as np
import scipy.linalg
from numpy.typing import ArrayLike, NDArray

from .._blas import gram_upper

__all__ = [
    "PRECONDITIONERS",
    "AUTO_RANK",
    "Preconditioner",
    "Identity",
    "Jacobi",
    "LowRank",
    "PivotedCholesky",
    "Nystrom",
    "make_preconditioner",
    "nystrom_landmarks",
]

ColumnFn = Callable[[NDArray[np.intp]], ArrayLike]

PRECONDITIONERS: tuple[str, ...] = ("none", "jacobi", "pivoted_cholesky", "nystrom", "auto")
#: Rank of the ``"auto"`` preconditioner (Nystrom), capped at ``n``.
AUTO_RANK = 1024


def _check_noise(noise: Any, *, positive: bool) -> float:
    if isinstance(noise, bool) or not isinstance(noise, (int, float, np.integer, np.floating)):
        raise ValueError(f"noise: expected a number {'> 0' if positive else '>= 0'}, got {noise!r}")
    noise = float(noise)
    ok = math.isfinite(noise) and (noise > 0 if positive else noise >= 0)
    if not ok:
        hint = " (a low-rank preconditioner L L^T + noise I is singular without noise)" if positive else ""
        raise ValueError(f"noise: expected a finite number {'> 0' if positive else '>= 0'}{hint}, got {noise!r}")
    return noise


def _check_rank(rank: Any, n: int) -> int:
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 0:
        raise ValueError(f"rank: expected an integer >= 0, got {rank!r}")
    return int(min(rank, n))


def _check_diag(diag: ArrayLike) -> NDArray[np.float64]:
    d = np.asarray(diag)
    if d.ndim != 1 or d.size == 0 or d.dtype.kind not in "biuf":
        raise ValueError(f"diag: expected a non-empty 1-D real array (n,) (the kernel diagonal), "
                         f"got shape {d.shape} dtype {d.dtype}")
    d = np.asarray(d, dtype=np.float64)
    if not np.all(np.isfinite(d)):
        raise ValueError("diag: expected finite values, got NaN or Inf")
    if np.any(d < 0):
        i = int(np.argmax(d < 0))
        raise ValueError(f"diag: expected values >= 0 (a kernel diagonal), got {d[i]} at index {i}")
    return d


def _columns(column_fn: ColumnFn, idx: NDArray[np.intp], n: int) -> NDArray[np.float64]:
    cols = np.asarray(column_fn(idx), dtype=np.float64)
    if cols.shape != (n, idx.size):
        raise ValueError(f"column_fn: expected K[:, indices] of shape {(n, idx.size)}, got {cols.shape}")
    if not np.all(np.isfinite(cols)):
        raise ValueError("column_fn: expected finite kernel columns, got NaN or Inf")
    return cols


def _as_2d(r: ArrayLike, n: int) -> tuple[NDArray[np.float64], bool]:
    arr = np.asarray(r, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[:, None]
        one_d = True
    else:
        one_d = False
    if arr.ndim != 2 or arr.shape[0] != n:
        raise ValueError(f"R: expected shape ({n},) or ({n}, m), got {np.shape(r)}")
    return arr, one_d


class Preconditioner:
    """Base class: ``apply(R) -> M^{-1} R`` with ``M`` symmetric positive definite.

    Attributes
    ----------
    name : str
    n : int
        System size.
    rank : int
        Size of the low-rank part (0 for diagonal preconditioners).
    lowrank_factor : ndarray (n, rank) or None
        ``F`` with ``F F^T ~= K`` for low-rank preconditioners, else None.
    """

    name: str = "base"
    n: int
    rank: int = 0

    @property
    def lowrank_factor(self) -> NDArray[np.float64] | None:
        return None

    def apply(self, r: ArrayLike) -> NDArray[np.float64]:
        """``M^{-1} R``; ``R`` (n, m) or (n,), returns the same shape, float64."""
        arr, one_d = _as_2d(r, self.n)
        out = self._apply(arr)
        return out[:, 0] if one_d else out

    def _apply(self, r: NDArray[np.float64]) -> NDArray[np.float64]:  # pragma: no cover
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n={self.n}, rank={self.rank})"


class Identity(Preconditioner):
    """No preconditioning, ``M = I``.

    Parameters
    ----------
    n : int
        System size.
    """

    name = "none"
    rank = 0

    def __init__(self, n: int) -> None:
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"n: expected an integer >= 1, got {n!r}")
        self.n = int(n)

    def _apply(self, r: NDArray[np.float64]) -> NDArray[np.float64]:
        return r.copy()


class Jacobi(Preconditioner):
    """Diagonal preconditioner ``M = diag(K) + noise I``.

    Parameters
    ----------
    diag : array_like, shape (n,)
        Kernel diagonal ``K(x_i, x_i) >= 0``.
    noise : float
        ``>= 0``; ``diag + noise`` must be > 0 everywhere.
    """

    name = "jacobi"
    rank = 0

    def __init__(self, diag: ArrayLike, noise: float) -> None:
        d = _check_diag(diag) + _check_noise(noise, positive=False)
        if np.any(d <= 0):
            i = int(np.argmax(d <= 0))
            raise ValueError(f"diag + noise: expected values > 0 for a Jacobi preconditioner, got {d[i]} at index "
                             f"{i}; raise noise")
        inv = 1.0 / d
        inv.setflags(write=False)
        self._inv = inv
        self.n = d.size

    def _apply(self, r: NDArray[np.float64]) -> NDArray[np.float64]:
        return r * self._inv[:, None]


class LowRank(Preconditioner):
    """``M = L L^T + noise I`` applied by Woodbury in orthonormal form (see module docstring).

    Parameters
    ----------
    factor : array_like, shape (n, r)
        ``L`` with ``L L^T ~= K``.
    noise : float
        ``> 0``.
    name : str
    info : dict, optional
        Build diagnostics (pivots, landmarks, residual trace).
    """

    def __init__(self, factor: ArrayLike, noise: float, *, name: str = "lowrank",
                 info: dict[str, Any] | None = None) -> None:
        lf = np.asarray(factor, dtype=np.float64)
        if lf.ndim != 2:
            raise ValueError(f"factor: expected a 2-D array (n, r), got shape {lf.shape}")
        if lf.shape[1] == 0:
            f, s = np.zeros((lf.shape[0], 0)), np.zeros(0)
        else:
            q, tri = scipy.linalg.qr(lf, mode="economic", check_finite=False)
            w, s, _ = scipy.linalg.svd(tri, full_matrices=False, check_finite=False)
            f = (q @ w) * s
        self._set(f, s, noise, name, info)

    @classmethod
    def _from_ordered_factor(cls, f: NDArray[np.float64], s: NDArray[np.float64], noise: float, *, name: str,
                             info: dict[str, Any] | None = None) -> Self:
        """From ``F = U diag(s)`` already computed (orthogonal columns, ``s`` descending)."""
        self = cls.__new__(cls)
        self._set(f, s, noise, name, info)
        return self

    def _set(self, f: NDArray[np.float64], s: NDArray[np.float64], noise: float, name: str,
             info: dict[str, Any] | None) -> None:
        self.noise = _check_noise(noise, positive=True)
        self.n = f.shape[0]
        self.name = name
        self.info = dict(info or {})
        self.rank = int(s.size)
        f.setflags(write=False)
        s.setflags(write=False)
        self._f, self._s = f, s
        # U diag(1/(s^2 + noise) - 1/noise) U^T = F diag(-1/(noise (s^2 + noise))) F^T: no division
        # by s, so directions with s ~ 0 (or s known only roughly, see Nystrom) stay harmless
        self._coef = -1.0 / (self.noise * (s * s + self.noise))

    @property
    def lowrank_factor(self) -> NDArray[np.float64]:
        """``U diag(s)``, shape (n, rank), columns in descending ``s``: ``F F^T = L L^T ~= K``
        (a fresh array)."""
        return self._f.copy()

    def factor_block(self, start: int, stop: int) -> NDArray[np.float64]:
        """Columns ``start:stop`` of :attr:`lowrank_factor` (float64; only those are copied)."""
        return np.array(self._f[:, start:stop], dtype=np.float64)

    @property
    def singular_values(self) -> NDArray[np.float64]:
        """``s`` (rank,), descending; ``s^2`` are the eigenvalues of ``L L^T``."""
        return self._s

    def _apply(self, r: NDArray[np.float64]) -> NDArray[np.float64]:
        if self.rank == 0:
            return r / self.noise
        c = self._f.T @ r  # (rank, m)
        return r / self.noise + self._f @ (self._coef[:, None] * c)

    def dense_inverse(self) -> NDArray[np.float64]:
        """``M^{-1}`` as a dense (n, n) array (small problems, tests)."""
        return self._apply(np.eye(self.n))

    def logdet(self) -> float:
        """``log det M = sum log(s^2 + noise) + (n - r) log noise``."""
        return float(np.sum(np.log(self._s ** 2 + self.noise)) + (self.n - self.rank) * math.log(self.noise))


class PivotedCholesky(LowRank):
    """Greedy pivoted partial Cholesky ``K ~= L L^T`` ([1]_, [2]_), Woodbury-applied.

    Build with :meth:`build`. ``info`` holds ``pivots`` (the chosen indices, in order) and
    ``residual_trace`` (``trace(K - L L^T)`` after the last pivot).
    """

    @classmethod
    def build(cls, diag: ArrayLike, column_fn: ColumnFn, rank: int, noise: float, *, tol: float = 1e-8,
              block_size: int = 1) -> PivotedCholesky:
        """Pivoted partial Cholesky of ``K`` from its diagonal and columns on demand.

        At each step the pivot is the index of the largest residual diagonal
        ``d_i = K_ii - sum_m L_im^2``; its column ``l = (K[:, i] - L L[i]^T) / sqrt(d_i)``
        is appended and ``d -= l^2``. Stops at ``rank`` pivots, when
        ``trace(K - L L^T) <= tol * trace(K)``, or when the residual diagonal vanishes
        (``K`` has exact rank below ``rank``).

        Parameters
        ----------
        diag : array_like, shape (n,)
            Kernel diagonal.
        column_fn : callable
            ``column_fn(indices: ndarray[int] (b,)) -> K[:, indices]`` (n, b) float64.
        rank : int
            Maximum number of pivots (capped at ``n``).
        noise : float
            ``> 0``, the ``noise`` of ``A = K + noise I``.
        tol : float, default 1e-8
            Relative residual-trace stopping tolerance.
        block_size : int, default 1
            Pivots fetched per ``column_fn`` call: the ``block_size`` largest residual
            diagonals, then factored one after the other (a pivot whose residual diagonal has
            collapsed in between is skipped). 1 is the exact greedy algorithm; larger blocks
            trade a slightly worse choice for fewer (out-of-core) column fetches.

        Returns
        -------
        PivotedCholesky
        """
        d = _check_diag(diag).copy()
        n = d.size
        rank = _check_rank(rank, n)
        noise = _check_noise(noise, positive=True)
        if not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol >= 0):
            raise ValueError(f"tol: expected a finite number >= 0, got {tol!r}")
        if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) or block_size < 1:
            raise ValueError(f"block_size: expected an integer >= 1, got {block_size!r}")
        trace0 = float(d.sum())
        # a pivot below this is rounding noise: stop rather than divide by it
        floor = max(np.finfo(np.float64).eps * n * float(d.max(initial=0.0)), np.finfo(np.float64).tiny)
        lf = np.zeros((n, rank))
        pivots: list[int] = []
        m = 0
        while m < rank:
            if float(d.sum()) <= tol * trace0 or float(d.max()) <= floor:
                break
            want = min(block_size, rank - m)
            if want == 1:
                cand = np.array([int(np.argmax(d))])
            else:
                cand = np.argpartition(-d, want - 1)[:want]
                cand = cand[np.argsort(-d[cand], kind="stable")]
                cand = cand[d[cand] > floor]
            cols = _columns(column_fn, cand.astype(np.intp), n)
            for j, i in enumerate(cand):
                if m >= rank or d[i] <= floor:
                    continue
                col = cols[:, j] - lf[:, :m] @ lf[i, :m]
                col /= math.sqrt(d[i])
                lf[:, m] = col
                d -= col * col
                pivots.append(int(i))
                d[pivots] = 0.0  # exact zeros on pivots (rounding would leave +-eps)
                np.maximum(d, 0.0, out=d)
                m += 1
        info = {"pivots": np.array(pivots, dtype=np.intp), "residual_trace": float(d.sum()),
                "trace": trace0}
        return cls(lf[:, :m], noise, name="pivoted_cholesky", info=info)


class Nystrom(LowRank):
    """Column-subset Nystrom approximation ``K ~= C W^+ C^T`` ([3]_), Woodbury-applied.

    Landmarks are ``rank`` indices drawn uniformly without replacement (seeded), a choice
    that needs no kernel diagonal and no pass over ``K``; ``C = K[:, S]`` (n, r) and
    ``W = K[S, S]``. ``W`` is eigendecomposed and eigenvalues below ``rcond * max`` are
    dropped (a stable pseudo-inverse), so ``L = C V diag(lambda^{-1/2})`` and
    ``L L^T = C W^+ C^T <= K``. On NNGP kernels the pivoted Cholesky is usually the better
    preconditioner for the same rank; Nystrom is cheaper to build (one batched column fetch).
    ``info`` holds ``landmarks``, ``kept`` (the numerical rank of ``W``) and ``transform`` (``T``, r x kept,
    with ``F = C T``).
    """

    @classmethod
    def build(cls, column_fn: ColumnFn, n: int, rank: int, noise: float, seed: int | None = 0, *,
              rcond: float = 1e-10, block_size: int = 256) -> Nystrom:
        """Build from ``rank`` uniformly drawn landmark columns.

        Parameters
        ----------
        column_fn : callable
            ``column_fn(indices: ndarray[int] (b,)) -> K[:, indices]`` (n, b) float64.
        n : int
            System size.
        rank : int
            Number of landmarks (capped at ``n``).
        noise : float
            ``> 0``.
        seed : int or None, default 0
            Seed of the landmark draw (``numpy.random.default_rng``).
        rcond : float, default 1e-10
            Relative eigenvalue cut-off for ``W^+``.
        block_size : int, default 256
            Landmark columns per ``column_fn`` call.
        """
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"n: expected an integer >= 1, got {n!r}")
        n = int(n)
        rank = _check_rank(rank, n)
        noise = _check_noise(noise, positive=True)
        landmarks = nystrom_landmarks(n, rank, seed)
        if rank == 0:
            return cls(np.zeros((n, 0)), noise, name="nystrom", info={"landmarks": landmarks, "kept": 0})
        c = np.empty((n, rank))
        for i in range(0, rank, block_size):
            c[:, i:i + block_size] = _columns(column_fn, landmarks[i:i + block_size], n)
        w = c[landmarks]
        w = 0.5 * (w + w.T)
        lam, v = scipy.linalg.eigh(w, check_finite=False)
        keep = lam > rcond * max(float(lam[-1]), 0.0)
        info = {"landmarks": landmarks, "kept": int(keep.sum())}
        if not np.any(keep):
            return cls(np.zeros((n, 0)), noise, name="nystrom", info=info)
        lf = c @ (v[:, keep] / np.sqrt(lam[keep]))
        del c
        # L's SVD through its r x r Gram, L^T L = W diag(s^2) W^T, and F = L W = U diag(s): one syrk
        # and one (n, r) x (r, r) product, where a thin QR of L, the SVD of its triangle and Q W
        # took 3x as long (109 s against 37 s at n = 60,000, r = 4,096; the MNIST preconditioner
        # build went from 156 s to 79 s: benchmarks/RESULTS.md). F F^T = L L^T holds to rounding
        # whatever the Gram's accuracy; the small s^2 are known only to about eps s_max^2, which
        # moves M^-1 by about eps s_max^2 / noise relative (see _set).
        gram = gram_upper(lf.T)  # upper triangle; lf.T is Fortran-ordered
        gram = np.triu(gram) + np.triu(gram, 1).T
        sig2, w2 = scipy.linalg.eigh(gram, check_finite=False)
        f = lf @ w2[:, ::-1]
        s = np.sqrt(np.clip(sig2[::-1], 0.0, None))
        # F = C T: rows added to K later get their rows of F from their kernel columns at the
        # landmarks alone (nngp_dask.linalg.extend)
        info["transform"] = (v[:, keep] / np.sqrt(lam[keep])) @ w2[:, ::-1]
        return cls._from_ordered_factor(f, s, noise, name="nystrom", info=info)


def nystrom_landmarks(n: int, rank: int, seed: int | None = 0) -> NDArray[np.intp]:
    """The ``rank`` Nystrom landmarks of an ``n``-point kernel: sorted, drawn without replacement."""
    return np.sort(np.random.default_rng(seed).choice(n, size=rank, replace=False)).astype(np.intp)


def make_preconditioner(
    name: str,
    *,
    diag: ArrayLike | None = None,
    column_fn: ColumnFn | None = None,
    noise: float,
    rank: int | None = None,
    seed: int | None = 0,
    n: int | None = None,
) -> Preconditioner:
    """Build a preconditioner by name.

    Parameters
    ----------
    name : {"none", "jacobi", "pivoted_cholesky", "nystrom", "auto"}
        ``"auto"`` is ``"nystrom"`` with rank ``min(n, AUTO_RANK=1024)`` when ``column_fn``
        is given (NNGP spectra decay fast; on MNIST n = 10,000 it cut CG iterations from 233
        to 25 and costs less to build than a rank-512 pivoted Cholesky, which needed 46;
        benchmarks/RESULTS.md), ``"jacobi"`` when only ``diag`` is, else ``"none"``.
    diag : array_like, shape (n,), optional
        Kernel diagonal (``"jacobi"``, ``"pivoted_cholesky"``).
    column_fn : callable, optional
        ``indices -> K[:, indices]`` (``"pivoted_cholesky"``, ``"nystrom"``).
    noise : float
        The noise of ``A = K + noise I``.
    rank : int, optional
        Low-rank size (default ``min(n, AUTO_RANK)``).
    seed : int or None
        Landmark seed (``"nystrom"``).
    n : int, optional
        System size, needed only when ``diag`` is not given.

    Returns
    -------
    Preconditioner
    """
    if name not in PRECONDITIONERS:
        raise ValueError(f"preconditioner: expected one of {list(PRECONDITIONERS)}, got {name!r}")
    if diag is not None:
        diag = _check_diag(diag)
        if n is not None and n != diag.size:
            raise ValueError(f"n: expected {diag.size} (the length of diag), got {n!r}")
        n = diag.size
    if n is None:
        raise ValueError("n: expected the system size (or diag), got None")
    if name == "auto":
        name = "nystrom" if column_fn is not None else ("jacobi" if diag is not None else "none")
    if rank is None:
        rank = min(n, AUTO_RANK)
    if name == "none":
        return Identity(n)
    if name == "jacobi":
        if diag is None:
            raise ValueError("diag: expected the kernel diagonal (n,) for preconditioner='jacobi', got None")
        return Jacobi(diag, noise)
    if column_fn is None:
        raise ValueError(f"column_fn: expected a callable indices -> K[:, indices] for preconditioner={name!r}, "
                         "got None")
    if name == "pivoted_cholesky":
        if diag is None:
            raise ValueError("diag: expected the kernel diagonal (n,) for preconditioner='pivoted_cholesky', "
                             "got None")
        return PivotedCholesky.build(diag, column_fn, rank, noise)
    return Nystrom.build(column_fn, n, rank, noise, seed)
