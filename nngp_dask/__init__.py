"""nngp-dask: NNGP and NTK Gaussian-process inference at any scale, tiled with Dask and stored in Zarr."""

from ._version import __version__
from .build import BuildError, build_kernel
from .gp import KernelLinearOperator, SolveResult, aslinearoperator, predict, solve
from .kernels import (
                      ACTIVATIONS,
                      Activation,
                      Architecture,
                      Elementwise,
                      Erf,
                      InputError,
                      KernelOverflowError,
                      Step,
                      TwoSlope,
                      diagonals,
                      get_activation,
                      kernel,
                      normalize,
                      tile,
)
from .linalg import CGResult, ConvergenceWarning, batched_cg
from .store import (
                      CorruptTileError,
                      IncompleteKernelError,
                      KernelStore,
                      NotAKernelStoreError,
                      StoreLockedError,
                      StoreMismatchError,
                      open_kernel,
)

__all__ = [
    "__version__",
    "ACTIVATIONS",
    "Activation",
    "Architecture",
    "BuildError",
    "CGResult",
    "ConvergenceWarning",
    "CorruptTileError",
    "Elementwise",
    "Erf",
    "IncompleteKernelError",
    "InputError",
    "KernelLinearOperator",
    "KernelOverflowError",
    "KernelStore",
    "NotAKernelStoreError",
    "SolveResult",
    "Step",
    "StoreLockedError",
    "StoreMismatchError",
    "TwoSlope",
    "batched_cg",
    "aslinearoperator",
    "build_kernel",
    "diagonals",
    "get_activation",
    "kernel",
    "normalize",
    "open_kernel",
    "predict",
    "solve",
    "tile",
]
