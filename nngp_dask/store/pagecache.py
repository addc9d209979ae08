"""Drop-behind writes: tiles written to a local file system leave the page cache once on disk.

Writing a kernel through the operating system's page cache keeps every tile in memory after it
is written. That pays off when a solve follows and the whole kernel fits in memory (its CG
passes then read memory, not disk); for a kernel larger than memory it does not: the cache fills
with tiles that are evicted before they are read again, and it evicts everything else on the
machine on its way. Growing the cache also has a price of its own where memory is provisioned
lazily (virtual machines with free-page reporting return idle memory to the host, and each page
taken back costs a host fault): on the development VM, writing and recording a 16 MiB tile took
43-49 ms into new pages and 13-15 ms with drop-behind (``benchmarks/RESULTS.md``, section 2).

Drop-behind asks the operating system to write each tile out as soon as it is written and to
drop its pages from the cache a few tiles later, once the write-out has finished, so a writer's
cache footprint stays at a few tiles and its pages are recycled. Policies (``page_cache`` of
:func:`nngp_dask.build_kernel` and ``kernel.page_cache`` of a pipeline):

``"auto"``
    Drop behind when the kernel's stored bytes exceed half of the writing host's memory.
``"keep"``
    Leave the tiles in the cache (the operating system's default behaviour).
``"drop"``
    Always drop behind.

Only local files are affected; object stores have no page cache to manage.

Reads. A mapped tile is paged in as 2 MiB folios where the kernel allows it (:func:`map_pages`),
the form a written tile stays in; and where an append grows a store whose tiles stay cached
(``keep``, or ``auto`` with the kernel under half the memory), the kept tiles are read into the
cache while the new ones compute (:class:`ReadAhead`): the solve that follows reads every one of
them, and after a reboot (a nightly re-fit) they are on disk only.
"""

from __future__ import annotations

import collections
import errno
import mmap
import os
import threading
import time
from collections.abc import Sequence
from functools import lru_cache

__all__ = ["POLICIES", "DropBehind", "ReadAhead", "check_policy", "drop_from_cache", "host_memory", "map_pages",
           "wants_drop"]

POLICIES = ("auto", "keep", "drop")

#: files whose pages stay cached behind the newest write: their write-out, started when they were
#: written, has had this many tiles' compute time to finish
LAG = 2


@lru_cache(maxsize=1)
def host_memory() -> int:
    """Physical memory of this host in bytes (0 where the platform does not say)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return 0


def check_policy(policy: str) -> str:
    if policy not in POLICIES:
        raise ValueError(f"page_cache: expected one of {list(POLICIES)}, got {policy!r}")
    return policy


def wants_drop(policy: str, stored_bytes: int, memory: int | None = None) -> bool:
    """Whether writes of a kernel of ``stored_bytes`` drop behind on a host with ``memory`` bytes."""
    if check_policy(policy) != "auto":
        return policy == "drop"
    memory = host_memory() if memory is None else memory
    return memory > 0 and stored_bytes > memory // 2


def drop_from_cache(path: str) -> None:
    """Ask the operating system to drop ``path``'s clean pages and start writing out its dirty ones.

    A no-op where ``posix_fadvise`` does not exist (not Linux/BSD) or the file is gone.
    """
    if not hasattr(os, "posix_fadvise"):
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    except OSError:
        pass
    finally:
        os.close(fd)


class DropBehind:
    """Recently written files of one process: each is dropped twice, when written (which starts
    its write-out: Linux writes dirty pages back before it drops what it can) and ``lag`` writes
    later (its pages are clean by then and are freed)."""

    def __init__(self, lag: int = LAG) -> None:
        self.lag = lag
        self._recent: collections.deque[str] = collections.deque()
        self._lock = threading.Lock()  # workers may run tile tasks on several threads

    def written(self, path: str) -> None:
        drop_from_cache(path)
        with self._lock:
            self._recent.append(path)
            due = [self._recent.popleft() for _ in range(len(self._recent) - self.lag)]
        for old in due:
            drop_from_cache(old)


#: Map a tile's pages in the mmap call (Linux) rather than one page fault at a time during the
#: product; elsewhere a plain read-only mapping (``access=``: the one spelling Windows has too).
_POPULATE = getattr(mmap, "MAP_POPULATE", 0)
#: madvise(MADV_POPULATE_READ) (Linux >= 5.14; 22 where Python's mmap does not name it): the
#: page-in of MAP_POPULATE, after madvise(MADV_HUGEPAGE) on the mapping; None once refused.
_POPULATE_READ: int | None = getattr(mmap, "MADV_POPULATE_READ", 22) if _POPULATE else None
_HUGEPAGE: int | None = getattr(mmap, "MADV_HUGEPAGE", None)


def map_pages(fd: int, nbytes: int) -> mmap.mmap:
    """A read-only mapping of ``nbytes`` of ``fd``, its pages read in.

    A tile written by this host stays in the page cache as 2 MiB folios, which a mapping maps
    with huge (PMD) entries; a tile read in from disk by MAP_POPULATE's faults (or by read())
    comes in 4 KiB-page folios, mapped by 4 KiB entries (more to set up, more TLB misses), and
    every later CG pass over it was 1.3x slower (benchmarks/RESULTS.md section 14). With
    MADV_HUGEPAGE set on the mapping before the page-in, the read-ahead allocates 2 MiB folios,
    as the write did.
    """
    global _POPULATE_READ
    if not _POPULATE:
        return mmap.mmap(fd, nbytes, access=mmap.ACCESS_READ)
    if _POPULATE_READ is not None and _HUGEPAGE is not None:
        pages = mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        try:
            pages.madvise(_HUGEPAGE)
            pages.madvise(_POPULATE_READ)
            return pages
        except OSError as exc:
            pages.close()
            if exc.errno == errno.EINVAL:  # a kernel without it: MAP_POPULATE from now on
                _POPULATE_READ = None
    return mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED | _POPULATE, prot=mmap.PROT_READ)


class ReadAhead:
    """Read ``paths`` into the page cache on a thread of this process, in order, while the body
    of the ``with`` runs; leaving it stops the reading (what was not read yet is left to whoever
    reads it next) and joins the thread, so nothing outlives the block.

    Attributes, after the block: ``files`` and ``nbytes`` read, ``seconds`` spent reading.
    """

    def __init__(self, paths: Sequence[str]) -> None:
        self.paths = list(paths)
        self.files = self.nbytes = 0
        self.seconds = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="nngp-dask-read-ahead", daemon=True)

    def _run(self) -> None:
        t0 = time.perf_counter()
        for path in self.paths:
            if self._stop.is_set():
                break
            try:
                with open(path, "rb", buffering=0) as f:
                    size = os.fstat(f.fileno()).st_size
                    if size:
                        map_pages(f.fileno(), size).close()
            except (OSError, ValueError):  # gone or replaced meanwhile: its reader will see
                continue
            self.files += 1
            self.nbytes += size
        self.seconds = time.perf_counter() - t0

    def __enter__(self) -> ReadAhead:
        if self.paths:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
