"""Warm starts: a solve of a store that grew by an append starts from the solution of its prefix.

After an append (:mod:`nngp_dask.build.writer`) the store keeps, in ``lineage``, the train tokens
and row counts of the identities it grew from, and keeps the solutions (``alpha``) of their
solves. A new solve with the same noise and number of right-hand sides then starts CG from
``[alpha_prefix; 0]``: the old rows' weights are close to the new ones when few rows were added,
so the starting residual is small. It is only a starting guess, never trusted: CG's stopping test
is on the true residual of the new system, and :func:`nngp_dask.linalg.batched_cg` drops the
guess of any column whose starting residual is larger than that of zero.

Its Nystrom preconditioner is carried over too (:func:`extended_preconditioner`): the new rows'
kernel columns at its landmarks extend its factor (:class:`nngp_dask.linalg.ExtendedNystrom`),
which costs m x r kernel entries for m new rows where a new one costs n x r and three
(n, r) x (r, r) products.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any, cast

import numpy as np
import zarr
from numpy.typing import NDArray

from ..linalg import EXTEND_MAX_GROWTH, ExtendedNystrom
from ..store import SOLVES, KernelStore, solve_path

__all__ = ["extended_preconditioner", "previous_solution", "targets_hash"]


def targets_hash(y: NDArray) -> str:
    """Fingerprint of targets (float64, as solved): says whether a prefix's targets are unchanged."""
    return hashlib.blake2b(np.ascontiguousarray(y, dtype=np.float64).tobytes(), digest_size=10).hexdigest()


def previous_solution(ks: KernelStore, y: NDArray, noise: float) -> tuple[NDArray | None, dict[str, Any]]:
    """The starting guess for a solve of ``(K + noise I) alpha = y`` on ``ks``: the solution of the
    longest prefix of the stored rows solved with this noise and as many right-hand sides,
    padded with zeros for the rows added since, or ``(None, {})`` when there is none.

    Returns
    -------
    x0 : ndarray (n, k) or None
    info : dict
        ``from`` (the solve's key), ``rows`` (its row count), ``iterations`` (what it took),
        ``targets_unchanged`` (whether the prefix's targets are those it solved).
    """
    lineage = {e.get("token"): int(e.get("n_train", 0)) for e in ks.meta.get("lineage") or [] if isinstance(e, dict)}
    if not lineage or SOLVES not in ks.group:
        return None, {}
    n, k = y.shape
    best: tuple[int, str, zarr.Group] | None = None
    for key, g in cast(zarr.Group, ks.group[SOLVES]).groups():  # solves/ is a group of groups
        a = g.attrs
        rows = lineage.get(a.get("kernel"))
        if (rows and a.get("status") == "done" and a.get("noise") == noise and a.get("n_rhs") == k
                and "alpha" in g and (best is None or rows > best[0])):
            best = (rows, key, g)
    if best is None:
        return None, {}
    rows, key, g = best
    alpha = np.asarray(cast(zarr.Array, g["alpha"])[...], dtype=np.float64).reshape(rows, k)
    x0 = np.zeros((n, k))
    x0[:rows] = alpha
    info = {"from": key, "rows": rows, "iterations": int(cast(int, g.attrs.get("iterations", 0))),
            "targets_unchanged": g.attrs.get("y_hash") == targets_hash(y[:rows])}
    return x0, info


def extended_preconditioner(ks: KernelStore, source: str | None, name: str, noise: float, rank: int,
                            columns: Callable[[int], Callable[[NDArray], NDArray]]
                            ) -> tuple[ExtendedNystrom | None, str]:
    """The Nystrom preconditioner of the solve ``source`` (a solve of a prefix of the stored rows,
    with the same noise: :func:`previous_solution`) extended to the grown kernel, with a line saying
    so, or, for a solve of all the rows (a killed solve resuming), reloaded as it was saved;
    ``(None, "")`` when a new one is to be built: another preconditioner was asked for, the
    source kept no Nystrom factor of this rank, or the rows grew past ``EXTEND_MAX_GROWTH`` times
    those its landmarks were drawn from.

    ``columns(first)`` returns ``idx -> K[first:, idx]``.
    """
    if source is None or name not in ("nystrom", "auto"):
        return None, ""
    g = cast(zarr.Group, ks.group[solve_path(source)])  # a solve is a group of arrays
    if not all(k in g for k in ("lowrank_factor", "nystrom_transform", "nystrom_landmarks")):
        return None, ""
    landmarks = np.asarray(cast(zarr.Array, g["nystrom_landmarks"])[...], dtype=np.intp)
    pool, n = int(cast(int, g.attrs.get("nystrom_pool", 0))), ks.shape[0]  # an int, as save_factor writes it
    if landmarks.size != rank or not pool or n > EXTEND_MAX_GROWTH * pool:
        return None, ""
    factor = np.asarray(cast(zarr.Array, g["lowrank_factor"])[...])  # float32, kept so (ExtendedNystrom)
    rows = factor.shape[0]
    new = np.empty((n - rows, landmarks.size))
    if rows < n:
        fetch = columns(rows)
        for i in range(0, landmarks.size, 512):  # bounded temporaries however many rows were added
            new[:, i:i + 512] = fetch(landmarks[i:i + 512])
    gram = np.asarray(cast(zarr.Array, g["nystrom_gram"])[...]) if "nystrom_gram" in g else None
    transform = np.asarray(cast(zarr.Array, g["nystrom_transform"])[...])
    pre = ExtendedNystrom.extend(factor, gram, transform, landmarks, new, noise, pool=pool)
    if rows == n:
        return pre, f"Nystrom (rank {pre.rank}) reloaded from solve {source} (as stored: float32)"
    return pre, (f"Nystrom (rank {pre.rank}) of solve {source} extended from {rows} to {n} rows "
                 f"(landmarks drawn from its first {pool} rows)")
