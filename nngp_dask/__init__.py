"""nngp-dask: NNGP and NTK Gaussian-process inference at any scale, tiled with Dask and stored in Zarr."""

from ._version import __version__
from .activations import ACTIVATIONS, Activation, Elementwise, Erf, Step, TwoSlope, get_activation
from .architecture import Architecture
from .build import BuildError, build_kernel
from .cg import CGResult, ConvergenceWarning, batched_cg
from .gp import SolveResult, predict, solve
from .inputs import InputError, normalize
from .kernel import KernelOverflowError, diagonals, kernel, tile
from .store import (CorruptTileError, IncompleteKernelError, KernelStore, NotAKernelStoreError, StoreLockedError,
                    StoreMismatchError, open_kernel)

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
    "KernelOverflowError",
    "KernelStore",
    "NotAKernelStoreError",
    "SolveResult",
    "Step",
    "StoreLockedError",
    "StoreMismatchError",
    "TwoSlope",
    "batched_cg",
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
