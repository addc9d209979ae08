"""CG iterations against products (passes over a stored kernel), cold and warm (issue 17, in memory).

Out of core every product of :func:`nngp_dask.linalg.batched_cg` is one pass over the stored tiles,
whatever its width, so what a solve costs is its number of products. On the first n MNIST images
with the MNIST pipeline's model (depth-5 ReLU NNGP, noise 0.02, tolerance 1e-4, one-hot targets), a
Nystrom preconditioner of rank 0.075 n: a cold solve, and a warm one from the solution of the first
95 % of the rows (what a re-fit after an append does). Run it at an older commit to compare.

    NNGP_DASK_DATA=../shared/data python benchmarks/bench_cg_products.py --n 4000
"""

from __future__ import annotations

import argparse
import os

import numpy as np

from nngp_dask import Architecture, kernel
from nngp_dask.gp.targets import one_hot_targets
from nngp_dask.kernels import normalize
from nngp_dask.linalg import Nystrom, batched_cg


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=4000)
    p.add_argument("--data", default=os.path.join(os.environ.get("NNGP_DASK_DATA", "../shared/data"), "mnist.npz"))
    args = p.parse_args()
    n, noise, tol = args.n, 0.02, 1e-4
    with np.load(args.data) as f:
        x = normalize(f["x_train"][:n].reshape(n, -1).astype(np.float64), "standardize")
        y = one_hot_targets(f["y_train"][:n], 10)
    k = kernel(Architecture(5, "relu", 2.0, 0.0), x, dtype="float64")
    a = k + noise * np.eye(n)
    rank, old = int(0.075 * n), int(round(0.95 * n))
    widths: list[int] = []

    def matmat(v: np.ndarray) -> np.ndarray:
        widths.append(v.shape[1])
        return a @ v

    pre = Nystrom.build(lambda idx: k[:, idx], n, rank, noise)
    cold = batched_cg(matmat, y, tol=tol, preconditioner=pre)
    print(f"n = {n}, Nystrom rank {rank}, noise {noise}, tol {tol}")
    print(f"  cold: {cold.iterations} iterations, {len(widths)} products (widths {widths[-6:]} at the end)")
    prefix = Nystrom.build(lambda idx: k[:old][:, idx], old, rank, noise)
    x0 = np.zeros_like(y)
    x0[:old] = batched_cg(lambda v: a[:old, :old] @ v, y[:old], tol=tol, preconditioner=prefix).x
    widths.clear()
    warm = batched_cg(matmat, y, tol=tol, preconditioner=pre, x0=x0)
    print(f"  warm from the first {old} rows' solution: {warm.iterations} iterations, {len(widths)} products "
          "(the start's residual included)")


if __name__ == "__main__":
    main()
