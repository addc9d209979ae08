"""Tiled build: time against the sum of its tile computations, peak memory against n, disk rate,
and against neural-tangents' ``nt.batch``.

For each n: a fresh store is built on an embedded LocalCluster with the default settings
(started and warmed up once, before the timings); peak RSS is sampled over the driver and
every worker process. The "sum of tile computations" is the time the tile tasks spent computing
tiles (timed inside them, excluding reading inputs and writing and recording the tile), summed
and divided by the number of workers: the wall time of a build with no graph or I/O overhead.
A second estimate, independent of the build, scales the single-threaded time of one full tile
(measured in this process) by the entries of every tile. The disk's sequential write rate and the
cost of touching memory the process has not used before (new pages from the operating system,
what a growing page cache takes for every tile it keeps) are measured in the same run.

Each size is built once per page-cache policy (``--page-cache keep,drop``, see
:mod:`nngp_dask.store.pagecache`): "keep" is what the default ("auto") does for a kernel smaller than
half the memory, "drop" what it does for a larger one.

With ``--nt-python`` (an interpreter that has neural-tangents, usually in its own virtual
environment), ``nt.batch`` computes the same matrix in memory from the same inputs at the first
size, in the same run, and the two kernels are compared.

    python benchmarks/bench_build.py --sizes 10000,20000,40000 [--page-cache keep,drop] \
        [--nt-python /path/to/nt-venv/bin/python]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time

import numpy as np
from threadpoolctl import threadpool_limits

from nngp_dask import Architecture, build_kernel, diagonals, normalize, tile
from nngp_dask.monitor import PeakRSS
from nngp_dask.cluster import embedded_client, local_cluster, local_cluster_kwargs
from nngp_dask.tiling import TileGrid


def disk_write_rate(directory: str, size: int = 2 << 30, block: int = 16 << 20) -> float:
    """Sequential write rate (bytes/s) of ``size`` bytes in ``block`` writes, fsync'd."""
    path = os.path.join(directory, "disk-rate.bin")
    buf = os.urandom(block)
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        for _ in range(size // block):
            os.write(fd, buf)
        os.fsync(fd)
    finally:
        os.close(fd)
        os.unlink(path)
    return size / (time.perf_counter() - t0)


def touch_ms_per_mib(mib: int = 256, idle_s: float = 5.0) -> tuple[float, float]:
    """Milliseconds per MiB to write memory new to the process, and the same memory again when it
    is freed and allocated at once (glibc returns such large blocks to the OS in between).

    Runs after ``idle_s`` seconds of quiet: virtual machines with free-page reporting hand memory
    that stayed free that long back to the host, and a growing page cache takes such memory."""
    time.sleep(idle_s)
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        a = np.ones(mib << 17)  # float64: 8 bytes, mib * 2**20 bytes
        times.append((time.perf_counter() - t0) * 1e3 / mib)
        del a
    return times[0], times[1]


def inputs(n: int, d: int, data: str | None, seed: int = 0) -> np.ndarray:
    if data and os.path.exists(data):
        with np.load(data, allow_pickle=False) as f:
            x = f["x_train"].reshape(60000, -1)[:n].astype(np.float64)
        if len(x) == n:
            return x
    return np.random.default_rng(seed).standard_normal((n, d))


def single_tile_seconds(arch: Architecture, x: np.ndarray, t: int, dtype: str, repeats: int = 3) -> float:
    """One full off-diagonal tile on one core (as each worker runs it)."""
    import numba

    a, b = x[:t], x[t: 2 * t] if len(x) >= 2 * t else x[:t]
    da, db = diagonals(arch, a), diagonals(arch, b)
    old = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        with threadpool_limits(1):
            tile(arch, a, b, da, db, dtype=dtype)
            best = min(_timed(lambda: tile(arch, a, b, da, db, dtype=dtype)) for _ in range(repeats))
    finally:
        numba.set_num_threads(old)
    return best


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def nt_batch(python: str, arch: Architecture, xp: str, ks, work: str) -> dict:
    """Time neural-tangents' ``nt.batch`` on the inputs saved at ``xp`` in another interpreter;
    compare with the store ``ks`` built from them."""
    out = os.path.join(work, "nt-k.npy")
    n = ks.shape[0]
    batch = max(b for b in range(1, 2001) if n % b == 0)
    here = os.path.dirname(os.path.abspath(__file__))
    proc = subprocess.run([python, os.path.join(here, "nt_reference.py"), xp, out, "--depth", str(arch.depth),
                           "--activation", arch.activation.name, "--weight-var", str(arch.weight_var),
                           "--bias-var", str(arch.bias_var), "--batch", str(batch)],
                          capture_output=True, text=True, check=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    k_nt = np.load(out, mmap_mode="r")
    ours = ks.to_dask()
    diff = 0.0
    for i in range(0, n, 2048):  # row bands: neither matrix is held twice
        diff = max(diff, float(np.abs(ours[i:i + 2048].compute(scheduler="threads") - k_nt[i:i + 2048]).max()))
    result["max_abs_diff"] = diff
    del k_nt
    os.unlink(out)
    os.unlink(xp)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10000,20000,40000")
    ap.add_argument("--d", type=int, default=784)
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--tile", type=int, default=2048)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--data", default=os.environ.get("NNGP_DASK_DATA", "../shared/data") + "/mnist.npz")
    ap.add_argument("--workdir", default=None, help="where the stores go (default: a temp dir on /work)")
    ap.add_argument("--page-cache", default="keep,drop", help="page-cache policies to build each size with")
    ap.add_argument("--nt-python", default=None, help="python with neural-tangents: nt.batch at the first size")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    arch = Architecture(args.depth, "relu", 1.6, 0.1)
    work = tempfile.mkdtemp(prefix="nngp-bench-", dir=args.workdir or os.getcwd())
    rows = []
    try:
        fresh, recycled = touch_ms_per_mib()
        rate = disk_write_rate(work)
        print(f"disk sequential write: {rate / 1e9:.2f} GB/s; writing memory new to a process: {fresh:.2f} ms/MiB, "
              f"the same memory freed and taken again: {recycled:.2f} ms/MiB", flush=True)
        workers = os.cpu_count() or 1
        # one cluster for all sizes, warmed up: its start-up is not graph or I/O overhead
        cluster = local_cluster(**local_cluster_kwargs())
        client = embedded_client(cluster)
        warm = os.path.join(work, "warm.zarr")
        build_kernel(arch, np.random.default_rng(1).standard_normal((300, args.d)), warm, tile=128,
                     dtype=args.dtype, client=client, progress=False)
        shutil.rmtree(warm)
        first = None
        for n in map(int, args.sizes.split(",")):
            x = normalize(inputs(n, args.d, args.data), "unit_norm")
            t_tile = single_tile_seconds(arch, x, min(args.tile, n), args.dtype)
            grid = TileGrid(n, n, args.tile)
            ideal = t_tile * grid.entries(grid.upper_tiles()) / min(args.tile, n) ** 2 / workers
            for policy in args.page_cache.split(","):
                store = os.path.join(work, f"k{n}-{policy}.zarr")
                with PeakRSS() as peak:
                    t0 = time.perf_counter()
                    ks = build_kernel(arch, x, store, tile=args.tile, dtype=args.dtype, client=client, progress=False,
                                      page_cache=policy)
                    wall = time.perf_counter() - t0
                st = ks.last_build
                computing = st.compute_s / workers
                row = {"n": n, "page_cache": policy, "tiles": st.tiles_computed, "wall_s": wall,
                       "ingest_s": st.ingest_s, "tile_compute_s_per_worker": computing,
                       "overhead_ratio": wall / computing, "ideal_tile_compute_s": ideal,
                       "overhead_ratio_single_tile_estimate": wall / ideal,
                       "read_s_per_worker": st.read_s / workers, "write_s_per_worker": st.write_s / workers,
                       "in_task_s_per_worker": st.tile_s / workers,
                       "write_ms_per_tile": st.write_s / st.tiles_computed * 1e3,
                       "tiles_per_s": st.tiles_computed / wall, "gb_written": st.bytes_written / 1e9,
                       "gb_per_s": st.bytes_written / 1e9 / wall, "disk_write_gb_per_s": rate / 1e9,
                       "touch_new_ms_per_mib": fresh, "touch_recycled_ms_per_mib": recycled,
                       "peak_rss_gb": peak.peak / 1e9, "single_tile_s": t_tile}
                rows.append(row)
                rest = wall - st.ingest_s - st.tile_s / workers
                print(f"n={n:>6} page_cache={policy}: {st.tiles_computed} tiles in {wall:.1f} s; sum of tile "
                      f"computations / {workers} workers = {computing:.1f} s -> ratio {wall / computing:.2f} (target "
                      f"<= 1.2; single-tile estimate {ideal:.1f} s -> {wall / ideal:.2f}); the rest per worker: ingest "
                      f"{st.ingest_s:.2f} s, reading input blocks {st.read_s / workers:.2f} s, writing and recording "
                      f"{st.write_s / workers:.2f} s ({row['write_ms_per_tile']:.0f} ms a tile), scheduling and idle "
                      f"{rest:.2f} s; {row['tiles_per_s']:.2f} tiles/s, {row['gb_per_s']:.2f} GB/s written (disk "
                      f"{rate / 1e9:.2f} GB/s); peak RSS {peak.peak / 1e9:.2f} GB", flush=True)
                if args.nt_python and first is None:
                    # compared after the last size, so that the comparison's memory is not the builds'
                    first = ks
                    np.save(os.path.join(work, "nt-x.npy"), x.astype(np.float32))
                else:
                    shutil.rmtree(store)
        client.close()
        cluster.close()
        if args.nt_python:
            n, wall = rows[0]["n"], rows[0]["wall_s"]
            nt = rows[0]["nt_batch"] = nt_batch(args.nt_python, arch, os.path.join(work, "nt-x.npy"), first, work)
            print(f"n={n:>6}: neural-tangents {nt['version']} nt.batch(batch_size={nt['batch_size']}) of the same "
                  f"matrix in memory: {nt['time_s']:.1f} s (first call {nt['first_call_s']:.1f} s) -> the tiled "
                  f"build is {nt['time_s'] / wall:.2f}x faster (target >= 3); max |difference| "
                  f"{nt['max_abs_diff']:.2g}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
