"""nngp-dask: NNGP and NTK Gaussian-process inference at any scale, tiled with Dask and stored in Zarr."""

from ._version import __version__
from .activations import ACTIVATIONS, Activation, Elementwise, Erf, Step, TwoSlope, get_activation
from .architecture import Architecture
from .inputs import InputError, normalize
from .kernel import diagonals, kernel, tile

__all__ = [
    "__version__",
    "ACTIVATIONS",
    "Activation",
    "Architecture",
    "Elementwise",
    "Erf",
    "InputError",
    "Step",
    "TwoSlope",
    "diagonals",
    "get_activation",
    "kernel",
    "normalize",
    "tile",
]
