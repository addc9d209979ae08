"""GP regression on a kernel store: ``alpha = (K + noise I)^{-1} Y``, posterior mean and variance.

Two solvers: a dense Cholesky (SciPy) for ``n <= DIRECT_MAX_N`` and batched preconditioned CG
over the stored tiles above it (or on request). CG state is checkpointed into the store
every few iterations in two alternating slots, and the slot pointer is written last, so a
killed solve resumes from its last complete checkpoint and a finished one is not redone.

Predictions (mean and variance): :mod:`nngp_dask.gp.prediction`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import scipy.linalg
import zarr
from numpy.typing import ArrayLike, DTypeLike, NDArray

from .. import defaults
from ..cluster import client_for
from ..kernels import tile as tile_fn
from ..linalg import (
    AUTO_RANK,
    PRECONDITIONERS,
    CGState,
    ConvergenceWarning,
    ExtendedNystrom,
    LowRank,
    batched_cg,
    block_cg,
    cholesky_factor,
    default_maxiter,
    make_preconditioner,
)
from ..monitor import tracked
from ..store import KernelStore, diagonals_path, dimension_names, inputs_path, open_kernel, solve_path
from .likelihood import amplitude_mle
from .nystrom_store import stored_nystrom
from .operator import StoredKernelOperator, stored_matmat
from .warmstart import extended_preconditioner, previous_solution, targets_hash

__all__ = ["DIRECT_MAX_N", "SolveResult", "dense_kernel", "open_store", "solve", "solve_preconditioner"]

log = logging.getLogger("nngp_dask")

#: Below this many training points ``method="auto"`` factorises the dense kernel (read into
#: float64 and factorised in place: 8 n^2 bytes, 200 MB at the threshold; ~1 s).
DIRECT_MAX_N = 5000
METHODS = ("auto", "cg", "block_cg", "cholesky")


@dataclass(frozen=True)
class SolveResult:
    """The outcome of :func:`solve`.

    Attributes
    ----------
    alpha : ndarray, shape (n, k) (or (n,) for 1-D ``y``)
    iterations : int
        CG iterations (0 for Cholesky).
    residuals : ndarray, shape (iterations + 1, k)
        Relative residual per iteration and column.
    converged : bool
    noise, tol : float
    method : {"cg", "block_cg", "cholesky"}
    preconditioner : str
    key : str
        Names the solve in the store (``solves/<key>``).
    info : dict
        Diagnostics; ``info["amplitude"]`` is :func:`nngp_dask.gp.amplitude_mle` of the targets:
        the factor by which to scale the predictive variance (latent and noise) for a kernel
        amplitude fitted by marginal likelihood.
    resumed_from : int
        Iteration the solve resumed from (0 when it started afresh, -1 when loaded finished).
    factor : ndarray, shape (n, n), or None
        For a Cholesky solve run in this process, ``L`` with ``L L^T = K + noise I`` in its lower
        triangle, as scikit-learn's ``GaussianProcessRegressor.L_``: :func:`nngp_dask.gp.predict`
        reuses it for exact variances instead of factorising again. Not stored: a solve loaded
        from the store has None.
    """

    alpha: NDArray[np.float64]
    iterations: int
    residuals: NDArray[np.float64]
    converged: bool
    noise: float
    tol: float
    method: str
    preconditioner: str
    key: str
    resumed_from: int = 0
    wall_s: float = 0.0
    matmat_s: float = 0.0
    info: dict = field(default_factory=dict)
    factor: NDArray[np.float64] | None = field(default=None, repr=False, compare=False)

    def summary(self) -> str:
        worst = float(np.max(self.residuals[-1])) if self.residuals.size else 0.0
        return (f"{self.method} ({self.preconditioner}): {'converged' if self.converged else 'NOT converged'} "
                f"in {self.iterations} iterations, worst relative residual {worst:.2g}, {self.wall_s:.1f} s")


def _check_solve_args(ks: KernelStore, y: ArrayLike, noise: Any, tol: Any, preconditioner: str, method: str
                      ) -> tuple[NDArray, bool, float, float]:
    if isinstance(noise, bool) or not isinstance(noise, (int, float, np.floating, np.integer)) \
            or not np.isfinite(noise) or noise < 0:
        raise ValueError(f"noise: expected a finite number >= 0, got {noise!r}")
    if isinstance(tol, bool) or not isinstance(tol, (int, float, np.floating)) or not np.isfinite(tol) or tol <= 0:
        raise ValueError(f"tol: expected a finite number > 0, got {tol!r}")
    if preconditioner not in PRECONDITIONERS:
        raise ValueError(f"preconditioner: expected one of {list(PRECONDITIONERS)}, got {preconditioner!r}")
    if method not in METHODS:
        raise ValueError(f"method: expected one of {list(METHODS)}, got {method!r}")
    arr = np.asarray(y)
    if arr.dtype.kind not in "biuf" or arr.ndim not in (1, 2):
        raise ValueError(f"y: expected a numeric array of shape (n,) or (n, k), got {arr.dtype} {arr.shape}")
    if arr.shape[0] != ks.shape[0]:
        raise ValueError(f"y: expected {ks.shape[0]} rows (one per training input), got {arr.shape[0]}")
    bad = ~np.isfinite(arr.reshape(arr.shape[0], -1)).all(axis=1)
    if bad.any():
        raise ValueError(f"y: row {int(np.argmax(bad))} holds NaN or Inf; expected finite targets")
    squeeze = arr.ndim == 1
    return np.asarray(arr, dtype=np.float64).reshape(arr.shape[0], -1), squeeze, float(noise), float(tol)


def dense_kernel(ks: KernelStore, dtype: DTypeLike | None = None) -> NDArray:
    """The train x train kernel in memory, as stored (float32 or float64) or in ``dtype`` (each
    tile converted as it is placed: no second n x n array): each upper tile read once in this
    process (verified) and mirrored. ``to_dask().compute()`` moves the same bytes through the
    cluster: 23 s against 1.5 s at n = 4,000 (both measured on a machine at load 20)."""
    io, t, n = ks.tiles("train_train"), ks.tile, ks.shape[0]
    out = np.empty((n, n), dtype=ks.dtype if dtype is None else dtype)
    for i, j in ks.grid.upper_tiles():
        block = io.read(i, j)
        out[i * t:i * t + block.shape[0], j * t:j * t + block.shape[1]] = block
        if i != j:
            out[j * t:j * t + block.shape[1], i * t:i * t + block.shape[0]] = block.T
    return out


def open_store(store: Any) -> KernelStore:
    """``store`` as a :class:`KernelStore`: itself, or opened from a path or URL."""
    if isinstance(store, KernelStore):
        return store
    if not isinstance(store, (str, os.PathLike)):
        raise TypeError(f"store: expected a KernelStore or a store path/URL, got {type(store).__name__}")
    return open_kernel(store)


def _column_fn(ks: KernelStore, rows: slice = slice(None)):
    """``idx -> K[rows, idx]`` computed from the stored inputs with the tile function (no pass over
    the stored kernel). Inputs are read once and kept (n x d float64)."""
    arch, kind = ks.architecture, ks.kind
    x = np.asarray(ks.array(inputs_path("train"))[...])
    diag = np.asarray(ks.array(diagonals_path("train"))[...])

    def columns(idx: NDArray) -> NDArray:
        idx = np.asarray(idx, dtype=np.intp)
        return tile_fn(arch, x[rows], x[idx], diag[:, rows], diag[:, idx], kind=kind, dtype=np.float64)

    return columns


def solve_preconditioner(ks: KernelStore, name: str, noise: float, rank: int | None, client: Any,
                         progress: bool) -> Any:
    """The solve's preconditioner: Nystrom (also what ``"auto"`` picks) from the stored tiles on the
    workers (:mod:`nngp_dask.gp.nystrom_store`); the others from kernel columns of the inputs, counted
    in a progress bar and timed log lines."""
    n = ks.shape[0]
    rank = min(rank or AUTO_RANK, n)
    if name in ("nystrom", "auto"):
        return stored_nystrom(ks, client, rank, noise, progress=progress)
    columns = _column_fn(ks)
    if name in ("none", "jacobi"):
        return make_preconditioner(name, diag=ks.diagonal(), column_fn=columns, noise=max(noise, 1e-12), rank=rank,
                                   n=n)
    with tracked("preconditioner columns", rank, progress=progress, unit="col") as beat:
        def counted(idx: NDArray) -> NDArray:
            out = columns(idx)
            beat(beat.done + len(idx))
            return out

        return make_preconditioner(name, diag=ks.diagonal(), column_fn=counted, noise=max(noise, 1e-12), rank=rank,
                                   n=n)


def _expected_iterations(residuals: NDArray, tol: float, maxiter: int) -> int | None:
    """CG iterations to reach ``tol``, extrapolated from the worst column's residual decay so far
    (log-linear: an estimate; CG often speeds up later). A resumed solve's history includes the
    interrupted run's iterations, so its estimate is there from its first iteration on."""
    done = len(residuals) - 1
    if done < 2:
        return None
    start, now = float(np.max(residuals[0])), float(np.max(residuals[-1]))
    if not 0 < now < start:
        return None
    per_iteration = np.log(now / start) / done
    return int(min(maxiter, done + max(np.ceil(np.log(tol / now) / per_iteration), 0)))


def _solve_key(ks: KernelStore, y: NDArray, noise: float, tol: float, preconditioner: str, rank: int | None,
               method: str) -> str:
    h = hashlib.blake2b(digest_size=10)
    # the train kernel's token: a new test set leaves the solve valid
    h.update(json.dumps({"kernel": ks.identity.train_token(), "noise": noise, "tol": tol, "pre": preconditioner,
                         "rank": rank, "method": method, "shape": list(y.shape)}, sort_keys=True).encode())
    h.update(np.ascontiguousarray(y).tobytes())
    return h.hexdigest()


class _Checkpoints:
    """Two alternating slots under ``solves/<key>``; ``attrs['slot']`` points at the last complete one."""

    def __init__(self, ks: KernelStore, key: str, meta: dict) -> None:
        self.path = solve_path(key)
        self.group = ks.group.require_group(self.path)
        if not self.group.attrs.get("created"):
            self.group.attrs.update({**meta, "created": time.time(), "status": "running"})

    @property
    def attrs(self) -> dict:
        return dict(self.group.attrs)

    def load(self) -> CGState | None:
        slot = self.group.attrs.get("slot")
        if slot is None:
            return None
        g = cast(zarr.Group, self.group[f"slot{slot}"])
        # by name, not by listing the group: a killed metadata write leaves zarr's temporary
        # ``zarr.<uuid>.partial`` beside the arrays, which a listing warns about
        return CGState.from_arrays(cast(Mapping[str, Any], g))

    def save(self, state: CGState) -> None:
        slot = 1 - int(cast(int, self.group.attrs.get("slot", 1)))  # an int, as written below
        g = self.group.require_group(f"slot{slot}")
        for name, value in state.to_arrays().items():
            value = np.asarray(value)
            g.create_array(name, shape=value.shape, dtype=value.dtype, overwrite=True, compressors=None,
                           dimension_names=dimension_names(f"{self.path}/slot{slot}/{name}"))[...] = value
        self.group.attrs.update({"slot": slot, "iteration": int(state.iteration)})

    def save_solution(self, alpha: NDArray, residuals: NDArray, info: dict) -> None:
        for name, value in (("alpha", alpha), ("residuals", residuals)):
            self.group.create_array(name, shape=value.shape, dtype="float64", overwrite=True, compressors=None,
                                    dimension_names=dimension_names(f"{self.path}/{name}"))[...] = value
        self.group.attrs.update({**info, "status": "done"})

    def save_factor(self, pre: Any) -> None:
        """The preconditioner's low-rank factor (the low-rank variance reads it; float32, a block of
        columns at a time, so no second float64 copy of a large factor is made) and, for a Nystrom
        one, what extends it to a grown kernel (:mod:`nngp_dask.linalg.extend`)."""
        info = getattr(pre, "info", {})
        arr = self.group.create_array("lowrank_factor", shape=(pre.n, pre.rank), dtype="float32", overwrite=True,
                                      chunks=(pre.n, 256), compressors=None,
                                      dimension_names=dimension_names(f"{self.path}/lowrank_factor"))
        block = getattr(pre, "factor_block", None)
        full: NDArray | None = None if block is not None else pre.lowrank_factor
        for a in range(0, pre.rank, 256):
            b = min(a + 256, pre.rank)
            if block is not None:
                part = block(a, b)
            else:
                assert full is not None  # the whole factor is taken when it has no factor_block
                part = full[:, a:b]
            arr[:, a:b] = part.astype(np.float32)
        arrays = {"nystrom_transform": info.get("transform"), "nystrom_landmarks": info.get("landmarks"),
                  "nystrom_gram": info.get("gram")}
        for name, value in arrays.items():
            if value is not None:
                self.group.create_array(name, shape=value.shape, dtype=value.dtype, overwrite=True, compressors=None,
                                        dimension_names=dimension_names(f"{self.path}/{name}"))[...] = value
            elif name in self.group:
                del self.group[name]
        self.group.attrs.update({"factor_orthogonal": getattr(pre, "orthogonal", True),
                                 "nystrom_pool": int(info.get("pool", pre.n))})


def solve(
    store: KernelStore | str | os.PathLike,
    y: ArrayLike,
    *,
    noise: float,
    tol: float = defaults.TOL,
    maxiter: int | None = None,
    preconditioner: str = "auto",
    rank: int | None = None,
    method: str = "auto",
    checkpoint_every: int = 5,
    client: Any = None,
    progress: bool = True,
) -> SolveResult:
    """Solve ``(K + noise I) alpha = y`` for a stored kernel; resumable.

    Parameters
    ----------
    store : KernelStore or path/URL
        A complete kernel store (:func:`nngp_dask.build_kernel`).
    y : array_like, shape (n,) or (n, k)
        Targets; all columns are solved together (one pass over the tiles per iteration).
    noise : float
        Observation noise variance (>= 0) added to the diagonal.
    tol : float, default 1e-5
        Relative residual ``||r_j|| <= tol ||y_j||`` per column (CG); the default of pipelines
        and sweeps too (:data:`nngp_dask.defaults.TOL`). A solve is keyed by its tol: another
        value solves again, and finds its own checkpoints.
    maxiter : int, optional
        Default :func:`nngp_dask.linalg.cg.default_maxiter`.
    preconditioner : {"auto", "none", "jacobi", "pivoted_cholesky", "nystrom"}
        Low-rank ones are built from kernel columns computed from the stored inputs.
    rank : int, optional
        Preconditioner rank (default ``min(n, AUTO_RANK)`` = 1024).
    method : {"auto", "cg", "block_cg", "cholesky"}
        ``"auto"``: dense Cholesky for ``n <= DIRECT_MAX_N``, else CG. ``"cg"``: one CG recurrence
        per column (:func:`~nngp_dask.linalg.batched_cg`; a converged column leaves the product).
        ``"block_cg"``: every column searches all columns' Krylov spaces
        (:func:`~nngp_dask.linalg.block_cg`): fewer iterations, so fewer passes over the tiles,
        for several right-hand sides, at a slightly dearer iteration (MNIST's ten classes: 5-14 %
        fewer, benchmarks/RESULTS.md section 21); with one right-hand side it is ``"cg"``.
    checkpoint_every : int
        CG iterations between checkpoints.
    client : distributed.Client or address, optional

    Returns
    -------
    SolveResult

    Raises
    ------
    ValueError
        Bad noise, tol, y or names; ``IncompleteKernelError`` (a ValueError) when tiles are
        missing, naming them. All before any work.
    """
    if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, (int, np.integer)) \
            or checkpoint_every < 1:
        raise ValueError(f"checkpoint_every: expected an integer >= 1 (CG iterations between checkpoints), "
                         f"got {checkpoint_every!r}")
    if maxiter is not None and (isinstance(maxiter, bool) or not isinstance(maxiter, (int, np.integer))
                                or maxiter < 1):
        raise ValueError(f"maxiter: expected None or an integer >= 1, got {maxiter!r}")
    ks = open_store(store)
    y2, squeeze, noise, tol = _check_solve_args(ks, y, noise, tol, preconditioner, method)
    ks.require_complete("train_train")
    n = ks.shape[0]
    if method == "auto":
        method = "cholesky" if n <= DIRECT_MAX_N else "cg"
    pre_name = "none" if method == "cholesky" else preconditioner
    key = _solve_key(ks, y2, noise, tol, pre_name, rank, method)
    t0 = time.perf_counter()
    ck = _Checkpoints(ks, key, {"noise": noise, "tol": tol, "preconditioner": pre_name, "rank": rank,
                                 "method": method, "n_rhs": y2.shape[1], "kernel": ks.identity.train_token(),
                                 "n": n, "y_hash": targets_hash(y2)})
    maxiter = default_maxiter(n) if maxiter is None else int(maxiter)

    def finish(alpha, iterations, residuals, converged, resumed, matmat_s=0.0, info=None, factor=None):
        a = alpha[:, 0] if squeeze else alpha
        # the kernel amplitude's marginal-likelihood optimum: free given alpha (gp/likelihood.py)
        info = {**(info or {}), "amplitude": amplitude_mle(y2, alpha)}
        used = info.get("preconditioner_used") or pre_name  # "auto" resolved to what ran
        return SolveResult(a, iterations, residuals, converged, noise, tol, method, used, key, resumed,
                           time.perf_counter() - t0, matmat_s, info, factor)

    attrs = ck.attrs
    if attrs.get("status") == "done" and (attrs.get("converged") or attrs.get("iterations", 0) >= maxiter):
        log.info("solve %s already done in %s; loading alpha", key, ks.url)
        return finish(cast(zarr.Array, ck.group["alpha"])[...], attrs["iterations"],
                      cast(zarr.Array, ck.group["residuals"])[...],
                      bool(attrs["converged"]), -1,
                      info={k: attrs.get(k) for k in ("preconditioner_rank", "preconditioner_used",
                                                      "preconditioner_landmarks", "warm_start") if k in attrs})

    if method == "cholesky":
        # factorised in place (8 n^2 bytes at the peak); the residual from the stored tiles again
        lower = cholesky_factor(dense_kernel(ks, np.float64), noise, overwrite_k=True)[0]
        alpha = scipy.linalg.cho_solve((lower, True), y2, check_finite=False)
        res = np.linalg.norm(stored_matmat(ks, alpha) + noise * alpha - y2, axis=0) / np.maximum(
            np.linalg.norm(y2, axis=0), 1e-300)
        residuals = np.vstack([np.ones_like(res), res])
        ck.save_solution(alpha, residuals, {"iterations": 0, "converged": True})
        return finish(alpha, 0, residuals, True, 0, factor=lower)

    with client_for(client) as c:
        op = StoredKernelOperator(ks, noise, c)
        t_pre = time.perf_counter()
        state = ck.load()
        resumed = int(state.iteration) if state is not None else 0
        x0, warm = previous_solution(ks, y2, noise)
        # a resumed solve extends the same previous preconditioner again: the same M as it started with
        def carried_over(source: str | None) -> tuple[Any, str]:
            return extended_preconditioner(ks, source, pre_name, max(noise, 1e-12), min(rank or AUTO_RANK, n),
                                           lambda rows: _column_fn(ks, slice(rows, None)))

        pre, reused = carried_over(warm.get("from"))
        reloaded = False
        if pre is None and state is not None:
            # resuming: this solve's own preconditioner, saved before its first iteration, instead of
            # building it again (at 120,000 points that is a pass over ~30 GB on disk)
            pre, reused = carried_over(key)
            reloaded = pre is not None
        if pre is None:
            pre = solve_preconditioner(ks, pre_name, max(noise, 1e-12), rank, c, progress)
        pre_s = time.perf_counter() - t_pre
        # not lowrank_factor: a SplitLowRank's is a float64 copy
        if isinstance(pre, (LowRank, ExtendedNystrom)) and not reloaded:
            ck.save_factor(pre)
        if state is not None:
            # the interrupted run made one product per iteration, and one more for a warm start's
            # residual: the read order (and so the rounding) continues where it left off
            op.passes_before = resumed + (x0 is not None)
            x0, warm = None, {}
        if reused:
            log.info("preconditioner: %s", reused)
        if resumed:
            log.info("resuming solve %s from its checkpoint at iteration %d", key, resumed)
        elif x0 is not None:
            log.info("warm start from solve %s of the %d-row prefix (%d iterations there; its targets %s)",
                     warm["from"], warm["rows"], warm["iterations"],
                     "unchanged" if warm["targets_unchanged"] else "changed since")
        log.info("CG on %d x %d kernel, %d right-hand side(s), noise %g, preconditioner %s (rank %d, %.1f s)",
                 n, n, y2.shape[1], noise, pre.name, pre.rank, pre_s)
        beat = tracked("CG iterations", maxiter, progress=progress, initial=resumed, bound=True)

        def callback(s: CGState) -> None:
            worst = float(np.max(s.residuals[-1]))
            beat(s.iteration, f"worst relative residual {worst:.2e}, {int(np.sum(s.active))} column(s) active",
                 expected=_expected_iterations(s.residuals, tol, maxiter))
            beat.bar.set_postfix(residual=f"{worst:.2e}", active=int(np.sum(s.active)))
            if s.iteration % checkpoint_every == 0:
                ck.save(s)

        with warnings.catch_warnings(record=True) as caught, beat:
            warnings.simplefilter("always", ConvergenceWarning)
            solver = block_cg if method == "block_cg" else batched_cg
            result = solver(op.matmat, y2, tol=tol, maxiter=maxiter, preconditioner=pre, state=state, x0=x0,
                            callback=callback)
        for w in caught:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        ck.save(result.state)
        info = {"iterations": result.iterations, "converged": result.converged, "preconditioner_used": pre.name,
                "preconditioner_rank": pre.rank, "preconditioner_s": pre_s}
        if "landmarks" in getattr(pre, "info", {}):  # the rank asked for: W's numerical rank may be lower
            info["preconditioner_landmarks"] = len(pre.info["landmarks"])
        if reused:
            info["preconditioner_reused"] = reused
        if warm:
            # the starting residual says how much of the guess was kept (1.0: none, a cold start)
            info["warm_start"] = {**warm, "start_residual": float(np.max(result.residuals[0]))}
        ck.save_solution(result.x, result.residuals, info)
        log.info("%s", result.summary())
        return finish(result.x, result.iterations, result.residuals, result.converged, resumed, op.seconds, info)
