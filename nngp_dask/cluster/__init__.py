"""The Dask runtime: the embedded cluster, cluster files (SLURM, Kubernetes, a scheduler address) and
the client every distributed step asks for (:func:`client_for`)."""

from .embedded import EmbeddedCluster
from .runtime import (CLUSTER_SCHEMA, ClusterConfigError, LazyClient, client_for, embedded_client, is_cluster_file,
                      jobqueue_kwargs, kubernetes_kwargs, load_cluster_file, local_cluster, local_cluster_kwargs)
from .workerenv import MALLOC_ENV, WORKER_ENV

__all__ = [
    "MALLOC_ENV",
    "WORKER_ENV",
    "EmbeddedCluster",
    "CLUSTER_SCHEMA",
    "ClusterConfigError",
    "LazyClient",
    "client_for",
    "embedded_client",
    "is_cluster_file",
    "jobqueue_kwargs",
    "kubernetes_kwargs",
    "load_cluster_file",
    "local_cluster",
    "local_cluster_kwargs",
]
