"""The embedded cluster: a Dask scheduler in this process and worker processes of their own.

``distributed.LocalCluster`` runs its nannies inside the caller's process, and a nanny applies
``distributed.nanny.pre-spawn-environ`` there with ``os.environ.update``, never undone: after a
first build the caller's environment said ``NUMBA_NUM_THREADS=1``, and Numba, which re-reads its
environment whenever it compiles, then refused to compile in a process whose threads had started
with another value (a test suite failing by the order of its tests). Here each nanny is a child
process started with an environment of its own (worker settings, allocator thresholds, the
cluster's Dask configuration and credentials), so the workers have their settings before any
import, and the caller's process state is never touched. Workers do not import the caller's
``__main__`` either (multiprocessing's spawn does), so a script without an
``if __name__ == "__main__":`` guard runs once.

Secure by default: everything listens on 127.0.0.1 and speaks mutual TLS with a temporary
certificate that exists only in memory (``distributed.Security.temporary``), so another local
user cannot connect to the scheduler and run code as the caller.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import os
import sys
import time
from collections.abc import Mapping
from typing import Any

import dask
import psutil
from distributed import Scheduler, SpecCluster
from distributed.deploy.spec import ProcessInterface
from distributed.security import Security
from distributed.worker_memory import parse_memory_limit

from .daskconfig import dashboard_address as configured_dashboard
from .workerenv import MALLOC_ENV

__all__ = ["EmbeddedCluster"]

log = logging.getLogger("nngp_dask")

# The worker's process first asks the kernel to kill it with its parent (PR_SET_PDEATHSIG), so a
# driver killed by SIGKILL takes its workers along, as multiprocessing children of an in-process
# nanny did; then it runs ``dask spec``. It imports neither nngp_dask nor the caller's script.
_BOOTSTRAP = """\
import os, sys
try:
    import ctypes, signal
    ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))
except Exception:
    pass
if os.getppid() != int(sys.argv[1]):
    sys.exit(0)
del sys.argv[1]
from distributed.cli.dask_spec import main
main()
"""


class WorkerProcess(ProcessInterface):
    """One worker of the embedded cluster: a ``distributed.Nanny`` in a process of its own,
    started with ``env`` (the nanny restarts its worker if it dies, as in a LocalCluster)."""

    def __init__(self, scheduler: str, name: Any, env: Mapping[str, str], options: Mapping[str, Any]) -> None:
        self.scheduler, self.name = scheduler, name
        self.env, self.options = dict(env), dict(options)
        self.process: asyncio.subprocess.Process | None = None
        super().__init__()

    async def start(self) -> None:
        spec = {"cls": "distributed.Nanny", "opts": {"name": self.name, **self.options}}
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _BOOTSTRAP, str(os.getpid()), self.scheduler, "--spec", json.dumps(spec),
            env=self.env, stdin=asyncio.subprocess.DEVNULL)
        await super().start()

    async def close(self) -> None:
        proc = self.process
        if proc is not None and proc.returncode is None:
            proc.terminate()  # the nanny closes its worker, then exits
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                _kill_tree(proc.pid)
                await proc.wait()
        await super().close()


def _kill_tree(pid: int) -> None:
    try:
        root = psutil.Process(pid)
        for p in [*root.children(recursive=True), root]:
            p.kill()
    except psutil.NoSuchProcess:
        pass


def _worker_config(security: Security | None) -> dict[str, Any]:
    """The caller's Dask configuration as the workers get it (as a LocalCluster's nannies pass it
    on), with logs at warning level (LocalCluster's ``silence_logs``) and, for a secure cluster,
    the certificate in memory."""
    cfg = copy.deepcopy(dask.config.config)
    updates: dict[str, Any] = {"logging.distributed": "warning"}
    if security is not None:
        updates.update({
            "distributed.comm.require-encryption": True,
            # Security sets its tls_* attributes in __init__ from a list of names: distributed declares none of them
            "distributed.comm.tls.ca-file": security.tls_ca_file,  # type: ignore[attr-defined]
            "distributed.comm.tls.worker.cert": security.tls_worker_cert,  # type: ignore[attr-defined]
            "distributed.comm.tls.worker.key": security.tls_worker_key,  # type: ignore[attr-defined]
        })
    dask.config.set(updates, config=cfg)
    return cfg


def _serialize(cfg: dict[str, Any]) -> str:
    """``cfg`` for ``DASK_INTERNAL_INHERIT_CONFIG`` (JSON); values JSON cannot hold (objects a
    caller put into its configuration) are left out, with a warning naming them."""
    try:
        return dask.config.serialize(cfg)
    except (TypeError, ValueError):
        kept, dropped = _json_only(cfg, "")
        log.warning("embedded cluster: the workers do not get these Dask settings, which are not JSON: %s",
                    ", ".join(dropped))
        return dask.config.serialize(kept)


def _json_only(value: Any, key: str) -> tuple[Any, list[str]]:
    if isinstance(value, dict):
        out, dropped = {}, []
        for k, v in value.items():
            kept, lost = _json_only(v, f"{key}.{k}" if key else str(k))
            dropped += lost
            if not lost or kept is not None:
                out[k] = kept
        return out, dropped
    try:
        json.dumps(value)
        return value, []
    except (TypeError, ValueError):
        return None, [key]


class EmbeddedCluster(SpecCluster):
    """A scheduler in this process and ``n_workers`` worker processes on 127.0.0.1.

    Parameters
    ----------
    n_workers : int
        Worker processes.
    threads_per_worker : int
        Threads of each worker.
    memory_limit : str, int or None
        Per worker, as for ``distributed.LocalCluster`` (None: the machine's memory shared out).
    env : mapping of str to str
        Environment variables the workers start with, on top of this process's environment.
    secure : bool
        Mutual TLS with a temporary in-memory certificate (default); False: plain TCP, which any
        local user can connect to.
    dashboard_address : str, optional
        Where the scheduler's dashboard listens (default: Dask's
        ``distributed.scheduler.dashboard.address``, a bare port bound to 127.0.0.1; unset, a free
        port on 127.0.0.1; see :mod:`nngp_dask.cluster.daskconfig`).
    start_timeout : float
        Seconds to wait for every worker to join.

    The constructor returns once every worker has joined; use the cluster as a context manager.
    """

    def __init__(self, *, n_workers: int, threads_per_worker: int = 1, memory_limit: str | int | None = None,
                 env: Mapping[str, str] | None = None, secure: bool = True,
                 dashboard_address: str | None = None, start_timeout: float = 120.0) -> None:
        security = Security.temporary() if secure else None
        tls = {"protocol": "tls"} if secure else {}
        worker_env = {**os.environ, **MALLOC_ENV, **(env or {}),
                      "DASK_INTERNAL_INHERIT_CONFIG": _serialize(_worker_config(security))}
        limit = parse_memory_limit("auto" if memory_limit is None else memory_limit, threads_per_worker,
                                   n_workers, logger=log)
        options = {"host": "127.0.0.1", "nthreads": threads_per_worker, "memory_limit": limit,
                   "dashboard": False, "death_timeout": 60, **tls}
        scheduler = {"cls": Scheduler, "options": {"host": "127.0.0.1", "port": 0, "dashboard": True,
                                                   "dashboard_address": dashboard_address or configured_dashboard(),
                                                   "security": security, **tls}}
        worker = {"cls": WorkerProcess, "options": {"env": worker_env, "options": options}}
        super().__init__(workers=dict.fromkeys(range(n_workers), worker), scheduler=scheduler, worker=worker,
                         security=security, silence_logs=logging.WARN, name="nngp-dask")
        self.sync(self._join, start_timeout)

    async def _join(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        assert self.scheduler is not None  # SpecCluster.__init__ made it
        while len(self.scheduler.workers) < len(self.worker_spec):
            dead = [w.process.returncode for w in self.workers.values()
                    if w.process is not None and w.process.returncode is not None]
            if dead or time.monotonic() > deadline:
                msg = (f"embedded cluster: {len(self.scheduler.workers)} of {len(self.worker_spec)} worker(s) "
                       "joined; " + (f"a worker process exited with code {dead[0]} (its error is above)" if dead
                                     else f"timed out after {timeout:.0f} s"))
                await self._close()
                raise RuntimeError(msg)
            await asyncio.sleep(0.05)
