"""Model selection at scale: hyperparameter sweeps that reuse work, and their criteria.

Three pieces of work are shared between the candidates of a grid over
``(weight_var, bias_var, depth, noise)`` (DESIGN.md section 2):

1. the input Gram ``<x, x'>`` (the only GEMM, ``O(n^2 d)``) does not depend on any
   hyperparameter: it is computed **once** (:func:`gram_block`) and every candidate's kernel
   is derived from it by the elementwise recursion (:func:`recurse_gram`);
2. ``K^0 = bias_var + weight_var <x, x'> / d`` depends on ``(weight_var, bias_var)`` only, so
   **one** recursion per pair to the deepest depth yields every depth ``0..L`` on the way
   (``all_depths``): the recursion cost of a depth sweep is that of its deepest member;
3. the noise needs no new kernel: one Cholesky factorisation per noise, or one
   eigendecomposition ``K = U diag(lambda) U^T`` that gives every noise's solve, predictive
   variance and ``log det(K + noise I) = sum log(lambda + noise)`` (chosen when the grid has
   at least :data:`EIGH_MIN_NOISES` noises, where it is cheaper).

Selection criteria (``criterion``): the validation ``accuracy`` (classification as regression
on one-hot targets, Lee et al. 2018), ``rmse`` or ``nlpd`` (Gaussian negative log predictive
density) on a held-out split, or the training set's log marginal likelihood
(``marginal_likelihood``; Rasmussen & Williams 2006, eq. 2.30): exact from the Cholesky
factor (or the eigenvalues) for ``n <= exact_max_n``, above it the data-fit term from CG and
``log det`` from stochastic Lanczos quadrature (:func:`nngp_dask.slq.slq_logdet`) with its
standard error (column ``lml_stderr``).

Everything here is in memory (``n`` up to ~20k on a 24 GiB machine in float32). The same
primitives work per tile: :func:`gram_block` / :func:`sweep_kernels` accept a row block and a
column block, and the per-point diagonals depend only on each point, so a tiled sweep computes
one Gram block per tile and every candidate's tile from it.

Examples
--------
>>> import numpy as np
>>> from nngp_dask.sweep import run_sweep
>>> rng = np.random.default_rng(0)
>>> x = rng.standard_normal((120, 5)); y = (x[:, 0] > 0).astype(int)
>>> res = run_sweep(x, y, grid=dict(weight_var=[1.0, 2.0], bias_var=[0.1], depth=[1, 2], noise=[1e-2]),
...                 task="classification", criterion="accuracy", validation_fraction=0.25, seed=0)
>>> len(res.to_rows()), res.best["depth"] in (1, 2), res.best["accuracy"] > 0.5
(4, True, True)
"""

from __future__ import annotations

import itertools
import math
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.linalg
from numpy.typing import ArrayLike, DTypeLike, NDArray

from .architecture import Architecture
from .cg import ConvergenceWarning, batched_cg, cholesky_factor, positive_definite_advice
from .gp import DIRECT_MAX_N
from .inputs import NORMALIZATIONS, InputError, check_inputs, normalize as normalize_rows
from .kernel import check_dtype, check_kind, diagonals_from_norms, input_gram, tile_from_gram
from .metrics import accuracy, nlpd, rmse
from .posterior import posterior_mean, variance_from_cholesky, variance_from_eigh, variance_from_solve
from .preconditioners import AUTO_RANK, make_preconditioner
from .slq import log_marginal_likelihood, slq_logdet
from .targets import TARGETS, encode_labels, one_hot_targets
from .tomlfile import to_toml

__all__ = [
    "CRITERIA",
    "EIGH_MIN_NOISES",
    "GRID_KEYS",
    "SOLVERS",
    "TASKS",
    "GramBlock",
    "MarginalLikelihood",
    "SweepResult",
    "gram_block",
    "marginal_likelihood",
    "recurse_gram",
    "run_sweep",
    "sweep_kernels",
]

TASKS: tuple[str, ...] = ("classification", "regression")
#: criterion -> True when larger is better
CRITERIA: dict[str, bool] = {"accuracy": True, "rmse": False, "nlpd": False, "marginal_likelihood": True}
SOLVERS: tuple[str, ...] = ("auto", "cholesky", "eigh", "cg")
GRID_KEYS: tuple[str, ...] = ("weight_var", "bias_var", "depth", "noise")
#: defaults of grid keys left out (those of the pipeline schema)
GRID_DEFAULTS: dict[str, tuple] = {"weight_var": (1.6,), "bias_var": (0.1,), "depth": (3,), "noise": (1e-2,)}
#: ``solver="auto"`` uses one eigendecomposition instead of one Cholesky per noise from this
#: many noises on (an ``eigh`` costs about 8-10 Cholesky factorisations on this machine).
EIGH_MIN_NOISES = 8
#: test points per batched CG solve for predictive variances (CG path)
_VAR_BATCH = 256


# ---------------------------------------------------------------------------------------------
# kernels from a precomputed Gram
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GramBlock:
    """The raw inner products of two blocks of inputs, shared by every candidate.

    Attributes
    ----------
    gram : ndarray, shape (m, n)
        ``x_rows @ x_cols.T`` in the storage dtype; when ``symmetric`` only the upper triangle
        is valid (one SYRK), as in :func:`nngp_dask.kernel.tile`.
    sqnorm_rows, sqnorm_cols : ndarray, shape (m,) and (n,), float64
        ``<x_i, x_i>``, from which every candidate's per-layer diagonals follow in ``O(n L)``.
    features : int
        ``d``, the input dimension (``K^0 = bias_var + weight_var <x, x'> / d``).
    symmetric : bool
        Rows and columns are the same block.
    """

    gram: NDArray
    sqnorm_rows: NDArray[np.float64]
    sqnorm_cols: NDArray[np.float64]
    features: int
    symmetric: bool

    @property
    def shape(self) -> tuple[int, int]:
        return self.gram.shape  # type: ignore[return-value]

    @property
    def dtype(self) -> np.dtype:
        return self.gram.dtype


def _sqnorm(x: NDArray) -> NDArray[np.float64]:
    # exactly what nngp_dask.kernel.diagonals computes, so the diagonals agree to the bit
    return np.einsum("ij,ij->i", x, x, dtype=np.float64)


def gram_block(x_rows: ArrayLike, x_cols: ArrayLike | None = None, *, dtype: DTypeLike = "float64") -> GramBlock:
    """The input Gram of a block (one GEMM, or one SYRK when ``x_cols`` is None).

    Parameters
    ----------
    x_rows : array_like, shape (m, d)
        Inputs, already normalised.
    x_cols : array_like, shape (n, d), optional
        Defaults to ``x_rows`` (symmetric block).
    dtype : {"float32", "float64"}
        Precision of the GEMM and of every kernel derived from it.

    Returns
    -------
    GramBlock
    """
    dt = check_dtype(dtype)
    a = check_inputs(x_rows, "x_rows")
    if x_cols is None:
        s = _sqnorm(a)
        return GramBlock(input_gram(a, a, dt, True), s, s, a.shape[1], True)
    b = check_inputs(x_cols, "x_cols", features=a.shape[1])
    return GramBlock(input_gram(a, b, dt, False), _sqnorm(a), _sqnorm(b), a.shape[1], False)


def _point_diagonals(arch: Architecture, sqnorm: NDArray, d: int, kind: str) -> tuple[NDArray, NDArray]:
    """(NNGP diagonals (L + 1, n) that the recursion needs, prior diagonals of ``kind``)."""
    k = diagonals_from_norms(arch, sqnorm, d)
    return k, (k if kind == "nngp" else diagonals_from_norms(arch, sqnorm, d, kind=kind))


def recurse_gram(arch: Architecture, block: GramBlock, *, kind: str = "nngp", all_depths: bool = False) -> NDArray:
    """One candidate's kernel block from a precomputed Gram: the recursion only, no GEMM.

    Equals ``nngp_dask.kernel.tile(arch, x_rows, x_cols, ...)`` (same Gram, same compiled
    recursion, same diagonals) while leaving ``block.gram`` untouched for the next candidate.

    Parameters
    ----------
    arch : Architecture
    block : GramBlock
        From :func:`gram_block`; its dtype is the output dtype.
    kind : {"nngp", "ntk"}
    all_depths : bool
        Return every depth ``0..arch.depth``, shape (L + 1, m, n), from this one pass.

    Returns
    -------
    ndarray, shape (m, n) or (L + 1, m, n)
    """
    check_kind(kind, arch)
    d = block.features
    diag_rows, _ = _point_diagonals(arch, block.sqnorm_rows, d, "nngp")
    diag_cols = diag_rows if block.symmetric else _point_diagonals(arch, block.sqnorm_cols, d, "nngp")[0]
    return tile_from_gram(arch, block.gram, diag_rows, diag_cols, features=d, kind=kind, all_depths=all_depths,
                          symmetric=block.symmetric)


def _depth_kernels(arch_max: Architecture, block: GramBlock, depths: Sequence[int], kind: str, stacked: bool
                   ) -> Iterator[tuple[int, NDArray]]:
    """``(depth, K)`` for each requested depth: one all-depths recursion (``stacked``), or one
    recursion per depth when the stack would not fit in memory (still no GEMM)."""
    if stacked:
        stack = recurse_gram(arch_max, block, kind=kind, all_depths=True)
        for depth in depths:
            yield depth, stack[depth]
    else:
        for depth in depths:
            yield depth, recurse_gram(arch_max.replace(depth=depth), block, kind=kind)


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
    grid = _check_grid({"weight_var": weight_var, "bias_var": bias_var, "depth": depth})
    block = gram_block(x_rows, x_cols, dtype=dtype)
    depths = sorted(grid["depth"])
    for wv, bv in itertools.product(grid["weight_var"], grid["bias_var"]):
        arch_max = Architecture(max(depths), activation, wv, bv)
        check_kind(kind, arch_max)
        for l, k in _depth_kernels(arch_max, block, depths, kind, True):
            yield arch_max.replace(depth=l), k


# ---------------------------------------------------------------------------------------------
# the grid
# ---------------------------------------------------------------------------------------------


def _as_values(key: str, value: Any) -> tuple:
    if isinstance(value, (str, bytes, Mapping)):
        raise TypeError(f"grid.{key}: expected a number or a list of numbers, got {value!r}")
    values = tuple(np.asarray(value).ravel().tolist()) if isinstance(value, (Sequence, np.ndarray)) else (value,)
    if not values:
        raise ValueError(f"grid.{key}: expected at least one value, got an empty list")
    return tuple(dict.fromkeys(values))  # drop repeats, keep order


def _check_grid(grid: Mapping[str, Any], keys: Sequence[str] = GRID_KEYS) -> dict[str, tuple]:
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


# ---------------------------------------------------------------------------------------------
# solving one kernel for every noise
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MarginalLikelihood:
    """``log p(Y | X)`` summed over output columns, with how it was computed.

    Attributes
    ----------
    value : float
    stderr : float
        Standard error of the SLQ estimate (``k/2`` times that of ``log det``); 0 when exact.
    method : {"exact", "slq"}
    logdet, logdet_stderr : float
        ``log det(K + noise I)`` and its standard error.
    """

    value: float
    stderr: float
    method: str
    logdet: float
    logdet_stderr: float


def _float64(k: NDArray) -> NDArray[np.float64]:
    return np.asarray(k, dtype=np.float64)


def _matmat(k: NDArray, noise: float):
    """``V -> (K + noise I) V`` in the kernel's own precision (no float64 copy of a float32 K)."""
    if k.dtype == np.float32:
        def matmat(v: NDArray) -> NDArray:
            return (k @ v.astype(np.float32)).astype(np.float64) + noise * v
    else:
        def matmat(v: NDArray) -> NDArray:
            return k @ v + noise * v
    return matmat


def _cg_preconditioner(k: NDArray, noise: float):
    n = k.shape[0]
    # K is symmetric: rows are columns, and rows are contiguous
    return make_preconditioner("auto", diag=_float64(np.diagonal(k)), column_fn=lambda idx: _float64(k[idx]).T,
                               noise=max(noise, 1e-12), rank=min(n, AUTO_RANK))


def _solve_exact_cholesky(k: NDArray, y: NDArray, noise: float):
    """``(factor, alpha, log det(K + noise I))`` from the one dense Cholesky."""
    factor = cholesky_factor(k, noise)
    alpha = scipy.linalg.cho_solve(factor, y, check_finite=False)
    logdet = float(2.0 * np.sum(np.log(np.diag(factor[0]))))
    return factor, alpha, logdet


def _mean_diag(k: NDArray) -> float:
    return float(np.mean(np.diagonal(k), dtype=np.float64))


def marginal_likelihood(
    k: ArrayLike,
    y: ArrayLike,
    noise: float,
    *,
    method: str = "auto",
    exact_max_n: int = DIRECT_MAX_N,
    tol: float = 1e-8,
    num_probes: int = 16,
    lanczos_steps: int = 50,
    seed: int | None = 0,
) -> MarginalLikelihood:
    """Log marginal likelihood of a GP with kernel matrix ``k`` (Rasmussen & Williams eq. 2.30).

    Parameters
    ----------
    k : array_like, shape (n, n)
        Kernel matrix (float32 or float64; float32 is multiplied in float32 by SLQ and CG).
    y : array_like, shape (n,) or (n, c)
        Targets; the columns are independent outputs sharing the kernel.
    noise : float
        Added to the diagonal.
    method : {"auto", "exact", "slq"}
        ``"auto"``: exact (Cholesky) for ``n <= exact_max_n``, else SLQ for ``log det`` and
        preconditioned CG (``tol``) for the data-fit term ``y^T (K + noise I)^{-1} y``.
    num_probes, lanczos_steps, seed
        SLQ settings (:func:`nngp_dask.slq.slq_logdet`).

    Returns
    -------
    MarginalLikelihood

    Raises
    ------
    numpy.linalg.LinAlgError
        (exact) when ``K + noise I`` is not positive definite, with the advice to raise the noise.
    """
    if method not in ("auto", "exact", "slq"):
        raise ValueError(f"method: expected 'auto', 'exact' or 'slq', got {method!r}")
    k_arr = np.asarray(k)
    y_arr = np.asarray(y, dtype=np.float64)
    y2 = y_arr.reshape(y_arr.shape[0], -1)
    n = k_arr.shape[0]
    if method == "auto":
        method = "exact" if n <= exact_max_n else "slq"
    if method == "exact":
        factor = cholesky_factor(k_arr, noise)
        alpha = scipy.linalg.cho_solve(factor, y2, check_finite=False)
        logdet = float(2.0 * np.sum(np.log(np.diag(factor[0]))))
        return MarginalLikelihood(log_marginal_likelihood(y2, alpha, logdet), 0.0, "exact", logdet, 0.0)
    matmat = _matmat(k_arr, float(noise))
    res = batched_cg(matmat, y2, tol=tol, preconditioner=_cg_preconditioner(k_arr, float(noise)))
    est = slq_logdet(matmat, n, num_probes=num_probes, lanczos_steps=lanczos_steps, seed=seed)
    value = log_marginal_likelihood(y2, res.x, est.logdet)
    return MarginalLikelihood(value, 0.5 * y2.shape[1] * est.stderr, "slq", est.logdet, est.stderr)


@dataclass
class _Problem:
    """The fixed data of a sweep: fit targets, validation targets, what to compute."""

    y_fit: NDArray[np.float64]  # (n_fit, c)
    y_val: NDArray[np.float64] | None  # (n_val, c), encoded
    labels_val: NDArray[np.intp] | None  # classification: class index of each validation point (-1: unseen)
    need_var: bool  # NLPD
    need_ml_cg: bool  # SLQ on the CG path
    tol: float
    num_probes: int
    lanczos_steps: int
    seed: int | None


def _metrics(pred: NDArray | None, var_f: NDArray | None, noise: float, prob: _Problem) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if pred is None or prob.y_val is None:
        return out
    if prob.labels_val is not None:
        out["accuracy"] = accuracy(prob.labels_val, np.argmax(pred, axis=1))
    out["rmse"] = rmse(prob.y_val, pred)
    if var_f is not None:
        out["nlpd"] = nlpd(prob.y_val, pred, var_f[:, None] + noise)
    return out


def _evaluate(k_ff: NDArray, k_vf: NDArray | None, prior_v: NDArray | None, noises: Sequence[float],
              method: str, prob: _Problem) -> list[dict[str, Any]]:
    """Metrics and marginal likelihood of one kernel for every noise."""
    y = prob.y_fit
    c = y.shape[1]
    rows: list[dict[str, Any]] = []
    if method == "eigh":
        try:
            lam, u = scipy.linalg.eigh(_float64(k_ff), check_finite=False)
        except (np.linalg.LinAlgError, ValueError) as exc:
            return [{"error": f"eigh failed: {exc}"} for _ in noises]
        uty = u.T @ y
        kvu = _float64(k_vf) @ u if k_vf is not None else None
        for noise in noises:
            shifted = lam + noise
            if shifted.min() <= 0:
                rows.append({"error": positive_definite_advice(
                    noise, f"the smallest eigenvalue of k is {float(lam.min()):.3g}", mean_diag=_mean_diag(k_ff))})
                continue
            w = 1.0 / shifted
            alpha = u @ (w[:, None] * uty)
            row = {"log_marginal_likelihood": log_marginal_likelihood(y, alpha, float(np.sum(np.log(shifted)))),
                   "lml_stderr": 0.0, "lml_method": "exact"}
            if kvu is not None:
                pred = posterior_mean(kvu, w[:, None] * uty)  # K(X*, X) U diag(w) U^T y = K(X*, X) alpha
                var = variance_from_eigh(prior_v, kvu, w) if prob.need_var else None
                row.update(_metrics(pred, var, noise, prob))
            rows.append(row)
        return rows
    if method == "cholesky":
        for noise in noises:
            try:
                factor, alpha, logdet = _solve_exact_cholesky(k_ff, y, noise)
            except ValueError as exc:  # numpy.linalg.LinAlgError with the advice, or a non-finite kernel
                rows.append({"error": str(exc)})
                continue
            row = {"log_marginal_likelihood": log_marginal_likelihood(y, alpha, logdet), "lml_stderr": 0.0,
                   "lml_method": "exact"}
            if k_vf is not None:
                kv = _float64(k_vf)
                pred = posterior_mean(kv, alpha)
                var = variance_from_cholesky(prior_v, kv.T, factor[0]) if prob.need_var else None
                row.update(_metrics(pred, var, noise, prob))
            rows.append(row)
        return rows
    # CG (+ SLQ): nothing dense beyond the kernel itself
    n = k_ff.shape[0]
    for noise in noises:
        matmat = _matmat(k_ff, noise)
        row: dict[str, Any] = {}
        try:
            pre = _cg_preconditioner(k_ff, noise)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                res = batched_cg(matmat, y, tol=prob.tol, preconditioner=pre)
            row["converged"] = bool(res.converged)
            row["cg_iterations"] = int(res.iterations)
            if prob.need_ml_cg:
                est = slq_logdet(matmat, n, num_probes=prob.num_probes, lanczos_steps=prob.lanczos_steps,
                                 seed=prob.seed)
                row.update(log_marginal_likelihood=log_marginal_likelihood(y, res.x, est.logdet),
                           lml_stderr=0.5 * c * est.stderr, lml_method="slq")
            if k_vf is not None:
                pred = posterior_mean(k_vf, res.x)
                var = None
                if prob.need_var:
                    var = np.empty(k_vf.shape[0])
                    for start in range(0, k_vf.shape[0], _VAR_BATCH):
                        kb = _float64(k_vf[start:start + _VAR_BATCH]).T
                        with warnings.catch_warnings():
                            warnings.simplefilter("ignore", ConvergenceWarning)
                            sol = batched_cg(matmat, kb, tol=prob.tol, preconditioner=pre).x
                        var[start:start + _VAR_BATCH] = variance_from_solve(prior_v[start:start + _VAR_BATCH], kb,
                                                                            sol)
                row.update(_metrics(pred, var, noise, prob))
        except ValueError as exc:  # SLQ / preconditioner: not positive definite
            row = {"error": positive_definite_advice(noise, f"CG or SLQ failed ({exc})", mean_diag=_mean_diag(k_ff))}
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------------------------

_COLUMNS = ("weight_var", "bias_var", "depth", "noise", "noise_abs", "accuracy", "rmse", "nlpd",
            "log_marginal_likelihood", "lml_stderr", "lml_method", "solver", "converged", "cg_iterations",
            "error")
_CRITERION_COLUMN = {"accuracy": "accuracy", "rmse": "rmse", "nlpd": "nlpd",
                     "marginal_likelihood": "log_marginal_likelihood"}


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


@dataclass(frozen=True)
class SweepResult:
    """The outcome of :func:`run_sweep`: one row per candidate and the chosen one.

    Attributes
    ----------
    rows : tuple of dict
        Per candidate (grid order: weight_var, bias_var, depth, noise): the hyperparameters,
        ``noise_abs`` (the noise added to the diagonal), the validation metrics
        (``accuracy``, ``rmse``, ``nlpd``; None when not computed), ``log_marginal_likelihood``
        of the fit split with ``lml_stderr`` and ``lml_method`` ("exact" or "slq"), the
        ``solver``, CG ``converged``/``cg_iterations``, and ``error`` (a candidate whose
        ``K + noise I`` is not positive definite is kept, with the advice, and never chosen).
    criterion, task : str
    best_index : int or None
        Row of the chosen candidate (None when every candidate failed).
    timings : dict
        Seconds spent on the Gram (``gram_s``), the recursions (``recursion_s``), the solves
        (``solve_s``) and in all (``total_s``), and how many GEMMs and recursions ran.
    settings : dict
        activation, kind, normalize, dtype, relative_noise, targets, n_fit, n_val, classes, ...
    fit_index, val_index : ndarray or None
        Rows of ``x_train`` used to fit and to validate (None with an explicit ``x_val``).
    """

    rows: tuple[dict[str, Any], ...]
    criterion: str
    task: str
    best_index: int | None
    grid: dict[str, tuple]
    timings: dict[str, Any]
    settings: dict[str, Any]
    fit_index: NDArray[np.intp] | None = None
    val_index: NDArray[np.intp] | None = None

    @property
    def criterion_column(self) -> str:
        return _CRITERION_COLUMN[self.criterion]

    @property
    def best(self) -> dict[str, Any]:
        """The chosen candidate's row (a copy)."""
        if self.best_index is None:
            errors = {r.get("error") for r in self.rows}
            raise ValueError(f"sweep: no candidate could be evaluated; first error: {min(map(str, errors))}")
        return dict(self.rows[self.best_index])

    def to_rows(self) -> list[dict[str, Any]]:
        """Every candidate as a plain dict (copies), in grid order."""
        return [dict(r) for r in self.rows]

    def best_architecture(self) -> Architecture:
        b = self.best
        return Architecture(b["depth"], self.settings["activation"], b["weight_var"], b["bias_var"])

    def table(self, *, sort: bool = False, top: int | None = None) -> str:
        """A fixed-width text table; the chosen candidate is marked ``*``.

        Parameters
        ----------
        sort : bool
            Best first (by the criterion) instead of grid order.
        top : int, optional
            Only this many rows.
        """
        order = list(range(len(self.rows)))
        if sort:
            order = self._ranking()
            order += [i for i in range(len(self.rows)) if i not in order]
        if top is not None:
            order = order[:top]
        cols = [c for c in _COLUMNS if any(self.rows[i].get(c) is not None for i in range(len(self.rows)))]
        if not self.settings.get("relative_noise"):
            cols = [c for c in cols if c != "noise_abs"]
        body = [[("*" if i == self.best_index else "")] + [_fmt(self.rows[i].get(c)) for c in cols] for i in order]
        header = [""] + cols
        widths = [max(len(h), *(len(r[j]) for r in body)) if body else len(h) for j, h in enumerate(header)]
        widths[-1] = len(header[-1]) if cols and cols[-1] == "error" else widths[-1]  # errors run on
        fmt_row = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
        title = (f"criterion: {self.criterion} ({'max' if CRITERIA[self.criterion] else 'min'}), "
                 f"task: {self.task}, n_fit={self.settings['n_fit']}, n_val={self.settings['n_val']}")
        lines = [title, fmt_row(header), fmt_row(["-" * w for w in widths])]
        lines += [fmt_row(r) for r in body]
        return "\n".join(lines)

    def _ranking(self) -> list[int]:
        col = self.criterion_column
        sign = -1.0 if CRITERIA[self.criterion] else 1.0
        ok = [i for i, r in enumerate(self.rows)
              if r.get(col) is not None and math.isfinite(r[col]) and not r.get("error")]

        def key(i: int):
            r = self.rows[i]
            tie = r.get("rmse") if self.criterion == "accuracy" and r.get("rmse") is not None else 0.0
            return (sign * r[col], tie, i)

        return sorted(ok, key=key)

    def __str__(self) -> str:
        return self.table()

    def plot(self, path: str | Path, *, title: str | None = None) -> Path:
        """Criterion over the grid: one panel per ``bias_var``, one line per depth against
        ``weight_var`` (best over the noises); the chosen candidate starred. Needs matplotlib.

        Returns the PNG's path.
        """
        from .plots import figure, save_figure

        col = self.criterion_column
        larger = CRITERIA[self.criterion]
        bvs, wvs, depths = self.grid["bias_var"], sorted(self.grid["weight_var"]), sorted(self.grid["depth"])
        fig = figure((3.6 * len(bvs) + 0.8, 3.8))
        axes = fig.subplots(1, len(bvs), sharey=True, squeeze=False)[0]
        best = self.rows[self.best_index] if self.best_index is not None else None
        for ax, bv in zip(axes, bvs):
            for depth in depths:
                ys = []
                for wv in wvs:
                    vals = [r[col] for r in self.rows if r["bias_var"] == bv and r["weight_var"] == wv
                            and r["depth"] == depth and r.get(col) is not None and math.isfinite(r[col])
                            and not r.get("error")]
                    ys.append((max(vals) if larger else min(vals)) if vals else np.nan)
                ax.plot(wvs, ys, marker="o", label=f"depth {depth}")
            if best is not None and best["bias_var"] == bv:
                ax.plot([best["weight_var"]], [best[col]], marker="*", markersize=16, color="k", linestyle="none",
                        label="chosen")
            ax.set_title(f"bias_var = {bv:g}")
            ax.set_xlabel("weight_var")
            ax.grid(alpha=0.3)
        axes[0].set_ylabel(f"{col} (best over noise)")
        axes[-1].legend(fontsize=8)
        fig.suptitle(title or f"{self.settings.get('activation_name', '')} sweep: {self.criterion}")
        fig.tight_layout()
        return save_figure(fig, path)

    def best_pipeline_toml(self, template: Mapping[str, Any] | None = None) -> str:
        """A pipeline file (TOML text) with the chosen hyperparameters.

        The template's sections are kept; ``[architecture]`` gets depth, activation,
        weight_var and bias_var, ``[solver]`` the noise actually added to the diagonal
        (``noise_abs``), and, so that the pipeline rebuilds the kernel that was selected,
        ``[data] normalize`` and ``[kernel] kind`` too.
        """
        b = self.best
        data: dict[str, Any] = {}
        for key, value in (template or {}).items():
            data[key] = dict(value) if isinstance(value, Mapping) else value
        act = self.settings["activation"]
        if set(act) != {"name"}:
            raise ValueError(f"activation: the pipeline schema takes an activation name, got {act!r} "
                             "(an activation with options); write [architecture] activation by hand")
        data.setdefault("architecture", {}).update(depth=int(b["depth"]), activation=act["name"],
                                                   weight_var=float(b["weight_var"]),
                                                   bias_var=float(b["bias_var"]))
        data.setdefault("solver", {})["noise"] = float(b["noise_abs"])
        data.setdefault("data", {})["normalize"] = self.settings["normalize"]
        data.setdefault("kernel", {})["kind"] = self.settings["kind"]
        return to_toml(data)


# ---------------------------------------------------------------------------------------------
# the sweep
# ---------------------------------------------------------------------------------------------


def _available_bytes() -> int:
    import psutil  # a dependency of nngp-dask

    return int(psutil.virtual_memory().available)


def _split(n: int, fraction: Any, seed: int | None) -> tuple[NDArray[np.intp], NDArray[np.intp]]:
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float, np.floating)) \
            or not 0.0 <= float(fraction) < 1.0:
        raise ValueError(f"validation_fraction: expected a number in [0, 1), got {fraction!r}")
    n_val = round(float(fraction) * n)
    if fraction > 0:
        n_val = max(n_val, 1)
    if n - n_val < 1:
        raise ValueError(f"validation_fraction: {fraction} leaves no training point of {n}")
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def run_sweep(
    x_train: ArrayLike,
    y_train: ArrayLike,
    *,
    grid: Mapping[str, Any],
    activation: Any = "relu",
    kind: str = "nngp",
    task: str = "classification",
    criterion: str | None = None,
    validation_fraction: float = 0.1,
    x_val: ArrayLike | None = None,
    y_val: ArrayLike | None = None,
    normalize: str = "none",
    relative_noise: bool = False,
    targets: str = "centered",
    dtype: DTypeLike = "float64",
    solver: str = "auto",
    exact_max_n: int = DIRECT_MAX_N,
    tol: float = 1e-5,
    num_probes: int = 16,
    lanczos_steps: int = 50,
    seed: int | None = 0,
    memory_limit: int | None = None,
    progress: bool = False,
) -> SweepResult:
    """Evaluate every ``(weight_var, bias_var, depth, noise)`` of ``grid``, reusing work.

    One Gram of the fit split (and one of validation x fit), one recursion per
    ``(weight_var, bias_var)`` giving every depth, and per kernel one factorisation per noise
    (or one eigendecomposition for all of them).

    Parameters
    ----------
    x_train : array_like, shape (n, d)
    y_train : array_like, shape (n,) (labels for classification) or (n,) / (n, c) (regression)
    grid : dict
        Lists (or single values) under ``weight_var``, ``bias_var``, ``depth``, ``noise``;
        a key left out takes the pipeline default (1.6, 0.1, 3, 0.01).
    activation : str, dict or Activation
    kind : {"nngp", "ntk"}
    task : {"classification", "regression"}
        Classification is regression on one-hot ``targets`` (argmax of the posterior mean).
    criterion : {"accuracy", "rmse", "nlpd", "marginal_likelihood"}, optional
        Default ``"accuracy"`` for classification, ``"rmse"`` for regression. ``nlpd`` uses the
        predictive variance of the latent function plus the noise, averaged over validation
        points and outputs. ``marginal_likelihood`` is that of the fit split (exact for
        ``n_fit <= exact_max_n``, else SLQ with a standard error).
    validation_fraction : float, default 0.1
        Held out of ``x_train`` at random (``seed``) when ``x_val`` is not given; 0 (only
        with ``criterion="marginal_likelihood"``) fits on everything.
    x_val, y_val : array_like, optional
        An explicit validation set (then all of ``x_train`` is fitted).
    normalize : {"none", "unit_norm", "standardize"}
        Per-example normalisation (:func:`nngp_dask.normalize`), applied to both sets.
    relative_noise : bool
        Grid noises are relative to the mean kernel diagonal of each candidate (``noise_abs =
        noise * mean diag K``): comparable across weight/bias variances and depths.
    targets : {"centered", "onehot"}
        Classification targets (:func:`nngp_dask.targets.one_hot_targets`).
    dtype : {"float32", "float64"}
        Kernel precision (solves are float64; CG multiplies a float32 kernel in float32).
    solver : {"auto", "cholesky", "eigh", "cg"}
        ``"auto"``: for ``n_fit <= exact_max_n`` Cholesky per noise, or ``eigh`` when the grid
        has at least :data:`EIGH_MIN_NOISES` noises; above, preconditioned CG (and SLQ when the
        criterion is the marginal likelihood).
    exact_max_n : int
        Size threshold of the exact path (default :data:`nngp_dask.gp.DIRECT_MAX_N`).
    tol : float
        CG relative residual.
    num_probes, lanczos_steps : int
        SLQ settings.
    seed : int or None
        Validation split and SLQ probes.
    memory_limit : int, optional
        Bytes the all-depths kernel stack may take (default half the available memory); above
        it each depth is recursed separately (more recursion, still one Gram).
    progress : bool
        A progress bar over ``(weight_var, bias_var)`` pairs.

    Returns
    -------
    SweepResult

    Raises
    ------
    ValueError, InputError
        Bad settings or data, before any work starts.
    """
    t_start = time.perf_counter()
    if task not in TASKS:
        raise ValueError(f"task: expected one of {list(TASKS)}, got {task!r}")
    if criterion is None:
        criterion = "accuracy" if task == "classification" else "rmse"
    if criterion not in CRITERIA:
        raise ValueError(f"criterion: expected one of {list(CRITERIA)}, got {criterion!r}")
    if criterion == "accuracy" and task != "classification":
        raise ValueError("criterion: 'accuracy' needs task='classification'; expected 'rmse', 'nlpd' or "
                         "'marginal_likelihood' for regression")
    if solver not in SOLVERS:
        raise ValueError(f"solver: expected one of {list(SOLVERS)}, got {solver!r}")
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize: expected one of {list(NORMALIZATIONS)}, got {normalize!r}")
    if targets not in TARGETS:
        raise ValueError(f"targets: expected one of {list(TARGETS)}, got {targets!r}")
    if isinstance(exact_max_n, bool) or not isinstance(exact_max_n, (int, np.integer)) or exact_max_n < 0:
        raise ValueError(f"exact_max_n: expected an integer >= 0, got {exact_max_n!r}")
    dt = check_dtype(dtype)
    g = _check_grid(grid)
    probe = Architecture(max(g["depth"]), activation, g["weight_var"][0], g["bias_var"][0])
    check_kind(kind, probe)

    x = check_inputs(x_train, "x_train")
    y = np.asarray(y_train)
    if y.ndim not in (1, 2) or y.shape[0] != x.shape[0]:
        raise InputError(f"y_train: expected {x.shape[0]} rows (one per input) of shape (n,) or (n, c), "
                         f"got shape {y.shape}")
    fit_index = val_index = None
    if x_val is not None:
        if y_val is None:
            raise ValueError("y_val: expected the validation targets together with x_val, got None")
        xv = check_inputs(x_val, "x_val", features=x.shape[1])
        yv = np.asarray(y_val)
        if yv.shape[0] != xv.shape[0] or yv.ndim != y.ndim:
            raise InputError(f"y_val: expected {xv.shape[0]} rows shaped like y_train, got shape {yv.shape}")
        xf, yf = x, y
    elif y_val is not None:
        raise ValueError("x_val: expected the validation inputs together with y_val, got None")
    else:
        fit_index, val_index = _split(x.shape[0], validation_fraction, seed)
        xf, yf = x[fit_index], y[fit_index]
        xv, yv = (x[val_index], y[val_index]) if val_index.size else (None, None)
    if xv is None and criterion != "marginal_likelihood":
        raise ValueError(f"validation_fraction: criterion {criterion!r} needs a validation set; expected a "
                         "fraction > 0 or x_val/y_val (or criterion='marginal_likelihood')")
    xf = normalize_rows(xf, normalize)
    xv = normalize_rows(xv, normalize) if xv is not None else None

    classes = None
    labels_val = None
    if task == "classification":
        if yf.ndim != 1:
            raise InputError(f"y_train: expected class labels of shape (n,) for classification, got {yf.shape}")
        classes, idx = np.unique(yf, return_inverse=True)
        y_fit = one_hot_targets(idx, classes.size, targets)
        if yv is not None:
            labels_val, y_val_enc = encode_labels(yv, classes, targets)
        else:
            y_val_enc = None
    else:
        if yf.dtype.kind not in "biuf":
            raise InputError(f"y_train: expected numeric targets for regression, got dtype {yf.dtype}")
        y_fit = np.asarray(yf, dtype=np.float64).reshape(yf.shape[0], -1)
        y_val_enc = np.asarray(yv, dtype=np.float64).reshape(yv.shape[0], -1) if yv is not None else None
    if not np.all(np.isfinite(y_fit)) or (y_val_enc is not None and not np.all(np.isfinite(y_val_enc))):
        raise InputError("y_train: expected finite targets, got NaN or Inf")

    n_fit, n_val = xf.shape[0], (xv.shape[0] if xv is not None else 0)
    exact = n_fit <= exact_max_n
    method = solver
    if solver == "auto":
        method = ("eigh" if len(g["noise"]) >= EIGH_MIN_NOISES else "cholesky") if exact else "cg"
    prob = _Problem(y_fit=y_fit, y_val=y_val_enc, labels_val=labels_val,
                    need_var=xv is not None and (criterion == "nlpd" or (task == "regression" and method != "cg")),
                    need_ml_cg=criterion == "marginal_likelihood", tol=float(tol), num_probes=num_probes,
                    lanczos_steps=lanczos_steps, seed=seed)

    depths = sorted(g["depth"])
    layers = max(depths) + 1
    stack_bytes = layers * (n_fit * n_fit + n_fit * n_val) * dt.itemsize * (2 if kind == "ntk" else 1)
    budget = memory_limit if memory_limit is not None else _available_bytes() // 2
    stacked = stack_bytes <= budget

    timings: dict[str, Any] = {"gram_s": 0.0, "recursion_s": 0.0, "solve_s": 0.0, "grams": 0, "recursions": 0,
                               "stacked": stacked}
    t0 = time.perf_counter()
    block_ff = gram_block(xf, dtype=dt)
    block_vf = gram_block(xv, xf, dtype=dt) if xv is not None else None
    timings["gram_s"] = time.perf_counter() - t0
    timings["grams"] = 1 + (block_vf is not None)

    pairs = list(itertools.product(g["weight_var"], g["bias_var"]))
    by_key: dict[tuple, dict[str, Any]] = {}
    from tqdm.auto import tqdm

    for wv, bv in tqdm(pairs, desc="sweep", unit="pair", disable=not progress):
        arch_max = Architecture(max(depths), activation, wv, bv)
        t0 = time.perf_counter()
        ff = _depth_kernels(arch_max, block_ff, depths, kind, stacked)
        vf = _depth_kernels(arch_max, block_vf, depths, kind, stacked) if block_vf is not None else None
        prior_all = (_point_diagonals(arch_max, block_vf.sqnorm_rows, block_vf.features, kind)[1]
                     if block_vf is not None else None)
        pending = time.perf_counter() - t0
        for depth in depths:
            t0 = time.perf_counter()
            _, k_ff = next(ff)
            k_vf = next(vf)[1] if vf is not None else None
            timings["recursion_s"] += time.perf_counter() - t0 + pending
            pending = 0.0
            t0 = time.perf_counter()
            mean_diag = float(np.mean(np.diagonal(k_ff), dtype=np.float64))
            noises_abs = [nz * mean_diag if relative_noise else nz for nz in g["noise"]]
            results = _evaluate(k_ff, k_vf, prior_all[depth] if prior_all is not None else None, noises_abs,
                                method, prob)
            timings["solve_s"] += time.perf_counter() - t0
            for nz, nz_abs, res in zip(g["noise"], noises_abs, results):
                row = {c: None for c in _COLUMNS}
                row.update(weight_var=wv, bias_var=bv, depth=depth, noise=nz, noise_abs=float(nz_abs),
                           solver=method)
                row.update(res)
                by_key[(wv, bv, depth, nz)] = row
            del k_ff, k_vf
        timings["recursions"] += (1 if stacked else len(depths)) * (1 + (block_vf is not None))
        del ff, vf
    rows = tuple(by_key[key] for key in itertools.product(g["weight_var"], g["bias_var"], g["depth"], g["noise"]))
    timings["total_s"] = time.perf_counter() - t_start
    settings = {
        "activation": probe.activation.to_dict(), "activation_name": probe.activation.name, "kind": kind,
        "normalize": normalize, "dtype": dt.name, "relative_noise": bool(relative_noise), "targets": targets,
        "n_fit": n_fit, "n_val": n_val, "features": x.shape[1], "solver": method, "exact_max_n": int(exact_max_n),
        "classes": classes.tolist() if classes is not None else None, "seed": seed,
    }
    result = SweepResult(rows=rows, criterion=criterion, task=task, best_index=None, grid=g, timings=timings,
                         settings=settings, fit_index=fit_index, val_index=val_index)
    ranking = result._ranking()
    return SweepResult(rows=rows, criterion=criterion, task=task, best_index=ranking[0] if ranking else None, grid=g,
                       timings=timings, settings=settings, fit_index=fit_index, val_index=val_index)
