"""The Zarr v3 layout of a kernel store, its identity, completion records and lock.

Layout (one group per run; every array uncompressed, because kernel values do not compress
and every CG iteration reads them)::

    <store>/                      attrs["nngp_dask"]: identity (see :class:`StoreIdentity`)
      inputs/x_train   (n, d)     float64, row chunks of one tile, normalised once at ingest
      inputs/x_test    (m, d)
      diagonals/train  (L+1, n)   float64, K^l(x, x) for l = 0..L (NNGP; NTK adds theta_*)
      diagonals/test   (L+1, m)
      kernel/train_train (n, n)   dtype, chunks (tile, tile); only tiles I <= J are written
      kernel/test_train  (m, n)   dtype, chunks (tile, tile); every tile
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
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import lru_cache
from collections.abc import Iterator
from typing import Any

import google_crc32c
import numpy as np
import zarr
from zarr.codecs import BytesCodec, Crc32cCodec

from ._version import __version__
from .architecture import Architecture
from .tiling import TileGrid

__all__ = [
    "FORMAT_VERSION",
    "normalise_url",
    "KernelStore",
    "StoreIdentity",
    "StoreMismatchError",
    "NotAKernelStoreError",
    "store_contents",
    "StoreLockedError",
    "IncompleteKernelError",
    "CorruptTileError",
    "TileIO",
    "open_kernel",
    "store_lock",
]

log = logging.getLogger("nngp_dask")

#: 2: every data chunk ends with its CRC32C (format 1 had no checksums)
FORMAT_VERSION = 2
ATTR = "nngp_dask"
#: Whether new stores get checksums. Only benchmarks/bench_checksum.py turns this off (in the
#: driver process) to measure what the checksums cost; a store without them is refused otherwise.
_CHECKSUMS = True


class StoreMismatchError(ValueError):
    """The store was built for other inputs, another architecture or other settings."""


class NotAKernelStoreError(StoreMismatchError):
    """The path holds something nngp-dask did not write (a file, a folder of other files, other
    Zarr data) or a store it cannot read (a damaged ``zarr.json``, an identity of another
    version). nngp-dask never writes into it, and never deletes it, even with ``overwrite=True``."""


class StoreLockedError(RuntimeError):
    """Another process holds the store's write lock."""


class IncompleteKernelError(ValueError):
    """A kernel is used before all of its tiles are written."""


class CorruptTileError(IncompleteKernelError):
    """A stored tile failed its CRC32C check, has the wrong size, or is recorded as written but
    its chunk is missing. Its completion record has been cleared: the next build rewrites it."""


def array_codecs() -> dict[str, Any]:
    """``create_array`` keywords of every data array: raw little-endian values, then a CRC32C."""
    return {"serializer": BytesCodec(endian="little"), "compressors": [Crc32cCodec()] if _CHECKSUMS else None}


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

    def differences(self, other: "StoreIdentity") -> list[str]:
        """Human-readable fields that differ, ``"field: store has A, requested B"``."""
        out = []
        for field, mine in asdict(self).items():
            theirs = getattr(other, field)
            if mine != theirs:
                out.append(f"{field}: store has {mine!r}, requested {theirs!r}")
        return out

    @classmethod
    def from_meta(cls, meta: dict[str, Any], url: str) -> "StoreIdentity":
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


def _has_checksum(arr: zarr.Array) -> bool:
    return any(isinstance(c, Crc32cCodec) for c in arr.metadata.codecs)


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
    return s if "://" in s else os.path.abspath(s)


@lru_cache(maxsize=8)
def _cached_group(url: str, options_json: str, mode: str) -> zarr.Group:
    options = json.loads(options_json) or None
    return zarr.open_group(url, mode=mode, storage_options=options if "://" in url else None)


def open_group(url: str, storage_options: dict | None = None, *, mode: str = "r+") -> zarr.Group:
    """Open (and cache per process) the store's root group; used by workers for every tile."""
    return _cached_group(url, json.dumps(storage_options or {}, sort_keys=True), mode)


#: what the root group of something that is not a readable Zarr group raises when opened
_UNREADABLE = (ValueError, KeyError, TypeError, zarr.errors.BaseZarrError)
_VERSIONS_NOTED: set[tuple[str, str | None]] = set()


def _note_version(url: str, written: str | None) -> None:
    """Log once per process and store that it was written by another package version (the
    format number, checked separately, is what decides whether it can be read)."""
    if written != __version__ and (url, written) not in _VERSIONS_NOTED:
        _VERSIONS_NOTED.add((url, written))
        log.warning(
            "store %s was written by nngp-dask %s; this is nngp-dask %s (same format %d, so it is used as it is)",
            url, written or "of unknown version", __version__, FORMAT_VERSION)


def _not_ours(url: str, held: list[str]) -> NotAKernelStoreError:
    shown = ", ".join(repr(h) for h in held[:3]) + (f" and {len(held) - 3} more" if len(held) > 3 else "")
    return NotAKernelStoreError(
        f"store: {url!r} is a non-empty folder that is not an nngp-dask kernel store (it holds {shown}); nngp-dask "
        "never writes into or deletes what it did not write: expected a new or empty folder, or a kernel store")


def store_contents(url: str, storage_options: dict | None = None) -> dict[str, Any] | None:
    """What is at a store location, read before anything is written there.

    Returns
    -------
    None
        Nothing: no such path, or an empty folder (a store may be created there).
    dict
        The ``nngp_dask`` attributes of the kernel store there (complete, or one whose ingestion
        did not finish: ``{"ingesting": True, ...}``).

    Raises
    ------
    NotAKernelStoreError
        Anything else, named: a file, a folder of other files, other Zarr data, an unreadable
        ``zarr.json``.
    """
    url = normalise_url(url)
    if "://" not in url:
        above = url
        while not os.path.exists(above) and os.path.dirname(above) != above:
            above = os.path.dirname(above)
        if above != url:
            if not os.path.isdir(above):
                raise NotAKernelStoreError(f"store: {url!r} cannot be created: {above!r} is a file; expected a path "
                                           "whose parent folders are folders")
            return None
        if not os.path.isdir(url):
            raise NotAKernelStoreError(f"store: {url!r} is a file, not a kernel store; expected a new or empty "
                                       "folder, or a kernel store")
        held = sorted(os.listdir(url))
        if not held:
            return None
        if "zarr.json" not in held:
            raise _not_ours(url, held)
    try:
        g = zarr.open_group(url, mode="r", storage_options=storage_options if "://" in url else None)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError):
        if "://" in url:
            import fsspec

            fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
            try:
                held = sorted(os.path.basename(p.rstrip("/")) for p in fs.ls(root, detail=False))
            except (FileNotFoundError, NotADirectoryError):
                held = []
            if held:
                raise _not_ours(url, held) from None
        return None
    except zarr.errors.ContainsArrayError:
        raise NotAKernelStoreError(f"store: {url!r} holds a Zarr array, not an nngp-dask kernel store; expected a "
                                   "new or empty folder, or a kernel store") from None
    except _UNREADABLE as exc:
        raise NotAKernelStoreError(f"store: {url!r} is not a valid nngp-dask kernel store: its zarr.json cannot be "
                                   f"read ({type(exc).__name__}: {exc}); it is damaged or was not written by nngp-dask. "
                                   "Move it away or choose another store path") from None
    meta = g.attrs.get(ATTR)
    if meta is None and not dict(g.attrs) and not any(True for _ in g.keys()):
        return None  # an empty Zarr group holds nothing to lose
    if meta is None:
        raise NotAKernelStoreError(f"store: {url!r} holds other Zarr data, not an nngp-dask kernel store; nngp-dask "
                                   "never replaces what it did not write: expected a new or empty location")
    if not isinstance(meta, dict):
        raise NotAKernelStoreError(f"store: {url!r} is not a valid nngp-dask kernel store: attribute {ATTR!r} is "
                                   f"{type(meta).__name__}, expected a table; choose another store path")
    return dict(meta)


class KernelStore:
    """A kernel store on disk or object storage: what was built, and lazy views of it.

    Obtain with :func:`open_kernel` or :func:`nngp_dask.build_kernel`.
    """

    def __init__(self, url: str, storage_options: dict | None = None) -> None:
        self.url = normalise_url(url)
        self.storage_options = storage_options or None
        if "://" not in self.url and os.path.exists(self.url) and not os.path.isdir(self.url):
            raise NotAKernelStoreError(f"store: {self.url!r} is a file, not a kernel store; expected the folder of "
                                       "a kernel store")
        try:
            self.group = zarr.open_group(self.url, mode="r+", storage_options=self._opts())
        except (FileNotFoundError, zarr.errors.GroupNotFoundError) as exc:
            raise FileNotFoundError(f"store: no kernel store at {self.url!r}") from exc
        except _UNREADABLE as exc:
            raise NotAKernelStoreError(f"store: {self.url!r} is not a valid nngp-dask kernel store: its zarr.json "
                                       f"cannot be read as a group ({type(exc).__name__}: {exc})") from None
        meta = self.group.attrs.get(ATTR)
        if isinstance(meta, dict) and meta.get("ingesting") and "identity" not in meta:
            raise IncompleteKernelError(f"store: {self.url!r} is a kernel store whose ingestion did not finish (its "
                                        "build was interrupted); run build_kernel (or `nngp-dask kernel`) on it again")
        if not isinstance(meta, dict) or "identity" not in meta:
            raise NotAKernelStoreError(f"store: {self.url!r} is not an nngp-dask kernel store (no {ATTR!r} "
                                       "attributes)")
        if meta.get("format") != FORMAT_VERSION:
            raise StoreMismatchError(format_message(self.url, meta.get("format")))
        self.meta = meta
        self.identity = StoreIdentity.from_meta(meta, self.url)
        _note_version(self.url, meta.get("version"))
        if _CHECKSUMS:
            for part in ("train_train", "test_train"):
                if f"kernel/{part}" in self.group and not _has_checksum(self.group[f"kernel/{part}"]):
                    raise StoreMismatchError(f"store: kernel/{part} at {self.url!r} has no tile checksums "
                                             "(crc32c codec); rebuild the store (overwrite=True, or a new path)")

    def _opts(self) -> dict | None:
        return self.storage_options if "://" in self.url else None

    # --- what it holds ---------------------------------------------------------------------
    @property
    def architecture(self) -> Architecture:
        return Architecture.from_dict(self.identity.architecture)

    @property
    def kind(self) -> str:
        return self.identity.kind

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.identity.dtype)

    @property
    def tile(self) -> int:
        return self.identity.tile

    @property
    def shape(self) -> tuple[int, int]:
        """Shape of the train x train kernel."""
        return self.identity.n_train, self.identity.n_train

    @property
    def n_test(self) -> int:
        return self.identity.n_test

    @property
    def grid(self) -> TileGrid:
        return TileGrid(self.identity.n_train, self.identity.n_train, self.tile)

    @property
    def test_grid(self) -> TileGrid | None:
        return TileGrid(self.identity.n_test, self.identity.n_train, self.tile) if self.identity.n_test else None

    def array(self, path: str) -> zarr.Array:
        return self.group[path]

    # --- completion ------------------------------------------------------------------------
    def done_mask(self, part: str = "train_train") -> np.ndarray:
        """Boolean (tiles x tiles) mask of tiles recorded complete."""
        if f"done/{part}" not in self.group:
            return np.zeros((0, 0), dtype=bool)
        return self.group[f"done/{part}"][...].astype(bool)

    def missing_tiles(self, part: str = "train_train") -> list[tuple[int, int]]:
        """Tiles not yet recorded complete (upper tiles only for ``train_train``); empty when done."""
        if part == "test_train":
            grid = self.test_grid
            if grid is None:
                return []
            tiles = grid.all_tiles()
        else:
            grid, tiles = self.grid, self.grid.upper_tiles()
        done = self.done_mask(part)
        return [(i, j) for i, j in tiles if not done[i, j]]

    @property
    def complete(self) -> bool:
        return not self.missing_tiles("train_train") and not self.missing_tiles("test_train")

    def require_complete(self, part: str = "train_train") -> None:
        missing = self.missing_tiles(part)
        if missing:
            shown = ", ".join(map(str, missing[:8])) + (" ..." if len(missing) > 8 else "")
            raise IncompleteKernelError(
                f"store: kernel/{part} at {self.url!r} is missing {len(missing)} tile(s): {shown}; "
                "run build_kernel (or `nngp-dask kernel`) on this store to finish it")

    # --- lazy views ------------------------------------------------------------------------
    def to_dask(self):
        """The full, mirrored train x train kernel as a lazy dask array (tiles I > J are
        transposes of stored tiles I < J; nothing is read until computed)."""
        import dask.array as da

        self.require_complete("train_train")
        name, stored = self._graph_name("train_train"), self._graph_name("stored")
        dsk: dict = {}
        for i, j in self.grid.upper_tiles():  # each stored tile read once (verified), mirrored below
            dsk[(stored, i, j)] = (_read_tile_task, self.url, self._options_json(), self.identity.token(),
                                   "train_train", i, j)
            dsk[(name, i, j)] = (stored, i, j)
            if i != j:
                dsk[(name, j, i)] = (np.transpose, (stored, i, j))
        return da.Array(dsk, name, chunks=self.grid.chunks(), dtype=self.dtype)

    def test_train_to_dask(self):
        """The test x train kernel as a lazy dask array (every tile verified as it is read)."""
        import dask.array as da

        if not self.n_test:
            raise ValueError(f"store: {self.url!r} holds no test inputs; pass x_test to build_kernel")
        self.require_complete("test_train")
        name, grid = self._graph_name("test_train"), self.test_grid
        dsk = {(name, i, j): (_read_tile_task, self.url, self._options_json(), self.identity.token(), "test_train",
                              i, j) for i, j in grid.all_tiles()}
        return da.Array(dsk, name, chunks=grid.chunks(), dtype=self.dtype)

    def _options_json(self) -> str:
        return json.dumps(self.storage_options or {}, sort_keys=True)

    def _graph_name(self, what: str) -> str:
        where = hashlib.blake2b(self.url.encode(), digest_size=4).hexdigest()
        return f"nngp-read-{what}-{self.identity.token()}-{where}"

    def tiles(self, part: str = "train_train") -> "TileIO":
        """Verified reads (and writes) of the tiles of ``kernel/<part>``, in this process."""
        return tile_io(self.url, self._options_json(), self.identity.token(), part)

    def read_rows(self, part: str, rows: slice) -> np.ndarray:
        """Rows ``rows`` of ``kernel/<part>`` (all columns), assembled from verified tiles."""
        io, tile, n = self.tiles(part), self.tile, self.identity.n_train
        first, last = rows.start // tile, (rows.stop - 1) // tile
        out = np.empty((rows.stop - rows.start, n), dtype=self.dtype)
        for bi in range(first, last + 1):
            lo, hi = max(rows.start, bi * tile), min(rows.stop, (bi + 1) * tile)
            for bj in range(-(-n // tile)):
                if part == "train_train" and bi > bj:
                    block = io.read(bj, bi).T
                else:
                    block = io.read(bi, bj)
                out[lo - rows.start:hi - rows.start, bj * tile:bj * tile + block.shape[1]] = \
                    block[lo - bi * tile:hi - bi * tile]
        return out

    def check_tiles(self, part: str = "train_train", *, full: bool = False) -> list[tuple[int, int, str]]:
        """Recorded tiles whose chunk is missing or has the wrong size (``full``: or fails its
        CRC32C, which reads every recorded tile), as ``(i, j, what is wrong)``.

        The size check costs one ``stat`` per tile on a local disk (one listing on object
        storage); the full check reads the whole kernel once, and clears the record of a tile that
        fails its checksum (as any read of it does), so that the next build rewrites it.
        """
        if f"kernel/{part}" not in self.group:
            return []
        io = self.tiles(part)
        rows, cols = np.nonzero(self.done_mask(part))
        recorded = list(zip(rows.tolist(), cols.tolist()))
        sizes = io.chunk_sizes(recorded)
        bad = [(i, j, io.size_problem(size)) for (i, j), size in zip(recorded, sizes) if io.size_problem(size)]
        if full:
            flagged = {(i, j) for i, j, _ in bad}
            for i, j in recorded:
                if (i, j) not in flagged and not io.crc_ok(i, j):
                    bad.append((i, j, "failed its crc32c check"))
        return bad

    def forget_tiles(self, part: str, tiles: list[tuple[int, int]]) -> None:
        """Clear the completion records of ``tiles``: the next build rewrites them."""
        done = self.group[f"done/{part}"]
        for i, j in tiles:
            done[i, j] = 0

    def test_prior(self) -> np.ndarray:
        """Prior variances K(x*, x*) of the test inputs, (m,) float64."""
        return self.group["kernel/test_prior"][...]

    def diagonal(self) -> np.ndarray:
        """Diagonal of the stored train x train kernel (depth L), float64 (n,)."""
        key = "diagonals/train_ntk" if self.kind == "ntk" else "diagonals/train"
        return self.group[key][self.architecture.depth].astype(np.float64)

    def nbytes_stored(self) -> int:
        """Bytes of kernel values written (upper tiles and test tiles)."""
        total = 0
        for part, grid in (("train_train", self.grid), ("test_train", self.test_grid)):
            if grid is not None:
                rows, cols = np.nonzero(self.done_mask(part))
                total += grid.entries(zip(rows.tolist(), cols.tolist()))
        return total * self.dtype.itemsize

    def nbytes_total(self) -> int:
        """Bytes of kernel values of the complete store (upper tiles and test tiles)."""
        test = self.identity.n_test * self.identity.n_train
        return self.dtype.itemsize * (self.grid.entries(self.grid.upper_tiles()) + test)

    def summary(self) -> dict[str, Any]:
        """What `nngp-dask inspect` prints."""
        grid = self.grid
        upper = sum(1 for _ in grid.upper_tiles())
        out = {
            "store": self.url,
            "architecture": self.identity.architecture,
            "kind": self.kind,
            "dtype": self.identity.dtype,
            "tile": self.tile,
            "n_train": self.identity.n_train,
            "n_test": self.identity.n_test,
            "features": self.identity.features,
            "tiles_train_train": f"{upper - len(self.missing_tiles('train_train'))}/{upper}",
            "kernel_bytes": self.nbytes_stored(),
            "package_version": self.meta.get("version"),
        }
        if self.test_grid is not None:
            total = self.test_grid.shape[0] * self.test_grid.shape[1]
            out["tiles_test_train"] = f"{total - len(self.missing_tiles('test_train'))}/{total}"
        if "solves" in self.group:
            out["solves"] = {name: dict(g.attrs) for name, g in self.group["solves"].groups()}
        return out

    def __repr__(self) -> str:
        return (f"KernelStore({self.url!r}, {self.architecture}, kind={self.kind!r}, shape={self.shape}, "
                f"tile={self.tile}, missing={len(self.missing_tiles())})")


def local_chunk_file(url: str, array: zarr.Array, coords: tuple[int, ...]) -> str | None:
    """The file that holds chunk ``coords`` of ``array`` in the local store at ``url``; None for a URL."""
    if "://" in url:
        return None
    return os.path.join(url, *array.path.split("/"), *array.metadata.encode_chunk_key(coords).split("/"))


# --- verified tiles -------------------------------------------------------------------------
#: Local chunk files whose CRC32C this process has checked: path -> (stat signature, when).
#: A CG solve reads every tile once per iteration; checking the checksum costs 18-36 % of the CPU
#: of a cached pass (benchmarks/RESULTS.md section 9), so a file verified in the last VERIFIED_TTL_S seconds
#: is not checked again while its device, inode, size, mtime and ctime are unchanged (any
#: write, truncation or replacement of the file changes them; a deleted file fails to open).
_VERIFIED: dict[str, tuple[tuple[int, ...], float]] = {}
VERIFIED_TTL_S = 600.0


def _signature(st: os.stat_result) -> tuple[int, ...]:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _write_all(f: Any, data: memoryview) -> None:
    done = 0
    while done < len(data):
        done += f.write(data[done:])


class TileIO:
    """Reads and writes the tiles of ``kernel/<part>`` of one store, each with its CRC32C.

    A chunk is the tile's values, raw little-endian and padded to the full tile with the fill
    value, followed by the CRC32C of those bytes: what zarr's ``bytes`` + ``crc32c`` codecs write
    and check, so zarr reads these arrays too. Local files are read and written here directly
    (``readinto`` a reusable buffer; the checksum written after the values rather than appended
    to a copy of them; write to ``<chunk>.<uuid>.partial``, then rename); object storage goes
    through zarr's store. Unlike zarr, a missing chunk is an error, not fill values.

    Obtain with :func:`tile_io` (cached per process) or :meth:`KernelStore.tiles`.
    """

    def __init__(self, url: str, storage_options: dict | None, part: str) -> None:
        self.url, self.part = url, part
        self.storage_options = storage_options
        self.array = open_group(url, storage_options)[f"kernel/{part}"]
        codecs = tuple(self.array.metadata.codecs)
        self.checksum = _has_checksum(self.array)
        serializer = codecs[0] if codecs else None
        if not isinstance(serializer, BytesCodec) or getattr(serializer.endian, "value", None) not in (None, "little") \
                or len(codecs) != 1 + self.checksum:
            raise StoreMismatchError(f"store: kernel/{part} at {url!r} has codecs {codecs}; expected bytes(little) "
                                     "followed by crc32c: rebuild the store")
        self.shape: tuple[int, int] = tuple(self.array.shape)  # type: ignore[assignment]
        self.chunk: tuple[int, int] = tuple(self.array.chunks)  # type: ignore[assignment]
        self.dtype = np.dtype(self.array.dtype).newbyteorder("<")
        self.fill = self.array.metadata.fill_value
        self.value_bytes = self.chunk[0] * self.chunk[1] * self.dtype.itemsize
        self.nbytes = self.value_bytes + (4 if self.checksum else 0)
        self.local = "://" not in url

    # --- where -----------------------------------------------------------------------------
    def _key(self, i: int, j: int) -> str:
        return f"{self.array.store_path.path}/{self.array.metadata.encode_chunk_key((i, j))}"

    def path(self, i: int, j: int) -> str | None:
        """The local file of tile ``(i, j)``; None on object storage."""
        return local_chunk_file(self.url, self.array, (i, j))

    def _extent(self, i: int, j: int) -> tuple[int, int]:
        rows, cols = self.shape[0] - i * self.chunk[0], self.shape[1] - j * self.chunk[1]
        if not (0 <= i and 0 <= j and rows > 0 and cols > 0):
            raise IndexError(f"tile ({i}, {j}) is outside the {self.shape} kernel/{self.part} of {self.url!r}")
        return min(rows, self.chunk[0]), min(cols, self.chunk[1])

    # --- checks ----------------------------------------------------------------------------
    def damaged(self, i: int, j: int, what: str) -> CorruptTileError:
        """The error for a damaged tile; clears its completion record (best effort) so that the
        next build rewrites it."""
        cleared = "its completion record was cleared: "
        try:
            open_group(self.url, self.storage_options)[f"done/{self.part}"][i, j] = 0
        except Exception as exc:  # a read-only store, say: the message still names the tile
            log.warning("could not clear the record of damaged tile (%d, %d) of %s: %s", i, j, self.url, exc)
            cleared = ""
        _VERIFIED.pop(self.path(i, j) or "", None)
        return CorruptTileError(f"kernel tile ({i}, {j}) of {self.url}/kernel/{self.part} {what}; {cleared}run the "
                                "build again (build_kernel, or the same nngp-dask command) to rebuild it")

    def size_problem(self, size: int | None) -> str | None:
        """What is wrong with a chunk of ``size`` bytes (None: missing), or None if nothing."""
        if size is None:
            return "is recorded as written but its chunk is missing"
        if size != self.nbytes:
            return f"has {size} bytes, expected {self.nbytes} (truncated or overwritten)"
        return None

    def _crc_ok(self, raw: np.ndarray) -> bool:
        stored = int.from_bytes(raw[self.value_bytes:self.nbytes].tobytes(), "little")
        return google_crc32c.value(raw[:self.value_bytes]) == stored

    def crc_ok(self, i: int, j: int) -> bool:
        """Whether tile ``(i, j)`` is present, of its size and passes its CRC32C (reads it)."""
        try:
            self._raw(i, j, None, force=True)
        except CorruptTileError:
            return False
        return True

    def chunk_sizes(self, tiles: list[tuple[int, int]]) -> list[int | None]:
        """Byte sizes of the chunks of ``tiles`` (None where missing): a ``stat`` each locally,
        one listing on object storage."""
        if self.local:
            out: list[int | None] = []
            for i, j in tiles:
                try:
                    out.append(os.stat(self.path(i, j)).st_size)
                except FileNotFoundError:
                    out.append(None)
            return out
        import fsspec

        fs, root = fsspec.core.url_to_fs(self.url, **(self.storage_options or {}))
        prefix = f"{root.rstrip('/')}/{self.array.store_path.path}"
        fs.invalidate_cache(prefix)
        listed = {p.rstrip("/"): info.get("size") for p, info in fs.find(prefix, detail=True).items()}
        return [listed.get(f"{root.rstrip('/')}/{self._key(i, j)}") for i, j in tiles]

    # --- read and write ----------------------------------------------------------------------
    def _raw(self, i: int, j: int, out: np.ndarray | None, *, force: bool = False) -> np.ndarray:
        """The chunk's bytes (values and checksum), verified; ``out``: a uint8 buffer to reuse."""
        if not self.local:
            from zarr.core.buffer import default_buffer_prototype
            from zarr.core.sync import sync

            got = sync(self.array.store_path.store.get(self._key(i, j), prototype=default_buffer_prototype()))
            raw = None if got is None else got.as_numpy_array()
            problem = self.size_problem(None if raw is None else raw.size)
            if problem:
                raise self.damaged(i, j, problem)
            if self.checksum and not self._crc_ok(raw):
                raise self.damaged(i, j, "failed its crc32c check")
            return raw
        path = self.path(i, j)
        try:
            f = open(path, "rb", buffering=0)
        except FileNotFoundError:
            raise self.damaged(i, j, self.size_problem(None)) from None
        with f:
            st = os.fstat(f.fileno())
            if st.st_size != self.nbytes:
                raise self.damaged(i, j, self.size_problem(st.st_size))
            raw = out[:self.nbytes] if out is not None and out.size >= self.nbytes else np.empty(self.nbytes, np.uint8)
            view, got = memoryview(raw), 0
            while got < self.nbytes and (n := f.readinto(view[got:])):
                got += n
        if got != self.nbytes:
            raise self.damaged(i, j, self.size_problem(got))
        if self.checksum:
            sig, seen = _signature(st), _VERIFIED.get(path)
            if force or seen is None or seen[0] != sig or time.monotonic() - seen[1] > VERIFIED_TTL_S:
                if not self._crc_ok(raw):
                    raise self.damaged(i, j, "failed its crc32c check")
                if len(_VERIFIED) > 200_000:
                    _VERIFIED.clear()
                _VERIFIED[path] = (sig, time.monotonic())
        return raw

    def read(self, i: int, j: int, out: np.ndarray | None = None) -> np.ndarray:
        """Tile ``(i, j)``, verified: shape ``(rows, cols)`` of the tile (ragged at the edges),
        the stored dtype. With ``out`` (a uint8 buffer of at least :attr:`nbytes`) the values
        live in ``out`` and are valid until it is reused.

        Raises :class:`CorruptTileError` when the chunk is missing, of the wrong size or fails its
        checksum.
        """
        rows, cols = self._extent(i, j)
        raw = self._raw(i, j, out)
        return raw[:self.value_bytes].view(self.dtype).reshape(self.chunk)[:rows, :cols]

    def write(self, i: int, j: int, values: np.ndarray) -> str | None:
        """Write tile ``(i, j)`` with its checksum; returns the local file written (None on
        object storage). The file appears complete or not at all."""
        rows, cols = self._extent(i, j)
        if values.shape != (rows, cols):
            raise ValueError(f"tile ({i}, {j}): expected shape {(rows, cols)}, got {values.shape}")
        if not self.local:
            r0, c0 = i * self.chunk[0], j * self.chunk[1]
            # a tile is never all fill value (NaN): skip zarr's check for "empty" chunks, a pass over it
            with zarr.config.set({"array.write_empty_chunks": True}):
                self.array[r0:r0 + rows, c0:c0 + cols] = values
            return None
        if (rows, cols) != self.chunk:  # edge tiles are stored padded to the full chunk
            full = np.full(self.chunk, self.fill, dtype=self.dtype)
            full[:rows, :cols] = values
            values = full
        flat = np.ascontiguousarray(values, dtype=self.dtype).reshape(-1).view(np.uint8)
        path = self.path(i, j)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{uuid.uuid4().hex}.partial"  # what remove_interrupted_writes removes
        try:
            with open(tmp, "wb", buffering=0) as f:
                _write_all(f, memoryview(flat))
                if self.checksum:
                    f.write(google_crc32c.value(flat).to_bytes(4, "little"))
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        _VERIFIED.pop(path, None)
        return path


@lru_cache(maxsize=16)
def _cached_tile_io(url: str, options: str, token: str, part: str) -> TileIO:
    return TileIO(url, json.loads(options) or None, part)


def tile_io(url: str, options: str, token: str, part: str) -> TileIO:
    """The :class:`TileIO` of ``kernel/<part>``, opened once per process and store identity
    (``token``; ``options``: the storage options as sorted JSON)."""
    return _cached_tile_io(url, options, token, part)


def _read_tile_task(url: str, options: str, token: str, part: str, i: int, j: int) -> np.ndarray:
    """A dask task: tile ``(i, j)`` of ``kernel/<part>``, verified (a fresh array)."""
    return tile_io(url, options, token, part).read(i, j)


def remove_interrupted_writes(url: str) -> int:
    """Delete the temporary files of writes that never finished in the local store at ``url``.

    Zarr writes each chunk to ``<name>.<uuid>.partial`` and renames it into place, so a killed
    writer leaves its in-flight chunks behind under those names: never read, but on disk. Call
    only while holding the store's lock. Returns how many files were removed (0 for a URL).
    """
    if "://" in url:
        return 0
    removed = 0
    for directory, _, files in os.walk(url):
        for name in files:
            if name.endswith(".partial"):
                os.unlink(os.path.join(directory, name))
                removed += 1
    return removed


def open_kernel(store: str | os.PathLike, *, storage_options: dict | None = None) -> KernelStore:
    """Open an existing kernel store (a local path or an fsspec URL such as ``s3://bucket/run``).

    Returns
    -------
    KernelStore
        With ``.architecture``, ``.shape``, ``.to_dask()``, ``.test_train_to_dask()`` and
        ``.missing_tiles()`` (empty when the kernel is complete).
    """
    return KernelStore(os.fspath(store), storage_options)


# --- single writer ------------------------------------------------------------------------
#: Seconds between a held lock's heartbeats (environment: ``NNGP_DASK_LOCK_HEARTBEAT``).
LOCK_HEARTBEAT_S = 30.0
#: A lock whose heartbeat is older than this many heartbeat intervals is stale and taken over
#: (environment: ``NNGP_DASK_LOCK_TTL``, in seconds).
LOCK_TTL_HEARTBEATS = 10
#: Locks written by versions without a heartbeat are judged by their age against this.
_LEGACY_LOCK_TTL_S = 6 * 3600.0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _lock_timing() -> tuple[float, float]:
    """``(heartbeat interval, time to live)`` in seconds, from the environment."""
    try:
        beat = float(os.environ.get("NNGP_DASK_LOCK_HEARTBEAT", LOCK_HEARTBEAT_S))
        ttl = float(os.environ.get("NNGP_DASK_LOCK_TTL", LOCK_TTL_HEARTBEATS * beat))
    except ValueError as exc:
        raise ValueError(f"NNGP_DASK_LOCK_HEARTBEAT / NNGP_DASK_LOCK_TTL: expected seconds ({exc})") from None
    if not (0 < beat < ttl < float("inf")):  # also refuses NaN
        raise ValueError(f"NNGP_DASK_LOCK_HEARTBEAT={beat:g}, NNGP_DASK_LOCK_TTL={ttl:g}: expected "
                         "0 < heartbeat < time to live (default 10 heartbeats)")
    return beat, ttl


def _parse_lock(raw: bytes) -> dict | None:
    try:
        other = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    return other if isinstance(other, dict) else None


def _stale(other: dict | None, raw: bytes, ttl: float) -> str | None:
    """Why a lock record is stale (its writer is gone), or None while its holder may be alive."""
    if other is None:
        return f"it is unreadable ({len(raw)} bytes, not a lock record), left by a write that never finished"
    try:
        pid = int(other.get("pid") or 0)
    except (TypeError, ValueError):
        pid = 0
    if other.get("host") == socket.gethostname() and pid and not _pid_alive(pid):
        return f"pid {pid} is no longer running on this host"
    limit = ttl if "heartbeat" in other else _LEGACY_LOCK_TTL_S
    try:
        age = time.time() - float(other.get("heartbeat", other.get("since")))
    except (TypeError, ValueError):
        return "it has no heartbeat"
    if not age <= limit:
        return f"its last heartbeat is {age:.0f} s old (the limit is {limit:.0f} s)"
    return None


def _lock_token(raw: bytes | None) -> str | None:
    other = _parse_lock(raw) if raw is not None else None
    return other.get("token") if other else None


class _LocalLockFile:
    """A lock file on a local or network file system: created whole or not at all (written to
    a temporary file, then hard-linked into place, which fails if the lock exists)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def _temp(self, blob: bytes) -> str:
        tmp = f"{self.path}.{uuid.uuid4().hex}.tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(blob)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            self._unlink(tmp)
            raise
        return tmp

    @staticmethod
    def _unlink(path: str) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass

    def create(self, blob: bytes) -> bool:
        tmp = self._temp(blob)  # a full disk fails here, before anything is visible
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        except OSError as exc:  # a file system without hard links: exclusive create, then write
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(blob)
            except BaseException:
                self._unlink(self.path)
                raise
            return True
        finally:
            self._unlink(tmp)

    def read(self) -> bytes | None:
        try:
            with open(self.path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def replace_if(self, token: str, blob: bytes) -> bool:
        if _lock_token(self.read()) != token:
            return False
        os.replace(self._temp(blob), self.path)
        return True

    def remove_if(self, token: str) -> None:
        if _lock_token(self.read()) == token:
            self._unlink(self.path)

    def take_over(self, raw: bytes) -> None:
        """Remove the stale lock ``raw``, unless it changed since it was read."""
        aside = f"{self.path}.{uuid.uuid4().hex}.stale"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        try:
            with open(aside, "rb") as f:
                if f.read() != raw:  # renewed or replaced meanwhile: put it back
                    try:
                        os.link(aside, self.path)
                    except OSError:
                        pass
        finally:
            self._unlink(aside)


class _FsspecLockFile:
    """A lock object on object storage: one PUT is atomic, so a lock is never partial; the
    create is conditional where the store supports it (S3's If-None-Match), and the lock is read
    back to confirm it is ours where it does not."""

    def __init__(self, fs: Any, path: str) -> None:
        self.fs, self.path = fs, path

    def read(self) -> bytes | None:
        self.fs.invalidate_cache(self.path)
        try:
            return self.fs.cat_file(self.path)
        except FileNotFoundError:
            return None

    def create(self, blob: bytes) -> bool:
        if self.read() is not None:
            return False
        try:
            self.fs.pipe_file(self.path, blob, mode="create")
        except FileExistsError:
            return False
        except (TypeError, NotImplementedError):  # an fsspec without conditional writes
            self.fs.pipe_file(self.path, blob)
        return _lock_token(self.read()) == _lock_token(blob)

    def replace_if(self, token: str, blob: bytes) -> bool:
        if _lock_token(self.read()) != token:
            return False
        self.fs.pipe_file(self.path, blob)
        return True

    def remove_if(self, token: str) -> None:
        if _lock_token(self.read()) == token:
            try:
                self.fs.rm_file(self.path)
            except FileNotFoundError:
                pass

    def take_over(self, raw: bytes) -> None:
        if self.read() == raw:
            try:
                self.fs.rm_file(self.path)
            except FileNotFoundError:
                pass


class _LockHeartbeat:
    """Refreshes a held lock's heartbeat every ``every`` seconds from a daemon thread."""

    def __init__(self, lock: Any, holder: dict, every: float, shown: str) -> None:
        self.lock, self.holder, self.every, self.shown = lock, holder, every, shown
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="nngp-dask-lock-heartbeat", daemon=True)

    def __enter__(self) -> "_LockHeartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=60)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.holder["heartbeat"] = time.time()
            try:
                if not self.lock.replace_if(self.holder["token"], json.dumps(self.holder).encode()):
                    log.error("the lock %s is no longer this run's (taken over as stale, or removed); another run "
                              "may now write the same output", self.shown)
                    return
            except Exception as exc:  # a full disk, a network error: try again at the next beat
                log.warning("could not refresh the lock %s (%s: %s); retrying", self.shown, type(exc).__name__, exc)


@contextmanager
def store_lock(url: str, storage_options: dict | None = None, *, name: str = "build") -> Iterator[None]:
    """Hold the write lock of a store (or of a pipeline's output): one writer at a time.

    The lock ``<url>.lock`` records the holder's host, pid, start and a heartbeat timestamp that a
    background thread refreshes every ``NNGP_DASK_LOCK_HEARTBEAT`` seconds (default 30). It is
    written whole or not at all (a temporary file hard-linked into place; one PUT on object
    storage), so a full disk never leaves a partial lock. A lock is stale, and is taken over with
    a warning, when its holder was on this host and its pid is gone, when its heartbeat is older
    than ``NNGP_DASK_LOCK_TTL`` seconds (default 10 heartbeats: a holder on another host that
    died), or when it is unreadable. The lock is removed when the block exits, also on an
    exception or a KeyboardInterrupt (the CLI turns SIGTERM into one), and only if it is still
    this holder's.

    Raises
    ------
    StoreLockedError
        Another live process holds the lock (the CLI exits 75, EX_TEMPFAIL).
    """
    url = normalise_url(url)
    beat, ttl = _lock_timing()
    now = time.time()
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "since": now, "heartbeat": now, "what": name,
              "token": uuid.uuid4().hex}
    shown = url.rstrip("/") + ".lock"
    # The lock sits beside the store, not in it, so that recreating the store cannot delete it.
    if "://" not in url:
        os.makedirs(os.path.dirname(url), exist_ok=True)
        lock: Any = _LocalLockFile(shown)
    else:
        import fsspec

        fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
        lock = _FsspecLockFile(fs, root.rstrip("/") + ".lock")
    blob = json.dumps(holder).encode()
    for _ in range(3):
        if lock.create(blob):
            break
        raw = lock.read()
        if raw is None:
            continue  # released meanwhile
        other = _parse_lock(raw)
        why = _stale(other, raw, ttl)
        if why is None:
            o = other or {}
            age = time.time() - float(o.get("heartbeat", o.get("since", now)))
            raise StoreLockedError(
                f"store: {url!r} is locked by pid {o.get('pid')} on {o.get('host')} ({o.get('what', 'a run')}, "
                f"heartbeat {age:.0f} s ago); one writer per store. A lock whose heartbeat stops is taken over "
                f"after {ttl:.0f} s (NNGP_DASK_LOCK_TTL); if that process is gone you may delete {shown}") from None
        log.warning("taking over the lock %s: %s (%s)", shown, why,
                    f"pid {other.get('pid')} on {other.get('host')}" if other else "no holder recorded")
        lock.take_over(raw)
    else:
        raise StoreLockedError(f"store: {url!r}: other runs keep taking the lock {shown}; one writer per store")
    try:
        with _LockHeartbeat(lock, holder, beat, shown):
            yield
    finally:
        try:
            lock.remove_if(holder["token"])
        except Exception as exc:  # never hide the block's own exception behind this one
            log.warning("could not remove the lock %s (%s: %s)", shown, type(exc).__name__, exc)
