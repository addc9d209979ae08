"""CG iterations to a relative residual with each preconditioner, on an MNIST NNGP kernel.

The kernel of the MNIST pipeline's architecture on the first --n training images is held in
memory (the operator is a dense matmat, so this measures iterations, not I/O); all 10 one-hot
right-hand sides are solved together, as in the pipeline.

With --store, the kernel is a built store of the first n MNIST training images (e.g. the MNIST
pipeline's, n = 60,000, too large for memory) and CG runs over it out of core, with the
architecture and inputs stored there; the store's input fingerprint is checked against MNIST.

    python benchmarks/bench_precond.py --n 10000
    python benchmarks/bench_precond.py --store RUN/kernel.zarr --candidates none,nystrom:4096
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time

import numpy as np

from nngp_dask import Architecture, batched_cg, kernel, normalize, open_kernel, tile
from nngp_dask.build import prepare_inputs
from nngp_dask.cluster import client_for
from nngp_dask.gp import StoredKernelOperator, encode_labels
from nngp_dask.kernels import diagonals
from nngp_dask.linalg import make_preconditioner


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
    ap.add_argument("--store", default=None, help="a kernel store of the first n MNIST images: CG out of core")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    with contextlib.ExitStack() as stack:
        if args.store:
            ks = open_kernel(args.store)
            client = stack.enter_context(client_for(None))
            arch, args.n = ks.architecture, ks.shape[0]
            with np.load(args.data, allow_pickle=False) as f:
                mnist = prepare_inputs(f["x_train"][: args.n], normalize=ks.group.attrs["nngp_dask"]["normalize"])
                y = encode_labels(f["y_train"][: args.n].astype(np.int64), np.arange(10))[1]
            if mnist.fingerprint != ks.identity.x_train:
                raise SystemExit(f"--store: {args.store} was not built from the first {args.n} MNIST images")
            x, dx, diag = ks.group["inputs/x_train"][...], ks.group["diagonals/train"][...], ks.diagonal()
            matmat = StoredKernelOperator(ks, args.noise, client).matmat
        else:
            with np.load(args.data, allow_pickle=False) as f:
                x = normalize(f["x_train"][: args.n].reshape(args.n, -1).astype(np.float64), "standardize")
                y = encode_labels(f["y_train"][: args.n].astype(np.int64), np.arange(10))[1]
            arch = Architecture(args.depth, "relu", args.weight_var, args.bias_var)
            k64 = kernel(arch, x).astype(np.float64)  # stored float32; float64 products, as the operator
            diag = np.diag(k64).copy()
            dx = diagonals(arch, x)

            def matmat(v: np.ndarray) -> np.ndarray:
                return k64 @ v + args.noise * v
        run(args, arch, x, dx, diag, y, matmat)


def run(args, arch, x, dx, diag, y, matmat) -> None:
    def columns(idx: np.ndarray) -> np.ndarray:
        return tile(arch, x, x[idx], dx, dx[:, idx], dtype=np.float64)

    rows = []
    print(f"MNIST n={args.n}, relu depth {arch.depth}, weight_var {arch.weight_var}, bias_var {arch.bias_var}, "
          f"noise {args.noise}, 10 right-hand sides, tol {args.tol}, "
          f"{'out of core: ' + args.store if args.store else 'in memory'}", flush=True)
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
