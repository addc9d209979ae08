"""Time of the Nystrom preconditioner's float32 factor products, ``(F diag(c) F^T R)`` in float64.

Each application of the preconditioner in CG (one per iteration) makes these two passes over
the ``n x r`` factor; at MNIST's 60,000 points and rank 2,048 they are most of the solve's work
outside the kernel passes. Random values: the time does not depend on them. Run it against an
older tree with ``PYTHONPATH=<tree>`` (from another directory) to compare versions.

    python benchmarks/bench_factor_products.py --n 60000 --rank 2048 --k 10
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from nngp_dask.linalg import factor_products


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=60000)
    ap.add_argument("--rank", type=int, default=2048)
    ap.add_argument("--k", type=int, default=10, help="right-hand sides")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
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
