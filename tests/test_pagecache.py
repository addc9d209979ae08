"""Drop-behind writes: the policy, the chunk files it acts on, and that pages really leave the cache."""

from __future__ import annotations

import ctypes
import mmap
import os
import sys
import threading
import time

import numpy as np
import pytest

import nngp_dask.store.pagecache as pagecache
from nngp_dask import Architecture, build_kernel
from nngp_dask.store import DropBehind, ReadAhead, drop_from_cache, local_chunk_file, wants_drop

ARCH = Architecture(2, "relu", 1.6, 0.1)


def resident_fraction(path: str) -> float:
    """Fraction of ``path``'s pages in the page cache, from mincore(2) on a shared mapping."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    size = os.path.getsize(path)
    pages = -(-size // mmap.PAGESIZE)
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        assert addr not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
        try:
            vec = (ctypes.c_ubyte * pages)()
            assert libc.mincore(addr, size, vec) == 0, os.strerror(ctypes.get_errno())
            return sum(b & 1 for b in vec) / pages
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)


def _file_system(path: str) -> str:
    best, kind = "", ""
    with open("/proc/mounts") as f:
        for line in f:
            _, point, fs, *_ = line.split()
            if os.path.realpath(path).startswith(point) and len(point) > len(best):
                best, kind = point, fs
    return kind


def test_policies():
    assert not wants_drop("auto", 5, memory=10) and wants_drop("auto", 6, memory=10)
    assert not wants_drop("auto", 6, memory=0)  # memory unknown: behave like the OS
    assert wants_drop("drop", 1, memory=10) and not wants_drop("keep", 10**15, memory=10)
    with pytest.raises(ValueError, match=r"page_cache: expected one of \['auto', 'keep', 'drop'\], got 'never'"):
        wants_drop("never", 1)


def test_bad_policy_refused_before_work(tmp_path, rng):
    with pytest.raises(ValueError, match="page_cache"):
        build_kernel(ARCH, rng.standard_normal((10, 3)), tmp_path / "k.zarr", page_cache="never", progress=False)
    assert not (tmp_path / "k.zarr").exists()


def test_each_file_is_dropped_when_written_and_again_lag_writes_later(monkeypatch):
    calls: list[str] = []
    monkeypatch.setattr(pagecache, "drop_from_cache", calls.append)
    behind = DropBehind(lag=2)
    for path in "abcde":
        behind.written(path)
    assert calls == ["a", "b", "c", "a", "d", "b", "e", "c"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mincore and /proc/mounts: Linux")
def test_dropped_pages_leave_the_cache(tmp_path):
    if _file_system(str(tmp_path)) in ("tmpfs", "ramfs", "overlay"):
        pytest.skip(f"{tmp_path} is on {_file_system(str(tmp_path))}: its pages are the file, they cannot be dropped")
    path = str(tmp_path / "tile.bin")
    with open(path, "wb") as f:
        f.write(os.urandom(4 << 20))
        f.flush()
        os.fsync(f.fileno())
    with open(path, "rb") as f:
        f.read()
    assert resident_fraction(path) > 0.9
    drop_from_cache(path)
    assert resident_fraction(path) < 0.1
    drop_from_cache(str(tmp_path / "gone"))  # a file that is not there: nothing to do


def test_read_ahead_brings_files_into_the_cache_and_ends_with_its_block(tmp_path):
    if _file_system(str(tmp_path)) in ("tmpfs", "ramfs", "overlay"):
        pytest.skip(f"{tmp_path} is on {_file_system(str(tmp_path))}: its pages are the file, they cannot be dropped")
    paths = [str(tmp_path / f"tile{k}.bin") for k in range(4)]
    for path in paths:
        with open(path, "wb") as f:
            f.write(os.urandom(2 << 20))
            f.flush()
            os.fsync(f.fileno())
        drop_from_cache(path)
        assert resident_fraction(path) < 0.1
    with ReadAhead([*paths[:2], str(tmp_path / "gone"), *paths[2:]]) as ahead:
        deadline = time.monotonic() + 30
        while ahead.files < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
    assert (ahead.files, ahead.nbytes) == (4, 4 * (2 << 20))  # the missing file skipped
    assert all(resident_fraction(path) > 0.9 for path in paths)
    assert not any(t.name == "nngp-dask-read-ahead" for t in threading.enumerate())


def test_leaving_the_block_stops_the_read_ahead(tmp_path):
    path = str(tmp_path / "tile.bin")
    with open(path, "wb") as f:
        f.write(os.urandom(1 << 16))
    with ReadAhead([path] * 100_000) as ahead:
        pass
    assert ahead.files < 100_000
    assert not any(t.name == "nngp-dask-read-ahead" for t in threading.enumerate())


def test_drop_behind_build_is_identical_and_acts_on_the_real_chunk_files(cluster_client, tmp_path, rng):
    x = rng.standard_normal((200, 9))  # 4 x 4 tiles of 64, ragged: 10 upper tiles
    kept = build_kernel(ARCH, x, tmp_path / "keep.zarr", tile=64, client=cluster_client, progress=False,
                        page_cache="keep")
    dropped = build_kernel(ARCH, x, tmp_path / "drop.zarr", tile=64, client=cluster_client, progress=False,
                           page_cache="drop")
    np.testing.assert_array_equal(dropped.to_dask().compute(), kept.to_dask().compute())
    arr = dropped.array("kernel/train_train")
    files = {local_chunk_file(dropped.url, arr, tile) for tile in dropped.grid.upper_tiles()}
    on_disk = {os.path.join(d, f) for d, _, fs in os.walk(os.path.join(dropped.url, "kernel", "train_train"))
               for f in fs if f != "zarr.json"}
    assert files == on_disk and len(files) == 10
    assert local_chunk_file("s3://bucket/k.zarr", arr, (0, 0)) is None
    st = dropped.last_build
    assert st.read_s > 0 and st.compute_s > 0 and st.write_s > 0
