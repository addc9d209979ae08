"""The architecture value object: depth, activation and the weight/bias variances."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from .. import defaults
from .activations import Activation, get_activation

__all__ = ["Architecture"]


def _check_real(field: str, value: Any, *, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{field}: expected a real number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{field}: expected a finite number, got {value!r}")
    if positive and value <= 0:
        raise ValueError(f"{field}: expected a number > 0, got {value!r}")
    if not positive and value < 0:
        raise ValueError(f"{field}: expected a number >= 0, got {value!r}")
    return value


def _check_ard(value: Any) -> tuple[float, ...] | None:
    if value is None:
        return None
    if isinstance(value, (str, bytes, Mapping)) or not hasattr(value, "__len__"):
        raise TypeError(f"input_weight_var: expected None or a sequence of numbers > 0 (one per input feature), "
                        f"got {value!r:.60}")
    if len(value) == 0:
        raise ValueError("input_weight_var: expected None or one number > 0 per input feature, got an empty sequence")
    return tuple(_check_real(f"input_weight_var[{i}]", v, positive=True) for i, v in enumerate(value))


@dataclass(frozen=True)
class Architecture:
    """A fully connected network of infinite width (docs/DESIGN.md section 2).

    Parameters
    ----------
    depth : int
        Number of hidden layers ``L >= 0`` (``L`` activations). Depth 0 is the affine
        input kernel ``bias_var + weight_var <x, x'> / d``.
    activation : str, dict or Activation
        Activation by name (``"relu"``, ``"erf"``, ``"tanh"``, ...), as a dict
        (``{"name": "leaky_relu", "slope": 0.1}``) or as an :class:`~nngp_dask.activations.Activation`.
    weight_var : float, default 1.6
        ``sigma_w^2 > 0``: weights are ``N(0, weight_var / fan_in)``.
    bias_var : float, default 0.1
        ``sigma_b^2 >= 0``: biases are ``N(0, bias_var)``.
    input_weight_var : sequence of float, optional
        ARD (automatic relevance determination): one first-layer weight variance per input
        feature, ``v_i > 0``, replacing ``weight_var`` in the input layer only:
        ``K^0(x, x') = bias_var + sum_i v_i x_i x'_i / d`` (deeper layers keep ``weight_var``).
        Equivalently, the isotropic kernel with ``weight_var = 1`` on inputs scaled by
        ``sqrt(v_i)``. In neural-tangents (``stax.Dense(W_std, b_std)``, ``W_std^2 / fan_in``)
        ``weight_var = W_std^2`` and ``bias_var = b_std^2``; ARD has no stax layer and is the
        same network on the rescaled inputs ``x_i sqrt(v_i / W_std^2)`` of the first ``Dense``.
        None (default): every feature has ``weight_var``.

    The defaults are those of pipelines, estimators and sweeps (:mod:`nngp_dask.defaults`);
    this class alone used to default to 1.0 and 0.0. A store records the values it was built
    with, so an old store keeps its kernel, and a build asking it for other values is refused
    naming the field.

    Examples
    --------
    >>> arch = Architecture(depth=3, activation="relu", weight_var=1.6, bias_var=0.1)
    >>> Architecture.from_dict(arch.to_dict()) == arch
    True
    """

    depth: int
    activation: Activation
    weight_var: float = defaults.WEIGHT_VAR
    bias_var: float = defaults.BIAS_VAR
    input_weight_var: tuple[float, ...] | None = None

    def __init__(
        self,
        depth: int,
        activation: str | Mapping[str, Any] | Activation = defaults.ACTIVATION,
        weight_var: float = defaults.WEIGHT_VAR,
        bias_var: float = defaults.BIAS_VAR,
        input_weight_var: Sequence[float] | NDArray | None = None,
    ) -> None:
        if isinstance(depth, bool) or not isinstance(depth, (int, np.integer)):
            raise TypeError(f"depth: expected an integer >= 0, got {depth!r} ({type(depth).__name__})")
        if depth < 0:
            raise ValueError(f"depth: expected an integer >= 0, got {depth!r}")
        object.__setattr__(self, "depth", int(depth))
        object.__setattr__(self, "activation", get_activation(activation))
        object.__setattr__(self, "weight_var", _check_real("weight_var", weight_var, positive=True))
        object.__setattr__(self, "bias_var", _check_real("bias_var", bias_var, positive=False))
        object.__setattr__(self, "input_weight_var", _check_ard(input_weight_var))

    @property
    def input_scale(self) -> NDArray[np.float64] | None:
        """``sqrt(input_weight_var)`` (d,), the per-feature factor ARD applies to the inputs, or None."""
        if self.input_weight_var is None:
            return None
        return np.sqrt(np.asarray(self.input_weight_var, dtype=np.float64))

    @property
    def input_layer_weight(self) -> float:
        """The factor of ``<x, x'> / d`` in the input layer after ARD scaling: ``weight_var``, or 1 with ARD."""
        return 1.0 if self.input_weight_var is not None else self.weight_var

    def replace(self, **changes: Any) -> Architecture:
        """A copy with some fields changed (validated again)."""
        fields: dict[str, Any] = {"depth": self.depth, "activation": self.activation, "weight_var": self.weight_var,
                                  "bias_var": self.bias_var, "input_weight_var": self.input_weight_var}
        fields.update(changes)
        return Architecture(**fields)

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (for stores and pipeline files)."""
        out = {
            "depth": self.depth,
            "activation": self.activation.to_dict(),
            "weight_var": self.weight_var,
            "bias_var": self.bias_var,
        }
        if self.input_weight_var is not None:  # absent when isotropic: older stores keep their identity
            out["input_weight_var"] = list(self.input_weight_var)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Architecture:
        """Inverse of :meth:`to_dict`; unknown keys are refused."""
        if not isinstance(data, Mapping):
            raise TypeError(f"architecture: expected a mapping, got {type(data).__name__}")
        known = {"depth", "activation", "weight_var", "bias_var", "input_weight_var"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"architecture.{unknown[0]}: unknown key; expected one of {sorted(known)}")
        if "depth" not in data:
            raise ValueError("architecture.depth: missing; expected an integer >= 0")
        return cls(
            depth=data["depth"],
            activation=data.get("activation", defaults.ACTIVATION),
            weight_var=data.get("weight_var", defaults.WEIGHT_VAR),
            bias_var=data.get("bias_var", defaults.BIAS_VAR),
            input_weight_var=data.get("input_weight_var"),
        )

    @property
    def fingerprint(self) -> str:
        """Stable hex digest of everything that determines the kernel."""
        payload = {
            "depth": self.depth,
            "activation": self.activation.fingerprint_payload(),
            "weight_var": repr(self.weight_var),
            "bias_var": repr(self.bias_var),
        }
        if self.input_weight_var is not None:
            payload["input_weight_var"] = [repr(v) for v in self.input_weight_var]
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]

    def __repr__(self) -> str:
        act = self.activation.to_dict() if not hasattr(self.activation, "fn") else {"name": self.activation.name}
        return (f"Architecture(depth={self.depth}, activation={act}, "
                f"weight_var={self.weight_var:g}, bias_var={self.bias_var:g}"
                + (f", input_weight_var=<{len(self.input_weight_var)} features>" if self.input_weight_var else "")
                + ")")
