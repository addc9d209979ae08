"""Hyperparameters by the marginal likelihood: the estimators' defaults against scikit-learn's fitted GP.

Part 1, scikit-learn's diabetes data (442 x 10), one fixed split (``train_test_split(test_size=0.2,
random_state=0)``: 353 train / 89 test), R^2 on the test split and fit time of:

- ``NNGPRegressor(optimizer=None)``: the untuned defaults (before issue 18);
- ``NNGPRegressor()``: the defaults now (marginal likelihood over depths 1-4, noise, weight_var,
  bias_var, amplitude), with and without ``normalize_y``, and with ARD;
- ``GaussianProcessRegressor(RBF() + WhiteKernel())`` fitted (L-BFGS-B), with and without ``normalize_y``.

Part 2 (``--kin40k N``, needs the UCI bundle under ``$NNGP_DASK_DATA/uci``): the shipped
``pipelines/uci_regression.toml`` on the first N training points of split 0 and the first
``--kin40k-test`` test points, standardised RMSE and NLPD with the file's settings and with
``[fit] enabled = true`` (subset ``--subset``).

    python benchmarks/bench_fit.py [--kin40k 3000 [--only-kin40k]]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def diabetes() -> None:
    from sklearn.datasets import load_diabetes
    from sklearn.gaussian_process import GaussianProcessRegressor
    from sklearn.gaussian_process.kernels import RBF, WhiteKernel
    from sklearn.metrics import r2_score
    from sklearn.model_selection import train_test_split

    from nngp_dask.estimators import NNGPRegressor

    x, y = load_diabetes(return_X_y=True)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.2, random_state=0)
    models = {
        "NNGPRegressor(optimizer=None)  [old defaults]": NNGPRegressor(optimizer=None),
        "NNGPRegressor()                [defaults]": NNGPRegressor(random_state=0),
        "NNGPRegressor(normalize_y=True)": NNGPRegressor(normalize_y=True, random_state=0),
        "NNGPRegressor(normalize_y=True, ard=True)": NNGPRegressor(normalize_y=True, ard=True, random_state=0),
        "GPR(RBF + White)": GaussianProcessRegressor(RBF() + WhiteKernel(), random_state=0),
        "GPR(RBF + White, normalize_y=True)": GaussianProcessRegressor(RBF() + WhiteKernel(), normalize_y=True,
                                                                        random_state=0),
    }
    print(f"diabetes: {len(ytr)} train / {len(yte)} test (train_test_split(test_size=0.2, random_state=0))")
    print(f"{'model':<46} {'R^2':>7} {'fit s':>7}  fitted")
    for name, model in models.items():
        t0 = time.perf_counter()
        model.fit(xtr, ytr)
        secs = time.perf_counter() - t0
        r2 = r2_score(yte, model.predict(xte))
        if hasattr(model, "arch_"):
            a = model.arch_
            what = (f"depth {a.depth}, weight_var {a.weight_var:.4g}, bias_var {a.bias_var:.4g}, "
                    f"noise {model.noise_:.4g}, amplitude {model.amplitude_:.4g}")
        else:
            what = str(model.kernel_)
        print(f"{name:<46} {r2:7.3f} {secs:7.2f}  {what}")


def kin40k(n: int, n_test: int, subset: int) -> None:
    from nngp_dask.pipeline import load_config, run_pipeline

    data = os.environ.get("NNGP_DASK_DATA", str(ROOT.parent / "shared" / "data"))
    if not Path(data, "uci", "kin40k", "data.csv.gz").is_file():
        print(f"kin40k: skipped ({data}/uci/kin40k/data.csv.gz not found; set NNGP_DASK_DATA)")
        return
    os.environ["NNGP_DASK_DATA"] = data
    print(f"kin40k split 0, first {n} train / {n_test} test points, pipelines/uci_regression.toml "
          f"(solver.method = cholesky, predict.variance = exact)")
    with tempfile.TemporaryDirectory() as tmp:
        for fit in (False, True):
            cfg = load_config(ROOT / "pipelines" / "uci_regression.toml", {
                "run.output": str(Path(tmp, f"fit{int(fit)}")), "data.limit_train": n, "data.limit_test": n_test,
                "solver.method": "cholesky", "predict.variance": "exact", "cluster.n_workers": 2,
                "fit.enabled": fit, "fit.subset": subset})
            t0 = time.perf_counter()
            rep = run_pipeline(cfg, plots=False, progress=False)
            secs = time.perf_counter() - t0
            m = rep["metrics"]
            a, s = rep["config"]["architecture"], rep["config"]["solver"]
            extra = ""
            if fit:
                d = rep["stages"]["fit"]
                extra = (f"; fit stage {d['seconds']:.1f} s on {d['detail']['n_subset']} points, "
                         f"LML {d['detail']['log_marginal_likelihood']:.1f}")
            print(f"  {'fitted ' if fit else 'untuned'}: srmse {m['srmse']:.4f}, nlpd {m['nlpd']:.4f}, "
                  f"wall {secs:.1f} s "
                  f"(depth {a['depth']}, weight_var {a['weight_var']:.4g}, bias_var {a['bias_var']:.4g}, "
                  f"noise {s['noise']:.4g}, amplitude {s['amplitude']:.4g}{extra})")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kin40k", type=int, default=0, help="also kin40k with this many training points (0: skip)")
    p.add_argument("--kin40k-test", type=int, default=1000)
    p.add_argument("--subset", type=int, default=1000, help="kin40k: fit.subset")
    p.add_argument("--only-kin40k", action="store_true", help="skip the diabetes part")
    args = p.parse_args(argv)
    if not args.only_kin40k:
        diabetes()
    if args.kin40k:
        kin40k(args.kin40k, args.kin40k_test, args.subset)
    return 0


if __name__ == "__main__":
    sys.exit(main())
