"""Derivatives of the kernel matrix with respect to its log-hyperparameters.

The recursion's hyperparameters enter every layer, so the derivative is taken numerically, on
the kernel matrix itself, by central differences in log space: each entry is a smooth function
of ``log weight_var``, ``log bias_var`` and the ARD log-variances, and with a step ``h = 1e-4``
the truncation error is ``O(h^2) ~ 1e-9`` relative while rounding adds ``O(eps / h) ~ 1e-12``
(float64 throughout). A marginal likelihood then needs the derivative only contracted with one
matrix (``0.5 tr(W dK)``), which is why :func:`kernel_log_derivatives` yields one parameter at a
time instead of holding ``(n, n, P)``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
from numpy.typing import ArrayLike, NDArray

from .architecture import Architecture
from .inputs import check_inputs
from .tiles import check_architecture, kernel

__all__ = ["LOG_HYPERPARAMETERS", "log_hyperparameters", "with_log_hyperparameters", "kernel_log_derivatives",
           "kernel_log_gradient"]

#: hyperparameters of an :class:`Architecture` with a log-space derivative (``input_weight_var``: one per feature)
LOG_HYPERPARAMETERS: tuple[str, ...] = ("weight_var", "bias_var", "input_weight_var")

_STEP = 1e-4


def _check_names(names: Sequence[str]) -> tuple[str, ...]:
    names = tuple(names)
    for name in names:
        if name not in LOG_HYPERPARAMETERS:
            raise ValueError(f"names: expected names from {list(LOG_HYPERPARAMETERS)}, got {name!r}")
    return names


def log_hyperparameters(arch: Architecture, names: Sequence[str]) -> NDArray[np.float64]:
    """The logs of the named hyperparameters of ``arch``, concatenated (ARD contributes d values).

    Raises ValueError for a hyperparameter at 0 (``bias_var = 0``: its log is -inf) or an
    ``input_weight_var`` that is None.
    """
    out: list[float] = []
    for name in _check_names(names):
        value = getattr(check_architecture(arch), name)
        if name == "input_weight_var":
            if value is None:
                raise ValueError("input_weight_var: expected per-feature variances to differentiate, got None")
            out.extend(value)
        else:
            if value <= 0:
                raise ValueError(f"{name}: expected a value > 0 to take its log, got {value!r}")
            out.append(value)
    return np.log(np.asarray(out, dtype=np.float64))


def with_log_hyperparameters(arch: Architecture, names: Sequence[str], theta: ArrayLike) -> Architecture:
    """``arch`` with the named hyperparameters set to ``exp(theta)`` (the inverse of :func:`log_hyperparameters`)."""
    theta = np.asarray(theta, dtype=np.float64)
    changes: dict = {}
    pos = 0
    for name in _check_names(names):
        if name == "input_weight_var":
            d = len(arch.input_weight_var) if arch.input_weight_var is not None else theta.size - pos
            changes[name] = tuple(np.exp(theta[pos:pos + d]).tolist())
            pos += d
        else:
            changes[name] = float(np.exp(theta[pos]))
            pos += 1
    if pos != theta.size:
        raise ValueError(f"theta: expected {pos} values for {list(names)}, got {theta.size}")
    return arch.replace(**changes)


def kernel_log_derivatives(arch: Architecture, x: ArrayLike, names: Sequence[str], *, kind: str = "nngp",
                           step: float = _STEP, k: NDArray | None = None) -> Iterator[NDArray[np.float64]]:
    """``dK / d theta_p`` (n, n) float64 for each log-hyperparameter ``theta_p`` in order, one at a time.

    Central differences of :func:`nngp_dask.kernels.kernel` in float64 (two kernels per parameter),
    or, given the kernel ``k`` of ``arch`` itself, forward differences (one kernel per parameter;
    error ``O(step)``: pass a smaller ``step``, e.g. 1e-6, whose rounding error is ~1e-10).
    """
    x = check_inputs(x, "x")
    names = _check_names(names)
    theta = log_hyperparameters(arch, names)
    for p in range(theta.size):
        up, down = theta.copy(), theta.copy()
        up[p] += step
        down[p] -= step
        k_up = kernel(with_log_hyperparameters(arch, names, up), x, kind=kind, dtype="float64")
        if k is None:
            k_up -= kernel(with_log_hyperparameters(arch, names, down), x, kind=kind, dtype="float64")
            k_up *= 1.0 / (2.0 * step)
        else:
            k_up -= k
            k_up *= 1.0 / step
        yield k_up


def kernel_log_gradient(arch: Architecture, x: ArrayLike, names: Sequence[str], *, kind: str = "nngp",
                        step: float = _STEP) -> NDArray[np.float64]:
    """All of :func:`kernel_log_derivatives` stacked as scikit-learn's kernels return them: (n, n, P)."""
    x = check_inputs(x, "x")
    grads = list(kernel_log_derivatives(arch, x, names, kind=kind, step=step))
    if not grads:
        return np.empty((x.shape[0], x.shape[0], 0))
    return np.stack(grads, axis=-1)
