"""Gaussian-process regression on a stored kernel: the distributed operator, solve and predict, the
posterior mean and variance, targets and metrics."""

from .likelihood import amplitude_mle
from .metrics import COVERAGE_LEVELS, accuracy, confusion_matrix, coverage, nlpd, rmse
from .operator import KernelLinearOperator, StoredKernelOperator, aslinearoperator
from .posterior import (
    posterior_mean,
    variance_from_cholesky,
    variance_from_eigh,
    variance_from_reduction,
    variance_from_solve,
    variance_lowrank,
)
from .prediction import DENSE_VARIANCE_MAX_N, EXTRAPOLATION_RATIO, extrapolation, predict, variance_mode
from .regression import DIRECT_MAX_N, METHODS, SolveResult, solve
from .targets import TARGETS, class_index, encode_labels, one_hot_targets, predict_labels

__all__ = [
    "TARGETS",
    "class_index",
    "encode_labels",
    "one_hot_targets",
    "predict_labels",
    "amplitude_mle",
    "COVERAGE_LEVELS",
    "coverage",
    "accuracy",
    "confusion_matrix",
    "nlpd",
    "rmse",
    "posterior_mean",
    "variance_from_cholesky",
    "variance_from_eigh",
    "variance_from_reduction",
    "variance_from_solve",
    "variance_lowrank",
    "KernelLinearOperator",
    "StoredKernelOperator",
    "aslinearoperator",
    "DIRECT_MAX_N",
    "METHODS",
    "DENSE_VARIANCE_MAX_N",
    "EXTRAPOLATION_RATIO",
    "SolveResult",
    "extrapolation",
    "predict",
    "solve",
    "variance_mode",
]
