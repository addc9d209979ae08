"""Threads or processes per worker for the tile build: the same build on 2 single-threaded worker
processes and on 1 process with 2 threads, in one run.

    python benchmarks/bench_workers.py --n 6000
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time

import numpy as np

from nngp_dask import Architecture, build_kernel
from nngp_dask.cluster import embedded_client, local_cluster, local_cluster_kwargs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=6000)
    ap.add_argument("--tile", type=int, default=1024)
    args = ap.parse_args()
    x = np.random.default_rng(0).standard_normal((args.n, 784))
    arch = Architecture(3, "relu", 1.6, 0.1)
    work = tempfile.mkdtemp(prefix="nngp-workers-")
    try:
        for label, kw in [("2 processes x 1 thread (default)", local_cluster_kwargs(n_workers=2)),
                          ("1 process x 2 threads", {**local_cluster_kwargs(n_workers=1, threads_per_worker=2)})]:
            with local_cluster(**kw) as cluster, embedded_client(cluster) as client:
                build_kernel(arch, x[:600], f"{work}/warm.zarr", tile=512, client=client, progress=False,
                             overwrite=True)  # workers import and load the compiled kernels
                t0 = time.perf_counter()
                ks = build_kernel(arch, x, f"{work}/{label[0]}.zarr", tile=args.tile, client=client, progress=False)
                print(f"{label:<34} {time.perf_counter() - t0:6.1f} s for {ks.last_build.tiles_computed} tiles")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
