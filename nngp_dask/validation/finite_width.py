"""Finite-width random networks: the Monte Carlo side of the NNGP correspondence.

A fully connected network of the given :class:`~nngp_dask.Architecture` and width,
weights ``N(0, weight_var / fan_in)``, biases ``N(0, bias_var)``, one output unit.
As the width grows the output distribution over random draws converges to the
Gaussian process whose covariance is :func:`nngp_dask.kernel` (Neal 1994; Lee et
al. 2018; Matthews et al. 2018).

Sampling a layer exactly at O(n width) cost
-------------------------------------------
Only the network's values on the ``n`` given inputs are needed. For a layer with
inputs ``h`` (``n x fan_in``) and weights ``W`` (``fan_in x width``, i.i.d. Gaussian),
write ``h = R^T Q^T`` (thin QR of ``h^T``, ``Q`` with ``n`` orthonormal columns). Then
``h W = R^T (Q^T W)`` and, by the rotation invariance of i.i.d. Gaussian matrices,
``Q^T W`` is itself an ``n x width`` matrix of i.i.d. ``N(0, weight_var / fan_in)``
entries. Drawing that ``n x width`` matrix instead of ``W`` gives pre-activations with
exactly the same joint distribution as a dense draw, at ``n width`` random numbers
per layer instead of ``fan_in width`` (``method="projected"``). This is what makes
width 4096 and thousands of networks cheap; ``method="dense"`` draws the full
weight matrices (the literal definition) and serves as a check.
"""

from __future__ import annotations

from typing import Literal, cast

import numpy as np
from numpy.typing import ArrayLike, DTypeLike, NDArray

from ..kernels import Architecture, TwoSlope, check_inputs

__all__ = ["sample_outputs", "sample_kernels", "simulate", "empirical_covariance", "average_kernels",
           "SAMPLING_METHODS"]

#: Accepted values of ``method`` in :func:`sample_outputs`.
SAMPLING_METHODS: tuple[str, ...] = ("auto", "projected", "dense")

_BATCH_BYTES = 32 << 20


def _check_count(name: str, value: object, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
        raise ValueError(f"{name}: expected an integer >= {lo}, got {value!r}")
    return int(value)


def _layer_plan(arch: Architecture, n: int, d: int, width: int, method: str) -> list[tuple[int, int, bool]]:
    """Per layer (fan_in, fan_out, projected) for the depth hidden layers and the readout."""
    plan = []
    fan_in = d
    for layer in range(arch.depth + 1):
        fan_out = width if layer < arch.depth else 1
        projected = method == "projected" or (method == "auto" and n < fan_in)
        plan.append((fan_in, fan_out, projected))
        fan_in = fan_out
    return plan


def _draw(rngs: list[np.random.Generator], shape: tuple[int, ...], dtype: np.dtype) -> NDArray:
    """Standard normals of ``shape`` per network, each from that network's own stream."""
    buf = np.empty((len(rngs), *shape), dtype=dtype)
    for rng, row in zip(rngs, buf):
        rng.standard_normal(dtype=dtype, out=row)
    return buf


def _prepare(arch, x, width, networks, seed, batch, dtype, method
             ) -> tuple[NDArray, np.dtype, int, int, list[tuple[int, int, bool]], int]:
    dt = np.dtype(dtype)
    if dt not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise ValueError(f"dtype: expected float32 or float64, got {dt}")
    if method not in SAMPLING_METHODS:
        raise ValueError(f"method: expected one of {list(SAMPLING_METHODS)}, got {method!r}")
    if not isinstance(arch, Architecture):
        raise TypeError(f"arch: expected an Architecture, got {type(arch).__name__}")
    x = check_inputs(x, "x").astype(dt)
    width = _check_count("width", width, 1)
    networks = _check_count("networks", networks, 1)
    seed = _check_count("seed", seed, 0)
    n, d = x.shape
    plan = _layer_plan(arch, n, d, width, method)
    if batch is None:
        per_net = max((min(n, f_in) if proj else f_in) * f_out + (n + 1) * f_out for f_in, f_out, proj in plan)
        batch = int(max(1, min(networks, _BATCH_BYTES // max(per_net * dt.itemsize, 1))))
    else:
        batch = _check_count("batch", batch, 1)
    return x, dt, networks, seed, plan, batch


def _layer(h: NDArray, rngs: list[np.random.Generator], fan_in: int, fan_out: int, projected: bool,
           r0: NDArray | None, sw: float, sb: float, dt: np.dtype) -> NDArray:
    """Pre-activations ``h W + b`` of one layer for a batch of networks, shape (b, n, fan_out)."""
    if projected:
        # numpy's stubs type qr as a QRResult whatever the mode; mode="r" returns R alone
        r = r0 if r0 is not None else cast(NDArray, np.linalg.qr(np.swapaxes(h, -1, -2), mode="r"))
        z = np.swapaxes(r, -1, -2) @ _draw(rngs, (r.shape[-2], fan_out), dt)
    else:
        z = h @ _draw(rngs, (fan_in, fan_out), dt)
    z *= dt.type(sw / np.sqrt(fan_in))
    z += _draw(rngs, (1, fan_out), dt) * dt.type(sb)
    return z


def _activate(phi, z: NDArray, dt: np.dtype) -> NDArray:
    """``phi(z)``; the two-slope family (relu, leaky_relu, abs, identity) in place, without temporaries."""
    if isinstance(phi, TwoSlope):
        a, b = phi.negative_slope, phi.positive_slope
        if a == b:
            return z if a == 1.0 else np.multiply(z, dt.type(a), out=z)
        if a == 0.0:
            np.maximum(z, 0, out=z)
            return z if b == 1.0 else np.multiply(z, dt.type(b), out=z)
    return np.asarray(phi(z), dtype=dt)


def simulate(arch: Architecture, x: ArrayLike, *, width: int, networks: int, seed: int, batch: int | None,
             dtype: DTypeLike, method: str, outputs: bool, kernels: str | None
             ) -> tuple[NDArray | None, NDArray | None]:
    """Run the networks once; the hidden layers feed the readout draw and/or the per-network kernels.

    One pass serves both :func:`sample_outputs` and :func:`sample_kernels` (and the validation,
    which needs both from the same networks).

    Parameters
    ----------
    arch, x, width, networks, seed, batch, dtype, method
        As :func:`sample_outputs`.
    outputs : bool
        Draw each network's readout ``f(x)``.
    kernels : {None, "last", "all"}
        Per-network empirical kernels of the last hidden layer (shape (networks, n, n)) or of
        every layer (shape (networks, L + 1, n, n)).

    Returns
    -------
    outputs : ndarray, shape (networks, n), or None
    kernels : ndarray or None
    """
    x, dt, networks, seed, plan, batch = _prepare(arch, x, width, networks, seed, batch, dtype, method)
    n, d = x.shape
    phi = arch.activation
    wv, bv = arch.weight_var, arch.bias_var
    sw, sb = float(np.sqrt(wv)), float(np.sqrt(bv))
    # The first layer's inputs are shared by every network: factor them once.
    r0 = cast(NDArray, np.linalg.qr(x.T, mode="r")) if plan[0][2] else None  # (R alone: see _layer)
    out = np.empty((networks, n), dtype=dt) if outputs else None
    kern: NDArray | None = None
    if kernels == "last":
        kern = np.empty((networks, 1, n, n), dtype=dt)
    elif kernels == "all":
        kern = np.empty((networks, arch.depth + 1, n, n), dtype=dt)
        kern[:, 0] = bv + (wv / d) * (x @ x.T)
    for start in range(0, networks, batch):
        b = min(batch, networks - start)
        stop = start + b
        rngs = [np.random.default_rng([seed, i]) for i in range(start, stop)]
        h: NDArray = x  # (n, d) for the first layer, then (b, n, width)
        for layer, (fan_in, fan_out, projected) in enumerate(plan[:-1]):
            z = _layer(h, rngs, fan_in, fan_out, projected, r0 if layer == 0 else None, sw, sb, dt)
            h = _activate(phi, z, dt)
            if kernels == "all" or (kernels == "last" and layer == arch.depth - 1):
                k = h @ np.swapaxes(h, -1, -2)
                k *= dt.type(wv / fan_out)
                k += dt.type(bv)
                assert kern is not None  # kernels is "all" or "last"
                kern[start:stop, -1 if kernels == "last" else layer + 1] = k
        if kernels == "last" and arch.depth == 0:
            assert kern is not None
            kern[start:stop, 0] = bv + (wv / d) * (x @ x.T)
        if out is not None:
            fan_in, fan_out, projected = plan[-1]
            z = _layer(h, rngs, fan_in, fan_out, projected, r0 if arch.depth == 0 else None, sw, sb, dt)
            out[start:stop] = np.broadcast_to(z, (b, n, 1))[..., 0]
    if kernels == "last":
        assert kern is not None
        kern = kern[:, 0]
    return out, kern


def sample_outputs(
    arch: Architecture,
    x: ArrayLike,
    *,
    width: int,
    networks: int,
    seed: int = 0,
    batch: int | None = None,
    dtype: DTypeLike = np.float64,
    method: Literal["auto", "projected", "dense"] = "auto",
) -> NDArray:
    """Outputs of ``networks`` independent random networks on ``x``.

    Parameters
    ----------
    arch : Architecture
        Depth (hidden layers), activation (any :class:`~nngp_dask.activations.Activation`,
        including :class:`~nngp_dask.Elementwise` wrapping a user's function) and variances.
    x : array_like, shape (n, d)
    width : int
        Units per hidden layer.
    networks : int
        Number of independent networks.
    seed : int
        Network ``i`` draws from its own stream ``numpy.random.default_rng([seed, i])``, so the
        result does not depend on ``batch``, and the first ``m`` rows are the same for any
        ``networks >= m`` (nested samples).
    batch : int, optional
        Networks evaluated at once; the default keeps each batch's random numbers and
        activations near 32 MiB (``batch * width**2`` weights for ``method="dense"``).
    dtype : float64 (default) or float32
        Arithmetic precision (and of the random numbers).
    method : {"auto", "projected", "dense"}
        ``"dense"`` draws every weight matrix; ``"projected"`` draws, per layer, the
        ``n x width`` projection of the weights onto the span of the layer's inputs, which
        has exactly the same distribution (module docstring); ``"auto"`` projects the
        layers whose fan-in exceeds ``n``.

    Returns
    -------
    ndarray, shape (networks, n)
    """
    out, _ = simulate(arch, x, width=width, networks=networks, seed=seed, batch=batch, dtype=dtype,
                       method=method, outputs=True, kernels=None)
    assert out is not None  # outputs=True
    return out


def sample_kernels(
    arch: Architecture,
    x: ArrayLike,
    *,
    width: int,
    networks: int,
    seed: int = 0,
    batch: int | None = None,
    dtype: DTypeLike = np.float64,
    method: Literal["auto", "projected", "dense"] = "auto",
    all_depths: bool = False,
) -> NDArray:
    """Each network's output covariance given its hidden layers (readout integrated out exactly).

    For network ``i`` with last hidden layer ``phi(h^L)`` (``n x width``) this is
    ``bias_var + weight_var / width * phi(h^L) phi(h^L)^T``, the conditional expectation of
    ``f f^T`` over the readout weights and bias. Its mean over networks estimates the same
    quantity as :func:`empirical_covariance` of :func:`sample_outputs` (tower property) with
    a variance O(1 / width) times smaller, which resolves the O(1 / width) finite-width
    bias with far fewer networks. Network ``i`` is the same network as row ``i`` of
    :func:`sample_outputs` called with the same arguments.

    Parameters are those of :func:`sample_outputs`, and

    all_depths : bool
        Return every layer's empirical kernel ``K^l = bias_var + weight_var / fan_in *
        phi(h^l) phi(h^l)^T`` for ``l = 0..L`` (``K^0`` is the deterministic input kernel),
        like :func:`nngp_dask.kernel` with ``all_depths=True``. Layer ``l + 1``'s
        pre-activations are exactly ``N(0, K^l)`` given the layers below.

    Returns
    -------
    ndarray, shape (networks, n, n), or (networks, L + 1, n, n) with ``all_depths``
    """
    _, kern = simulate(arch, x, width=width, networks=networks, seed=seed, batch=batch, dtype=dtype,
                        method=method, outputs=False, kernels="all" if all_depths else "last")
    assert kern is not None  # kernels is "all" or "last"
    return kern


def average_kernels(kernels: ArrayLike) -> tuple[NDArray, NDArray]:
    """Mean of per-network kernels (from :func:`sample_kernels`) and its standard error per entry.

    Parameters
    ----------
    kernels : array_like, shape (networks >= 2, n, n)

    Returns
    -------
    mean, stderr : ndarray, shape (n, n)
    """
    k = np.asarray(kernels, dtype=np.float64)
    if k.ndim != 3 or k.shape[0] < 2:
        raise ValueError(f"kernels: expected shape (networks >= 2, n, n), got {k.shape}")
    return k.mean(axis=0), k.std(axis=0, ddof=1) / np.sqrt(k.shape[0])


def empirical_covariance(outputs: ArrayLike) -> tuple[NDArray, NDArray]:
    """Second moment ``E[f(x_i) f(x_j)]`` of sampled outputs (zero-mean by construction) and its
    standard error per entry.

    The output of a network with a zero-mean readout is exactly centred, so the raw second
    moment (not the mean-subtracted covariance) is the unbiased estimator of the kernel.
    Memory is O(n^2), independent of the number of networks.

    Parameters
    ----------
    outputs : array_like, shape (networks, n), networks >= 2

    Returns
    -------
    cov, stderr : ndarray, shape (n, n)
        ``cov = outputs.T @ outputs / s`` and the standard error of each entry,
        ``std(f_i f_j) / sqrt(s)`` (sample standard deviation, ``ddof=1``).
    """
    f = np.asarray(outputs, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"outputs: expected shape (networks >= 2, n), got {f.shape}")
    s = f.shape[0]
    cov = f.T @ f / s
    f2 = f * f
    second = f2.T @ f2 / s  # E[(f_i f_j)^2]
    var = np.maximum(second - cov * cov, 0.0) * (s / (s - 1))
    return cov, np.sqrt(var / s)
