"""Hyperparameter selection: sweeps over architectures and noises that reuse one input Gram matrix."""

from .evaluate import MarginalLikelihood, marginal_likelihood
from .fit import (
    FIT_BOUNDS,
    FitResult,
    fit_hyperparameters,
    profile_log_marginal_likelihood,
    storage_noise_floor,
    subset_size,
)
from .grids import CRITERIA, EIGH_MIN_NOISES, GRID_DEFAULTS, GRID_KEYS, SOLVERS, TASKS, sweep_kernels
from .result import SweepResult
from .sweep import run_sweep

__all__ = [
    "FIT_BOUNDS",
    "FitResult",
    "fit_hyperparameters",
    "profile_log_marginal_likelihood",
    "storage_noise_floor",
    "subset_size",
    "CRITERIA",
    "EIGH_MIN_NOISES",
    "GRID_DEFAULTS",
    "GRID_KEYS",
    "SOLVERS",
    "TASKS",
    "sweep_kernels",
    "MarginalLikelihood",
    "marginal_likelihood",
    "SweepResult",
    "run_sweep",
]
