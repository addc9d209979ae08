"""How a store holds a kernel tile's values: ``float32``/``float64`` as computed, or ``int16``.

``int16`` quantises each tile across its own range: 65,536 levels between the tile's minimum and
maximum, ``value = offset + scale * q``, with the tile's ``offset`` and ``scale`` (float64) stored
in its chunk after the values. It halves the bytes of float32 tiles, so a kernel twice the size
stays in the page cache, at a cost in exactness that float16 and bfloat16 cannot meet on NNGP
kernels (nearly constant off the diagonal: their rounding of every entry makes ``K + noise I``
indefinite at MNIST size; benchmarks/RESULTS.md section 19). The error of a value is at most half
a level, ``(max - min) / 131070`` of its tile; products still accumulate in float64.

Pure functions; :class:`~nngp_dask.store.TileIO` reads and writes the chunks.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import DTypeLike, NDArray

__all__ = ["QUANTIZED", "QUANTIZED_NOTE", "SCALES", "STORE_DTYPES", "check_store_dtype", "chunk_nbytes",
           "compute_dtype", "dequantize", "quantize", "stored_itemsize", "unit_roundoff"]

#: The storage formats of a kernel tile (``build_kernel(dtype=...)``, pipelines' ``kernel.dtype``).
STORE_DTYPES = ("float32", "float64", "int16")
#: The quantised format: tiles computed in float32, stored as int16 with a per-tile offset and scale.
QUANTIZED = "int16"
#: What a reader of an int16 kernel array is told (its attribute ``tile_format``).
QUANTIZED_NOTE = ("int16 per tile: each chunk holds the tile's values q (int16, padded to the full tile), then "
                  "offset and scale (two little-endian float64), then the CRC32C of both; value = offset + scale * q. "
                  "Zarr's codecs do not decode the chunks: read them with nngp_dask (KernelStore, TileIO).")
#: An int16 tile's chunk holds its offset and scale (two of these) after the values.
SCALES = np.dtype("<f8")
_LEVELS = 65535  # steps between the smallest and the largest int16
_ZERO = 32768  # q = -32768 stands for the tile's minimum


def check_store_dtype(dtype: DTypeLike) -> str:
    """The storage format's name, or ValueError naming what is accepted."""
    try:
        name = np.dtype(dtype).name
    except TypeError:
        name = None
    if name not in STORE_DTYPES:
        raise ValueError(f"dtype: expected one of {', '.join(map(repr, STORE_DTYPES))}, got {dtype!r}")
    return name


def compute_dtype(fmt: str) -> np.dtype:
    """The precision tiles of format ``fmt`` are computed in (and read back as)."""
    return np.dtype(np.float32 if fmt == QUANTIZED else fmt)


def stored_itemsize(fmt: str) -> int:
    """Bytes per stored kernel entry."""
    return np.dtype(fmt).itemsize


def chunk_nbytes(fmt: str, tile: int) -> int:
    """Bytes of one stored tile's chunk: its values (padded to the full tile), an int16 tile's
    offset and scale, its CRC32C."""
    return tile * tile * stored_itemsize(fmt) + (SCALES.itemsize * 2 if fmt == QUANTIZED else 0) + 4


def unit_roundoff(fmt: str) -> float:
    """The largest error of a stored value relative to the largest in its tile: half a level of
    the tile's range for ``int16`` (a bound: NNGP tiles span less than their largest value),
    half the machine epsilon for floats."""
    return 0.5 / _LEVELS if fmt == QUANTIZED else float(np.finfo(np.dtype(fmt)).eps) / 2


def quantize(values: NDArray) -> tuple[NDArray[np.int16], float, float]:
    """``(q, offset, scale)`` with ``values ~ offset + scale * q`` to half a level, ``q`` int16.

    Rounding is to the nearest level, elementwise, so a symmetric tile stays symmetric. A
    constant tile has ``scale`` 0 and is exact.
    """
    v = np.asarray(values, dtype=np.float64)
    lo, hi = (float(v.min()), float(v.max())) if v.size else (0.0, 0.0)
    scale = (hi - lo) / _LEVELS
    if scale == 0.0:
        return np.zeros(v.shape, np.int16), lo, 0.0
    q = np.rint((v - lo) / scale)
    np.clip(q, 0, _LEVELS, out=q)
    q -= _ZERO
    return q.astype(np.int16), lo + _ZERO * scale, scale


def dequantize(q: NDArray, offset: float, scale: float, dtype: DTypeLike = np.float32) -> NDArray:
    """``offset + scale * q`` as a new array of ``dtype`` (computed in ``dtype``)."""
    out = q.astype(dtype)
    out *= scale
    out += offset
    return out
