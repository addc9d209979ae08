"""The defaults every front end shares: the Python API, pipeline files, the estimators, the sweep
and ``validate-kernel`` read them from here, so a value left out means the same everywhere.

What a default is does not reach a store's identity: a kernel store records the values it was
built with (``Architecture.to_dict`` writes every field), and a solve is keyed by the values it
used, so changing a default here changes only new runs that leave the value out. A build asked,
by default, for other values than a store holds is refused with the field that differs
(``overwrite=True`` or a pipeline, which owns its store, rebuilds).

One difference is kept on purpose (``README.md``, "Defaults", has the table):

* The precision of a *stored* kernel is :data:`STORE_DTYPE` (float32: half the disk, memory and
  read traffic of every CG pass; products still accumulate in float64), while the in-memory
  paths, the scikit-learn estimators and the sweep, compute in :data:`IN_MEMORY_DTYPE` (float64:
  a dense Cholesky of at most a few thousand points, where float64 costs little and scikit-learn's
  checks expect float64 results).
"""

from __future__ import annotations

__all__ = ["ACTIVATION", "BIAS_VAR", "DEPTH", "IN_MEMORY_DTYPE", "NOISE", "STORE_DTYPE", "TOL", "WEIGHT_VAR"]

#: Hidden layers ``L``.
DEPTH = 3
#: Activation name.
ACTIVATION = "relu"
#: ``sigma_w^2``: weights ``N(0, WEIGHT_VAR / fan_in)``. Between tanh's critical 1.0 and ReLU's 2.0,
#: where a deep ReLU kernel does not yet degenerate to a constant (the setting of Lee et al. 2018's
#: good MNIST kernels).
WEIGHT_VAR = 1.6
#: ``sigma_b^2``: biases ``N(0, BIAS_VAR)``.
BIAS_VAR = 0.1
#: Observation noise variance added to the kernel diagonal (``solve`` has no default: it must be given).
NOISE = 0.01
#: Relative residual per right-hand side at which CG stops (``solve``, pipelines, sweeps).
TOL = 1e-5
#: Precision of a stored kernel (``build_kernel``, ``kernel``, pipelines' ``kernel.dtype``).
STORE_DTYPE = "float32"
#: Precision of the in-memory paths (estimators, sweeps).
IN_MEMORY_DTYPE = "float64"
