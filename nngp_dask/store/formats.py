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
from numba import njit
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
    """The largest error of a stored value relative to the largest magnitude in its tile: half
    the machine epsilon for floats; for ``int16`` half a level of the tile's range, at most
    ``1 / 65535`` of that magnitude (the range is at most twice it; at most once where the values
    share a sign, as ReLU kernels' do)."""
    return 1.0 / _LEVELS if fmt == QUANTIZED else float(np.finfo(np.dtype(fmt)).eps) / 2


@njit(cache=True, nogil=True)
def _levels(v, lo, inv, out):  # pragma: no cover - compiled
    # one pass, in float64, no temporaries: NumPy's rint((v - lo) / scale) makes five passes over a
    # float64 copy of the tile (40-60 ms a 2048 x 2048 tile against 2-3 ms; RESULTS.md section 22)
    src, dst = v.ravel(), out.ravel()
    for i in range(src.size):
        level = np.int64((np.float64(src[i]) - lo) * inv + 0.5)  # >= 0: truncation rounds half up
        dst[i] = (level if level < 65535 else 65535) - 32768


def quantize(values: NDArray) -> tuple[NDArray[np.int16], float, float]:
    """``(q, offset, scale)`` with ``values ~ offset + scale * q`` to half a level, ``q`` int16.

    Rounding is to the nearest level, elementwise, so a symmetric tile stays symmetric. A
    constant tile has ``scale`` 0 and is exact. ``values`` must be finite.
    """
    v = np.ascontiguousarray(values)
    lo, hi = (float(v.min()), float(v.max())) if v.size else (0.0, 0.0)
    scale = (hi - lo) / _LEVELS
    q = np.zeros(v.shape, np.int16)
    if scale == 0.0:
        return q, lo, 0.0
    _levels(v, lo, 1.0 / scale, q)
    return q, lo + _ZERO * scale, scale


def dequantize(q: NDArray, offset: float, scale: float, dtype: DTypeLike = np.float32) -> NDArray:
    """``offset + scale * q`` as a new array of ``dtype`` (computed in ``dtype``)."""
    out = q.astype(dtype)
    out *= scale
    out += offset
    return out
