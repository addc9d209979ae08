"""One kernel solved for every noise of a grid: validation metrics and the log marginal likelihood.

The noise needs no new kernel: one Cholesky factorisation per noise, or one eigendecomposition
that gives every noise's solve, predictive variance and log-determinant (chosen from
:data:`~nngp_dask.select.grids.EIGH_MIN_NOISES` noises on); above ``exact_max_n`` the data-fit
term comes from CG and ``log det`` from stochastic Lanczos quadrature.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.linalg
from numpy.typing import ArrayLike, NDArray

from ..gp import (
    DIRECT_MAX_N,
    accuracy,
    nlpd,
    posterior_mean,
    rmse,
    variance_from_cholesky,
    variance_from_eigh,
    variance_from_solve,
)
from ..linalg import (
    AUTO_RANK,
    ConvergenceWarning,
    batched_cg,
    cholesky_factor,
    log_marginal_likelihood,
    make_preconditioner,
    positive_definite_advice,
    slq_logdet,
)

__all__ = ["MarginalLikelihood", "marginal_likelihood"]

#: test points per batched CG solve for predictive variances (CG path)
_VAR_BATCH = 256


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
        SLQ settings (:func:`nngp_dask.linalg.slq.slq_logdet`).

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
class SweepProblem:
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


def _metrics(pred: NDArray | None, var_f: NDArray | None, noise: float, prob: SweepProblem) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if pred is None or prob.y_val is None:
        return out
    if prob.labels_val is not None:
        out["accuracy"] = accuracy(prob.labels_val, np.argmax(pred, axis=1))
    out["rmse"] = rmse(prob.y_val, pred)
    if var_f is not None:
        out["nlpd"] = nlpd(prob.y_val, pred, var_f[:, None] + noise)
    return out


def evaluate_noises(k_ff: NDArray, k_vf: NDArray | None, prior_v: NDArray | None, noises: Sequence[float],
              method: str, prob: SweepProblem) -> list[dict[str, Any]]:
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
            row: dict[str, Any] = {
                "log_marginal_likelihood": log_marginal_likelihood(y, alpha, float(np.sum(np.log(shifted)))),
                "lml_stderr": 0.0, "lml_method": "exact"}
            if kvu is not None:
                pred = posterior_mean(kvu, w[:, None] * uty)  # K(X*, X) U diag(w) U^T y = K(X*, X) alpha
                var = variance_from_eigh(prior_v, kvu, w) if prob.need_var and prior_v is not None else None
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
                var = (variance_from_cholesky(prior_v, kv.T, factor[0]) if prob.need_var and prior_v is not None
                       else None)
                row.update(_metrics(pred, var, noise, prob))
            rows.append(row)
        return rows
    # CG (+ SLQ): nothing dense beyond the kernel itself
    n = k_ff.shape[0]
    for noise in noises:
        matmat = _matmat(k_ff, noise)
        row = {}
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
                if prob.need_var and prior_v is not None:  # (the sweep passes prior variances when it needs them)
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
