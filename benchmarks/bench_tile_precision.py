"""What storing the kernel's tiles in 16 bits would cost in exactness (issue 16, item 4).

Half the bytes per CG pass is what a 16-bit tile format buys; this measures what it costs. On the
first n MNIST training images (and 2,000 test images) with the MNIST pipeline's model (depth-5
ReLU NNGP, noise 0.02, CG to 1e-4 with a Nystrom preconditioner of rank 0.075 n, one-hot targets),
the train x train kernel is rounded through each format, tile by tile as a store would hold it,
and solved; the test x train kernel stays exact, so every difference comes from the solve.

Formats: float32 (today's default), IEEE float16, bfloat16 (float32 with 8 bits of mantissa,
rounded to nearest), float16 of each tile minus its mean (the mean kept per tile, so a product
adds ``mean * column sums``), and int16 quantised per tile (``min + step * q``, 65,536 levels
across the tile's range). Reported: the perturbation's spectral norm against the noise (below 1,
``K + noise I`` stays positive definite whatever its signs), CG iterations, the largest
difference of the predictive means from an exact float64 solve, and test accuracy.

    NNGP_DASK_DATA=../shared/data python benchmarks/bench_tile_precision.py --n 6000
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

import numpy as np
import scipy.linalg
import scipy.sparse.linalg

from nngp_dask import Architecture, kernel
from nngp_dask.gp.targets import one_hot_targets
from nngp_dask.kernels import normalize
from nngp_dask.linalg import Nystrom, batched_cg

Rounding = Callable[[np.ndarray], np.ndarray]


def _bfloat16(t: np.ndarray) -> np.ndarray:
    bits = t.astype(np.float32).view(np.uint32)
    # round to nearest even on the 16 bits dropped
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & np.uint32(0xFFFF0000)
    return bits.view(np.float32).astype(np.float64)


def _float16_centred(t: np.ndarray) -> np.ndarray:
    mean = float(t.mean())
    return (t - mean).astype(np.float16).astype(np.float64) + mean


def _int16(t: np.ndarray) -> np.ndarray:
    lo, hi = float(t.min()), float(t.max())
    step = (hi - lo) / 65535 or 1.0
    q = np.rint((t - lo) / step)
    return lo + step * q


FORMATS: dict[str, Rounding] = {
    "float32": lambda t: t.astype(np.float32).astype(np.float64),
    "float16": lambda t: t.astype(np.float16).astype(np.float64),
    "bfloat16": _bfloat16,
    "float16 - tile mean": _float16_centred,
    "int16 per tile": _int16,
}


def tiled(k: np.ndarray, tile: int, rounding: Rounding) -> np.ndarray:
    out = np.empty_like(k)
    for i in range(0, k.shape[0], tile):
        for j in range(0, k.shape[1], tile):
            out[i:i + tile, j:j + tile] = rounding(k[i:i + tile, j:j + tile])
    return out


def spectral_norm(d: np.ndarray) -> float:
    op = scipy.sparse.linalg.aslinearoperator(d)
    return float(abs(scipy.sparse.linalg.eigsh(op, k=1, which="LM", return_eigenvectors=False, tol=1e-3)[0]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=6000)
    p.add_argument("--n-test", type=int, default=2000)
    p.add_argument("--tile", type=int, default=1024)
    p.add_argument("--data", default=os.path.join(os.environ.get("NNGP_DASK_DATA", "../shared/data"), "mnist.npz"))
    args = p.parse_args()
    n, m, noise, tol = args.n, args.n_test, 0.02, 1e-4
    with np.load(args.data) as f:
        x = np.concatenate([f["x_train"][:n], f["x_test"][:m]]).reshape(n + m, -1).astype(np.float64)
        y = one_hot_targets(f["y_train"][:n], 10)
        labels = f["y_test"][:m]
    full = kernel(Architecture(5, "relu", 2.0, 0.0), normalize(x, "standardize"), dtype="float64")
    k, k_test = full[:n, :n], full[n:, :n]
    exact = k_test @ scipy.linalg.cho_solve(scipy.linalg.cho_factor(k + noise * np.eye(n)), y)
    print(f"n = {n}, {m} test points, tiles of {args.tile}, noise {noise}, CG tol {tol}, Nystrom rank {int(0.075 * n)}; "
          f"kernel diagonal {np.diag(k).mean():.3f}, off-diagonal 1-99 % {np.percentile(k, 1):.3f}-{np.percentile(k, 99):.3f}")
    print(f"{'tile format':22s} {'|dK|_2 / noise':>15s} {'CG its':>7s} {'max |mean - exact|':>19s} {'accuracy':>9s}")
    for name, rounding in FORMATS.items():
        kk = tiled(k, args.tile, rounding)
        a = kk + noise * np.eye(n)
        pre = Nystrom.build(lambda idx, kk=kk: kk[:, idx], n, int(0.075 * n), noise)
        res = batched_cg(lambda v, a=a: a @ v, y, tol=tol, preconditioner=pre)
        mean = k_test @ res.x
        acc = float((mean.argmax(1) == labels).mean())
        print(f"{name:22s} {spectral_norm(kk - k) / noise:15.2e} {res.iterations:7d} "
              f"{np.abs(mean - exact).max():19.2e} {acc:9.4f}")


if __name__ == "__main__":
    main()
