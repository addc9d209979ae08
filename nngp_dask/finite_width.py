"""Finite-width random networks: the Monte Carlo side of the NNGP correspondence.

A fully connected network of the given :class:`~nngp_dask.Architecture` and width,
weights ``N(0, weight_var / fan_in)``, biases ``N(0, bias_var)``, one output unit.
As the width grows the output distribution over random draws converges to the
Gaussian process whose covariance is :func:`nngp_dask.kernel` (Neal 1994; Lee et
al. 2018; Matthews et al. 2018).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

from .architecture import Architecture
from .inputs import check_inputs

__all__ = ["sample_outputs", "empirical_covariance"]


def sample_outputs(
    arch: Architecture,
    x: ArrayLike,
    *,
    width: int,
    networks: int,
    seed: int = 0,
    batch: int | None = None,
    dtype: type = np.float64,
) -> NDArray:
    """Outputs of ``networks`` independent random networks on ``x``.

    Parameters
    ----------
    arch : Architecture
    x : array_like, shape (n, d)
    width : int
        Units per hidden layer.
    networks : int
        Number of independent networks.
    seed : int
        Seed of :func:`numpy.random.default_rng`; results depend on (seed, batch).
    batch : int, optional
        Networks evaluated at once (bounds memory at about ``batch * width**2`` weights);
        default keeps each batch's weights near 32 MiB.
    dtype : numpy dtype
        Arithmetic precision.

    Returns
    -------
    ndarray, shape (networks, n)
    """
    x = check_inputs(x, "x").astype(dtype)
    for name, value in (("width", width), ("networks", networks)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name}: expected an integer >= 1, got {value!r}")
    n, d = x.shape
    phi = arch.activation
    if batch is None:
        per_net = max(d, width) * width * np.dtype(dtype).itemsize
        batch = int(max(1, min(networks, (32 << 20) // max(per_net, 1))))
    rng = np.random.default_rng(seed)
    out = np.empty((networks, n), dtype=dtype)
    sw, sb = np.sqrt(arch.weight_var), np.sqrt(arch.bias_var)
    for start in range(0, networks, batch):
        b = min(batch, networks - start)
        fan_in, h = d, np.broadcast_to(x, (b, n, d))
        for _ in range(arch.depth):
            w = rng.standard_normal((b, fan_in, width)).astype(dtype) * (sw / np.sqrt(fan_in))
            bias = rng.standard_normal((b, 1, width)).astype(dtype) * sb
            h = np.asarray(phi(h @ w + bias), dtype=dtype)
            fan_in = width
        w = rng.standard_normal((b, fan_in, 1)).astype(dtype) * (sw / np.sqrt(fan_in))
        bias = rng.standard_normal((b, 1, 1)).astype(dtype) * sb
        out[start : start + b] = (h @ w + bias)[..., 0]
    return out


def empirical_covariance(outputs: NDArray) -> tuple[NDArray, NDArray]:
    """Second moment ``E[f(x_i) f(x_j)]`` of sampled outputs (zero-mean by construction) and its
    standard error per entry.

    Parameters
    ----------
    outputs : ndarray, shape (networks, n)

    Returns
    -------
    cov, stderr : ndarray, shape (n, n)
    """
    s = outputs.shape[0]
    prod = outputs[:, :, None] * outputs[:, None, :]
    cov = prod.mean(axis=0)
    stderr = prod.std(axis=0, ddof=1) / np.sqrt(s)
    return cov, stderr
