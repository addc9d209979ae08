"""The out-of-core path end to end, small: build with drop-behind, evict every tile from the page
cache, solve by CG from the store (Nystrom preconditioner built on the workers from the stored
tiles) and predict, on workers whose memory limit is below the kernel's size, against a dense oracle.

The limit is Dask's: with spilling at its target, data a worker holds for Dask (task results,
the kept Nystrom rows) beyond a fraction of it goes to disk. Pausing and terminating are off
because a worker process's own footprint (Python, NumPy, Numba: ~150 MB) is larger than any
limit a kernel of a few seconds could exceed; what the test pins is that the kernel is never
held, by Dask or by the page cache, and that the answers are still exact.
"""

from __future__ import annotations

import sys

import dask
import numpy as np
import pytest

from nngp_dask import Architecture, kernel
from nngp_dask.build import build_kernel
from nngp_dask.gp import predict, solve
from nngp_dask.store import drop_from_cache, local_chunk_file
from tests.test_pagecache import resident_fraction

ARCH = Architecture(3, "relu", 1.6, 0.1)
NOISE = 0.01


def _chunk_files(ks) -> list[str]:
    arr = ks.group["kernel/train_train"]
    return [local_chunk_file(ks.url, arr, t) for t in ks.grid.upper_tiles()]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mincore: Linux")
def test_kernel_larger_than_worker_memory_is_built_solved_and_predicted_exactly(tmp_path):
    from nngp_dask.cluster import embedded_client, local_cluster, local_cluster_kwargs

    rng = np.random.default_rng(11)
    n, m, tile = 1100, 70, 128  # ragged: 1100 = 8 * 128 + 76
    x, xt = rng.standard_normal((n, 6)), rng.standard_normal((m, 6))
    y = np.column_stack([np.sin(x[:, 0]), np.cos(x[:, 1] * x[:, 2])])
    limit = 1 << 21  # 2 MiB per worker; the stored upper tiles are 2.6 MB, the full kernel 4.8 MB
    settings = {"distributed.worker.memory.target": 0.5, "distributed.worker.memory.spill": 0.6,
                "distributed.worker.memory.pause": False, "distributed.worker.memory.terminate": False}
    with dask.config.set(settings), local_cluster(**local_cluster_kwargs(n_workers=2, memory_limit=str(limit))) \
            as cluster, embedded_client(cluster) as client:
        assert all(w["memory_limit"] == limit for w in client.scheduler_info()["workers"].values())
        ks = build_kernel(ARCH, x, tmp_path / "k.zarr", x_test=xt, tile=tile, dtype="float32", client=client,
                          progress=False, page_cache="drop")
        assert ks.nbytes_stored() > limit
        files = _chunk_files(ks)
        for f in files:
            drop_from_cache(f)  # the solve reads every tile from disk
        assert max(resident_fraction(f) for f in files) < 0.5
        r = solve(ks, y, noise=NOISE, tol=1e-9, method="cg", preconditioner="nystrom", rank=96, client=client,
                  progress=False)
        mean, var = predict(ks, r, variance="exact", client=client)
        _, var_lr = predict(ks, r, variance="lowrank", client=client)

    # the oracle: the same float32 kernel values, dense float64 algebra
    k = kernel(ARCH, x, dtype="float32").astype(np.float64)
    ks_ = kernel(ARCH, xt, x, dtype="float32").astype(np.float64)
    a = k + NOISE * np.eye(n)
    alpha = np.linalg.solve(a, y)
    ref_var = np.diag(kernel(ARCH, xt, dtype="float64")) - np.einsum("ij,ji->i", ks_, np.linalg.solve(a, ks_.T))
    assert r.converged and r.preconditioner == "nystrom" and r.iterations < 60
    assert np.abs(r.alpha - alpha).max() < 1e-6 * np.abs(alpha).max()
    assert np.abs(mean - ks_ @ alpha).max() < 1e-6 * np.abs(ks_ @ alpha).max()
    assert np.abs(var - ref_var).max() < 1e-5 * ref_var.max()
    # the low-rank variance reads the preconditioner's factor the solve saved in the store
    assert np.all(np.isfinite(var_lr)) and np.all((var_lr >= 0) & (var_lr <= ref_var.max() + var.max()))
    assert r.info["amplitude"] == pytest.approx(float(np.sum(y * alpha)) / y.size, rel=1e-6)
