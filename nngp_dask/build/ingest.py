"""Ingest: inputs (an array, a file or a URL) opened once, checked, normalised and fingerprinted
by streaming them in row chunks, so that no input ever has to fit in memory twice."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

from ..kernels import NORMALIZATIONS, InputError, check_inputs, normalize as normalize_rows
from ..store import ArraySource, as_source, open_source

__all__ = ["PreparedInputs", "block_hash", "prepare_inputs"]

#: rows per chunk when streaming inputs that are not yet tiled
_STREAM_ROWS = 4096


@dataclass(frozen=True)
class PreparedInputs:
    """A validated, normalised input source and the fingerprint of what will be stored."""

    source: ArraySource
    normalize: str
    n: int
    d: int
    fingerprint: str
    name: str = "x"
    #: smallest and largest squared norm of the normalised rows (they bound the kernel's diagonals)
    sqnorm_range: tuple[float, float] = (0.0, 0.0)

    def chunks(self, rows: int = _STREAM_ROWS, first: int = 0, stop: int | None = None):
        """Yield ``(start, block)`` of normalised float64 rows, blocks ``first``, ``first + 1``, ...
        of ``rows`` rows, up to row ``stop`` (default: all). Each raw block is checked before it is
        normalised (a NaN would become a row of zeros), naming the row and column of the input."""
        end = self.n if stop is None else min(stop, self.n)
        for start in range(first * rows, end, rows):
            block = self.source.read(start, min(start + rows, end))
            block = check_inputs(block.reshape(block.shape[0], -1), self.name, row_offset=start)
            yield start, normalize_rows(np.asarray(block, dtype=np.float64), self.normalize)


def block_hash(block: np.ndarray) -> str:
    """Fingerprint of one block of normalised rows (float64, as stored): an append is recognised
    by comparing these, block by block, with those recorded when the store was ingested."""
    return hashlib.blake2b(np.ascontiguousarray(block, dtype=np.float64).tobytes(), digest_size=16).hexdigest()


def prepare_inputs(x: ArrayLike | ArraySource | str | os.PathLike, *, name: str = "x", key: str | None = None,
                   normalize: str = "none", features: int | None = None) -> PreparedInputs:
    """Validate and fingerprint inputs in one streaming pass (nothing is written).

    Raises :class:`~nngp_dask.InputError` naming the row and column of the first NaN or Inf of
    the raw inputs (before they are normalised).
    """
    if normalize not in NORMALIZATIONS:
        raise InputError(f"normalize: expected one of {list(NORMALIZATIONS)}, got {normalize!r}")
    src = open_source(x, key=key) if isinstance(x, (str, os.PathLike)) else as_source(x, name)
    shape = tuple(src.shape)
    if len(shape) < 2:
        raise InputError(f"{name}: expected a 2-D array (n_samples, n_features), got shape {shape}")
    n, d = shape[0], int(np.prod(shape[1:]))
    if n == 0 or d == 0:
        raise InputError(f"{name}: expected a non-empty array, got shape {shape}")
    if features is not None and d != features:
        raise InputError(f"{name}: expected {features} features (as the training inputs), got {d}")
    if np.dtype(src.dtype).kind not in "biuf":
        raise InputError(f"{name}: expected a numeric array, got dtype {src.dtype}")
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{n}x{d}:{normalize}".encode())
    prepared = PreparedInputs(src, normalize, n, d, "", name)
    low, high = np.inf, 0.0
    for _, block in prepared.chunks():
        h.update(np.ascontiguousarray(block).tobytes())
        with np.errstate(over="ignore"):  # an overflow shows as inf, which build_kernel names
            sq = np.einsum("ij,ij->i", block, block)
        low, high = min(low, float(sq.min())), max(high, float(sq.max()))
    return PreparedInputs(src, normalize, n, d, h.hexdigest(), name, (low, high))
