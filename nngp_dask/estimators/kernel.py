"""The NNGP/NTK kernel as a scikit-learn ``Kernel``, with gradients for GaussianProcessRegressor."""

from __future__ import annotations

from typing import Any

try:
    from sklearn.gaussian_process.kernels import Hyperparameter, Kernel
except ImportError as exc:  # pragma: no cover - depends on the installation
    raise ImportError("nngp_dask.estimators needs scikit-learn: pip install 'nngp-dask[sklearn]'") from exc

from .. import defaults
from ..kernels import Architecture, check_kind, diagonals, kernel, kernel_log_gradient

__all__ = ["NNGPKernel"]


class NNGPKernel(Kernel):
    """The NNGP (or NTK) kernel as a scikit-learn :class:`~sklearn.gaussian_process.kernels.Kernel`.

    ``weight_var`` and ``bias_var`` are hyperparameters (log-transformed, as scikit-learn's
    ``theta``), so a :class:`~sklearn.gaussian_process.GaussianProcessRegressor` optimises them,
    e.g. in ``NNGPKernel() + WhiteKernel()``; their gradient is the central difference of the
    kernel matrix in log space (:func:`nngp_dask.kernels.kernel_log_gradient`, relative error
    ~1e-9). ``depth``, ``activation`` and ``kind`` are fixed. Bounds ``"fixed"`` hold a
    hyperparameter (its gradient is then absent: ``(n, n, 0)`` when both are fixed); a
    ``bias_var`` of 0 must be fixed (its log is -inf). Inputs are used as given (normalise
    them beforehand).

    Parameters
    ----------
    depth, activation, weight_var, bias_var
        As :class:`nngp_dask.Architecture`.
    kind : {"nngp", "ntk"}
    weight_var_bounds, bias_var_bounds : pair of float or "fixed"
    """

    def __init__(self, depth: int = defaults.DEPTH, activation: str | dict = defaults.ACTIVATION,
                 weight_var: float = defaults.WEIGHT_VAR, bias_var: float = defaults.BIAS_VAR,
                 kind: str = "nngp", weight_var_bounds: Any = (1e-3, 1e4), bias_var_bounds: Any = (1e-6, 1e2)
                 ) -> None:
        self.depth = depth
        self.activation = activation
        self.weight_var = weight_var
        self.bias_var = bias_var
        self.kind = kind
        self.weight_var_bounds = weight_var_bounds
        self.bias_var_bounds = bias_var_bounds

    @property
    def hyperparameter_weight_var(self) -> Hyperparameter:
        return Hyperparameter("weight_var", "numeric", self.weight_var_bounds)

    @property
    def hyperparameter_bias_var(self) -> Hyperparameter:
        return Hyperparameter("bias_var", "numeric", self.bias_var_bounds)

    def _arch(self) -> Architecture:
        arch = Architecture(self.depth, self.activation, self.weight_var, self.bias_var)
        check_kind(self.kind, arch)
        return arch

    def __call__(self, X, Y=None, eval_gradient=False):
        if not eval_gradient:
            return kernel(self._arch(), X, Y, kind=self.kind, dtype="float64")
        if Y is not None:
            raise ValueError("eval_gradient: the gradient can only be evaluated when Y is None")
        # in the order of self.hyperparameters (scikit-learn's theta): alphabetical, fixed ones left out
        names = [h.name for h in self.hyperparameters if not h.fixed]
        arch = self._arch()
        if "bias_var" in names and arch.bias_var <= 0:
            raise ValueError("bias_var: 0 has no log (scikit-learn's theta); expected bias_var > 0 or "
                             "bias_var_bounds='fixed'")
        return kernel(arch, X, kind=self.kind, dtype="float64"), kernel_log_gradient(arch, X, names, kind=self.kind)

    def diag(self, X):
        return diagonals(self._arch(), X, kind=self.kind)[self.depth]

    def is_stationary(self) -> bool:
        return False

    @property
    def requires_vector_input(self) -> bool:
        return True
