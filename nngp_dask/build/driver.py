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
import socket
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

import numpy as np
import zarr
from numpy.typing import ArrayLike, DTypeLike

from .. import defaults
from ..cluster import client_for, dashboard_link
from ..kernels import Architecture, KernelOverflowError, check_kind, check_range, diagonals_from_norms
from ..monitor import tracked
from ..store import (
    FORMAT_VERSION,
    ArraySource,
    KernelStore,
    NotAKernelStoreError,
    ReadAhead,
    StoreIdentity,
    StoreMismatchError,
    check_free_space,
    check_policy,
    check_store_dtype,
    chunk_nbytes,
    compute_dtype,
    format_message,
    is_remote,
    normalise_url,
    remove_interrupted_writes,
    store_contents,
    store_lock,
    stored_itemsize,
    wants_drop,
)
from ..tiling import DEFAULT_TILE
from .ingest import PreparedInputs, prepare_inputs
from .precompile import precompile
from .tasks import tile_task
from .writer import LINEAGE_MAX, Update, apply_update, plan_update, resume_update, write_layout

__all__ = ["build_kernel", "BuildError"]

log = logging.getLogger("nngp_dask")

class BuildError(RuntimeError):
    """Some tiles failed; those that succeeded are recorded and a re-run resumes."""


@dataclass
class BuildStats:
    """What a build did (also written to the store's attributes)."""

    tiles_total: int = 0
    tiles_computed: int = 0
    tiles_kept: int = 0  #: tiles an incremental update kept from the store as it was
    #: "new", "resumed", "append", "test set", "append + test set" or "rebuilt: <why>"
    update: str = "new"
    wall_s: float = 0.0
    read_s: float = 0.0  #: summed over tasks: reading input blocks and diagonals
    compute_s: float = 0.0  #: summed over tasks: computing the tiles alone
    write_s: float = 0.0  #: summed over tasks: writing and recording the tiles
    bytes_written: int = 0
    read_ahead_bytes: int = 0  #: of the kept tiles, read into the page cache during an append
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


def _identity(arch: Architecture, kind: str, tile: int, fmt: str, train: PreparedInputs,
              test: PreparedInputs | None) -> StoreIdentity:
    return StoreIdentity(architecture=arch.to_dict(), kind=kind, tile=tile, dtype=fmt,
                         x_train=train.fingerprint, x_test=test.fingerprint if test else None,
                         n_train=train.n, n_test=test.n if test else 0, features=train.d)


def _decide(url: str, opts: dict | None, meta: dict | None, ident: StoreIdentity, train: PreparedInputs,
            overwrite: bool, append: bool | None, stats: BuildStats) -> tuple[bool, Update | None, list]:
    """What to do with what is at the store: ``(fresh, update, lineage)``. ``fresh``: (re)create it;
    ``update``: grow it in place (recording ``lineage``); neither: resume it as it is. Raises
    :class:`StoreMismatchError` where today's rules refuse it."""
    if meta is None:
        return True, None, []
    if meta.get("updating") and meta.get("format") == FORMAT_VERSION:
        try:
            pending, target, lineage = resume_update(meta)
        except (KeyError, TypeError, ValueError):
            pending, target, lineage = None, None, []
        if pending is not None and target == ident:
            stats.update = _kind(pending) + " (resumed)"
            log.info("store %s: resuming an interrupted update (%s)", url, pending.describe(ident))
            return False, pending, lineage
        stats.update = "rebuilt: an update to other inputs was interrupted there"
        log.warning("rebuilding store %s: an update to other inputs was interrupted there", url)
        return True, None, []
    if meta.get("ingesting") and "identity" not in meta:
        return True, None, []
    if meta.get("format") != FORMAT_VERSION:  # e.g. format 1: no tile checksums
        if not overwrite:
            raise StoreMismatchError(format_message(url, meta.get("format")))
        stats.update = f"rebuilt: format {meta.get('format')!r}"
        log.warning("rebuilding store %s: format %r, this version writes format %d (tile checksums)", url,
                    meta.get("format"), FORMAT_VERSION)
        return True, None, []
    old = None
    try:
        old = StoreIdentity.from_meta(meta, url)
        diffs = old.differences(ident)
    except NotAKernelStoreError as exc:  # our attributes, another version's identity fields
        if not overwrite:
            raise
        diffs = [str(exc)]
    if not diffs:
        stats.update = "unchanged"
        return False, None, []
    update, why = None, "; ".join(diffs)
    if old is not None and append is not False:
        g = zarr.open_group(url, mode="r", storage_options=opts if is_remote(url) else None)
        update, reason = plan_update(g, meta, old, ident, train)
        why = reason or why
    if update is not None and (append or (append is None and overwrite)):
        stats.update = _kind(update)
        log.info("store %s: %s", url, update.describe(ident))
        lineage = list(meta.get("lineage") or [])
        if update.append:
            assert old is not None  # an update is planned only against the stored identity
            lineage = (lineage + [{"token": old.train_token(), "n_train": old.n_train}])[-LINEAGE_MAX:]
        return False, update, lineage
    if not overwrite:
        hint = " (or append=True to grow it in place)" if update is not None else ""
        raise StoreMismatchError(f"store: {url!r} was built for other settings ({'; '.join(diffs)})"
                                 + (f"; not an incremental update: {why}" if update is None and append else "")
                                 + f"; use a new store path or overwrite=True{hint}")
    stats.update = f"rebuilt: {why}"
    log.warning("rebuilding store %s: %s", url, why)
    return True, None, []


def _kind(update: Update) -> str:
    return " + ".join(k for k, on in (("append", update.append), ("test set", update.test)) if on)


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
    append: bool | None = None,
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
    dtype : {"float32", "float64", "int16"}, default "float32"
        Storage precision of the kernel (:data:`nngp_dask.defaults.STORE_DTYPE`, as pipelines'
        ``kernel.dtype``; the in-memory estimators default to float64). Products with it
        accumulate in float64 either way. ``"int16"`` computes tiles in float32 and stores each
        quantised across its own range (half the bytes of float32, every value within
        ``(max - min) / 131070`` of its tile's; :mod:`nngp_dask.store.formats`): for kernels
        that would not otherwise stay in the page cache; reads return float32.
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
        Where the tiles stay ("keep", or "auto" under half the memory) and the workers share this
        host's cache, an append also reads the tiles it keeps into the cache while the new ones
        compute, for the solve that follows.
    append : bool, optional
        Whether a store built for other inputs may be updated in place rather than rebuilt: when
        ``x`` starts with exactly the stored rows (verified block by block against fingerprints
        recorded at ingest) and every setting is the same, only the tiles that touch a new row
        are computed; when only ``x_test`` changed, only the test x train tiles. ``None``
        (default): do so when ``overwrite`` allows changing the store; ``True``: also without
        ``overwrite`` (anything else is then refused, or rebuilt with ``overwrite``, naming why);
        ``False``: never (``overwrite`` rebuilds from scratch). See :mod:`nngp_dask.build.writer`.

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
    fmt = check_store_dtype(dtype)
    dt = compute_dtype(fmt)
    check_policy(page_cache)
    if not isinstance(overwrite, bool):
        raise TypeError(f"overwrite: expected True or False, got {overwrite!r}")
    if append is not None and not isinstance(append, bool):
        raise TypeError(f"append: expected True, False or None, got {append!r}")
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
    ident = _identity(arch, kind, tile, fmt, train, test)
    url = normalise_url(store)
    opts = storage_options or None
    stats = BuildStats()
    # whatever is at the store path and not a kernel store (a file, a folder of other files, other
    # Zarr data) is refused, never replaced, even with overwrite: checked before taking the lock, and
    # again under it
    store_contents(url, opts)

    with store_lock(url, opts):
        meta = store_contents(url, opts)
        fresh, update, lineage = _decide(url, opts, meta, ident, train, overwrite, append, stats)
        if fresh:
            # before anything is written; a store that exists for these inputs passed this when it was made
            for prep in (train, test):
                if prep is not None:
                    _refuse_overflow(arch, kind, dt, prep)
            _check_space(url, ident, _tile_count(train.n, test.n if test else 0, tile))
            log.info("ingesting %d x %d training%s inputs into %s", train.n, train.d,
                     f" and {test.n} test" if test else "", url)
            write_layout(url, opts, ident, arch, train, test)
        else:
            removed = remove_interrupted_writes(url)  # we hold the lock: nobody else is writing
            if removed:
                log.info("removed %d file(s) of writes a killed build left unfinished", removed)
            if update is not None:
                for prep in (train if update.append else None, test if update.test else None):
                    if prep is not None:
                        _refuse_overflow(arch, kind, dt, prep)
                stats.tiles_kept = apply_update(url, opts, update, ident, arch, train, test, lineage)
        stats.ingest_s = time.perf_counter() - t0
        ks = KernelStore(url, opts)
        if not fresh:
            _forget_damaged(ks)
        todo = _missing(ks)
        stats.tiles_total = sum(1 for _ in ks.grid.upper_tiles()) + (
            ks.test_grid.shape[0] * ks.test_grid.shape[1] if ks.test_grid else 0)
        if update is not None:
            log.info("updated store %s in place (%s): %d tile(s) kept, %d to build", url, stats.update,
                     stats.tiles_kept, len(todo))
        if todo and not fresh:  # a resume or an update: only the missing tiles still need room
            _check_space(url, ident, len(todo))
        if todo:
            ahead = _kept_files(ks, todo) if update is not None and update.append else []
            _run_tiles(ks, todo, arch, kind, dt, tile, ident.token(), client, progress, page_cache, stats, ahead)
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


def _tile_count(n: int, m: int, tile: int) -> int:
    """Stored tiles of a kernel of ``n`` training and ``m`` test points: the upper ones of the
    train x train grid and all of the test x train grid."""
    nt, mt = -(-n // tile), -(-m // tile)
    return nt * (nt + 1) // 2 + mt * nt


def _check_space(url: str, ident: StoreIdentity, tiles: int) -> None:
    """Refuse, before any work, a build whose ``tiles`` (full chunks with their checksums) do not
    fit on the store's disk."""
    check_free_space(url, tiles * chunk_nbytes(ident.dtype, ident.tile),
                     f"{tiles} kernel tile(s) of {ident.tile} x {ident.tile} {ident.dtype}")


def _kept_files(ks: KernelStore, todo: list) -> list[str]:
    """The local files of the tiles an update keeps, train x train row by row (a CG pass's order)
    and then test x train; none on object storage."""
    building = set(todo)
    parts = [("train_train", ks.grid.upper_tiles())]
    if ks.test_grid is not None:
        parts.append(("test_train", ks.test_grid.all_tiles()))
    files = []
    for part, tiles in parts:
        io = ks.tiles(part)
        for i, j in tiles:
            path = io.path(i, j) if (part, i, j) not in building else None
            if path is not None:
                files.append(path)
    return files


def _workers_here(client: Any) -> bool:
    """Whether every worker runs on this host, sharing its page cache."""
    addresses = [urlparse(address) for address in client.nthreads()]
    hosts = {a.hostname for a in addresses if a.scheme != "inproc"}  # in-process workers are here
    here = {"127.0.0.1", "::1", "localhost", socket.gethostname(), socket.getfqdn()}
    try:
        here.add(socket.gethostbyname(socket.gethostname()))
    except OSError:
        pass
    return bool(addresses) and hosts <= here


def _run_tiles(ks: KernelStore, todo: list, arch: Architecture, kind: str, dt: np.dtype, tile: int,
               token: str, client: Any, progress: bool, page_cache: str, stats: BuildStats,
               kept: list[str] | None = None) -> None:
    """Compute and store the tiles ``todo``; with ``kept`` (an append's kept tiles), read those
    into the page cache meanwhile when they will stay there and the workers share it: the solve
    that follows reads all of them, and a scheduled re-fit finds them on disk only (a cold pass
    of ~7 s at 60,000 points, hidden behind the new tiles' compute; RESULTS.md section 14)."""
    from distributed import as_completed

    options = json.dumps(ks.storage_options or {}, sort_keys=True)
    t_start = time.perf_counter()
    compiled = precompile(arch, ks.stored_dtype)  # while the cluster starts; its workers then load the cache
    with client_for(client) as c:
        compiled.result()
        stats.dashboard = dashboard_link(c)
        stored = ks.nbytes_total()
        cache = "none (object store)" if is_remote(ks.url) else (
            f"{page_cache}: {'drop-behind' if wants_drop(page_cache, stored) else 'kept'} on this host")
        log.info("building %d tile(s) of %d (tile %d, %s, %s, %.2f GB in all; page cache %s); dashboard: %s",
                 len(todo), stats.tiles_total, tile, kind, ks.stored_dtype, stored / 1e9, cache, stats.dashboard)
        # deterministic keys: a resubmitted tile of the same store is the same task
        # the store's URL is in the key too: two stores of the same kernel built at once on one
        # shared scheduler must not share tasks (each task writes into its own store)
        where = hashlib.blake2b(ks.url.encode(), digest_size=4).hexdigest()
        futures = [c.submit(tile_task, ks.url, options, token, part, i, j, arch, kind, dt.name, tile, page_cache,
                            stored, key=f"nngp-tile-{token}-{where}-{part}-{i}-{j}", pure=False)
                   for part, i, j in todo]
        ahead = ReadAhead(kept if kept and not wants_drop(page_cache, stored) and _workers_here(c) else [])
        if ahead.paths:
            log.info("reading the %d kept tile(s) into the page cache while the new ones compute (the solve "
                     "reads them next)", len(ahead.paths))
        with ahead, tracked("kernel tiles", len(todo), progress=progress, unit="tile") as beat:
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
                    stats.bytes_written += grid.entries([(i, j)]) * stored_itemsize(ks.stored_dtype)
                fut.release()
                beat(finished)
    elapsed = time.perf_counter() - t_start
    log.info("wrote %d tiles in %.1f s (%.1f tiles/s, %.2f GB/s); summed over the tasks: %.1f s computing, "
             "%.1f s writing, %.1f s reading inputs", stats.tiles_computed, elapsed,
             stats.tiles_computed / max(elapsed, 1e-9), stats.bytes_written / 1e9 / max(elapsed, 1e-9),
             stats.compute_s, stats.write_s, stats.read_s)
    if ahead.files:
        stats.read_ahead_bytes = ahead.nbytes
        log.info("read %d of the %d kept tile(s) (%.2f GB) into the page cache meanwhile, in %.1f s", ahead.files,
                 len(ahead.paths), ahead.nbytes / 1e9, ahead.seconds)


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
