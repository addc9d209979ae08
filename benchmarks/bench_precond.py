"""CG iterations to a relative residual with each preconditioner, on an MNIST NNGP kernel.

The kernel of the MNIST pipeline's architecture on the first --n training images is held in
memory (the operator is a dense matmat, so this measures iterations, not I/O); all 10 one-hot
right-hand sides are solved together, as in the pipeline.

    python benchmarks/bench_precond.py --n 10000
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from nngp_dask import Architecture, batched_cg, kernel, normalize, tile
from nngp_dask.datasets import one_hot_targets
from nngp_dask.kernel import diagonals
from nngp_dask.preconditioners import make_preconditioner


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=os.environ.get("NNGP_DASK_DATA", "../shared/data") + "/mnist.npz")
    ap.add_argument("--n", type=int, default=10000)
    ap.add_argument("--depth", type=int, default=5)
    ap.add_argument("--weight-var", type=float, default=2.0)
    ap.add_argument("--bias-var", type=float, default=0.0)
    ap.add_argument("--noise", type=float, default=0.02)
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--maxiter", type=int, default=2000)
    ap.add_argument("--candidates", default="none,jacobi,pivoted_cholesky:512,nystrom:1024,nystrom:4096")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    with np.load(args.data, allow_pickle=False) as f:
        x = normalize(f["x_train"][: args.n].reshape(args.n, -1).astype(np.float64), "standardize")
        y = one_hot_targets(f["y_train"][: args.n].astype(np.int64), np.arange(10))
    arch = Architecture(args.depth, "relu", args.weight_var, args.bias_var)
    k = kernel(arch, x)  # float32, as stored by the pipeline
    diag = np.diag(k).astype(np.float64)
    dx = diagonals(arch, x)

    def columns(idx: np.ndarray) -> np.ndarray:
        return tile(arch, x, x[idx], dx, dx[:, idx], dtype=np.float64)

    k64 = k.astype(np.float64)  # float64 products, as the stored operator does

    def matmat(v: np.ndarray) -> np.ndarray:
        return k64 @ v + args.noise * v

    rows = []
    print(f"MNIST n={args.n}, relu depth {args.depth}, weight_var {args.weight_var}, bias_var {args.bias_var}, "
          f"noise {args.noise}, 10 right-hand sides, tol {args.tol}")
    for cand in args.candidates.split(","):
        name, _, rank = cand.partition(":")
        t0 = time.perf_counter()
        pre = make_preconditioner(name, diag=diag, column_fn=columns, noise=args.noise,
                                  rank=int(rank) if rank else None, n=args.n)
        t_build = time.perf_counter() - t0
        t0 = time.perf_counter()
        res = batched_cg(matmat, y, tol=args.tol, maxiter=args.maxiter, preconditioner=pre)
        t_cg = time.perf_counter() - t0
        rows.append({"preconditioner": cand, "iterations": res.iterations, "converged": res.converged,
                     "build_s": t_build, "cg_s": t_cg})
        print(f"  {cand:<22} {res.iterations:>5} iterations ({'converged' if res.converged else 'NOT converged'}), "
              f"build {t_build:6.1f} s, CG {t_cg:6.1f} s", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
