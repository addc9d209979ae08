"""Build (or resume) a kernel store: ingest inputs, per-point diagonals, one Dask task per tile.

Each task reads its two input blocks from the store, runs :func:`nngp_dask.kernel.tile`,
writes the tile and then its completion record, and returns a few numbers; tiles never
travel through the scheduler, so the memory of the whole build is a few tiles per worker
whatever n is.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
import zarr
from numpy.typing import ArrayLike, DTypeLike

from ._version import __version__
from .architecture import Architecture
from .inputs import NORMALIZATIONS, InputError, check_inputs, normalize as normalize_rows
from .kernel import (KernelOverflowError, all_finite, check_dtype, check_kind, check_range, diagonals,
                     diagonals_from_norms, overflow_reason, tile as tile_fn)
from .monitor import Heartbeat
from .pagecache import DropBehind, check_policy, wants_drop
from .precompile import precompile
from .runtime import client_for
from .sources import ArraySource, as_source, open_source
from .store import (ATTR, FORMAT_VERSION, KernelStore, NotAKernelStoreError, StoreIdentity, StoreMismatchError,
                    array_codecs, format_message, normalise_url, open_group, remove_interrupted_writes,
                    store_contents, store_lock, tile_io)
from .tiling import DEFAULT_TILE, TileGrid

__all__ = ["build_kernel", "BuildError", "PreparedInputs", "prepare_inputs"]

log = logging.getLogger("nngp_dask")

#: rows per chunk when streaming inputs that are not yet tiled
_STREAM_ROWS = 4096


class BuildError(RuntimeError):
    """Some tiles failed; those that succeeded are recorded and a re-run resumes."""


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

    def chunks(self, rows: int = _STREAM_ROWS):
        """Yield ``(start, block)`` of normalised float64 rows. Each raw block is checked before it
        is normalised (a NaN would become a row of zeros), naming the row and column of the input."""
        for start in range(0, self.n, rows):
            block = self.source.read(start, min(start + rows, self.n))
            block = check_inputs(block.reshape(block.shape[0], -1), self.name, row_offset=start)
            yield start, normalize_rows(np.asarray(block, dtype=np.float64), self.normalize)


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


# --- worker side ------------------------------------------------------------------------
@lru_cache(maxsize=8)
def _array(url: str, options: str, token: str, path: str) -> zarr.Array:
    """An array of the store, opened once per worker and store identity (``token``): its metadata
    does not change while the identity holds."""
    return open_group(url, json.loads(options) or None)[path]


@lru_cache(maxsize=6)
def _block(url: str, options: str, token: str, path: str, index: int, tile: int, dtype: str = "float64") -> np.ndarray:
    """A row block of stored inputs (in the GEMM's ``dtype``) or diagonals, cached per worker: tasks
    are submitted row by row, so consecutive tiles share their row block."""
    arr = _array(url, options, token, path)
    sl = slice(index * tile, min((index + 1) * tile, arr.shape[-1] if path.startswith("diagonals") else arr.shape[0]))
    return arr[:, sl] if path.startswith("diagonals") else np.ascontiguousarray(arr[sl], dtype=dtype)


def _tile_task(url: str, options: str, token: str, part: str, i: int, j: int, arch: Architecture, kind: str,
               dtype: str, tile: int, page_cache: str, stored_bytes: int) -> tuple[str, int, int, float, float, float]:
    """Compute, write and record one tile; returns ``(part, i, j, seconds reading inputs, computing,
    writing and recording)``."""
    t0 = time.perf_counter()
    rows_name = "x_test" if part == "test_train" else "x_train"
    diag_rows = "diagonals/test" if part == "test_train" else "diagonals/train"
    xr = _block(url, options, token, f"inputs/{rows_name}", i, tile, dtype)
    xc = _block(url, options, token, "inputs/x_train", j, tile, dtype)
    dr = _block(url, options, token, diag_rows, i, tile)
    dc = _block(url, options, token, "diagonals/train", j, tile)
    symmetric = part == "train_train" and i == j
    t1 = time.perf_counter()
    values = tile_fn(arch, xr, xc, dr, dc, kind=kind, dtype=dtype, symmetric=symmetric)
    if not all_finite(values):  # neither written nor recorded: the build stops and names the setting
        raise KernelOverflowError(f"kernel/{part} tile ({i}, {j}) has non-finite values: "
                                  + _overflow_why(arch, dtype, dr, dc))
    t2 = time.perf_counter()
    path = tile_io(url, options, token, part).write(i, j, values)  # with its CRC32C
    if path is not None and wants_drop(page_cache, stored_bytes):
        _DROP_BEHIND.written(path)
    # after the write returned: the record never runs ahead of the data
    _array(url, options, token, f"done/{part}")[i, j] = 1
    return part, i, j, t1 - t0, t2 - t1, time.perf_counter() - t2


def _overflow_why(arch: Architecture, dtype: str, *diags: np.ndarray) -> str:
    for d in diags:
        reason = overflow_reason(arch, d, dtype=dtype)
        if reason:
            return reason
    return (f"the recursion overflows with depth={arch.depth}, weight_var={arch.weight_var}; lower depth or "
            "weight_var, use dtype='float64', or scale the inputs")


#: this worker process's recently written tiles (see :mod:`nngp_dask.pagecache`)
_DROP_BEHIND = DropBehind()


# --- driver side ------------------------------------------------------------------------
@dataclass
class BuildStats:
    """What a build did (also written to the store's attributes)."""

    tiles_total: int = 0
    tiles_computed: int = 0
    wall_s: float = 0.0
    read_s: float = 0.0  #: summed over tasks: reading input blocks and diagonals
    compute_s: float = 0.0  #: summed over tasks: computing the tiles alone
    write_s: float = 0.0  #: summed over tasks: writing and recording the tiles
    bytes_written: int = 0
    ingest_s: float = 0.0
    dashboard: str | None = None
    failed: list = field(default_factory=list)

    @property
    def tile_s(self) -> float:
        """Summed over tasks: inside the tile tasks (read inputs, compute, write, record)."""
        return self.read_s + self.compute_s + self.write_s

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["tile_s"] = self.tile_s
        d["tiles_per_s"] = self.tiles_computed / self.wall_s if self.wall_s else None
        d["gb_per_s"] = self.bytes_written / 1e9 / self.wall_s if self.wall_s else None
        d.pop("failed")
        return d


def _identity(arch: Architecture, kind: str, tile: int, dtype: np.dtype, train: PreparedInputs,
              test: PreparedInputs | None) -> StoreIdentity:
    return StoreIdentity(architecture=arch.to_dict(), kind=kind, tile=tile, dtype=dtype.name,
                         x_train=train.fingerprint, x_test=test.fingerprint if test else None,
                         n_train=train.n, n_test=test.n if test else 0, features=train.d)


def _write_layout(url: str, options: dict | None, ident: StoreIdentity, arch: Architecture,
                  train: PreparedInputs, test: PreparedInputs | None) -> None:
    """Create the store from scratch: inputs, diagonals, empty kernel arrays, then the identity."""
    g = zarr.open_group(url, mode="w", storage_options=options if "://" in url else None)
    # a half-written store is recognisably ours, so a re-run may recreate it
    g.attrs[ATTR] = {"format": FORMAT_VERSION, "version": __version__, "ingesting": True}
    t, depth = ident.tile, arch.depth
    kw = dict(overwrite=True, **array_codecs())  # every data chunk ends with its CRC32C
    flags = dict(compressors=None, overwrite=True)  # completion records: a lost or garbled one means "rebuild"
    parts = [("train", train)] + ([("test", test)] if test else [])
    for name, prep in parts:
        x = g.create_array(f"inputs/x_{name}", shape=(prep.n, prep.d), chunks=(t, prep.d), dtype="float64", **kw)
        dg = g.create_array(f"diagonals/{name}", shape=(depth + 1, prep.n), chunks=(depth + 1, t),
                            dtype="float64", **kw)
        dt = (g.create_array(f"diagonals/{name}_ntk", shape=(depth + 1, prep.n), chunks=(depth + 1, t),
                             dtype="float64", **kw) if ident.kind == "ntk" else None)
        with zarr.config.set({"array.write_empty_chunks": True}):  # no pass looking for all-zero blocks
            for start, block in prep.chunks(t):
                stop = start + block.shape[0]
                x[start:stop] = block
                kd = [diagonals(arch, block)] + ([diagonals(arch, block, kind="ntk")] if dt is not None else [])
                # exact, where build_kernel's check saw only the extreme norms (left as a store still ingesting)
                check_range(arch, kd, dtype=ident.dtype, where=f"the kernel of {prep.name}[{start}:{stop}]")
                dg[:, start:stop] = kd[0]
                if dt is not None:
                    dt[:, start:stop] = kd[1]
    n, grid = train.n, TileGrid(train.n, train.n, t)
    g.create_array("kernel/train_train", shape=(n, n), chunks=(t, t), dtype=ident.dtype, fill_value=np.nan, **kw)
    g.create_array("done/train_train", shape=grid.shape, chunks=(1, 1), dtype="uint8", fill_value=0, **flags)
    if test:
        tg = TileGrid(test.n, n, t)
        g.create_array("kernel/test_train", shape=(test.n, n), chunks=(t, t), dtype=ident.dtype,
                       fill_value=np.nan, **kw)
        g.create_array("done/test_train", shape=tg.shape, chunks=(1, 1), dtype="uint8", fill_value=0, **flags)
        prior = g.create_array("kernel/test_prior", shape=(test.n,), chunks=(max(t, 1),), dtype="float64", **kw)
        key = "diagonals/test_ntk" if ident.kind == "ntk" else "diagonals/test"
        prior[:] = g[key][depth]
    g.attrs[ATTR] = {"format": FORMAT_VERSION, "version": __version__, "identity": ident.__dict__,
                     "normalize": train.normalize}



def _refuse_overflow(arch: Architecture, kind: str, dt: np.dtype, prep: PreparedInputs) -> None:
    """:class:`KernelOverflowError` before anything is written, when the kernel of these inputs
    would overflow. The diagonals at the smallest and largest norm bound every diagonal (the
    activations that can overflow grow with the norm), and the diagonals bound the kernel; the
    exact diagonals are checked again as they are ingested."""
    sq = np.array(prep.sqnorm_range, dtype=np.float64)
    used = [diagonals_from_norms(arch, sq, prep.d)]
    if kind == "ntk":
        used.append(diagonals_from_norms(arch, sq, prep.d, kind="ntk"))
    check_range(arch, used, dtype=dt, sqnorm_max=float(sq[1]), where=f"the kernel of {prep.name}")


def build_kernel(
    arch: Architecture,
    x: ArrayLike | ArraySource | str | os.PathLike,
    store: str | os.PathLike,
    *,
    x_test: ArrayLike | ArraySource | str | os.PathLike | None = None,
    kind: str = "nngp",
    tile: int | None = None,
    dtype: DTypeLike = "float32",
    normalize: str = "none",
    overwrite: bool = False,
    client: Any = None,
    storage_options: dict | None = None,
    progress: bool = True,
    page_cache: str = "auto",
) -> KernelStore:
    """Build, or resume, the NNGP/NTK kernel of ``x`` (and ``x_test`` x ``x``) into a Zarr store.

    Parameters
    ----------
    arch : Architecture
    x : array_like (n, d), a source, or a path (.npy, .npz member via a source, .csv, IDX, .zarr)
        Training inputs, normalised here (``normalize``) and stored once.
    store : str or path-like
        Local directory or fsspec URL (``s3://bucket/run.zarr``).
    x_test : optional
        Test inputs: the test x train tiles and the test prior variances are built too.
    kind : {"nngp", "ntk"}
    tile : int, optional
        Tile edge (default :data:`nngp_dask.tiling.DEFAULT_TILE`, capped at n).
    dtype : {"float32", "float64"}
        Storage precision of the kernel.
    normalize : {"none", "unit_norm", "standardize"}
        Per-example normalisation applied at ingest.
    overwrite : bool
        Replace a kernel store built for other inputs or settings instead of refusing it. Only
        ever a kernel store: anything else at ``store`` is refused, never replaced.
    client : distributed.Client or str, optional
        Defaults to the current client, else an embedded cluster for this call.
    storage_options : dict, optional
        fsspec options for URL stores (credentials come from the environment, never from here
        into the store).
    progress : bool
        Show a progress bar (tiles done / total and tiles per second).
    page_cache : {"auto", "keep", "drop"}
        Whether tiles written to a local store stay in the operating system's page cache
        ("keep"), leave it once written out ("drop"), or leave it when the kernel is larger than
        half the memory of the host writing it ("auto"); see :mod:`nngp_dask.pagecache`.

    Returns
    -------
    KernelStore
        The opened store; ``.last_build`` holds the :class:`BuildStats` of this call.

    Raises
    ------
    StoreMismatchError
        The store holds a kernel of other inputs or settings (each difference named); the
        store is left untouched.
    NotAKernelStoreError
        ``store`` is a file, a non-empty folder that is not a kernel store, other Zarr data or
        an unreadable store (a StoreMismatchError); nothing there is written or deleted.
    KernelOverflowError
        The kernel would hold non-finite values (naming the setting that overflows): refused
        before anything is written, or, if a tile still overflows, before that tile is stored.
    InputError, ValueError
        Bad inputs or settings, before any work starts.
    """
    if not isinstance(arch, Architecture):
        raise TypeError(f"arch: expected an Architecture, got {type(arch).__name__}")
    check_kind(kind, arch)
    dt = check_dtype(dtype)
    check_policy(page_cache)
    t0 = time.perf_counter()
    train = prepare_inputs(x, name="x", normalize=normalize)
    test = prepare_inputs(x_test, name="x_test", normalize=normalize, features=train.d) if x_test is not None else None
    if tile is None:
        tile = min(DEFAULT_TILE, train.n)
    if not isinstance(tile, (int, np.integer)) or isinstance(tile, bool) or tile < 1:
        raise ValueError(f"tile: expected a positive integer, got {tile!r}")
    if tile > train.n:  # a tile never needs more rows than there are: one tile (not a chunk of tile x tile)
        log.info("tile %d is larger than the %d training inputs: the kernel is one tile of %d", tile, train.n, train.n)
        tile = train.n
    tile = int(tile)
    ident = _identity(arch, kind, tile, dt, train, test)
    url = normalise_url(store)
    opts = storage_options or None
    stats = BuildStats()
    # whatever is at the store path and not a kernel store (a file, a folder of other files, other
    # Zarr data) is refused, never replaced, even with overwrite: checked before taking the lock, and
    # again under it
    store_contents(url, opts)

    with store_lock(url, opts):
        meta = store_contents(url, opts)
        fresh = meta is None or (meta.get("ingesting") and "identity" not in meta)
        if meta is not None and not fresh:
            if meta.get("format") != FORMAT_VERSION:  # e.g. format 1: no tile checksums
                if not overwrite:
                    raise StoreMismatchError(format_message(url, meta.get("format")))
                log.warning("rebuilding store %s: format %r, this version writes format %d (tile checksums)", url,
                            meta.get("format"), FORMAT_VERSION)
                fresh = True
            else:
                try:
                    diffs = StoreIdentity.from_meta(meta, url).differences(ident)
                except NotAKernelStoreError as exc:  # our attributes, another version's identity fields
                    if not overwrite:
                        raise
                    diffs = [str(exc)]
                if diffs:
                    if not overwrite:
                        raise StoreMismatchError(
                            f"store: {url!r} was built for other settings ({'; '.join(diffs)}); "
                            "use a new store path or overwrite=True")
                    log.warning("overwriting store %s (%s)", url, "; ".join(diffs))
                    fresh = True
        if fresh:
            # before anything is written; a store that exists for these inputs passed this when it was made
            for prep in (train, test):
                if prep is not None:
                    _refuse_overflow(arch, kind, dt, prep)
            log.info("ingesting %d x %d training%s inputs into %s", train.n, train.d,
                     f" and {test.n} test" if test else "", url)
            _write_layout(url, opts, ident, arch, train, test)
        else:
            removed = remove_interrupted_writes(url)  # we hold the lock: nobody else is writing
            if removed:
                log.info("removed %d file(s) of writes a killed build left unfinished", removed)
        stats.ingest_s = time.perf_counter() - t0
        ks = KernelStore(url, opts)
        if not fresh:
            _forget_damaged(ks)
        todo = _missing(ks)
        stats.tiles_total = sum(1 for _ in ks.grid.upper_tiles()) + (
            ks.test_grid.shape[0] * ks.test_grid.shape[1] if ks.test_grid else 0)
        if todo:
            _run_tiles(ks, todo, arch, kind, dt, tile, ident.token(), client, progress, page_cache, stats)
        else:
            log.info("kernel store %s is complete; nothing to build", url)
        stats.wall_s = time.perf_counter() - t0
        ks.last_build = stats  # type: ignore[attr-defined]
        if stats.failed:
            overflow = next((f[3] for f in stats.failed if isinstance(f[3], KernelOverflowError)), None)
            if overflow is not None:  # a setting to change, not a fault to resume from
                raise KernelOverflowError(f"{overflow} ({len(stats.failed)} of {len(todo)} tile(s) were not written; "
                                          "no non-finite value was stored)") from None
            first = stats.failed[0]
            raise BuildError(
                f"{len(stats.failed)} of {len(todo)} tile(s) failed (first: {first[0]} tile {first[1:3]}: "
                f"{first[3]!r}); {stats.tiles_computed} were written and recorded; re-run to resume") from first[3]
    return ks


def _run_tiles(ks: KernelStore, todo: list, arch: Architecture, kind: str, dt: np.dtype, tile: int,
               token: str, client: Any, progress: bool, page_cache: str, stats: BuildStats) -> None:
    from distributed import as_completed
    from tqdm.auto import tqdm

    options = json.dumps(ks.storage_options or {}, sort_keys=True)
    t_start = time.perf_counter()
    compiled = precompile(arch, dt)  # while the cluster starts; its workers then load the cache
    with client_for(client) as c:
        compiled.result()
        stats.dashboard = c.dashboard_link
        stored = ks.nbytes_total()
        cache = "none (object store)" if "://" in ks.url else (
            f"{page_cache}: {'drop-behind' if wants_drop(page_cache, stored) else 'kept'} on this host")
        log.info("building %d tile(s) of %d (tile %d, %s, %s, %.2f GB in all; page cache %s); dashboard: %s",
                 len(todo), stats.tiles_total, tile, kind, dt.name, stored / 1e9, cache, c.dashboard_link)
        # deterministic keys: a resubmitted tile of the same store is the same task
        # the store's URL is in the key too: two stores of the same kernel built at once on one
        # shared scheduler must not share tasks (each task writes into its own store)
        where = hashlib.blake2b(ks.url.encode(), digest_size=4).hexdigest()
        futures = [c.submit(_tile_task, ks.url, options, token, part, i, j, arch, kind, dt.name, tile, page_cache,
                            stored, key=f"nngp-tile-{token}-{where}-{part}-{i}-{j}", pure=False)
                   for part, i, j in todo]
        bar = tqdm(total=len(todo), unit="tile", disable=None if progress else True, desc="kernel tiles",
                   smoothing=0.1)
        heartbeat = Heartbeat("kernel tiles", len(todo))
        for finished, fut in enumerate(as_completed(futures, loop=c.loop), 1):  # c: not always the default
            if fut.status == "error":
                exc = fut.exception()
                stats.failed.append((*_parse_key(fut.key), exc))
            else:
                part, i, j, read, compute, write = fut.result()
                stats.tiles_computed += 1
                stats.read_s += read
                stats.compute_s += compute
                stats.write_s += write
                grid = ks.grid if part == "train_train" else ks.test_grid
                stats.bytes_written += grid.entries([(i, j)]) * dt.itemsize
            fut.release()
            bar.update(1)
            heartbeat(finished)  # not bar.n: a disabled bar (progress=False, batch jobs) counts nothing
        bar.close()
    elapsed = time.perf_counter() - t_start
    log.info("wrote %d tiles in %.1f s (%.1f tiles/s, %.2f GB/s); summed over the tasks: %.1f s computing, "
             "%.1f s writing, %.1f s reading inputs", stats.tiles_computed, elapsed,
             stats.tiles_computed / max(elapsed, 1e-9), stats.bytes_written / 1e9 / max(elapsed, 1e-9),
             stats.compute_s, stats.write_s, stats.read_s)


def _forget_damaged(ks: KernelStore) -> None:
    """Clear the records of tiles whose chunk is missing or of the wrong size, so they are
    rebuilt. One ``stat`` per recorded tile; a tile whose bytes were changed in place is caught
    by its checksum when it is read (which clears its record too)."""
    for part in ("train_train", "test_train"):
        damaged = ks.check_tiles(part)
        if damaged:
            shown = ", ".join(f"({i}, {j}) {what}" for i, j, what in damaged[:4]) + (" ..." if len(damaged) > 4 else "")
            log.warning("kernel/%s of %s: %d recorded tile(s) damaged, rebuilding them: %s", part, ks.url,
                        len(damaged), shown)
            ks.forget_tiles(part, [(i, j) for i, j, _ in damaged])


def _missing(ks: KernelStore) -> list[tuple[str, int, int]]:
    return [(part, i, j) for part in ("train_train", "test_train") for i, j in ks.missing_tiles(part)]


def _parse_key(key: str) -> tuple[str, int, int]:
    *_, part, i, j = key.split("-")
    return part, int(i), int(j)
