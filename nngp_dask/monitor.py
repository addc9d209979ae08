"""Peak memory of a run: resident set size summed over this process and all its descendants
(the embedded cluster's scheduler, nannies and workers), sampled in a background thread."""

from __future__ import annotations

import logging
import threading
import time

import psutil

__all__ = ["Heartbeat", "PeakRSS", "tree_rss"]

log = logging.getLogger("nngp_dask")


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

    def __enter__(self) -> PeakRSS:
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



class Heartbeat:
    """Log progress of long work every ``every`` seconds (progress bars vanish in log files
    and batch jobs): ``what: done/total (rate/s, ETA) detail``."""

    def __init__(self, what: str, total: int, every: float = 30.0) -> None:
        self.what, self.total, self.every = what, total, every
        self.start = self.last = time.perf_counter()
        self.first: int | None = None

    def __call__(self, done: int, detail: str = "") -> None:
        now = time.perf_counter()
        if self.first is None:
            self.first = done - 1
        if now - self.last < self.every:
            return
        self.last = now
        rate = (done - self.first) / max(now - self.start, 1e-9)
        eta = (self.total - done) / rate if rate > 0 else float("inf")
        log.info("%s: %d/%d (%.2f/s, at most %.0f s left) %s", self.what, done, self.total, rate, eta, detail)
