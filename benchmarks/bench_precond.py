"""CG iterations to a relative residual with each preconditioner (and each CG method), on an
MNIST NNGP kernel.

The kernel of the MNIST pipeline's architecture on the first --n training images is held in
memory (the operator is a dense matmat, so this measures iterations, not I/O); all 10 one-hot
right-hand sides are solved together, as in the pipeline.

With --store, the kernel is a built store of the first n MNIST training images (e.g. the MNIST
pipeline's, n = 60,000, too large for memory) and CG runs over it out of core, with the
architecture and inputs stored there; the store's input fingerprint is checked against MNIST.
With --build, a missing store is built first (the MNIST pipeline's kernel: depth-5 ReLU,
standardised inputs, float32 tiles of 2048). Candidates there: ``nystrom:R`` is the in-driver
build from kernel columns of the inputs (the solve's path before issue 16), ``stored_nystrom:R``
the build on the workers from the stored tiles (the solve's path now). Each candidate's build is
timed best of --repeat, with the peak RSS summed over the driver and its workers during the builds
(and the rise above what they held before it). With --methods cg,block_cg every preconditioner
is built once and used by both solvers (:func:`nngp_dask.linalg.batched_cg`, one recurrence per
column, and :func:`nngp_dask.linalg.block_cg`, one Krylov space for all ten), side by side.

    python benchmarks/bench_precond.py --n 10000
    python benchmarks/bench_precond.py --store RUN/kernel.zarr --candidates none,nystrom:4096
    python benchmarks/bench_precond.py --store /tmp/k20k.zarr --build --n 20000 \
        --candidates nystrom:1024,stored_nystrom:1024 --repeat 3 --build-only
    python benchmarks/bench_precond.py --store /tmp/k60k.zarr --build --n 60000 \
        --candidates stored_nystrom:2048 --methods cg,block_cg
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time

import numpy as np

from nngp_dask import Architecture, kernel, normalize, open_kernel, tile
from nngp_dask.build import prepare_inputs
from nngp_dask.cluster import client_for
from nngp_dask.gp import StoredKernelOperator, encode_labels
from nngp_dask.gp.nystrom_store import stored_nystrom
from nngp_dask.kernels import diagonals
from nngp_dask.linalg import batched_cg, block_cg, make_preconditioner
from nngp_dask.monitor import PeakRSS, tree_rss


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
    ap.add_argument("--build", action="store_true", help="build --store from the first --n images if absent")
    ap.add_argument("--repeat", type=int, default=1, help="builds per candidate (best time is reported)")
    ap.add_argument("--build-only", action="store_true", help="time the preconditioner builds, no CG")
    ap.add_argument("--methods", default="cg", help="CG methods, comma-separated: cg (batched), block_cg")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    with contextlib.ExitStack() as stack:
        if args.store:
            client = stack.enter_context(client_for(None))
            if args.build and not os.path.exists(args.store):
                from nngp_dask.build import build_kernel

                with np.load(args.data, allow_pickle=False) as f:
                    xs = f["x_train"][: args.n].reshape(args.n, -1).astype(np.float64)
                build_kernel(Architecture(args.depth, "relu", args.weight_var, args.bias_var), xs, args.store,
                             tile=2048, dtype="float32", normalize="standardize", client=client, progress=False)
            ks = open_kernel(args.store)
            arch, args.n = ks.architecture, ks.shape[0]
            with np.load(args.data, allow_pickle=False) as f:
                mnist = prepare_inputs(f["x_train"][: args.n], normalize=ks.group.attrs["nngp_dask"]["normalize"])
                y = encode_labels(f["y_train"][: args.n].astype(np.int64), np.arange(10))[1]
            if mnist.fingerprint != ks.identity.x_train:
                raise SystemExit(f"--store: {args.store} was not built from the first {args.n} MNIST images")
            x, dx, diag = ks.group["inputs/x_train"][...], ks.group["diagonals/train"][...], ks.diagonal()
            matmat = StoredKernelOperator(ks, args.noise, client).matmat
            args.ks, args.client = ks, client
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
            args.ks = None
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
        before = tree_rss()
        times = []
        with PeakRSS(interval=0.05) as peak:
            for _ in range(max(1, args.repeat)):
                pre = None  # the previous build's factor is not kept while the next is made
                t0 = time.perf_counter()
                if name == "stored_nystrom":
                    if args.ks is None:
                        raise SystemExit("stored_nystrom: needs --store")
                    pre = stored_nystrom(args.ks, args.client, int(rank), args.noise)
                else:
                    pre = make_preconditioner(name, diag=diag, column_fn=columns, noise=args.noise,
                                              rank=int(rank) if rank else None, n=args.n)
                times.append(time.perf_counter() - t0)
        t_build = min(times)
        print(f"  {cand:<22} build {t_build:6.1f} s (best of {len(times)}: {', '.join(f'{t:.1f}' for t in times)}), "
              f"peak RSS {peak.peak / 2**30:.2f} GiB summed "
              f"(+{(peak.peak - before) / 2**30:.2f} over {before / 2**30:.2f} before)", flush=True)
        solved = []
        for method in ([] if args.build_only else args.methods.split(",")):
            solver = {"cg": batched_cg, "block_cg": block_cg}[method]
            t0 = time.perf_counter()
            res = solver(matmat, y, tol=args.tol, maxiter=args.maxiter, preconditioner=pre)
            t_cg = time.perf_counter() - t0
            solved.append((method, res.iterations, t_cg))
            state = "converged" if res.converged else "NOT converged"
            print(f"    {method:<9} {res.iterations:>5} iterations ({state}, worst relative residual "
                  f"{res.residuals[-1].max():.2e}), CG {t_cg:6.1f} s "
                  f"({t_cg / max(res.iterations, 1):.2f} s per iteration)", flush=True)
            rows.append({"preconditioner": cand, "method": method, "iterations": res.iterations,
                         "converged": res.converged, "build_s": t_build, "build_times_s": times, "cg_s": t_cg,
                         "peak_rss": peak.peak, "rss_before": before})
        if args.build_only:
            rows.append({"preconditioner": cand, "build_s": t_build, "build_times_s": times, "peak_rss": peak.peak,
                         "rss_before": before})
        for method, its, t_cg in solved[1:]:
            print(f"    {method} / {solved[0][0]}: iterations {its / solved[0][1]:.2f}x, CG time "
                  f"{t_cg / solved[0][2]:.2f}x", flush=True)
    builds = list({row["preconditioner"]: row for row in rows}.values())
    if len(builds) > 1:
        base = builds[0]
        for row in builds[1:]:
            print(f"  {row['preconditioner']} / {base['preconditioner']}: build time "
                  f"{row['build_s'] / base['build_s']:.2f}x, peak RSS rise "
                  f"{(row['peak_rss'] - row['rss_before']) / max(base['peak_rss'] - base['rss_before'], 1):.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
