"""Validation of the kernel against finite-width networks (Monte Carlo)."""

from .finite_width import (
                           SAMPLING_METHODS,
                           average_kernels,
                           empirical_covariance,
                           sample_kernels,
                           sample_outputs,
                           simulate,
)
from .joint import JointSamples, joint_samples
from .montecarlo import ESTIMATORS, LogLogFit, ValidationResult, default_inputs, layer_map, validate_kernel

__all__ = [
    "SAMPLING_METHODS",
    "average_kernels",
    "empirical_covariance",
    "sample_kernels",
    "sample_outputs",
    "simulate",
    "ESTIMATORS",
    "LogLogFit",
    "ValidationResult",
    "default_inputs",
    "layer_map",
    "validate_kernel",
    "JointSamples",
    "joint_samples",
]
