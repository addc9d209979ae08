"""The hyperparameter grid of a sweep, its tasks, criteria and solvers, checked once; every grid
candidate's kernel from one Gram (:func:`sweep_kernels`)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, DTypeLike, NDArray

from .. import defaults
from ..kernels import Architecture, check_kind, depth_kernels, gram_block

__all__ = ["CRITERIA", "EIGH_MIN_NOISES", "GRID_DEFAULTS", "GRID_KEYS", "SOLVERS", "TASKS", "sweep_kernels"]

TASKS: tuple[str, ...] = ("classification", "regression")
#: criterion -> True when larger is better
CRITERIA: dict[str, bool] = {"accuracy": True, "rmse": False, "nlpd": False, "marginal_likelihood": True}
SOLVERS: tuple[str, ...] = ("auto", "cholesky", "eigh", "cg")
GRID_KEYS: tuple[str, ...] = ("weight_var", "bias_var", "depth", "noise")
#: defaults of grid keys left out (those of the pipeline schema)
GRID_DEFAULTS: dict[str, tuple] = {"weight_var": (defaults.WEIGHT_VAR,), "bias_var": (defaults.BIAS_VAR,),
                                   "depth": (defaults.DEPTH,), "noise": (defaults.NOISE,)}
#: ``solver="auto"`` uses one eigendecomposition instead of one Cholesky per noise from this
#: many noises on (an ``eigh`` costs about 8-10 Cholesky factorisations on this machine).
EIGH_MIN_NOISES = 8


def _as_values(key: str, value: Any) -> tuple:
    if isinstance(value, (str, bytes, Mapping)):
        raise TypeError(f"grid.{key}: expected a number or a list of numbers, got {value!r}")
    values = tuple(np.asarray(value).ravel().tolist()) if isinstance(value, (Sequence, np.ndarray)) else (value,)
    if not values:
        raise ValueError(f"grid.{key}: expected at least one value, got an empty list")
    return tuple(dict.fromkeys(values))  # drop repeats, keep order


def check_grid(grid: Mapping[str, Any], keys: Sequence[str] = GRID_KEYS) -> dict[str, tuple]:
    if not isinstance(grid, Mapping):
        raise TypeError(f"grid: expected a dict of lists {list(keys)}, got {type(grid).__name__}")
    unknown = sorted(set(grid) - set(keys))
    if unknown:
        raise ValueError(f"grid.{unknown[0]}: unknown key; expected some of {list(keys)}")
    out = {}
    for key in keys:
        values = _as_values(key, grid.get(key, GRID_DEFAULTS[key]))
        for v in values:
            integer = isinstance(v, (int, np.integer)) and not isinstance(v, bool)
            if key == "depth":
                if not integer or v < 0:
                    raise ValueError(f"grid.depth: expected integers >= 0, got {v!r}")
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) \
                    or not math.isfinite(v):
                raise ValueError(f"grid.{key}: expected finite numbers, got {v!r}")
            if key == "weight_var" and v <= 0:
                raise ValueError(f"grid.weight_var: expected numbers > 0, got {v!r}")
            if v < 0:
                raise ValueError(f"grid.{key}: expected numbers >= 0, got {v!r}")
        out[key] = tuple(int(v) if key == "depth" else float(v) for v in values)
    return out


def sweep_kernels(
    x_rows: ArrayLike,
    x_cols: ArrayLike | None = None,
    *,
    weight_var: Sequence[float] | float,
    bias_var: Sequence[float] | float,
    depth: Sequence[int] | int,
    activation: Any = "relu",
    kind: str = "nngp",
    dtype: DTypeLike = "float64",
) -> Iterator[tuple[Architecture, NDArray]]:
    """Every candidate's kernel block from one Gram and one recursion per ``(weight_var, bias_var)``.

    Yields ``(Architecture(depth, activation, weight_var, bias_var), K)`` in grid order
    (weight_var, then bias_var, then depth), each ``K`` equal to
    ``nngp_dask.kernel(arch, x_rows, x_cols, kind=kind, dtype=dtype)``. The arrays of one
    ``(weight_var, bias_var)`` pair are views of one (L + 1, m, n) stack: copy what you keep.
    """
    grid = check_grid({"weight_var": weight_var, "bias_var": bias_var, "depth": depth})
    block = gram_block(x_rows, x_cols, dtype=dtype)
    depths = sorted(grid["depth"])
    for wv, bv in itertools.product(grid["weight_var"], grid["bias_var"]):
        arch_max = Architecture(max(depths), activation, wv, bv)
        check_kind(kind, arch_max)
        for layers, k in depth_kernels(arch_max, block, depths, kind, True):
            yield arch_max.replace(depth=layers), k
