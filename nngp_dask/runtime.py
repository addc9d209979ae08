"""Where the work runs: the caller's Dask client, an address, or an embedded LocalCluster."""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from collections.abc import Iterator

from distributed import Client, LocalCluster

__all__ = ["client_for", "local_cluster_kwargs"]

log = logging.getLogger("nngp_dask")

# One process per core and one thread per process: tiles are GEMM + a Numba loop, both of
# which would otherwise oversubscribe the cores from several threads, and separate processes
# overlap one tile's disk write with another's compute without sharing a GIL (benchmarks/RESULTS.md).
_WORKER_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
               "NUMBA_NUM_THREADS": "1"}


def local_cluster_kwargs(n_workers: int | None = None, threads_per_worker: int = 1,
                         memory_limit: str | None = None) -> dict:
    """Settings of the embedded cluster: loopback only, one single-threaded process per core."""
    cores = os.cpu_count() or 1
    kwargs = dict(
        n_workers=n_workers or cores,
        threads_per_worker=threads_per_worker,
        processes=True,
        host="127.0.0.1",
        dashboard_address="127.0.0.1:0",
        env=_WORKER_ENV if threads_per_worker == 1 else {},
    )
    if memory_limit:
        kwargs["memory_limit"] = memory_limit
    return kwargs


@contextmanager
def client_for(client: Client | str | None = None, **local: object) -> Iterator[Client]:
    """Yield a client: the one given, one connected to an address, the current default
    client, or a new embedded LocalCluster (closed on exit)."""
    if isinstance(client, Client):
        yield client
        return
    if isinstance(client, str) and client not in ("", "local"):
        with Client(client) as c:
            log.info("connected to scheduler %s (dashboard %s)", client, c.dashboard_link)
            yield c
        return
    try:
        from distributed import default_client

        current = default_client()
    except ValueError:
        current = None
    if current is not None and client is None:
        yield current
        return
    with LocalCluster(**local_cluster_kwargs(**local)) as cluster, Client(cluster) as c:  # type: ignore[arg-type]
        log.info("embedded LocalCluster: %d workers; dashboard %s", len(cluster.workers), c.dashboard_link)
        yield c
