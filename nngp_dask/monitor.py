"""Peak memory of a run: resident set size summed over this process and all its descendants
(the embedded cluster's scheduler, nannies and workers), sampled in a background thread."""

from __future__ import annotations

import threading

import psutil

__all__ = ["PeakRSS", "tree_rss"]


def tree_rss(pid: int | None = None) -> int:
    """Current RSS in bytes of a process and all of its descendants."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


class PeakRSS:
    """Context manager recording the peak of :func:`tree_rss` (``.peak`` bytes)."""

    def __init__(self, interval: float = 0.2, pid: int | None = None) -> None:
        self.interval, self.pid = interval, pid
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="nngp-dask-peak-rss", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss(self.pid))
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakRSS":
        self.peak = tree_rss(self.pid)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, tree_rss(self.pid))

    def sample(self) -> int:
        """The peak so far."""
        return max(self.peak, tree_rss(self.pid))

