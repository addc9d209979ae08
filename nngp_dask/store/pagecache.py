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
"""

from __future__ import annotations

import collections
import os
import threading
from functools import lru_cache

__all__ = ["POLICIES", "DropBehind", "check_policy", "drop_from_cache", "host_memory", "wants_drop"]

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
