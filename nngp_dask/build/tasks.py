"""The worker side of a build: one task computes, writes (with its CRC32C) and records one tile,
and returns only a few numbers, so no tile travels through the scheduler."""

from __future__ import annotations

import json
import time
from functools import lru_cache
from typing import cast

import numpy as np
import zarr

from ..kernels import Architecture, KernelOverflowError, all_finite, overflow_reason, tile as tile_fn
from ..store import DIAGONALS, DropBehind, diagonals_path, done_path, inputs_path, open_group, tile_io, wants_drop

__all__ = ["tile_task"]


@lru_cache(maxsize=8)
def _array(url: str, options: str, token: str, path: str) -> zarr.Array:
    """An array of the store, opened once per worker and store identity (``token``): its metadata
    does not change while the identity holds."""
    return cast(zarr.Array, open_group(url, json.loads(options) or None)[path])


@lru_cache(maxsize=6)
def _block(url: str, options: str, token: str, path: str, index: int, tile: int, dtype: str = "float64") -> np.ndarray:
    """A row block of stored inputs (in the GEMM's ``dtype``) or diagonals, cached per worker: tasks
    are submitted row by row, so consecutive tiles share their row block."""
    arr = _array(url, options, token, path)
    sl = slice(index * tile, min((index + 1) * tile, arr.shape[-1] if path.startswith(DIAGONALS) else arr.shape[0]))
    return np.asarray(arr[:, sl]) if path.startswith(DIAGONALS) else np.ascontiguousarray(arr[sl], dtype=dtype)


def tile_task(url: str, options: str, token: str, part: str, i: int, j: int, arch: Architecture, kind: str,
               dtype: str, tile: int, page_cache: str, stored_bytes: int) -> tuple[str, int, int, float, float, float]:
    """Compute, write and record one tile; returns ``(part, i, j, seconds reading inputs, computing,
    writing and recording)``."""
    t0 = time.perf_counter()
    rows = "test" if part == "test_train" else "train"
    xr = _block(url, options, token, inputs_path(rows), i, tile, dtype)
    xc = _block(url, options, token, inputs_path("train"), j, tile, dtype)
    dr = _block(url, options, token, diagonals_path(rows), i, tile)
    dc = _block(url, options, token, diagonals_path("train"), j, tile)
    symmetric = part == "train_train" and i == j
    t1 = time.perf_counter()
    values = tile_fn(arch, xr, xc, dr, dc, kind=kind, dtype=dtype, symmetric=symmetric)
    if not all_finite(values):  # neither written nor recorded: the build stops and names the setting
        raise KernelOverflowError(f"kernel/{part} tile ({i}, {j}) has non-finite values: "
                                  + _overflow_why(arch, dtype, dr, dc))
    t2 = time.perf_counter()
    path = tile_io(url, options, token, part).write(i, j, values)  # with its CRC32C
    if path is not None and wants_drop(page_cache, stored_bytes):
        _DROP_BEHIND.written(path)
    # after the write returned: the record never runs ahead of the data
    _array(url, options, token, done_path(part))[i, j] = 1
    return part, i, j, t1 - t0, t2 - t1, time.perf_counter() - t2


def _overflow_why(arch: Architecture, dtype: str, *diags: np.ndarray) -> str:
    for d in diags:
        reason = overflow_reason(arch, d, dtype=dtype)
        if reason:
            return reason
    return (f"the recursion overflows with depth={arch.depth}, weight_var={arch.weight_var}; lower depth or "
            "weight_var, use dtype='float64', or scale the inputs")


#: this worker process's recently written tiles (see :mod:`nngp_dask.store.pagecache`)
_DROP_BEHIND = DropBehind()
