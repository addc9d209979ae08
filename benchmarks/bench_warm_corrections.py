"""Can a cheap correction of the warm start cut a re-fit's CG iterations? (issue 17, in memory)

A re-fit after an append starts CG from ``[alpha_old; 0]`` (:mod:`nngp_dask.gp.warmstart`), whose
residual lives in the new rows: ``r_w = y_w - K_wo alpha_old``. The exact correction is the Schur
step ``d_w = S^{-1} r_w``, ``d_o = -(K_oo + noise I)^{-1} K_ow d_w`` with ``S = K_ww + noise I -
K_wo (K_oo + noise I)^{-1} K_ow``, whose ``d_o`` is a full solve with as many right-hand sides as
new rows. This compares, on an MNIST subset's kernel held in memory (the MNIST pipeline's
architecture, noise and tolerance; the re-fit's extended Nystrom preconditioner, landmarks from the
old rows), the CG iterations from:

* zeros (a cold start), and ``[alpha_old; 0]`` (what a re-fit does);
* plus the exact Schur step (the ideal: converged at once, but unaffordable out of core);
* plus a block step on the new rows alone (``d_w = (K_ww + noise I)^{-1} r_w``);
* plus the Schur step with the Nystrom factor in place of the old system (``K_wo (K_oo + noise
  I)^{-1} K_ow ~ F_w F_w^T`` and ``d_o = -M_oo^{-1} F_o F_w^T d_w``: costs O(n r) only);
* plus the same with the true ``K_ow`` and ``M_oo^{-1}`` for the old system's inverse.

    NNGP_DASK_DATA=../shared/data python benchmarks/bench_warm_corrections.py --n 4000,8000
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

from nngp_dask import Architecture, kernel
from nngp_dask.gp.targets import one_hot_targets
from nngp_dask.kernels import normalize
from nngp_dask.linalg import ExtendedNystrom, Nystrom, batched_cg

ROOT = Path(__file__).resolve().parents[1]


def run(x: np.ndarray, labels: np.ndarray, new_fraction: float, rank: int, noise: float, tol: float) -> None:
    n = len(x)
    y = one_hot_targets(labels, 10)
    k = kernel(Architecture(5, "relu", 2.0, 0.0), x, dtype="float64")
    a = k + noise * np.eye(n)
    no = int(round(n * (1 - new_fraction)))
    o, w = slice(0, no), slice(no, n)
    old = Nystrom.build(lambda idx: k[:no][:, idx], no, rank, noise)
    alpha_old = batched_cg(lambda v: a[o, o] @ v, y[o], tol=tol, preconditioner=old).x
    landmarks, transform = old.info["landmarks"], old.info["transform"]
    pre = ExtendedNystrom.extend(old.lowrank_factor, None, transform, landmarks, k[w][:, landmarks], noise, pool=no)
    pre_old = ExtendedNystrom.extend(old.lowrank_factor, None, transform, landmarks, k[w][:0, landmarks], noise,
                                     pool=no)
    f = pre.lowrank_factor  # [F_o; F_w], as a re-fit extends it

    print(f"n = {n} ({n - no} new rows), Nystrom rank {rank}, noise {noise}, tol {tol}")

    def report(label: str, x0: np.ndarray) -> None:
        r0 = np.linalg.norm(y - a @ x0, axis=0) / np.linalg.norm(y, axis=0)
        res = batched_cg(lambda v: a @ v, y, tol=tol, preconditioner=pre, x0=x0)
        print(f"  {label:42s} starting relative residual {r0.max():7.4f}, {res.iterations:3d} CG iterations")

    warm = np.zeros_like(y)
    warm[o] = alpha_old
    r_w = y[w] - a[w, o] @ alpha_old

    def corrected(d_w: np.ndarray, d_o: np.ndarray) -> np.ndarray:
        x0 = warm.copy()
        x0[w] += d_w
        x0[o] += d_o
        return x0

    report("cold (zeros)", np.zeros_like(y))
    report("warm [alpha_old; 0]", warm)
    inv_kow = np.linalg.solve(a[o, o], a[o, w])
    d_w = np.linalg.solve(a[w, w] - a[w, o] @ inv_kow, r_w)
    report("warm + exact Schur step", corrected(d_w, -inv_kow @ d_w))
    report("warm + block step on the new rows", corrected(np.linalg.solve(a[w, w], r_w), 0.0))
    d_w = np.linalg.solve(a[w, w] - f[w] @ f[w].T, r_w)
    report("warm + Nystrom Schur step (F_o F_w^T)", corrected(d_w, -pre_old.apply(f[o] @ (f[w].T @ d_w))))
    d_w = np.linalg.solve(a[w, w] - a[w, o] @ pre_old.apply(a[o, w]), r_w)
    report("warm + Nystrom Schur step (true K_ow)", corrected(d_w, -pre_old.apply(a[o, w] @ d_w)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", default="4000,8000", help="training points (the first n of MNIST's)")
    p.add_argument("--new-fraction", type=float, default=0.05)
    p.add_argument("--rank-fraction", type=float, default=0.075, help="Nystrom rank over n")
    p.add_argument("--data", default=os.environ.get("NNGP_DASK_DATA", str(ROOT.parent / "shared" / "data")))
    args = p.parse_args()
    mnist = np.load(Path(args.data) / "mnist.npz")
    for n in map(int, args.n.split(",")):
        x = normalize(mnist["x_train"][:n].reshape(n, -1).astype(np.float64), "standardize")
        run(x, mnist["y_train"][:n].astype(np.intp), args.new_fraction, int(n * args.rank_fraction), 0.02, 1e-4)


if __name__ == "__main__":
    main()
