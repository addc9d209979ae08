"""The kernel mathematics: activations and their closed forms, the architecture, input checks, the
compiled NNGP/NTK recursion and one tile of the kernel. Pure functions on arrays: no Dask, no Zarr."""

from .activations import (ACTIVATION_PARAMETERS, ACTIVATIONS, Activation, Elementwise, Erf, Step, TwoSlope,
                          get_activation)
from .architecture import Architecture
from .gram import GramBlock, depth_kernels, gram_block, point_diagonals, recurse_gram
from .inputs import NORMALIZATIONS, InputError, check_inputs, first_nonfinite_row, nonfinite_message, normalize
from .tiles import (KINDS, KernelOverflowError, all_finite, check_architecture, check_dtype, check_kind, check_range,
                    diagonals, diagonals_from_norms, input_gram, kernel, overflow_reason, tile, tile_from_gram)

__all__ = [
    "ACTIVATIONS",
    "ACTIVATION_PARAMETERS",
    "Activation",
    "Elementwise",
    "Erf",
    "Step",
    "TwoSlope",
    "get_activation",
    "Architecture",
    "NORMALIZATIONS",
    "InputError",
    "check_inputs",
    "first_nonfinite_row",
    "nonfinite_message",
    "normalize",
    "KINDS",
    "KernelOverflowError",
    "all_finite",
    "check_architecture",
    "check_dtype",
    "check_kind",
    "check_range",
    "diagonals",
    "diagonals_from_norms",
    "input_gram",
    "kernel",
    "overflow_reason",
    "tile",
    "tile_from_gram",
    "GramBlock",
    "depth_kernels",
    "gram_block",
    "point_diagonals",
    "recurse_gram",
]
