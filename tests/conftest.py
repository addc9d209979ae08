"""Shared fixtures: a real multi-process Dask cluster on loopback, and small datasets."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest


@pytest.fixture(scope="session")
def cluster_client():
    """A real LocalCluster: two single-threaded worker processes on 127.0.0.1."""
    from nngp_dask.cluster import embedded_client, local_cluster, local_cluster_kwargs

    with local_cluster(**local_cluster_kwargs(n_workers=2)) as cluster, embedded_client(cluster) as client:
        yield client


@contextlib.contextmanager
def _threads():
    from distributed import Client, LocalCluster

    # in-process transport; the dashboard on a free loopback port (None would mean 0.0.0.0:8787)
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False,
            dashboard_address="127.0.0.1:0") as cluster, Client(cluster) as client:
        yield client


@pytest.fixture
def thread_client():
    """An in-process cluster (threads), for tests that patch code the tasks run; the default client
    while the test runs."""
    with _threads() as client:
        yield client


@pytest.fixture(scope="module")
def inproc_client():
    """The same, shared by a module's tests (and the default client until the module ends)."""
    with _threads() as client:
        yield client


@pytest.fixture
def rng():
    return np.random.default_rng(20261123)


@pytest.fixture
def single_threaded_blas():
    """One BLAS thread: tests that factorise many tiny matrices; on a loaded 2-core machine waking a
    second OpenBLAS thread after each Numba kernel costs more than the factorisation itself."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # comes with scikit-learn; without it the tests only run slower
        yield
        return
    with threadpool_limits(1, user_api="blas"):
        yield


@pytest.fixture
def failing_tiles(monkeypatch):
    """``with failing_tiles(2, 5): ...``: inside the block the tile function raises on its 2nd and
    5th calls in this process (so only for in-process workers); outside it is the real one."""
    import nngp_dask.build.tasks as build_tasks

    @contextlib.contextmanager
    def inject(*calls: int):
        real, count = build_tasks.tile_fn, {"n": 0}

        def failing(*args, **kwargs):
            count["n"] += 1
            if count["n"] in calls:
                raise RuntimeError("injected failure")
            return real(*args, **kwargs)

        monkeypatch.setattr(build_tasks, "tile_fn", failing)
        try:
            yield
        finally:
            monkeypatch.setattr(build_tasks, "tile_fn", real)

    return inject


def pytest_terminal_summary(terminalreporter, config):
    """Print pytest-randomly's seed also under ``-q`` (which hides the header that has it), so a
    failure that depends on the order can be replayed."""
    seed = getattr(config.option, "randomly_seed", None)
    if isinstance(seed, int) and config.pluginmanager.has_plugin("randomly"):
        terminalreporter.write_line(f"tests ran in a random order: replay it with -p randomly --randomly-seed={seed}")
