"""Fitting the ecosystem (issue 19): Dask's own configuration (scheduler-address, the dashboard
address, CPU_COUNT), a SciPy LinearOperator view of a stored kernel, stores that xarray opens,
one set of defaults, and activations with parameters from every front end.

Real components throughout: a scheduler and worker process started here, a driver in a process
of its own that finds the scheduler through ``DASK_SCHEDULER_ADDRESS`` as a user's shell would
set it, Zarr on disk, SciPy's eigsh and minres, xarray.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import shutil
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
import zarr

import nngp_dask as nd
from nngp_dask import Architecture, defaults, kernel
from nngp_dask.build import build_kernel
from nngp_dask.cli import main
from nngp_dask.cluster import dashboard_address, dashboard_link, local_cluster, local_cluster_kwargs
from nngp_dask.pipeline import SCHEMA, ConfigError, resolve, to_toml
from nngp_dask.store import StoreMismatchError, inputs_path, kernel_path, open_kernel

from .oracles import gauss_hermite_2d, polar_dual, reference_kernel

ROOT = Path(__file__).resolve().parents[1]
QUICK = ROOT / "pipelines" / "quickstart.toml"


def _full(ks) -> np.ndarray:
    """The stored train x train kernel in float64, its lower tiles mirrored from the upper ones."""
    a = np.asarray(ks.array(kernel_path("train_train"))[...], dtype=np.float64)
    return np.where(np.isnan(a), a.T, a)


def _two_slope(a: float, b: float):
    return lambda z: np.where(z < 0, a * z, b * z)


# --- 1. Dask's configuration ---------------------------------------------------------------
@pytest.fixture(scope="module")
def plain_cluster():
    """A scheduler in this process and one worker process on 127.0.0.1, on plain TCP so that a
    driver in another process can connect to it by its address alone."""
    with local_cluster(**local_cluster_kwargs(n_workers=1, secure=False)) as cluster:
        yield cluster


_DRIVER = """
import sys
import numpy as np
import nngp_dask as nd
from nngp_dask.cli import main

out, pipeline = sys.argv[1], sys.argv[2]
x = np.random.default_rng(3).standard_normal((45, 5))
ks = nd.build_kernel(nd.Architecture(2), x, out + "/k.zarr", tile=16, progress=False)
v = np.random.default_rng(4).standard_normal(45)
with nd.aslinearoperator(ks, noise=0.5) as op:
    np.save(out + "/kv.npy", op.matvec(v))
np.save(out + "/v.npy", v)
sys.exit(main(["kernel", pipeline, "--no-progress", "--set", f"run.output={out}/run", "--set", "data.n_train=40",
               "--set", "data.n_test=9", "--set", "kernel.tile=16", "--set", "architecture.depth=2",
               "--set", 'architecture.activation={name = "leaky_relu", slope = 0.2}']))
"""


def test_scheduler_address_from_dask_config_is_used_by_api_and_pipelines(tmp_path, plain_cluster):
    """``DASK_SCHEDULER_ADDRESS`` set (by the environment of a driver process, as a shell would):
    build_kernel, the linear operator and a pipeline run on that scheduler, start no embedded
    cluster, and say so; the Python API prints it without any logging configured."""
    address = plain_cluster.scheduler_address
    assert address.startswith("tcp://127.0.0.1:")
    before = plain_cluster.scheduler.transition_counter
    env = {**os.environ, "DASK_SCHEDULER_ADDRESS": address}
    proc = subprocess.run([sys.executable, "-c", _DRIVER, str(tmp_path), str(QUICK)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    err = proc.stderr
    assert "started an embedded cluster" not in err
    # the API with no logging configured: one line on stderr for build_kernel and one for the operator
    assert err.count(f"nngp-dask: connected to the scheduler at {address} (Dask's scheduler-address") == 2, err
    # the CLI logs it (its own handler); the pipeline used the same scheduler
    assert err.count(f"connected to the scheduler at {address}") == 3
    assert plain_cluster.scheduler.transition_counter > before  # the work ran there

    ks = open_kernel(tmp_path / "k.zarr")
    x = np.asarray(ks.array(inputs_path("train"))[...])
    k = kernel(Architecture(2), x).astype(np.float64)  # the stored (float32) values
    v = np.load(tmp_path / "v.npy")
    np.testing.assert_allclose(np.load(tmp_path / "kv.npy"), k @ v + 0.5 * v, rtol=1e-12, atol=1e-12)

    # the pipeline's kernel: leaky ReLU with slope 0.2, against the exact polar-quadrature oracle
    run = open_kernel(tmp_path / "run" / "kernel.zarr")
    assert run.architecture.activation.to_dict() == {"name": "leaky_relu", "slope": 0.2}
    xr_ = np.asarray(run.array(inputs_path("train"))[...])
    arch = run.architecture
    want, _ = reference_kernel(arch, xr_, lambda k11, k22, k12: polar_dual(_two_slope(0.2, 1.0), 1, k11, k22, k12))
    assert run.shape == (40, 40)
    np.testing.assert_allclose(_full(run), want, rtol=2e-6, atol=2e-6 * np.abs(want).max())


_EMBEDDED = """
import socket
from nngp_dask.cluster import client_for

with client_for() as c:
    http = c.cluster.scheduler.http_server
    print(len(c.nthreads()), http.address, http.port)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _other_ipv4() -> tuple[str, str] | None:
    """A network interface other than loopback and its IPv4 address."""
    psutil = pytest.importorskip("psutil")
    for name, addrs in psutil.net_if_addrs().items():
        for a in addrs:
            if a.family == socket.AF_INET and not a.address.startswith("127."):
                return name, a.address
    return None


@pytest.mark.skipif(shutil.which("taskset") is None, reason="needs taskset (util-linux)")
def test_embedded_cluster_under_taskset_with_configured_dashboard_port(tmp_path):
    """Under ``taskset -c 0`` one worker (dask.system.CPU_COUNT, not os.cpu_count()); the
    dashboard on the port Dask's configuration names, bound to 127.0.0.1 all the same; and the
    link printed on stderr by the Python API with no logging configured."""
    port = _free_port()
    env = {**os.environ, "DASK_DISTRIBUTED__SCHEDULER__DASHBOARD__ADDRESS": f":{port}"}
    env.pop("DASK_SCHEDULER_ADDRESS", None)
    proc = subprocess.run(["taskset", "-c", "0", sys.executable, "-c", _EMBEDDED], env=env, capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    workers, host, bound = proc.stdout.split()
    assert (workers, host, int(bound)) == ("1", "127.0.0.1", port)
    assert (f"nngp-dask: started an embedded cluster: 1 worker(s), mutual TLS; dashboard "
            f"http://127.0.0.1:{port}/status") in proc.stderr


def test_dashboard_address_and_worker_count_from_dask(monkeypatch):
    import dask
    import dask.system

    assert dashboard_address() == "127.0.0.1:0"  # unset: a free port, loopback only
    for given, used in (("8790", "127.0.0.1:8790"), (":8790", "127.0.0.1:8790"), ("0.0.0.0:8790", "0.0.0.0:8790"),
                        ("10.1.2.3:0", "10.1.2.3:0")):
        with dask.config.set({"distributed.scheduler.dashboard.address": given}):
            assert dashboard_address() == used
    monkeypatch.setattr(dask.system, "CPU_COUNT", 3)  # what taskset or a cgroup quota leaves
    assert local_cluster_kwargs()["n_workers"] == 3
    assert local_cluster_kwargs(n_workers=5)["n_workers"] == 5


def test_scheduler_address_in_pipeline_is_checked_and_local_forces_embedded(monkeypatch):
    import dask

    with dask.config.set({"scheduler-address": "tls://10.0.0.5:8786"}):
        with pytest.raises(ConfigError, match=r"cluster.address: 'tls://10.0.0.5:8786' is a tls:// address"):
            resolve({})
        assert resolve({"cluster": {"address": "local"}})["cluster"]["address"] == "local"
    assert SCHEMA["cluster"]["address"].default == "auto"


def test_jobqueue_dashboard_link_names_the_address_it_is_bound_to(tmp_path):
    """The scheduler on the workers' interface, its dashboard on loopback: dask-jobqueue's own
    link pairs the interface's address with the dashboard's port, where nothing listens."""
    dask_jobqueue = pytest.importorskip("dask_jobqueue")
    found = _other_ipv4()
    if found is None:
        pytest.skip("needs a network interface other than loopback")
    iface, other = found
    from nngp_dask.cluster.runtime import jobqueue_kwargs, resolve_cluster

    raw = tomllib.loads((ROOT / "cluster" / "slurm.toml").read_text())
    raw.update(interface=iface, tls=False, log_directory=str(tmp_path / "logs"), dashboard_address="127.0.0.1:0")
    spec = resolve_cluster(raw, base_dir=ROOT / "cluster", name="slurm.toml")
    with dask_jobqueue.SLURMCluster(**jobqueue_kwargs(spec)) as cluster:
        port = cluster.scheduler.http_server.port
        assert cluster.scheduler_address.startswith(f"tcp://{other}:")
        assert dashboard_link(cluster) == f"http://127.0.0.1:{port}/status"
        socket.create_connection(("127.0.0.1", port), timeout=5).close()  # it listens there
        with pytest.raises(OSError):
            socket.create_connection((other, port), timeout=5).close()  # and not where jobqueue says


# --- 2. a SciPy LinearOperator -------------------------------------------------------------
def test_linear_operator_with_eigsh_and_minres(tmp_path, cluster_client, rng):
    from scipy.sparse.linalg import LinearOperator, eigsh, minres

    arch = Architecture(2, "erf", 1.3, 0.2)
    x = rng.standard_normal((53, 6))  # ragged against tile 16
    ks = build_kernel(arch, x, tmp_path / "k.zarr", tile=16, client=cluster_client, progress=False)
    dense = kernel(arch, x).astype(np.float64) + 0.3 * np.eye(53)  # the stored float32 values, in float64
    with nd.aslinearoperator(ks.url, noise=0.3, client=cluster_client) as op:
        assert isinstance(op, LinearOperator) and op.shape == (53, 53) and op.dtype == np.float64
        assert op.H is op
        vals = eigsh(op, k=3, which="LA", return_eigenvectors=False, tol=1e-12)
        np.testing.assert_allclose(np.sort(vals), np.linalg.eigvalsh(dense)[-3:], rtol=1e-10)
        b = rng.standard_normal(53)
        sol, info = minres(op, b, rtol=1e-12, maxiter=500)
        assert info == 0
        np.testing.assert_allclose(sol, np.linalg.solve(dense, b), rtol=1e-8, atol=1e-8)
        block = rng.standard_normal((53, 4))
        np.testing.assert_allclose(op @ block, dense @ block, rtol=1e-12, atol=1e-12)
        assert op.calls > 3
    with pytest.raises(ValueError, match="noise: expected a finite number >= 0, got -1"):
        nd.aslinearoperator(ks, noise=-1)


# --- 3. xarray and other Zarr v3 readers ---------------------------------------------------
def _all_arrays(group: zarr.Group, prefix: str = ""):
    for name, arr in group.arrays():
        yield f"{prefix}{name}", arr
    for name, sub in group.groups():
        yield from _all_arrays(sub, f"{prefix}{name}/")


def test_store_opens_in_xarray_and_old_stores_still_open(tmp_path, cluster_client, rng):
    xr = pytest.importorskip("xarray")
    arch = Architecture(2, "relu")
    x, xt = rng.standard_normal((37, 4)), rng.standard_normal((11, 4))
    ks = build_kernel(arch, x, tmp_path / "k.zarr", x_test=xt, tile=16, kind="ntk", client=cluster_client,
                      progress=False)
    res = nd.solve(ks, rng.standard_normal((37, 2)), noise=0.1, method="cg", checkpoint_every=1,
                   client=cluster_client, progress=False)
    nd.predict(ks, res, variance="lowrank", client=cluster_client)
    arrays = dict(_all_arrays(zarr.open_group(ks.url, mode="r")))
    assert any(p.startswith("solves/") and "/slot" in p for p in arrays) and "solves/" + res.key + "/lowrank_factor" \
        in arrays
    for path, arr in arrays.items():
        names = arr.metadata.dimension_names  # a 0-d array (a slot's iteration count) has none to name
        assert arr.ndim == 0 or (names is not None and len(names) == arr.ndim), path

    tree = xr.open_datatree(ks.url, engine="zarr", consolidated=False)
    k = tree["kernel"].to_dataset()
    assert k["train_train"].dims == ("train", "train_col") and k["test_train"].dims == ("test", "train_col")
    full = _full(ks)
    stored = k["train_train"].values.astype(np.float64)
    upper = ~np.isnan(stored)
    np.testing.assert_array_equal(stored[upper], full[upper])
    assert tree["inputs"]["x_train"].dims == ("train", "feature")
    assert tree["diagonals"]["train_ntk"].dims == ("layer", "train")
    assert tree["solves"][res.key]["alpha"].shape == (37, 2)
    np.testing.assert_array_equal(xr.open_zarr(ks.url, group="inputs", consolidated=False)["x_test"].values,
                                  ks.array(inputs_path("test"))[...])

    # a store written before dimension names: its arrays' metadata without them
    token = ks.identity.token()
    for meta in Path(ks.url).rglob("zarr.json"):
        doc = json.loads(meta.read_text())
        if doc.get("node_type") == "array":
            doc.pop("dimension_names", None)
            meta.write_text(json.dumps(doc))
    old = open_kernel(ks.url)
    assert old.identity.token() == token and old.missing_tiles() == []
    again = build_kernel(arch, x, ks.url, x_test=xt, tile=16, kind="ntk", client=cluster_client, progress=False)
    assert again.last_build.tiles_computed == 0  # the same store: nothing rebuilt
    np.testing.assert_array_equal(_full(old), full)


# --- 10. one set of defaults ---------------------------------------------------------------
def test_one_set_of_defaults():
    from nngp_dask.estimators import NNGPClassifier, NNGPKernel, NNGPRegressor
    from nngp_dask.select import GRID_DEFAULTS
    from nngp_dask.validate_cli import add_arguments

    assert Architecture(3) == Architecture(defaults.DEPTH, defaults.ACTIVATION, defaults.WEIGHT_VAR, defaults.BIAS_VAR)
    assert Architecture.from_dict({"depth": 3}) == Architecture(3)
    a = SCHEMA["architecture"]
    assert (a["depth"].default, a["activation"].default, a["weight_var"].default, a["bias_var"].default) == \
        (defaults.DEPTH, defaults.ACTIVATION, defaults.WEIGHT_VAR, defaults.BIAS_VAR)
    assert SCHEMA["solver"]["tol"].default == inspect.signature(nd.solve).parameters["tol"].default == defaults.TOL
    assert SCHEMA["solver"]["noise"].default == defaults.NOISE
    assert SCHEMA["kernel"]["dtype"].default == inspect.signature(build_kernel).parameters["dtype"].default \
        == inspect.signature(kernel).parameters["dtype"].default == defaults.STORE_DTYPE
    for cls in (NNGPRegressor, NNGPClassifier, NNGPKernel):
        p = cls().get_params()
        assert (p["depth"], p["activation"], p["weight_var"], p["bias_var"]) == \
            (defaults.DEPTH, defaults.ACTIVATION, defaults.WEIGHT_VAR, defaults.BIAS_VAR)
        if cls is not NNGPKernel:
            assert p["noise"] == defaults.NOISE and p["dtype"] == defaults.IN_MEMORY_DTYPE  # documented difference
    assert GRID_DEFAULTS == {"weight_var": (defaults.WEIGHT_VAR,), "bias_var": (defaults.BIAS_VAR,),
                             "depth": (defaults.DEPTH,), "noise": (defaults.NOISE,)}
    args = add_arguments(argparse.ArgumentParser()).parse_args([])
    assert (args.weight_var, args.bias_var, args.activation) == \
        (defaults.WEIGHT_VAR, defaults.BIAS_VAR, defaults.ACTIVATION)
    readme = (ROOT / "README.md").read_text()
    assert "| `weight_var` | 1.6 |" in readme and "| `tol` | 1e-5 |" in readme


def test_a_store_built_with_the_old_defaults_is_not_silently_reused(tmp_path, thread_client, rng):
    x = rng.standard_normal((20, 3))
    old = build_kernel(Architecture(1, "relu", 1.0, 0.0), x, tmp_path / "k.zarr", tile=16, client=thread_client,
                       progress=False)
    with pytest.raises(StoreMismatchError, match="weight_var"):
        build_kernel(Architecture(1), x, old.url, tile=16, client=thread_client, progress=False)
    assert open_kernel(old.url).architecture == Architecture(1, "relu", 1.0, 0.0)


# --- 11. activations with parameters from every front end ----------------------------------
@pytest.mark.parametrize("value,message", [
    ({"name": "leaky_relu", "slop": 0.2}, "architecture.activation.slop: unknown parameter of 'leaky_relu'; "
                                          "expected one of ['slope']"),
    ({"name": "leaky_relu", "slope": "0.2"}, "architecture.activation.slope: expected a finite real number for "
                                             "'leaky_relu', got '0.2'"),
    ({"name": "leaky_relu", "slope": float("nan")}, "architecture.activation.slope: expected a finite real number"),
    ("two_slope", "architecture.activation.negative_slope: required for 'two_slope'"),
    ({"name": "two_slope", "negative_slope": 0.1}, "architecture.activation.positive_slope: required for "
                                                   "'two_slope'"),
    ({"name": "tanh", "degree": 0}, "architecture.activation.degree: expected an integer >= 1, got 0"),
    ({"name": "relu", "slope": 0.2}, "architecture.activation.slope: unknown parameter of 'relu'; it takes no "
                                     "parameters"),
    ({"name": "swish"}, "architecture.activation.name: expected one of ['relu', 'leaky_relu'"),
    ({"slope": 0.2}, "architecture.activation.name: missing"),
    (3, "architecture.activation: expected a string or a table, got int 3"),
])
def test_bad_activation_in_a_pipeline_is_one_line(value, message):
    with pytest.raises(ConfigError) as info:
        resolve({"architecture": {"activation": value}})
    assert message in str(info.value) and "\n" not in str(info.value)


def test_activation_tables_from_the_cli(tmp_path, capsys):
    table = '{name = "two_slope", negative_slope = -0.3, positive_slope = 0.7}'
    assert main(["validate", str(QUICK), "--set", f"architecture.activation={table}"]) == 0
    printed = tomllib.loads(capsys.readouterr().out)
    assert printed["architecture"]["activation"] == {"name": "two_slope", "negative_slope": -0.3,
                                                     "positive_slope": 0.7}
    assert resolve(printed)["architecture"]["activation"] == printed["architecture"]["activation"]  # round trip
    assert main(["validate", str(QUICK), "--set", 'architecture.activation={name = "leaky_relu", slope = true}']) == 2
    err = capsys.readouterr().err.strip()
    assert err == "nngp-dask: error: architecture.activation.slope: expected a finite real number for 'leaky_relu', " \
                  "got True"
    # validate-kernel takes the same table
    out = tmp_path / "v"
    assert main(["validate-kernel", "--activation", '{name = "leaky_relu", slope = 0.2}', "--depth", "1",
                 "--points", "2", "--dim", "3", "--max-width", "8", "--networks", "64", "--no-plots", "--json",
                 "--out", str(out)]) == 0
    capsys.readouterr()
    assert json.loads((out / "result.json").read_text())["architecture"]["activation"] == \
        {"name": "leaky_relu", "slope": 0.2}
    with pytest.raises(SystemExit):
        main(["validate-kernel", "--activation", '{name = "leaky_relu", slop = 0.2}'])
    assert "activation.slop: unknown parameter of 'leaky_relu'" in capsys.readouterr().err


def test_activation_tables_in_estimators_against_oracles(rng):
    from nngp_dask.estimators import NNGPKernel, NNGPRegressor

    x = nd.normalize(rng.standard_normal((12, 5)), "unit_norm")  # tanh's series at its documented accuracy
    two = {"name": "two_slope", "negative_slope": -0.3, "positive_slope": 0.7}
    got = NNGPKernel(depth=2, activation=two, weight_var=1.4, bias_var=0.2)(x)
    arch = Architecture(2, two, 1.4, 0.2)
    want, _ = reference_kernel(arch, x, lambda a, b, c: polar_dual(_two_slope(-0.3, 0.7), 1, a, b, c))
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    tanh = {"name": "tanh", "degree": 90, "nodes": 260}
    k, _ = reference_kernel(Architecture(1, tanh, 1.2, 0.1), x, lambda a, b, c: gauss_hermite_2d(np.tanh, a, b, c))
    np.testing.assert_allclose(NNGPKernel(depth=1, activation=tanh, weight_var=1.2, bias_var=0.1)(x), k,
                               rtol=1e-9, atol=1e-9)
    reg = NNGPRegressor(depth=1, activation=tanh, weight_var=1.2, bias_var=0.1, noise=0.05, optimizer=None).fit(x, np.sin(x[:, 0]))
    assert reg.arch_.activation.to_dict() == tanh
    np.testing.assert_allclose(reg.alpha_.ravel(), np.linalg.solve(k + 0.05 * np.eye(12), np.sin(x[:, 0])),
                               rtol=1e-6, atol=1e-8)
    with pytest.raises(ValueError, match="activation.negative_slope: required for 'two_slope'"):
        NNGPRegressor(activation={"name": "two_slope", "positive_slope": 1.0}).fit(x, x[:, 0])


def test_sweep_best_pipeline_keeps_activation_parameters():
    from nngp_dask.select import run_sweep

    rng = np.random.default_rng(5)
    x, y = rng.standard_normal((40, 3)), rng.standard_normal(40)
    leaky = {"name": "leaky_relu", "slope": 0.2}
    res = run_sweep(x, y, grid={"depth": [1, 2]}, activation=leaky, task="regression")
    cfg = resolve(tomllib.loads(res.best_pipeline_toml()))
    assert cfg["architecture"]["activation"] == leaky
    assert to_toml({"architecture": {"activation": leaky}}) == \
        '[architecture]\nactivation = {name = "leaky_relu", slope = 0.2}\n'
