"""scikit-learn estimators: NNGP/NTK Gaussian-process regression and classification.

:class:`NNGPRegressor` is the exact GP posterior mean (and standard deviation) of an
infinitely wide fully connected network; :class:`NNGPClassifier` is classification as
regression on one-hot targets (Lee et al. 2018). Both follow the scikit-learn conventions
(``__init__`` only stores its arguments, ``fit`` returns ``self``, learned state ends in
``_``), so they work in :class:`~sklearn.model_selection.GridSearchCV` and
:class:`~sklearn.pipeline.Pipeline`. :class:`NNGPKernel` plugs the same kernel into
:class:`~sklearn.gaussian_process.GaussianProcessRegressor` (fixed hyperparameters).

Two paths, the same numbers:

- in memory (``n <= max_in_memory``, or ``out_of_core=False``): :func:`nngp_dask.kernel` and a
  float64 Cholesky factorisation of ``K + noise I`` (SciPy);
- out of core (``n > max_in_memory``, or ``out_of_core=True``): the training kernel is built
  tile by tile into a Zarr store (:func:`nngp_dask.build.build_kernel`, on the current Dask
  client or an embedded cluster) and solved there (:func:`nngp_dask.gp.solve`: Cholesky up to
  :data:`nngp_dask.gp.DIRECT_MAX_N` points, batched CG above). ``predict`` then streams the
  stored training inputs in chunks and computes ``K(X*, X)`` block by block with
  :func:`nngp_dask.kernels.tile`, so neither the training kernel nor ``K(X*, X)`` is ever held
  whole. With ``store=None`` the store lives in a temporary directory removed at interpreter
  exit; pass ``store`` to keep it (a refit on the same data and settings reuses its tiles).
  The tiles run on the current ``distributed`` client, else on an embedded cluster started
  for each call: create a ``distributed.Client`` first when fitting many times (grid search).

Requires scikit-learn (``pip install 'nngp-dask[sklearn]'``).
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from typing import Any

import numpy as np
import scipy.linalg
from numpy.typing import NDArray
try:
    from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
    from sklearn.gaussian_process.kernels import Kernel
    from sklearn.utils.multiclass import check_classification_targets
    from sklearn.utils.validation import check_is_fitted
except ImportError as exc:  # pragma: no cover - depends on the installation
    raise ImportError("nngp_dask.estimators needs scikit-learn: pip install 'nngp-dask[sklearn]'") from exc

from . import defaults
from .gp import TARGETS, one_hot_targets, posterior_mean, predict_labels, variance_from_cholesky, variance_from_solve
from .kernels import (NORMALIZATIONS, Architecture, check_dtype, check_kind, diagonals, kernel,
                      normalize as normalize_rows, tile as tile_fn)
from .linalg import cholesky_factor
from .store import diagonals_path, inputs_path

try:  # scikit-learn >= 1.6
    from sklearn.utils.validation import validate_data as _sk_validate_data
except ImportError:  # pragma: no cover - older scikit-learn
    _sk_validate_data = None

__all__ = ["NNGPRegressor", "NNGPClassifier", "NNGPKernel"]

#: rows of ``X*`` per kernel block in ``predict`` (bounds memory at ``rows x chunk`` entries)
_PREDICT_ROWS = 1024
_TEMP_STORES: list[str] = []


def _cleanup_temp_stores() -> None:  # pragma: no cover - runs at exit
    for path in _TEMP_STORES:
        shutil.rmtree(path, ignore_errors=True)


atexit.register(_cleanup_temp_stores)


def _is_kernel_store(path: str) -> bool:
    from .store import open_kernel

    try:
        open_kernel(path)
    except (ValueError, OSError):
        return False
    return True


def _validate(est: BaseEstimator, X: Any, y: Any = "no_validation", **kwargs: Any):
    """``sklearn.utils.validation.validate_data`` where available, else the old method."""
    if _sk_validate_data is not None:
        return _sk_validate_data(est, X, y, **kwargs)
    return est._validate_data(X, y, **kwargs)  # pragma: no cover


class NNGPKernel(Kernel):
    """The NNGP (or NTK) kernel as a scikit-learn :class:`~sklearn.gaussian_process.kernels.Kernel`.

    Its hyperparameters are fixed (no gradients), so a
    :class:`~sklearn.gaussian_process.GaussianProcessRegressor` using it does not optimise
    anything; select them with :func:`nngp_dask.select.sweep.run_sweep` or a grid search instead.
    Inputs are used as given (normalise them beforehand).

    Parameters
    ----------
    depth, activation, weight_var, bias_var
        As :class:`nngp_dask.Architecture`.
    kind : {"nngp", "ntk"}
    """

    def __init__(self, depth: int = defaults.DEPTH, activation: str | dict = defaults.ACTIVATION,
                 weight_var: float = defaults.WEIGHT_VAR, bias_var: float = defaults.BIAS_VAR,
                 kind: str = "nngp") -> None:
        self.depth = depth
        self.activation = activation
        self.weight_var = weight_var
        self.bias_var = bias_var
        self.kind = kind

    def _arch(self) -> Architecture:
        arch = Architecture(self.depth, self.activation, self.weight_var, self.bias_var)
        check_kind(self.kind, arch)
        return arch

    def __call__(self, X, Y=None, eval_gradient=False):
        if eval_gradient:
            raise ValueError("eval_gradient: NNGPKernel has no gradient (its hyperparameters are fixed); "
                             "expected eval_gradient=False (use optimizer=None)")
        return kernel(self._arch(), X, Y, kind=self.kind, dtype="float64")

    def diag(self, X):
        return diagonals(self._arch(), X, kind=self.kind)[self.depth]

    def is_stationary(self) -> bool:
        return False

    @property
    def requires_vector_input(self) -> bool:
        return True


class _NNGPBase(BaseEstimator):
    """Shared parameters, fitting and the posterior mean of both estimators."""

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
        return arch, float(noise), dt

    # --- fitting --------------------------------------------------------------------------
    def _fit_targets(self, X: NDArray, Y: NDArray) -> None:
        """Solve ``(K + noise I) alpha = Y`` for validated float64 ``X`` (n, d) and ``Y`` (n, c)."""
        arch, noise, dt = self._checked()
        n = X.shape[0]
        self.arch_ = arch
        ooc = self.out_of_core is True or (self.out_of_core == "auto" and n > self.max_in_memory)
        self.out_of_core_ = bool(ooc)
        if not ooc:
            xn = np.ascontiguousarray(normalize_rows(X, self.normalize), dtype=np.float64)
            # raises numpy.linalg.LinAlgError with the advice when K + noise I is not positive definite
            factor = cholesky_factor(kernel(arch, xn, kind=self.kind, dtype=dt), noise)
            self.alpha_ = scipy.linalg.cho_solve(factor, Y, check_finite=False)
            self.cholesky_ = factor[0]  # lower triangle: L with L L^T = K + noise I (the rest is unused)
            self.X_fit_ = xn
            self.diag_fit_ = diagonals(arch, xn)
            self.store_ = None
            return
        from .build import build_kernel
        from .gp import solve
        from .store import StoreMismatchError

        if self.store is not None:
            path = os.fspath(self.store)
        else:
            tmp = tempfile.mkdtemp(prefix="nngp_dask_")
            _TEMP_STORES.append(tmp)
            path = os.path.join(tmp, "kernel.zarr")
        kw = dict(kind=self.kind, tile=self.tile, dtype=dt.name, normalize=self.normalize, progress=False)
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
        X = _validate(self, X, reset=False, dtype=np.float64)
        return np.ascontiguousarray(normalize_rows(X, self.normalize), dtype=np.float64)

    def _open_store(self):
        from .store import open_kernel

        ks = open_kernel(self.store_)
        if ks.identity.token() != self.store_token_:
            raise ValueError(f"store: {self.store_!r} was rebuilt for other data or settings since this estimator "
                             "was fitted; refit it (or give each estimator its own store)")
        return ks

    def _train_chunks(self):
        """``(rows slice, x chunk, NNGP diagonals chunk)`` over the training inputs."""
        if not self.out_of_core_:
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

    def _posterior_mean_var(self, xs: NDArray) -> tuple[NDArray, NDArray]:
        """Mean (m, c) and latent variance (m,) ``k** - k*^T (K + noise I)^{-1} k*``."""
        ds = diagonals(self.arch_, xs)
        prior = diagonals(self.arch_, xs, kind=self.kind)[self.depth]
        m = xs.shape[0]
        mean = np.empty((m, self.alpha_.shape[1]))
        var = np.empty(m)
        batch = _PREDICT_ROWS if not self.out_of_core_ else 256
        ks = self._open_store() if self.out_of_core_ else None
        for start in range(0, m, batch):
            sl = slice(start, min(start + batch, m))
            kstar = np.concatenate([self._cross(xs[sl], ds[:, sl], xc, dc) for _, xc, dc in self._train_chunks()],
                                   axis=1)  # (b, n)
            mean[sl] = posterior_mean(kstar, self.alpha_)
            if ks is None:
                var[sl] = variance_from_cholesky(prior[sl], kstar.T, self.cholesky_)
            else:
                from .gp import solve

                sol = np.asarray(solve(ks, kstar.T, noise=float(self.noise), progress=False).alpha).reshape(
                    kstar.shape[1], -1)
                var[sl] = variance_from_solve(prior[sl], kstar.T, sol)
        return mean, var


class NNGPRegressor(RegressorMixin, _NNGPBase):
    """Gaussian-process regression with the NNGP (or NTK) kernel of an infinitely wide network.

    The posterior mean ``K(X*, X) (K + noise I)^{-1} y`` with a zero prior mean (targets are
    used as given: centre them, e.g. in a :class:`~sklearn.compose.TransformedTargetRegressor`,
    when their mean is far from 0).

    Parameters
    ----------
    depth : int, default 3
        Hidden layers ``L``.
    activation : str or dict, default "relu"
        Any name of :data:`nngp_dask.ACTIVATIONS`, or a dict with the name and that activation's
        parameters, e.g. ``{"name": "leaky_relu", "slope": 0.2}`` (as :class:`nngp_dask.Architecture`).
    weight_var, bias_var : float, default 1.6, 0.1
        ``sigma_w^2`` and ``sigma_b^2`` (DESIGN.md section 2).
    noise : float, default 1e-2
        Observation noise variance added to the kernel diagonal (scikit-learn's GP ``alpha``).
    kind : {"nngp", "ntk"}, default "nngp"
        ``"ntk"``: the mean of an infinitely wide network trained by gradient flow on the
        squared loss (with ``noise`` as a ridge).
    normalize : {"none", "unit_norm", "standardize"}, default "none"
        Per-example input normalisation (applied in ``fit`` and ``predict``).
    out_of_core : {"auto", True, False}, default "auto"
        ``"auto"``: the tiled, stored path above ``max_in_memory`` training points.
    store : str, optional
        Zarr store path or URL of the out-of-core path (default: a temporary directory).
    tile : int, optional
        Tile edge of the out-of-core path (default :data:`nngp_dask.tiling.DEFAULT_TILE`).
    dtype : {"float64", "float32"}, default "float64"
        Kernel precision (the factorisation is always float64). float64, where a stored kernel
        (``build_kernel``, pipelines) defaults to float32: a fit in memory is small enough for
        float64 to cost little, and scikit-learn's checks expect float64 results
        (:mod:`nngp_dask.defaults`).
    max_in_memory : int, default 5000
        Largest training set fitted in memory by ``out_of_core="auto"``.

    Attributes
    ----------
    alpha_ : ndarray, shape (n_samples, n_outputs)
        ``(K + noise I)^{-1} y``.
    n_features_in_ : int
    out_of_core_ : bool
        Which path ``fit`` took.
    store_ : str or None
        The kernel store of the out-of-core path.
    arch_ : Architecture

    Examples
    --------
    >>> import numpy as np
    >>> from nngp_dask.estimators import NNGPRegressor
    >>> X = np.random.default_rng(0).standard_normal((50, 3)); y = np.sin(X[:, 0])
    >>> reg = NNGPRegressor(depth=2, noise=1e-3).fit(X, y)
    >>> mean, std = reg.predict(X[:5], return_std=True)
    >>> mean.shape, std.shape
    ((5,), (5,))
    """

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        return tags

    def _more_tags(self):  # pragma: no cover - scikit-learn < 1.6
        return {"multioutput": True}

    def fit(self, X: Any, y: Any) -> "NNGPRegressor":
        """Fit the GP: build ``K`` and solve ``(K + noise I) alpha = y``.

        Parameters
        ----------
        X : array_like, shape (n_samples, n_features)
        y : array_like, shape (n_samples,) or (n_samples, n_outputs)

        Returns
        -------
        self

        Raises
        ------
        numpy.linalg.LinAlgError
            When ``K + noise I`` is not positive definite, advising to increase ``noise``.
        """
        X, y = _validate(self, X, y, multi_output=True, y_numeric=True, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        self._y_1d = y.ndim == 1
        self._fit_targets(X, y.reshape(y.shape[0], -1))
        return self

    def predict(self, X: Any, return_std: bool = False) -> NDArray | tuple[NDArray, NDArray]:
        """Posterior mean, and optionally the posterior standard deviation of the latent function.

        Parameters
        ----------
        X : array_like, shape (n_queries, n_features)
        return_std : bool
            Also return ``sqrt(K(x*, x*) - k*^T (K + noise I)^{-1} k*)`` (without the noise,
            as :class:`~sklearn.gaussian_process.GaussianProcessRegressor` with ``alpha=noise``).
            On the out-of-core path this solves against the stored kernel (one batched solve
            per 256 queries).

        Returns
        -------
        mean : ndarray, shape (n_queries,) or (n_queries, n_outputs)
        std : ndarray, shape (n_queries,) or (n_queries, n_outputs), with ``return_std``
        """
        xs = self._prepare(X)
        if not return_std:
            mean = self._posterior_mean(xs)
            return mean[:, 0] if self._y_1d else mean
        mean, var = self._posterior_mean_var(xs)
        std = np.sqrt(var)
        if self._y_1d:
            return mean[:, 0], std
        return mean, np.repeat(std[:, None], mean.shape[1], axis=1)


class NNGPClassifier(ClassifierMixin, _NNGPBase):
    """Classification as NNGP/NTK regression on one-hot targets (Lee et al. 2018).

    ``fit`` regresses the targets of ``targets`` (``"centered"``: ``1 - 1/C`` for the true class
    and ``-1/C`` for the others, Lee et al.'s 0.9 / -0.1 for C = 10; ``"onehot"``: 1 / 0) and
    ``predict`` returns the class of the largest posterior mean. Both target encodings predict
    the same classes (the shift is common to all classes). This is not a probabilistic
    classifier: there is no ``predict_proba`` (the regression outputs are not probabilities);
    use :meth:`decision_function` for scores.

    Parameters
    ----------
    depth, activation, weight_var, bias_var, noise, kind, normalize, out_of_core, store, tile, dtype, max_in_memory
        As :class:`NNGPRegressor`.
    targets : {"centered", "onehot"}, default "centered"

    Attributes
    ----------
    classes_ : ndarray, shape (n_classes,)
    alpha_ : ndarray, shape (n_samples, n_classes)
    n_features_in_ : int
    out_of_core_, store_, arch_
        As :class:`NNGPRegressor`.
    """

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
        targets: str = "centered",
    ) -> None:
        super().__init__(depth=depth, activation=activation, weight_var=weight_var, bias_var=bias_var, noise=noise,
                         kind=kind, normalize=normalize, out_of_core=out_of_core, store=store, tile=tile, dtype=dtype,
                         max_in_memory=max_in_memory)
        self.targets = targets

    def fit(self, X: Any, y: Any) -> "NNGPClassifier":
        """Fit on class labels ``y`` (n_samples,) of any type.

        Returns
        -------
        self
        """
        X, y = _validate(self, X, y, dtype=np.float64)
        check_classification_targets(y)
        if self.targets not in TARGETS:
            raise ValueError(f"targets: expected one of {list(TARGETS)}, got {self.targets!r}")
        self.classes_, index = np.unique(y, return_inverse=True)
        self._fit_targets(X, one_hot_targets(index.reshape(-1), self.classes_.size, self.targets))
        return self

    def decision_function(self, X: Any) -> NDArray:
        """Posterior means of the class targets: (n_queries, n_classes), or for two classes the
        score of ``classes_[1]`` minus that of ``classes_[0]``, shape (n_queries,)."""
        f = self._posterior_mean(self._prepare(X))
        if self.classes_.size == 2:
            return f[:, 1] - f[:, 0]
        if self.classes_.size == 1:
            return f[:, 0]
        return f

    def predict(self, X: Any) -> NDArray:
        """The class of the largest posterior mean, shape (n_queries,)."""
        scores = self.decision_function(X)
        if self.classes_.size == 2:
            return self.classes_[(scores > 0).astype(np.intp)]
        if self.classes_.size == 1:
            return np.repeat(self.classes_, scores.shape[0])
        return predict_labels(scores, self.classes_)
