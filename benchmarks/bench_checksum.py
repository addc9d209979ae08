"""What the tiles' CRC32C costs: the build, and one CG pass over the stored kernel.

The same kernel (n points of dimension d, ReLU depth 3, float32, tile 2048) is built into
stores with checksums (what nngp-dask writes) and without them (``nngp_dask.store.layout.CHECKSUMS``
turned off in this driver, which only this benchmark does), alternately, best of ``--repeats``
each, on the embedded cluster (2 single-threaded worker processes, started and warmed up once).
Then one operator pass ``(K + noise I) V`` with V of ``--k`` columns (one CG iteration for k
right-hand sides) over each store, tiles in the page cache, best of ``--pass-repeats``
interleaved passes, three ways:

* no checksum: the store without them;
* verified every read: the CRC32C of every tile checked on every read (``VERIFIED_TTL_S = 0`` on
  the workers), what the first pass of a solve costs;
* default: a local chunk file verified once by a worker is not checked again for
  ``VERIFIED_TTL_S`` seconds while its stat signature is unchanged (every later pass).

The same costs are also measured in CPU time of this process (``time.process_time``, after the
cluster is closed; BLAS on one thread), which other jobs on the machine disturb far less than wall
time: per tile of the build, computing it and writing it (with or without its checksum), and a
whole CG pass done serially (every upper tile read and multiplied in).

Also the resume check of a build (a ``stat`` per recorded tile) and a full verify pass (every
tile read and checked, ``KernelStore.check_tiles(full=True)``), in this process.

    python benchmarks/bench_checksum.py [--n 20000] [--tile 2048] [--repeats 3] [--pass-repeats 7]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time

import numpy as np

import nngp_dask.store.layout as layout_mod
import nngp_dask.store.tileio as tileio_mod
from nngp_dask import Architecture, build_kernel, diagonals, open_kernel
from nngp_dask import tile as tile_fn
from nngp_dask.cluster import client_for
from nngp_dask.gp import StoredKernelOperator
from nngp_dask.linalg import tile_matmat_t
from nngp_dask.store import TileIO


def _set_ttl(value: float) -> None:
    import nngp_dask.store.tileio

    nngp_dask.store.tileio.VERIFIED_TTL_S = value
    nngp_dask.store.tileio._VERIFIED.clear()


def _build(arch, x, path, checksums: bool, client, tile: int):
    layout_mod.CHECKSUMS = checksums
    try:
        shutil.rmtree(path, ignore_errors=True)
        t0 = time.perf_counter()
        ks = build_kernel(arch, x, path, tile=tile, dtype="float32", client=client, progress=False, page_cache="keep")
        return time.perf_counter() - t0, ks.last_build
    finally:
        layout_mod.CHECKSUMS = True


def _operator(ks, client, checksums: bool) -> StoredKernelOperator:
    layout_mod.CHECKSUMS = checksums
    try:
        return StoredKernelOperator(ks, 0.01, client)
    finally:
        layout_mod.CHECKSUMS = True


def _timed(op: StoredKernelOperator, v: np.ndarray) -> float:
    t0 = time.perf_counter()
    op.matmat(v)
    return time.perf_counter() - t0


def _cpu(fn, repeats: int) -> float:
    best = np.inf
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        best = min(best, time.process_time() - t0)
    return best


def _serial_costs(arch, x, paths: dict, v: np.ndarray, tile: int, repeats: int) -> dict:
    """CPU seconds of this process: a tile computed, written with and without its checksum; a whole
    CG pass read and multiplied serially from each store (checked every read, or once)."""
    from threadpoolctl import threadpool_limits

    ios = {c: TileIO(paths[c], None, "train_train") for c in (True, False)}
    out: dict = {}
    with threadpool_limits(1):
        xs = x.astype(np.float64)
        i, j = 1, 2  # a full off-diagonal tile, rewritten with the same values
        xr, xc = xs[i * tile:(i + 1) * tile], xs[j * tile:(j + 1) * tile]
        dr, dc = diagonals(arch, xr), diagonals(arch, xc)
        values = tile_fn(arch, xr, xc, dr, dc, dtype="float32")
        out["tile_compute_cpu_s"] = _cpu(lambda: tile_fn(arch, xr, xc, dr, dc, dtype="float32"), repeats)
        for c in (True, False):
            out[f"tile_write_cpu_s_{'crc' if c else 'plain'}"] = _cpu(lambda: ios[c].write(i, j, values), repeats)

        tiles = [(a, b) for a in range(-(-x.shape[0] // tile)) for b in range(a, -(-x.shape[0] // tile))]
        v_t = np.ascontiguousarray(v.T)

        def serial_pass(io):
            buf, acc = np.empty(io.nbytes, dtype=np.uint8), np.zeros_like(v_t)
            for a, b in tiles:
                tile_matmat_t(io.read(a, b, buf), v_t, acc, a * tile, b * tile, transpose_too=a != b)

        serial_pass(ios[False])
        serial_pass(ios[True])  # page cache warm, Numba compiled, every file verified once
        out["pass_cpu_s_plain"] = _cpu(lambda: serial_pass(ios[False]), repeats)
        out["pass_cpu_s_default"] = _cpu(lambda: serial_pass(ios[True]), repeats)
        _set_ttl(0.0)
        try:
            out["pass_cpu_s_every_read"] = _cpu(lambda: serial_pass(ios[True]), repeats)
        finally:
            _set_ttl(600.0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--d", type=int, default=784)
    ap.add_argument("--tile", type=int, default=2048)
    ap.add_argument("--k", type=int, default=10, help="right-hand sides of the CG pass")
    ap.add_argument("--repeats", type=int, default=3, help="builds of each kind")
    ap.add_argument("--pass-repeats", type=int, default=7, help="CG passes of each kind")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.n, args.d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    v = rng.standard_normal((args.n, args.k))
    arch = Architecture(3, "relu", 1.6, 0.1)
    work = args.workdir or tempfile.mkdtemp(prefix="bench_checksum_")
    paths = {True: os.path.join(work, "crc.zarr"), False: os.path.join(work, "plain.zarr")}
    out: dict = {"n": args.n, "d": args.d, "tile": args.tile, "k": args.k, "repeats": args.repeats,
                 "load_1min_start": os.getloadavg()[0]}
    print(f"checksum benchmark: n={args.n} d={args.d} tile={args.tile} float32 relu depth 3, k={args.k}, "
          f"best of {args.repeats} builds and {args.pass_repeats} passes; 1-min load average at start {os.getloadavg()[0]:.2f}")
    with client_for(None) as client:
        _build(arch, x[:2 * args.tile], os.path.join(work, "warm.zarr"), True, client, args.tile)  # compile, warm
        builds: dict = {True: [], False: []}
        for rep in range(args.repeats):
            for checksums in ((True, False) if rep % 2 == 0 else (False, True)):
                wall, stats = _build(arch, x, paths[checksums], checksums, client, args.tile)
                builds[checksums].append((wall, stats.write_s / stats.tiles_computed, stats.compute_s))
        stores = {True: open_kernel(paths[True])}
        layout_mod.CHECKSUMS = False  # this benchmark's own store without checksums
        stores[False] = open_kernel(paths[False])
        layout_mod.CHECKSUMS = True
        sizes = {c: sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(
            os.path.join(paths[c], "kernel", "train_train")) for f in fs if f != "zarr.json") for c in (True, False)}

        ops = {c: _operator(stores[c], client, c) for c in (True, False)}
        for op in ops.values():
            op.matmat(v)  # warm: tasks, open arrays, page cache
        passes: dict = {"plain": [], "every": [], "default": []}
        for _ in range(args.pass_repeats):  # interleaved, so that other load hits all three alike
            passes["plain"].append(_timed(ops[False], v))
            client.run(_set_ttl, 0.0)
            passes["every"].append(_timed(ops[True], v))
            client.run(_set_ttl, tileio_mod.VERIFIED_TTL_S)
            ops[True].matmat(v)  # verifies every tile once more, then trusts them
            passes["default"].append(_timed(ops[True], v))
        plain, every, default = (min(passes[k]) for k in ("plain", "every", "default"))

    cpu = _serial_costs(arch, x, paths, v, args.tile, args.repeats)
    ks = stores[True]
    t0 = time.perf_counter()
    bad = ks.check_tiles("train_train")
    stat_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    bad += ks.check_tiles("train_train", full=True)
    full_s = time.perf_counter() - t0
    assert not bad, bad

    b_crc, b_plain = min(builds[True]), min(builds[False])
    tiles = sum(1 for _ in ks.grid.upper_tiles())
    out.update(build_crc_s=b_crc[0], build_plain_s=b_plain[0], build_ratio=b_crc[0] / b_plain[0],
               write_per_tile_crc_ms=1e3 * b_crc[1], write_per_tile_plain_ms=1e3 * b_plain[1],
               builds_crc_s=[b[0] for b in builds[True]], builds_plain_s=[b[0] for b in builds[False]],
               pass_plain_s=plain, pass_verify_every_read_s=every, pass_default_s=default, passes_s=passes,
               load_1min_end=os.getloadavg()[0],
               pass_ratio_every_read=every / plain, pass_ratio_default=default / plain,
               stored_bytes_crc=sizes[True], stored_bytes_plain=sizes[False], tiles=tiles,
               resume_stat_check_s=stat_s, full_verify_s=full_s, **cpu)
    print(f"stored train x train: {sizes[True] / 1e9:.3f} GB in {tiles} tiles (+{sizes[True] - sizes[False]} bytes "
          "of checksums)")
    print(f"build:   with crc32c {b_crc[0]:6.2f} s, without {b_plain[0]:6.2f} s -> ratio {b_crc[0] / b_plain[0]:.3f} "
          f"(all: {', '.join(f'{b[0]:.2f}' for b in builds[True])} vs {', '.join(f'{b[0]:.2f}' for b in builds[False])}"
          f"); writing a tile {1e3 * b_crc[1]:.1f} ms vs {1e3 * b_plain[1]:.1f} ms")
    print(f"CG pass: without crc32c {plain:.3f} s; verified every read {every:.3f} s -> ratio {every / plain:.3f}; "
          f"default (verified once per worker) {default:.3f} s -> ratio {default / plain:.3f}")
    print(f"(passes, s: without {', '.join(f'{t:.3f}' for t in passes['plain'])}; every read "
          f"{', '.join(f'{t:.3f}' for t in passes['every'])}; default {', '.join(f'{t:.3f}' for t in passes['default'])})")
    comp, w_crc, w_plain = cpu["tile_compute_cpu_s"], cpu["tile_write_cpu_s_crc"], cpu["tile_write_cpu_s_plain"]
    print(f"CPU time: a tile computed {1e3 * comp:.1f} ms, written with crc32c {1e3 * w_crc:.2f} ms, "
          f"without {1e3 * w_plain:.2f} ms -> tile task ratio {(comp + w_crc) / (comp + w_plain):.4f}")
    pp, pe, pd = cpu["pass_cpu_s_plain"], cpu["pass_cpu_s_every_read"], cpu["pass_cpu_s_default"]
    print(f"CPU time: a serial CG pass without crc32c {pp:.3f} s; verified every read {pe:.3f} s -> ratio "
          f"{pe / pp:.3f}; default {pd:.3f} s -> ratio {pd / pp:.3f}")
    print(f"resume check (a stat per recorded tile) {1e3 * stat_s:.1f} ms; full verify pass (read + crc32c of every "
          f"tile, one process) {full_s:.2f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
