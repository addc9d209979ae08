"""Kernels from a precomputed input Gram: one GEMM shared by every hyperparameter candidate.

The input Gram ``<x, x'>`` does not depend on any hyperparameter: :func:`gram_block` computes it
once and :func:`recurse_gram` derives each candidate's kernel from it by the elementwise
recursion; one recursion per ``(weight_var, bias_var)`` to the deepest depth yields every
shallower depth on the way (:func:`depth_kernels`; over a grid,
:func:`nngp_dask.select.sweep_kernels`). The primitives take a row block and a column
block, so a tiled sweep computes one Gram block per tile. Used by :mod:`nngp_dask.select`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, DTypeLike, NDArray

from .architecture import Architecture
from .inputs import check_inputs
from .tiles import check_dtype, check_kind, diagonals_from_norms, input_gram, tile_from_gram

__all__ = ["GramBlock", "depth_kernels", "gram_block", "point_diagonals", "recurse_gram"]


@dataclass(frozen=True)
class GramBlock:
    """The raw inner products of two blocks of inputs, shared by every candidate.

    Attributes
    ----------
    gram : ndarray, shape (m, n)
        ``x_rows @ x_cols.T`` in the storage dtype; when ``symmetric`` only the upper triangle
        is valid (one SYRK), as in :func:`nngp_dask.kernels.tile`.
    sqnorm_rows, sqnorm_cols : ndarray, shape (m,) and (n,), float64
        ``<x_i, x_i>``, from which every candidate's per-layer diagonals follow in ``O(n L)``.
    features : int
        ``d``, the input dimension (``K^0 = bias_var + weight_var <x, x'> / d``).
    symmetric : bool
        Rows and columns are the same block.
    """

    gram: NDArray
    sqnorm_rows: NDArray[np.float64]
    sqnorm_cols: NDArray[np.float64]
    features: int
    symmetric: bool

    @property
    def shape(self) -> tuple[int, int]:
        return self.gram.shape

    @property
    def dtype(self) -> np.dtype:
        return self.gram.dtype


def _sqnorm(x: NDArray) -> NDArray[np.float64]:
    # exactly what nngp_dask.kernels.diagonals computes, so the diagonals agree to the bit
    return np.einsum("ij,ij->i", x, x, dtype=np.float64)


def gram_block(x_rows: ArrayLike, x_cols: ArrayLike | None = None, *, dtype: DTypeLike = "float64") -> GramBlock:
    """The input Gram of a block (one GEMM, or one SYRK when ``x_cols`` is None).

    Parameters
    ----------
    x_rows : array_like, shape (m, d)
        Inputs, already normalised.
    x_cols : array_like, shape (n, d), optional
        Defaults to ``x_rows`` (symmetric block).
    dtype : {"float32", "float64"}
        Precision of the GEMM and of every kernel derived from it.

    Returns
    -------
    GramBlock
    """
    dt = check_dtype(dtype)
    a = check_inputs(x_rows, "x_rows")
    if x_cols is None:
        s = _sqnorm(a)
        return GramBlock(input_gram(a, a, dt, True), s, s, a.shape[1], True)
    b = check_inputs(x_cols, "x_cols", features=a.shape[1])
    return GramBlock(input_gram(a, b, dt, False), _sqnorm(a), _sqnorm(b), a.shape[1], False)


def point_diagonals(arch: Architecture, sqnorm: NDArray, d: int, kind: str) -> tuple[NDArray, NDArray]:
    """(NNGP diagonals (L + 1, n) that the recursion needs, prior diagonals of ``kind``)."""
    k = diagonals_from_norms(arch, sqnorm, d)
    return k, (k if kind == "nngp" else diagonals_from_norms(arch, sqnorm, d, kind=kind))


def recurse_gram(arch: Architecture, block: GramBlock, *, kind: str = "nngp", all_depths: bool = False) -> NDArray:
    """One candidate's kernel block from a precomputed Gram: the recursion only, no GEMM.

    Equals ``nngp_dask.kernels.tile(arch, x_rows, x_cols, ...)`` (same Gram, same compiled
    recursion, same diagonals) while leaving ``block.gram`` untouched for the next candidate.

    Parameters
    ----------
    arch : Architecture
    block : GramBlock
        From :func:`gram_block`; its dtype is the output dtype.
    kind : {"nngp", "ntk"}
    all_depths : bool
        Return every depth ``0..arch.depth``, shape (L + 1, m, n), from this one pass.

    Returns
    -------
    ndarray, shape (m, n) or (L + 1, m, n)
    """
    check_kind(kind, arch)
    if arch.input_weight_var is not None:
        raise ValueError("input_weight_var: a shared Gram block holds unscaled inputs; expected an isotropic "
                         "architecture (input_weight_var=None), or nngp_dask.kernels.kernel for ARD")
    d = block.features
    diag_rows, _ = point_diagonals(arch, block.sqnorm_rows, d, "nngp")
    diag_cols = diag_rows if block.symmetric else point_diagonals(arch, block.sqnorm_cols, d, "nngp")[0]
    return tile_from_gram(arch, block.gram, diag_rows, diag_cols, features=d, kind=kind, all_depths=all_depths,
                          symmetric=block.symmetric)


def depth_kernels(arch_max: Architecture, block: GramBlock, depths: Sequence[int], kind: str, stacked: bool
                   ) -> Iterator[tuple[int, NDArray]]:
    """``(depth, K)`` for each requested depth: one all-depths recursion (``stacked``), or one
    recursion per depth when the stack would not fit in memory (still no GEMM)."""
    if stacked:
        stack = recurse_gram(arch_max, block, kind=kind, all_depths=True)
        for depth in depths:
            yield depth, stack[depth]
    else:
        for depth in depths:
            yield depth, recurse_gram(arch_max.replace(depth=depth), block, kind=kind)
