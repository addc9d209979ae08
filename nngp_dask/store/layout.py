"""The Zarr v3 layout of a kernel store and its identity: the one module that names its paths.

Layout (one group per run; every array uncompressed, because kernel values do not compress
and every CG iteration reads them)::

    <store>/                      attrs["nngp_dask"]: identity (see :class:`StoreIdentity`)
      inputs/x_train   (n, d)     float64, row chunks of one tile, normalised once at ingest
      inputs/x_test    (m, d)
      diagonals/train  (L+1, n)   float64, K^l(x, x) for l = 0..L (NNGP; NTK adds theta_*)
      diagonals/test   (L+1, m)
      kernel/train_train (n, n)   dtype, chunks (tile, tile); only tiles I <= J are written
      kernel/test_train  (m, n)   dtype, chunks (tile, tile); every tile
                                  (dtype int16: each chunk also holds its tile's offset and scale,
                                  see :mod:`nngp_dask.store.formats`)
      kernel/test_prior  (m,)     float64, K(x*, x*) of the chosen kind
      done/train_train (nI, nJ)   uint8, one chunk per tile: 1 once the tile is written
      done/test_train  (mI, nJ)
      solves/<key>/...            solver checkpoints and solutions (see nngp_dask.solve)

A tile is recorded in ``done`` only after its write returned (write, then record), and
each chunk write replaces the chunk file atomically on local disks, so the record never
claims a tile that is not fully on disk.

Integrity (format 2): every chunk of the data arrays ends with its CRC32C (zarr v3's
``crc32c`` codec after the ``bytes`` codec). Kernel tiles are read and written by
:class:`TileIO`, which checks the checksum, the chunk's size and that a recorded tile's chunk
exists (zarr itself would read a missing chunk as fill values); a damaged tile raises
:class:`CorruptTileError` naming it, and its completion record is cleared so that the next
build rewrites it. A resumed build also checks that every recorded tile's chunk is there with
its size (:meth:`KernelStore.check_tiles`).

Every other module asks here for a path (:func:`kernel_path`, :func:`done_path`, ...) and for
whether a location is local or remote (:func:`is_remote`), so the layout has one owner.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any, cast

import zarr
from zarr.codecs import BytesCodec, Crc32cCodec
from zarr.core.common import AccessModeLiteral
from zarr.core.metadata import ArrayV3Metadata

from .._version import __version__
from .errors import NotAKernelStoreError

__all__ = [
    "ATTR", "DIAGONALS", "DONE", "FORMAT_VERSION", "INPUTS", "KERNEL", "SOLVES", "TEST_PRIOR",
    "StoreIdentity", "array_codecs", "check_free_space",
    "diagonals_path", "dimension_names", "done_path", "format_message", "has_checksum",
    "inputs_path", "is_remote", "kernel_path", "local_chunk_file", "normalise_url", "open_group",
    "remove_interrupted_writes", "solve_path",
]

#: 2: every data chunk ends with its CRC32C (format 1 had no checksums)
FORMAT_VERSION = 2
ATTR = "nngp_dask"
#: Whether new stores get checksums. Only benchmarks/bench_checksum.py turns this off (in the
#: driver process) to measure what the checksums cost; a store without them is refused otherwise.
CHECKSUMS = True


def is_remote(url: str | os.PathLike) -> bool:
    """Whether ``url`` names object storage or another fsspec file system (``scheme://...``)
    rather than a local path."""
    return "://" in os.fspath(url)


def check_free_space(url: str | os.PathLike, nbytes: int, what: str, *, field: str = "store",
                     advice: str = "free space, or put the store on a larger disk") -> None:
    """Raise :class:`OSError` with one line (``field``, ``what``, the bytes needed and free,
    ``advice``) when the local disk holding ``url`` has less than ``nbytes`` (and 2 % more) free;
    nothing for object storage, which has no such limit to ask."""
    if is_remote(url):
        return
    folder = os.path.abspath(os.fspath(url))
    while not os.path.isdir(folder) and os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)  # the store may not exist yet: its nearest existing parent
    free = shutil.disk_usage(folder).free
    if free < nbytes * 1.02:
        from dask.utils import format_bytes

        raise OSError(f"{field}: {what}: {format_bytes(nbytes)} needed at {os.fspath(url)!r}, {format_bytes(free)} "
                      f"free on its disk; {advice}")


# --- paths inside a store -------------------------------------------------------------------
#: The groups of a store (``solves`` holds one group per solve, see :func:`solve_path`).
INPUTS, DIAGONALS, KERNEL, DONE, SOLVES = "inputs", "diagonals", "kernel", "done", "solves"
#: The prior variances of the test inputs, ``K(x*, x*)``.
TEST_PRIOR = "kernel/test_prior"


def inputs_path(name: str) -> str:
    """The stored (normalised) inputs of ``name`` (``"train"`` or ``"test"``)."""
    return f"{INPUTS}/x_{name}"


def diagonals_path(name: str, ntk: bool = False) -> str:
    """Per-layer diagonals of ``name`` (``"train"`` or ``"test"``); ``ntk``: of the NTK (theta)."""
    return f"{DIAGONALS}/{name}" + ("_ntk" if ntk else "")


def kernel_path(part: str) -> str:
    """The kernel array of ``part`` (``"train_train"`` or ``"test_train"``)."""
    return f"{KERNEL}/{part}"


def done_path(part: str) -> str:
    """The completion records (one uint8 per tile) of ``kernel_path(part)``."""
    return f"{DONE}/{part}"


def solve_path(key: str) -> str:
    """The group of one solve's checkpoints and solution."""
    return f"{SOLVES}/{key}"


# Zarr v3 ``dimension_names`` of every array, so that xarray (``xr.open_datatree(url, engine="zarr")``,
# ``xr.open_zarr(url, group=...)``) and other Zarr v3 readers name each axis. Within a group a name
# means one length: the kernel's columns are ``train_col`` (the rows of ``train_train`` and of the
# inputs are ``train``), and a solve's checkpoint slots count their own ``slot_iteration``.
# Metadata only: a store's identity (StoreIdentity) and its tiles do not depend on them, and a store
# written without them opens in nngp-dask as before.
_DIMENSIONS: dict[str, tuple[str, ...]] = {
    inputs_path("train"): ("train", "feature"),
    inputs_path("test"): ("test", "feature"),
    diagonals_path("train"): ("layer", "train"),
    diagonals_path("test"): ("layer", "test"),
    diagonals_path("train", ntk=True): ("layer", "train"),
    diagonals_path("test", ntk=True): ("layer", "test"),
    kernel_path("train_train"): ("train", "train_col"),
    kernel_path("test_train"): ("test", "train_col"),
    TEST_PRIOR: ("test",),
    done_path("train_train"): ("train_tile", "train_col_tile"),
    done_path("test_train"): ("test_tile", "train_col_tile"),
}
# the arrays of one solve (``solves/<key>/<name>``) and of its checkpoint slots (``.../slot<i>/<name>``)
_SOLVE_DIMENSIONS: dict[str, tuple[str, ...]] = {
    "alpha": ("train", "rhs"), "residuals": ("iteration", "rhs"), "lowrank_factor": ("train", "rank"),
    "nystrom_transform": ("landmark", "rank"), "nystrom_landmarks": ("landmark",), "nystrom_gram": ("rank", "rank_col"),
}
_SLOT_DIMENSIONS: dict[str, tuple[str, ...]] = {
    "x": ("train", "rhs"), "r": ("train", "rhs"), "z": ("train", "rhs"), "p": ("train", "rhs"), "rz": ("rhs",),
    "active": ("rhs",), "b_norm": ("rhs",), "residuals": ("slot_iteration", "rhs"), "iteration": (),
}


def dimension_names(path: str) -> tuple[str, ...]:
    """The dimension names of the array at ``path`` inside a store (``create_array(...,
    dimension_names=...)``).

    Parameters
    ----------
    path : str
        From :func:`inputs_path`, :func:`kernel_path`, ..., or ``solve_path(key) + "/" + name``
        (and ``.../slot<i>/<name>`` for a checkpoint).

    Raises
    ------
    KeyError
        For a path this layout does not define (a new array must be named here).
    """
    if path in _DIMENSIONS:
        return _DIMENSIONS[path]
    parts = path.split("/")
    if parts[0] == SOLVES and len(parts) == 3 and parts[2] in _SOLVE_DIMENSIONS:
        return _SOLVE_DIMENSIONS[parts[2]]
    if parts[0] == SOLVES and len(parts) == 4 and parts[2].startswith("slot") and parts[3] in _SLOT_DIMENSIONS:
        return _SLOT_DIMENSIONS[parts[3]]
    raise KeyError(f"store layout: no dimension names for {path!r}")


def array_codecs() -> dict[str, Any]:
    """``create_array`` keywords of every data array: raw little-endian values, then a CRC32C."""
    return {"serializer": BytesCodec(endian="little"), "compressors": [Crc32cCodec()] if CHECKSUMS else None}


@dataclass(frozen=True)
class StoreIdentity:
    """Everything that determines the stored kernel's values; two builds share a store only
    if these are equal."""

    architecture: dict[str, Any]
    kind: str
    tile: int
    dtype: str
    x_train: str  # fingerprint of the stored (normalised) training inputs
    x_test: str | None
    n_train: int
    n_test: int
    features: int

    def token(self) -> str:
        """A short hash of the identity: names tasks and per-worker caches."""
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.blake2b(blob, digest_size=8).hexdigest()

    def train_token(self) -> str:
        """A short hash of what determines the train x train kernel (the identity less the test
        inputs): names solves, which a new test set leaves valid."""
        fields = {k: v for k, v in asdict(self).items() if k not in ("x_test", "n_test")}
        blob = json.dumps(fields, sort_keys=True).encode()
        return hashlib.blake2b(blob, digest_size=8).hexdigest()

    def differences(self, other: StoreIdentity) -> list[str]:
        """Human-readable fields that differ, ``"field: store has A, requested B"``."""
        out = []
        for field, mine in asdict(self).items():
            theirs = getattr(other, field)
            if mine != theirs:
                out.append(f"{field}: store has {mine!r}, requested {theirs!r}")
        return out

    @classmethod
    def from_meta(cls, meta: dict[str, Any], url: str) -> StoreIdentity:
        """The identity recorded in a store's attributes; :class:`NotAKernelStoreError` when its
        fields are not the ones this version writes."""
        data, names = meta.get("identity"), set(cls.__dataclass_fields__)
        if isinstance(data, dict) and set(data) == names:
            return cls(**data)
        if isinstance(data, dict):
            what = "; ".join(part for part in (
                f"unexpected field(s) {sorted(set(data) - names)}" if set(data) - names else "",
                f"missing field(s) {sorted(names - set(data))}" if names - set(data) else "") if part)
        else:
            what = f"no table of fields (got {type(data).__name__}, expected {sorted(names)})"
        raise NotAKernelStoreError(
            f"store: {url!r} is not a valid nngp-dask kernel store for this version: its identity has {what} "
            f"(written by nngp-dask {meta.get('version', 'unknown')}, this is {__version__}); rebuild it with "
            "overwrite=True or use a new store path")


def format_message(url: str, found: Any) -> str:
    """Why a store of another format is refused, and what to do."""
    why = ("written before tile checksums (format 2), so a damaged tile could not be detected"
           if isinstance(found, int) and found < FORMAT_VERSION else "not a format this version reads")
    return (f"store: {url!r} has format {found!r}, {why}; this version reads format {FORMAT_VERSION}: "
            "rebuild it (build_kernel(..., overwrite=True) or a new store path; a pipeline run rebuilds its own store)")


def has_checksum(arr: zarr.Array) -> bool:
    """Whether ``arr``'s chunks end with a CRC32C (format 2)."""
    # the store's arrays are Zarr v3 arrays (array_codecs); v2 metadata has no codecs
    return any(isinstance(c, Crc32cCodec) for c in cast(ArrayV3Metadata, arr.metadata).codecs)


def normalise_url(store: str | os.PathLike) -> str:
    """A store location as one string: a URL as given, a local path made absolute.

    Parameters
    ----------
    store : str or os.PathLike
        A path or an fsspec URL (``scheme://...``).

    Returns
    -------
    str
    """
    s = os.fspath(store)
    return s if is_remote(s) else os.path.abspath(s)


@lru_cache(maxsize=8)
def _cached_group(url: str, options_json: str, mode: AccessModeLiteral) -> zarr.Group:
    options = json.loads(options_json) or None
    return zarr.open_group(url, mode=mode, storage_options=options if is_remote(url) else None)


def open_group(url: str, storage_options: dict | None = None, *, mode: AccessModeLiteral = "r+") -> zarr.Group:
    """Open (and cache per process) the store's root group; used by workers for every tile."""
    return _cached_group(url, json.dumps(storage_options or {}, sort_keys=True), mode)


def local_chunk_file(url: str, array: zarr.Array, coords: tuple[int, ...]) -> str | None:
    """The file that holds chunk ``coords`` of ``array`` in the local store at ``url``; None for a URL."""
    if is_remote(url):
        return None
    return os.path.join(url, *array.path.split("/"), *array.metadata.encode_chunk_key(coords).split("/"))


def remove_interrupted_writes(url: str) -> int:
    """Delete the temporary files of writes that never finished in the local store at ``url``.

    Zarr writes each chunk to ``<name>.<uuid>.partial`` and renames it into place, so a killed
    writer leaves its in-flight chunks behind under those names: never read, but on disk. Call
    only while holding the store's lock. Returns how many files were removed (0 for a URL).
    """
    if is_remote(url):
        return 0
    removed = 0
    for directory, _, files in os.walk(url):
        for name in files:
            if name.endswith(".partial"):
                os.unlink(os.path.join(directory, name))
                removed += 1
    return removed
