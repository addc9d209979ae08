"""What the embedded cluster's mutual TLS costs: the tile build, one CG pass, and starting it.

Two embedded clusters side by side (2 single-threaded worker processes each, loopback), one with
mutual TLS (the default, ``secure=True``) and one with plain TCP (``secure=False``). On each: the
same kernel (n points of dimension d, ReLU depth 3, float32) built into a new store, best of
``--repeats`` builds, alternating between the clusters; then one operator pass
``(K + noise I) V`` with V of ``--k`` columns (one CG iteration for k right-hand sides, whose
vectors and partial products are what travel between driver and workers) over one stored
kernel, tiles in the page cache, best of ``--pass-repeats`` alternating passes. Also the time to
start each cluster (best of the ``--repeats`` starts).

    python benchmarks/bench_tls.py [--n 12000] [--tile 2048] [--k 10] [--repeats 3] [--pass-repeats 7]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from nngp_dask import Architecture, build_kernel
from nngp_dask.gp import StoredKernelOperator
from nngp_dask.cluster import embedded_client, local_cluster, local_cluster_kwargs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=12000)
    ap.add_argument("--d", type=int, default=784)
    ap.add_argument("--tile", type=int, default=2048)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--pass-repeats", type=int, default=7)
    args = ap.parse_args()
    arch = Architecture(3, "relu", 1.6, 0.1)
    x = np.random.default_rng(0).standard_normal((args.n, args.d))
    v = np.random.default_rng(1).standard_normal((args.n, args.k))
    work = Path(tempfile.mkdtemp(prefix="nngp-tls-"))
    modes = {"mutual TLS": True, "plain TCP": False}
    start = {m: [] for m in modes}
    clients, clusters = {}, []
    try:
        for _ in range(args.repeats):
            for mode, secure in modes.items():
                t0 = time.perf_counter()
                cl = local_cluster(**local_cluster_kwargs(secure=secure))
                start[mode].append(time.perf_counter() - t0)
                if mode in clients:
                    cl.close()
                else:
                    clusters.append(cl)
                    clients[mode] = embedded_client(cl, set_as_default=False)
        for c in clients.values():  # compile or load the kernels in every worker before timing
            build_kernel(arch, x[:600], work / "warm.zarr", tile=256, client=c, progress=False, overwrite=True)
        builds = {m: [] for m in modes}
        for r in range(args.repeats):
            for mode, c in clients.items():
                path = work / f"{mode.split()[0]}-{r}.zarr"
                t0 = time.perf_counter()
                build_kernel(arch, x, path, tile=args.tile, dtype="float32", client=c, progress=False,
                             page_cache="keep")
                builds[mode].append(time.perf_counter() - t0)
        ks = build_kernel(arch, x, work / "mutual-0.zarr", tile=args.tile, dtype="float32", progress=False,
                          client=clients["mutual TLS"])
        ops = {m: StoredKernelOperator(ks, 0.01, c) for m, c in clients.items()}
        passes = {m: [] for m in modes}
        for op in ops.values():
            op.matmat(v)  # every worker has read and checked each tile once
        for _ in range(args.pass_repeats):
            for mode, op in ops.items():
                t0 = time.perf_counter()
                op.matmat(v)
                passes[mode].append(time.perf_counter() - t0)
    finally:
        for c in clients.values():
            c.close()
        for cl in clusters:
            cl.close()
        shutil.rmtree(work, ignore_errors=True)
    tls, tcp = "mutual TLS", "plain TCP"
    print(f"# embedded cluster, 2 workers x 1 thread; n={args.n}, d={args.d}, tile {args.tile}, float32, k={args.k}")
    for name, t in (("cluster start", start), ("build", builds), ("CG pass", passes)):
        print(f"{name:14s} TLS {min(t[tls]):7.3f} s   TCP {min(t[tcp]):7.3f} s   TLS/TCP {min(t[tls]) / min(t[tcp]):.3f}"
              f"   (medians {np.median(t[tls]):.3f} / {np.median(t[tcp]):.3f} s = {np.median(t[tls]) / np.median(t[tcp]):.3f})")


if __name__ == "__main__":
    main()
