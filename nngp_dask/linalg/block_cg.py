"""Block preconditioned conjugate gradients: all right-hand sides share one Krylov space.

:func:`batched_cg` runs one CG recurrence per column and shares only the product. Block CG
(O'Leary [1]_) searches, at iteration ``i``, the sum of every column's Krylov space, so each
column's error is minimised over ``k`` times as many directions for the same pass over the
kernel; on MNIST's ten one-hot columns it needs fewer iterations (benchmarks/RESULTS.md),
and out of core an iteration is a pass over the stored tiles.

The directions are A-orthonormalised every iteration through the eigendecomposition of the
small Gram ``P^T A P`` (after scaling it to a unit diagonal), dropping the directions whose
eigenvalue says they depend on the others: the "breakdown-free" block CG of Ji and Li [2]_.
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
.. [1] D. P. O'Leary, "The block conjugate gradient algorithm and related methods", Linear
   Algebra Appl. 29 (1980).
.. [2] H. Ji and Y. Li, "A breakdown-free block conjugate gradient method", BIT Numer. Math. 57
   (2017).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import scipy.linalg
from numpy.typing import ArrayLike, NDArray

from .cg import Matmat, _coldot, _colnorm, _Op, _precondition, _replace_residuals, _run
from .cg_state import CGResult, CGState, readonly

__all__ = ["DEFLATION_TOL", "block_cg"]

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
