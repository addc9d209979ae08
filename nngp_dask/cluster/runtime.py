"""Where the work runs: the caller's Dask client, an address, a cluster file, or the embedded
cluster (:mod:`nngp_dask.cluster.embedded`).

A *cluster file* (``cluster/*.toml``, passed as ``--cluster FILE`` or ``cluster.address``)
describes a deployment separately from the pipeline: the same pipeline runs on a laptop, on a
``dask scheduler`` somewhere, on SLURM or PBS (through ``dask-jobqueue``) or on Kubernetes
(through the ``dask-kubernetes`` operator). Its ``type`` key picks the deployment; the keys
nngp-dask owns are validated against :data:`CLUSTER_SCHEMA`, and errors name the file and the
dotted key (``cluster/slurm.toml: cores: expected an integer, got str '16'``). Other keys of a
``slurm``, ``pbs`` or ``kubernetes`` file go to the dask-jobqueue / dask-kubernetes class as
written (``spec["passthrough"]``), which checks them. ``${VAR}`` in string values
is taken from the environment; relative paths resolve against the file's directory.

Secure defaults: the embedded cluster, its workers and its dashboard listen on 127.0.0.1 only
(the dashboard elsewhere only where Dask's configuration says so, :mod:`.daskconfig`),
and speak mutual TLS with a temporary in-memory certificate (``secure = false`` turns it off); a
remote scheduler is reached with TLS client certificates when the file has a ``[tls]`` table
(``require_encryption``, so a plain ``tcp://`` address is refused); SLURM and PBS clusters use
TLS with temporary certificates unless ``tls = false``, and their dashboards bind to loopback.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from ..fields import ConfigError, Field, expand_env
from ..store import is_remote
from .daskconfig import announce, configured_scheduler, dashboard_link
from .workerenv import MALLOC_ENV, WORKER_ENV

__all__ = ["CLUSTER_SCHEMA", "ClusterConfigError", "LazyClient", "client_for", "embedded_client", "load_cluster_file",
           "local_cluster", "local_cluster_kwargs", "jobqueue_kwargs", "kubernetes_kwargs", "is_cluster_file"]

log = logging.getLogger("nngp_dask")

class ClusterConfigError(ConfigError):
    """A cluster file that does not match :data:`CLUSTER_SCHEMA` (a ValueError: CLI exit 2)."""


def local_cluster_kwargs(n_workers: int | None = None, threads_per_worker: int = 1,
                         memory_limit: str | None = None, secure: bool = True) -> dict:
    """Settings of the embedded cluster: loopback only, one single-threaded process per core
    (``dask.system.CPU_COUNT``, which honours CPU affinity and cgroup quotas), mutual TLS."""
    import dask.system

    kwargs: dict[str, Any] = dict(
        n_workers=n_workers or dask.system.CPU_COUNT,
        threads_per_worker=threads_per_worker,
        env=WORKER_ENV if threads_per_worker == 1 else {},
        secure=secure,
    )
    if memory_limit:
        kwargs["memory_limit"] = memory_limit
    return kwargs


def local_cluster(**kwargs: Any) -> Any:
    """The embedded cluster (:class:`nngp_dask.cluster.embedded.EmbeddedCluster`; ``kwargs`` from
    :func:`local_cluster_kwargs`): a scheduler in this process, worker processes of their own, on
    127.0.0.1 with mutual TLS; the caller's environment is never changed."""
    from .embedded import EmbeddedCluster

    return EmbeddedCluster(**kwargs)


def embedded_client(cluster: Any, **kwargs: Any) -> Any:
    """A :class:`distributed.Client` of the embedded cluster that sends and fetches data
    directly from the workers.

    Dask's default routes scattered and gathered data through the scheduler, which works where
    the workers cannot be reached from the client. On the embedded cluster every worker is on
    this machine, and that extra hop, TLS-encrypted twice, was most of what TLS cost a CG pass
    (benchmarks/RESULTS.md section 10).
    """
    from distributed import Client

    return Client(cluster, direct_to_workers=True, **kwargs)


# --- cluster files ------------------------------------------------------------------------
_REQUIRED = object()
_SHARED_TEMP = "~/.nngp-dask/jobqueue"
_WAIT = {
    "wait_for_workers": Field(int, None, "block until this many workers have joined (default: 0 for local and "
                              "scheduler, 1 for batch systems and Kubernetes)", minimum=0),
    "wait_timeout": Field(float, 3600.0, "seconds to wait for them, then fail (0: no limit; a batch queue may "
                          "take hours)", minimum=0.0),
}
_JOBQUEUE = {
    "cores": Field(int, _REQUIRED, "cores per batch job", minimum=1),
    "memory": Field(str, _REQUIRED, "memory per batch job, e.g. '64GiB'"),
    "processes": Field(int, 0, "worker processes per job (0: one single-threaded process per core)", minimum=0),
    "jobs": Field(int, 1, "batch jobs to submit", minimum=0),
    "walltime": Field(str, "01:00:00", "job wall-clock limit"),
    "queue": Field(str, "", "partition / queue"),
    "account": Field(str, "", "account / project to charge"),
    "interface": Field(str, "", "network interface of scheduler and workers, e.g. 'ib0' (empty: default route)"),
    "local_directory": Field(str, "", "node-local scratch for worker spill files, e.g. '$TMPDIR'"),
    "log_directory": Field(str, "", "where job logs go (a shared path; empty: the batch system's default, the "
                           "directory the driver submits from)", path=True),
    "shared_temp_directory": Field(str, _SHARED_TEMP, "shared path for the temporary TLS files of the "
                                   "workers (a private folder per run inside it, removed when the run ends)",
                                   path=True),
    "python": Field(str, "", "python executable on the compute nodes (default: this one)"),
    "tls": Field(bool, True, "TLS between scheduler and workers with temporary certificates (needs cryptography)"),
    "dashboard_address": Field(str, "127.0.0.1:8787", "scheduler dashboard (loopback: reach it by SSH tunnel)"),
    "job_extra_directives": Field(list, [], "extra #SBATCH / #PBS lines, e.g. ['--exclusive']"),
    "job_script_prologue": Field(list, [], "shell lines before the worker starts, e.g. ['module load python']"),
    "worker_extra_args": Field(list, [], "extra arguments of dask worker"),
    **_WAIT,
}
#: Keys of every cluster ``type``: types, defaults, and the documentation of cluster/README.md.
CLUSTER_SCHEMA: dict[str, dict[str, Field]] = {
    "local": {
        "n_workers": Field(int, 0, "worker processes (0: one per core)", minimum=0),
        "threads_per_worker": Field(int, 1, "threads per worker process", minimum=1),
        "memory_limit": Field(str, "", "memory limit per worker, e.g. '8GiB' (empty: automatic)"),
        "secure": Field(bool, True, "mutual TLS between driver and workers (false: plain TCP on 127.0.0.1)"),
        **_WAIT,
    },
    "scheduler": {
        "address": Field(str, "", "scheduler address, tcp://host:8786 or tls://host:8786"),
        "scheduler_file": Field(str, "", "or the JSON file written by `dask scheduler --scheduler-file`", path=True),
        "timeout": Field(float, 30.0, "seconds to wait for the connection", minimum=0.0, exclusive_minimum=True),
        **_WAIT,
    },
    "slurm": dict(_JOBQUEUE),
    "pbs": {**_JOBQUEUE, "resource_spec": Field(str, "", "PBS -l resource line, e.g. 'select=1:ncpus=16:mem=64gb'")},
    "kubernetes": {
        "name": Field(str, "nngp-dask", "DaskCluster name (created, or connected to if it exists)"),
        "namespace": Field(str, "", "namespace (empty: the current one)"),
        "image": Field(str, "", "container image with nngp-dask installed (cluster/Dockerfile)"),
        "n_workers": Field(int, 2, "worker pods", minimum=0),
        "worker_cpu": Field(str, "1", "CPU request and limit per worker pod"),
        "worker_memory": Field(str, "4Gi", "memory request and limit per worker pod"),
        "env": Field(dict, {}, "environment of the pods (table of strings), e.g. AWS_ENDPOINT_URL"),
        "manifest": Field(str, "", "a DaskCluster YAML manifest used instead of the keys above "
                          "(cluster/kubernetes/daskcluster.yaml)", path=True),
        "create_mode": Field(str, "create_or_connect", "create_or_connect, create_only or connect_only",
                             choices=("create_or_connect", "create_only", "connect_only")),
        "shutdown_on_close": Field(bool, True, "delete the DaskCluster when the run ends (false: keep it)"),
        "idle_timeout": Field(int, 0, "seconds after which an idle cluster deletes itself (0: never)", minimum=0),
        "resource_timeout": Field(int, 300, "seconds to wait for Kubernetes resources", minimum=1),
        "scheduler_service_type": Field(str, "ClusterIP", "ClusterIP (reach it from inside the cluster or by port "
                                        "forward), NodePort or LoadBalancer",
                                        choices=("ClusterIP", "NodePort", "LoadBalancer")),
        **_WAIT,
    },
}
_TLS = {
    "ca_file": Field(str, _REQUIRED, "CA certificate (PEM) that signed the scheduler's and workers' certificates",
                     path=True),
    "cert": Field(str, _REQUIRED, "this client's certificate (PEM)", path=True),
    "key": Field(str, _REQUIRED, "this client's private key (PEM; keep it readable by you only)", path=True),
}
_BATCH_TYPES = ("slurm", "pbs", "kubernetes")


def is_cluster_file(value: Any) -> bool:
    """Whether ``client_for``'s argument names a cluster file (a path ending ``.toml``)."""
    return isinstance(value, (str, os.PathLike)) and os.fspath(value).endswith(".toml")


def load_cluster_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read and validate a cluster file; returns the resolved spec (``type``, every key with its
    default, ``tls`` as a dict or None, ``_file`` the absolute path).

    Raises
    ------
    ClusterConfigError
        Naming the file and the dotted key, the value and what was expected.
    """
    from ..tomlfile import read_toml

    p = Path(path)
    return resolve_cluster(read_toml(p, "cluster", ClusterConfigError), base_dir=p.resolve().parent, name=str(p))


def resolve_cluster(raw: Mapping[str, Any], *, base_dir: str | Path = ".", name: str = "cluster") -> dict[str, Any]:
    """Validate a parsed cluster file (see :func:`load_cluster_file`)."""
    def err(msg: str) -> ClusterConfigError:
        return ClusterConfigError(f"{name}: {msg}")

    data = dict(raw)
    kind = data.pop("type", None)
    if kind not in CLUSTER_SCHEMA:
        raise err(f"type: expected one of {list(CLUSTER_SCHEMA)}, got {kind!r}")
    schema = CLUSTER_SCHEMA[kind]
    tls_raw = data.pop("tls", None) if kind == "scheduler" else None
    spec: dict[str, Any] = {"type": kind, "_file": name, "passthrough": {}}
    for key in [k for k in data if k not in schema]:
        if kind not in _BATCH_TYPES:
            raise err(f"{key}: unknown key for type {kind!r}; expected one of {['type', *schema]}"
                      + (" or a [tls] table" if kind == "scheduler" else ""))
        # dask-jobqueue and dask-kubernetes take many more options than the ones named here; they
        # check their own arguments when the cluster object is made
        try:
            spec["passthrough"][key] = _passthrough(key, data.pop(key))
        except ConfigError as exc:
            raise err(str(exc)) from None

    def take(fields: Mapping[str, Field], given: Mapping[str, Any], prefix: str) -> dict[str, Any]:
        out = {}
        for key, f in fields.items():
            dotted = f"{prefix}{key}"
            if key not in given:
                if f.default is _REQUIRED:
                    raise err(f"{dotted}: required for type {kind!r} ({f.doc})")
                out[key] = f.default if not isinstance(f.default, (list, dict)) else type(f.default)(f.default)
                if f.path and f.default:
                    out[key] = _value(f, dotted, f.default, base_dir)
                continue
            try:
                out[key] = _value(f, dotted, given[key], base_dir)
            except ConfigError as exc:
                raise err(str(exc)) from None
        return out

    spec.update(take(schema, data, ""))
    if spec.get("wait_for_workers") is None:
        spec["wait_for_workers"] = 1 if kind in _BATCH_TYPES else 0
    if kind == "scheduler":
        spec["tls"] = None
        if bool(spec["address"]) == bool(spec["scheduler_file"]):
            raise err("address: expected exactly one of address or scheduler_file, got "
                      + ("both" if spec["address"] else "neither"))
        if tls_raw is not None:
            if not isinstance(tls_raw, dict):
                raise err(f"tls: expected a table with ca_file, cert and key, got {tls_raw!r}")
            for key in tls_raw:
                if key not in _TLS:
                    raise err(f"tls.{key}: unknown key; expected one of {list(_TLS)}")
            spec["tls"] = take(_TLS, tls_raw, "tls.")
            for key, value in spec["tls"].items():
                if not Path(value).is_file():
                    raise err(f"tls.{key}: no such file {value!r}")
            if spec["address"] and not spec["address"].startswith("tls://"):
                raise err(f"address: expected a tls:// address with a [tls] table, got {spec['address']!r}")
        elif spec["address"].startswith("tls://"):
            raise err("tls: a tls:// address needs a [tls] table with ca_file, cert and key")
    if kind in ("slurm", "pbs"):
        spec["processes"] = spec["processes"] or spec["cores"]
        if spec["cores"] % spec["processes"]:
            raise err(f"processes: expected a divisor of cores ({spec['cores']}), got {spec['processes']}")
    if kind == "kubernetes" and not spec["manifest"] and not spec["image"] and spec["create_mode"] != "connect_only":
        raise err("image: required for type 'kubernetes' (an image with nngp-dask installed, cluster/Dockerfile) "
                  "unless manifest is given or create_mode = 'connect_only'")
    return spec


def _value(f: Field, dotted: str, value: Any, base_dir: str | Path) -> Any:
    """One checked value: ``${VAR}`` expanded, relative paths made absolute against ``base_dir``."""
    value = f.check(dotted, value)
    if isinstance(value, str):
        value = expand_env(dotted, value, {})
        if f.path and value and not is_remote(value):
            value = str((Path(base_dir) / Path(value).expanduser()).resolve())
    elif isinstance(value, list):
        if not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{dotted}: expected a list of strings, got {value!r}")
        value = [expand_env(dotted, v, {}) for v in value]
    elif isinstance(value, dict):
        if not all(isinstance(v, str) for v in value.values()):
            raise ConfigError(f"{dotted}: expected a table of strings, got {value!r}")
        value = {k: expand_env(f"{dotted}.{k}", v, {}) for k, v in value.items()}
    return value


def _passthrough(key: str, value: Any) -> Any:
    """A key that nngp-dask does not own, for the cluster class: ``${VAR}`` expanded in strings."""
    if isinstance(value, str):
        return expand_env(key, value, {})
    if isinstance(value, list):
        return [_passthrough(key, v) for v in value]
    if isinstance(value, dict):
        return {k: _passthrough(f"{key}.{k}", v) for k, v in value.items()}
    return value


def jobqueue_kwargs(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Keyword arguments of ``dask_jobqueue.SLURMCluster`` / ``PBSCluster`` for a resolved spec.

    With ``tls`` it creates ``shared_temp_directory`` (mode 700) if it does not exist, since
    dask-jobqueue writes the workers' certificate files there when the cluster object is made.
    Keys of the cluster file that nngp-dask does not own (``job_directives_skip``, ...) are passed
    as they are; a ``scheduler_options`` table is merged with the dashboard address.
    """
    kw: dict[str, Any] = {
        "cores": spec["cores"],
        "memory": spec["memory"],
        "processes": spec["processes"],
        "walltime": spec["walltime"],
        "python": spec["python"] or sys.executable,
        "scheduler_options": {"dashboard_address": spec["dashboard_address"]},
        "job_extra_directives": list(spec["job_extra_directives"]),
        "worker_extra_args": list(spec["worker_extra_args"]),
    }
    prologue = list(spec["job_script_prologue"])
    if spec["processes"] >= spec["cores"]:  # single-threaded workers: no BLAS/Numba oversubscription
        prologue += [f"export {k}={v}" for k, v in WORKER_ENV.items()]
    prologue += [f"export {k}={v}" for k, v in MALLOC_ENV.items()]
    kw["job_script_prologue"] = prologue
    for key in ("queue", "account", "interface", "local_directory", "log_directory", "shared_temp_directory"):
        if spec[key]:
            kw[key] = spec[key]
    if spec.get("resource_spec"):
        kw["resource_spec"] = spec["resource_spec"]
    if spec["tls"]:
        kw["security"] = True  # dask-jobqueue: temporary CA and certificates, workers get theirs by file
        kw["shared_temp_directory"] = spec["shared_temp_directory"] or os.path.expanduser(_SHARED_TEMP)
        os.makedirs(kw["shared_temp_directory"], mode=0o700, exist_ok=True)
    extra = dict(spec.get("passthrough") or {})
    kw["scheduler_options"].update(extra.pop("scheduler_options", {}))
    return {**kw, **extra}


def kubernetes_kwargs(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Keyword arguments of ``dask_kubernetes.operator.KubeCluster`` for a resolved spec."""
    kw: dict[str, Any] = {"name": spec["name"], "shutdown_on_close": spec["shutdown_on_close"],
                          "resource_timeout": spec["resource_timeout"]}
    if spec["namespace"]:
        kw["namespace"] = spec["namespace"]
    if spec["manifest"]:
        kw["custom_cluster_spec"] = spec["manifest"]
    else:
        res = {"cpu": spec["worker_cpu"], "memory": spec["worker_memory"]}
        kw.update(n_workers=spec["n_workers"], resources={"requests": dict(res), "limits": dict(res)},
                  env={**WORKER_ENV, **MALLOC_ENV, **{k: v for k, v in spec["env"].items() if v}},
                  worker_command=["dask", "worker", "--nthreads", "1"] if spec["worker_cpu"] == "1"
                  else ["dask", "worker"],
                  scheduler_service_type=spec["scheduler_service_type"])
        if spec["image"]:
            kw["image"] = spec["image"]
        if spec["idle_timeout"]:
            kw["idle_timeout"] = spec["idle_timeout"]
    return {**kw, **(spec.get("passthrough") or {})}


def _missing(package: str, extra: str, kind: str, exc: ImportError) -> ImportError:
    return ImportError(f"cluster type {kind!r} needs the optional package {package}: pip install {package} "
                       f"(or pip install 'nngp-dask[{extra}]'); import failed: {exc}")


def _wait(c: Any, spec: Mapping[str, Any]) -> None:
    n = spec.get("wait_for_workers") or 0
    if n:
        timeout = spec.get("wait_timeout") or None
        log.info("waiting for %d worker(s)%s", n, f" (up to {timeout:.0f} s)" if timeout else "")
        try:
            c.wait_for_workers(n, timeout=timeout)
        except TimeoutError:
            raise TimeoutError(f"cluster: {len(c.nthreads())} of {n} worker(s) joined within {timeout:.0f} s "
                               "(wait_for_workers / wait_timeout in the cluster file)") from None


@contextmanager
def _client_from_spec(spec: Mapping[str, Any]) -> Iterator[Any]:
    from distributed import Client

    kind = spec["type"]
    if kind == "local":
        kw = local_cluster_kwargs(spec["n_workers"] or None, spec["threads_per_worker"], spec["memory_limit"] or None,
                                  spec["secure"])
        with local_cluster(**kw) as cluster, embedded_client(cluster) as c:
            announce("embedded cluster from %s: %d workers; dashboard %s", spec["_file"], len(cluster.workers),
                     dashboard_link(c))
            _wait(c, spec)
            yield c
        return
    if kind == "scheduler":
        security = None
        if spec["tls"]:
            from distributed.security import Security

            security = Security(require_encryption=True, tls_ca_file=spec["tls"]["ca_file"],
                                tls_client_cert=spec["tls"]["cert"], tls_client_key=spec["tls"]["key"])
        target = {"address": spec["address"]} if spec["address"] else {"scheduler_file": spec["scheduler_file"]}
        with Client(**target, security=security, timeout=spec["timeout"]) as c:
            log.info("connected to scheduler %s%s (dashboard %s)", c.scheduler.address,
                     " with TLS" if security else "", c.dashboard_link)
            _wait(c, spec)
            yield c
        return
    if kind in ("slurm", "pbs"):
        try:
            import dask_jobqueue
        except ImportError as exc:
            raise _missing("dask-jobqueue", "jobqueue", kind, exc) from None
        from .batch import jobqueue_cluster

        cls = dask_jobqueue.SLURMCluster if kind == "slurm" else dask_jobqueue.PBSCluster
        with jobqueue_cluster(cls, spec, jobqueue_kwargs(spec)) as cluster:
            with Client(cluster) as c:
                # the link at the address the dashboard is bound to (loopback by default), not
                # dask-jobqueue's, which pairs the workers' interface with the dashboard's port
                log.info("%s cluster from %s: %d job(s) of %d cores submitted; scheduler %s; dashboard %s",
                         kind.upper(), spec["_file"], spec["jobs"], spec["cores"], cluster.scheduler_address,
                         dashboard_link(c))
                _wait(c, spec)
                yield c
        return
    try:
        from dask_kubernetes.operator import KubeCluster
    except ImportError as exc:
        raise _missing("dask-kubernetes", "kubernetes", kind, exc) from None
    kw = kubernetes_kwargs(spec)
    if spec["create_mode"] != "create_or_connect":
        from dask_kubernetes.operator.kubecluster.kubecluster import CreateMode

        kw["create_mode"] = CreateMode[spec["create_mode"].upper()]
    with KubeCluster(**kw) as cluster, Client(cluster) as c:
        log.info("Kubernetes DaskCluster %s; dashboard %s", cluster.name, c.dashboard_link)
        _wait(c, spec)
        yield c


class LazyClient:
    """A client whose cluster starts on first use (:func:`client_for` of ``client`` and
    ``local``), and closes with this context: a pipeline whose stages are all up to date starts
    no cluster at all."""

    def __init__(self, client: Any = None, **local: object) -> None:
        self._client, self._local = client, local
        self._stack = ExitStack()
        self._open: Any = None

    def get(self) -> Any:
        """The client, starting or connecting to its cluster the first time."""
        if self._open is None:
            self._open = self._stack.enter_context(client_for(self._client, **self._local))
            log.info("Dask dashboard: %s", dashboard_link(self._open))
        return self._open

    def __enter__(self) -> LazyClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self._open = None
        self._stack.close()


@contextmanager
def client_for(client: Any = None, **local: Any) -> Iterator[Any]:
    """Yield a client: the one given, one for a cluster file (``*.toml``, see
    :func:`load_cluster_file`), one connected to an address, or, for ``client=None``, the current
    default client, else one connected to Dask's ``scheduler-address`` (``DASK_SCHEDULER_ADDRESS``),
    else a new embedded cluster (closed on exit; ``local`` are :func:`local_cluster_kwargs`).
    ``"local"`` always starts the embedded cluster. Which one is logged (and printed on stderr
    when no logging is configured, with the dashboard link)."""
    from distributed import Client

    if isinstance(client, Client):
        yield client
        return
    if isinstance(client, LazyClient):
        yield client.get()
        return
    if is_cluster_file(client):
        with _client_from_spec(load_cluster_file(client)) as c:
            yield c
        return
    if isinstance(client, str) and client not in ("", "local"):
        with Client(client) as c:
            log.info("connected to scheduler %s (dashboard %s)", client, c.dashboard_link)
            yield c
        return
    try:
        from distributed import default_client

        current = default_client()
    except ValueError:
        current = None
    if current is not None and client is None:
        yield current
        return
    address = configured_scheduler() if client is None else None
    if address:
        # as distributed.Client() does; TLS certificates, if any, from Dask's configuration too
        with Client(address) as c:
            announce("connected to the scheduler at %s (Dask's scheduler-address setting, e.g. DASK_SCHEDULER_ADDRESS; "
                     "no embedded cluster started), %d worker(s); dashboard %s", address, len(c.nthreads()),
                     dashboard_link(c))
            yield c
        return
    with local_cluster(**local_cluster_kwargs(**local)) as cluster, embedded_client(cluster) as c:
        announce("started an embedded cluster: %d worker(s)%s; dashboard %s", len(cluster.workers),
                 ", mutual TLS" if cluster.security.require_encryption else "", dashboard_link(c))
        yield c
