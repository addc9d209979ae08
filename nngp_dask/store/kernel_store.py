"""The kernel store: what was built, read back (:class:`KernelStore`, :func:`open_kernel`), and
what is at a location before anything is written there (:func:`store_contents`).

The layout and identity are in :mod:`nngp_dask.store.layout`, verified tile reads in
:mod:`nngp_dask.store.tileio`, the write lock in :mod:`nngp_dask.store.lock`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Any, cast

import numpy as np
import zarr

from .._version import __version__
from ..kernels import Architecture
from ..tiling import TileGrid
from . import layout
from .errors import IncompleteKernelError, NotAKernelStoreError, StoreMismatchError
from .formats import compute_dtype, stored_itemsize
from .layout import (
    ATTR,
    FORMAT_VERSION,
    SOLVES,
    TEST_PRIOR,
    StoreIdentity,
    diagonals_path,
    done_path,
    format_message,
    has_checksum,
    is_remote,
    kernel_path,
    normalise_url,
)
from .tileio import TileIO, read_tile_task, tile_io

__all__ = ["KernelStore", "open_kernel", "store_contents"]

log = logging.getLogger("nngp_dask")

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
    if not is_remote(url):
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
        g = zarr.open_group(url, mode="r", storage_options=storage_options if is_remote(url) else None)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError):
        if is_remote(url):
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
                                   f"read ({type(exc).__name__}: {exc}); it is damaged or was not written by "
                                   "nngp-dask. Move it away or choose another store path") from None
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
        if not is_remote(self.url) and os.path.exists(self.url) and not os.path.isdir(self.url):
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
            what = "in-place update" if meta.get("updating") else "ingestion"
            raise IncompleteKernelError(f"store: {self.url!r} is a kernel store whose {what} did not finish (its "
                                        "build was interrupted); run build_kernel (or `nngp-dask kernel`) on it again")
        if not isinstance(meta, dict) or "identity" not in meta:
            raise NotAKernelStoreError(f"store: {self.url!r} is not an nngp-dask kernel store (no {ATTR!r} "
                                       "attributes)")
        if meta.get("format") != FORMAT_VERSION:
            raise StoreMismatchError(format_message(self.url, meta.get("format")))
        self.meta = meta
        self.identity = StoreIdentity.from_meta(meta, self.url)
        _note_version(self.url, meta.get("version"))
        if layout.CHECKSUMS:  # read at call time: a benchmark switches it off
            for part in ("train_train", "test_train"):
                if kernel_path(part) in self.group and not has_checksum(self.array(kernel_path(part))):
                    raise StoreMismatchError(f"store: kernel/{part} at {self.url!r} has no tile checksums "
                                             "(crc32c codec); rebuild the store (overwrite=True, or a new path)")

    def _opts(self) -> dict | None:
        return self.storage_options if is_remote(self.url) else None

    # --- what it holds ---------------------------------------------------------------------
    @property
    def architecture(self) -> Architecture:
        return Architecture.from_dict(self.identity.architecture)

    @property
    def kind(self) -> str:
        return self.identity.kind

    @property
    def dtype(self) -> np.dtype:
        """The kernel values' dtype as read: the stored one, float32 for int16 tiles (see
        :attr:`stored_dtype`)."""
        return compute_dtype(self.identity.dtype)

    @property
    def stored_dtype(self) -> str:
        """How the tiles are stored: ``"float32"``, ``"float64"`` or ``"int16"``
        (:mod:`nngp_dask.store.formats`)."""
        return self.identity.dtype

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
        return cast(zarr.Array, self.group[path])  # every path of the layout but solves/ names an array

    # --- completion ------------------------------------------------------------------------
    def done_mask(self, part: str = "train_train") -> np.ndarray:
        """Boolean (tiles x tiles) mask of tiles recorded complete."""
        if done_path(part) not in self.group:
            return np.zeros((0, 0), dtype=bool)
        return np.asarray(self.array(done_path(part))[...]).astype(bool)

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
            dsk[(stored, i, j)] = (read_tile_task, self.url, self._options_json(), self.identity.token(),
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
        assert grid is not None  # n_test > 0
        dsk = {(name, i, j): (read_tile_task, self.url, self._options_json(), self.identity.token(), "test_train",
                              i, j) for i, j in grid.all_tiles()}
        return da.Array(dsk, name, chunks=grid.chunks(), dtype=self.dtype)

    def _options_json(self) -> str:
        return json.dumps(self.storage_options or {}, sort_keys=True)

    def _graph_name(self, what: str) -> str:
        where = hashlib.blake2b(self.url.encode(), digest_size=4).hexdigest()
        return f"nngp-read-{what}-{self.identity.token()}-{where}"

    def tiles(self, part: str = "train_train") -> TileIO:
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
        if kernel_path(part) not in self.group:
            return []
        io = self.tiles(part)
        rows, cols = np.nonzero(self.done_mask(part))
        recorded = list(zip(rows.tolist(), cols.tolist()))
        sizes = io.chunk_sizes(recorded)
        bad = [(i, j, problem) for (i, j), size in zip(recorded, sizes) if (problem := io.size_problem(size))]
        if full:
            flagged = {(i, j) for i, j, _ in bad}
            for i, j in recorded:
                if (i, j) not in flagged and not io.crc_ok(i, j):
                    bad.append((i, j, "failed its crc32c check"))
        return bad

    def forget_tiles(self, part: str, tiles: list[tuple[int, int]]) -> None:
        """Clear the completion records of ``tiles``: the next build rewrites them."""
        done = self.array(done_path(part))
        for i, j in tiles:
            done[i, j] = 0

    def test_prior(self) -> np.ndarray:
        """Prior variances K(x*, x*) of the test inputs, (m,) float64."""
        return np.asarray(self.array(TEST_PRIOR)[...])

    def diagonal(self) -> np.ndarray:
        """Diagonal of the stored train x train kernel (depth L), float64 (n,)."""
        key = diagonals_path("train", ntk=self.kind == "ntk")
        return np.asarray(self.array(key)[self.architecture.depth]).astype(np.float64)

    def nbytes_stored(self) -> int:
        """Bytes of kernel values written (upper tiles and test tiles)."""
        total = 0
        for part, grid in (("train_train", self.grid), ("test_train", self.test_grid)):
            if grid is not None:
                rows, cols = np.nonzero(self.done_mask(part))
                total += grid.entries(zip(rows.tolist(), cols.tolist()))
        return total * stored_itemsize(self.identity.dtype)

    def nbytes_total(self) -> int:
        """Bytes of kernel values of the complete store (upper tiles and test tiles)."""
        test = self.identity.n_test * self.identity.n_train
        return stored_itemsize(self.identity.dtype) * (self.grid.entries(self.grid.upper_tiles()) + test)

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
        if SOLVES in self.group:
            out["solves"] = {name: dict(g.attrs) for name, g in cast(zarr.Group, self.group[SOLVES]).groups()}
        return out

    def __repr__(self) -> str:
        return (f"KernelStore({self.url!r}, {self.architecture}, kind={self.kind!r}, shape={self.shape}, "
                f"tile={self.tile}, missing={len(self.missing_tiles())})")


def open_kernel(store: str | os.PathLike, *, storage_options: dict | None = None) -> KernelStore:
    """Open an existing kernel store (a local path or an fsspec URL such as ``s3://bucket/run``).

    Returns
    -------
    KernelStore
        With ``.architecture``, ``.shape``, ``.to_dask()``, ``.test_train_to_dask()`` and
        ``.missing_tiles()`` (empty when the kernel is complete).
    """
    return KernelStore(os.fspath(store), storage_options)
