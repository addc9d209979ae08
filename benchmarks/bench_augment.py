r"""What translated copies buy: the MNIST pipeline on a validation split, with and without them.

Every variant runs ``pipelines/mnist.toml`` (depth-5 ReLU NNGP, float32 tiles, noise 0.02, CG with a
Nystrom preconditioner) with ``data.validation`` holding out the last 10,000 training images in
place of the test set (the test set is never read), on the first ``N`` of the remaining training
images, as given by each variant:

* ``orig:N``: the N originals only;
* ``shift:N:S``: the N originals and one copy of each shifted by up to S pixels (2N points);

so ``orig:2N`` against ``shift:N:S`` asks whether a shifted copy is worth a new image, and
``orig:N`` against ``shift:N:S`` what the copies buy. Printed per variant: training points,
validation accuracy, NLPD with the fitted amplitude, wall time and peak RSS (summed over all processes).

    NNGP_DASK_DATA=../shared/data python benchmarks/bench_augment.py \
        --variants orig:10000,orig:20000,shift:10000:1,shift:10000:2
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time

from nngp_dask.pipeline import load_config, run_pipeline


def overrides(variant: str, validation: int, workdir: str) -> dict:
    kind, n, *rest = variant.split(":")
    out = {"data.validation": validation, "data.limit_train": int(n) + validation, "run.output": workdir,
           "run.name": variant.replace(":", "_")}
    if kind == "shift":
        out |= {"data.augment": "shift", "data.augment_copies": 1, "data.augment_shift": int(rest[0])}
    elif kind != "orig":
        raise SystemExit(f"--variants: expected orig:N or shift:N:S, got {variant!r}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default="orig:10000,orig:20000,shift:10000:1,shift:10000:2")
    ap.add_argument("--validation", type=int, default=10000, help="last training images held out")
    ap.add_argument("--pipeline", default="pipelines/mnist.toml")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    rows = []
    for variant in args.variants.split(","):
        workdir = tempfile.mkdtemp(prefix="nngp-augment-")
        try:
            cfg = load_config(args.pipeline, overrides(variant, args.validation, workdir))
            t0 = time.perf_counter()
            result = run_pipeline(cfg, progress=False, plots=False)
            wall = time.perf_counter() - t0
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        m = result["metrics"]
        row = {"variant": variant, "n_train": result["dataset"]["n_train"], "accuracy": m["accuracy"],
               "nlpd": m.get("nlpd"), "wall_s": wall, "peak_rss_gib": (result["peak_rss_bytes"] or 0) / 2**30}
        rows.append(row)
        print(f"{variant:>16}: {row['n_train']:>6} training points, validation accuracy {row['accuracy']:.4f}, "
              f"NLPD {row['nlpd']}, {wall:.0f} s, peak RSS {row['peak_rss_gib']:.2f} GiB", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
