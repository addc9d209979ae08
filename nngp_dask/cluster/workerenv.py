"""The environment of every worker process nngp-dask starts (embedded, batch job or Kubernetes pod).

Shared by :mod:`nngp_dask.cluster.embedded` and :mod:`nngp_dask.cluster.runtime`, so a worker is set up the
same way wherever it runs.
"""

from __future__ import annotations

__all__ = ["MALLOC_ENV", "WORKER_ENV"]

# One process per core and one thread per process: tiles are GEMM + a Numba loop, both of
# which would otherwise oversubscribe the cores from several threads; a killed worker costs only
# its own tile; and Numba's fallback threading layer cannot run parallel kernels from two threads.
# Processes also measured faster than threads (0.8 s vs 1.1 s for a 6,000-point build; benchmarks/RESULTS.md).
WORKER_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
              "NUMBA_NUM_THREADS": "1"}

# distributed's nannies start workers with MALLOC_TRIM_THRESHOLD_=65536, which also freezes
# glibc's mmap threshold at 128 KiB: every tile-sized buffer (16 MiB) is then a fresh mmap, paid
# in page faults and zeroing on each use, and reading a cached tile through zarr took 3x (in the
# workers) to 10x (one process) as long. Buffers up to 32 MiB (the most glibc allows) come from
# the heap instead, and up to 32 MiB freed at its top are kept for the next tile: the CG pass at
# n = 20,000 went from 0.85 s to 0.38 s (benchmarks/RESULTS.md). Unsetting the variable (glibc's
# adaptive default) measured the same, but a batch job's shell, whose variables win over the
# nannies' config, can only set it; so it is set, the same way everywhere, before the worker starts.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "33554432"}
