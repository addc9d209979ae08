"""Batched and block preconditioned conjugate gradients (the dense Cholesky twin is
:mod:`nngp_dask.linalg.dense`).

The solver is a pure function of a ``matmat`` callable (``V -> A V`` for a block of
vectors) with ``A = K + noise I`` symmetric positive definite; it knows nothing of
tiles, Dask or Zarr. All right-hand sides share one ``matmat`` per iteration; in
:func:`batched_cg` each column has its own step sizes and its own stopping test, converged
columns are frozen and no longer passed to ``matmat`` (a column stops only once its true residual
``b - A x`` confirms the recursive one; that residual rides along in the next iteration's
product, so every iteration is exactly one ``matmat``: out of core, one pass over the
stored kernel). The iterate is an immutable
:class:`CGState` handed to ``callback`` after every iteration, and accepted back
through ``state=`` to resume bit-identically after a crash.

:func:`batched_cg` runs one CG recurrence per column and shares only the product. Block CG
(O'Leary [5]_) searches, at iteration ``i``, the sum of every column's Krylov space, so each
column's error is minimised over ``k`` times as many directions for the same pass over the
kernel. On MNIST's ten one-hot columns that saves 14 % of the iterations with a weak
preconditioner and 5 % with the MNIST pipeline's, at a slightly dearer iteration
(benchmarks/RESULTS.md section 21): worth it where passes are expensive and many.

The directions are A-orthonormalised every iteration through the eigendecomposition of the
small Gram ``P^T A P`` (after scaling it to a unit diagonal), dropping the directions whose
eigenvalue says they depend on the others: the "breakdown-free" block CG of Ji and Li [6]_.
Dependence is the rule, not the exception: zero-mean one-hot targets sum to zero across their
columns, so ten of them span nine directions, and a column that has converged contributes
little that is new. With ``P^T A P = I`` the step is ``alpha = P^T R`` and the next directions
``Z - P (AP)^T Z`` (``Z = M^{-1} R``) are A-orthogonal to these; the older ones are in exact
arithmetic.

Stopping, residual replacement and checkpoints are :func:`batched_cg`'s (one ``matmat`` per
iteration, true residuals riding along in it; :class:`CGState` resumes bit-identically), with
one difference: a column that reaches the tolerance stays in the block until every column has,
because the block's directions serve them all.

References
----------
.. [1] M. R. Hestenes and E. Stiefel, "Methods of conjugate gradients for solving
   linear systems", J. Res. Nat. Bur. Standards 49 (1952).
.. [2] Y. Saad, *Iterative Methods for Sparse Linear Systems*, 2nd ed., SIAM 2003,
   Algorithm 9.1 (preconditioned CG).
.. [3] J. R. Gardner, G. Pleiss, D. Bindel, K. Q. Weinberger, A. G. Wilson,
   "GPyTorch: Blackbox matrix-matrix Gaussian process inference with GPU
   acceleration", NeurIPS 2018 (batched CG with per-column step sizes).
.. [4] H. A. van der Vorst and Q. Ye, "Residual replacement strategies for Krylov subspace
   iterative methods for the convergence of true residuals", SIAM J. Sci. Comput. 22 (2000).
.. [5] D. P. O'Leary, "The block conjugate gradient algorithm and related methods", Linear
   Algebra Appl. 29 (1980).
.. [6] H. Ji and Y. Li, "A breakdown-free block conjugate gradient method", BIT Numer. Math. 57
   (2017).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import scipy.linalg
from numpy.typing import ArrayLike, NDArray

from .cg_state import CGResult, CGState, readonly

__all__ = [
    "DEFLATION_TOL",
    "ConvergenceWarning",
    "batched_cg",
    "block_cg",
    "check_rhs",
    "default_maxiter",
]

Matmat = Callable[[NDArray[np.float64]], ArrayLike]

_ADVICE = (
    "To converge: raise the noise (the jitter added to the kernel diagonal), enlarge the "
    "preconditioner rank (e.g. preconditioner='pivoted_cholesky' with a larger rank), build the "
    "kernel in float64, or raise maxiter."
)


class ConvergenceWarning(UserWarning):
    """CG stopped before every column reached its relative-residual tolerance."""


def default_maxiter(n: int) -> int:
    """Default iteration cap: ``min(10 n, 1000)``.

    In exact arithmetic CG ends in at most ``n`` steps; rounding can need a few more, hence
    ``10 n`` for small problems. For large ``n`` each iteration is a full pass over the
    kernel, so the cap is 1000: a well-preconditioned NNGP solve needs tens to a few hundred.
    """
    return int(min(10 * n, 1000))


def _coldot(a: NDArray, b: NDArray) -> NDArray:
    """Column-wise inner products, shape (k,)."""
    return np.einsum("ij,ij->j", a, b)


def _colnorm(a: NDArray) -> NDArray:
    return np.sqrt(_coldot(a, a))


# --------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------


def check_rhs(b: ArrayLike, name: str = "b") -> NDArray[np.float64]:
    """``b`` as a float64 array of right-hand sides, checked once at the solver's boundary.

    Parameters
    ----------
    b : array_like, shape (n,) or (n, k)
        Real, finite, at least one row.
    name : str
        Names the argument in errors.

    Returns
    -------
    ndarray, float64, the shape of ``b``

    Raises
    ------
    ValueError
        Naming ``name``, what was expected and what was received.
    """
    arr = np.asarray(b)
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"{name}: expected a real numeric array, got dtype {arr.dtype}")
    if arr.ndim not in (1, 2):
        raise ValueError(f"{name}: expected a 1-D (n,) or 2-D (n, k) array, got shape {arr.shape}")
    if arr.shape[0] == 0:
        raise ValueError(f"{name}: expected at least one row, got shape {arr.shape}")
    arr = np.asarray(arr, dtype=np.float64)
    if not np.all(np.isfinite(arr)):
        bad = np.argwhere(~np.isfinite(arr))[0]
        raise ValueError(f"{name}: expected finite values, got {arr[tuple(bad)]} at index {tuple(int(i) for i in bad)}")
    return arr


def _check_tol(tol: Any) -> float:
    if isinstance(tol, bool) or not isinstance(tol, (int, float, np.integer, np.floating)):
        raise ValueError(f"tol: expected a number > 0, got {tol!r}")
    tol = float(tol)
    if not (math.isfinite(tol) and tol > 0):
        raise ValueError(f"tol: expected a finite number > 0, got {tol!r}")
    return tol


def _check_int(name: str, value: Any, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    return int(value)


class _Op:
    """Wraps ``matmat``: float64 in and out, output shape checked."""

    def __init__(self, matmat: Matmat, n: int) -> None:
        if not callable(matmat):
            raise ValueError(f"matmat: expected a callable V (n, k) -> A V (n, k), got {type(matmat).__name__}")
        self.matmat = matmat
        self.n = n

    def __call__(self, v: NDArray) -> NDArray[np.float64]:
        out = np.asarray(self.matmat(v), dtype=np.float64)
        if out.shape != v.shape:
            raise ValueError(f"matmat: expected an output of shape {v.shape} (the input's), got {out.shape}")
        return out


def _precondition(preconditioner: Any, r: NDArray) -> NDArray[np.float64]:
    if preconditioner is None:
        return r.copy()
    out = np.asarray(preconditioner.apply(r), dtype=np.float64)
    if out.shape != r.shape:
        raise ValueError(f"preconditioner: apply() expected to return shape {r.shape}, got {out.shape}")
    return out


# --------------------------------------------------------------------------------------------
# the solver
# --------------------------------------------------------------------------------------------


def _initial_state(op: _Op, b: NDArray, x0: NDArray | None, preconditioner: Any, tol: float,
                   b_norm: NDArray) -> CGState:
    n, k = b.shape
    nonzero = b_norm > 0
    x = np.zeros((n, k))
    r = b.copy()
    if x0 is not None:
        x[:, nonzero] = x0[:, nonzero]
        idx = np.flatnonzero(nonzero & np.any(x != 0, axis=0))
        if idx.size:
            r[:, idx] = b[:, idx] - op(x[:, idx])
            # a guess worse than zero (e.g. a warm start from other targets) is dropped, per column
            worse = idx[_colnorm(r[:, idx]) > b_norm[idx]]
            x[:, worse] = 0.0
            r[:, worse] = b[:, worse]
    safe = np.where(nonzero, b_norm, 1.0)
    res0 = np.where(nonzero, _colnorm(r) / safe, 0.0)
    active = nonzero & (res0 > tol)
    z = np.zeros((n, k))
    idx = np.flatnonzero(active)
    if idx.size:
        z[:, idx] = _precondition(preconditioner, r[:, idx])
    rz = _coldot(r, z)
    return CGState(x=x, r=r, z=z, p=z.copy(), rz=rz, iteration=0, active=active,
                   residuals=res0[None, :], b_norm=b_norm)


def _pending(s: CGState, tol: float) -> NDArray[np.intp]:
    """Active columns whose recursive residual claims convergence: their true residual decides."""
    return np.flatnonzero(s.active & (s.residuals[-1] <= tol))


def _step(op: _Op, b: NDArray, s: CGState, preconditioner: Any, tol: float,
          true_residual_every: int) -> CGState:
    """One CG iteration on the active columns; frozen columns are copied unchanged.

    The true residuals ``b - A x`` that the iteration needs (of the columns whose recursive
    residual claimed convergence in the last iteration, and of every active column on schedule)
    ride along with the search directions in its one product: out of core a product is a pass
    over the stored kernel whatever its width, so a separate product for them would cost a pass.
    A confirmed column stops at its current iterate; the others replace their residual by the true
    one (residual replacement, [4]_) and step.
    """
    idx = np.flatnonzero(s.active)
    x, r, z, p, rz = s.x.copy(), s.r.copy(), s.z.copy(), s.p.copy(), s.rz.copy()
    active = s.active.copy()
    res = s.residuals[-1].copy()
    iteration = s.iteration + 1

    on_schedule = true_residual_every and iteration % true_residual_every == 0
    check = idx if on_schedule else _pending(s, tol)
    p_a = p[:, idx]
    product = op(np.concatenate([p_a, x[:, check]], axis=1) if check.size else p_a)
    ap = product[:, :idx.size]
    if check.size:
        _replace_residuals(b, product[:, idx.size:], check, r, res, active, s.b_norm, tol)
    stepping = active[idx]
    idx, p_a, ap = idx[stepping], p_a[:, stepping], ap[:, stepping]

    pap = _coldot(p_a, ap)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        step = rz[idx] / pap
        x_new = x[:, idx] + step * p_a
        r_new = r[:, idx] - step * ap
    # breakdown (A not positive definite along p, or a non-finite step): freeze the column
    ok = np.isfinite(step) & (pap > 0) & (rz[idx] > 0)
    ok &= np.all(np.isfinite(x_new), axis=0) & np.all(np.isfinite(r_new), axis=0)
    good, bad = idx[ok], idx[~ok]
    x[:, good] = x_new[:, ok]
    r[:, good] = r_new[:, ok]
    active[bad] = False
    # a column whose residual now claims convergence keeps going until the next product confirms
    # it (or not): the recursive residual drifts from b - A x in floating point
    res[good] = _colnorm(r[:, good]) / s.b_norm[good]
    if good.size:
        z_go = _precondition(preconditioner, r[:, good])
        rz_go = _coldot(r[:, good], z_go)
        beta = rz_go / rz[good]
        p[:, good] = z_go + beta * p[:, good]
        z[:, good] = z_go
        rz[good] = rz_go
    residuals = np.concatenate([s.residuals, res[None, :]], axis=0)
    for arr in (x, r, z, p, rz, active, residuals):
        readonly(arr)  # fresh arrays: the state takes them without copying
    return CGState(x=x, r=r, z=z, p=p, rz=rz, iteration=iteration, active=active,
                   residuals=residuals, b_norm=s.b_norm)


def _replace_residuals(b: NDArray, a_x: NDArray, check: NDArray, r: NDArray, res: NDArray, active: NDArray,
                       b_norm: NDArray, tol: float) -> None:
    """Columns ``check`` take their true residual ``b - A x`` (``a_x``: their ``A x``) in ``r`` and
    ``res``, in place; those at the tolerance stop (confirmed), those not finite break down (their
    residual reads ``inf``: not converged, whatever the recursion claimed; no NaN in the history)."""
    r_true = b[:, check] - a_x
    with np.errstate(invalid="ignore", over="ignore"):
        res_true = _colnorm(r_true) / b_norm[check]
    finite = np.isfinite(res_true)
    r[:, check[finite]] = r_true[:, finite]
    res[check] = np.where(finite, res_true, np.inf)
    active[check[~finite]] = False
    active[check[finite & (res_true <= tol)]] = False


def _confirm(op: _Op, b: NDArray, s: CGState, tol: float) -> CGState:
    """At ``maxiter``: the true residuals of the columns whose recursive residual claims
    convergence (one product of their iterates; the iteration count is unchanged)."""
    check = _pending(s, tol)
    if not check.size:
        return s
    r, active, residuals = s.r.copy(), s.active.copy(), s.residuals.copy()
    _replace_residuals(b, op(s.x[:, check]), check, r, residuals[-1], active, s.b_norm, tol)
    for arr in (r, active, residuals):
        readonly(arr)
    return CGState(x=s.x, r=r, z=s.z, p=s.p, rz=s.rz, iteration=s.iteration, active=active,
                   residuals=residuals, b_norm=s.b_norm)


Step = Callable[[_Op, NDArray, CGState, Any, float, int], CGState]


def _run(step: Step, matmat: Matmat, b: ArrayLike, *, tol: float, maxiter: int | None, preconditioner: Any,
         x0: ArrayLike | None, state: CGState | None, callback: Callable[[CGState], Any] | None,
         true_residual_every: int) -> CGResult:
    """The driver of :func:`batched_cg` and :func:`~nngp_dask.linalg.block_cg`: checks the
    arguments, starts (or resumes), calls ``step`` until every column stops or ``maxiter``,
    confirms what claims convergence, and warns about what did not converge."""
    b_arr = check_rhs(b)
    one_d = b_arr.ndim == 1
    b2 = b_arr[:, None] if one_d else b_arr
    n, k = b2.shape
    tol = _check_tol(tol)
    maxiter = default_maxiter(n) if maxiter is None else _check_int("maxiter", maxiter, minimum=0)
    true_residual_every = _check_int("true_residual_every", true_residual_every, minimum=0)
    if preconditioner is not None and not callable(getattr(preconditioner, "apply", None)):
        raise ValueError("preconditioner: expected None or an object with apply(R) -> M^{-1} R, "
                         f"got {type(preconditioner).__name__}")
    if callback is not None and not callable(callback):
        raise ValueError(f"callback: expected a callable or None, got {type(callback).__name__}")
    op = _Op(matmat, n)
    b_norm = _colnorm(b2)

    if state is not None:
        if x0 is not None:
            raise ValueError("x0: expected None when state is given (the state holds the iterate)")
        if not isinstance(state, CGState):
            raise ValueError(f"state: expected a CGState, got {type(state).__name__}")
        if state.shape != (n, k):
            raise ValueError(f"state: expected an iterate of shape {(n, k)} (that of b), got {state.shape}")
        if not np.array_equal(state.b_norm, b_norm):
            raise ValueError("state: expected a state of this right-hand side b, got one made for another b "
                             "(its column norms differ)")
        s = state
    else:
        x0_arr = None
        if x0 is not None:
            x0_arr = check_rhs(x0, "x0")
            if x0_arr.shape != b_arr.shape:
                raise ValueError(f"x0: expected shape {b_arr.shape} (that of b), got {x0_arr.shape}")
            x0_arr = x0_arr[:, None] if one_d else x0_arr
        s = _initial_state(op, b2, x0_arr, preconditioner, tol, b_norm)

    while s.iteration < maxiter and np.any(s.active):
        s = step(op, b2, s, preconditioner, tol, true_residual_every)
        if callback is not None:
            callback(s)
    s = _confirm(op, b2, s, tol)

    converged = s.residuals[-1] <= tol
    result = CGResult(
        x=np.array(s.x[:, 0] if one_d else s.x),  # a writeable copy for the caller
        iterations=s.iteration,
        residuals=s.residuals,
        converged_columns=readonly(converged.copy()),
        tol=tol,
        state=s,
    )
    if not result.converged:
        bad = np.flatnonzero(~converged)
        broke = np.flatnonzero(~converged & ~s.active)
        why = (f"after {s.iteration} iterations (maxiter={maxiter})" if not broke.size else
               f"({broke.size} column(s) broke down: A or the preconditioner is not positive definite "
               "in floating point)")
        warnings.warn(
            f"CG did not converge {why}: {bad.size} of {k} column(s) above tol={tol:g}, worst relative "
            f"residual {float(s.residuals[-1].max()):.3g} (column {int(bad[np.argmax(s.residuals[-1][bad])])}). "
            + _ADVICE,
            ConvergenceWarning,
            stacklevel=3,
        )
    return result


def batched_cg(
    matmat: Matmat,
    b: ArrayLike,
    *,
    tol: float = 1e-5,
    maxiter: int | None = None,
    preconditioner: Any = None,
    x0: ArrayLike | None = None,
    state: CGState | None = None,
    callback: Callable[[CGState], Any] | None = None,
    true_residual_every: int = 50,
) -> CGResult:
    """Solve ``A X = B`` for many right-hand sides at once by preconditioned CG.

    Each column ``j`` runs its own CG recurrence (its own ``alpha_j``, ``beta_j``; [2]_,
    Algorithm 9.1) and all active columns share one ``matmat`` call per iteration ([3]_).
    Column ``j`` stops when ``||r_j|| <= tol ||b_j||`` for its true residual ``r_j = b_j - A x_j``:
    when its recursive residual gets there, the next iteration's product also takes ``x_j``, and
    the column stops at ``x_j`` if confirmed. It is then frozen and no longer passed to
    ``matmat``, which receives ``(n, m)`` blocks: the active columns' search directions, then
    the iterates being checked. Every iteration is one ``matmat`` call (one more at ``maxiter``
    when an iterate is left to confirm). Zero columns of ``b`` return zeros without iterating.

    Parameters
    ----------
    matmat : callable
        ``V (n, m) float64 -> A V (n, m)``, with ``A`` symmetric positive definite (e.g.
        ``K + noise I``). ``m`` varies as columns converge.
    b : array_like, shape (n,) or (n, k)
        Right-hand sides; finite.
    tol : float, default 1e-5
        Relative residual tolerance, per column.
    maxiter : int, optional
        Cap on the total number of iterations (counting those before a resume). Default
        :func:`default_maxiter` ``(n) = min(10 n, 1000)``.
    preconditioner : object with ``apply(R) -> M^{-1} R``, optional
        ``M`` symmetric positive definite, ``R`` of shape (n, m). See
        :mod:`nngp_dask.linalg.preconditioners`. A resumed solve must use the same one.
    x0 : array_like, shape of ``b``, optional
        Starting guess (default zeros), e.g. a warm start from a previous solution. A column whose
        guess has a larger residual than zero starts from zero. Not allowed together with ``state``.
    state : CGState, optional
        Resume from this iterate (as emitted to ``callback`` or ``CGResult.state``). The
        continuation is bit-identical to an uninterrupted run with the same ``matmat`` and
        preconditioner.
    callback : callable, optional
        Called as ``callback(state)`` after every iteration with the immutable
        :class:`CGState`; checkpoint it (e.g. ``state.to_arrays()``) as often as you like.
        Raising from the callback aborts the solve.
    true_residual_every : int, default 50
        Every this many iterations replace the recursive residual by ``b - A x`` to stop drift
        (computed in that iteration's ``matmat``, which is then twice as wide); 0 disables.

    Returns
    -------
    CGResult

    Warns
    -----
    ConvergenceWarning
        When some column has not converged after ``maxiter`` iterations (or broke down),
        with advice: raise the noise, enlarge the preconditioner rank, use float64.

    Raises
    ------
    ValueError
        Naming the argument, the value received and what was expected.

    Examples
    --------
    >>> import numpy as np
    >>> a = np.array([[4.0, 1.0], [1.0, 3.0]])
    >>> res = batched_cg(lambda v: a @ v, np.array([1.0, 2.0]), tol=1e-12)
    >>> np.allclose(a @ res.x, [1.0, 2.0]), res.converged
    (True, True)
    """
    return _run(_step, matmat, b, tol=tol, maxiter=maxiter, preconditioner=preconditioner, x0=x0, state=state,
                callback=callback, true_residual_every=true_residual_every)


#: Directions whose eigenvalue in the unit-diagonal ``P^T A P`` is below this fraction of the
#: largest are dropped as dependent. Rounding puts ``~eps sqrt(cond(A))`` there; keeping a
#: direction that close to the others would scale its rounding up by ``1 / sqrt(eigenvalue)``.
DEFLATION_TOL = 1e-10


def _orthonormal(p: NDArray, ap: NDArray) -> tuple[NDArray, NDArray] | None:
    """``(P S, A P S)`` with ``(P S)^T A (P S) = I`` over the independent directions of ``P``;
    None when none is left (or the Gram is not finite, or A is not positive definite along P)."""
    g = p.T @ ap
    g = 0.5 * (g + g.T)
    d = np.sqrt(np.clip(np.diag(g), 0.0, None))
    live = np.flatnonzero(np.isfinite(d) & (d > 0))
    if not live.size or not np.all(np.isfinite(g[np.ix_(live, live)])):
        return None
    d = d[live]
    lam, v = scipy.linalg.eigh(g[np.ix_(live, live)] / np.outer(d, d), check_finite=False)
    if not lam[-1] > 0:
        return None
    keep = lam > DEFLATION_TOL * lam[-1]
    s = v[:, keep] / np.sqrt(lam[keep]) / d[:, None]
    return p[:, live] @ s, ap[:, live] @ s


def _block_step(op: _Op, b: NDArray, s: CGState, preconditioner: Any, tol: float,
                true_residual_every: int) -> CGState:
    """One block CG iteration over the active columns (see the module docstring)."""
    idx = np.flatnonzero(s.active)
    x, r, z, p, rz = s.x.copy(), s.r.copy(), s.z.copy(), s.p.copy(), s.rz.copy()
    active = s.active.copy()
    res = s.residuals[-1].copy()
    iteration = s.iteration + 1

    claimed = bool(np.all(res[idx] <= tol))
    on_schedule = true_residual_every and iteration % true_residual_every == 0
    check = idx if claimed or on_schedule else idx[:0]
    product = op(np.concatenate([p[:, idx], x[:, check]], axis=1) if check.size else p[:, idx])
    ap = product[:, :idx.size]
    if check.size:
        _replace_residuals(b, product[:, idx.size:], check, r, res, active, s.b_norm, tol)
        broke = not np.all(np.isfinite(res[check]))
        # the block stops as one: when every column is confirmed, or when one breaks down
        stop = broke or not np.any(active[idx])
        active[idx] = not stop

    if np.any(active):
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            basis = _orthonormal(p[:, idx], ap)
            if basis is not None:
                p_o, ap_o = basis
                alpha = p_o.T @ r[:, idx]
                x_new = x[:, idx] + p_o @ alpha
                r_new = r[:, idx] - ap_o @ alpha
        if basis is None or not (np.all(np.isfinite(x_new)) and np.all(np.isfinite(r_new))):
            active[idx] = False  # breakdown: A or the preconditioner is not positive definite here
        else:
            x[:, idx], r[:, idx] = x_new, r_new
            res[idx] = _colnorm(r_new) / s.b_norm[idx]
            z_new = _precondition(preconditioner, r_new)
            p[:, idx] = z_new - p_o @ (ap_o.T @ z_new)
            z[:, idx] = z_new
            rz[idx] = _coldot(r_new, z_new)
    residuals = np.concatenate([s.residuals, res[None, :]], axis=0)
    for arr in (x, r, z, p, rz, active, residuals):
        readonly(arr)  # fresh arrays: the state takes them without copying
    return CGState(x=x, r=r, z=z, p=p, rz=rz, iteration=iteration, active=active,
                   residuals=residuals, b_norm=s.b_norm)


def block_cg(
    matmat: Matmat,
    b: ArrayLike,
    *,
    tol: float = 1e-5,
    maxiter: int | None = None,
    preconditioner: Any = None,
    x0: ArrayLike | None = None,
    state: CGState | None = None,
    callback: Callable[[CGState], Any] | None = None,
    true_residual_every: int = 50,
) -> CGResult:
    """Solve ``A X = B`` for many right-hand sides at once by block preconditioned CG.

    The arguments, the result, the stopping test (per column, on the true residual ``b - A x``),
    checkpoints and resumption are those of :func:`~nngp_dask.linalg.batched_cg`; the search
    differs (module docstring): every column steps along the directions of all, so a column
    that has converged keeps improving until the last one stops, and ``matmat`` always receives
    every active column's direction (``(n, m)`` blocks, ``m`` the number of active columns, plus
    the iterates being checked). With one right-hand side it is preconditioned CG.

    Parameters
    ----------
    matmat : callable
        ``V (n, m) float64 -> A V (n, m)``, ``A`` symmetric positive definite.
    b : array_like, shape (n,) or (n, k)
        Right-hand sides; finite. They may be linearly dependent (e.g. zero-mean one-hot targets).
    tol : float, default 1e-5
        Relative residual tolerance, per column.
    maxiter : int, optional
        Cap on the total number of iterations (counting those before a resume). Default
        :func:`~nngp_dask.linalg.default_maxiter` ``(n)``.
    preconditioner : object with ``apply(R) -> M^{-1} R``, optional
        ``M`` symmetric positive definite. A resumed solve must use the same one.
    x0 : array_like, shape of ``b``, optional
        Starting guess; a column whose guess is worse than zero starts from zero, and a column
        already at the tolerance stays where it is. Not allowed together with ``state``.
    state : CGState, optional
        Resume from this iterate (a state of this function, not of :func:`batched_cg`: the two
        store different search directions); bit-identical to an uninterrupted run.
    callback : callable, optional
        Called as ``callback(state)`` after every iteration.
    true_residual_every : int, default 50
        Every this many iterations replace the recursive residuals by ``b - A x``; 0 disables.

    Returns
    -------
    CGResult

    Warns
    -----
    ConvergenceWarning
        When some column has not converged after ``maxiter`` iterations (or the block broke down).

    Raises
    ------
    ValueError
        Naming the argument, the value received and what was expected.

    Examples
    --------
    >>> import numpy as np
    >>> a = np.array([[4.0, 1.0, 0.0], [1.0, 3.0, 1.0], [0.0, 1.0, 2.0]])
    >>> b = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    >>> res = block_cg(lambda v: a @ v, b, tol=1e-12)
    >>> np.allclose(a @ res.x, b), res.converged, res.iterations  # two steps span R^3; a third confirms
    (True, True, 3)
    """
    return _run(_block_step, matmat, b, tol=tol, maxiter=maxiter, preconditioner=preconditioner, x0=x0,
                state=state, callback=callback, true_residual_every=true_residual_every)
