"""Cost of one CG iteration over a stored kernel: cold (from disk) and cached, with references.

Cold: every chunk file of ``kernel/train_train`` is dropped from the page cache
(``nngp_dask.store.pagecache.drop_from_cache``), then (a) the stored bytes are read sequentially and (b) one
operator pass (``matmat`` with k right-hand sides) runs; the ratio b/a is the target (<= 1.3).
Cached: the same pass with the tiles in the page cache against an in-memory NumPy matmat of the
same (full, float32) matrix (target <= 1.5); the cached comparison needs the full matrix in
memory, so it runs only when n is small enough (``--max-dense``).

    python benchmarks/bench_solve.py STORE [--k 10]
    python benchmarks/bench_solve.py runs/mnist_augmented/kernel.zarr --cached-repeats 0 --passes 3
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from nngp_dask import open_kernel
from nngp_dask.cluster import client_for
from nngp_dask.gp import StoredKernelOperator
from nngp_dask.store import drop_from_cache


def chunk_files(root: str) -> list[str]:
    out = []
    for d, _, files in os.walk(root):
        out += [os.path.join(d, f) for f in files if f != "zarr.json"]
    return sorted(out)


def sequential_read(files: list[str], block: int = 16 << 20) -> tuple[int, float]:
    total, t0 = 0, time.perf_counter()
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while chunk := fh.read(block):
                total += len(chunk)
    return total, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("store")
    ap.add_argument("--k", type=int, default=10, help="right-hand sides")
    ap.add_argument("--max-dense", type=int, default=30000, help="largest n for the in-memory comparison")
    ap.add_argument("--cached-repeats", type=int, default=3,
                    help="cached passes timed (0: none, for a kernel larger than the page cache)")
    ap.add_argument("--passes", type=int, default=0,
                    help="also time this many consecutive passes from a dropped cache, in the same order each "
                         "time and alternating (for a kernel larger than the page cache)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    ks = open_kernel(args.store)
    n = ks.shape[0]
    files = chunk_files(os.path.join(ks.url, "kernel", "train_train"))
    v = np.random.default_rng(0).standard_normal((n, args.k))
    out: dict = {"n": n, "k": args.k, "stored_gb": sum(os.path.getsize(f) for f in files) / 1e9}
    with client_for(None) as client:
        op = StoredKernelOperator(ks, 0.0, client)
        op.matmat(v[:, :1])  # warm the workers (imports, open arrays)
        for f in files:
            drop_from_cache(f)
        nbytes, t_read = sequential_read(files)
        out["cold_read_s"] = t_read
        out["disk_read_gb_per_s"] = nbytes / 1e9 / t_read
        for f in files:
            drop_from_cache(f)
        t0 = time.perf_counter()
        op.matmat(v)
        out["cold_matmat_s"] = time.perf_counter() - t0
        out["cold_ratio"] = out["cold_matmat_s"] / t_read
        print(f"n={n}, k={args.k}, stored {out['stored_gb']:.2f} GB: sequential read {t_read:.2f} s "
              f"({out['disk_read_gb_per_s']:.2f} GB/s); cold CG matmat {out['cold_matmat_s']:.2f} s "
              f"-> ratio {out['cold_ratio']:.2f} (target <= 1.3)", flush=True)
        if args.passes:
            # a kernel larger than the page cache: consecutive passes (as CG makes them) in one order
            # every time against turning back at each end (StoredKernelOperator's alternate)
            for alternate in (False, True):
                seq_op = StoredKernelOperator(ks, 0.0, client, alternate=alternate)
                for f in files:
                    drop_from_cache(f)
                times = [_timed(lambda op=seq_op: op.matmat(v)) for _ in range(args.passes)]
                name = "alternating" if alternate else "same_order"
                out[f"passes_{name}_s"] = times
                print(f"{args.passes} consecutive passes, {name.replace('_', ' ')}: "
                      + ", ".join(f"{t:.1f}" for t in times) + f" s (after the first: mean "
                      f"{np.mean(times[1:]) if len(times) > 1 else float('nan'):.1f} s, "
                      f"{np.mean(times[1:]) / t_read if len(times) > 1 else float('nan'):.2f}x the sequential read)",
                      flush=True)
        if args.cached_repeats < 1:
            print("no cached passes (--cached-repeats 0)")
            return _dump(out, args.json)
        sequential_read(files)
        warm = min(_timed(lambda: op.matmat(v)) for _ in range(args.cached_repeats))
        out["cached_matmat_s"] = warm
        if n <= args.max_dense:
            full = ks.to_dask().compute()
            v32 = v.astype(full.dtype)
            dense = min(_timed(lambda: full @ v32) for _ in range(3))
            full64 = full.astype(np.float64)
            del full
            dense64 = min(_timed(lambda: full64 @ v) for _ in range(3))
            out.update(numpy_matmat_s=dense, numpy_matmat_float64_s=dense64, cached_ratio=warm / dense,
                       cached_ratio_float64=warm / dense64)
            print(f"cached CG matmat {warm:.2f} s vs in-memory NumPy: {dense:.2f} s in the stored precision "
                  f"(ratio {warm / dense:.2f}), {dense64:.2f} s in float64 like the operator (ratio "
                  f"{warm / dense64:.2f}); target <= 1.5")
        else:
            print(f"cached CG matmat {warm:.2f} s (n > --max-dense: no in-memory comparison)")
    _dump(out, args.json)


def _dump(out: dict, path: str | None) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(out, f, indent=1)


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
