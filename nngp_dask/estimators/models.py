"""NNGPRegressor and NNGPClassifier: the scikit-learn estimators over :class:`NNGPBase`."""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

try:
    from sklearn.base import ClassifierMixin, RegressorMixin
    from sklearn.utils import check_random_state
    from sklearn.utils.multiclass import check_classification_targets
except ImportError as exc:  # pragma: no cover - depends on the installation
    raise ImportError("nngp_dask.estimators needs scikit-learn: pip install 'nngp-dask[sklearn]'") from exc

from .. import defaults
from ..gp import TARGETS, one_hot_targets, predict_labels
from .base import NNGPBase, validate

__all__ = ["NNGPRegressor", "NNGPClassifier"]


class NNGPRegressor(RegressorMixin, NNGPBase):
    """Gaussian-process regression with the NNGP (or NTK) kernel of an infinitely wide network.

    The posterior mean ``K(X*, X) (K + noise I)^{-1} y`` with a zero prior mean (``normalize_y``
    standardises the targets first, as scikit-learn's GaussianProcessRegressor). By default
    ``fit`` first learns the hyperparameters like GaussianProcessRegressor's ``optimizer``: it
    maximises the exact log marginal likelihood of ``amplitude (K + noise I)`` over
    ``weight_var``, ``bias_var``, ``noise`` and the amplitude (closed form), for each depth of
    ``fit_depths``, and optionally one input variance per feature (``ard``), on a random subset
    of ``fit_subset`` points (:func:`nngp_dask.select.fit_hyperparameters`); the given values
    are the starting point. The full-size solve (in memory or out of core) then uses the
    fitted values. ``optimizer=None`` keeps the given hyperparameters.

    Parameters
    ----------
    depth : int, default 3
        Hidden layers ``L``.
    activation : str or dict, default "relu"
        Any name of :data:`nngp_dask.ACTIVATIONS`, or a dict with the name and that activation's
        parameters, e.g. ``{"name": "leaky_relu", "slope": 0.2}`` (as :class:`nngp_dask.Architecture`).
    weight_var, bias_var : float, default 1.6, 0.1
        ``sigma_w^2`` and ``sigma_b^2`` (docs/DESIGN.md section 2).
    noise : float, default 1e-2
        Observation noise variance added to the kernel diagonal (scikit-learn's GP ``alpha``);
        the starting value when an optimizer fits it.
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
    optimizer : {"fmin_l_bfgs_b", None}, default "fmin_l_bfgs_b"
        Fit the hyperparameters by the marginal likelihood (SciPy's L-BFGS-B); None: keep them.
    n_restarts_optimizer : int, default 0
        Random starts per depth besides the given values.
    fit_depths : tuple of int or None, default (1, 2, 3, 4)
        Depths tried by the optimizer (the best likelihood wins); None: ``depth`` only.
    ard : bool, default False
        Also fit one first-layer weight variance per input feature
        (:attr:`nngp_dask.Architecture.input_weight_var`).
    fit_subset : int, default 1000
        Points the likelihood is maximised on (a random subset when there are more; 0: all).
    random_state : int, RandomState or None
        Draws the subset and the restarts.
    normalize_y : bool, default False
        Standardise each target column (mean 0, variance 1) before fitting; predictions, standard
        deviations and samples are mapped back.

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
        The architecture used (fitted with an optimizer).
    noise_, amplitude_ : float
        The noise variance used and the amplitude multiplying ``K + noise_ I`` (1 without optimizer).
    log_marginal_likelihood_value_ : float
        Of the (normalised) training targets: exact in memory; out of core, that of the fitting
        subset (NaN without an optimizer).
    fit_result_ : FitResult or None
        The optimizer's result (:class:`nngp_dask.select.FitResult`).

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
        normalize_y: bool = False,
    ) -> None:
        super().__init__(depth=depth, activation=activation, weight_var=weight_var, bias_var=bias_var, noise=noise,
                         kind=kind, normalize=normalize, out_of_core=out_of_core, store=store, tile=tile, dtype=dtype,
                         max_in_memory=max_in_memory, optimizer=optimizer, n_restarts_optimizer=n_restarts_optimizer,
                         fit_depths=fit_depths, ard=ard, fit_subset=fit_subset, random_state=random_state)
        self.normalize_y = normalize_y

    def fit(self, X: Any, y: Any) -> NNGPRegressor:
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
        X, y = validate(self, X, y, multi_output=True, y_numeric=True, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        self._y_1d = y.ndim == 1
        y2 = y.reshape(y.shape[0], -1)
        if self.normalize_y:
            std = y2.std(axis=0)
            self._y_mean, self._y_std = y2.mean(axis=0), np.where(std > 0, std, 1.0)
        else:
            self._y_mean, self._y_std = np.zeros(y2.shape[1]), np.ones(y2.shape[1])
        self._fit_targets(X, (y2 - self._y_mean) / self._y_std)
        return self

    def predict(self, X: Any, return_std: bool = False) -> NDArray | tuple[NDArray, NDArray]:
        """Posterior mean, and optionally the posterior standard deviation of the latent function.

        Parameters
        ----------
        X : array_like, shape (n_queries, n_features)
        return_std : bool
            Also return ``sqrt(amplitude_ (K(x*, x*) - k*^T (K + noise_ I)^{-1} k*))`` (without the
            noise, as :class:`~sklearn.gaussian_process.GaussianProcessRegressor` with ``alpha=noise``).
            On the out-of-core path this solves against the stored kernel (one batched solve
            per 256 queries).

        Returns
        -------
        mean : ndarray, shape (n_queries,) or (n_queries, n_outputs)
        std : ndarray, shape (n_queries,) or (n_queries, n_outputs), with ``return_std``
        """
        xs = self._prepare(X)
        if not return_std:
            mean = self._posterior_mean(xs) * self._y_std + self._y_mean
            return mean[:, 0] if self._y_1d else mean
        mean, var = self._posterior_mean_var(xs)
        mean = mean * self._y_std + self._y_mean
        std = np.sqrt(np.maximum(var, 0.0))[:, None] * self._y_std
        if self._y_1d:
            return mean[:, 0], std[:, 0]
        return mean, std

    def sample_y(self, X: Any, n_samples: int = 1, random_state: Any = 0) -> NDArray:
        """Draws of the latent function at ``X`` from the posterior (as GaussianProcessRegressor).

        Parameters
        ----------
        X : array_like, shape (n_queries, n_features)
        n_samples : int
        random_state : int, RandomState or None

        Returns
        -------
        ndarray, shape (n_queries, n_samples), or (n_queries, n_outputs, n_samples)
        """
        if isinstance(n_samples, bool) or not isinstance(n_samples, (int, np.integer)) or n_samples < 1:
            raise ValueError(f"n_samples: expected an integer >= 1, got {n_samples!r}")
        mean, cov = self._posterior_cov(self._prepare(X))
        rng = check_random_state(random_state)
        draws = [rng.multivariate_normal(mean[:, j] * self._y_std[j] + self._y_mean[j],
                                         cov * self._y_std[j] ** 2, n_samples).T for j in range(mean.shape[1])]
        return draws[0] if self._y_1d else np.stack(draws, axis=1)


class NNGPClassifier(ClassifierMixin, NNGPBase):
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
    optimizer, n_restarts_optimizer, fit_depths, ard, fit_subset, random_state
        As :class:`NNGPRegressor`: the marginal likelihood of the class targets (each a GP
        output sharing the kernel).
    targets : {"centered", "onehot"}, default "centered"

    Attributes
    ----------
    classes_ : ndarray, shape (n_classes,)
    alpha_ : ndarray, shape (n_samples, n_classes)
    n_features_in_ : int
    out_of_core_, store_, arch_, noise_, amplitude_, log_marginal_likelihood_value_, fit_result_
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
        optimizer: str | None = "fmin_l_bfgs_b",
        n_restarts_optimizer: int = 0,
        fit_depths: tuple[int, ...] | None = (1, 2, 3, 4),
        ard: bool = False,
        fit_subset: int = 1000,
        random_state: Any = None,
        targets: str = "centered",
    ) -> None:
        super().__init__(depth=depth, activation=activation, weight_var=weight_var, bias_var=bias_var, noise=noise,
                         kind=kind, normalize=normalize, out_of_core=out_of_core, store=store, tile=tile, dtype=dtype,
                         max_in_memory=max_in_memory, optimizer=optimizer, n_restarts_optimizer=n_restarts_optimizer,
                         fit_depths=fit_depths, ard=ard, fit_subset=fit_subset, random_state=random_state)
        self.targets = targets

    def fit(self, X: Any, y: Any) -> NNGPClassifier:
        """Fit on class labels ``y`` (n_samples,) of any type.

        Returns
        -------
        self
        """
        X, y = validate(self, X, y, dtype=np.float64)
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
