"""Row-sliceable views of input files, read a chunk at a time where the format allows it.

Every source exposes ``shape``, ``dtype`` and ``read(start, stop) -> ndarray`` (rows
``start:stop`` as a NumPy array), so ingestion never holds more than one chunk of a
memory-mapped ``.npy``, an uncompressed IDX file, a CSV or a Zarr array. Compressed ``.npz``
members and gzip'd IDX files cannot be sliced without decompressing; they are read whole.
Nothing is ever unpickled.
"""

from __future__ import annotations

import gzip
import os
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from numpy.typing import DTypeLike, NDArray

from ..kernels import InputError
from .layout import is_remote

__all__ = ["ArraySource", "as_source", "open_source", "read_all", "read_csv", "IDX_DTYPES"]


class ArraySource(Protocol):
    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def dtype(self) -> np.dtype: ...

    def read(self, start: int, stop: int) -> NDArray: ...


@dataclass(frozen=True)
class _Sliceable:
    """Anything indexable by rows: ndarray, np.memmap, zarr.Array, h5py dataset."""

    array: Any

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.array.dtype)

    def read(self, start: int, stop: int) -> NDArray:
        return np.asarray(self.array[start:stop])


def as_source(x: Any, name: str = "x") -> ArraySource:
    """Wrap an array-like (or an existing source) as a row-sliceable source."""
    if hasattr(x, "read") and hasattr(x, "shape") and not isinstance(x, np.ndarray):
        return x
    if hasattr(x, "shape") and hasattr(x, "__getitem__") and hasattr(x, "dtype"):
        return _Sliceable(x)
    try:
        return _Sliceable(np.asarray(x))
    except (TypeError, ValueError) as exc:
        raise InputError(f"{name}: expected an array or a path, got {type(x).__name__}") from exc


# --- IDX (the MNIST distribution format, LeCun et al.) -------------------------------------
IDX_DTYPES: dict[int, DTypeLike] = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
              0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def _read_idx(path: str) -> NDArray:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        header = f.read(4)
        if len(header) != 4 or header[0] != 0 or header[1] != 0 or header[2] not in IDX_DTYPES:
            raise InputError(f"{path}: not an IDX file (bad magic number {header.hex()})")
        dtype, ndim = np.dtype(IDX_DTYPES[header[2]]), header[3]
        shape = tuple(int.from_bytes(f.read(4), "big") for _ in range(ndim))
        offset = 4 + 4 * ndim
        if path.endswith(".gz"):
            data = np.frombuffer(f.read(), dtype=dtype)
            return data.reshape(shape)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)


def _flatten(arr: Any) -> Any:
    """Images (n, rows, cols) become feature vectors (n, rows * cols); a view for memmaps."""
    if arr.ndim > 2:
        return arr.reshape(arr.shape[0], -1)
    return arr


#: what reading a damaged file raises: a truncated or non-gzip .gz (EOFError, gzip.BadGzipFile, zlib.error), a
#: truncated .npz (zipfile.BadZipFile, EOFError), a truncated .npy (ValueError), undecodable text
_DAMAGED = (OSError, EOFError, ValueError, zlib.error, zipfile.BadZipFile, UnicodeDecodeError)


def _unreadable(path: str, exc: BaseException) -> InputError:
    what = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return InputError(f"path: {path!r} cannot be read ({what}); expected a complete, readable file "
                      "(truncated or damaged?)")


def read_csv(path: str, *, delimiter: str | None = None) -> NDArray:
    """A numeric CSV (optionally gzip'd) with an optional header row, as float64; a damaged or
    truncated file is one :class:`~nngp_dask.InputError` naming it."""
    with _damage_named(path):
        return _read_csv(path, delimiter)


@contextmanager
def _damage_named(path: str) -> Iterator[None]:
    """A damaged file's low-level error (zlib, EOF, a bad zip) as one InputError naming it."""
    try:
        yield
    except InputError:
        raise
    except _DAMAGED as exc:
        raise _unreadable(path, exc) from exc


def _read_csv(path: str, delimiter: str | None) -> NDArray:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        first = f.readline()
        delim = delimiter or ("," if "," in first else None)
        try:
            [float(v) for v in first.strip().split(delim)]
            skip = 0
        except ValueError:
            skip = 1
    with opener(path, "rt") as f:
        try:
            data = np.loadtxt(f, delimiter=delim, skiprows=skip, dtype=np.float64, ndmin=2)
        except ValueError as exc:
            raise InputError(f"{path}: expected a numeric CSV table ({exc})") from exc
    return data


def open_source(path: str | os.PathLike, *, key: str | None = None) -> ArraySource:
    """Open an input file as a row-sliceable source.

    Parameters
    ----------
    path : str or path-like
        ``.npy`` (memory-mapped), ``.npz`` (member ``key``), ``.csv``/``.csv.gz`` (whole
        table; select columns afterwards), IDX (``*-ubyte``/``*.idx``, optionally ``.gz``)
        or a Zarr array (directory or URL; ``key`` selects an array inside a group).
    key : str, optional
        Member of an ``.npz`` archive or array inside a Zarr group.

    Raises
    ------
    InputError
        One line naming the file: missing, of an unsupported format, or damaged (a truncated
        ``.npz``/``.npy``/``.gz``, a ``.gz`` that is not gzip).
    """
    p = os.fspath(path)
    if is_remote(p):
        return _open_source(p, key)
    if not os.path.exists(p):
        raise InputError(f"path: {p!r} does not exist; expected an input file")
    with _damage_named(p):
        return _open_source(p, key)


def _open_source(p: str, key: str | None) -> ArraySource:
    lower = p.lower()
    if lower.endswith(".npy"):
        return _Sliceable(_flatten(np.load(p, mmap_mode="r", allow_pickle=False)))
    if lower.endswith(".npz"):
        with np.load(p, allow_pickle=False) as archive:
            if key is None or key not in archive.files:
                raise InputError(f"key: expected one of {archive.files} for {p!r}, got {key!r}")
            return _Sliceable(_flatten(archive[key]))
    if lower.endswith((".csv", ".csv.gz", ".txt", ".txt.gz")):
        return _Sliceable(read_csv(p))
    if "ubyte" in lower or lower.endswith((".idx", ".idx.gz")):
        return _Sliceable(_flatten(_read_idx(p)))
    if lower.rstrip("/").endswith(".zarr") or is_remote(p):
        import zarr

        node: Any = zarr.open(p, mode="r")  # an array, or a group (to index by key)
        if key is not None:
            node = node[key]
        if not hasattr(node, "shape"):
            raise InputError(f"key: {p!r} is a Zarr group; expected key naming an array in it")
        return _Sliceable(node)
    raise InputError(f"path: unsupported input format {p!r}; expected .npy, .npz, .csv[.gz], IDX or .zarr")


def read_all(source: ArraySource) -> NDArray:
    return source.read(0, source.shape[0])

