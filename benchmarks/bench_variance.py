"""Predictive variances on kin40k: their cost against the mean's solve, their error against the exact one.

The shipped regression pipeline's settings (pipelines/uci_regression.toml: ReLU NNGP depth 2,
weight_var 2, bias_var 0.1, noise 0.1, float32 tiles of 2048, CG to 1e-4 with a rank-256 pivoted
Cholesky preconditioner) on the first ``--n`` training and ``--m`` test rows of split 0, on an
embedded 2-worker cluster. Timed, best of ``--repeat`` (same store, same inputs, one run):

- the mean's solve (``nngp_dask.solve``; its finished record is deleted before each repeat),
- ``predict`` without a variance (the mean: one pass over the test tiles),
- ``predict(variance="dense")``, ``"tiled"`` (the same factor out of core, from the stored tiles
  panel by panel), the same in float32 (``tiled_variances(..., dtype=numpy.float32)``, which
  ``predict`` does not use), ``"lowrank"`` and, once (it is the slow one), ``"exact"`` (CG);
- a Cholesky solve and the dense variances from its own factor (no second factorisation).

Errors are against ``"dense"`` (the stored kernel's float64 Cholesky factor: exact to rounding;
``"exact"`` stops CG at its tolerance): max and median relative error of the latent variance, and
the coverage of the 95 % predictive intervals ``mean +- 1.96 sqrt(var + noise)`` on the test targets.
The LOVE rows (Pleiss et al. 2018) emulate a Lanczos cache in memory on the same stored kernel, to
show what rank it would need: Lanczos on ``K + noise I`` started from the mean test cross-covariance
(``var = prior - q^T T^-1 q``, ``q = Q^T k*``), and preconditioned by the solve's low-rank factor with
the preconditioner as control variate (``k^T M^-1 k + q^T (T^-1 - I) q`` for ``z = M^-1/2 k``).
Out of core each Lanczos step would be one pass over the tiles. ``--eigen-ranks`` adds the best
any rank-r cache can do: ``k*`` projected on the r leading eigenvectors of K.

    NNGP_DASK_DATA=../shared/data python benchmarks/bench_variance.py --n 10000 --m 1000
"""

from __future__ import annotations

import argparse
import gzip
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from nngp_dask import Architecture
from nngp_dask.build import build_kernel
from nngp_dask.cluster import client_for
from nngp_dask.gp import predict, solve
from nngp_dask.gp.regression import dense_kernel
from nngp_dask.gp.tiled_variance import tiled_variances
from nngp_dask.linalg import cholesky_factor
from nngp_dask.store import solve_path

ARCH = Architecture(2, "relu", 2.0, 0.1)
NOISE = 0.1


def load(n: int, m: int) -> tuple[np.ndarray, ...]:
    root = Path(os.environ.get("NNGP_DASK_DATA", "../shared/data")) / "uci" / "kin40k"
    data = np.loadtxt(gzip.open(root / "data.csv.gz"), delimiter=",")
    test = np.loadtxt(gzip.open(root / "test_mask.csv.gz"), delimiter=",")[:, 0].astype(bool)
    tr, te = data[~test][:n], data[test][:m]
    return tr[:, :-1], tr[:, -1], te[:, :-1], te[:, -1]


def errors(var: np.ndarray, exact: np.ndarray, mean: np.ndarray, y: np.ndarray) -> dict:
    rel = np.abs(var - exact) / exact
    cover = lambda v: float(np.mean(np.abs(y - mean) <= 1.96 * np.sqrt(np.maximum(v, 0) + NOISE)))  # noqa: E731
    return {"max_rel": float(rel.max()), "median_rel": float(np.median(rel)), "coverage": cover(var),
            "coverage_diff": cover(var) - cover(exact)}


def love(k: np.ndarray, kstar_t: np.ndarray, prior: np.ndarray, factor: np.ndarray | None, steps: list[int]
         ) -> dict[int, np.ndarray]:
    """Latent variances from an r-step Lanczos cache (full reorthogonalisation), for each r in ``steps``."""
    n = k.shape[0]
    if factor is None:
        half = lambda v: v  # noqa: E731
    else:
        s2 = np.sum(factor * factor, axis=0)
        a = np.sqrt(s2 + NOISE)
        coef = -1.0 / (np.sqrt(NOISE) * a * (np.sqrt(NOISE) + a))  # M^-1/2 = I / sqrt(noise) + F diag(coef) F^T
        half = lambda v: v / np.sqrt(NOISE) + factor @ ((coef[:, None] if v.ndim == 2 else coef) * (factor.T @ v))  # noqa: E731
    z = half(kstar_t)
    zz = np.sum(z * z, axis=0)
    q_basis = np.zeros((n, max(steps) + 1))
    start = z.mean(axis=1)
    q_basis[:, 0] = start / np.linalg.norm(start)
    alphas, betas, out = [], [], {}
    for j in range(max(steps)):
        w = half(k @ half(q_basis[:, j]) + NOISE * half(q_basis[:, j]))
        alphas.append(float(q_basis[:, j] @ w))
        w -= alphas[-1] * q_basis[:, j] + (betas[-1] * q_basis[:, j - 1] if j else 0.0)
        for _ in range(2):
            w -= q_basis[:, :j + 1] @ (q_basis[:, :j + 1].T @ w)
        betas.append(float(np.linalg.norm(w)))
        q_basis[:, j + 1] = w / betas[-1]
        r = j + 1
        if r in steps:
            t = np.diag(alphas) + np.diag(betas[:r - 1], 1) + np.diag(betas[:r - 1], -1)
            q = q_basis[:, :r].T @ z
            reduction = np.sum(q * np.linalg.solve(t, q), axis=0)
            if factor is not None:  # the control variate: z's part outside the basis weighted by M^-1
                reduction += zz - np.sum(q * q, axis=0)
            out[r] = prior - reduction
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10000)
    ap.add_argument("--m", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--love-steps", default="100,300", help="Lanczos steps to emulate; '' for none")
    ap.add_argument("--eigen-ranks", default="",
                    help="also the best any rank-r cache can do: k* projected on K's r leading eigenvectors "
                         "(one dense eigendecomposition), e.g. 300,1000,2000")
    ap.add_argument("--skip-exact", action="store_true",
                    help="do not run variance='exact' (one CG per test point: the slow one)")
    ap.add_argument("--workdir", default=None, help="default: a temporary directory, removed at the end")
    args = ap.parse_args()
    x, y, xt, yt = load(args.n, args.m)
    ymean = y.mean()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_variance_"))
    print(f"# kin40k split 0: n={x.shape[0]} train, m={xt.shape[0]} test; relu depth 2, noise {NOISE}, float32 "
          f"tiles 2048, CG tol 1e-4, pivoted_cholesky rank 256; {os.cpu_count()} cores, load "
          f"{os.getloadavg()[0]:.2f}")
    try:
        with client_for(None) as client:
            t0 = time.perf_counter()
            ks = build_kernel(ARCH, x, work / "k.zarr", x_test=xt, tile=2048, dtype="float32", client=client,
                              progress=False)
            print(f"kernel build            {time.perf_counter() - t0:7.1f} s")
            kw = dict(noise=NOISE, tol=1e-4, method="cg", preconditioner="pivoted_cholesky", rank=256,
                      client=client, progress=False)
            solve_s = []
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                result = solve(ks, y - ymean, **kw)
                solve_s.append(time.perf_counter() - t0)
                if len(solve_s) < args.repeat:
                    del ks.group[solve_path(result.key)]  # this benchmark's own record: solve afresh
            timed: dict[str, float] = {}
            preds: dict[str, tuple] = {}
            modes = [("mean", args.repeat), ("dense", args.repeat), ("tiled", args.repeat), ("lowrank", args.repeat)]
            for mode, reps in modes + ([] if args.skip_exact else [("exact", 1)]):
                best = np.inf
                for _ in range(reps):
                    t0 = time.perf_counter()
                    out = predict(ks, result, variance=False if mode == "mean" else mode, client=client)
                    best = min(best, time.perf_counter() - t0)
                timed[mode], preds[mode] = best, out
            # the dense factor's read and factorisation: in place in float64 (what predict does), against
            # the kernel read as stored and copied to float64 (what it did before), alternating
            factor_s = {"in place": np.inf, "copied": np.inf}
            for _ in range(args.repeat):
                for how in factor_s:
                    t0 = time.perf_counter()
                    if how == "in place":
                        cholesky_factor(dense_kernel(ks, np.float64), NOISE, overwrite_k=True)
                    else:
                        cholesky_factor(dense_kernel(ks), NOISE)
                    factor_s[how] = min(factor_s[how], time.perf_counter() - t0)
            # a Cholesky solve whose factor the dense variances reuse (what a pipeline with solver.method
            # "auto" does up to DENSE_VARIANCE_MAX_N points when it takes dense variances)
            chol = {"solve": np.inf, "variances": np.inf}
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                direct = solve(ks, y - ymean, noise=NOISE, method="cholesky", client=client, progress=False)
                t1 = time.perf_counter()
                predict(ks, direct, variance="dense", client=client)
                chol = {"solve": min(chol["solve"], t1 - t0),
                        "variances": min(chol["variances"], time.perf_counter() - t1)}
                del ks.group[solve_path(direct.key)]
            best = np.inf  # the out-of-core factor in float32: what predict does not use, and why
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                var32 = tiled_variances(ks, NOISE, ks.test_prior(), lambda rows: ks.read_rows("test_train", rows).T,
                                        dtype=np.float32)
                best = min(best, time.perf_counter() - t0)
            timed["tiled, float32 factor"], preds["tiled, float32 factor"] = best + timed["mean"], (None, var32)
            k = np.asarray(ks.read_rows("train_train", slice(0, ks.shape[0])), dtype=np.float64)
            kstar_t = np.asarray(ks.read_rows("test_train", slice(0, ks.n_test)), dtype=np.float64).T
            factor = ks.group[solve_path(result.key)]["lowrank_factor"][...]
        solve_best = min(solve_s)
        print(f"mean's solve (CG)       {solve_best:7.1f} s  ({result.iterations} iterations; best of "
              f"{args.repeat}: {', '.join(f'{s:.1f}' for s in solve_s)})")
        print(f"predict, mean only      {timed['mean']:7.1f} s")
        both = chol["solve"] + chol["variances"]
        print(f"Cholesky solve {chol['solve']:.1f} s, then its factor's dense variances {chol['variances']:.1f} s: "
              f"mean and exact variances in {both:.1f} s, against {solve_best + timed['dense']:.1f} s by CG and "
              f"'dense' ({both - solve_best:.1f} s, {(both - solve_best) / solve_best:.2f}x the CG solve, more than "
              "the mean alone)")
        print(f"dense factor (read + Cholesky): in place {factor_s['in place']:.2f} s, read as stored and copied "
              f"to float64 {factor_s['copied']:.2f} s")
        # the reference: "dense", the stored kernel's float64 factor, exact to rounding
        mean, exact = preds["mean"] + ymean, preds["dense"][1]
        print("\nerrors against 'dense' (the float64 factor of the stored kernel: exact to rounding)")
        print(f"{'variance':<34} {'predict s':>9} {'var s':>7} {'var/solve':>9} {'max rel':>9} {'med rel':>9} "
              f"{'cover95':>8} {'d cover':>8}")
        for mode in [m for m in ("exact", "dense", "tiled", "tiled, float32 factor", "lowrank") if m in preds]:
            e = errors(preds[mode][1], exact, mean, yt)
            var_s = timed[mode] - timed["mean"]
            print(f"{mode:<34} {timed[mode]:9.1f} {var_s:7.1f} {var_s / solve_best:9.2f} {e['max_rel']:9.2e} "
                  f"{e['median_rel']:9.2e} {e['coverage']:8.3f} {e['coverage_diff']:+8.3f}")
        steps = [int(s) for s in args.love_steps.split(",") if s]
        prior = ks.test_prior()
        for name, f in (("LOVE", None), ("LOVE precond + control var.", factor)):
            for r, var in (love(k, kstar_t, prior, f, steps) if steps else {}).items():
                e = errors(var, exact, mean, yt)
                print(f"{name + f' r={r}':<34} {'(in memory)':>27} {e['max_rel']:9.2e} {e['median_rel']:9.2e} "
                      f"{e['coverage']:8.3f} {e['coverage_diff']:+8.3f}")
        if args.eigen_ranks:
            lam, u = np.linalg.eigh(k)
            contrib = (u.T @ kstar_t) ** 2 / (lam[:, None] + NOISE)  # (n, m), ascending eigenvalues
            for r in (int(s) for s in args.eigen_ranks.split(",")):
                e = errors(prior - contrib[-r:].sum(axis=0), exact, mean, yt)
                print(f"{f'top-{r} eigenvectors (ideal)':<34} {'(in memory)':>27} {e['max_rel']:9.2e} "
                      f"{e['median_rel']:9.2e} {e['coverage']:8.3f} {e['coverage_diff']:+8.3f}")
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
