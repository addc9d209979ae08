"""Finite-width Monte Carlo validation of the NNGP kernel (``nngp-dask validate-kernel``).

Random networks of growing width are sampled (:mod:`nngp_dask.validation.finite_width`) and the
covariance of their outputs is compared with :func:`nngp_dask.kernel`. Three numbers per
width tell the story:

``error``
    Relative Frobenius distance between the Monte Carlo output covariance and the kernel,
    ``||C_hat - K||_F / ||K||_F``. By default ``C_hat`` is the mean over networks of each
    network's output covariance with the readout layer integrated out exactly
    (``estimator="readout"``, :func:`~nngp_dask.validation.finite_width.sample_kernels`): the same
    expectation as the raw second moment of the outputs (``estimator="outputs"``), with a
    noise O(1/width) times smaller in variance. Independent of the kernel code.
``noise_floor``
    The Monte Carlo part of that error, ``||stderr||_F / ||K||_F`` from the per-entry
    standard errors: an error at the floor is pure sampling noise.
``bias``
    The finite-width bias ``||E[C_hat] - K||_F / ||K||_F``, which theory puts at O(1/width)
    for depth >= 2 (at depth <= 1 the output covariance is exact at any width). It is far
    below the noise of ``error`` at large widths, so it is measured with a control variate:
    writing ``K_hat^l`` for layer ``l``'s empirical kernel and ``F`` for the NNGP layer map,
    the fluctuations ``eps_l = K_hat^l - F(K_hat^{l-1})`` have conditional mean zero, and
    subtracting their linear propagation to the output, ``sum_l J_l eps_l`` (``J_l`` the
    Jacobian of ``F`` composed from layer ``l`` to ``L`` at the infinite-width kernels, by
    central differences), leaves an estimator with the same mean and O(1/width) rather than
    O(1/sqrt(width)) fluctuations. The O(1/width) slope is then visible at every width with
    a thousand networks.

``z`` (the kernel check)
    The control variate's mean is zero exactly when the kernel code's layer map equals the
    true conditional expectation, whatever the width; its largest standardised entry is
    reported per width. ``|z|`` of a few is sampling noise; a wrong dual kernel shows as a
    ``z`` that grows like the square root of the number of networks (``consistent`` is
    ``max |z| < 6``).

Fitted log-log slopes: the error against width (about -1 where the bias dominates, -1/2 where
the readout estimator's noise does), the bias against width (about -1) and, at the largest
width, the error against the number of networks (about -1/2, from disjoint blocks).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from ..kernels import Architecture, check_inputs, kernel
from .finite_width import simulate

__all__ = [
    "LogLogFit",
    "ValidationResult",
    "validate_kernel",
    "default_inputs",
    "layer_map",
    "ESTIMATORS",
]

ESTIMATORS: tuple[str, ...] = ("readout", "outputs")


# --------------------------------------------------------------------------------------------
# Result


@dataclass(frozen=True)
class LogLogFit:
    """``log y = slope * log x + intercept`` fitted by least squares over ``points`` points."""

    slope: float
    intercept: float
    points: int

    def __call__(self, x: ArrayLike) -> NDArray:
        return np.exp(self.intercept) * np.asarray(x, dtype=np.float64) ** self.slope

    def to_dict(self) -> dict[str, float | int]:
        return {"slope": self.slope, "intercept": self.intercept, "points": self.points}


def _fit(x: Sequence[float], y: Sequence[float]) -> LogLogFit | None:
    xs, ys = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    keep = (xs > 0) & (ys > 0) & np.isfinite(ys)
    if keep.sum() < 2:
        return None
    slope, intercept = np.polyfit(np.log(xs[keep]), np.log(ys[keep]), 1)
    return LogLogFit(float(slope), float(intercept), int(keep.sum()))


def _fmt_fit(fit: LogLogFit | None) -> str:
    return "n/a" if fit is None else f"{fit.slope:+.2f} (over {fit.points} points)"


@dataclass(frozen=True)
class ValidationResult:
    """Outcome of :func:`validate_kernel`; per-width tuples are aligned with ``widths``.

    Attributes
    ----------
    architecture : Architecture
    points, input_dim, seed : int
    estimator : str
        ``"readout"`` or ``"outputs"`` (see the module docstring).
    widths, networks : tuple of int
    errors, noise_floors : tuple of float
        Relative Frobenius error of the Monte Carlo covariance and its noise floor.
    biases, bias_floors : tuple of float
        Control-variate estimate of the relative finite-width bias and its standard error.
    z_max : tuple of float
        Largest standardised entry of the kernel check per width (0 where exact).
    sample_sizes, sample_errors : tuple
        At the largest width: RMS relative error of the mean of disjoint blocks of networks, for
        block sizes ``networks / 8, networks / 16, ...`` (at least 8 blocks each).
    error_fit, bias_fit, sample_fit : LogLogFit or None
        Log-log fits of error vs width (all widths), bias vs width (widths where the bias is
        resolved, above twice its standard error) and error vs number of networks.
    kernel, empirical : ndarray
        The NNGP kernel and the Monte Carlo covariance at the largest width.
    seconds : float
        Wall time.
    """

    architecture: Architecture
    points: int
    input_dim: int
    seed: int
    estimator: str
    widths: tuple[int, ...]
    networks: tuple[int, ...]
    errors: tuple[float, ...]
    noise_floors: tuple[float, ...]
    biases: tuple[float, ...]
    bias_floors: tuple[float, ...]
    z_max: tuple[float, ...]
    sample_sizes: tuple[int, ...]
    sample_errors: tuple[float, ...]
    error_fit: LogLogFit | None
    bias_fit: LogLogFit | None
    sample_fit: LogLogFit | None
    kernel: NDArray = field(repr=False, compare=False)
    empirical: NDArray = field(repr=False, compare=False)
    seconds: float = field(default=0.0, compare=False)

    @property
    def resolved(self) -> tuple[bool, ...]:
        """Per width: is the finite-width bias resolved (above twice its standard error)?"""
        return tuple(b > 2 * f and b > 1e-12 for b, f in zip(self.biases, self.bias_floors))

    @property
    def bias_coefficient(self) -> float | None:
        """Median of ``bias * width`` over resolved widths: the ``c`` of ``bias ~ c / width``."""
        vals = [b * w for b, w, r in zip(self.biases, self.widths, self.resolved) if r]
        return float(np.median(vals)) if vals else None

    @property
    def max_z(self) -> float:
        """Largest ``|z|`` of the kernel check over all widths."""
        return float(max(self.z_max, default=0.0))

    @property
    def consistent(self) -> bool:
        """The kernel agrees with the finite networks: every ``|z| < 6`` (a correct kernel
        exceeds it with probability about 2e-9 per entry for Gaussian statistics; the margin
        covers the heavier tails of the narrowest widths)."""
        return self.max_z < 6.0

    def table(self) -> str:
        """Human-readable report: one row per width, then the fitted slopes."""
        arch = self.architecture
        lines = [
            f"NNGP kernel vs finite-width networks: {arch!r}",
            (f"{self.points} inputs in {self.input_dim} dimensions, seed {self.seed}, "
             f"estimator {self.estimator!r}, {self.seconds:.1f} s"),
            "",
            (f"{'width':>7} {'networks':>9} {'rel.error':>10} {'noise floor':>11} {'err/floor':>9} "
             f"{'bias':>10} {'bias s.e.':>10} {'bias*width':>10} {'max|z|':>7}"),
        ]
        for i, w in enumerate(self.widths):
            err, fl, b, bf = self.errors[i], self.noise_floors[i], self.biases[i], self.bias_floors[i]
            ratio = err / fl if fl > 0 else float("nan")
            mark = "" if self.resolved[i] else " (unresolved)"
            lines.append(
                f"{w:>7d} {self.networks[i]:>9d} {err:>10.3e} {fl:>11.3e} {ratio:>9.2f} "
                f"{b:>10.3e} {bf:>10.3e} {b * w:>10.3f} {self.z_max[i]:>7.2f}{mark}"
            )
        lines += ["", f"RMS error vs networks at width {self.widths[-1]}: " + "  ".join(
            f"{m}: {e:.2e}" for m, e in zip(self.sample_sizes, self.sample_errors))]
        lines += ["", *self.slope_lines()]
        return "\n".join(lines)

    def slope_lines(self) -> list[str]:
        """The fitted slopes and the verdict, one line each."""
        c = self.bias_coefficient
        return [
            (f"slope of error vs width:    {_fmt_fit(self.error_fit)}  "
             "(-1 where the O(1/width) bias dominates, -1/2 where sampling noise does)"),
            f"slope of bias vs width:     {_fmt_fit(self.bias_fit)}  (theory: -1)"
            + ("" if c is None else f", bias ~ {c:.3g} / width"),
            f"slope of error vs networks: {_fmt_fit(self.sample_fit)}  (theory: -1/2)",
            f"kernel check: max |z| = {self.max_z:.2f} -> "
            + ("consistent with the finite networks" if self.consistent else "INCONSISTENT"),
        ]

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (kernel matrices as nested lists)."""
        return {
            "architecture": _arch_dict(self.architecture),
            "points": self.points,
            "input_dim": self.input_dim,
            "seed": self.seed,
            "estimator": self.estimator,
            "widths": list(self.widths),
            "networks": list(self.networks),
            "errors": list(self.errors),
            "noise_floors": list(self.noise_floors),
            "biases": list(self.biases),
            "bias_floors": list(self.bias_floors),
            "z_max": list(self.z_max),
            "sample_sizes": list(self.sample_sizes),
            "sample_errors": list(self.sample_errors),
            "error_fit": None if self.error_fit is None else self.error_fit.to_dict(),
            "bias_fit": None if self.bias_fit is None else self.bias_fit.to_dict(),
            "sample_fit": None if self.sample_fit is None else self.sample_fit.to_dict(),
            "bias_coefficient": self.bias_coefficient,
            "max_z": self.max_z,
            "consistent": self.consistent,
            "kernel": np.asarray(self.kernel).tolist(),
            "empirical": np.asarray(self.empirical).tolist(),
            "seconds": self.seconds,
        }


def _arch_dict(arch: Architecture) -> dict[str, Any]:
    try:
        return arch.to_dict()
    except ValueError:  # a user's function: identified by name only
        return {"depth": arch.depth, "activation": {"name": arch.activation.name},
                "weight_var": arch.weight_var, "bias_var": arch.bias_var}


# --------------------------------------------------------------------------------------------
# The NNGP layer map on given kernels, and its Jacobian


def layer_map(arch: Architecture, kernels: ArrayLike, *, chunk_rows: int = 256) -> NDArray:
    """One NNGP layer applied to given kernel matrices: ``F(K) = bias_var + weight_var E[phi(u) phi(u)^T]``,
    ``u ~ N(0, K)``, for each ``K`` in a stack.

    Each ``K`` is realised as the input kernel of synthetic inputs ``x~`` (``n x n``, with
    ``bias_var + weight_var x~ x~^T / n = K``, from an eigendecomposition of ``K - bias_var``,
    negative eigenvalues clipped) and :func:`nngp_dask.kernel` of a one-layer architecture is
    evaluated on a stack of them, ``chunk_rows`` rows at a time (diagonal blocks kept).

    Parameters
    ----------
    arch : Architecture
        Its activation and variances are used (its depth is not).
    kernels : array_like, shape (m, n, n)
        Symmetric, with ``K - bias_var`` positive semi-definite.

    Returns
    -------
    ndarray, shape (m, n, n), float64
    """
    k = np.asarray(kernels, dtype=np.float64)
    m, n = k.shape[0], k.shape[1]
    one = arch.replace(depth=1)
    lam, vec = np.linalg.eigh(k - arch.bias_var)
    xt = vec * np.sqrt(np.maximum(lam, 0.0) * (n / arch.weight_var))[:, None, :]  # (m, n, n)
    per = max(1, chunk_rows // n)
    out = np.empty_like(k)
    for s in range(0, m, per):
        block = xt[s : s + per]
        c = block.shape[0]
        full = kernel(one, block.reshape(c * n, n), dtype="float64").reshape(c, n, c, n)
        out[s : s + c] = full[np.arange(c), :, np.arange(c), :]
    return out


def _upper(n: int) -> tuple[NDArray, NDArray]:
    return np.triu_indices(n)


def _jacobian(arch: Architecture, k: NDArray, rel_step: float = 1e-5) -> NDArray:
    """Jacobian of :func:`layer_map` at ``k`` on upper-triangle coordinates, shape (m, m)."""
    n = k.shape[0]
    iu, ju = _upper(n)
    m = iu.size
    h = rel_step * float(np.mean(np.abs(np.diag(k)))) or rel_step
    pert = np.zeros((2 * m, n, n))
    pert[np.arange(m), iu, ju] = h
    pert[np.arange(m), ju, iu] = h
    pert[m:] = -pert[:m]
    f = layer_map(arch, k[None] + pert)
    return ((f[:m] - f[m:])[:, iu, ju] / (2 * h)).T


# --------------------------------------------------------------------------------------------
# Validation


def default_inputs(points: int = 4, dim: int = 8, *, seed: int = 0, shared: float = 0.6) -> NDArray:
    """Deterministic test inputs with moderate correlations: ``shared * common + sqrt(1 - shared^2) * own``
    for Gaussian vectors ``common`` and ``own``, each row scaled to squared norm ``dim``."""
    if isinstance(points, bool) or not isinstance(points, (int, np.integer)) or points < 1:
        raise ValueError(f"points: expected an integer >= 1, got {points!r}")
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
        raise ValueError(f"dim: expected an integer >= 1, got {dim!r}")
    rng = np.random.default_rng([seed, 7919])
    x = shared * rng.standard_normal(dim) + math.sqrt(1 - shared**2) * rng.standard_normal((points, dim))
    return x * (math.sqrt(dim) / np.linalg.norm(x, axis=1, keepdims=True))


def _default_widths(max_width: int) -> tuple[int, ...]:
    if isinstance(max_width, bool) or not isinstance(max_width, (int, np.integer)) or max_width < 1:
        raise ValueError(f"max_width: expected an integer >= 1, got {max_width!r}")
    ws = [2**k for k in range(2, int(math.log2(max_width)) + 1)]
    return tuple(ws) if ws else (int(max_width),)


def _width_seed(seed: int, width: int) -> int:
    return int(np.random.SeedSequence([seed, width]).generate_state(1)[0])


def _block_errors(samples: NDArray, target: NDArray, norm: float, min_block: int = 4, min_blocks: int = 8):
    """RMS relative error of the mean over disjoint blocks of halving sizes (at least ``min_blocks``
    blocks per size, so that every RMS is an average)."""
    s = samples.shape[0]
    sizes, errs = [], []
    m = s // min_blocks
    while m >= min_block:
        groups = s // m
        means = samples[: groups * m].reshape(groups, m, *samples.shape[1:]).mean(axis=1)
        e = np.linalg.norm((means - target).reshape(groups, -1), axis=1) / norm
        sizes.append(int(m))
        errs.append(float(np.sqrt(np.mean(e**2))))
        m //= 2
    return tuple(sizes[::-1]), tuple(errs[::-1])


def validate_kernel(
    arch: Architecture,
    x: ArrayLike,
    *,
    widths: Sequence[int] | None = None,
    max_width: int = 4096,
    networks: int = 1000,
    seed: int = 0,
    estimator: str = "readout",
    method: str = "auto",
) -> ValidationResult:
    """Compare finite-width networks with the NNGP kernel at widths ``2^k`` up to ``max_width``.

    Parameters
    ----------
    arch : Architecture
    x : array_like, shape (n, d)
        A few inputs (n >= 1; the cost grows like n^2 per network).
    widths : sequence of int, optional
        Default ``4, 8, ..., max_width`` (powers of two).
    max_width : int
        Largest width of the default ladder.
    networks : int
        Random networks per width (>= 16).
    seed : int
        Base seed; each width draws its own independent streams.
    estimator : {"readout", "outputs"}
        How the Monte Carlo covariance behind ``errors`` is formed (module docstring).
    method : {"auto", "projected", "dense"}
        Passed to the sampler (:func:`nngp_dask.validation.sample_outputs`).

    Returns
    -------
    ValidationResult
    """
    t0 = time.perf_counter()
    if not isinstance(arch, Architecture):
        raise TypeError(f"arch: expected an Architecture, got {type(arch).__name__}")
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator: expected one of {list(ESTIMATORS)}, got {estimator!r}")
    if isinstance(networks, bool) or not isinstance(networks, (int, np.integer)) or networks < 16:
        raise ValueError(f"networks: expected an integer >= 16, got {networks!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed: expected an integer >= 0, got {seed!r}")
    x = check_inputs(x, "x").astype(np.float64)
    ws = _default_widths(max_width) if widths is None else tuple(int(w) for w in widths)
    if not ws or any(w < 1 for w in ws) or list(ws) != sorted(set(ws)):
        raise ValueError(f"widths: expected increasing integers >= 1, got {widths!r}")
    depth = arch.depth
    n = x.shape[0]
    iu, ju = _upper(n)
    k_all = np.asarray(kernel(arch, x, dtype="float64", all_depths=True))  # (L + 1, n, n)
    k_out = k_all[depth]
    norm = float(np.linalg.norm(k_out)) or 1.0
    # Jacobians of the composed layer maps, J_l for l = 1..L-1 (J_L = identity).
    jac: dict[int, NDArray] = {}
    acc = np.eye(iu.size)
    for layer in range(depth - 1, 0, -1):
        acc = acc @ _jacobian(arch, k_all[layer])
        jac[layer] = acc

    errors, floors, biases, bias_floors, zs = [], [], [], [], []
    empirical = k_out
    sample_sizes: tuple[int, ...] = ()
    sample_errors: tuple[float, ...] = ()
    for w in ws:
        outs, kh = simulate(arch, x, width=w, networks=int(networks), seed=_width_seed(seed, w), batch=None,
                             dtype=np.float64, method=method, outputs=estimator == "outputs", kernels="all")
        assert kh is not None  # kernels="all"
        last = kh[:, depth]  # (S, n, n): per-network output covariance given the hidden layers
        if estimator == "readout":
            per_net = last
        else:
            assert outs is not None  # outputs=True for this estimator
            per_net = outs[:, :, None] * outs[:, None, :]
        mean = per_net.mean(axis=0)
        se = per_net.std(axis=0, ddof=1) / math.sqrt(networks)
        errors.append(float(np.linalg.norm(mean - k_out) / norm))
        floors.append(float(np.linalg.norm(se) / norm))
        # Control variate: sum_l J_l eps_l with eps_l = K_hat^l - F(K_hat^{l-1}).
        cv = np.zeros((networks, iu.size))
        for layer in range(1, depth + 1):
            prev = k_all[1][None] if layer == 1 else layer_map(arch, kh[:, layer - 1])
            eps = (kh[:, layer] - prev)[:, iu, ju]
            cv += eps if layer == depth else eps @ jac[layer].T
        t = last[:, iu, ju] - cv
        b_vec = t.mean(axis=0) - k_out[iu, ju]
        b_se = t.std(axis=0, ddof=1) / math.sqrt(networks)
        weight = np.where(iu == ju, 1.0, 2.0)  # off-diagonal entries appear twice in the Frobenius norm
        if depth <= 1:  # the output covariance is exact at any width: no bias to estimate
            b_vec, b_se = np.zeros_like(b_vec), np.zeros_like(b_se)
        biases.append(float(np.sqrt(np.sum(weight * b_vec**2)) / norm))
        bias_floors.append(float(np.sqrt(np.sum(weight * b_se**2)) / norm))
        cv_mean = cv.mean(axis=0)
        cv_se = cv.std(axis=0, ddof=1) / math.sqrt(networks)
        with np.errstate(divide="ignore", invalid="ignore"):
            z = np.where(cv_se > 1e-14 * norm, np.abs(cv_mean) / cv_se, 0.0)
        zs.append(float(z.max()) if z.size else 0.0)
        if w == ws[-1]:
            empirical = mean
            sample_sizes, sample_errors = _block_errors(per_net, k_out, norm)

    resolved = [b > 2 * f and b > 1e-12 for b, f in zip(biases, bias_floors)]
    bias_fit = _fit([w for w, r in zip(ws, resolved) if r], [b for b, r in zip(biases, resolved) if r])
    return ValidationResult(
        architecture=arch,
        points=n,
        input_dim=x.shape[1],
        seed=int(seed),
        estimator=estimator,
        widths=ws,
        networks=tuple(int(networks) for _ in ws),
        errors=tuple(errors),
        noise_floors=tuple(floors),
        biases=tuple(biases),
        bias_floors=tuple(bias_floors),
        z_max=tuple(zs),
        sample_sizes=sample_sizes,
        sample_errors=sample_errors,
        error_fit=_fit(ws, errors),
        bias_fit=bias_fit,
        sample_fit=_fit(sample_sizes, sample_errors),
        kernel=k_out,
        empirical=empirical,
        seconds=time.perf_counter() - t0,
    )
