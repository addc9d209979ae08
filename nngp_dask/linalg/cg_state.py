"""The value objects of :func:`~nngp_dask.linalg.batched_cg`: its immutable iterate
(:class:`CGState`, checkpointed by a solve and accepted back to resume bit-identically) and its
result (:class:`CGResult`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

__all__ = ["CGResult", "CGState"]


def readonly(a: NDArray) -> NDArray:
    """``a`` itself, made read-only (no copy)."""
    a.setflags(write=False)
    return a


@dataclass(frozen=True, eq=False)
class CGState:
    """The complete, immutable iterate of :func:`batched_cg` (enough to resume exactly).

    Arrays are read-only float64 (``active`` is bool). ``n`` is the system size, ``k``
    the number of right-hand sides.

    Attributes
    ----------
    x : ndarray, shape (n, k)
        Current solution estimate.
    r : ndarray, shape (n, k)
        Current residual ``b - A x`` (recursively updated; replaced by the true residual
        wherever that is computed: every ``true_residual_every`` iterations, and to confirm a
        column's convergence).
    z : ndarray, shape (n, k)
        Preconditioned residual ``M^{-1} r``.
    p : ndarray, shape (n, k)
        Search directions.
    rz : ndarray, shape (k,)
        ``r_j^T z_j`` per column.
    iteration : int
        Number of iterations done (each one ``matmat`` call on the active columns).
    active : ndarray of bool, shape (k,)
        Columns still iterating (not converged, not broken down). An active column whose last
        residual is at the tolerance waits for the next iteration to confirm it.
    residuals : ndarray, shape (iteration + 1, k)
        Relative residual ``||r_j|| / ||b_j||`` per iteration and column (row 0 is the
        start); a frozen column repeats its final value.
    b_norm : ndarray, shape (k,)
        ``||b_j||``; checked on resume so a state cannot be applied to another ``b``.
    """

    x: NDArray[np.float64]
    r: NDArray[np.float64]
    z: NDArray[np.float64]
    p: NDArray[np.float64]
    rz: NDArray[np.float64]
    iteration: int
    active: NDArray[np.bool_]
    residuals: NDArray[np.float64]
    b_norm: NDArray[np.float64]

    _ARRAYS = ("x", "r", "z", "p", "rz", "active", "residuals", "b_norm")

    def __post_init__(self) -> None:
        x = np.asarray(self.x)
        if x.ndim != 2:
            raise ValueError(f"state.x: expected a 2-D array (n, k), got shape {x.shape}")
        n, k = x.shape
        expected = {"x": (n, k), "r": (n, k), "z": (n, k), "p": (n, k), "rz": (k,), "active": (k,),
                    "b_norm": (k,)}
        for name in self._ARRAYS:
            dtype = np.bool_ if name == "active" else np.float64
            arr: NDArray = np.asarray(getattr(self, name), dtype=dtype)
            if arr.flags.writeable or arr.base is not None:  # fresh read-only arrays are kept as they are
                arr = arr.copy()
            if name in expected and arr.shape != expected[name]:
                raise ValueError(f"state.{name}: expected shape {expected[name]}, got {arr.shape}")
            object.__setattr__(self, name, readonly(arr))
        it = self.iteration
        if isinstance(it, np.ndarray):
            it = it.item()
        if isinstance(it, bool) or not isinstance(it, (int, np.integer)) or it < 0:
            raise ValueError(f"state.iteration: expected an integer >= 0, got {self.iteration!r}")
        object.__setattr__(self, "iteration", int(it))
        if self.residuals.shape != (self.iteration + 1, k):
            raise ValueError(f"state.residuals: expected shape {(self.iteration + 1, k)} "
                             f"(iteration + 1, k), got {self.residuals.shape}")

    @property
    def shape(self) -> tuple[int, int]:
        """``(n, k)``."""
        return self.x.shape

    def to_arrays(self) -> dict[str, NDArray]:
        """Plain arrays, one per field, e.g. to write into a Zarr group.

        ``iteration`` is a 0-d int64 array. :meth:`from_arrays` inverts this exactly.
        """
        out: dict[str, NDArray] = {name: np.array(getattr(self, name)) for name in self._ARRAYS}
        out["iteration"] = np.array(self.iteration, dtype=np.int64)
        return out

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, Any]) -> CGState:
        """Rebuild a state from :meth:`to_arrays` output (or Zarr arrays with those names)."""
        names = cls._ARRAYS + ("iteration",)
        missing = [name for name in names if name not in arrays]
        if missing:
            raise ValueError(f"state: missing array {missing[0]!r}; expected arrays {list(names)}")
        values: dict[str, Any] = {name: np.asarray(arrays[name][...]) for name in names}
        values["iteration"] = int(values["iteration"])
        return cls(**values)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CGState):
            return NotImplemented
        return self.iteration == other.iteration and all(
            np.array_equal(getattr(self, n), getattr(other, n)) for n in self._ARRAYS)

    __hash__ = None  # type: ignore[assignment]


@dataclass(frozen=True, eq=False)
class CGResult:
    """Outcome of :func:`batched_cg`.

    Attributes
    ----------
    x : ndarray, shape (n, k) or (n,)
        The solution ``A^{-1} b`` (1-D when ``b`` was 1-D). Also available as ``alpha``.
    iterations : int
        Total iterations (including those done before a resume).
    residuals : ndarray, shape (iterations + 1, k)
        Relative residual per iteration and column; NaN-free, frozen columns keep their
        final value. Always 2-D, also for a 1-D ``b``.
    converged_columns : ndarray of bool, shape (k,)
        Whether each column reached ``||r_j|| <= tol ||b_j||``.
    tol : float
        The tolerance used.
    state : CGState
        The final iterate: pass it back as ``state=`` (with a larger ``maxiter``) to go on.
    """

    x: NDArray[np.float64]
    iterations: int
    residuals: NDArray[np.float64]
    converged_columns: NDArray[np.bool_]
    tol: float
    state: CGState = field(repr=False)

    @property
    def alpha(self) -> NDArray[np.float64]:
        """The solution, under its GP name (``alpha = (K + noise I)^{-1} y``)."""
        return self.x

    @property
    def converged(self) -> bool:
        """True when every column converged."""
        return bool(np.all(self.converged_columns))

    def summary(self) -> str:
        """One line: convergence, iterations, worst final relative residual."""
        k = self.converged_columns.size
        worst = float(self.residuals[-1].max()) if k else 0.0
        status = "converged" if self.converged else (
            f"NOT converged ({int(np.sum(~self.converged_columns))} of {k} columns above tol)")
        return (f"CG {status}: {self.iterations} iterations, {k} right-hand side(s), "
                f"worst relative residual {worst:.3g} (tol {self.tol:.3g})")

    def __repr__(self) -> str:
        return f"CGResult({self.summary()})"
