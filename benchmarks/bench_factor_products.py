"""Time of the Nystrom preconditioner's float32 factor products, ``(F diag(c) F^T R)`` in float64.

Each application of the preconditioner in CG (one per iteration) makes these two passes over
the ``n x r`` factor; at MNIST's 60,000 points and rank 2,048 they are most of the solve's work
outside the kernel passes. Random values: the time does not depend on them. Run it against an
older tree with ``PYTHONPATH=<tree>`` (from another directory) to compare versions.

    python benchmarks/bench_factor_products.py --n 60000 --rank 2048 --k 10
    python benchmarks/bench_factor_products.py --applications   # whole preconditioner applications

``--applications`` times whole applications ``M^{-1} R`` of the two Nystrom preconditioners a
solve uses, of the MNIST solve's shapes: a new one (:class:`~nngp_dask.linalg.SplitLowRank`, its
``--float64-columns`` leading columns in float64, the rest float32) and one carried over to
``--new-rows`` appended rows (:class:`~nngp_dask.linalg.ExtendedNystrom` of a float32 factor as a
solve stores it).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from nngp_dask.linalg import ExtendedNystrom, SplitLowRank, factor_products


def best_of(fn, repeat: int) -> list[float]:
    fn()  # compile / load
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def applications(args: argparse.Namespace) -> None:
    rng = np.random.default_rng(0)
    n, r, h, m = args.n, args.rank, args.float64_columns, args.new_rows
    f = rng.standard_normal((n, r), dtype=np.float32) * np.float32(0.1)
    s = np.sqrt(np.einsum("ij,ij->j", f, f, dtype=np.float64))
    rhs = rng.standard_normal((n, args.k))
    split = SplitLowRank(f[:, :h].astype(np.float64), f[:, h:], s, 0.02, threads=args.threads)
    ext = ExtendedNystrom.extend(f[:n - m], None, np.eye(r), np.arange(r), rng.standard_normal((m, r)) * 0.1, 0.02,
                                 pool=n - m)
    for name, pre in ((f"SplitLowRank ({h} float64 + {r - h} float32 columns)", split),
                      (f"ExtendedNystrom ({n - m} float32 + {m} new rows)", ext)):
        times = best_of(lambda p=pre: p.apply(rhs), args.repeat)
        print(f"{name}, n={n} rank={r} k={args.k}: best of {args.repeat} {min(times):.3f} s; "
              f"all: {', '.join(f'{t:.3f}' for t in times)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=60000)
    ap.add_argument("--rank", type=int, default=2048)
    ap.add_argument("--k", type=int, default=10, help="right-hand sides")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--applications", action="store_true", help="time whole preconditioner applications")
    ap.add_argument("--float64-columns", type=int, default=109, help="(the MNIST solve's at 60,000 points)")
    ap.add_argument("--new-rows", type=int, default=3000)
    args = ap.parse_args()
    if args.applications:
        return applications(args)
    rng = np.random.default_rng(0)
    f = rng.standard_normal((args.n, args.rank), dtype=np.float32)
    r_t = np.ascontiguousarray(rng.standard_normal((args.k, args.n)))
    coef = rng.standard_normal(args.rank)
    out = np.zeros_like(r_t)
    factor_products(f, r_t, coef, out, threads=args.threads)  # compile / load
    times = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        factor_products(f, r_t, coef, out, threads=args.threads)
        times.append(time.perf_counter() - t0)
    flops = 4.0 * args.n * args.rank * args.k
    print(f"factor products n={args.n} rank={args.rank} k={args.k}, {args.threads} threads: best of {args.repeat} "
          f"{min(times):.3f} s ({flops / min(times) / 1e9:.1f} GFLOP/s); all: {', '.join(f'{t:.3f}' for t in times)}")


if __name__ == "__main__":
    main()
