"""Log-determinants: stochastic Lanczos quadrature from a ``matmat``, and the dense twin.

``log det A = tr(log A)`` is estimated with Hutchinson's trace estimator over Rademacher
probes ``z`` (``E[z^T log(A) z] = tr log A``), each quadratic form evaluated by Gauss
quadrature from ``m`` Lanczos steps started at ``z / ||z||``:

    z^T log(A) z ~= ||z||^2 sum_i tau_i^2 log(theta_i),

with ``theta_i`` the eigenvalues of the m x m Lanczos tridiagonal ``T`` and ``tau_i`` the first
components of its eigenvectors. All probes share one ``matmat`` per Lanczos step.

References
----------
.. [1] S. Ubaru, J. Chen, Y. Saad, "Fast estimation of tr(f(A)) via stochastic Lanczos
   quadrature", SIAM J. Matrix Anal. Appl. 38(4) (2017), Algorithm 1.
.. [2] M. F. Hutchinson, "A stochastic estimator of the trace of the influence matrix for
   Laplacian smoothing splines", Commun. Stat. Simul. Comput. 19 (1990).
.. [3] G. H. Golub and G. Meurant, *Matrices, Moments and Quadrature with Applications*,
   Princeton 2010, chapter 6.
.. [4] J. R. Gardner et al., "GPyTorch: Blackbox matrix-matrix Gaussian process inference with
   GPU acceleration", NeurIPS 2018, section 4.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import scipy.linalg
from numpy.typing import ArrayLike, NDArray

from .cg import check_rhs
from .dense import cholesky_factor

__all__ = ["LogdetEstimate", "slq_logdet", "logdet_dense", "log_marginal_likelihood"]

#: Lanczos bases up to this many bytes are kept for full reorthogonalisation when
#: ``reorthogonalize=None``.
REORTH_BYTES = 256 * 2**20


class LogdetEstimate(NamedTuple):
    """``(logdet, stderr)``: the SLQ estimate and its standard error over probes."""

    logdet: float
    stderr: float


def _check_count(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    return int(value)


def slq_logdet(
    matmat: Callable[[NDArray[np.float64]], ArrayLike],
    n: int,
    *,
    num_probes: int = 16,
    lanczos_steps: int = 30,
    seed: int | None = 0,
    reorthogonalize: bool | None = None,
) -> LogdetEstimate:
    """Estimate ``log det A`` of a symmetric positive definite ``A`` by SLQ ([1]_, [4]_).

    Parameters
    ----------
    matmat : callable
        ``V (n, p) float64 -> A V (n, p)``; called once per Lanczos step with the probes
        still running (``p <= num_probes``).
    n : int
        Size of ``A``.
    num_probes : int, default 16
        Rademacher probes (>= 2, for the standard error). The error falls as
        ``1 / sqrt(num_probes)``.
    lanczos_steps : int, default 30
        Lanczos steps per probe (capped at ``n``); the quadrature is exact for polynomials
        of degree ``2 lanczos_steps - 1``, so the bias decays fast with ``lanczos_steps`` for
        well-conditioned ``A`` (raise it for small ``noise``).
    seed : int or None, default 0
        Seed of the probes (``numpy.random.default_rng``).
    reorthogonalize : bool, optional
        Full reorthogonalisation of the Lanczos basis (memory ``n * lanczos_steps *
        num_probes`` float64). Default: on when that fits in 256 MiB.

    Returns
    -------
    LogdetEstimate
        ``(logdet, stderr)``, ``stderr = std(samples, ddof=1) / sqrt(num_probes)``.

    Raises
    ------
    ValueError
        When a Lanczos tridiagonal has a non-positive eigenvalue (``A`` not positive
        definite: raise the noise).
    """
    n = _check_count("n", n, 1)
    num_probes = _check_count("num_probes", num_probes, 2)
    steps = min(_check_count("lanczos_steps", lanczos_steps, 1), n)
    if not callable(matmat):
        raise ValueError(f"matmat: expected a callable V (n, p) -> A V (n, p), got {type(matmat).__name__}")
    if reorthogonalize is None:
        reorthogonalize = n * steps * num_probes * 8 <= REORTH_BYTES
    rng = np.random.default_rng(seed)
    z = rng.integers(0, 2, size=(n, num_probes)).astype(np.float64) * 2.0 - 1.0
    q = z / math.sqrt(n)
    q_prev = np.zeros_like(q)
    alphas = np.zeros((steps, num_probes))
    betas = np.zeros((steps, num_probes))  # betas[j] couples steps j and j + 1
    length = np.full(num_probes, steps)
    basis: list[NDArray[np.float64]] = [q] if reorthogonalize else []
    live = np.arange(num_probes)
    for j in range(steps):
        w = np.asarray(matmat(q[:, live]), dtype=np.float64)
        if w.shape != (n, live.size):
            raise ValueError(f"matmat: expected an output of shape {(n, live.size)}, got {w.shape}")
        if not np.all(np.isfinite(w)):
            raise ValueError("matmat: expected finite values, got NaN or Inf")
        a = np.einsum("ij,ij->j", q[:, live], w)
        w -= a * q[:, live]
        if j > 0:
            w -= betas[j - 1, live] * q_prev[:, live]
        if reorthogonalize:
            qs = np.stack([v[:, live] for v in basis])  # (j + 1, n, p)
            for _ in range(2):  # classical Gram-Schmidt, twice
                w -= np.einsum("inp,ip->np", qs, np.einsum("inp,np->ip", qs, w))
        alphas[j, live] = a
        if j == steps - 1:
            break
        b = np.sqrt(np.einsum("ij,ij->j", w, w))
        scale = np.abs(a) + (betas[j - 1, live] if j > 0 else 0.0)
        stop = b <= 1e3 * np.finfo(np.float64).eps * np.maximum(scale, np.finfo(np.float64).tiny)
        length[live[stop]] = j + 1  # invariant subspace found: the quadrature is exact
        betas[j, live[~stop]] = b[~stop]
        q_next = np.zeros_like(q)
        q_next[:, live[~stop]] = w[:, ~stop] / b[~stop]
        q_prev, q = q, q_next
        if reorthogonalize:
            basis.append(q)
        live = live[~stop]
        if live.size == 0:
            break

    samples = np.empty(num_probes)
    for p in range(num_probes):
        m = int(length[p])
        theta, vecs = scipy.linalg.eigh_tridiagonal(alphas[:m, p], betas[: m - 1, p], check_finite=False)
        if np.any(theta <= 0):
            raise ValueError(
                f"matmat: expected a positive definite operator, got a Lanczos Ritz value {float(theta.min()):.3g} "
                "<= 0; raise the noise (the jitter on the kernel diagonal) or use float64")
        samples[p] = n * float(np.sum(vecs[0] ** 2 * np.log(theta)))
    return LogdetEstimate(float(samples.mean()), float(samples.std(ddof=1) / math.sqrt(num_probes)))


def logdet_dense(k: ArrayLike, noise: float = 0.0) -> float:
    """Exact ``log det(k + noise I)`` from a float64 Cholesky factor.

    Parameters
    ----------
    k : array_like, shape (n, n)
        Symmetric (only the lower triangle is read).
    noise : float, default 0
        Added to the diagonal.

    Raises
    ------
    numpy.linalg.LinAlgError
        (a ValueError) when not positive definite, advising to increase ``noise``.
    """
    c, _ = cholesky_factor(k, noise)
    return float(2.0 * np.sum(np.log(np.diag(c))))


def log_marginal_likelihood(y: ArrayLike, alpha: ArrayLike, logdet: float, n: int | None = None) -> float:
    """Gaussian log marginal likelihood, summed over output columns.

    For each column ``y_j`` (an independent GP output sharing ``A = K + noise I``)::

        log p(y_j) = -1/2 y_j^T alpha_j - 1/2 log det A - n/2 log(2 pi),  alpha_j = A^{-1} y_j

    (Rasmussen & Williams 2006, eq. 2.30), and the sum over the ``k`` columns is returned.

    Parameters
    ----------
    y : array_like, shape (n,) or (n, k)
        Targets.
    alpha : array_like, shape of ``y``
        ``A^{-1} y`` (e.g. ``CGResult.alpha``).
    logdet : float
        ``log det A`` (exact or :func:`slq_logdet`).
    n : int, optional
        Number of training points; must equal ``y.shape[0]`` when given.

    Returns
    -------
    float
    """
    y_arr = check_rhs(y, "y")
    a_arr = check_rhs(alpha, "alpha")
    if a_arr.shape != y_arr.shape:
        raise ValueError(f"alpha: expected shape {y_arr.shape} (that of y), got {a_arr.shape}")
    rows = y_arr.shape[0]
    if n is not None and (isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n != rows):
        raise ValueError(f"n: expected {rows} (the rows of y), got {n!r}")
    if isinstance(logdet, bool) or not isinstance(logdet, (int, float, np.integer, np.floating)) \
            or not math.isfinite(float(logdet)):
        raise ValueError(f"logdet: expected a finite number, got {logdet!r}")
    k = 1 if y_arr.ndim == 1 else y_arr.shape[1]
    fit = float(np.sum(y_arr * a_arr))
    return -0.5 * fit - 0.5 * k * float(logdet) - 0.5 * k * rows * math.log(2.0 * math.pi)
