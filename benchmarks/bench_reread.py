"""CG passes over a stored kernel by how its tiles came into the page cache.

A kernel store is built (its tiles written by this host), then three sets of passes (10
right-hand sides, the solve's operator on an embedded cluster) are timed: over the tiles as
written; after dropping them from the cache, the first pass reading them from disk and the next
ones over what that pass left cached; and after dropping them again and reading every file
through with ``read()``. On Linux with large page-cache folios (ext4, 6.x kernels) a written
tile stays as 2 MiB folios that a mapping maps with huge (PMD) entries; a tile faulted in by
``MAP_POPULATE`` or read by ``read()`` comes in as 4 KiB pages unless the mapping asked for
huge pages first (:func:`nngp_dask.store.pagecache.map_pages`). The share of a sample tile's
mapping with huge entries is printed after each set. Run it against an older tree with
``PYTHONPATH=<tree>`` (from another directory) to compare versions.

    NNGP_DASK_DATA=../shared/data python benchmarks/bench_reread.py --n 30000
"""

from __future__ import annotations

import argparse
import glob
import mmap
import os
import shutil
import tempfile
import time

import numpy as np

from nngp_dask import Architecture, build_kernel, normalize
from nngp_dask.cluster import embedded_client, local_cluster, local_cluster_kwargs
from nngp_dask.gp.operator import StoredKernelOperator
from nngp_dask.store import open_kernel
from nngp_dask.store.pagecache import drop_from_cache


def files(store: str) -> list[str]:
    return [os.path.join(d, f) for d, _, names in os.walk(store) for f in names]


def uncache(store: str) -> None:
    os.sync()
    for path in files(store):
        drop_from_cache(path)


def read_through(store: str) -> None:
    buf = bytearray(1 << 23)
    for path in files(store):
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def huge_share(path: str) -> str:
    """The share of ``path``'s mapping that is mapped by huge entries (Linux smaps), as this
    process maps it (read-only, populated)."""
    with open(path, "rb") as f:
        pages = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0),
                          prot=mmap.PROT_READ)
    try:
        rss = pmd = None
        with open("/proc/self/smaps") as smaps:
            inside = False
            for line in smaps:
                if os.path.realpath(path) in line:
                    inside = True
                elif inside and line.startswith("Rss:"):
                    rss = int(line.split()[1])
                elif inside and line.startswith("FilePmdMapped:"):
                    pmd = int(line.split()[1])
                    break
        return f"{pmd / rss:.0%} of its pages mapped huge" if rss and pmd is not None else "(smaps: not available)"
    except OSError:
        return "(smaps: not available)"
    finally:
        pages.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=30000)
    p.add_argument("--passes", type=int, default=6)
    p.add_argument("--data", default=os.path.join(os.environ.get("NNGP_DASK_DATA", "../shared/data"), "mnist.npz"))
    p.add_argument("--workdir", default=None)
    args = p.parse_args()
    with np.load(args.data, allow_pickle=False) as f:
        x = normalize(f["x_train"][:args.n].reshape(args.n, -1).astype(np.float64), "standardize")
    work = tempfile.mkdtemp(prefix="bench-reread-", dir=args.workdir)
    store = os.path.join(work, "k.zarr")
    cluster = local_cluster(**local_cluster_kwargs())
    client = embedded_client(cluster)
    try:
        build_kernel(Architecture(5, "relu", 2.0, 0.0), x, store, tile=2048, dtype="float32", client=client,
                     progress=False)
        sample = sorted(glob.glob(os.path.join(store, "kernel", "train_train", "c", "*", "*")))[0]
        v = np.random.default_rng(0).standard_normal((args.n, 10))

        def passes(what: str) -> None:
            op = StoredKernelOperator(open_kernel(store), 0.02, client)
            times = []
            for _ in range(args.passes):
                t0 = time.perf_counter()
                op.matmat(v)
                times.append(time.perf_counter() - t0)
            print(f"{what}: passes {', '.join(f'{t:.3f}' for t in times)} s; after the first: best "
                  f"{min(times[1:]):.3f} s, median {np.median(times[1:]):.3f} s; sample tile: {huge_share(sample)}",
                  flush=True)

        print(f"n = {args.n}, tiles of 2048, float32, 10 right-hand sides")
        passes("written by the build")
        uncache(store)
        passes("read from disk by the first pass")
        uncache(store)
        read_through(store)
        passes("read from disk by read() first")
    finally:
        client.close()
        cluster.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
