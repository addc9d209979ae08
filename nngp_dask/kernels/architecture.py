"""The architecture value object: depth, activation and the weight/bias variances."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

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


@dataclass(frozen=True)
class Architecture:
    """A fully connected network of infinite width (DESIGN.md section 2).

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

    def __init__(
        self,
        depth: int,
        activation: str | Mapping[str, Any] | Activation = defaults.ACTIVATION,
        weight_var: float = defaults.WEIGHT_VAR,
        bias_var: float = defaults.BIAS_VAR,
    ) -> None:
        if isinstance(depth, bool) or not isinstance(depth, (int, np.integer)):
            raise TypeError(f"depth: expected an integer >= 0, got {depth!r} ({type(depth).__name__})")
        if depth < 0:
            raise ValueError(f"depth: expected an integer >= 0, got {depth!r}")
        object.__setattr__(self, "depth", int(depth))
        object.__setattr__(self, "activation", get_activation(activation))
        object.__setattr__(self, "weight_var", _check_real("weight_var", weight_var, positive=True))
        object.__setattr__(self, "bias_var", _check_real("bias_var", bias_var, positive=False))

    def replace(self, **changes: Any) -> "Architecture":
        """A copy with some fields changed (validated again)."""
        fields = {"depth": self.depth, "activation": self.activation, "weight_var": self.weight_var,
                  "bias_var": self.bias_var}
        fields.update(changes)
        return Architecture(**fields)

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (for stores and pipeline files)."""
        return {
            "depth": self.depth,
            "activation": self.activation.to_dict(),
            "weight_var": self.weight_var,
            "bias_var": self.bias_var,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Architecture":
        """Inverse of :meth:`to_dict`; unknown keys are refused."""
        if not isinstance(data, Mapping):
            raise TypeError(f"architecture: expected a mapping, got {type(data).__name__}")
        known = {"depth", "activation", "weight_var", "bias_var"}
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
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]

    def __repr__(self) -> str:
        act = self.activation.to_dict() if not hasattr(self.activation, "fn") else {"name": self.activation.name}
        return (f"Architecture(depth={self.depth}, activation={act}, "
                f"weight_var={self.weight_var:g}, bias_var={self.bias_var:g})")
