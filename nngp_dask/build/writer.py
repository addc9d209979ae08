"""Writing a store's layout, and growing it in place when its data grows.

A fresh store is laid out by :func:`write_layout`. A store whose training inputs are a verified
prefix of the new ones (an *append*: rows added at the end, none changed, reordered or removed;
every setting unchanged), or whose test inputs alone changed, is updated in place by
:func:`apply_update`: the stored rows, their diagonals and every tile that touches only them are
kept; the arrays are resized; the tiles that touch a new row (the old ragged last tile row and
column included, since its tiles grow) and the test x train tiles that touch one are cleared, so
that the build then computes exactly those.

The prefix is verified, never trusted: at ingest the store records a fingerprint of every block of
``tile`` stored (normalised) rows (:func:`nngp_dask.build.ingest.block_hash`); an append compares
them with the fingerprints of the same blocks of the new inputs (the last, ragged, block cut at
the old row count), and any difference is a rebuild, named.

Crash safety: before anything is changed the store's attributes are replaced by a marker (the old
and the new identity, no ``identity`` key), so a store killed during an update never opens as a
kernel store and never looks complete; a re-run with the same inputs redoes the update (each step
is idempotent), anything else rebuilds it. The new identity is written last, with the cleared
tiles' completion records, and the tiles are then built (and resumed) as in any build.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import zarr

from .._version import __version__
from ..kernels import Architecture, check_range, diagonals
from ..store import (
    ATTR,
    FORMAT_VERSION,
    QUANTIZED,
    QUANTIZED_NOTE,
    SOLVES,
    TEST_PRIOR,
    StoreIdentity,
    array_codecs,
    compute_dtype,
    diagonals_path,
    dimension_names,
    done_path,
    inputs_path,
    is_remote,
    kernel_path,
)
from ..tiling import TileGrid
from .ingest import PreparedInputs, block_hash

__all__ = ["LINEAGE_MAX", "Update", "apply_update", "plan_update", "resume_update", "write_layout"]

#: Earlier identities (train token and row count) kept in a store's ``lineage``: each is a prefix
#: of the stored rows, so a solve of any of them can warm-start a solve of the store.
LINEAGE_MAX = 32
#: The settings that fix every tile's values: a change to any of them is a rebuild.
_FIXED = ("architecture", "kind", "tile", "dtype", "features")


@dataclass(frozen=True)
class Update:
    """An incremental update of a store: what is kept and what is recomputed."""

    old: StoreIdentity
    append: bool  #: training rows added after the verified prefix of ``old.n_train`` rows
    test: bool  #: the test inputs changed (new rows, another set, added or removed)
    hashes: list = field(default_factory=list)  #: fingerprints of the stored row blocks (kept ones first)

    @property
    def kept_blocks(self) -> int:
        """Tile rows (and columns) whose train x train tiles stay: the old full ones."""
        return self.old.n_train // self.old.tile if self.append else -(-self.old.n_train // self.old.tile)

    def describe(self, ident: StoreIdentity) -> str:
        parts = []
        if self.append:
            parts.append(f"{ident.n_train - self.old.n_train} training rows appended to the {self.old.n_train} "
                         f"stored (prefix verified by {len(self.hashes)} block fingerprint(s))")
        if self.test:
            parts.append(f"test inputs changed ({self.old.n_test} -> {ident.n_test} rows)")
        return "; ".join(parts)


def _create(g: zarr.Group, path: str, shape: tuple, chunks: tuple, dtype: Any, **kw: Any) -> zarr.Array:
    return g.create_array(path, shape=shape, chunks=chunks, dtype=dtype, overwrite=True,
                          dimension_names=dimension_names(path), **kw)


def _create_kernel(g: zarr.Group, part: str, shape: tuple, ident: StoreIdentity) -> None:
    """An empty kernel array: tiles of ``ident.tile``, filled with NaN (0 for int16 tiles, whose
    chunks also hold their offset and scale: see :mod:`nngp_dask.store.formats`)."""
    arr = _create(g, kernel_path(part), shape, (ident.tile, ident.tile), ident.dtype,
                  fill_value=0 if ident.dtype == QUANTIZED else np.nan, **array_codecs())
    if ident.dtype == QUANTIZED:
        arr.attrs["tile_format"] = QUANTIZED_NOTE


def _write_inputs(g: zarr.Group, name: str, prep: PreparedInputs, arch: Architecture, ident: StoreIdentity,
                  first: int = 0) -> list[str]:
    """Write ``prep``'s rows and diagonals from block ``first`` on (creating the arrays when
    ``first`` is 0, else growing them); returns the written blocks' fingerprints."""
    t, depth, ntk = ident.tile, arch.depth, ident.kind == "ntk"
    paths = [inputs_path(name), diagonals_path(name)] + ([diagonals_path(name, ntk=True)] if ntk else [])
    if first == 0:
        kw = array_codecs()  # every data chunk ends with its CRC32C
        arrays = [_create(g, paths[0], (prep.n, prep.d), (t, prep.d), "float64", **kw)]
        arrays += [_create(g, p, (depth + 1, prep.n), (depth + 1, t), "float64", **kw) for p in paths[1:]]
    else:
        arrays = [cast(zarr.Array, g[p]) for p in paths]  # the layout names arrays at these paths
        arrays[0].resize((prep.n, prep.d))
        for a in arrays[1:]:
            a.resize((depth + 1, prep.n))
    hashes = []
    with zarr.config.set({"array.write_empty_chunks": True}):  # no pass looking for all-zero blocks
        for start, block in prep.chunks(t, first=first):
            stop = start + block.shape[0]
            arrays[0][start:stop] = block
            hashes.append(block_hash(block))
            kd = [diagonals(arch, block)] + ([diagonals(arch, block, kind="ntk")] if ntk else [])
            # exact, where build_kernel's check saw only the extreme norms
            check_range(arch, kd, dtype=compute_dtype(ident.dtype), where=f"the kernel of {prep.name}[{start}:{stop}]")
            for a, values in zip(arrays[1:], kd):
                a[:, start:stop] = values
    return hashes


def _write_test_part(g: zarr.Group, ident: StoreIdentity, arch: Architecture, test: PreparedInputs) -> None:
    """The test inputs, their diagonals and prior variances, and the empty test x train kernel."""
    t = ident.tile
    _write_inputs(g, "test", test, arch, ident)
    tg = TileGrid(test.n, ident.n_train, t)
    _create_kernel(g, "test_train", (test.n, ident.n_train), ident)
    _create(g, done_path("test_train"), tg.shape, (1, 1), "uint8", fill_value=0, compressors=None)
    prior = _create(g, TEST_PRIOR, (test.n,), (max(t, 1),), "float64", **array_codecs())
    prior[:] = np.asarray(cast(zarr.Array, g[diagonals_path("test", ntk=ident.kind == "ntk")])[arch.depth])


def _final_attrs(ident: StoreIdentity, normalize: str, hashes: list[str], lineage: list) -> dict[str, Any]:
    return {"format": FORMAT_VERSION, "version": __version__, "identity": ident.__dict__, "normalize": normalize,
            "blocks": {"tile": ident.tile, "hashes": hashes}, "lineage": lineage}


def write_layout(url: str, options: dict | None, ident: StoreIdentity, arch: Architecture, train: PreparedInputs,
                 test: PreparedInputs | None) -> None:
    """Create the store from scratch: inputs, diagonals, empty kernel arrays, then the identity."""
    g = zarr.open_group(url, mode="w", storage_options=options if is_remote(url) else None)
    # a half-written store is recognisably ours, so a re-run may recreate it
    g.attrs[ATTR] = {"format": FORMAT_VERSION, "version": __version__, "ingesting": True}
    hashes = _write_inputs(g, "train", train, arch, ident)
    n, grid = train.n, TileGrid(train.n, train.n, ident.tile)
    _create_kernel(g, "train_train", (n, n), ident)
    # completion records: a lost or garbled one means "rebuild"
    _create(g, done_path("train_train"), grid.shape, (1, 1), "uint8", fill_value=0, compressors=None)
    if test:
        _write_test_part(g, ident, arch, test)
    g.attrs[ATTR] = _final_attrs(ident, train.normalize, hashes, [])


def _stored_hashes(g: zarr.Group, meta: dict, tile: int, n: int) -> list[str]:
    """The block fingerprints recorded at ingest, or (a store written before they were) computed
    from the stored inputs."""
    rec = meta.get("blocks")
    if isinstance(rec, dict) and rec.get("tile") == tile and len(rec.get("hashes") or []) == -(-n // tile):
        return list(rec["hashes"])
    x = cast(zarr.Array, g[inputs_path("train")])
    return [block_hash(np.asarray(x[start:min(start + tile, n)])) for start in range(0, n, tile)]


def plan_update(g: zarr.Group, meta: dict, old: StoreIdentity, new: StoreIdentity, train: PreparedInputs
                ) -> tuple[Update | None, str]:
    """Whether a store of identity ``old`` can be updated in place to ``new``.

    Returns ``(update, "")``, or ``(None, why not)`` (one line) when the store must be rebuilt:
    a changed setting, changed normalisation, fewer rows, or a stored row that differs (changed or
    reordered). Reads the new inputs' prefix once to verify it.
    """
    changed = [f"{f}: store has {getattr(old, f)!r}, requested {getattr(new, f)!r}" for f in _FIXED
               if getattr(old, f) != getattr(new, f)]
    if changed:
        return None, "settings changed (" + "; ".join(changed) + ")"
    if meta.get("normalize") != train.normalize:
        return None, f"normalize: store has {meta.get('normalize')!r}, requested {train.normalize!r}"
    t, n_old = old.tile, old.n_train
    hashes = _stored_hashes(g, meta, t, n_old)
    same_train = old.x_train == new.x_train and old.n_train == new.n_train
    if not same_train:
        if new.n_train < n_old:
            return None, f"x has {new.n_train} rows, fewer than the {n_old} the store holds (rows removed)"
        if new.n_train == n_old:
            return None, f"x has the store's {n_old} rows with other values (rows changed or reordered)"
        for k, (start, block) in enumerate(train.chunks(t, stop=n_old)):
            if block_hash(block) != hashes[k]:
                return None, (f"x rows {start}:{start + block.shape[0]} differ from the stored ones (rows changed "
                              "or reordered), so the new inputs are not an append")
    same_test = old.x_test == new.x_test and old.n_test == new.n_test
    return Update(old, append=not same_train, test=not same_test, hashes=hashes), ""


def resume_update(meta: dict) -> tuple[Update, StoreIdentity, list]:
    """The update a killed build left half-done (its marker), the identity it was heading for and
    the lineage it was writing."""
    u = meta["updating"]
    return (Update(StoreIdentity(**u["from"]), bool(u["append"]), bool(u["test"]), list(u["hashes"])),
            StoreIdentity(**u["to"]), list(meta.get("lineage") or []))


def _trim_stale_solves(g: zarr.Group, old: StoreIdentity) -> None:
    """Solves of the old kernel keep their solution (a warm start for the new one) and their Nystrom
    factor (extended to the new rows rather than rebuilt) and lose their checkpoints; solves of
    kernels before it keep only their solution."""
    if SOLVES not in g:
        return
    for _, sg in cast(zarr.Group, g[SOLVES]).groups():  # solves/ is a group of groups
        if "kernel" not in sg.attrs:  # written before solves named their kernel: this store's, then
            sg.attrs.update({"kernel": old.train_token(), "n": old.n_train})
        stale = ["slot0", "slot1"] + ([] if sg.attrs.get("kernel") == old.train_token() else
                                      ["lowrank_factor", "nystrom_transform", "nystrom_landmarks", "nystrom_gram"])
        for name in stale:
            if name in sg:
                del sg[name]


def apply_update(url: str, options: dict | None, upd: Update, ident: StoreIdentity, arch: Architecture,
                 train: PreparedInputs, test: PreparedInputs | None, lineage: list) -> int:
    """Update the store in place (see the module docstring); returns how many tiles were kept.

    ``lineage``: the earlier identities to record (for an append, including ``upd.old``).
    """
    g = zarr.open_group(url, mode="r+", storage_options=options if is_remote(url) else None)
    old, t = upd.old, ident.tile
    # first: the store no longer opens (nor looks complete) until the update is finished
    g.attrs[ATTR] = {"format": FORMAT_VERSION, "version": __version__, "ingesting": True, "normalize": train.normalize,
                     "lineage": lineage, "updating": {"from": old.__dict__, "to": ident.__dict__,
                                                      "append": upd.append, "test": upd.test, "hashes": upd.hashes}}
    kept = upd.kept_blocks
    hashes = list(upd.hashes)
    grid = TileGrid(ident.n_train, ident.n_train, t)
    kept_tiles = kept * (kept + 1) // 2
    if upd.append:
        hashes = hashes[:kept] + _write_inputs(g, "train", train, arch, ident, first=kept)
        cast(zarr.Array, g[kernel_path("train_train")]).resize((ident.n_train, ident.n_train))
        done = cast(zarr.Array, g[done_path("train_train")])
        done.resize(grid.shape)
        done[:, kept:] = 0  # the old ragged column grows: its tiles are recomputed
        _trim_stale_solves(g, old)
    if upd.test:
        for path in (inputs_path("test"), diagonals_path("test"), diagonals_path("test", ntk=True),
                     kernel_path("test_train"), done_path("test_train"), TEST_PRIOR):
            if path in g:
                del g[path]
        if test is not None:
            _write_test_part(g, ident, arch, test)
    elif ident.n_test:
        tg = TileGrid(ident.n_test, ident.n_train, t)
        if upd.append:
            cast(zarr.Array, g[kernel_path("test_train")]).resize((ident.n_test, ident.n_train))
            done = cast(zarr.Array, g[done_path("test_train")])
            done.resize(tg.shape)
            done[:, kept:] = 0
        kept_tiles += tg.shape[0] * kept
    g.attrs[ATTR] = _final_attrs(ident, train.normalize, hashes, lineage)
    return kept_tiles
