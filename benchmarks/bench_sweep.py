"""Benchmark of a hyperparameter sweep with work reuse against building every candidate's kernel.

On ``n`` MNIST training points (``--validation-fraction`` of them held out), a grid of
3 weight variances x 3 bias variances x 5 depths (45 kernels) x ``--noise`` noises is

A. swept by :func:`nngp_dask.select.run_sweep`: one Gram (fit x fit, SYRK) and one
   (validation x fit) GEMM for the whole grid, one all-depths recursion per
   ``(weight_var, bias_var)`` pair (9 instead of 45, each as deep as the deepest candidate), and
   per kernel one Cholesky factorisation per noise;
B. built candidate by candidate: ``nngp_dask.kernel(arch, x_fit)`` and
   ``nngp_dask.kernel(arch, x_val, x_fit)`` for each of the 45 architectures (a GEMM and a
   recursion each). The solves are the same work in both arms, so B's end-to-end time is
   its kernel time plus A's solve time.

It reports both kernel times and their ratio, the chosen hyperparameters with their
validation accuracy, the test accuracy of the chosen model (:class:`NNGPClassifier` fitted on
all ``n`` points), and the error of the SLQ log-marginal-likelihood estimate against the
exact value on a subset where both are affordable. Machines are noisy: compare ratios within
one run.

Usage::

    python benchmarks/bench_sweep.py --n 4000
    python benchmarks/bench_sweep.py                 # n = 20000 (about 10 GB of kernels in float32)
    python benchmarks/bench_sweep.py --n 20000 --separate 9   # time 9 of the 45 builds, extrapolate
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

from nngp_dask import Architecture, kernel, normalize
from nngp_dask.select import marginal_likelihood, run_sweep, sweep_kernels
from nngp_dask.gp import one_hot_targets

WEIGHT_VAR = (1.0, 1.6, 2.5)
BIAS_VAR = (0.0, 0.1, 0.5)
DEPTHS = (1, 2, 3, 4, 5)


def _load(path: str, n: int, test_n: int):
    with np.load(path, allow_pickle=False) as f:
        x, y = f["x_train"][:n], f["y_train"][:n]
        xt, yt = f["x_test"][:test_n], f["y_test"][:test_n]
    if x.shape[0] < n:
        raise SystemExit(f"--n: {path} holds only {x.shape[0]} training points, asked for {n}")
    flat = lambda a: a.reshape(a.shape[0], -1).astype(np.float64)  # noqa: E731
    return flat(x), y.astype(np.int64), flat(xt), yt.astype(np.int64)


def _separate_builds(xf: np.ndarray, xv: np.ndarray, args) -> dict:
    """Time ``kernel()`` per candidate (all 45, or ``--separate`` of them evenly spread)."""
    cands = [(wv, bv, d) for wv in WEIGHT_VAR for bv in BIAS_VAR for d in DEPTHS]
    chosen = cands if args.separate in (None, 0) or args.separate >= len(cands) else \
        [cands[i] for i in np.linspace(0, len(cands) - 1, args.separate).round().astype(int)]
    times = []
    for wv, bv, d in chosen:
        arch = Architecture(d, args.activation, wv, bv)
        t0 = time.perf_counter()
        k_ff = kernel(arch, xf, dtype=args.dtype)
        k_vf = kernel(arch, xv, xf, dtype=args.dtype)
        times.append(time.perf_counter() - t0)
        del k_ff, k_vf
    measured = float(np.sum(times))
    total = measured if len(chosen) == len(cands) else float(np.mean(times)) * len(cands)
    # a per-depth extrapolation would be fairer than the mean when only some are measured,
    # but the evenly spread subset covers every depth
    return {"measured": len(chosen), "of": len(cands), "measured_s": measured, "total_s": total,
            "extrapolated": len(chosen) != len(cands), "per_build_s": times}


def _spot_check(xf: np.ndarray, args) -> float:
    """Largest |sweep kernel - direct kernel| over one pair's depths, on up to 500 points."""
    sub = xf[:500]
    worst = 0.0
    for arch, k in sweep_kernels(sub, weight_var=WEIGHT_VAR[1], bias_var=BIAS_VAR[1], depth=DEPTHS,
                                 activation=args.activation, dtype=args.dtype):
        worst = max(worst, float(np.max(np.abs(k - kernel(arch, sub, dtype=args.dtype)))))
    return worst


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=20000, help="MNIST training points (fit + validation)")
    p.add_argument("--data", default=os.environ.get("NNGP_DASK_MNIST", "/work/shared/data/mnist.npz"),
                   help="mnist.npz (x_train (60000,28,28) uint8, y_train, x_test, y_test)")
    p.add_argument("--activation", default="relu")
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    p.add_argument("--normalize", default="unit_norm", choices=("none", "unit_norm", "standardize"))
    p.add_argument("--noise", type=float, nargs="+", default=[1e-3, 1e-2, 1e-1],
                   help="noises relative to each kernel's mean diagonal")
    p.add_argument("--validation-fraction", type=float, default=0.1)
    p.add_argument("--separate", type=int, default=0,
                   help="time only this many of the 45 separate builds and extrapolate (0: all)")
    p.add_argument("--test-n", type=int, default=2000, help="MNIST test points for the chosen model (0: skip)")
    p.add_argument("--slq-n", type=int, default=2000, help="subset size of the SLQ-vs-exact check (0: skip)")
    p.add_argument("--solver", default="auto", choices=("auto", "cholesky", "eigh", "cg"),
                   help="run_sweep solver: auto = Cholesky up to 5000 fit points, CG above (at n=20000 "
                        "'cholesky' is the faster choice for 3 noises: ~15 s per factorisation)")
    p.add_argument("--blas-threads", type=int, default=0,
                   help="limit BLAS threads (threadpoolctl; 0: leave as is). On a loaded 2-core machine 1 "
                        "thread factorises faster than 2")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot", default=None, help="write the sweep figure (PNG) here")
    p.add_argument("--json", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.blas_threads:
        from threadpoolctl import threadpool_limits

        threadpool_limits(args.blas_threads, user_api="blas")

    x, y, xt, yt = _load(args.data, args.n, args.test_n)
    x = normalize(x, args.normalize)
    xt = normalize(xt, args.normalize)
    grid = dict(weight_var=list(WEIGHT_VAR), bias_var=list(BIAS_VAR), depth=list(DEPTHS), noise=list(args.noise))
    print(f"# sweep benchmark: MNIST n={args.n} (validation {args.validation_fraction:g}), "
          f"{len(WEIGHT_VAR)}x{len(BIAS_VAR)}x{len(DEPTHS)} architectures x {len(args.noise)} noises, "
          f"{args.activation}, {args.dtype}, normalize={args.normalize}, solver={args.solver}, "
          f"BLAS threads {args.blas_threads or 'default'}")
    print(f"# {platform.node()} {platform.machine()}, {os.cpu_count()} cores, Python {sys.version.split()[0]}, "
          f"NumPy {np.__version__}")

    t0 = time.perf_counter()
    res = run_sweep(x, y, grid=grid, activation=args.activation, task="classification", criterion="accuracy",
                    validation_fraction=args.validation_fraction, relative_noise=True, dtype=args.dtype,
                    solver=args.solver, seed=args.seed)
    sweep_wall = time.perf_counter() - t0
    tm = res.timings
    kernels_a = tm["gram_s"] + tm["recursion_s"]

    xf, xv = x[res.fit_index], x[res.val_index]
    sep = _separate_builds(xf, xv, args)
    spot = _spot_check(xf, args)

    best = res.best
    print("\n## Timings (seconds)\n")
    print("| arm | GEMMs | recursions | kernels | solves | total |")
    print("|---|---|---|---|---|---|")
    print(f"| A: sweep with reuse | {tm['grams']} | {tm['recursions']} | {kernels_a:.1f} "
          f"(Gram {tm['gram_s']:.1f} + recursion {tm['recursion_s']:.1f}) | {tm['solve_s']:.1f} | {sweep_wall:.1f} |")
    label = f"{sep['measured']} of {sep['of']} measured, extrapolated" if sep["extrapolated"] else "all 45 measured"
    print(f"| B: 45 separate builds ({label}) | {2 * sep['of']} | {2 * sep['of']} | {sep['total_s']:.1f} | "
          f"{tm['solve_s']:.1f} (same as A) | {sep['total_s'] + tm['solve_s']:.1f} |")
    print(f"\nkernel construction: B / A = {sep['total_s'] / kernels_a:.2f}x; end to end: "
          f"{(sep['total_s'] + tm['solve_s']) / sweep_wall:.2f}x. All-depths stack in memory: {tm['stacked']}. "
          f"Solver used: {res.settings['solver']}. "
          f"Largest |sweep - direct| kernel difference (500-point spot check, all depths): {spot:.3g}")

    print("\n## Chosen hyperparameters\n")
    print(f"depth={best['depth']} weight_var={best['weight_var']:g} bias_var={best['bias_var']:g} "
          f"noise={best['noise']:g} x mean diag = {best['noise_abs']:.4g}: validation accuracy "
          f"{100 * best['accuracy']:.2f} % on {res.settings['n_val']} points (fit on {res.settings['n_fit']})")
    print("\nTop 10 of the sweep:\n")
    print("```")
    print(res.table(sort=True, top=10))
    print("```")

    out = {"n": args.n, "args": vars(args), "timings": tm, "sweep_wall_s": sweep_wall, "separate": sep,
           "spot_check_max_abs_diff": spot, "best": best, "rows": res.to_rows()}
    if args.test_n:
        from nngp_dask.estimators import NNGPClassifier

        t0 = time.perf_counter()
        clf = NNGPClassifier(depth=best["depth"], activation=args.activation, weight_var=best["weight_var"],
                             bias_var=best["bias_var"], noise=best["noise_abs"], dtype=args.dtype,
                             max_in_memory=args.n).fit(x, y)
        acc = clf.score(xt, yt)
        out["test_accuracy"] = acc
        print(f"\nchosen model refitted on all {args.n} points: test accuracy {100 * acc:.2f} % on the first "
              f"{len(yt)} MNIST test points ({time.perf_counter() - t0:.1f} s)")
    if args.slq_n:
        m = min(args.slq_n, xf.shape[0])
        arch = Architecture(best["depth"], args.activation, best["weight_var"], best["bias_var"])
        k = kernel(arch, xf[:m], dtype="float64")
        classes = np.unique(y)
        yy = one_hot_targets(np.searchsorted(classes, y[res.fit_index][:m]), classes.size)
        noise = best["noise_abs"]
        t0 = time.perf_counter()
        exact = marginal_likelihood(k, yy, noise, method="exact")
        t_exact = time.perf_counter() - t0
        t0 = time.perf_counter()
        est = marginal_likelihood(k, yy, noise, method="slq", seed=args.seed)
        t_slq = time.perf_counter() - t0
        err = est.value - exact.value
        out["slq"] = {"n": m, "exact": exact.value, "slq": est.value, "stderr": est.stderr,
                      "logdet_exact": exact.logdet, "logdet_slq": est.logdet, "logdet_stderr": est.logdet_stderr,
                      "exact_s": t_exact, "slq_s": t_slq}
        print(f"\nSLQ check (chosen kernel, first {m} fit points, 16 probes x 50 Lanczos steps): log marginal "
              f"likelihood exact {exact.value:.2f}, SLQ {est.value:.2f} +- {est.stderr:.2f} (error {err:+.2f} = "
              f"{err / est.stderr:+.2f} standard errors, {100 * abs(err) / abs(exact.value):.3f} %); "
              f"log det exact {exact.logdet:.2f}, SLQ {est.logdet:.2f} +- {est.logdet_stderr:.2f}; "
              f"{t_exact:.1f} s exact, {t_slq:.1f} s SLQ")
    if args.plot:
        print(f"\nfigure: {res.plot(args.plot)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))
    return out


if __name__ == "__main__":
    main()
