"""The dense Cholesky factor by blocks against one LAPACK call, and where one call is unsafe.

OpenBLAS's threaded ``syrk`` (inside its parallel ``potrf``) overruns a fixed buffer at large
orders on few threads (``nngp_dask/_blas.py``), so :func:`nngp_dask.linalg.cholesky_in_place`
factorises matrices above ``POTRF_MAX_N`` (8,192) by blocks of that order. This prints, best of
``--repeat`` on the same matrix (``G G^T + I`` with ``G`` of shape ``(n, 64)``, Fortran-ordered
float64), the time of one ``scipy.linalg.cho_factor`` against the blocked factorisation at an order
where one call is still safe on 2 threads (default 15,000: the overrun starts near 15,100 there),
their ratio, and the largest difference of the factors.

    python benchmarks/bench_cholesky.py --n 15000 --repeat 2
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import scipy.linalg
from threadpoolctl import threadpool_info

from nngp_dask.linalg import POTRF_MAX_N, cholesky_in_place


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=15000)
    p.add_argument("--repeat", type=int, default=2)
    args = p.parse_args()
    g = np.random.default_rng(0).standard_normal((args.n, 64))
    a = np.asfortranarray(g @ g.T + np.eye(args.n))
    blas = next((i for i in threadpool_info() if "scipy" in i["filepath"]), {})
    print(f"n = {args.n}, blocks of {POTRF_MAX_N}; scipy's BLAS: {blas.get('internal_api')} {blas.get('version')} "
          f"{blas.get('architecture')}, {blas.get('num_threads')} threads")
    best = {"one potrf (scipy.linalg.cho_factor)": np.inf, "blocked (cholesky_in_place)": np.inf}
    factors = {}
    for _ in range(args.repeat):  # alternating, so that both sides see the same machine
        for name in best:
            work = a.copy(order="F")
            t0 = time.perf_counter()
            if name.startswith("one"):
                scipy.linalg.cho_factor(work, lower=True, overwrite_a=True, check_finite=False)
            else:
                cholesky_in_place(work)
            best[name] = min(best[name], time.perf_counter() - t0)
            factors[name] = np.tril(work)
            del work
    for name, seconds in best.items():
        print(f"  {name:38} {seconds:6.1f} s")
    one, blocked = best.values()
    diff = np.abs(np.subtract(*factors.values())).max()
    print(f"  blocked / one call: {blocked / one:.2f}x; max |L_blocked - L_one| = {diff:.2e}")


if __name__ == "__main__":
    main()
