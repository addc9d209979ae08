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
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import lru_cache
from collections.abc import Iterator
from typing import Any

import numpy as np
import zarr

from .architecture import Architecture
from .tiling import TileGrid

__all__ = [
    "FORMAT_VERSION",
    "KernelStore",
    "StoreIdentity",
    "StoreMismatchError",
    "StoreLockedError",
    "IncompleteKernelError",
    "open_kernel",
    "store_lock",
]

FORMAT_VERSION = 1
ATTR = "nngp_dask"


class StoreMismatchError(ValueError):
    """The store was built for other inputs, another architecture or other settings."""


class StoreLockedError(RuntimeError):
    """Another process holds the store's write lock."""


class IncompleteKernelError(ValueError):
    """A kernel is used before all of its tiles are written."""


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


def _normalise_url(store: str | os.PathLike) -> str:
    s = os.fspath(store)
    return s if "://" in s else os.path.abspath(s)


@lru_cache(maxsize=8)
def _cached_group(url: str, options_json: str, mode: str) -> zarr.Group:
    options = json.loads(options_json) or None
    return zarr.open_group(url, mode=mode, storage_options=options if "://" in url else None)


def open_group(url: str, storage_options: dict | None = None, *, mode: str = "r+") -> zarr.Group:
    """Open (and cache per process) the store's root group; used by workers for every tile."""
    return _cached_group(url, json.dumps(storage_options or {}, sort_keys=True), mode)


class KernelStore:
    """A kernel store on disk or object storage: what was built, and lazy views of it.

    Obtain with :func:`open_kernel` or :func:`nngp_dask.build_kernel`.
    """

    def __init__(self, url: str, storage_options: dict | None = None) -> None:
        self.url = _normalise_url(url)
        self.storage_options = storage_options or None
        try:
            self.group = zarr.open_group(self.url, mode="r+", storage_options=self._opts())
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"store: no kernel store at {self.url!r}") from exc
        meta = self.group.attrs.get(ATTR)
        if not isinstance(meta, dict) or "identity" not in meta:
            raise StoreMismatchError(f"store: {self.url!r} is not an nngp-dask kernel store (no {ATTR!r} attributes)")
        if meta.get("format") != FORMAT_VERSION:
            raise StoreMismatchError(
                f"store: format {meta.get('format')!r} at {self.url!r}; this version reads format {FORMAT_VERSION}")
        self.meta = meta
        self.identity = StoreIdentity(**meta["identity"])

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
        stored = da.from_zarr(self.group["kernel/train_train"])
        nb = self.grid.shape[0]
        blocks = [[stored.blocks[i, j] if i <= j else stored.blocks[j, i].T for j in range(nb)] for i in range(nb)]
        return da.block(blocks)

    def test_train_to_dask(self):
        """The test x train kernel as a lazy dask array."""
        import dask.array as da

        if not self.n_test:
            raise ValueError(f"store: {self.url!r} holds no test inputs; pass x_test to build_kernel")
        self.require_complete("test_train")
        return da.from_zarr(self.group["kernel/test_train"])

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
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def store_lock(url: str, storage_options: dict | None = None, *, name: str = "build") -> Iterator[None]:
    """Hold the store's write lock (one writer per store).

    On a local file system the lock file is created atomically (``O_EXCL``) and a lock left by
    a dead process on this host is taken over, so a SIGKILLed run never blocks its re-run. On
    object storage, which has no atomic create, the lock is advisory: a writer that finds a
    lock younger than ``NNGP_DASK_LOCK_TTL`` seconds (default 6 h) refuses to start, unless the
    lock was left by a dead process on this host (a killed driver's re-run resumes at once).
    """
    url = _normalise_url(url)
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time(), "what": name}
    # The lock sits beside the store, not in it, so that recreating the store cannot delete it.
    if "://" not in url:
        os.makedirs(os.path.dirname(url), exist_ok=True)
        path = url.rstrip("/") + ".lock"
        for _ in range(2):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    with open(path) as f:
                        other = json.load(f)
                except (OSError, ValueError):
                    other = {}
                if other.get("host") == holder["host"] and not _pid_alive(int(other.get("pid", 0) or 0)):
                    os.unlink(path)  # left by a killed run on this host
                    continue
                raise StoreLockedError(
                    f"store: {url!r} is locked by pid {other.get('pid')} on {other.get('host')} "
                    f"({other.get('what', 'a run')}); one writer per store. If that process is gone, "
                    f"delete {path}") from None
            with os.fdopen(fd, "w") as f:
                json.dump(holder, f)
            break
        try:
            yield
        finally:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        return
    import fsspec

    fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
    path = root.rstrip("/") + ".lock"
    ttl = float(os.environ.get("NNGP_DASK_LOCK_TTL", 6 * 3600))
    fs.invalidate_cache(path)
    if fs.exists(path):
        try:
            other = json.loads(fs.cat_file(path))
        except (OSError, ValueError):
            other = {}
        dead_here = other.get("host") == holder["host"] and not _pid_alive(int(other.get("pid", 0) or 0))
        if not dead_here and time.time() - float(other.get("since", 0)) < ttl:
            raise StoreLockedError(
                f"store: {url!r} is locked by pid {other.get('pid')} on {other.get('host')} "
                f"({other.get('what', 'a run')}); one writer per store. If that process is gone, delete "
                f"{url.rstrip('/')}.lock (or wait: locks older than NNGP_DASK_LOCK_TTL={ttl:.0f} s are ignored)")
        # a lock left by a killed run on this host, or an expired one: taken over
    fs.pipe_file(path, json.dumps(holder).encode())
    try:
        yield
    finally:
        try:
            fs.rm_file(path)
        except FileNotFoundError:
            pass
