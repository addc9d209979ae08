"""Peak memory of a run: resident set size summed over this process and all its descendants
(the embedded cluster's scheduler, nannies and workers), sampled in a background thread."""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

import psutil

__all__ = ["PROGRESS_EVERY", "Heartbeat", "PeakRSS", "tracked", "tree_rss"]

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



#: Seconds between two progress lines in the log (``Heartbeat``); ``NNGP_DASK_PROGRESS_EVERY`` overrides.
PROGRESS_EVERY = 30.0


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class Heartbeat:
    """Progress lines in the log every ``every`` seconds, from a thread of its own: a batch job's
    log shows the work is alive even while nothing finishes (progress bars vanish in log files).

    ``with Heartbeat("kernel tiles", 400) as beat: ... beat(done, detail)``: the calls only record
    the count; the thread logs ``what: done/total after T (rate/s; est. ~X left) detail``. The time
    left is an estimate from the rate so far (``expected``, when given, replaces ``total`` as the
    count the work is expected to end at, e.g. CG iterations extrapolated from the residual);
    with ``bound`` the total is only an upper limit (``maxiter``), and the line says so.

    Parameters
    ----------
    what : str
    total : int
    every : float, optional
        Seconds between lines (default :data:`PROGRESS_EVERY`, or ``NNGP_DASK_PROGRESS_EVERY``).
    initial : int
        Count already done when it starts (a resumed build or solve): not counted in the rate.
    bound : bool
        ``total`` is a limit, not the expected count.
    bar : tqdm progress bar, optional
        Advanced with every call (a disabled bar counts nothing, so the count is kept here).
    """

    def __init__(self, what: str, total: int, every: float | None = None, *, initial: int = 0,
                 bound: bool = False, bar: Any = None) -> None:
        self.what, self.total, self.initial, self.bound, self.bar = what, total, initial, bound, bar
        self.every = float(os.environ.get("NNGP_DASK_PROGRESS_EVERY", PROGRESS_EVERY)) if every is None else every
        self.done, self.detail = initial, ""
        self.expected: int | None = None
        self.start = time.perf_counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"nngp-dask-progress-{what}", daemon=True)

    def __call__(self, done: int, detail: str = "", expected: int | None = None) -> None:
        if self.bar is not None:
            self.bar.update(done - self.done)
        self.done, self.detail, self.expected = done, detail, expected

    def line(self) -> str:
        """The progress line as it is logged now."""
        elapsed = time.perf_counter() - self.start
        done, target = self.done, self.expected if self.expected is not None else self.total
        head = f"{self.what}: {done}/{self.total} after {_duration(elapsed)}"
        if done <= self.initial:
            est = "none finished yet, no estimate"
        else:
            rate = (done - self.initial) / elapsed
            left = _duration(max(target - done, 0) / rate)
            est = f"{rate:.3g}/s; " + (f"est. at most ~{left} left (to the limit of {self.total})"
                                       if self.bound and self.expected is None else f"est. ~{left} left")
        return f"{head} ({est}) {self.detail}".rstrip()

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            log.info("%s", self.line())

    def __enter__(self) -> Heartbeat:
        self.start = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        if self.bar is not None:
            self.bar.close()


def tracked(what: str, total: int, *, progress: bool, unit: str = "it", initial: int = 0, bound: bool = False,
            every: float | None = None) -> Heartbeat:
    """A :class:`Heartbeat` that also drives a tqdm bar (shown when ``progress`` and stderr is a
    terminal; ``tqdm``'s ``disable=None``), for ``with tracked(...) as beat:``."""
    from tqdm.auto import tqdm

    bar = tqdm(total=None if bound else total, desc=what, unit=unit, disable=None if progress else True,
               initial=initial, smoothing=0.1)
    return Heartbeat(what, total, every, initial=initial, bound=bound, bar=bar)
