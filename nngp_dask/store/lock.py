"""The single-writer lock of a store (or of a pipeline's output): ``<url>.lock`` beside it, with a
heartbeat, taken over when stale."""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from .errors import StoreLockedError
from .layout import is_remote, normalise_url

__all__ = ["LOCK_HEARTBEAT_S", "LOCK_TTL_HEARTBEATS", "store_lock"]

log = logging.getLogger("nngp_dask")

# --- single writer ------------------------------------------------------------------------
#: Seconds between a held lock's heartbeats (environment: ``NNGP_DASK_LOCK_HEARTBEAT``).
LOCK_HEARTBEAT_S = 30.0
#: A lock whose heartbeat is older than this many heartbeat intervals is stale and taken over
#: (environment: ``NNGP_DASK_LOCK_TTL``, in seconds).
LOCK_TTL_HEARTBEATS = 10
#: Locks written by versions without a heartbeat are judged by their age against this.
_LEGACY_LOCK_TTL_S = 6 * 3600.0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _lock_timing() -> tuple[float, float]:
    """``(heartbeat interval, time to live)`` in seconds, from the environment."""
    try:
        beat = float(os.environ.get("NNGP_DASK_LOCK_HEARTBEAT", LOCK_HEARTBEAT_S))
        ttl = float(os.environ.get("NNGP_DASK_LOCK_TTL", LOCK_TTL_HEARTBEATS * beat))
    except ValueError as exc:
        raise ValueError(f"NNGP_DASK_LOCK_HEARTBEAT / NNGP_DASK_LOCK_TTL: expected seconds ({exc})") from None
    if not (0 < beat < ttl < float("inf")):  # also refuses NaN
        raise ValueError(f"NNGP_DASK_LOCK_HEARTBEAT={beat:g}, NNGP_DASK_LOCK_TTL={ttl:g}: expected "
                         "0 < heartbeat < time to live (default 10 heartbeats)")
    return beat, ttl


def _parse_lock(raw: bytes) -> dict | None:
    try:
        other = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    return other if isinstance(other, dict) else None


def _stale(other: dict | None, raw: bytes, ttl: float) -> str | None:
    """Why a lock record is stale (its writer is gone), or None while its holder may be alive."""
    if other is None:
        return f"it is unreadable ({len(raw)} bytes, not a lock record), left by a write that never finished"
    try:
        pid = int(other.get("pid") or 0)
    except (TypeError, ValueError):
        pid = 0
    if other.get("host") == socket.gethostname() and pid and not _pid_alive(pid):
        return f"pid {pid} is no longer running on this host"
    limit = ttl if "heartbeat" in other else _LEGACY_LOCK_TTL_S
    try:
        stamp: Any = other.get("heartbeat", other.get("since"))  # JSON: neither (None) is the TypeError below
        age = time.time() - float(stamp)
    except (TypeError, ValueError):
        return "it has no heartbeat"
    if not age <= limit:
        return f"its last heartbeat is {age:.0f} s old (the limit is {limit:.0f} s)"
    return None


def _lock_token(raw: bytes | None) -> str | None:
    other = _parse_lock(raw) if raw is not None else None
    return other.get("token") if other else None


class _LocalLockFile:
    """A lock file on a local or network file system: created whole or not at all (written to
    a temporary file, then hard-linked into place, which fails if the lock exists)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def _temp(self, blob: bytes) -> str:
        tmp = f"{self.path}.{uuid.uuid4().hex}.tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(blob)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            self._unlink(tmp)
            raise
        return tmp

    @staticmethod
    def _unlink(path: str) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass

    def create(self, blob: bytes) -> bool:
        tmp = self._temp(blob)  # a full disk fails here, before anything is visible
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        except OSError as exc:  # a file system without hard links: exclusive create, then write
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(blob)
            except BaseException:
                self._unlink(self.path)
                raise
            return True
        finally:
            self._unlink(tmp)

    def read(self) -> bytes | None:
        try:
            with open(self.path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def replace_if(self, token: str, blob: bytes) -> bool:
        if _lock_token(self.read()) != token:
            return False
        os.replace(self._temp(blob), self.path)
        return True

    def remove_if(self, token: str) -> None:
        if _lock_token(self.read()) == token:
            self._unlink(self.path)

    def take_over(self, raw: bytes) -> None:
        """Remove the stale lock ``raw``, unless it changed since it was read."""
        aside = f"{self.path}.{uuid.uuid4().hex}.stale"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        try:
            with open(aside, "rb") as f:
                if f.read() != raw:  # renewed or replaced meanwhile: put it back
                    try:
                        os.link(aside, self.path)
                    except OSError:
                        pass
        finally:
            self._unlink(aside)


class _FsspecLockFile:
    """A lock object on object storage: one PUT is atomic, so a lock is never partial; the
    create is conditional where the store supports it (S3's If-None-Match), and the lock is read
    back to confirm it is ours where it does not."""

    def __init__(self, fs: Any, path: str) -> None:
        self.fs, self.path = fs, path

    def read(self) -> bytes | None:
        self.fs.invalidate_cache(self.path)
        try:
            return self.fs.cat_file(self.path)
        except FileNotFoundError:
            return None

    def create(self, blob: bytes) -> bool:
        if self.read() is not None:
            return False
        try:
            self.fs.pipe_file(self.path, blob, mode="create")
        except FileExistsError:
            return False
        except (TypeError, NotImplementedError):  # an fsspec without conditional writes
            self.fs.pipe_file(self.path, blob)
        return _lock_token(self.read()) == _lock_token(blob)

    def replace_if(self, token: str, blob: bytes) -> bool:
        if _lock_token(self.read()) != token:
            return False
        self.fs.pipe_file(self.path, blob)
        return True

    def remove_if(self, token: str) -> None:
        if _lock_token(self.read()) == token:
            try:
                self.fs.rm_file(self.path)
            except FileNotFoundError:
                pass

    def take_over(self, raw: bytes) -> None:
        if self.read() == raw:
            try:
                self.fs.rm_file(self.path)
            except FileNotFoundError:
                pass


class _LockHeartbeat:
    """Refreshes a held lock's heartbeat every ``every`` seconds from a daemon thread."""

    def __init__(self, lock: Any, holder: dict, every: float, shown: str) -> None:
        self.lock, self.holder, self.every, self.shown = lock, holder, every, shown
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="nngp-dask-lock-heartbeat", daemon=True)

    def __enter__(self) -> _LockHeartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=60)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.holder["heartbeat"] = time.time()
            try:
                if not self.lock.replace_if(self.holder["token"], json.dumps(self.holder).encode()):
                    log.error("the lock %s is no longer this run's (taken over as stale, or removed); another run "
                              "may now write the same output", self.shown)
                    return
            except Exception as exc:  # a full disk, a network error: try again at the next beat
                log.warning("could not refresh the lock %s (%s: %s); retrying", self.shown, type(exc).__name__, exc)


@contextmanager
def store_lock(url: str, storage_options: dict | None = None, *, name: str = "build") -> Iterator[None]:
    """Hold the write lock of a store (or of a pipeline's output): one writer at a time.

    The lock ``<url>.lock`` records the holder's host, pid, start and a heartbeat timestamp that a
    background thread refreshes every ``NNGP_DASK_LOCK_HEARTBEAT`` seconds (default 30). It is
    written whole or not at all (a temporary file hard-linked into place; one PUT on object
    storage), so a full disk never leaves a partial lock. A lock is stale, and is taken over with
    a warning, when its holder was on this host and its pid is gone, when its heartbeat is older
    than ``NNGP_DASK_LOCK_TTL`` seconds (default 10 heartbeats: a holder on another host that
    died), or when it is unreadable. The lock is removed when the block exits, also on an
    exception or a KeyboardInterrupt (the CLI turns SIGTERM into one), and only if it is still
    this holder's.

    Raises
    ------
    StoreLockedError
        Another live process holds the lock (the CLI exits 75, EX_TEMPFAIL).
    """
    url = normalise_url(url)
    beat, ttl = _lock_timing()
    now = time.time()
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "since": now, "heartbeat": now, "what": name,
              "token": uuid.uuid4().hex}
    shown = url.rstrip("/") + ".lock"
    # The lock sits beside the store, not in it, so that recreating the store cannot delete it.
    if not is_remote(url):
        os.makedirs(os.path.dirname(url), exist_ok=True)
        lock: Any = _LocalLockFile(shown)
    else:
        import fsspec

        fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
        lock = _FsspecLockFile(fs, root.rstrip("/") + ".lock")
    blob = json.dumps(holder).encode()
    for _ in range(3):
        if lock.create(blob):
            break
        raw = lock.read()
        if raw is None:
            continue  # released meanwhile
        other = _parse_lock(raw)
        why = _stale(other, raw, ttl)
        if why is None:
            o = other or {}
            age = time.time() - float(o.get("heartbeat", o.get("since", now)))
            raise StoreLockedError(
                f"store: {url!r} is locked by pid {o.get('pid')} on {o.get('host')} ({o.get('what', 'a run')}, "
                f"heartbeat {age:.0f} s ago); one writer per store. A lock whose heartbeat stops is taken over "
                f"after {ttl:.0f} s (NNGP_DASK_LOCK_TTL); if that process is gone you may delete {shown}") from None
        log.warning("taking over the lock %s: %s (%s)", shown, why,
                    f"pid {other.get('pid')} on {other.get('host')}" if other else "no holder recorded")
        lock.take_over(raw)
    else:
        raise StoreLockedError(f"store: {url!r}: other runs keep taking the lock {shown}; one writer per store")
    try:
        with _LockHeartbeat(lock, holder, beat, shown):
            yield
    finally:
        try:
            lock.remove_if(holder["token"])
        except Exception as exc:  # never hide the block's own exception behind this one
            log.warning("could not remove the lock %s (%s: %s)", shown, type(exc).__name__, exc)
