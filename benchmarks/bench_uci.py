"""The UCI regression table: nngp-dask fitted and untuned against scikit-learn's fitted GP.

For each dataset of the bundle (``$NNGP_DASK_DATA/uci/<name>/``) and each split (a column of its
``test_mask``: 90 % train / 10 % test), inputs are standardised per feature and targets by the
training split's mean and standard deviation (so RMSE is the standardised RMSE and NLPD is in
standardised units, the same for every method), written to an ``.npz`` in a temporary folder, and:

* **fitted**: ``pipelines/uci_regression.toml`` on the full training split with ``[fit]`` enabled
  (exact marginal likelihood on a random subset of ``--fit-subset`` points over depths 1-4,
  noise, weight_var, bias_var and the amplitude), then the out-of-core CG solve (Nystrom
  preconditioner of rank ``--rank``) and exact predictive variances (``variance = "auto"``: the
  in-memory factor up to 16,384 training points, the out-of-core one above);
* **untuned**: the same file with its own settings (depth 2, weight_var 2, bias_var 0.1, noise
  0.1), exact variances as above;
* **sklearn**: ``GaussianProcessRegressor(C * Matern(nu=2.5) + White)`` (one length scale, or one
  per feature with ``--ard``, which also turns on nngp-dask's ARD fit) fitted by L-BFGS-B on the
  largest random training subset whose fit and prediction take about the fitted run's wall time
  (extrapolated from timed fits on ``--sk-probe`` and twice as many points, ``t ~ n^p``; capped by
  ``--sk-memory``).

Printed per run: standardised RMSE, NLPD, the coverage of the central 95 % interval of the
predictive distribution (noise included), wall time and peak RSS summed over all processes
(the pipelines' report.json; around the fit and prediction for scikit-learn). ``--json``
writes every row.

    python benchmarks/bench_uci.py --datasets elevators,pol,bike --splits 0,1,2 --json uci.json
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import signal
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ("elevators", "protein", "kin40k", "keggdirected", "pol", "bike")


def load_split(data: Path, name: str, split: int, limit: int = 0) -> tuple[np.ndarray, ...]:
    """Standardised ``x_train, y_train, x_test, y_test`` of one split (training statistics); the
    first ``limit`` training and test rows when ``limit`` is set (for a quick check of the script)."""
    table = np.loadtxt(gzip.open(data / "uci" / name / "data.csv.gz"), delimiter=",")
    mask = np.loadtxt(gzip.open(data / "uci" / name / "test_mask.csv.gz"), delimiter=",")[:, split].astype(bool)
    x, y = table[:, :-1], table[:, -1]
    xtr, ytr, xte, yte = x[~mask], y[~mask], x[mask], y[mask]
    if limit:
        xtr, ytr, xte, yte = xtr[:limit], ytr[:limit], xte[:limit], yte[:limit]
    mu, sd = xtr.mean(0), xtr.std(0)
    # constant features stay constant (zero); a constant column's computed std can be rounding noise
    # (8.8e-18 for keggdirected's feature 7 in split 2, whose one other value is then a test row)
    sd[np.ptp(xtr, axis=0) == 0] = 1.0
    ym, ys = ytr.mean(), ytr.std()
    return (xtr - mu) / sd, (ytr - ym) / ys, (xte - mu) / sd, (yte - ym) / ys


def pipeline_row(npz: Path, out: Path, fitted: bool, args: argparse.Namespace) -> dict:
    from nngp_dask.pipeline import load_config, run_pipeline

    overrides = {"run.output": str(out), "data.source": "npz", "data.path": str(npz), "data.test_mask": "",
                 "predict.variance": "auto", "cluster.n_workers": 2}
    if fitted:
        overrides |= {"fit.enabled": True, "fit.subset": args.fit_subset, "fit.ard": args.ard,
                      "solver.preconditioner": "nystrom", "solver.rank": args.rank}
    cfg = load_config(ROOT / "pipelines" / "uci_regression.toml", overrides)
    t0 = time.perf_counter()
    rep = run_pipeline(cfg, plots=False, progress=False)
    wall = time.perf_counter() - t0
    m, a, s = rep["metrics"], rep["config"]["architecture"], rep["config"]["solver"]
    cov = dict(zip(m["coverage"]["levels"], m["coverage"]["observed"]))
    solve = rep["stages"]["solve"].get("detail", {})
    # the noise is in the unscaled kernel's units (whose scale the fit leaves free, e.g. weight_var^depth
    # for a ReLU network): noise x amplitude is the noise variance of the standardised targets
    amp = m.get("amplitude", s["amplitude"])
    return {"rmse": m["rmse"], "nlpd": m["nlpd"], "coverage95": cov[0.95], "wall_s": wall,
            "peak_gib": rep["peak_rss_bytes"] / 2**30, "n_used": None,
            "settings": f"depth {a['depth']}, weight_var {a['weight_var']:.3g}, bias_var {a['bias_var']:.3g}, "
                        f"noise {s['noise']:.3g}, amplitude {amp:.3g} (noise variance {s['noise'] * amp:.3g} in "
                        f"standardised units), CG iterations {solve.get('iterations', '?')}",
            "stages": {k: round(v["seconds"], 1) for k, v in rep["stages"].items() if "seconds" in v}}


def sklearn_row(xtr, ytr, xte, yte, budget: float, args: argparse.Namespace) -> dict:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.gaussian_process import GaussianProcessRegressor
    from sklearn.gaussian_process.kernels import ConstantKernel, Matern, WhiteKernel

    from nngp_dask.gp import coverage, nlpd, rmse
    from nngp_dask.monitor import PeakRSS

    warnings.filterwarnings("ignore", category=ConvergenceWarning)  # length scales at their bounds, reported below

    d = xtr.shape[1]
    rng = np.random.default_rng(0)
    order = rng.permutation(len(ytr))

    def run(n: int) -> tuple[float, GaussianProcessRegressor]:
        kern = ConstantKernel(1.0) * Matern(length_scale=np.ones(d) if args.ard else 1.0, nu=2.5) + WhiteKernel(0.1)
        gpr = GaussianProcessRegressor(kern, normalize_y=False, random_state=0)
        t0 = time.perf_counter()
        gpr.fit(xtr[order[:n]], ytr[order[:n]])
        gpr.predict(xte, return_std=True)
        return time.perf_counter() - t0, gpr

    # two timed probes give the growth exponent of fit + predict at this size (between the n^2 of
    # the kernel gradients and the n^3 of the factorisations), which sizes the run to the budget
    probe = min(args.sk_probe, len(ytr) // 2)
    t_small, _ = run(probe)
    t_probe, _ = run(2 * probe)
    power = float(np.clip(np.log2(t_probe / t_small), 1.5, 3.0))
    by_time = 2 * probe * max(budget / t_probe, 1.0) ** (1 / power)
    # n^2 (hyperparameters + 1) float64 of kernel gradients are held during the fit
    by_memory = (args.sk_memory * 2**30 / (8 * ((d if args.ard else 1) + 4))) ** 0.5
    n = int(min(len(ytr), by_time, by_memory))
    with PeakRSS() as peak:
        wall, gpr = run(n)
        mu, sd = gpr.predict(xte, return_std=True)
    var = sd ** 2
    return {"rmse": rmse(yte, mu), "nlpd": nlpd(yte, mu, var), "coverage95": coverage(yte, mu, var, (0.95,))[0],
            "wall_s": wall, "peak_gib": peak.peak / 2**30, "n_used": n,
            "settings": f"{gpr.kernel_} (probes: {probe} and {2 * probe} points in {t_small:.1f} and "
                        f"{t_probe:.1f} s, time ~ n^{power:.2f})"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", default=",".join(DATASETS))
    p.add_argument("--splits", default="0,1,2")
    p.add_argument("--methods", default="fitted,untuned,sklearn")
    p.add_argument("--fit-subset", type=int, default=2000, help="points the marginal likelihood is maximised on")
    p.add_argument("--ard", action="store_true", help="one input scale per feature, for both nngp-dask's fit "
                   "(fit.ard) and scikit-learn's Matern")
    p.add_argument("--rank", type=int, default=2048, help="Nystrom rank of the fitted runs' CG")
    p.add_argument("--sk-probe", type=int, default=1000, help="points of scikit-learn's timed probe fit")
    p.add_argument("--sk-memory", type=float, default=6.0, help="GiB scikit-learn's kernel gradients may take")
    p.add_argument("--sk-budget", type=float, default=None, help="seconds for scikit-learn (default: the fitted run's)")
    p.add_argument("--data", default=os.environ.get("NNGP_DASK_DATA", str(ROOT.parent / "shared" / "data")))
    p.add_argument("--workdir", default=None, help="where the stores go (a temporary folder, deleted)")
    p.add_argument("--limit", type=int, default=0, help="first N training and test rows only (a quick check)")
    p.add_argument("--json", default=None)
    p.add_argument("--summarize", nargs="+", metavar="JSON", default=None,
                   help="run nothing: the summary of the rows in these --json files (e.g. benchmarks/uci_*.json)")
    args = p.parse_args(argv)
    if args.summarize:
        summary([row for f in args.summarize for row in json.loads(Path(f).read_text())])
        return 0
    data, methods = Path(args.data), args.methods.split(",")
    rows = []
    print(f"{'dataset':13} {'split':>5} {'n':>6} {'method':8} {'srmse':>7} {'nlpd':>7} {'cov95':>6} {'wall s':>7} "
          f"{'peak GiB':>8}  settings", flush=True)
    # a plain kill (SIGTERM) unwinds like Ctrl-C, so the temporary folder (tens of GB of stores) goes too
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="bench-uci-") as tmp:
        for name in args.datasets.split(","):
            for split in map(int, args.splits.split(",")):
                xtr, ytr, xte, yte = load_split(data, name, split, args.limit)
                npz = Path(tmp, f"{name}-{split}.npz")
                np.savez(npz, x_train=xtr, y_train=ytr, x_test=xte, y_test=yte)
                budget = args.sk_budget
                for method in methods:
                    if method == "sklearn":
                        row = sklearn_row(xtr, ytr, xte, yte, budget or 60.0, args)
                    else:
                        row = pipeline_row(npz, Path(tmp, f"{name}-{split}-{method}"), method == "fitted", args)
                        if method == "fitted" and args.sk_budget is None:
                            budget = row["wall_s"]
                    row |= {"dataset": name, "split": split, "n_train": len(ytr), "n_test": len(yte), "method": method}
                    rows.append(row)
                    used = f" ({row['n_used']} pts)" if row["n_used"] else ""
                    print(f"{name:13} {split:5d} {len(ytr):6d} {method:8} {row['rmse']:7.4f} {row['nlpd']:7.3f} "
                          f"{row['coverage95']:6.3f} {row['wall_s']:7.1f} {row['peak_gib']:8.2f}  "
                          f"{row['settings']}{used}", flush=True)
                    if args.json:
                        Path(args.json).write_text(json.dumps(rows, indent=1))
    summary(rows)
    return 0


def summary(rows: list[dict]) -> None:
    """Mean +- standard error over splits per dataset and method, and who wins."""
    print("\nmean over splits (standard error)")
    names = list(dict.fromkeys(r["dataset"] for r in rows))
    wins = 0
    for name in names:
        by = {}
        for method in dict.fromkeys(r["method"] for r in rows):
            got = [r for r in rows if r["dataset"] == name and r["method"] == method]
            if not got:
                continue
            vals = {k: np.array([r[k] for r in got]) for k in ("rmse", "nlpd", "coverage95", "wall_s", "peak_gib")}
            se = lambda v: v.std(ddof=1) / len(v) ** 0.5 if len(v) > 1 else float("nan")  # noqa: E731
            by[method] = vals
            print(f"  {name:13} {method:8} srmse {vals['rmse'].mean():.4f} ({se(vals['rmse']):.4f})  "
                  f"nlpd {vals['nlpd'].mean():7.3f} ({se(vals['nlpd']):.3f})  cov95 {vals['coverage95'].mean():.3f}  "
                  f"wall {vals['wall_s'].mean():7.1f} s  peak {vals['peak_gib'].max():.2f} GiB  [{len(got)} split(s)]")
        if "fitted" in by and "sklearn" in by:
            wins += by["fitted"]["rmse"].mean() < by["sklearn"]["rmse"].mean()
    print(f"fitted nngp-dask has the lower mean srmse than scikit-learn on {wins} of {len(names)} dataset(s)")
    pairs = {(r["dataset"], r["split"]): {} for r in rows}
    for r in rows:
        pairs[r["dataset"], r["split"]][r["method"]] = r["rmse"]
    both = [v for v in pairs.values() if "fitted" in v and "sklearn" in v]
    print(f"and the lower srmse on {sum(v['fitted'] < v['sklearn'] for v in both)} of {len(both)} dataset-split(s)")


if __name__ == "__main__":
    sys.exit(main())
