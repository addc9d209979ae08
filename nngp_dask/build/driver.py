"""Build (or resume) a kernel store: ingest inputs, per-point diagonals, one Dask task per tile.

Each task reads its two input blocks from the store, runs :func:`nngp_dask.kernels.tile`,
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
from typing import Any, cast

import numpy as np
import zarr
from numpy.typing import ArrayLike, DTypeLike

from .. import defaults
from .._version import __version__
from ..cluster import client_for, dashboard_link
from ..kernels import (Architecture, KernelOverflowError, check_dtype, check_kind, check_range, diagonals,
                       diagonals_from_norms)
from ..monitor import tracked
from ..store import (ATTR, FORMAT_VERSION, TEST_PRIOR, ArraySource, KernelStore, NotAKernelStoreError, StoreIdentity,
                     StoreMismatchError, array_codecs, check_policy, diagonals_path, dimension_names, done_path,
                     format_message,
                     inputs_path, is_remote, kernel_path, normalise_url, remove_interrupted_writes, store_contents,
                     store_lock, wants_drop)
from ..tiling import DEFAULT_TILE, TileGrid
from .ingest import PreparedInputs, prepare_inputs
from .precompile import precompile
from .tasks import tile_task

__all__ = ["build_kernel", "BuildError"]

log = logging.getLogger("nngp_dask")

class BuildError(RuntimeError):
    """Some tiles failed; those that succeeded are recorded and a re-run resumes."""


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
    g = zarr.open_group(url, mode="w", storage_options=options if is_remote(url) else None)
    # a half-written store is recognisably ours, so a re-run may recreate it
    g.attrs[ATTR] = {"format": FORMAT_VERSION, "version": __version__, "ingesting": True}
    t, depth = ident.tile, arch.depth
    kw: dict[str, Any] = dict(overwrite=True, **array_codecs())  # every data chunk ends with its CRC32C
    # completion records: a lost or garbled one means "rebuild"
    flags: dict[str, Any] = dict(compressors=None, overwrite=True)
    parts = [("train", train)] + ([("test", test)] if test else [])
    for name, prep in parts:
        x = g.create_array(inputs_path(name), shape=(prep.n, prep.d), chunks=(t, prep.d), dtype="float64",
                           dimension_names=dimension_names(inputs_path(name)), **kw)
        dg = g.create_array(diagonals_path(name), shape=(depth + 1, prep.n), chunks=(depth + 1, t),
                            dtype="float64", dimension_names=dimension_names(diagonals_path(name)), **kw)
        dt = (g.create_array(diagonals_path(name, ntk=True), shape=(depth + 1, prep.n), chunks=(depth + 1, t),
                             dtype="float64", dimension_names=dimension_names(diagonals_path(name, ntk=True)), **kw)
              if ident.kind == "ntk" else None)
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
    g.create_array(kernel_path("train_train"), shape=(n, n), chunks=(t, t), dtype=ident.dtype, fill_value=np.nan,
                   dimension_names=dimension_names(kernel_path("train_train")), **kw)
    g.create_array(done_path("train_train"), shape=grid.shape, chunks=(1, 1), dtype="uint8", fill_value=0,
                   dimension_names=dimension_names(done_path("train_train")), **flags)
    if test:
        tg = TileGrid(test.n, n, t)
        g.create_array(kernel_path("test_train"), shape=(test.n, n), chunks=(t, t), dtype=ident.dtype,
                       fill_value=np.nan, dimension_names=dimension_names(kernel_path("test_train")), **kw)
        g.create_array(done_path("test_train"), shape=tg.shape, chunks=(1, 1), dtype="uint8", fill_value=0,
                       dimension_names=dimension_names(done_path("test_train")), **flags)
        prior = g.create_array(TEST_PRIOR, shape=(test.n,), chunks=(max(t, 1),), dtype="float64",
                               dimension_names=dimension_names(TEST_PRIOR), **kw)
        key = diagonals_path("test", ntk=ident.kind == "ntk")
        prior[:] = np.asarray(cast(zarr.Array, g[key])[depth])
    g.attrs[ATTR] = {"format": FORMAT_VERSION, "version": __version__, "identity": ident.__dict__,
                     "normalize": train.normalize}



def _refuse_overflow(arch: Architecture, kind: str, dt: np.dtype, prep: PreparedInputs) -> None:
    """:class:`KernelOverflowError` before anything is written, when the kernel of these inputs
    would overflow. The diagonals at the smallest and largest norm bound every diagonal (the
    activations that can overflow grow with the norm), and the diagonals bound the kernel; the
    exact diagonals are checked again as they are ingested."""
    if arch.input_weight_var is not None and len(arch.input_weight_var) != prep.d:
        raise ValueError(f"input_weight_var: expected {prep.d} values (one per feature of {prep.name}), "
                         f"got {len(arch.input_weight_var)}")
    sq = np.array(prep.sqnorm_range, dtype=np.float64)
    if arch.input_weight_var is not None:  # ARD: the weighted norms lie within these bounds
        sq = sq * np.array([min(arch.input_weight_var), max(arch.input_weight_var)])
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
    dtype: DTypeLike = defaults.STORE_DTYPE,
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
    dtype : {"float32", "float64"}, default "float32"
        Storage precision of the kernel (:data:`nngp_dask.defaults.STORE_DTYPE`, as pipelines'
        ``kernel.dtype``; the in-memory estimators default to float64). Products with it
        accumulate in float64 either way.
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
        half the memory of the host writing it ("auto"); see :mod:`nngp_dask.store.pagecache`.

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

    options = json.dumps(ks.storage_options or {}, sort_keys=True)
    t_start = time.perf_counter()
    compiled = precompile(arch, dt)  # while the cluster starts; its workers then load the cache
    with client_for(client) as c:
        compiled.result()
        stats.dashboard = dashboard_link(c)
        stored = ks.nbytes_total()
        cache = "none (object store)" if is_remote(ks.url) else (
            f"{page_cache}: {'drop-behind' if wants_drop(page_cache, stored) else 'kept'} on this host")
        log.info("building %d tile(s) of %d (tile %d, %s, %s, %.2f GB in all; page cache %s); dashboard: %s",
                 len(todo), stats.tiles_total, tile, kind, dt.name, stored / 1e9, cache, stats.dashboard)
        # deterministic keys: a resubmitted tile of the same store is the same task
        # the store's URL is in the key too: two stores of the same kernel built at once on one
        # shared scheduler must not share tasks (each task writes into its own store)
        where = hashlib.blake2b(ks.url.encode(), digest_size=4).hexdigest()
        futures = [c.submit(tile_task, ks.url, options, token, part, i, j, arch, kind, dt.name, tile, page_cache,
                            stored, key=f"nngp-tile-{token}-{where}-{part}-{i}-{j}", pure=False)
                   for part, i, j in todo]
        with tracked("kernel tiles", len(todo), progress=progress, unit="tile") as beat:
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
                    assert grid is not None  # a test_train tile: the store has test inputs
                    stats.bytes_written += grid.entries([(i, j)]) * dt.itemsize
                fut.release()
                beat(finished)
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
