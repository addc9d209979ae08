"""Benchmark of the in-memory kernel core against the GEMM it starts from (and neural-tangents).

One run measures, on the same inputs and in the same process (machines are noisy: compare
ratios within one run):

- the float32 GEMM ``X @ X.T`` (the floor: every kernel entry needs one inner product);
- :func:`nngp_dask.kernel` on ``X`` (symmetric: one SYRK, each off-diagonal entry once);
- :func:`nngp_dask.tile` of ``X`` against itself as a non-symmetric block (every entry);
- the NTK (``kind="ntk"``, symmetric);
- entry-layers per second of the fused recursion;
- optionally neural-tangents' ``nt.batch(kernel_fn, batch_size)`` for the same network
  (``stax.serial`` of ``Dense(W_std=sqrt(weight_var), b_std=sqrt(bias_var))`` and the
  activation, ``depth`` times, then ``Dense``) and its largest difference to ours.

Usage::

    python benchmarks/bench_kernel.py                       # n=10000, d=784, relu, depth 3, float32
    python benchmarks/bench_kernel.py --n 2000 --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time

import numpy as np
from nt_reference import NT_LAYERS, stax_kernel_fn, time_batched

from nngp_dask import Architecture, diagonals, kernel, normalize, tile


def _timed(fn, repeats: int):
    """(best wall time over ``repeats`` calls, result of the last call)."""
    best, out = math.inf, None
    for _ in range(repeats):
        out = None  # free the previous result before the next call allocates its own
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def _neural_tangents(args, x: np.ndarray, ours: np.ndarray) -> dict:
    try:
        import jax
        import neural_tangents as nt
    except Exception as exc:  # ImportError, or a jax/jaxlib mismatch raising at import
        return {"available": False, "reason": f"{type(exc).__name__}: {exc}"}
    if args.activation not in NT_LAYERS:
        return {"available": False, "reason": f"no stax layer for activation {args.activation!r}"}
    if args.n % args.nt_batch:
        return {"available": False, "reason": f"--nt-batch {args.nt_batch} must divide --n {args.n}"}
    fn = stax_kernel_fn(args.depth, args.activation, args.weight_var, args.bias_var)
    first, best, k_nt = time_batched(fn, x, args.nt_batch, args.nt_repeats)
    diff = np.abs(k_nt.astype(np.float64) - ours.astype(np.float64))
    return {
        "available": True,
        "version": getattr(nt, "__version__", "?"),
        "jax_version": jax.__version__,
        "batch_size": args.nt_batch,
        "first_call_s": first,
        "time_s": best,
        "max_abs_diff": float(diff.max()),
        "max_rel_diff": float(diff.max() / np.abs(ours).max()),
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=10000, help="number of inputs (default 10000)")
    p.add_argument("--d", type=int, default=784, help="input dimension (default 784)")
    p.add_argument("--depth", type=int, default=3, help="hidden layers (default 3)")
    p.add_argument("--activation", default="relu", help="activation name (default relu)")
    p.add_argument("--weight-var", type=float, default=1.6)
    p.add_argument("--bias-var", type=float, default=0.1)
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--repeats", type=int, default=3, help="timed calls per measurement; the best is kept")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-nt", action="store_true", help="skip neural-tangents even if it imports")
    p.add_argument("--nt-batch", type=int, default=2000, help="nt.batch batch_size (must divide n)")
    p.add_argument("--nt-repeats", type=int, default=2)
    p.add_argument("--json", metavar="PATH", help="also write the numbers to this JSON file")
    args = p.parse_args(argv)

    dt = np.dtype(args.dtype)
    arch = Architecture(args.depth, args.activation, args.weight_var, args.bias_var)
    rng = np.random.default_rng(args.seed)
    # "unit_norm" (||x||^2 = d, so K^0 = bias_var + weight_var on the diagonal), stored in dtype
    x = normalize(rng.standard_normal((args.n, args.d)), "unit_norm").astype(dt)
    n, depth = args.n, args.depth
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")

    # compile (or load from the Numba cache) every specialisation used below
    t0 = time.perf_counter()
    small = x[: min(n, 64)]
    kernel(arch, small, dtype=dt)
    kernel(arch, small, small, dtype=dt)
    if arch.activation.has_ntk:
        kernel(arch, small, kind="ntk", dtype=dt)
    warmup = time.perf_counter() - t0

    t_gemm, _ = _timed(lambda: x @ x.T, args.repeats)
    t_diag, diag = _timed(lambda: diagonals(arch, x), args.repeats)
    t_tile, _ = _timed(lambda: tile(arch, x, x, diag, diag, dtype=dt), args.repeats)
    t_ntk = float("nan")
    if arch.activation.has_ntk:
        t_ntk, _ = _timed(lambda: kernel(arch, x, kind="ntk", dtype=dt), args.repeats)
    t_sym, k = _timed(lambda: kernel(arch, x, dtype=dt), args.repeats)

    sym_entries = n * (n + 1) / 2
    res = {
        "n": n, "d": args.d, "depth": depth, "activation": args.activation, "dtype": dt.name,
        "weight_var": args.weight_var, "bias_var": args.bias_var, "repeats": args.repeats,
        "machine": {"cpus": os.cpu_count(), "load_avg_1min_at_start": load, "python": platform.python_version(),
                    "numpy": np.__version__, "platform": platform.platform()},
        "warmup_s": warmup,
        "gemm_s": t_gemm,
        "gemm_gflops": 2.0 * n * n * args.d / t_gemm / 1e9,
        "diagonals_s": t_diag,
        "kernel_symmetric_s": t_sym,
        "tile_nonsymmetric_s": t_tile,
        "ntk_symmetric_s": t_ntk,
        "ratio_kernel_to_gemm": t_sym / t_gemm,
        "ratio_tile_to_gemm": t_tile / t_gemm,
        "ratio_ntk_to_gemm": t_ntk / t_gemm,
        # entries actually computed times layers, per second of the whole call (GEMM included)
        "entry_layers_per_s_symmetric": sym_entries * depth / t_sym,
        "entry_layers_per_s_tile": n * n * depth / t_tile,
        # the recursion alone, estimating the tile's GEMM by the measured one
        "entry_layers_per_s_tile_recursion_only": n * n * depth / max(t_tile - t_gemm, 1e-12),
    }
    res["neural_tangents"] = ({"available": False, "reason": "--no-nt"} if args.no_nt
                              else _neural_tangents(args, x, k))

    print(f"kernel benchmark: n={n} d={args.d} {args.activation} depth={depth} {dt.name} "
          f"weight_var={args.weight_var} bias_var={args.bias_var} (best of {args.repeats})")
    print(f"machine: {os.cpu_count()} cpus, 1-min load average at start {load:.2f}, numpy {np.__version__}")
    print(f"  warm-up (Numba compile or cache load)  {warmup:8.3f} s")
    print(f"  GEMM X @ X.T ({dt.name})               {t_gemm:8.3f} s   ({res['gemm_gflops']:.0f} GFLOP/s)")
    print(f"  diagonals (O(n L))                     {t_diag:8.3f} s")
    print(f"  kernel, symmetric (NNGP)               {t_sym:8.3f} s   {t_sym / t_gemm:5.2f} x GEMM (target <= 2.5)")
    print(f"  tile, non-symmetric n x n (NNGP)       {t_tile:8.3f} s   {t_tile / t_gemm:5.2f} x GEMM")
    if arch.activation.has_ntk:
        print(f"  kernel, symmetric (NTK)                {t_ntk:8.3f} s   {t_ntk / t_gemm:5.2f} x GEMM")
    print(f"  entry-layers/s: symmetric {res['entry_layers_per_s_symmetric'] / 1e6:.0f} M, "
          f"tile {res['entry_layers_per_s_tile'] / 1e6:.0f} M, "
          f"tile recursion alone ~{res['entry_layers_per_s_tile_recursion_only'] / 1e6:.0f} M")
    ntr = res["neural_tangents"]
    if not ntr["available"]:
        if ntr["reason"].startswith("ModuleNotFoundError"):
            print(f"  neural-tangents not installed ({ntr['reason']})")
        else:
            print(f"  neural-tangents skipped: {ntr['reason']}")
    else:
        print(f"  neural-tangents {ntr['version']} (jax {ntr['jax_version']}) nt.batch(batch_size="
              f"{ntr['batch_size']}): {ntr['time_s']:.3f} s (first call with compilation {ntr['first_call_s']:.3f} s)"
              f"  = {ntr['time_s'] / t_sym:.2f} x ours")
        print(f"    max |ours - neural-tangents| = {ntr['max_abs_diff']:.3g} "
              f"({ntr['max_rel_diff']:.3g} of max |K|)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=2)
        print(f"  numbers written to {args.json}")
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
