"""A scheduled re-fit on grown data against a fresh run: kernel stage and whole re-fit.

For each pair ``OLD:NEW`` the first NEW MNIST training images are the grown dataset and the first
OLD of them the store it grows from. Both sides run the MNIST pipeline's model (depth-5 ReLU NNGP,
weight_var 2, bias_var 0, standardised rows, float32 tiles; one-hot targets, noise 0.02, CG to
1e-4 with a Nystrom preconditioner; predictive mean and low-rank variance on the test images) on
one embedded cluster started (and its kernels compiled) before any timing:

* fresh: a new store of the NEW rows is built, solved cold and predicted;
* re-fit: a copy of a store of the OLD rows, already solved (neither timed), is grown to NEW rows
  with ``build_kernel(..., append=True)`` (only the tiles touching new rows are computed), solved
  (warm start from the OLD solution, its Nystrom preconditioner extended) and predicted.

Only the store being timed is left in the page cache (the others are dropped from it after a
``sync``), as on a machine that holds one store: a fresh run reads the tiles it has just written
from the cache; a re-fit is run twice, with the grown store's old tiles in the cache as the last
run wrote them (a re-fit soon after it) and with none of them there (``cold``: after a reboot, or
once other work has evicted them).

Each side is run ``--repeats`` times, alternating, and the best time is kept. Printed per pair: the fraction of
tiles the append computed, the kernel stage's time relative to a fresh build and that ratio
divided by the tile fraction (goal <= 1.2), the whole re-fit's time relative to a fresh run
(goal <= 0.30 for 5 % new rows), CG iterations cold and warm, and the largest difference of the
predictive means and of the test accuracy between the two (expected: alpha agrees within the CG
tolerance, so labels and accuracy are equal). Every store the benchmark writes is deleted.

    python benchmarks/bench_append.py --pairs 6000:6300 --n-test 1000 --tile 256 --rank 1024 --repeats 3
    python benchmarks/bench_append.py --pairs 57000:60000,54000:60000   # full MNIST (~11 min a pair on 2 cores)

Data: ``--data`` or ``$NNGP_DASK_DATA/mnist.npz`` (the standard Keras layout).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import tempfile
import time

import numpy as np

from nngp_dask import Architecture, build_kernel, normalize, predict, solve
from nngp_dask.cluster import embedded_client, local_cluster, local_cluster_kwargs
from nngp_dask.gp import encode_labels
from nngp_dask.store.pagecache import drop_from_cache

ARCH = Architecture(5, "relu", 2.0, 0.0)
NOISE, TOL = 0.02, 1e-4


def load(path: str, n: int, m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    with np.load(path, allow_pickle=False) as f:
        x = normalize(f["x_train"][:n].reshape(n, -1).astype(np.float64), "standardize")
        xt = normalize(f["x_test"][:m].reshape(m, -1).astype(np.float64), "standardize")
        return x, f["y_train"][:n].astype(np.int64), xt, f["y_test"][:m].astype(np.int64)


def run(store: str, x: np.ndarray, y: np.ndarray, xt: np.ndarray, args: argparse.Namespace, client, *,
        append: bool = False) -> dict:
    """Kernel, solve and predict on ``store``; the seconds of each and what they did."""
    t0 = time.perf_counter()
    ks = build_kernel(ARCH, x, store, x_test=xt, tile=args.tile, dtype="float32", append=append or None,
                      client=client, progress=False)
    t1 = time.perf_counter()
    res = solve(ks, y, noise=NOISE, tol=TOL, method="cg", preconditioner="nystrom", rank=args.rank, client=client,
                progress=False)
    t2 = time.perf_counter()
    mean, _ = predict(ks, res, variance="lowrank", client=client)
    t3 = time.perf_counter()
    stats = ks.last_build
    return {"kernel": t1 - t0, "solve": t2 - t1, "predict": t3 - t2, "total": t3 - t0, "mean": mean,
            "iterations": res.iterations, "matmat_s": res.matmat_s, "computed": stats.tiles_computed,
            "tiles": stats.tiles_total,
            "update": stats.update, "pre_s": res.info.get("preconditioner_s"),
            "reused": res.info.get("preconditioner_reused", ""), "start": res.info.get("warm_start", {})}


def best(runs: list[dict]) -> dict:
    out = dict(runs[0])
    for key in ("kernel", "solve", "predict", "total", "pre_s", "matmat_s"):
        out[key] = min(r[key] for r in runs)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", default="57000:60000,54000:60000", help="OLD:NEW training rows, comma-separated")
    p.add_argument("--n-test", type=int, default=10000)
    p.add_argument("--tile", type=int, default=2048)
    p.add_argument("--rank", type=int, default=2048, help="Nystrom rank (the MNIST pipeline's: 2048)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--data", default=os.path.join(os.environ.get("NNGP_DASK_DATA", "../shared/data"), "mnist.npz"))
    p.add_argument("--workdir", default=None, help="where the stores go (a temporary folder, deleted at the end)")
    p.add_argument("--verbose", action="store_true", help="log what each stage does (CG iterations with their times)")
    args = p.parse_args()
    if args.verbose:
        logging.basicConfig(format="%(asctime)s %(name)s %(message)s", level=logging.INFO)
    else:
        logging.getLogger("nngp_dask").setLevel(logging.WARNING)
    pairs = [tuple(int(v) for v in pair.split(":")) for pair in args.pairs.split(",")]
    top = max(new for _, new in pairs)
    x, labels, xt, yt = load(args.data, top, args.n_test)
    classes = np.arange(10)
    work = tempfile.mkdtemp(prefix="bench-append-", dir=args.workdir)
    import dask

    # a machine shared with other jobs can stall the loopback TLS comms past dask's 30 s default
    dask.config.set({"distributed.comm.timeouts.tcp": "300s", "distributed.comm.timeouts.connect": "120s"})
    cluster = local_cluster(**local_cluster_kwargs())
    client = embedded_client(cluster)
    try:
        warm = os.path.join(work, "warm.zarr")  # compiles the kernels and starts the workers, untimed
        run(warm, x[:600], encode_labels(labels[:600], classes)[1], xt[:100], argparse.Namespace(
            tile=min(args.tile, 256), rank=64), client)
        shutil.rmtree(warm)
        print(f"pairs {args.pairs}, {args.n_test} test images, tile {args.tile}, Nystrom rank {args.rank}, "
              f"best of {args.repeats}")
        for old, new in pairs:
            y_new = encode_labels(labels[:new], classes)[1]
            prefix = os.path.join(work, "prefix.zarr")
            run(prefix, x[:old], encode_labels(labels[:old], classes)[1], xt, args, client)
            fresh_runs: list[dict] = []
            refits: dict[str, list[dict]] = {"cached": [], "cold": []}
            for _ in range(args.repeats):  # alternating, so that a drifting load on the machine hits both
                uncache(prefix)
                store = os.path.join(work, "fresh.zarr")
                fresh_runs.append(run(store, x[:new], y_new, xt, args, client))
                shutil.rmtree(store)
                for cache, runs in refits.items():
                    store = os.path.join(work, "grown.zarr")
                    copy_store(prefix, store)
                    uncache(prefix, *([store] if cache == "cold" else []))
                    runs.append(run(store, x[:new], y_new, xt, args, client, append=True))
                    shutil.rmtree(store)
            shutil.rmtree(prefix)
            f = best(fresh_runs)
            for cache, runs in refits.items():
                report(old, new, f, best(runs), cache, yt)
    finally:
        client.close()
        cluster.close()
        shutil.rmtree(work, ignore_errors=True)


def uncache(*stores: str) -> None:
    """Drop every file of ``stores`` from the page cache (written out first, so that all of it goes)."""
    os.sync()
    for store in stores:
        for folder, _, files in os.walk(store):
            for name in files:
                drop_from_cache(os.path.join(folder, name))


def copy_store(src: str, dst: str) -> None:
    """Copy a store by plain reads and writes: its files then sit in the page cache as a build
    leaves them (a tile written by write() stays as 2 MiB folios, mapped by huge entries, where
    shutil's sendfile or a read from disk leave 4 KiB pages, and a pass over those is slower)."""
    for folder, _, files in os.walk(src):
        target = os.path.join(dst, os.path.relpath(folder, src))
        os.makedirs(target, exist_ok=True)
        for name in files:
            with open(os.path.join(folder, name), "rb") as f:
                data = f.read()
            drop_from_cache(os.path.join(folder, name))  # so that the source does not crowd out the copy
            with open(os.path.join(target, name), "wb") as f:
                f.write(data)


def report(old: int, new: int, f: dict, r: dict, cache: str, yt: np.ndarray) -> None:
    frac = r["computed"] / r["tiles"]
    acc_f = float(np.mean(np.argmax(f["mean"], 1) == yt))
    acc_r = float(np.mean(np.argmax(r["mean"], 1) == yt))
    where = "in the page cache" if cache == "cached" else "cold (not in the page cache)"
    print(f"\n{old} -> {new} ({(new - old) / new:.1%} new rows), re-fit with the old tiles {where}: "
          f"{r['update']}, {r['computed']} of "
          f"{r['tiles']} tiles computed ({frac:.1%})")
    print(f"  kernel stage: fresh {f['kernel']:.1f} s, append {r['kernel']:.1f} s = {r['kernel'] / f['kernel']:.3f}"
          f" of fresh = {r['kernel'] / f['kernel'] / frac:.2f} x the tile fraction (goal <= 1.2)")
    print(f"  solve: fresh {f['solve']:.1f} s (preconditioner {f['pre_s']:.1f} s, {f['iterations']} CG "
          f"iterations cold, {f['matmat_s']:.1f} s of kernel products), re-fit {r['solve']:.1f} s (preconditioner "
          f"{r['pre_s']:.1f} s, {r['iterations']} iterations warm, {r['matmat_s']:.1f} s of kernel products, "
          f"starting residual {r['start'].get('start_residual', 1):.3g})")
    print(f"  predict: fresh {f['predict']:.1f} s, re-fit {r['predict']:.1f} s")
    print(f"  whole re-fit: {r['total']:.1f} s against {f['total']:.1f} s fresh = {r['total'] / f['total']:.3f}"
          " (goal <= 0.30 for 5 % new rows)")
    print(f"  predictions: max |mean difference| {np.abs(r['mean'] - f['mean']).max():.2e}, labels equal "
          f"{int(np.sum(np.argmax(r['mean'], 1) == np.argmax(f['mean'], 1)))}/{len(yt)}, accuracy fresh "
          f"{acc_f:.4f}, re-fit {acc_r:.4f}")
    if r["reused"]:
        print(f"  preconditioner: {r['reused']}")


if __name__ == "__main__":
    main()
