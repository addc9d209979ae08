"""Predictions on a kernel store: the posterior mean ``K(X*, X) alpha`` and variance.

Variances: why a dense factor and not a Lanczos (LOVE) cache. The exact variance of a CG solve
costs one preconditioned CG per test point, ``2 n^2`` flops per point and iteration (batched, so
flop-bound): on kin40k, n = 10,000, 1,000 test points, 115.7 s against 6.7 s for the mean's solve
(issue 18). A cache reused by every test point (Pleiss et al. 2018) needs the test
cross-covariances to lie in a space of small rank ``r``, and with NNGP kernels of low-dimensional
inputs they do not: the latent variance is ~1 % of the prior there (the reduction must be right to
~1e-4 relative). On kin40k (n = 5,000, noise 0.1) a Lanczos cache of r = 300 steps leaves a median
relative error of 50 %, 79 % preconditioned with the preconditioner as control variate, and even
K's exact leading eigenvectors, the best rank-r space there is, need r in the thousands
(benchmarks/RESULTS.md, section 12). Factorising ``K + noise I`` once costs ``n^3 / 3`` flops and
each test point ``n^2`` (one triangular solve), against ``2 n^2`` per point and CG iteration: there
it took 0.54x the mean's solve against 20x for the batched CG, exact to rounding, so
``variance="auto"`` takes it while the float64 factor fits in memory (``DENSE_VARIANCE_MAX_N``,
``8 n^2`` bytes at its peak). Past that size the same factorisation runs out of core
(``"tiled"``, :mod:`nngp_dask.gp.tiled_variance`: panels from the stored tiles, the factor in
scratch files), unless so few test points are asked for that their CG solves cost fewer flops
than the factor. ``"lowrank"`` remains as a cheap, inexact choice, never picked by ``"auto"``.
"""

from __future__ import annotations

import logging
import os
from typing import Any, cast

import numpy as np
import zarr
from numpy.typing import NDArray

from ..cluster import client_for
from ..linalg import batched_cg, cholesky_factor, orthogonal_factor
from ..monitor import tracked
from ..store import KernelStore, solve_path
from .operator import StoredKernelOperator
from .posterior import variance_from_cholesky, variance_from_solve, variance_lowrank
from .regression import SolveResult, dense_kernel, open_store, solve_preconditioner
from .tiled_variance import check_scratch, tiled_variances

__all__ = ["DENSE_VARIANCE_MAX_N", "EXTRAPOLATION_RATIO", "VARIANCE_RANK", "extrapolation", "predict", "variance_mode"]

log = logging.getLogger("nngp_dask")

#: ``variance="auto"`` factorises ``K + noise I`` in memory for the variance up to this many
#: training points: the kernel read into float64 and factorised in place, 8 n^2 bytes (2 GiB at
#: the cap); a Cholesky of ``n^3 / 3`` flops.
DENSE_VARIANCE_MAX_N = 16384
#: :func:`predict` warns when test points' prior variances ``K(x*, x*)`` exceed this multiple of
#: the largest training point's. A ReLU network's kernel grows with ``|x|^2``: such a point lies
#: about twice as far out as any training input, and its prediction extrapolates a kernel that
#: keeps growing (a badly scaled test feature does this; bounded activations never trigger it).
EXTRAPOLATION_RATIO = 4.0
#: Leading components of the preconditioner's factor used by the low-rank variance: its cost is
#: 2 m n r flops, so the full rank of a strong preconditioner (thousands) would dominate a run.
VARIANCE_RANK = 256
VARIANCES = (False, True, "auto", "exact", "dense", "tiled", "lowrank")


def _lowrank_factor(ks: KernelStore, result: SolveResult) -> zarr.Array | None:
    """The solve's stored low-rank preconditioner factor, or None."""
    g = cast("zarr.Group | None", ks.group.get(solve_path(result.key)))  # solves/<key> is a group
    return cast(zarr.Array, g["lowrank_factor"]) if g is not None and "lowrank_factor" in g else None


def variance_mode(store: KernelStore | str | os.PathLike, result: SolveResult, variance: bool | str) -> str | None:
    """The variance method :func:`predict` runs for ``variance``: ``None`` (no variance),
    ``"dense"``, ``"tiled"``, ``"exact"`` or ``"lowrank"``.

    ``True``/``"auto"`` resolve to ``"dense"`` for a Cholesky solve or up to
    ``DENSE_VARIANCE_MAX_N`` training points; above that to ``"exact"`` when one CG per test
    point (at the mean's iteration count) costs fewer flops than a factorisation
    (``2 m n^2 its < n^3 / 3``), else to ``"tiled"``. All three are exact; ``"lowrank"`` is
    only taken when asked for. A caller that caches predictions keys them on this.

    Raises
    ------
    ValueError
        ``variance`` not one of ``False, True, "auto", "exact", "dense", "tiled", "lowrank"``.
    """
    if not any(variance is v or (isinstance(v, str) and variance == v) for v in VARIANCES):
        raise ValueError("variance: expected False, True, 'auto', 'exact', 'dense', 'tiled' or 'lowrank', "
                         f"got {variance!r}")
    if variance is False:
        return None
    if variance not in (True, "auto"):
        return str(variance)
    ks = open_store(store)
    n = ks.shape[0]
    if result.method == "cholesky" or n <= DENSE_VARIANCE_MAX_N:
        return "dense"
    return "exact" if 6 * ks.n_test * max(result.iterations, 1) < n else "tiled"


def extrapolation(store: KernelStore | str | os.PathLike) -> dict[str, Any]:
    """How far the test inputs reach beyond the training inputs, by the kernel's own measure.

    Parameters
    ----------
    store : KernelStore or path/URL
        Built with ``x_test``.

    Returns
    -------
    dict
        ``test_points``: how many test points have a prior variance ``K(x*, x*)`` above
        ``EXTRAPOLATION_RATIO`` times the largest training point's; ``max_prior_ratio``: the
        largest such ratio, and ``worst_test_point``: its index. :func:`predict` logs a warning
        when ``test_points`` is not 0.

    Raises
    ------
    ValueError
        The store holds no test inputs.
    """
    ks = open_store(store)
    if not ks.n_test:
        raise ValueError(f"store: {ks.url!r} holds no test inputs; pass x_test to build_kernel")
    ratio = ks.test_prior() / float(np.max(ks.diagonal()))
    return {"test_points": int(np.sum(ratio > EXTRAPOLATION_RATIO)), "max_prior_ratio": float(ratio.max()),
            "worst_test_point": int(np.argmax(ratio))}


def _warn_extrapolation(ks: KernelStore) -> None:
    far = extrapolation(ks)
    if far["test_points"]:
        log.warning("predict: %d of %d test point(s) have a prior variance K(x*, x*) above %g times the largest "
                    "training point's (up to %.3g times, test point %d): they lie far outside the training inputs "
                    "and their predictions extrapolate; check how the test inputs were scaled", far["test_points"],
                    ks.n_test, EXTRAPOLATION_RATIO, far["max_prior_ratio"], far["worst_test_point"])


def predict(
    store: KernelStore | str | os.PathLike,
    result: SolveResult,
    *,
    variance: bool | str = False,
    client: Any = None,
    batch: int = 256,
    variance_rank: int = VARIANCE_RANK,
    progress: bool = True,
) -> NDArray | tuple[NDArray, NDArray]:
    """Posterior mean ``K(X*, X) alpha`` and, optionally, variance
    ``K(x*, x*) - k*^T (K + noise I)^{-1} k*`` (the latent function's, without noise).

    Parameters
    ----------
    store : KernelStore or path/URL
        Built with ``x_test``.
    result : SolveResult
        From :func:`solve` on the same store.
    variance : bool or {"auto", "dense", "tiled", "exact", "lowrank"}
        ``True``/``"auto"``: see :func:`variance_mode` (``"dense"`` while the factor fits, then
        ``"tiled"``).
        ``"dense"``: factorises ``K + noise I`` (float64, in memory: ``8 n^2`` bytes at the
        peak) once, then one triangular solve per ``batch`` test points; exact to rounding, and
        at n = 10,000 it costs a fraction of ``"exact"`` (benchmarks/RESULTS.md, section 12).
        After a Cholesky solve in this process (``result.factor``) no factorisation at all.
        ``"tiled"``: the same factorisation out of core, panel by panel from the stored tiles,
        the factor (``4 n^2`` bytes) in a temporary folder (``TMPDIR``) deleted afterwards;
        about ``4 n w`` float64 in memory (panels and their products, ``w`` ~ 2,048: 2.6 GB at
        n = 40,000) plus 0.5 GiB of test columns; exact to rounding.
        ``"exact"``: one batched CG (``batch`` test points at a time; the dense factor for a
        Cholesky solve), streamed over the stored tiles; ``2 n^2`` flops per test point and
        CG iteration.
        ``"lowrank"``: projects ``k*`` on the span of the solve's low-rank preconditioner factor
        ``F`` (``F F^T ~= K``, pivoted Cholesky or Nystrom) and inverts ``K + noise I`` there, in
        one pass over the test tiles. Cheap but coarse where the spectrum decays slowly: on
        kin40k (n = 5,000, rank 256) its median relative error is 70 % and some variances come
        out 0 (benchmarks/RESULTS.md, section 12). Uses the leading ``variance_rank``
        components of the factor.
    progress : bool
        Progress bars (on a terminal) for the preconditioner and the test points; timed lines
        in the log either way.

    Returns
    -------
    mean : ndarray, shape (m, k) (or (m,) when y was 1-D)
    var : ndarray, shape (m,), when ``variance`` is requested

    Notes
    -----
    Logs a warning when test points' prior variances exceed ``EXTRAPOLATION_RATIO`` times the
    largest training point's (inputs far outside the training inputs).
    """
    if not isinstance(result, SolveResult):
        raise TypeError(f"result: expected the SolveResult of nngp_dask.solve on this store, got "
                        f"{type(result).__name__}")
    ks = open_store(store)
    if not ks.n_test:
        raise ValueError(f"store: {ks.url!r} holds no test inputs; pass x_test to build_kernel")
    alpha = np.asarray(result.alpha, dtype=np.float64)
    if alpha.shape[0] != ks.shape[0]:
        raise ValueError(f"result: alpha has {alpha.shape[0]} rows, the store's kernel {ks.shape[0]}; "
                         "expected a solve of this store")
    mode = variance_mode(ks, result, variance)
    squeeze = alpha.ndim == 1
    a2 = alpha.reshape(alpha.shape[0], -1)
    ks.require_complete("test_train")
    _warn_extrapolation(ks)
    if mode == "tiled":
        check_scratch(ks.shape[0], ks.tile)  # before any work
    m = ks.n_test
    factor = None
    if mode == "lowrank":
        stored = _lowrank_factor(ks, result)
        if stored is None:
            raise ValueError("variance: 'lowrank' needs a CG solve with a low-rank preconditioner "
                             "(preconditioner='pivoted_cholesky' or 'nystrom'); use variance='dense' or 'exact'")
        # columns of U diag(s) come in descending s: the leading ones carry the top spectrum
        factor = np.asarray(stored[:, :variance_rank], dtype=np.float64)
        if ks.group[solve_path(result.key)].attrs.get("factor_orthogonal") is False:  # extended to appended rows
            factor = orthogonal_factor(factor)
    with client_for(client) as c, tracked("predict: test points", m, progress=progress, unit="pt") as beat:
        op = StoredKernelOperator(ks, result.noise, c)
        beat(0, "posterior means: one pass over K(X*, X)")
        mean, sq, proj = op.test_products(a2, factor)
        assert mean is not None  # alpha given
        mean = mean[:, 0] if squeeze else mean
        if mode is None or mode == "lowrank":
            beat(m)
        if mode is None:
            return mean
        prior = ks.test_prior()
        noise = result.noise
        if mode == "lowrank":
            assert proj is not None and factor is not None  # factor given: its projections came back
            return mean, variance_lowrank(prior, proj, factor, noise)
        if mode == "tiled":
            var = tiled_variances(ks, noise, prior, lambda rows: ks.read_rows("test_train", rows).T, beat=beat)
            beat(m, "exact variances (out-of-core factor)")
            return mean, var
        if mode == "dense" or result.method == "cholesky":
            # factorised once for every batch of test points, or not at all after a Cholesky solve
            # in this process
            lower = result.factor if result.factor is not None else \
                cholesky_factor(dense_kernel(ks, np.float64), noise, overwrite_k=True)[0]
            block_variance = lambda p, kstar: variance_from_cholesky(p, kstar, lower)  # noqa: E731
        else:
            beat(0, "exact variances: the solve's preconditioner")
            pre = solve_preconditioner(ks, result.preconditioner, max(noise, 1e-12),
                                  result.info.get("preconditioner_landmarks") or result.info.get("preconditioner_rank")
                                  or None, c, progress)
            block_variance = lambda p, kstar: variance_from_solve(  # noqa: E731
                p, kstar, batched_cg(op.matmat, kstar, tol=result.tol, preconditioner=pre).x)
        var = np.empty(m)
        for start in range(0, m, batch):
            stop = min(start + batch, m)
            kstar = np.asarray(ks.read_rows("test_train", slice(start, stop)), dtype=np.float64).T  # (n, b), verified
            beat(start, f"exact variances: one batched CG for points {start}-{stop - 1}")
            var[start:stop] = block_variance(prior[start:stop], kstar)
        beat(m, "exact variances")
        return mean, var
