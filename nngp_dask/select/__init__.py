"""Hyperparameter selection: sweeps over architectures and noises that reuse one input Gram matrix."""

from .evaluate import MarginalLikelihood, marginal_likelihood
from .grids import CRITERIA, EIGH_MIN_NOISES, GRID_DEFAULTS, GRID_KEYS, SOLVERS, TASKS, sweep_kernels
from .result import SweepResult
from .sweep import run_sweep

__all__ = [
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
