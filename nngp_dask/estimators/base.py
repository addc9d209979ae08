"""The shared base of the estimators: parameters, hyperparameter fitting, the solve and the posterior."""

from __future__ import annotations

import atexit
import math
import os
import shutil
import tempfile
from typing import Any

import numpy as np
import scipy.linalg
from numpy.typing import NDArray

try:
    from sklearn.base import BaseEstimator
    from sklearn.utils import check_random_state
    from sklearn.utils.validation import check_is_fitted
except ImportError as exc:  # pragma: no cover - depends on the installation
    raise ImportError("nngp_dask.estimators needs scikit-learn: pip install 'nngp-dask[sklearn]'") from exc

from .. import defaults
from ..gp import posterior_mean, variance_from_cholesky, variance_from_solve
from ..kernels import (
    NORMALIZATIONS,
    Architecture,
    check_dtype,
    check_kind,
    diagonals,
    kernel,
    normalize as normalize_rows,
    tile as tile_fn,
)
from ..linalg import cholesky_factor
from ..select import FitResult, fit_hyperparameters, storage_noise_floor
from ..store import diagonals_path, inputs_path

try:  # scikit-learn >= 1.6
    from sklearn.utils.validation import validate_data as _sk_validate_data
except ImportError:  # pragma: no cover - older scikit-learn
    _sk_validate_data = None

__all__ = ["NNGPBase", "OPTIMIZERS", "validate"]

#: values of the estimators' ``optimizer`` (None: keep the given hyperparameters)
OPTIMIZERS: tuple[str, ...] = ("fmin_l_bfgs_b",)

#: rows of ``X*`` per kernel block in ``predict`` (bounds memory at ``rows x chunk`` entries)
_PREDICT_ROWS = 1024
_TEMP_STORES: list[str] = []


def _cleanup_temp_stores() -> None:  # pragma: no cover - runs at exit
    for path in _TEMP_STORES:
        shutil.rmtree(path, ignore_errors=True)


atexit.register(_cleanup_temp_stores)


def _is_kernel_store(path: str) -> bool:
    from ..store import open_kernel

    try:
        open_kernel(path)
    except (ValueError, OSError):
        return False
    return True


def validate(est: BaseEstimator, X: Any, y: Any = "no_validation", **kwargs: Any):
    """``sklearn.utils.validation.validate_data`` where available, else the old method."""
    if _sk_validate_data is not None:
        return _sk_validate_data(est, X, y, **kwargs)
    return est._validate_data(X, y, **kwargs)  # pragma: no cover


class NNGPBase(BaseEstimator):
    """Shared parameters, fitting and the posterior of both estimators (documented on :class:`NNGPRegressor`)."""

    # fitted in memory (the training inputs and the Cholesky factor) or out of core (the store): the other is None
    cholesky_: NDArray | None
    X_fit_: NDArray | None
    diag_fit_: NDArray | None
    store_: str | None

    def __init__(
        self,
        depth: int = defaults.DEPTH,
        activation: str | dict = defaults.ACTIVATION,
        weight_var: float = defaults.WEIGHT_VAR,
        bias_var: float = defaults.BIAS_VAR,
        noise: float = defaults.NOISE,
        kind: str = "nngp",
        normalize: str = "none",
        out_of_core: bool | str = "auto",
        store: str | None = None,
        tile: int | None = None,
        dtype: str = defaults.IN_MEMORY_DTYPE,
        max_in_memory: int = 5000,
        optimizer: str | None = "fmin_l_bfgs_b",
        n_restarts_optimizer: int = 0,
        fit_depths: tuple[int, ...] | None = (1, 2, 3, 4),
        ard: bool = False,
        fit_subset: int = 1000,
        random_state: Any = None,
    ) -> None:
        self.depth = depth
        self.activation = activation
        self.weight_var = weight_var
        self.bias_var = bias_var
        self.noise = noise
        self.kind = kind
        self.normalize = normalize
        self.out_of_core = out_of_core
        self.store = store
        self.tile = tile
        self.dtype = dtype
        self.max_in_memory = max_in_memory
        self.optimizer = optimizer
        self.n_restarts_optimizer = n_restarts_optimizer
        self.fit_depths = fit_depths
        self.ard = ard
        self.fit_subset = fit_subset
        self.random_state = random_state

    # --- parameters, checked at fit (scikit-learn convention) -------------------------------
    def _checked(self) -> tuple[Architecture, float, np.dtype]:
        arch = Architecture(self.depth, self.activation, self.weight_var, self.bias_var)
        check_kind(self.kind, arch)
        dt = check_dtype(self.dtype)
        noise = self.noise
        if isinstance(noise, bool) or not isinstance(noise, (int, float, np.integer, np.floating)) \
                or not np.isfinite(noise) or noise < 0:
            raise ValueError(f"noise: expected a finite number >= 0, got {noise!r}")
        if self.normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize: expected one of {list(NORMALIZATIONS)}, got {self.normalize!r}")
        if self.out_of_core not in ("auto", True, False):
            raise ValueError(f"out_of_core: expected 'auto', True or False, got {self.out_of_core!r}")
        m = self.max_in_memory
        if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or m < 0:
            raise ValueError(f"max_in_memory: expected an integer >= 0, got {m!r}")
        t = self.tile
        if t is not None and (isinstance(t, bool) or not isinstance(t, (int, np.integer)) or t < 1):
            raise ValueError(f"tile: expected None or an integer >= 1, got {t!r}")
        if self.store is not None and not isinstance(self.store, (str, os.PathLike)):
            raise ValueError(f"store: expected None or a path/URL, got {self.store!r}")
        if self.optimizer is not None and self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer: expected None or one of {list(OPTIMIZERS)}, got {self.optimizer!r}")
        for name in ("n_restarts_optimizer", "fit_subset"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
                raise ValueError(f"{name}: expected an integer >= 0, got {v!r}")
        return arch, float(noise), dt

    def _fit_hyperparameters(self, arch: Architecture, noise: float, xn: NDArray, Y: NDArray,
                             dtype: np.dtype) -> FitResult | None:
        """The marginal-likelihood fit on a subset of ``xn`` (None without an optimizer or with
        nothing to fit: fewer than 2 points, or all-zero targets); the noise stays above what a
        kernel of ``dtype`` resolves at the full size."""
        if self.optimizer is None or xn.shape[0] < 2 or not np.any(Y):
            return None
        seed = int(check_random_state(self.random_state).randint(2**31 - 1))
        return fit_hyperparameters(xn, Y, arch=arch, noise=noise if noise > 0 else 1e-2, kind=self.kind,
                                   depths=self.fit_depths, ard=bool(self.ard), subset=self.fit_subset or None,
                                   restarts=int(self.n_restarts_optimizer), seed=seed,
                                   noise_floor=storage_noise_floor(dtype, xn.shape[0]))

    # --- fitting --------------------------------------------------------------------------
    def _fit_targets(self, X: NDArray, Y: NDArray) -> None:
        """Fit the hyperparameters (with an optimizer), then solve ``(K + noise_ I) alpha = Y`` for
        validated float64 ``X`` (n, d) and ``Y`` (n, c)."""
        arch, noise, dt = self._checked()
        n = X.shape[0]
        xn = np.ascontiguousarray(normalize_rows(X, self.normalize), dtype=np.float64)
        ooc = self.out_of_core is True or (self.out_of_core == "auto" and n > self.max_in_memory)
        if ooc and self.store is not None:
            from ..store import store_contents

            store_contents(os.fspath(self.store))  # a location that is not ours is refused before any work
        fitted = self._fit_hyperparameters(arch, noise, xn, Y, dt)
        self.fit_result_ = fitted
        if fitted is not None:
            arch, noise = fitted.architecture, fitted.noise
        self.arch_, self.noise_ = arch, noise
        self.amplitude_ = fitted.amplitude if fitted is not None else 1.0
        self.out_of_core_ = bool(ooc)
        if not ooc:
            # raises numpy.linalg.LinAlgError with the advice when K + noise I is not positive definite
            factor = cholesky_factor(kernel(arch, xn, kind=self.kind, dtype=dt), noise)
            self.alpha_ = scipy.linalg.cho_solve(factor, Y, check_finite=False)
            self.cholesky_ = factor[0]  # lower triangle: L with L L^T = K + noise I (the rest is unused)
            self.X_fit_ = xn
            self.diag_fit_ = diagonals(arch, xn)
            self.store_ = None
            if fitted is not None and fitted.n_subset == n:
                self.log_marginal_likelihood_value_ = fitted.log_marginal_likelihood
            else:  # R&W eq. 2.30 of C = amplitude (K + noise I), summed over the columns
                s, c = self.amplitude_, Y.shape[1]
                logdet = 2.0 * float(np.sum(np.log(np.diag(self.cholesky_)))) + n * math.log(s)
                self.log_marginal_likelihood_value_ = float(
                    -0.5 * np.sum(Y * self.alpha_) / s - 0.5 * c * logdet - 0.5 * n * c * math.log(2 * math.pi))
            return
        from ..build import build_kernel
        from ..gp import solve
        from ..store import StoreMismatchError

        # out of core: the fitted subset's value (an exact one would need SLQ over the store)
        self.log_marginal_likelihood_value_ = fitted.log_marginal_likelihood if fitted is not None else math.nan
        if self.store is not None:
            path = os.fspath(self.store)
        else:
            tmp = tempfile.mkdtemp(prefix="nngp_dask_")
            _TEMP_STORES.append(tmp)
            path = os.path.join(tmp, "kernel.zarr")
        kw: dict[str, Any] = dict(kind=self.kind, tile=self.tile, dtype=dt.name, normalize=self.normalize,
                                  progress=False)
        try:
            ks = build_kernel(arch, X, path, **kw)
        except StoreMismatchError:
            if not _is_kernel_store(path):
                raise  # other data at that path is not ours to replace
            # a kernel store of other data or settings (an earlier fit): a refit replaces it
            ks = build_kernel(arch, X, path, overwrite=True, **kw)
        res = solve(ks, Y, noise=noise, progress=False)
        self.alpha_ = np.asarray(res.alpha, dtype=np.float64).reshape(n, -1)
        self.store_ = ks.url
        self.store_token_ = ks.identity.token()
        self.cholesky_ = None
        self.X_fit_ = None
        self.diag_fit_ = None

    # --- prediction -----------------------------------------------------------------------
    def _prepare(self, X: Any) -> NDArray:
        check_is_fitted(self, "alpha_")
        X = validate(self, X, reset=False, dtype=np.float64)
        return np.ascontiguousarray(normalize_rows(X, self.normalize), dtype=np.float64)

    def _open_store(self):
        from ..store import open_kernel

        assert self.store_ is not None  # fitted out of core
        ks = open_kernel(self.store_)
        if ks.identity.token() != self.store_token_:
            raise ValueError(f"store: {self.store_!r} was rebuilt for other data or settings since this estimator "
                             "was fitted; refit it (or give each estimator its own store)")
        return ks

    def _train_chunks(self):
        """``(rows slice, x chunk, NNGP diagonals chunk)`` over the training inputs."""
        if not self.out_of_core_:
            assert self.X_fit_ is not None  # fitted in memory
            yield slice(0, self.X_fit_.shape[0]), self.X_fit_, self.diag_fit_
            return
        ks = self._open_store()
        x_arr, d_arr = ks.array(inputs_path("train")), ks.array(diagonals_path("train"))
        n, step = ks.shape[0], ks.tile
        for start in range(0, n, step):
            stop = min(start + step, n)
            yield slice(start, stop), x_arr[start:stop], d_arr[:, start:stop]

    def _cross(self, xs: NDArray, ds: NDArray, xc: NDArray, dc: NDArray) -> NDArray:
        return np.asarray(tile_fn(self.arch_, xs, xc, ds, dc, kind=self.kind, dtype=self.dtype), dtype=np.float64)

    def _posterior_mean(self, xs: NDArray) -> NDArray:
        """``K(X*, X) alpha``, shape (m, c), streaming training chunks and test row blocks."""
        ds = diagonals(self.arch_, xs)
        mean = np.zeros((xs.shape[0], self.alpha_.shape[1]))
        for rows, xc, dc in self._train_chunks():
            a = self.alpha_[rows]
            for start in range(0, xs.shape[0], _PREDICT_ROWS):
                sl = slice(start, start + _PREDICT_ROWS)
                mean[sl] += posterior_mean(self._cross(xs[sl], ds[:, sl], xc, dc), a)
        return mean

    def _kstar(self, xs: NDArray, ds: NDArray) -> NDArray:
        """``K(X*, X)`` (m, n) of a batch of test points, over every training chunk."""
        return np.concatenate([self._cross(xs, ds, xc, dc) for _, xc, dc in self._train_chunks()], axis=1)

    def _solve_train(self, ks: Any, b: NDArray) -> NDArray:
        """``(K + noise_ I)^{-1} b`` (n, k): from the Cholesky factor, or against the store (``ks``)."""
        if ks is None:
            assert self.cholesky_ is not None  # fitted in memory
            return scipy.linalg.cho_solve((self.cholesky_, True), b, check_finite=False)
        from ..gp import solve

        return np.asarray(solve(ks, b, noise=float(self.noise_), progress=False).alpha).reshape(b.shape[0], -1)

    def _posterior_cov(self, xs: NDArray) -> tuple[NDArray, NDArray]:
        """Mean (m, c) and latent covariance (m, m) ``amplitude_ (K** - K*^T (K + noise I)^{-1} K*)``."""
        ds = diagonals(self.arch_, xs)
        kstar = self._kstar(xs, ds)
        kss = kernel(self.arch_, xs, kind=self.kind, dtype="float64")
        cov = kss - kstar @ self._solve_train(self._open_store() if self.out_of_core_ else None, kstar.T)
        return posterior_mean(kstar, self.alpha_), self.amplitude_ * 0.5 * (cov + cov.T)

    def _posterior_mean_var(self, xs: NDArray) -> tuple[NDArray, NDArray]:
        """Mean (m, c) and latent variance (m,) ``amplitude_ (k** - k*^T (K + noise I)^{-1} k*)``."""
        ds = diagonals(self.arch_, xs)
        prior = diagonals(self.arch_, xs, kind=self.kind)[self.arch_.depth]
        m = xs.shape[0]
        mean = np.empty((m, self.alpha_.shape[1]))
        var = np.empty(m)
        batch = _PREDICT_ROWS if not self.out_of_core_ else 256
        ks = self._open_store() if self.out_of_core_ else None
        for start in range(0, m, batch):
            sl = slice(start, min(start + batch, m))
            kstar = self._kstar(xs[sl], ds[:, sl])  # (b, n)
            mean[sl] = posterior_mean(kstar, self.alpha_)
            if ks is None:
                assert self.cholesky_ is not None  # fitted in memory
                var[sl] = variance_from_cholesky(prior[sl], kstar.T, self.cholesky_)
            else:
                var[sl] = variance_from_solve(prior[sl], kstar.T, self._solve_train(ks, kstar.T))
        return mean, self.amplitude_ * var


