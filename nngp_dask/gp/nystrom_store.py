"""A Nystrom preconditioner built on the workers from the stored kernel.

The landmark columns ``C = K[:, S]`` are read from the stored tiles, not computed from the
inputs, by one task per contiguous run of tile rows (one run per worker thread): the task reads
each tile of its rows that holds landmark columns (the transposed upper tile below the diagonal),
keeps its rows of ``C`` in float32 (the stored values) on the worker, and returns only ``W``'s
rows and its share of the Gram ``C^T C`` (float64 accumulation). The driver does the ``r x r``
algebra (:func:`nngp_dask.linalg.nystrom.nystrom_transform`) and sends back ``T``; the same
workers multiply their kept rows, ``F = C T``, and return them float64 for the leading columns
and float32 for the rest (:class:`~nngp_dask.linalg.nystrom.SplitLowRank`). So the driver never
holds ``C``, ``F`` is assembled once, in place, and the kernel columns cost one read of the
stored rows instead of a kernel evaluation.

Same landmarks as :meth:`nngp_dask.linalg.Nystrom.build` with the same seed, so the same
preconditioner up to the storage's rounding (checked against the dense formula in tests/test_nystrom_store.py).
"""

from __future__ import annotations

import json
import operator as _op
from typing import Any

import numpy as np
from numpy.typing import NDArray

from .._blas import gram_upper
from ..linalg import FLOAT64_RATIO, SplitLowRank, nystrom_landmarks, nystrom_transform
from ..monitor import tracked
from ..store import KernelStore, dequantize, tile_io, unit_roundoff
from .operator import placement

__all__ = ["PROGRESS_WHAT", "stored_nystrom"]

#: What its progress lines and bar are called.
PROGRESS_WHAT = "preconditioner (Nystrom from the stored tiles)"


def _landmark_rows(io: Any, i: int, tile: int, landmarks: NDArray, bounds: NDArray, buf: NDArray) -> NDArray:
    """``K[rows of tile row i, landmarks]`` from the stored upper tiles, float32 as stored (and as
    int16 tiles are read)."""
    rows = min((i + 1) * tile, io.shape[0]) - i * tile
    c = np.empty((rows, landmarks.size), dtype=io.dtype)
    for j in range(bounds.size - 1):
        a, b = int(bounds[j]), int(bounds[j + 1])
        if a == b:
            continue
        local = landmarks[a:b] - j * tile
        # mapped, not copied: a tile read in from disk here is then cached as CG's passes want it
        # (2 MiB folios, store.pagecache.map_pages); buf serves object storage
        k, offset, scale = io.read_packed(i, j, buf, mapped=True) if j >= i else io.read_packed(j, i, buf, mapped=True)
        cols = k[:, local] if j >= i else k[local, :].T
        c[:, a:b] = dequantize(cols, offset, scale, c.dtype) if io.quantized else cols
    return c


def _columns_task(url: str, options: str, token: str, blocks: list[int], tile: int, landmarks: NDArray
                  ) -> tuple[tuple[NDArray, NDArray, NDArray], list[NDArray]]:
    """Rows of ``C`` for tile rows ``blocks`` (kept), with ``sum C_I^T C_I`` and the rows of ``W``."""
    io = tile_io(url, options, token, "train_train")
    buf = np.empty(io.nbytes, dtype=np.uint8)
    r = landmarks.size
    bounds = np.searchsorted(landmarks, np.arange(-(-io.shape[0] // tile) + 1) * tile)
    gram = np.zeros((r, r), order="F")
    kept, w_idx, w_rows = [], [], []
    for i in blocks:
        c = _landmark_rows(io, i, tile, landmarks, bounds, buf)
        c64 = c.astype(np.float64)
        # c64.T is Fortran-ordered: syrk reads it in place and accumulates the upper triangle
        gram = gram_upper(c64.T, gram)
        a, b = int(bounds[i]), int(bounds[i + 1])
        w_idx.append(np.arange(a, b))
        w_rows.append(c64[landmarks[a:b] - i * tile])
        kept.append(c)
        del c64
    gram = np.triu(gram) + np.triu(gram, 1).T
    return (gram, np.concatenate(w_idx), np.concatenate(w_rows)), kept


def _factor_task(parts: tuple[Any, list[NDArray]], t: NDArray, h: int) -> tuple[NDArray, NDArray]:
    """``F = C T`` over the kept rows: the first ``h`` columns float64, the others float32."""
    kept = parts[1]
    rows = sum(c.shape[0] for c in kept)
    hi = np.empty((rows, h))
    lo = np.empty((rows, t.shape[1] - h), dtype=np.float32)
    at = 0
    for c in kept:
        f = c.astype(np.float64) @ t
        hi[at:at + c.shape[0]] = f[:, :h]
        lo[at:at + c.shape[0]] = f[:, h:]
        at += c.shape[0]
    return hi, lo


def stored_nystrom(ks: KernelStore, client: Any, rank: int, noise: float, seed: int | None = 0, *,
                   rcond: float = 1e-10, float64_ratio: float = FLOAT64_RATIO, progress: bool = False
                   ) -> SplitLowRank:
    """The rank-``rank`` Nystrom preconditioner of ``K + noise I`` from the stored tiles.

    Parameters
    ----------
    ks : KernelStore
        Complete ``train_train``.
    client : distributed.Client
    rank : int
        Landmarks (capped at ``n``).
    noise : float
        ``> 0``.
    seed : int or None
        Landmark seed (the landmarks of :meth:`nngp_dask.linalg.Nystrom.build`).
    rcond : float
        Relative eigenvalue cut-off of ``W^+``; raised to the storage precision's epsilon.
    float64_ratio : float
        Factor columns with ``s^2 > float64_ratio * noise`` are kept in float64.
    progress : bool
        A progress bar over the tile rows read (timed log lines either way).

    Returns
    -------
    SplitLowRank
        ``info``: ``landmarks``, ``kept`` (the numerical rank of ``W``), ``float64_columns``.
    """
    n, tile = ks.shape[0], ks.tile
    rank = int(min(rank, n))
    landmarks = nystrom_landmarks(n, rank, seed)
    # no finer than the stored values resolve: float32's epsilon, or an int16 tile's level
    rcond = max(float(rcond), float(np.finfo(ks.dtype).eps), unit_roundoff(ks.stored_dtype))
    options = json.dumps(ks.storage_options or {}, sort_keys=True)
    blocks = list(range(-(-n // tile)))
    slots = max(1, sum(client.nthreads().values()))
    groups = [list(g) for g in np.array_split(blocks, min(slots, len(blocks))) if len(g)]
    where = placement(client, len(groups))
    cols = [client.submit(_columns_task, ks.url, options, ks.identity.token(), g, tile, landmarks, pure=False, **w)
            for g, w in zip(groups, where)]
    # only the r x r summaries travel; the rows of C stay where they were read
    from distributed import as_completed  # here: importing distributed costs an up-to-date re-run ~0.6 s

    parts = [client.submit(_op.getitem, f, 0, pure=False) for f in cols]
    rows_of = {p.key: len(g) for p, g in zip(parts, groups)}
    with tracked(PROGRESS_WHAT, len(blocks), progress=progress, unit="tile row") as beat:
        for part in as_completed(parts, loop=client.loop):
            beat(beat.done + rows_of[part.key])
    summaries = client.gather(parts)
    w = np.empty((rank, rank))
    gram = summaries[0][0]
    for k, (g, idx, rows) in enumerate(summaries):
        w[idx] = rows
        if k:
            gram += g
    del summaries
    t, s = nystrom_transform(w, gram, rcond=rcond)
    del w, gram
    h = int(np.sum(s * s > float64_ratio * noise))
    tf = client.scatter(t, hash=False)
    facts = [client.submit(_factor_task, f, tf, h, pure=False) for f in cols]
    f_hi = np.empty((n, h))
    f_lo = np.empty((n, s.size - h), dtype=np.float32)
    starts = [g[0] * tile for g in groups]
    for k in range(len(facts)):
        hi, lo = facts[k].result()
        f_hi[starts[k]:starts[k] + hi.shape[0]] = hi
        f_lo[starts[k]:starts[k] + lo.shape[0]] = lo
        facts[k] = cols[k] = None  # the worker's rows of C and F go as soon as they are copied
        del hi, lo
    # transform and pool: what extends it to appended rows (nngp_dask.linalg.ExtendedNystrom)
    info = {"landmarks": landmarks, "kept": int(s.size), "float64_columns": h, "source": "stored tiles",
            "transform": t, "pool": n}
    return SplitLowRank(f_hi, f_lo, s, noise, name="nystrom", info=info)
