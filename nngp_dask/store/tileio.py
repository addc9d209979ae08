"""Verified tile I/O: each kernel tile read and written with its CRC32C (store format 2).

:class:`TileIO` reads local chunk files directly (``readinto`` a reusable buffer) and remembers
which files it verified recently, so a CG pass over a cached kernel does not pay the checksum on
every iteration; object storage goes through zarr's store.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from functools import lru_cache
from typing import Any, NamedTuple, cast, overload

import google_crc32c
import numpy as np
import zarr
from zarr.codecs import BytesCodec
from zarr.core.metadata import ArrayV3Metadata

from .errors import CorruptTileError, StoreMismatchError
from .formats import QUANTIZED, SCALES, dequantize, quantize
from .layout import done_path, has_checksum, is_remote, kernel_path, local_chunk_file, open_group
from .pagecache import map_pages

__all__ = ["VERIFIED_TTL_S", "PackedTile", "TileIO", "read_tile_task", "tile_io"]

log = logging.getLogger("nngp_dask")

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


class PackedTile(NamedTuple):
    """A tile as stored: ``values`` (float32, float64 or int16) stand for ``offset + scale * values``
    (``offset`` 0 and ``scale`` 1 for float tiles)."""

    values: np.ndarray
    offset: float
    scale: float


def _write_all(f: Any, data: memoryview) -> None:
    done = 0
    while done < len(data):
        done += f.write(data[done:])


class TileIO:
    """Reads and writes the tiles of ``kernel/<part>`` of one store, each with its CRC32C.

    A chunk is the tile's values, raw little-endian and padded to the full tile with the fill
    value, followed by the CRC32C of those bytes: what zarr's ``bytes`` + ``crc32c`` codecs write
    and check, so zarr reads these arrays too. An ``int16`` tile (:mod:`~nngp_dask.store.formats`)
    has its offset and scale between its values and the checksum (covered by it), which zarr's
    codecs do not decode: such arrays are read here, where :meth:`read` returns float32 values.

    Local files are read and written here directly (``readinto`` a reusable buffer, or mapped
    read-only; the checksum written after the values rather than appended to a copy of them;
    write to ``<chunk>.<uuid>.partial``, then rename); object storage goes through zarr's store.
    Unlike zarr, a missing chunk is an error, not fill values.

    Obtain with :func:`tile_io` (cached per process) or :meth:`KernelStore.tiles`.
    """

    def __init__(self, url: str, storage_options: dict | None, part: str) -> None:
        self.url, self.part = url, part
        self.storage_options = storage_options
        self.array = cast(zarr.Array, open_group(url, storage_options)[kernel_path(part)])
        # a kernel store's arrays are Zarr v3 arrays (layout.array_codecs)
        codecs = tuple(cast(ArrayV3Metadata, self.array.metadata).codecs)
        self.checksum = has_checksum(self.array)
        serializer = codecs[0] if codecs else None
        if not isinstance(serializer, BytesCodec) or getattr(serializer.endian, "value", None) not in (None, "little") \
                or len(codecs) != 1 + self.checksum:
            raise StoreMismatchError(f"store: kernel/{part} at {url!r} has codecs {codecs}; expected bytes(little) "
                                     "followed by crc32c: rebuild the store")
        self.shape: tuple[int, int] = tuple(self.array.shape)  # type: ignore[assignment]
        self.chunk: tuple[int, int] = tuple(self.array.chunks)  # type: ignore[assignment]
        #: as stored, and as :meth:`read` returns them (float32 for int16 tiles)
        self.stored = np.dtype(self.array.dtype).newbyteorder("<")
        self.quantized = self.stored.name == QUANTIZED
        self.dtype = np.dtype(np.float32) if self.quantized else self.stored
        self.fill = self.array.metadata.fill_value
        self.value_bytes = self.chunk[0] * self.chunk[1] * self.stored.itemsize
        #: the bytes the checksum covers
        self.payload_bytes = self.value_bytes + (2 * SCALES.itemsize if self.quantized else 0)
        self.nbytes = self.payload_bytes + (4 if self.checksum else 0)
        self.local = not is_remote(url)

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
            cast(zarr.Array, open_group(self.url, self.storage_options)[done_path(self.part)])[i, j] = 0
        except Exception as exc:  # a read-only store, say: the message still names the tile
            log.warning("could not clear the record of damaged tile (%d, %d) of %s: %s", i, j, self.url, exc)
            cleared = ""
        _VERIFIED.pop(self.path(i, j) or "", None)
        return CorruptTileError(f"kernel tile ({i}, {j}) of {self.url}/kernel/{self.part} {what}; {cleared}run the "
                                "build again (build_kernel, or the same nngp-dask command) to rebuild it")

    @overload
    def size_problem(self, size: None) -> str: ...
    @overload
    def size_problem(self, size: int) -> str | None: ...

    def size_problem(self, size: int | None) -> str | None:
        """What is wrong with a chunk of ``size`` bytes (None: missing), or None if nothing."""
        if size is None:
            return "is recorded as written but its chunk is missing"
        if size != self.nbytes:
            return f"has {size} bytes, expected {self.nbytes} (truncated or overwritten)"
        return None

    def _crc_ok(self, raw: np.ndarray) -> bool:
        stored = int.from_bytes(raw[self.payload_bytes:self.nbytes].tobytes(), "little")
        return google_crc32c.value(raw[:self.payload_bytes]) == stored

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
                path = self.path(i, j)
                assert path is not None  # a local store
                try:
                    out.append(os.stat(path).st_size)
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
    def _raw(self, i: int, j: int, out: np.ndarray | None, *, force: bool = False, mapped: bool = False
             ) -> np.ndarray:
        """The chunk's bytes (values and checksum), verified; ``out``: a uint8 buffer to reuse;
        ``mapped``: the file's pages themselves, read-only (local stores)."""
        if not self.local:
            from zarr.core.buffer import default_buffer_prototype
            from zarr.core.sync import sync

            fetched = sync(self.array.store_path.store.get(self._key(i, j), prototype=default_buffer_prototype()))
            raw = None if fetched is None else fetched.as_numpy_array()
            problem = self.size_problem(None if raw is None else raw.size)
            if problem:
                raise self.damaged(i, j, problem)
            assert raw is not None  # size_problem(None) is a problem
            if self.checksum and not self._crc_ok(raw):
                raise self.damaged(i, j, "failed its crc32c check")
            return raw
        path = self.path(i, j)
        assert path is not None  # a local store
        try:
            f = open(path, "rb", buffering=0)
        except FileNotFoundError:
            raise self.damaged(i, j, self.size_problem(None)) from None
        with f:
            st = os.fstat(f.fileno())
            if st.st_size != self.nbytes:
                raise self.damaged(i, j, cast(str, self.size_problem(st.st_size)))  # a size other than nbytes
            if mapped:
                # the size was checked just above; the mapping outlives the file object and is
                # unmapped when the last array viewing it goes
                pages = map_pages(f.fileno(), self.nbytes)
                raw, got = np.frombuffer(pages, dtype=np.uint8), self.nbytes
            else:
                raw = out[:self.nbytes] if out is not None and out.size >= self.nbytes \
                    else np.empty(self.nbytes, np.uint8)
                # numpy's stubs declare ndarray.__buffer__ for Python >= 3.12 only; arrays export buffers on 3.11 too
                view, got = memoryview(raw), 0  # type: ignore[arg-type]
                while got < self.nbytes and (n := f.readinto(view[got:])):
                    got += n
        if got != self.nbytes:
            raise self.damaged(i, j, cast(str, self.size_problem(got)))  # a size other than nbytes
        if self.checksum:
            sig, seen = _signature(st), _VERIFIED.get(path)
            if force or seen is None or seen[0] != sig or time.monotonic() - seen[1] > VERIFIED_TTL_S:
                if not self._crc_ok(raw):
                    raise self.damaged(i, j, "failed its crc32c check")
                if len(_VERIFIED) > 200_000:
                    _VERIFIED.clear()
                _VERIFIED[path] = (sig, time.monotonic())
        return raw

    def read_packed(self, i: int, j: int, out: np.ndarray | None = None, *, mapped: bool = False) -> PackedTile:
        """Tile ``(i, j)`` as stored, verified: its values of shape ``(rows, cols)`` of the tile
        (ragged at the edges) in the stored dtype, with the offset and scale they stand for (0
        and 1 unless the tile is int16). With ``out`` (a uint8 buffer of at least :attr:`nbytes`)
        the values live in ``out`` and are valid until it is reused.

        With ``mapped`` (local stores; ignored on object storage) the values are the chunk file's
        pages mapped read-only, not copied: for readers that only read, such as a CG pass, whose
        tile products then read the page cache directly (RESULTS.md section 21). A chunk is
        replaced by renaming a new file over it, so a mapping keeps the values it was made with.

        Raises :class:`CorruptTileError` when the chunk is missing, of the wrong size or fails its
        checksum.
        """
        rows, cols = self._extent(i, j)
        raw = self._raw(i, j, out, mapped=mapped)
        values = raw[:self.value_bytes].view(self.stored).reshape(self.chunk)[:rows, :cols]
        if not self.quantized:
            return PackedTile(values, 0.0, 1.0)
        offset, scale = raw[self.value_bytes:self.payload_bytes].view(SCALES)
        return PackedTile(values, float(offset), float(scale))

    def read(self, i: int, j: int, out: np.ndarray | None = None, *, mapped: bool = False) -> np.ndarray:
        """Tile ``(i, j)``, verified: shape ``(rows, cols)`` of the tile (ragged at the edges),
        of :attr:`dtype` (the stored dtype; float32 for int16 tiles, a new array).
        ``out`` and ``mapped`` as in :meth:`read_packed`.

        Raises :class:`CorruptTileError` when the chunk is missing, of the wrong size or fails its
        checksum.
        """
        values, offset, scale = self.read_packed(i, j, out, mapped=mapped)
        return dequantize(values, offset, scale, self.dtype) if self.quantized else values

    def write(self, i: int, j: int, values: np.ndarray) -> str | None:
        """Write tile ``(i, j)`` with its checksum; returns the local file written (None on
        object storage). The file appears complete or not at all."""
        rows, cols = self._extent(i, j)
        if values.shape != (rows, cols):
            raise ValueError(f"tile ({i}, {j}): expected shape {(rows, cols)}, got {values.shape}")
        tail = b""
        if self.quantized:
            values, offset, scale = quantize(values)
            tail = np.array([offset, scale], SCALES).tobytes()
        parts = self._chunk_parts(values, rows, cols, tail)
        if not self.local:  # one PUT of the chunk's bytes (for float tiles, what zarr's codecs write)
            self._put(i, j, b"".join(parts))
            return None
        path = self.path(i, j)
        assert path is not None  # a local store
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{uuid.uuid4().hex}.partial"  # what remove_interrupted_writes removes
        try:
            with open(tmp, "wb", buffering=0) as f:
                for part in parts:
                    _write_all(f, memoryview(part))
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        _VERIFIED.pop(path, None)
        return path

    def _chunk_parts(self, values: np.ndarray, rows: int, cols: int, tail: bytes) -> list[Any]:
        """The chunk of a tile, in parts written one after the other (not copied into one): its
        values padded to the full tile, ``tail``, then the CRC32C of both."""
        if (rows, cols) != self.chunk:  # edge tiles are stored padded to the full chunk
            full = np.full(self.chunk, self.fill, dtype=self.stored)
            full[:rows, :cols] = values
            values = full
        parts: list[Any] = [np.ascontiguousarray(values, dtype=self.stored).reshape(-1).view(np.uint8)]
        if tail:
            parts.append(tail)
        if self.checksum:
            crc = google_crc32c.value(parts[0])
            if tail:
                crc = google_crc32c.extend(crc, tail)
            parts.append(crc.to_bytes(4, "little"))
        return parts

    def _put(self, i: int, j: int, chunk: bytes) -> None:
        """Store a chunk's bytes on object storage (one PUT: complete or absent)."""
        from zarr.core.buffer import default_buffer_prototype
        from zarr.core.sync import sync

        sync(self.array.store_path.store.set(self._key(i, j), default_buffer_prototype().buffer.from_bytes(chunk)))


@lru_cache(maxsize=16)
def _cached_tile_io(url: str, options: str, token: str, part: str) -> TileIO:
    return TileIO(url, json.loads(options) or None, part)


def tile_io(url: str, options: str, token: str, part: str) -> TileIO:
    """The :class:`TileIO` of ``kernel/<part>``, opened once per process and store identity
    (``token``; ``options``: the storage options as sorted JSON)."""
    return _cached_tile_io(url, options, token, part)


def read_tile_task(url: str, options: str, token: str, part: str, i: int, j: int) -> np.ndarray:
    """A dask task: tile ``(i, j)`` of ``kernel/<part>``, verified (a fresh array)."""
    return tile_io(url, options, token, part).read(i, j)
