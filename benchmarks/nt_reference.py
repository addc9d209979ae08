"""neural-tangents' ``nt.batch`` for the same network as an nngp-dask ``Architecture``: the reference
the kernel and build benchmarks compare against.

neural-tangents pins old jax releases, so it usually lives in its own virtual environment; the
build benchmark runs this file there as a subprocess (``--nt-python``):

    NT_PYTHON benchmarks/nt_reference.py X.npy OUT.npy --depth 3 --activation relu --weight-var 1.6 --bias-var 0.1

prints one JSON line of timings and writes the kernel to OUT.npy.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import numpy as np

#: activations with a closed form in neural-tangents' stax
NT_LAYERS = {"relu": "Relu", "erf": "Erf", "abs": "Abs", "identity": "Identity", "gelu": "Gelu"}


def stax_kernel_fn(depth: int, activation: str, weight_var: float, bias_var: float):
    """The ``kernel_fn`` of ``depth`` hidden layers and a readout, NNGP parameterisation as ours."""
    from neural_tangents import stax

    w_std, b_std = math.sqrt(weight_var), math.sqrt(bias_var)
    layers = []
    for _ in range(depth):
        layers += [stax.Dense(512, W_std=w_std, b_std=b_std), getattr(stax, NT_LAYERS[activation])()]
    layers.append(stax.Dense(1, W_std=w_std, b_std=b_std))
    return stax.serial(*layers)[2]


def time_batched(kernel_fn, x: np.ndarray, batch_size: int, repeats: int) -> tuple[float, float, np.ndarray]:
    """(first call with tracing and compilation, best of ``repeats`` later calls, the kernel)."""
    import jax
    import neural_tangents as nt

    batched = nt.batch(kernel_fn, batch_size=batch_size)
    xj = jax.numpy.asarray(x)

    def run():
        return np.asarray(jax.block_until_ready(batched(xj, None, "nngp")))

    t0 = time.perf_counter()
    k = run()
    first = time.perf_counter() - t0
    best = math.inf
    for _ in range(repeats):
        k = None  # free the previous result before the next call allocates its own
        t0 = time.perf_counter()
        k = run()
        best = min(best, time.perf_counter() - t0)
    return first, best, k


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("x")
    ap.add_argument("out")
    ap.add_argument("--depth", type=int, required=True)
    ap.add_argument("--activation", required=True, choices=sorted(NT_LAYERS))
    ap.add_argument("--weight-var", type=float, required=True)
    ap.add_argument("--bias-var", type=float, required=True)
    ap.add_argument("--batch", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args(argv)
    import jax
    import neural_tangents as nt

    x = np.load(args.x, allow_pickle=False)
    fn = stax_kernel_fn(args.depth, args.activation, args.weight_var, args.bias_var)
    first, best, k = time_batched(fn, x, args.batch, args.repeats)
    np.save(args.out, k)
    print(json.dumps({"first_call_s": first, "time_s": best, "version": nt.__version__, "jax_version": jax.__version__,
                      "batch_size": args.batch}))


if __name__ == "__main__":
    main(sys.argv[1:])
