"""Choose the MNIST pipeline's hyperparameters on a validation split of the training set.

Train on the first --n-train training images, validate on --n-val images taken from the end
of the training set (never the test set). One recursion pass per (weight_var, bias_var) gives
every depth (``all_depths=True``); every noise reuses that kernel (one Cholesky each). Noise
is searched relative to the kernel's mean diagonal and reported in absolute units.

    python benchmarks/select_mnist.py --data ../shared/data/mnist.npz
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import numpy as np
import scipy.linalg

from nngp_dask import Architecture, kernel, normalize
from nngp_dask.gp import encode_labels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/data/mnist.npz")
    ap.add_argument("--n-train", type=int, default=4000)
    ap.add_argument("--n-val", type=int, default=5000)
    ap.add_argument("--depths", default="1,2,3,5,7,10")
    ap.add_argument("--weight-vars", default="1.0,1.6,2.0,2.5")
    ap.add_argument("--bias-vars", default="0.0,0.1,0.5,1.0")
    ap.add_argument("--rel-noises", default="1e-4,1e-3,1e-2,1e-1")
    ap.add_argument("--normalize", default="standardize")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    with np.load(args.data, allow_pickle=False) as f:
        x, y = f["x_train"].reshape(60000, -1), f["y_train"].astype(np.int64)
    xtr = normalize(x[: args.n_train].astype(np.float64), args.normalize)
    xva = normalize(x[-args.n_val:].astype(np.float64), args.normalize)
    ytr, yva = y[: args.n_train], y[-args.n_val:]
    classes = np.arange(10)
    targets = encode_labels(ytr, classes)[1]
    depths = [int(v) for v in args.depths.split(",")]
    rows = []
    t0 = time.perf_counter()
    for wv, bv in itertools.product(map(float, args.weight_vars.split(",")), map(float, args.bias_vars.split(","))):
        arch = Architecture(max(depths), "relu", wv, bv)
        ktr = kernel(arch, xtr, dtype="float64", all_depths=True)
        kva = kernel(arch, xva, xtr, dtype="float64", all_depths=True)
        for depth in depths:
            k, kv = ktr[depth], kva[depth]
            scale = float(np.mean(np.diag(k)))
            for rel in map(float, args.rel_noises.split(",")):
                noise = rel * scale
                c = scipy.linalg.cho_factor(k + noise * np.eye(len(k)), lower=True)
                acc = float(np.mean(np.argmax(kv @ scipy.linalg.cho_solve(c, targets), axis=1) == yva))
                rows.append({"depth": depth, "weight_var": wv, "bias_var": bv, "noise": noise, "rel_noise": rel,
                             "val_accuracy": acc})
        best = max(rows, key=lambda r: r["val_accuracy"])
        print(f"weight_var {wv} bias_var {bv}: best so far {best} ({time.perf_counter() - t0:.0f} s)", flush=True)
    rows.sort(key=lambda r: -r["val_accuracy"])
    print("top 10:")
    for r in rows[:10]:
        print("  ", r)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
