"""The Dask runtime: the embedded cluster, cluster files (SLURM, Kubernetes, a scheduler address),
what is taken from Dask's configuration (``scheduler-address``, the dashboard address) and the
client every distributed step asks for (:func:`client_for`)."""

from typing import Any

from .batch import ClusterSubmitError, jobqueue_cluster
from .daskconfig import DASHBOARD_ADDRESS_KEY, OWN_HANDLER, configured_scheduler, dashboard_address, dashboard_link
from .runtime import (
    CLUSTER_SCHEMA,
    ClusterConfigError,
    LazyClient,
    client_for,
    embedded_client,
    is_cluster_file,
    jobqueue_kwargs,
    kubernetes_kwargs,
    load_cluster_file,
    local_cluster,
    local_cluster_kwargs,
)
from .workerenv import MALLOC_ENV, WORKER_ENV

__all__ = [
    "DASHBOARD_ADDRESS_KEY",
    "OWN_HANDLER",
    "configured_scheduler",
    "dashboard_address",
    "dashboard_link",
    "MALLOC_ENV",
    "WORKER_ENV",
    "EmbeddedCluster",
    "CLUSTER_SCHEMA",
    "ClusterConfigError",
    "ClusterSubmitError",
    "LazyClient",
    "client_for",
    "embedded_client",
    "is_cluster_file",
    "jobqueue_cluster",
    "jobqueue_kwargs",
    "kubernetes_kwargs",
    "load_cluster_file",
    "local_cluster",
    "local_cluster_kwargs",
]


def __getattr__(name: str) -> Any:
    # the embedded cluster imports distributed (~0.4 s): only when asked for, so that an
    # up-to-date pipeline run, which starts no cluster, does not pay for it
    if name == "EmbeddedCluster":
        from .embedded import EmbeddedCluster

        return EmbeddedCluster
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
