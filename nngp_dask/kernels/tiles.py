"""NNGP and NTK kernels of fully connected networks: per-point diagonals, one tile, in memory.

Everything here is pure arrays in, arrays out: no Dask, no Zarr. The tiled path
(:mod:`nngp_dask.build`) calls :func:`tile` once per tile; :func:`kernel` is the
in-memory twin used for small problems and as the oracle of the tiled path.
"""

from __future__ import annotations

from typing import Literal, overload

import numpy as np
from numpy.typing import ArrayLike, DTypeLike, NDArray
from scipy.linalg import blas

from .. import defaults
from .._blas import SYRK_MAX_N
from . import _recursion as rec
from .activations import FAMILY_HERMITE, Elementwise
from .architecture import Architecture
from .inputs import check_inputs

__all__ = ["KINDS", "KernelOverflowError", "ard_scaled", "diagonals", "input_gram", "tile", "tile_from_gram", "kernel",
           "check_kind", "check_dtype", "check_architecture", "check_range", "overflow_reason", "all_finite",
           "diagonals_from_norms"]

# The overloads of tile, tile_from_gram and kernel type kind="both" (a literal at every call that wants it) as the
# (nngp, ntk) pair and any other string as one kernel: kinds read at run time (a config, a store, an estimator's
# parameter) are single kinds, refused by check_kind otherwise. mypy calls the two overlapping ([overload-overlap]):
# a str could hold "both".
KINDS: tuple[str, ...] = ("nngp", "ntk")


class KernelOverflowError(ValueError):
    """The kernel's values overflow: too many layers or too large a weight variance for the
    storage dtype, or inputs too large to square. Raised before a non-finite value is stored."""


def check_architecture(arch: object) -> Architecture:
    """``arch`` itself, or TypeError naming what was expected."""
    if not isinstance(arch, Architecture):
        raise TypeError(f"arch: expected an Architecture (e.g. Architecture(depth=3, activation='relu')), "
                        f"got {type(arch).__name__} {arch!r:.60}")
    return arch


def ard_scaled(arch: Architecture, x: NDArray) -> NDArray:
    """``x`` with feature ``i`` scaled by ``sqrt(input_weight_var[i])`` (ARD), or ``x`` itself.

    Every kernel function applies it at its entry, so stored inputs stay unscaled and the ARD
    weights live in the architecture (the store's identity) alone.

    Raises
    ------
    ValueError
        When ``input_weight_var`` does not hold one value per column of ``x``.
    """
    scale = arch.input_scale
    if scale is None:
        return x
    if scale.shape[0] != x.shape[-1]:
        raise ValueError(f"input_weight_var: expected {x.shape[-1]} values (one per input feature), "
                         f"got {scale.shape[0]}")
    return x * scale.astype(x.dtype if x.dtype == np.float32 else np.float64)


def all_finite(values: NDArray) -> bool:
    """Whether every entry is finite, in one pass without a temporary for the usual case: a
    finite sum proves it (a NaN or Inf always makes the sum non-finite); only a sum that
    overflowed is looked at entry by entry."""
    with np.errstate(over="ignore", invalid="ignore"):
        return bool(np.isfinite(values.sum())) or bool(np.isfinite(values).all())


def overflow_reason(arch: Architecture, diags: NDArray, *, dtype: DTypeLike = np.float32,
                    sqnorm_max: float | None = None, all_depths: bool = False) -> str | None:
    """Why kernel values built on the per-layer diagonals ``diags`` (L + 1, n) overflow, or None.

    Every kernel here is positive semi-definite, so ``|K^L(x, x')| <= max_x K^L(x, x)``: the
    diagonals bound the whole kernel. The recursion runs in float64 and only the last layer is
    stored in ``dtype`` (every layer with ``all_depths``); the Gram block is computed in
    ``dtype`` from inputs of squared norm at most ``sqnorm_max``.
    """
    limit = float(np.finfo(check_dtype(dtype)).max)
    name = np.dtype(dtype).name
    with np.errstate(invalid="ignore"):
        peak = np.max(np.where(np.isfinite(diags), np.abs(diags), np.inf), axis=1)
    if sqnorm_max is not None and not sqnorm_max <= limit:
        return (f"the inputs are too large: their largest squared norm is {sqnorm_max:.3g}, beyond {name}'s range "
                f"({limit:.3g}); scale the inputs (e.g. normalize='unit_norm')")
    if not np.isfinite(peak[0]) or ((arch.depth == 0 or all_depths) and peak[0] > limit):
        return (f"the input layer overflows: bias_var + weight_var |x|^2 / d reaches {peak[0]:.3g} with "
                f"weight_var={arch.weight_var}; scale the inputs (e.g. normalize='unit_norm') or lower weight_var")
    if np.all(np.isfinite(peak)) and np.all(peak[0 if all_depths else -1:] <= limit):
        return None
    bad = int(np.argmax(~np.isfinite(peak) | (peak > limit)))
    return (f"the recursion overflows {name} ({limit:.3g}) at layer {bad} of depth={arch.depth} with "
            f"weight_var={arch.weight_var}, bias_var={arch.bias_var}, activation {arch.activation.name!r}; "
            "lower depth or weight_var, use dtype='float64', or scale the inputs")


def check_range(arch: Architecture, diags: NDArray | list[NDArray], *, dtype: DTypeLike = np.float32,
                sqnorm_max: float | None = None, all_depths: bool = False, where: str = "kernel") -> None:
    """Raise :class:`KernelOverflowError` (``where`` names the kernel) when the kernel built on
    these per-layer diagonals (NNGP, and NTK when used) would hold non-finite values."""
    for d in diags if isinstance(diags, list) else [diags]:
        reason = overflow_reason(arch, d, dtype=dtype, sqnorm_max=sqnorm_max, all_depths=all_depths)
        if reason:
            raise KernelOverflowError(f"{where} would hold non-finite values: {reason}")


def check_kind(kind: str, arch: Architecture, *, allow_both: bool = False) -> None:
    """Refuse unknown kinds and the NTK of activations without a derivative kernel."""
    allowed = KINDS + (("both",) if allow_both else ())
    if kind not in allowed:
        raise ValueError(f"kind: expected one of {list(allowed)}, got {kind!r}")
    if kind != "nngp" and not arch.activation.has_ntk:
        raise ValueError(
            f"kind: the NTK of activation {arch.activation.name!r} is undefined (its derivative is a Dirac delta); "
            "expected kind='nngp' or another activation"
        )


def check_dtype(dtype: DTypeLike) -> np.dtype:
    """float32 or float64, else ValueError."""
    try:
        dt = np.dtype(dtype)
    except TypeError as exc:
        raise ValueError(f"dtype: expected 'float32' or 'float64', got {dtype!r}") from exc
    if dt not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise ValueError(f"dtype: expected 'float32' or 'float64', got {dtype!r}")
    return dt


def _hermite(arch: Architecture, k_diag: NDArray) -> tuple[NDArray, NDArray]:
    """Series coefficients per layer and point, (L, K + 1, n) each (placeholders for closed forms)."""
    act = arch.activation
    depth, n = arch.depth, k_diag.shape[1]
    if act.family != FAMILY_HERMITE or depth == 0:
        dummy = rec.empty_hermite(depth, n)
        return dummy, dummy
    assert isinstance(act, Elementwise)
    coefs = [act.coefficients(k_diag[layer]) for layer in range(depth)]
    return (np.ascontiguousarray(np.stack([a.T for a, _ in coefs])),
            np.ascontiguousarray(np.stack([b.T for _, b in coefs])))


def _point_recursion(arch: Architecture, sqnorm: NDArray, d: int, *, ntk: bool) -> tuple[NDArray, NDArray | None]:
    """(K^l(x, x), Theta^l(x, x)) for l = 0..L, each (L + 1, n) float64; Theta is None unless ``ntk``.

    Theta is only carried when asked for: for activations without an NTK (the step, whose
    derivative kernel is infinite on the diagonal) it would be ``inf * 0 = nan``.
    """
    return _diagonal_recursion(arch, arch.bias_var + arch.input_layer_weight / d * sqnorm, ntk=ntk)


def _diagonal_recursion(arch: Architecture, k0: NDArray, *, ntk: bool) -> tuple[NDArray, NDArray | None]:
    """:func:`_point_recursion` from the layer-0 diagonal ``k0`` (n,)."""
    n = k0.shape[0]
    k = np.empty((arch.depth + 1, n))
    k[0] = k0
    t = None
    if ntk:
        t = np.empty((arch.depth + 1, n))
        t[0] = k[0]
    e, ed = np.empty(n), np.empty(n)
    p0, p1 = arch.activation.params
    for layer in range(arch.depth):
        s = np.sqrt(np.maximum(k[layer], 0.0))
        ha, hb = _hermite(arch.replace(depth=1), k[layer : layer + 1])
        rec.dual_points(k[layer], s, ha, hb, arch.activation.family, p0, p1, e, ed)
        k[layer + 1] = arch.bias_var + arch.weight_var * e
        if t is not None:
            t[layer + 1] = k[layer + 1] + arch.weight_var * t[layer] * ed
    return k, t


def diagonals(arch: Architecture, x: ArrayLike, *, kind: str = "nngp") -> NDArray:
    """Per-layer diagonals ``K^l(x_i, x_i)`` (or ``Theta^l``) for ``l = 0..L``.

    Computed once per point (O(n L)) and handed to every tile. They equal the diagonal
    of :func:`kernel` up to the rounding of the storage dtype.

    Parameters
    ----------
    arch : Architecture
    x : array_like, shape (n, d)
        Inputs (already normalised; ARD scaling is applied here).
    kind : {"nngp", "ntk"}

    Returns
    -------
    ndarray, shape (L + 1, n), float64
    """
    check_kind(kind, check_architecture(arch))
    x = ard_scaled(arch, check_inputs(x, "x"))
    with np.errstate(over="ignore"):  # overflow shows as inf, which check_range names
        sqnorm = np.einsum("ij,ij->i", x, x, dtype=np.float64)
    k, t = _point_recursion(arch, sqnorm, x.shape[1], ntk=kind == "ntk")
    return k if t is None else t


def diagonals_from_norms(arch: Architecture, sqnorm: ArrayLike, features: int, *, kind: str = "nngp") -> NDArray:
    """:func:`diagonals` of points given by their squared norms ``sqnorm`` (n,) in ``features``
    dimensions (the diagonal depends on nothing else): (L + 1, n) float64, inf where it overflows."""
    check_kind(kind, check_architecture(arch))
    with np.errstate(all="ignore"):
        k, t = _point_recursion(arch, np.asarray(sqnorm, dtype=np.float64), features, ntk=kind == "ntk")
    return k if t is None else t


def _sqnorm_max(x: NDArray) -> float:
    with np.errstate(over="ignore"):
        return float(np.max(np.einsum("ij,ij->i", x, x, dtype=np.float64)))


def _pin_diagonal(arch: Architecture, diag: NDArray, out_k: NDArray, out_t: NDArray | None, all_depths: bool) -> None:
    """Write the per-point diagonals into a symmetric block's diagonal: the NNGP's as given (from
    :func:`diagonals`), the NTK's by the same point recursion from them. The fused recursion
    computes them too, but on an AVX-512 machine the Hermite family's differed from the point
    recursion's in the last bit for some entries and not others, by the block's width (the
    vectorised part of a row against its remainder: the likely cause is fused multiply-adds)."""
    t = _diagonal_recursion(arch, np.asarray(diag[0], dtype=np.float64), ntk=True)[1] if out_t is not None else None
    layers = range(arch.depth + 1) if all_depths else (arch.depth,)
    for slot, layer in enumerate(layers):
        np.fill_diagonal(out_k[slot], diag[layer])
        if out_t is not None and t is not None:
            np.fill_diagonal(out_t[slot], t[layer])


def _layer_roots(diag: NDArray, depth: int) -> tuple[NDArray, NDArray]:
    s = np.sqrt(np.maximum(diag[: max(depth, 1)], 0.0))
    r = np.divide(1.0, s, out=np.zeros_like(s), where=s > 0)
    return np.ascontiguousarray(s), np.ascontiguousarray(r)


def input_gram(x_rows: NDArray, x_cols: NDArray, dtype: np.dtype, symmetric: bool) -> NDArray:
    """The input Gram ``x_rows @ x_cols.T`` of a block in ``dtype``: the one GEMM of a tile.

    Parameters
    ----------
    x_rows : ndarray, shape (m, d)
    x_cols : ndarray, shape (n, d)
        Ignored when ``symmetric`` (the block is ``x_rows`` against itself).
    dtype : numpy.dtype
        float32 or float64: the precision of the product and of every kernel derived from it.
    symmetric : bool
        One SYRK instead of a GEMM; then only the upper triangle of the result is valid
        (:func:`tile_from_gram` reads only that triangle and mirrors the kernel).

    Returns
    -------
    ndarray, shape (m, n), of ``dtype``
    """
    a = np.ascontiguousarray(x_rows, dtype=dtype)
    if symmetric and len(a) > SYRK_MAX_N:
        # by block rows of the upper triangle: OpenBLAS's threaded syrk overruns a buffer at this
        # order (nngp_dask._blas); numpy's matmul takes a GEMM for each block row (the operands'
        # shapes differ) but the last, a syrk of at most SYRK_MAX_N rows
        out = np.empty((len(a), len(a)), dtype=a.dtype)
        for r0 in range(0, len(a), SYRK_MAX_N):
            out[r0:r0 + SYRK_MAX_N, r0:] = a[r0:r0 + SYRK_MAX_N] @ a[r0:].T
        return out
    if symmetric:
        syrk = blas.ssyrk if dtype == np.float32 else blas.dsyrk
        # syrk on the Fortran view a.T computes a @ a.T; asking for its lower triangle
        # (column-major) gives the upper triangle of the C-ordered transpose.
        return syrk(1.0, a.T, trans=1, lower=1).T
    return a @ np.ascontiguousarray(x_cols, dtype=dtype).T


@overload
def tile(arch: Architecture, x_rows: NDArray, x_cols: NDArray, diag_rows: NDArray, diag_cols: NDArray, *,  # type: ignore[overload-overlap]
         kind: Literal["both"], dtype: DTypeLike = ..., all_depths: bool = ..., symmetric: bool = ...
        ) -> tuple[NDArray, NDArray]: ...


@overload
def tile(arch: Architecture, x_rows: NDArray, x_cols: NDArray, diag_rows: NDArray, diag_cols: NDArray, *,
         kind: str = ..., dtype: DTypeLike = ..., all_depths: bool = ..., symmetric: bool = ...) -> NDArray: ...


def tile(
    arch: Architecture,
    x_rows: NDArray,
    x_cols: NDArray,
    diag_rows: NDArray,
    diag_cols: NDArray,
    *,
    kind: str = "nngp",
    dtype: DTypeLike = defaults.STORE_DTYPE,
    all_depths: bool = False,
    symmetric: bool = False,
) -> NDArray | tuple[NDArray, NDArray]:
    """One kernel block ``K(x_rows, x_cols)``: one GEMM, then the fused recursion.

    Inputs are trusted (validated and normalised at the boundary).

    Parameters
    ----------
    arch : Architecture
    x_rows : ndarray, shape (m, d)
    x_cols : ndarray, shape (n, d)
    diag_rows, diag_cols : ndarray, shape (L + 1, m) and (L + 1, n)
        NNGP diagonals of both blocks, from :func:`diagonals`. With ``symmetric`` the
        diagonal entries start from ``diag_rows[0]`` rather than the GEMM's diagonal, and the
        result's diagonal (NNGP and NTK, every depth) is written from these diagonals, so it
        equals :func:`diagonals` of the same points exactly, on any CPU.
    kind : {"nngp", "ntk", "both"}
        ``"both"`` returns ``(nngp, ntk)`` from the same pass.
    dtype : float32 or float64
        Storage (and GEMM) precision; the recursion runs in float64 registers.
    all_depths : bool
        Return every depth ``0..L`` stacked, shape (L + 1, m, n): a depth sweep costs one recursion.
    symmetric : bool
        ``x_rows`` and ``x_cols`` are the same block: compute the upper triangle once and mirror it.

    Returns
    -------
    ndarray, shape (m, n) or (L + 1, m, n)
    """
    dt = check_dtype(dtype)
    x_rows = ard_scaled(arch, x_rows)
    gram = input_gram(x_rows, x_rows if symmetric else ard_scaled(arch, x_cols), dt, symmetric)
    return tile_from_gram(arch, gram, diag_rows, diag_cols, features=x_rows.shape[1], kind=kind,
                          all_depths=all_depths, symmetric=symmetric, overwrite_gram=True)


@overload
def tile_from_gram(arch: Architecture, gram: NDArray, diag_rows: NDArray, diag_cols: NDArray, *, features: int,  # type: ignore[overload-overlap]
                   kind: Literal["both"], all_depths: bool = ..., symmetric: bool = ..., overwrite_gram: bool = ...
                  ) -> tuple[NDArray, NDArray]: ...


@overload
def tile_from_gram(arch: Architecture, gram: NDArray, diag_rows: NDArray, diag_cols: NDArray, *, features: int,
                   kind: str = ..., all_depths: bool = ..., symmetric: bool = ..., overwrite_gram: bool = ...
                  ) -> NDArray: ...


def tile_from_gram(
    arch: Architecture,
    gram: NDArray,
    diag_rows: NDArray,
    diag_cols: NDArray,
    *,
    features: int,
    kind: str = "nngp",
    all_depths: bool = False,
    symmetric: bool = False,
    overwrite_gram: bool = False,
) -> NDArray | tuple[NDArray, NDArray]:
    """The recursion of :func:`tile` on a precomputed Gram block ``x_rows @ x_cols.T``.

    A hyperparameter sweep computes the Gram (the GEMM, the expensive part) once and calls
    this for every (weight_var, bias_var) candidate (:mod:`nngp_dask.select.sweep`).

    Parameters
    ----------
    gram : ndarray, shape (m, n), float32 or float64
        Raw inner products (not divided by ``features``) of the inputs after :func:`ard_scaled`;
        its dtype is the output dtype. With ``symmetric`` only its upper triangle is read.
    features : int
        Input dimension d (the input layer is ``bias_var + weight_var <x, x'> / d``).
    overwrite_gram : bool
        Let the result reuse ``gram``'s memory (saves a block; ``gram`` is then destroyed).

    Other parameters and the result are as for :func:`tile`.
    """
    depth = arch.depth
    dt = gram.dtype
    m, n = gram.shape
    layers = depth + 1 if all_depths else 1
    ntk = kind != "nngp"
    out_k = gram.reshape(1, m, n) if overwrite_gram and not all_depths else np.empty((layers, m, n), dt)
    out_t = np.empty((layers, m, n), dt) if ntk else np.empty((1, 1, 1), dt)
    s_i, r_i = _layer_roots(diag_rows, depth)
    ha_i, hb_i = _hermite(arch, diag_rows)
    if symmetric:
        s_j, r_j, ha_j, hb_j = s_i, r_i, ha_i, hb_i
    else:
        s_j, r_j = _layer_roots(diag_cols, depth)
        ha_j, hb_j = _hermite(arch, diag_cols)
    p0, p1 = arch.activation.params
    k0_i = np.ascontiguousarray(diag_rows[0], dtype=np.float64)
    rec.recurse_block(gram, k0_i, s_i, s_j, r_i, r_j, ha_i, ha_j, hb_i, hb_j, depth, arch.input_layer_weight / features,
                      arch.weight_var, arch.bias_var, arch.activation.family, p0, p1, ntk, all_depths,
                      symmetric, out_k, out_t)
    if symmetric:
        rec.mirror_upper(out_k)
        if ntk:
            rec.mirror_upper(out_t)
        _pin_diagonal(arch, diag_rows, out_k, out_t if ntk else None, all_depths)
    k_out = out_k if all_depths else out_k[0]
    t_out = out_t if all_depths else out_t[0]
    if kind == "nngp":
        return k_out
    if kind == "ntk":
        return t_out
    return k_out, t_out


@overload
def kernel(arch: Architecture, x1: ArrayLike, x2: ArrayLike | None = ..., *, kind: Literal["both"],  # type: ignore[overload-overlap]
           dtype: DTypeLike = ..., all_depths: bool = ...) -> tuple[NDArray, NDArray]: ...


@overload
def kernel(arch: Architecture, x1: ArrayLike, x2: ArrayLike | None = ..., *, kind: str = ..., dtype: DTypeLike = ...,
           all_depths: bool = ...) -> NDArray: ...


def kernel(
    arch: Architecture,
    x1: ArrayLike,
    x2: ArrayLike | None = None,
    *,
    kind: str = "nngp",
    dtype: DTypeLike = defaults.STORE_DTYPE,
    all_depths: bool = False,
) -> NDArray | tuple[NDArray, NDArray]:
    """The NNGP (or NTK) kernel matrix, in memory.

    Parameters
    ----------
    arch : Architecture
    x1 : array_like, shape (m, d)
    x2 : array_like, shape (n, d), optional
        Defaults to ``x1``; then the symmetric kernel is computed with each
        off-diagonal entry evaluated once.
    kind : {"nngp", "ntk", "both"}
    dtype : float32 (default) or float64
    all_depths : bool
        Return shape (L + 1, m, n), one matrix per depth 0..L.

    Returns
    -------
    ndarray, shape (m, n) (or (L + 1, m, n)); a tuple ``(nngp, ntk)`` for ``kind="both"``.

    Examples
    --------
    >>> import numpy as np
    >>> from nngp_dask import Architecture, kernel
    >>> x = np.eye(3)
    >>> kernel(Architecture(1, "relu", 2.0, 0.0), x, dtype="float64").round(3)
    array([[0.667, 0.212, 0.212],
           [0.212, 0.667, 0.212],
           [0.212, 0.212, 0.667]])
    """
    check_kind(kind, check_architecture(arch), allow_both=True)
    dt = check_dtype(dtype)
    a = check_inputs(x1, "x1")
    b = a if x2 is None else check_inputs(x2, "x2", features=a.shape[1])
    diag_a = diagonals(arch, a)
    diag_b = diag_a if x2 is None else diagonals(arch, b)
    # overflow is refused before any tile work: the diagonals bound every entry
    for name, x, d in (("x1", a, diag_a), ("x2", b, diag_b)) if x2 is not None else (("x1", a, diag_a),):
        used = [d] + ([diagonals(arch, x, kind="ntk")] if kind != "nngp" else [])
        check_range(arch, used, dtype=dt, sqnorm_max=_sqnorm_max(ard_scaled(arch, x)), all_depths=all_depths,
                    where=f"kernel of {name}")
    if x2 is None:
        out = tile(arch, a, a, diag_a, diag_a, kind=kind, dtype=dt, all_depths=all_depths, symmetric=True)
    else:
        out = tile(arch, a, b, diag_a, diag_b, kind=kind, dtype=dt, all_depths=all_depths)
    for values in out if isinstance(out, tuple) else (out,):
        if not all_finite(values):  # not expected after check_range; never returned silently
            raise KernelOverflowError(f"kernel: the result holds non-finite values with {arch}; lower depth or "
                                      "weight_var, or scale the inputs")
    return out
