"""Worker jobs on a batch system (SLURM, PBS) through dask-jobqueue, submitted so that a failure
shows at once and nothing is left behind.

dask-jobqueue submits jobs in the background: a missing ``sbatch`` or a refused job is logged by
the cluster's event loop while the caller goes on to wait for workers that will never come. Here
the submissions are awaited, and the first failure is raised as :class:`ClusterSubmitError`,
one line naming the cluster file. The workers' temporary TLS files go to a private folder made
for the run inside ``shared_temp_directory`` and removed with it.
"""

from __future__ import annotations

import inspect
import shlex
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from typing import Any

__all__ = ["ClusterSubmitError", "accepted_keywords", "jobqueue_cluster"]


class ClusterSubmitError(RuntimeError):
    """Worker jobs could not be submitted (no submit command on this host, or the batch system
    refused them); CLI exit 1."""


def _one_line(exc: BaseException) -> str:
    """``Type: first line``, and the last line when there are more (a submit command's stderr)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if len(lines) < 2 else f"{lines[0]} ... {lines[-1]}"
    return f"{type(exc).__name__}: {text}" if lines else type(exc).__name__


def accepted_keywords(cls: Any) -> set[str]:
    """The keyword arguments a dask-jobqueue cluster class takes, its job class's included.

    Checked before the cluster object is made: by then dask-jobqueue has written the workers'
    certificate files, and a wrong keyword would leave them to the garbage collector.
    """
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    names: set[str] = set()
    for klass in (*cls.__mro__, *cls.job_cls.__mro__):
        init = klass.__dict__.get("__init__")
        if init is not None:
            names |= {p.name for p in inspect.signature(init).parameters.values() if p.kind in kinds}
    return names - {"self"}


def _remove_tls_files(clusters: list[Any], run_dir: str) -> None:
    """Remove the run's TLS folder, closing dask-jobqueue's handles of the files in it first (it
    keeps them open as ``_job_<key>`` and deletes each when its handle is collected)."""
    for cluster in clusters:
        for key in ("ca_file", "cert", "key"):
            handle = getattr(cluster, f"_job_{key}", None)
            if handle is not None:
                handle.close()
    shutil.rmtree(run_dir, ignore_errors=True)


@contextmanager
def jobqueue_cluster(cls: Any, spec: Mapping[str, Any], kwargs: Mapping[str, Any]) -> Iterator[Any]:
    """A started dask-jobqueue cluster with ``spec["jobs"]`` jobs submitted, closed on exit.

    Parameters
    ----------
    cls : type
        ``dask_jobqueue.SLURMCluster`` or ``PBSCluster``.
    spec : mapping
        The resolved cluster file (:func:`nngp_dask.cluster.load_cluster_file`).
    kwargs : mapping
        Its keyword arguments (:func:`nngp_dask.cluster.jobqueue_kwargs`).

    Yields
    ------
    dask_jobqueue.JobQueueCluster

    Raises
    ------
    ClusterSubmitError
        The submit command is not on ``PATH`` (checked before anything starts), or submitting a
        job failed; the cluster is closed and the run's TLS folder removed first.
    """
    name, kind = spec["_file"], spec["type"]
    command = shlex.split(cls.job_cls.submit_command)[0]
    if spec["jobs"] and shutil.which(command) is None:
        raise ClusterSubmitError(f"{name}: cannot submit {kind} jobs: {command!r} is not on PATH (run the driver "
                                 f"on a host that submits {kind.upper()} jobs, e.g. a login node)")
    unknown = sorted(set(kwargs) - accepted_keywords(cls))
    if unknown:
        raise TypeError(f"{name}: {unknown[0]}: not an option of {cls.__name__} or its {cls.job_cls.__name__} "
                        "(keys nngp-dask does not own are passed to dask-jobqueue as given)")
    kw = dict(kwargs)
    with ExitStack() as stack:
        if kw.get("security") is True:
            # dask-jobqueue's certificate files are deleted only when the cluster object is
            # collected; a folder of the run's own is removed even when that never happens
            run_dir = tempfile.mkdtemp(prefix="run-", dir=kw["shared_temp_directory"])
            made: list[Any] = []
            stack.callback(_remove_tls_files, made, run_dir)
            kw["shared_temp_directory"] = run_dir
        cluster = stack.enter_context(cls(**kw))
        if kw.get("security") is True:
            made.append(cluster)

        async def submit() -> None:
            # what scale(jobs=...) does, except that the submissions are awaited here rather
            # than started in the background, where an error is only logged
            while len(cluster.worker_spec) < spec["jobs"]:
                cluster.worker_spec.update(cluster.new_worker_spec())
            await cluster._correct_state()

        try:
            cluster.sync(submit)
        except Exception as exc:
            from distributed.core import Status

            for job in cluster.workers.values():
                if job.status == Status.created:  # never submitted: closing must not wait for it
                    job.status = Status.failed
            raise ClusterSubmitError(f"{name}: submitting {kind} worker jobs failed: {_one_line(exc)}") from None
        yield cluster
