"""Exact predictive variances of a fitted UCI model at full size: their cost against the mean's
solve, and what a float32 out-of-core factor would give instead.

Runs section 16's ``fitted`` row (``bench_uci.pipeline_row``: ``pipelines/uci_regression.toml``
with ``[fit]`` on 2,000 points, Nystrom rank 2,048, ``variance = "auto"``, which above 16,384
training points is the float64 out-of-core factor), prints its stage times, then factorises the
same store again out of core in float32 (``tiled_variances(..., dtype=numpy.float32)``, timed) and
compares those variances with the pipeline's.

    NNGP_DASK_DATA=../shared/data python benchmarks/bench_variance_fitted.py --dataset kin40k
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_uci

from nngp_dask.gp.regression import open_store
from nngp_dask.gp.tiled_variance import tiled_variances


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="kin40k", choices=bench_uci.DATASETS)
    ap.add_argument("--split", type=int, default=0)
    ap.add_argument("--workdir", default=None, help="where the store goes (a temporary folder, deleted)")
    args = ap.parse_args()
    data = Path(os.environ.get("NNGP_DASK_DATA", "../shared/data"))
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="bench-variance-fitted-") as tmp:
        work = Path(tmp)
        xtr, ytr, xte, yte = bench_uci.load_split(data, args.dataset, args.split)
        npz = work / "data.npz"
        np.savez(npz, x_train=xtr, y_train=ytr, x_test=xte, y_test=yte)
        fit = argparse.Namespace(fit_subset=2000, ard=False, rank=2048)
        row = bench_uci.pipeline_row(npz, work / "fitted", True, fit)
        rep = json.loads((work / "fitted" / "report.json").read_text())
        st = rep["stages"]
        print(f"{args.dataset} split {args.split}: {len(ytr)} training, {len(yte)} test points; {row['settings']}")
        print(f"srmse {row['rmse']:.4f}, NLPD {row['nlpd']:.3f}, coverage95 {row['coverage95']:.4f}, "
              f"peak {row['peak_gib']:.2f} GiB")
        print("stages (s): " + ", ".join(f"{k} {v['seconds']:.1f}" for k, v in st.items() if "seconds" in v))
        solve_s, predict_s = st["solve"]["seconds"], st["predict"]["seconds"]
        print(f"predict (mean and exact variances, float64 factor) / solve = {predict_s / solve_s:.2f}")
        ks = open_store(rep["kernel"]["store"])
        noise = rep["config"]["solver"]["noise"]
        with np.load(work / "fitted" / "predictions.npz") as f:
            var64 = f["var"]
        prior = ks.test_prior()
        t0 = time.perf_counter()
        var32 = tiled_variances(ks, noise, prior, lambda rows: ks.read_rows("test_train", rows).T, dtype=np.float32)
        t32 = time.perf_counter() - t0
        rel = np.abs(var32 - var64) / var64
        print(f"float32 out-of-core factor: {t32:.1f} s ({t32 / solve_s:.2f} x the solve); against float64: "
              f"median relative error {np.median(rel):.2e}, max {rel.max():.2e}")
        print(f"latent variance / prior: median {np.median(var64 / prior):.2e}")


if __name__ == "__main__":
    main()
