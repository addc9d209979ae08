"""Hyperparameters by maximising the exact log marginal likelihood on an in-memory subset.

The GP covariance of the targets is ``C = s (K~ + r I)`` where ``K~ = K / m`` is the kernel
divided by the mean of its diagonal ``m`` over the subset (so ``r`` is a noise-to-signal ratio
whatever the kernel's scale), ``s`` the amplitude and ``r`` the relative noise. For ``c`` output
columns ``Y`` (n, c) and ``C0 = K~ + r I`` the log marginal likelihood is::

    l(s) = -q / (2 s) - (n c / 2) log s - (c / 2) log det C0 - (n c / 2) log(2 pi),
    q = sum_j y_j^T C0^{-1} y_j.

``dl/ds = q / (2 s^2) - n c / (2 s) = 0`` gives the amplitude in closed form, ``s* = q / (n c)``,
and the profile likelihood::

    l* = -(n c / 2) (1 + log(2 pi) + log s*) - (c / 2) log det C0.

The closed form holds because ``s`` scales the whole covariance, noise included: the noise is
expressed relative to the amplitude. L-BFGS-B (SciPy) maximises ``l*`` over the logs of ``r``,
``weight_var``, ``bias_var`` and, with ARD, the per-feature input variances, from the given
values and ``restarts`` random starts, once per depth of ``depths`` (depth is discrete). By the
envelope theorem ``dl*/dtheta = 1/2 tr(W dC0/dtheta)`` with ``W = A A^T / s* - c C0^{-1}`` and
``A = C0^{-1} Y``; ``dC0/dlog r = r I`` exactly and ``dK/dtheta`` comes from forward differences of
the kernel matrix with a step of 1e-6 in log space (:func:`nngp_dask.kernels.kernel_log_derivatives`;
relative error ~1e-6, checked against differences of the dense likelihood in the tests), so an
evaluation costs one Cholesky factorisation, one inverse and one kernel per parameter. Each depth
starts from the previous depth's optimum (neighbouring depths have similar optima).

In the unscaled kernel's terms the fit is ``C = amplitude (K + noise I)`` with
``noise = r m`` and ``amplitude = s* / m``: the posterior mean ``K (K + noise I)^{-1} y`` does not
depend on the amplitude, so the full-size solve (in memory or out of core) uses ``noise`` and the
stored, unscaled kernel; predictive variances are multiplied by ``amplitude``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.linalg
import scipy.optimize
from numpy.typing import ArrayLike, NDArray

from ..kernels import (
    Architecture,
    KernelOverflowError,
    check_inputs,
    check_kind,
    kernel,
    kernel_log_derivatives,
    log_hyperparameters,
    with_log_hyperparameters,
)
from ..linalg import cholesky_in_place
from ..store import check_store_dtype, unit_roundoff

__all__ = ["FIT_BOUNDS", "FitResult", "fit_hyperparameters", "profile_log_marginal_likelihood", "storage_noise_floor",
           "subset_size"]

#: bounds of the fitted values (relative noise r, weight_var, bias_var, each ARD input variance)
FIT_BOUNDS: dict[str, tuple[float, float]] = {"noise": (1e-6, 10.0), "weight_var": (1e-3, 1e4),
                                              "bias_var": (1e-6, 1e2), "input_weight_var": (1e-4, 1e4)}

#: The relative noise the full-size solve can resolve is bounded below by the storage's rounding: a
#: kernel of n points stored with unit roundoff u perturbs ``K / m`` by a matrix of norm ~ sqrt(n) u
#: (random rounding errors); below it ``K + noise I`` as stored need not be positive definite (CG
#: breaks down). Measured: on kin40k (36,000 points, float32 tiles) a fit that reached r = 1e-6 on
#: its float64 subset made the full-size CG break down.
_ROUNDING_MARGIN = 8.0
#: n x n float64 matrices alive during one evaluation (kernel, factor, inverse, W, two kernels of a difference)
_MATRICES = 7
_LOG_2PI = math.log(2.0 * math.pi)
#: forward-difference step in log space (truncation ~1e-6 relative, rounding ~1e-10)
_FD_STEP = 1e-6
#: L-BFGS-B stops when the likelihood improves by less than this fraction (1e-4 at a value of 100)
_FTOL = 1e-6


@dataclass(frozen=True)
class FitResult:
    """Fitted hyperparameters: the GP is ``amplitude * (K + noise I)`` with ``K`` the kernel of ``architecture``.

    Attributes
    ----------
    architecture : Architecture
        Fitted depth, weight_var, bias_var and (ARD) input_weight_var.
    noise : float
        Noise variance in the unscaled kernel's units: solve ``(K + noise I) alpha = y``.
    amplitude : float
        Multiplies the kernel and the noise: predictive variances are ``amplitude`` times those of
        ``K + noise I`` (the posterior mean does not depend on it).
    log_marginal_likelihood : float
        At the optimum, on the subset, of the targets as given.
    n_subset : int
        Points the likelihood was maximised on.
    per_depth : dict
        Best log marginal likelihood reached at each depth tried.
    evaluations : int
        Likelihood (and gradient) evaluations, over every depth and start.
    seconds : float
    relative_noise, noise_floor : float
        The fitted noise over the kernel's mean diagonal, and the lower bound it was fitted within.
    """

    architecture: Architecture
    noise: float
    amplitude: float
    log_marginal_likelihood: float
    n_subset: int
    per_depth: dict[int, float] = field(default_factory=dict)
    evaluations: int = 0
    seconds: float = 0.0
    relative_noise: float = math.nan
    noise_floor: float = 0.0

    @property
    def noise_at_floor(self) -> bool:
        """Whether the fit stopped at the noise's lower bound (the data would take less noise)."""
        return self.relative_noise <= self.noise_floor * (1 + 1e-6)

    def pipeline_overrides(self) -> dict[str, Any]:
        """``{"section.key": value}`` of a pipeline file running with the fitted values."""
        a = self.architecture
        return {"architecture.depth": a.depth, "architecture.weight_var": a.weight_var,
                "architecture.bias_var": a.bias_var,
                "architecture.input_weight_var": list(a.input_weight_var or ()),
                "solver.noise": self.noise, "solver.amplitude": self.amplitude}

    def summary(self) -> str:
        """A few lines for people: the fitted values and the likelihood per depth."""
        a = self.architecture
        lines = [(f"fitted on {self.n_subset} points in {self.seconds:.1f} s ({self.evaluations} evaluations): "
                 f"log marginal likelihood {self.log_marginal_likelihood:.4f}"),
                 (f"  depth {a.depth}, activation {a.activation.name}, weight_var {a.weight_var:.6g}, "
                 f"bias_var {a.bias_var:.6g}, noise {self.noise:.6g}, amplitude {self.amplitude:.6g}"),
                 # the kernel's own scale is left free (for ReLU it grows like weight_var^depth), so the
                 # noise in its units can read oddly (1e10 x 3e-11 on protein): say it in the targets'
                 (f"  noise variance in the targets' units {self.noise * self.amplitude:.4g} "
                  f"({self.relative_noise:.3g} of the kernel's mean diagonal)")]
        if a.input_weight_var is not None:
            lines.append("  input_weight_var " + ", ".join(f"{v:.4g}" for v in a.input_weight_var))
        lines.append("  per depth: " + ", ".join(f"{d}: {v:.4f}" for d, v in sorted(self.per_depth.items())))
        return "\n".join(lines)


def subset_size(n: int, subset: int | None = None, memory: int | None = None) -> int:
    """Points to fit on: ``min(n, subset)``, and no more than the ``memory`` bytes (the
    :data:`_MATRICES` n x n float64 matrices of one evaluation) allow."""
    size = n if subset is None or subset <= 0 else min(n, int(subset))
    if memory is not None:
        size = min(size, int(math.isqrt(max(int(memory), 0) // (8 * _MATRICES))))
    if size < 2:
        raise ValueError(f"subset: expected at least 2 points to fit on, got {size} (n={n}, subset={subset}, "
                         f"memory={memory})")
    return size


def profile_log_marginal_likelihood(k: NDArray, y: NDArray, r: float, *, gradient: bool = False
                                    ) -> tuple[float, float, NDArray | None]:
    """``(l*, s*, W)`` of ``C0 = k + r I`` for targets ``y`` (n, c) (module docstring); ``W`` only
    with ``gradient``. Raises numpy.linalg.LinAlgError when ``C0`` is not positive definite."""
    n, c = y.shape
    a = k.copy()
    a[np.diag_indices_from(a)] += r
    factor = cholesky_in_place(a), True
    alpha = scipy.linalg.cho_solve(factor, y, check_finite=False)
    q = float(np.sum(y * alpha))
    if not q > 0:
        raise np.linalg.LinAlgError("y^T C0^{-1} y is not positive (all-zero targets?)")
    s = q / (n * c)
    logdet = 2.0 * float(np.sum(np.log(np.diag(factor[0]))))
    value = -0.5 * n * c * (1.0 + _LOG_2PI + math.log(s)) - 0.5 * c * logdet
    if not gradient:
        return value, s, None
    w = scipy.linalg.cho_solve(factor, np.eye(n), check_finite=False)
    w *= -c
    # (alpha / s) is a new buffer: numpy would hand ``alpha @ alpha.T`` to OpenBLAS's threaded syrk,
    # which overruns its buffer at large n (nngp_dask._blas)
    w += (alpha / s) @ alpha.T
    return value, s, w


class _Objective:
    """Negative profile log likelihood and its gradient in ``theta = (log r, log hyperparameters...)``."""

    def __init__(self, arch: Architecture, x: NDArray, y: NDArray, names: tuple[str, ...], kind: str) -> None:
        self.arch, self.x, self.y, self.names, self.kind = arch, x, y, names, kind
        self.evaluations = 0

    def architecture(self, theta: NDArray) -> Architecture:
        return with_log_hyperparameters(self.arch, self.names, theta[1:])

    def scaled_kernel(self, arch: Architecture) -> tuple[NDArray, float]:
        k = kernel(arch, self.x, kind=self.kind, dtype="float64")
        m = float(np.mean(np.diagonal(k)))
        if not (m > 0 and math.isfinite(m)):
            raise KernelOverflowError(f"the kernel's mean diagonal is {m!r}")
        k *= 1.0 / m
        return k, m

    def __call__(self, theta: NDArray) -> tuple[float, NDArray]:
        self.evaluations += 1
        try:
            arch = self.architecture(theta)
            k, m = self.scaled_kernel(arch)
            r = math.exp(theta[0])
            value, _, w = profile_log_marginal_likelihood(k, self.y, r, gradient=True)
            assert w is not None  # asked for with gradient=True
        except (np.linalg.LinAlgError, KernelOverflowError, FloatingPointError):
            # outside the usable region: a large value, and a push towards more noise
            grad = np.zeros_like(theta)
            grad[0] = -1.0
            return 1e10, grad
        grad = np.empty_like(theta)
        grad[0] = 0.5 * r * float(np.trace(w))
        kw = float(np.sum(w * k))
        derivs = kernel_log_derivatives(arch, self.x, self.names, kind=self.kind, step=_FD_STEP, k=k * m)
        for p, dk in enumerate(derivs, start=1):
            # d(K / m) = dK / m - (K / m) d m / m, with m the mean diagonal of K
            dm = float(np.mean(np.diagonal(dk)))
            grad[p] = 0.5 * (float(np.sum(w * dk)) / m - kw * dm / m)
        return -value, -grad


def storage_noise_floor(dtype: Any, n: int) -> float:
    """The smallest relative noise ``r`` (noise over the kernel's mean diagonal) worth fitting when
    the full-size kernel of ``n`` points is stored as ``dtype``: ``8 sqrt(n) u`` with ``u`` its unit
    roundoff (1.2e-4 for float32 tiles of 60,000 points; float64 stays at ``FIT_BOUNDS``' 1e-6; int16
    tiles, whose unit is a level of each tile's range, 3.0e-2).

    Parameters
    ----------
    dtype : {"float32", "float64", "int16"}
    n : int
        Training points of the full-size solve.

    Returns
    -------
    float
    """
    u = unit_roundoff(check_store_dtype(dtype))
    return max(FIT_BOUNDS["noise"][0], _ROUNDING_MARGIN * math.sqrt(max(int(n), 1)) * u)


def _bounds(names: tuple[str, ...], d: int, noise_floor: float) -> list[tuple[float, float]]:
    out = [(max(FIT_BOUNDS["noise"][0], noise_floor), FIT_BOUNDS["noise"][1])]
    for name in names:
        out.extend([FIT_BOUNDS[name]] * (d if name == "input_weight_var" else 1))
    return [(math.log(lo), math.log(hi)) for lo, hi in out]


def _check_depths(depths: Sequence[int] | None, default: int) -> tuple[int, ...]:
    if depths is None:
        return (default,)
    out = tuple(depths)
    if not out or any(isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 0 for d in out):
        raise ValueError(f"depths: expected a non-empty sequence of integers >= 0, got {depths!r}")
    return tuple(int(d) for d in out)


def fit_hyperparameters(
    x: ArrayLike,
    y: ArrayLike,
    *,
    arch: Architecture | None = None,
    noise: float = 1e-2,
    kind: str = "nngp",
    depths: Sequence[int] | None = None,
    ard: bool = False,
    subset: int | None = 2000,
    memory: int | None = None,
    restarts: int = 0,
    seed: int | None = 0,
    maxiter: int = 200,
    noise_floor: float = 0.0,
) -> FitResult:
    """Maximise the exact log marginal likelihood on a random subset (module docstring).

    Parameters
    ----------
    x : array_like, shape (n, d)
        Inputs, already normalised as the kernel will see them.
    y : array_like, shape (n,) or (n, c)
        Targets as the GP will see them (standardise them first: the prior mean is 0).
    arch : Architecture, optional
        Starting point and fixed parts (activation); default ``Architecture(3, "relu", 1.6, 0.1)``.
        A ``bias_var`` of 0 starts from 1e-3 (its log is fitted).
    noise : float
        Starting noise variance in the units of ``arch``'s kernel.
    kind : {"nngp", "ntk"}
    depths : sequence of int, optional
        Depths to try (each optimised separately); default ``arch.depth`` only.
    ard : bool
        Fit one input variance per feature (starting from ``arch.input_weight_var``, else
        ``weight_var`` for every feature).
    subset, memory : int, optional
        At most ``subset`` points (0 or None: all) and at most what ``memory`` bytes hold
        (:func:`subset_size`), drawn at random with ``seed``.
    restarts : int
        Random starts per depth besides the given values (log-uniform within a factor ~20).
    seed : int, optional
    maxiter : int
        L-BFGS-B iterations per start.
    noise_floor : float
        Lower bound of the relative noise ``r`` besides ``FIT_BOUNDS``' (e.g.
        :func:`storage_noise_floor` of the store the full-size solve will read).

    Returns
    -------
    FitResult
    """
    t0 = time.perf_counter()
    xa = check_inputs(x, "x")
    ya = np.asarray(y, dtype=np.float64)
    if ya.ndim not in (1, 2) or ya.shape[0] != xa.shape[0]:
        raise ValueError(f"y: expected shape ({xa.shape[0]},) or ({xa.shape[0]}, c) to match x, got {ya.shape}")
    if not np.all(np.isfinite(ya)):
        raise ValueError("y: expected finite values, got NaN or Inf")
    ya = ya.reshape(ya.shape[0], -1)
    arch = Architecture(3, "relu", 1.6, 0.1) if arch is None else arch
    check_kind(kind, arch)
    if isinstance(restarts, bool) or not isinstance(restarts, (int, np.integer)) or restarts < 0:
        raise ValueError(f"restarts: expected an integer >= 0, got {restarts!r}")
    if not (isinstance(noise, (int, float, np.floating)) and math.isfinite(noise) and noise > 0):
        raise ValueError(f"noise: expected a starting noise > 0, got {noise!r}")
    depths_t = _check_depths(depths, arch.depth)
    n, d = xa.shape
    size = subset_size(n, subset, memory)
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(n, size, replace=False)) if size < n else np.arange(n)
    xs, ys = np.ascontiguousarray(xa[idx], dtype=np.float64), ya[idx]
    start = arch.replace(bias_var=max(arch.bias_var, 1e-3))
    names: tuple[str, ...] = ("weight_var", "bias_var")
    if ard:
        names += ("input_weight_var",)
        start = start.replace(input_weight_var=start.input_weight_var or (start.weight_var,) * d)
    if isinstance(noise_floor, bool) or not (isinstance(noise_floor, (int, float))
                                             and 0 <= noise_floor < FIT_BOUNDS["noise"][1]):
        raise ValueError(f"noise_floor: expected a number in [0, {FIT_BOUNDS['noise'][1]:g}), got {noise_floor!r}")
    bounds = _bounds(names, d, float(noise_floor))
    lo, hi = np.array(bounds).T
    best: tuple[float, NDArray, int] | None = None
    per_depth: dict[int, float] = {}
    evaluations = 0
    warm: NDArray | None = None
    for depth in depths_t:
        obj = _Objective(start.replace(depth=depth), xs, ys, names, kind)
        if warm is None:
            try:
                m0 = obj.scaled_kernel(obj.arch)[1]
            except KernelOverflowError:
                m0 = 1.0
            theta0 = np.concatenate([[math.log(noise / m0)], log_hyperparameters(obj.arch, names)])
        else:
            theta0 = warm
        starts = [np.clip(theta0, lo, hi)]
        starts += [np.clip(theta0 + rng.uniform(-3.0, 3.0, theta0.size), lo, hi) for _ in range(restarts)]
        for th in starts:
            res = scipy.optimize.minimize(obj, th, jac=True, method="L-BFGS-B", bounds=bounds,
                                          options={"maxiter": int(maxiter), "ftol": _FTOL})
            value = -float(res.fun)
            if value > per_depth.get(depth, -math.inf):
                per_depth[depth] = value
                warm = np.asarray(res.x)
            if best is None or value > best[0]:
                best = (value, np.asarray(res.x), depth)
        evaluations += obj.evaluations
    assert best is not None
    value, theta, depth = best
    obj = _Objective(start.replace(depth=depth), xs, ys, names, kind)
    fitted = obj.architecture(theta)
    k, m = obj.scaled_kernel(fitted)
    r = math.exp(theta[0])
    value, s, _ = profile_log_marginal_likelihood(k, ys, r)
    return FitResult(architecture=fitted, noise=r * m, amplitude=s / m, log_marginal_likelihood=value, n_subset=size,
                     per_depth=per_depth, evaluations=evaluations, seconds=time.perf_counter() - t0,
                     relative_noise=r, noise_floor=math.exp(lo[0]))
