"""Compile a run's Numba kernels once, in the driver, while its cluster starts.

A process that finds a kernel in Numba's on-disk cache loads it in milliseconds; one that does not
compiles it (several seconds on 2 cores). Started before the cluster, the driver's compile runs
while the worker processes start, and the workers then load what it wrote instead of each
compiling the same functions at the same time.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future

import numpy as np
from numpy.typing import DTypeLike

from ..kernels import Architecture, kernel
from ..linalg import tile_matmat_t
from ..store import QUANTIZED, check_store_dtype, compute_dtype, quantize

__all__ = ["precompile"]

log = logging.getLogger("nngp_dask")

_lock = threading.Lock()
_started: dict[tuple[int, str], Future] = {}
# a compile that outlasts this is announced (loading from the cache takes well under it)
_ANNOUNCE_AFTER_S = 1.0


def _compile(arch: Architecture, fmt: str) -> float:
    dtype = compute_dtype(fmt)
    t0 = time.perf_counter()
    d = 4 if arch.input_scale is None else arch.input_scale.shape[0]  # ARD: one weight per feature
    x = np.linspace(0.1, 1.0, 6 * d).reshape(6, d)  # nothing overflows, nothing is degenerate
    kernel(arch, x, dtype=dtype)  # per-point diagonals, a symmetric block, its mirror
    kernel(arch, x, x[:3], dtype=dtype)
    tile_matmat_t(np.ones((3, 3), fmt), np.ones((1, 6)), np.zeros((1, 6)), 0, 3, transpose_too=True)
    if fmt == QUANTIZED:  # the tiles' writes
        quantize(np.arange(4, dtype=dtype).reshape(2, 2))
    return time.perf_counter() - t0


def precompile(arch: Architecture, dtype: DTypeLike = np.float32) -> Future:
    """Start compiling (or loading from Numba's cache) the kernels that tiles of ``arch`` stored
    in ``dtype`` (a storage format: float32, float64 or int16) and the solver's products run;
    returns a future of the seconds it took.

    Runs in a background thread of this process, once per activation family and dtype; a
    compile that takes longer than a second says so in the log.
    """
    fmt = check_store_dtype(dtype)
    key = (arch.activation.family, fmt)
    with _lock:
        fut = _started.get(key)
        if fut is not None:
            return fut
        fut = _started[key] = Future()

    def run() -> None:
        done = threading.Event()

        def announce() -> None:
            if not done.wait(_ANNOUNCE_AFTER_S):
                log.info("compiling the NNGP kernels once (about 20 s on 2 cores; later runs load them from "
                         "Numba's cache)")

        threading.Thread(target=announce, daemon=True).start()
        try:
            seconds = _compile(arch, fmt)
        except BaseException as exc:  # reported where the result is waited for
            with _lock:
                _started.pop(key, None)
            fut.set_exception(exc)
            return
        finally:
            done.set()
        if seconds > _ANNOUNCE_AFTER_S:
            log.info("compiled the NNGP kernels in %.1f s", seconds)
        fut.set_result(seconds)

    threading.Thread(target=run, name="nngp-dask-precompile", daemon=True).start()
    return fut
