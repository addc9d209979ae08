"""Activations and their dual kernels.

For an activation ``phi`` and a centred Gaussian pair ``(u, v)`` with covariance
``[[k11, k12], [k12, k22]]`` the NNGP recursion needs ``E[phi(u) phi(v)]`` and the
NTK recursion needs ``E[phi'(u) phi'(v)]`` (docs/DESIGN.md section 2).

Closed forms exist for the two-slope family (relu, leaky_relu, abs, identity;
Cho & Saul 2009), the step function and erf (Williams 1998). Any other
elementwise function uses the *Mehler (Hermite) series*:

    phi(s z) = sum_k a_k(s) h_k(z),   h_k = He_k / sqrt(k!)  (orthonormal under N(0, 1)),
    E[phi(u) phi(v)] = sum_k a_k(s1) a_k(s2) c^k,            c = k12 / (s1 s2),

and, by Price's theorem, ``E[phi'(u) phi'(v)] = sum_k b_k(s1) b_k(s2) c^k`` with
``b_k(s) = sqrt(k + 1) a_{k+1}(s) / s``. The coefficients are one-dimensional
Gauss-Hermite integrals per point and layer (cheap, O(n)); per kernel entry the
series costs ``degree`` fused multiply-adds. The truncated series is itself a
positive semi-definite kernel (a sum of Schur powers of a correlation matrix), and
its truncation error is bounded per point by the tail ``sum_{k > K} a_k(s)^2``,
which :meth:`Elementwise.truncation_error` reports. This replaces the
interpolation table of Lee et al. (2018): it is exact up to a computable bound,
needs no 2-D table and handles unequal variances. The tests check it against per-entry
2-D Gauss-Hermite quadrature (``tests/oracles.py``).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = [
    "Activation",
    "TwoSlope",
    "Step",
    "Erf",
    "Elementwise",
    "get_activation",
    "ACTIVATIONS",
    "ACTIVATION_PARAMETERS",
]

# Integer family codes shared with the compiled recursion (`_recursion.py`).
FAMILY_TWO_SLOPE = 0
FAMILY_IDENTITY = 1
FAMILY_STEP = 2
FAMILY_ERF = 3
FAMILY_HERMITE = 4


@dataclass(frozen=True)
class Activation:
    """Base class of activations; subclasses are immutable value objects."""

    family: ClassVar[int]
    name: str = "activation"
    #: Whether the NTK (which needs ``phi'``) is defined for this activation.
    has_ntk: ClassVar[bool] = True

    @property
    def params(self) -> tuple[float, float]:
        """Two scalars handed to the compiled recursion (meaning per family)."""
        return (0.0, 0.0)

    def __call__(self, x: NDArray) -> NDArray:
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form, inverse of :func:`get_activation`."""
        return {"name": self.name}

    def fingerprint_payload(self) -> dict[str, Any]:
        """What identifies this activation's kernel (used in store fingerprints)."""
        return self.to_dict()


@dataclass(frozen=True)
class TwoSlope(Activation):
    """``phi(x) = negative_slope * x`` for ``x < 0`` and ``positive_slope * x`` for ``x > 0``.

    Covers relu ``(0, 1)``, leaky_relu ``(alpha, 1)``, abs ``(-1, 1)`` and identity
    ``(1, 1)``. With ``J(c) = sqrt(1 - c^2) + (pi - arccos c) c`` (the order-1
    arc-cosine kernel, Cho & Saul 2009):

    ``E[phi phi] = sqrt(k11 k22) ((a^2 + b^2) J(c) - 2 a b J(-c)) / (2 pi)``,
    ``E[phi' phi'] = ((a^2 + b^2) (pi - theta) + 2 a b theta) / (2 pi)``.
    """

    name: str = "two_slope"
    negative_slope: float = 0.0
    positive_slope: float = 1.0

    def __post_init__(self) -> None:
        for fld in ("negative_slope", "positive_slope"):
            value = getattr(self, fld)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
                raise TypeError(f"activation.{fld}: expected a real number, got {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"activation.{fld}: expected a finite number, got {value!r}")
            object.__setattr__(self, fld, float(value))

    @property
    def family(self) -> int:  # type: ignore[override]
        a, b = self.negative_slope, self.positive_slope
        return FAMILY_IDENTITY if (a == 1.0 and b == 1.0) else FAMILY_TWO_SLOPE

    @property
    def params(self) -> tuple[float, float]:
        return (self.negative_slope, self.positive_slope)

    def __call__(self, x: NDArray) -> NDArray:
        return np.where(x < 0, self.negative_slope * x, self.positive_slope * x)

    def to_dict(self) -> dict[str, Any]:
        a, b = self.negative_slope, self.positive_slope
        if self.name == "relu" or self.name == "abs" or self.name == "identity":
            return {"name": self.name}
        if self.name == "leaky_relu":
            return {"name": "leaky_relu", "slope": a}
        return {"name": "two_slope", "negative_slope": a, "positive_slope": b}


@dataclass(frozen=True)
class Step(Activation):
    """Heaviside step ``1[x > 0]``: ``E = (pi - theta) / (2 pi)`` (arc-cosine order 0).

    Its derivative is a Dirac delta, so the NTK is undefined (infinite on the diagonal).
    A point of zero pre-activation variance (a zero input with ``bias_var = 0``) has
    ``u = 0`` exactly and ``step(0) = 0``, so its kernel row is 0, as in the network.

    The correlation map ``c -> (pi - arccos c) / pi`` (at ``bias_var = 0``) has an infinite
    slope at ``c = 1``, so it turns a rounding of ``1e-16`` in the correlation of two
    identical points (stored at different indices) into ``~1e-8`` after one layer, and after
    tens of layers such a pair converges, like every other pair, to the fixed-point
    correlation of the map. The diagonal itself is computed with ``c = 1`` exactly.
    """

    name: str = "step"
    family: ClassVar[int] = FAMILY_STEP
    has_ntk: ClassVar[bool] = False

    def __call__(self, x: NDArray) -> NDArray:
        return (x > 0).astype(np.result_type(x, np.float32))


@dataclass(frozen=True)
class Erf(Activation):
    """``erf``: ``E = (2/pi) arcsin(2 k12 / sqrt((1 + 2 k11)(1 + 2 k22)))`` (Williams 1998);
    ``E[phi' phi'] = (4/pi) / sqrt((1 + 2 k11)(1 + 2 k22) - 4 k12^2)``."""

    name: str = "erf"
    family: ClassVar[int] = FAMILY_ERF

    def __call__(self, x: NDArray) -> NDArray:
        from scipy.special import erf

        return erf(x)


def _hermite_basis(z: NDArray, degree: int) -> NDArray:
    """Orthonormal probabilists' Hermite functions ``h_k(z)``, shape (degree + 1, len(z))."""
    h = np.empty((degree + 1, z.size))
    h[0] = 1.0
    if degree >= 1:
        h[1] = z
    for k in range(1, degree):
        h[k + 1] = (z * h[k] - math.sqrt(k) * h[k - 1]) / math.sqrt(k + 1)
    return h


#: Largest Gauss-Hermite rule NumPy computes with all weights positive and finite.
_MAX_NODES = 370


@dataclass(frozen=True, eq=False, kw_only=True)
class Elementwise(Activation):
    """Any elementwise activation, through its Mehler (Hermite) series.

    Parameters
    ----------
    fn : callable
        NumPy-vectorised function ``phi(x)``.
    name : str
        Identifier (used in configurations, logs and the store fingerprint).
    degree : int
        Truncation degree ``K`` of the Hermite series. The kernel error per entry is
        bounded by ``sqrt(tail(s1) tail(s2))`` with ``tail(s) = E[phi(s z)^2] - sum_{k<=K} a_k(s)^2``
        (see :meth:`truncation_error`). How fast the tail falls depends on how close the
        function's complex singularities are to the real axis, measured in units of the
        standard deviation. At ``K = 64`` the relative tail is, at variance 1 / 2 / 4:
        tanh ``1e-10 / 7e-8 / 6e-6`` (poles at ``+-i pi / 2``); gelu ``0 / 3e-14 / 2e-9``;
        silu ``0 / 2e-14 / 7e-11``; sigmoid ``0 / 6e-15 / 4e-11``; softplus
        ``0 / 0 / 4e-13``. Raise ``degree`` (and ``nodes``, which must resolve
        ``phi(s z)`` for the coefficient integrals) for tanh at large variance. The NTK's
        derivative series ``b_k`` converges more slowly (by a factor ``k`` in its terms).
        Kinked functions converge slowly (prefer a closed form where one exists).
    nodes : int
        Gauss-Hermite nodes for the coefficient integrals, ``degree + 2 <= nodes <= 370``.
    """

    fn: Callable[[NDArray], NDArray] = field(default=np.tanh, repr=False)
    name: str = "tanh"
    degree: int = 64
    nodes: int = 240
    family: ClassVar[int] = FAMILY_HERMITE
    if TYPE_CHECKING:  # set once in __post_init__; not dataclass fields (no init, eq, repr or hash)
        _z: NDArray
        _w: NDArray
        _basis: NDArray

    def __post_init__(self) -> None:
        if not callable(self.fn):
            raise TypeError(f"activation.fn: expected a callable, got {self.fn!r}")
        for fld, lo in (("degree", 1), ("nodes", 8)):
            value = getattr(self, fld)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
                raise ValueError(f"activation.{fld}: expected an integer >= {lo}, got {value!r}")
        if self.nodes > _MAX_NODES:
            raise ValueError(f"activation.nodes: expected at most {_MAX_NODES} nodes, got {self.nodes}")
        if self.nodes < self.degree + 2:
            raise ValueError(
                f"activation.nodes: expected at least degree + 2 = {self.degree + 2} nodes, got {self.nodes}"
            )
        with np.errstate(all="ignore"):
            z, w = np.polynomial.hermite_e.hermegauss(self.nodes)
        if not (np.all(np.isfinite(w)) and np.all(w > 0)):
            # NumPy's Gauss-Hermite weights underflow beyond ~370 nodes
            raise ValueError(f"activation.nodes: expected at most {_MAX_NODES} nodes, got {self.nodes}")
        object.__setattr__(self, "_z", z)
        object.__setattr__(self, "_w", w / math.sqrt(2.0 * math.pi))
        object.__setattr__(self, "_basis", _hermite_basis(z, self.degree + 1))

    def __call__(self, x: NDArray) -> NDArray:
        return self.fn(x)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Elementwise) and self.fingerprint_payload() == other.fingerprint_payload()

    def __hash__(self) -> int:
        return hash(tuple(sorted(self.fingerprint_payload().items())))

    def coefficients(self, variance: ArrayLike) -> tuple[NDArray, NDArray]:
        """Series coefficients for points of the given pre-activation variance.

        Returns
        -------
        a : ndarray, shape (n, degree + 1)
            ``a_k(s)`` with ``s = sqrt(variance)``.
        b : ndarray, shape (n, degree + 1)
            ``b_k(s) = sqrt(k + 1) a_{k+1}(s) / s`` (the derivative's series; 0 where s == 0).
        """
        s = np.sqrt(np.maximum(np.asarray(variance, dtype=np.float64).ravel(), 0.0))
        values = np.asarray(self.fn(s[:, None] * self._z[None, :]), dtype=np.float64)
        full = (values * self._w) @ self._basis.T  # (n, degree + 2)
        a = full[:, : self.degree + 1]
        ks = np.sqrt(np.arange(1, self.degree + 2, dtype=np.float64))
        with np.errstate(divide="ignore", invalid="ignore"):
            b = np.where(s[:, None] > 0, full[:, 1:] * ks / s[:, None], 0.0)
        return np.ascontiguousarray(a), np.ascontiguousarray(b)

    def truncation_error(self, variance: ArrayLike) -> NDArray:
        """Tail ``E[phi(s z)^2] - sum_{k<=K} a_k(s)^2`` per point: bounds the NNGP error of the
        series' truncation. The coefficients' own quadrature over ``nodes`` points adds its error on
        top (tanh, 240 nodes, variance 4.4: ~1e-11, against 300 nodes)."""
        s = np.sqrt(np.maximum(np.asarray(variance, dtype=np.float64).ravel(), 0.0))
        values = np.asarray(self.fn(s[:, None] * self._z[None, :]), dtype=np.float64)
        second_moment = (values**2) @ self._w
        a, _ = self.coefficients(variance)
        return np.maximum(second_moment - (a**2).sum(axis=1), 0.0)

    def to_dict(self) -> dict[str, Any]:
        if self.name not in _NAMED_FUNCTIONS or _NAMED_FUNCTIONS[self.name] is not self.fn:
            raise ValueError(
                f"activation: the custom function {self.name!r} cannot be written to a configuration; "
                f"expected one of the named activations {sorted(ACTIVATIONS)}"
            )
        out: dict[str, Any] = {"name": self.name}
        if self.degree != 64:
            out["degree"] = self.degree
        if self.nodes != 240:
            out["nodes"] = self.nodes
        return out

    def fingerprint_payload(self) -> dict[str, Any]:
        # A user's function is identified by its values on a probe grid, so a changed
        # function can never silently reuse a stored kernel.
        probe = np.linspace(-12.0, 12.0, 1001)
        digest = hashlib.sha256(np.ascontiguousarray(self.fn(probe), dtype=np.float64).tobytes()).hexdigest()
        return {"name": self.name, "degree": self.degree, "nodes": self.nodes, "values": digest[:16]}


def _gelu(x: NDArray) -> NDArray:
    from scipy.special import erf

    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def _sigmoid(x: NDArray) -> NDArray:
    from scipy.special import expit

    return expit(x)


def _softplus(x: NDArray) -> NDArray:
    return np.logaddexp(0.0, x)


def _silu(x: NDArray) -> NDArray:
    return x * _sigmoid(x)


_NAMED_FUNCTIONS: dict[str, Callable[[NDArray], NDArray]] = {
    "tanh": np.tanh,
    "sigmoid": _sigmoid,
    "softplus": _softplus,
    "gelu": _gelu,
    "silu": _silu,
}


#: The parameters each named activation takes (``{"name": ..., parameter: value}``); those of
#: ``two_slope`` are required (without them it would silently be ReLU), the others have defaults.
ACTIVATION_PARAMETERS: dict[str, tuple[str, ...]] = {
    "relu": (),
    "leaky_relu": ("slope",),
    "abs": (),
    "two_slope": ("negative_slope", "positive_slope"),
    "identity": (),
    "step": (),
    "erf": (),
    **dict.fromkeys(_NAMED_FUNCTIONS, ("degree", "nodes")),
}
_REQUIRED = {"two_slope": ("negative_slope", "positive_slope")}


def _real(name: str, key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not math.isfinite(value):
        raise ValueError(f"activation.{key}: expected a finite real number for {name!r}, got {value!r}")
    return float(value)


def _build(name: str, options: Mapping[str, Any]) -> Activation:
    allowed = ACTIVATION_PARAMETERS[name]
    unknown = sorted(set(options) - set(allowed), key=str)
    if unknown:
        expected = f"expected one of {list(allowed)}" if allowed else "it takes no parameters"
        raise ValueError(f"activation.{unknown[0]}: unknown parameter of {name!r}; {expected}")
    missing = [key for key in _REQUIRED.get(name, ()) if key not in options]
    if missing:
        raise ValueError(f"activation.{missing[0]}: required for {name!r} (phi(x) = negative_slope * x for x < 0, "
                         f"positive_slope * x for x > 0); expected both of {list(_REQUIRED[name])}")
    if name == "relu":
        return TwoSlope("relu", 0.0, 1.0)
    if name == "abs":
        return TwoSlope("abs", -1.0, 1.0)
    if name == "identity":
        return TwoSlope("identity", 1.0, 1.0)
    if name == "leaky_relu":
        return TwoSlope("leaky_relu", _real(name, "slope", options.get("slope", 0.01)), 1.0)
    if name == "two_slope":
        return TwoSlope("two_slope", _real(name, "negative_slope", options["negative_slope"]),
                        _real(name, "positive_slope", options["positive_slope"]))
    if name == "step":
        return Step()
    if name == "erf":
        return Erf()
    return Elementwise(fn=_NAMED_FUNCTIONS[name], name=name, **options)


#: Names accepted by :func:`get_activation`.
ACTIVATIONS: tuple[str, ...] = ("relu", "leaky_relu", "abs", "two_slope", "identity", "step", "erf", *_NAMED_FUNCTIONS)


def get_activation(spec: str | Mapping[str, Any] | Activation) -> Activation:
    """Return an :class:`Activation` from a name, a dict (``{"name": ..., options}``) or an instance.

    Raises
    ------
    ValueError
        Unknown name or option.
    TypeError
        ``spec`` of another type.
    """
    if isinstance(spec, Activation):
        return spec
    if isinstance(spec, str):
        name, options = spec, {}
    elif isinstance(spec, Mapping):
        if "name" not in spec:
            raise ValueError(f"activation.name: missing; expected one of {list(ACTIVATIONS)}")
        options = {k: v for k, v in spec.items() if k != "name"}
        name = spec["name"]
    else:
        raise TypeError(f"activation: expected a name, a dict or an Activation, got {type(spec).__name__}")
    if not isinstance(name, str) or name not in ACTIVATIONS:
        raise ValueError(f"activation.name: expected one of {list(ACTIVATIONS)}, got {name!r}")
    return _build(name, options)
