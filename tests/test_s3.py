"""The whole path on S3-compatible object storage: moto's server on 127.0.0.1, reached by s3fs.

Build, resume after an injected failure, CG checkpoints, a finished solve loaded, predictions,
a pipeline whose worker processes reach the server through AWS_ENDPOINT_URL, the advisory lock
on object storage, and no credential string anywhere in the store, report.json or run.log.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

from nngp_dask import Architecture  # noqa: E402
from nngp_dask.build import BuildError, build_kernel  # noqa: E402
from nngp_dask.cli import main  # noqa: E402
from nngp_dask.gp import predict, solve  # noqa: E402
from nngp_dask.pipeline import ConfigError, load_config, run_pipeline  # noqa: E402
from nngp_dask.store import StoreLockedError, open_kernel, store_lock  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
QUICK = ROOT / "pipelines" / "quickstart.toml"
ARCH = Architecture(2, "relu", 1.6, 0.1)
KEY_ID = "AKIANNGPDASKTEST0KEY"
SECRET = "nngp-dask-test-secret-5e3f0c9a7d"


@pytest.fixture(scope="module")
def s3_server():
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3(s3_server, monkeypatch):
    """Credentials in the environment only; a fresh bucket; the s3fs filesystem to inspect it."""
    import s3fs

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(var, raising=False)
    bucket = f"nngp-{uuid.uuid4().hex[:10]}"
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server}, skip_instance_cache=True)
    fs.mkdir(bucket)
    return {"endpoint": s3_server, "bucket": bucket, "fs": fs}


def _no_secrets_in_bucket(fs, bucket: str) -> int:
    fs.invalidate_cache()
    files = fs.find(bucket)
    for path in files:
        if path.endswith(".json") or path.endswith(".lock") or "/done/" in path:
            blob = fs.cat_file(path)
            assert KEY_ID.encode() not in blob and SECRET.encode() not in blob, path
    return len(files)


@pytest.mark.slow
def test_build_resume_solve_predict_on_s3(s3, thread_client, tmp_path, monkeypatch, failing_tiles):
    # An unreachable endpoint in the environment: any step that dropped storage_options fails.
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    opts = {"client_kwargs": {"endpoint_url": s3["endpoint"]}}
    url = f"s3://{s3['bucket']}/k.zarr"
    rng = np.random.default_rng(3)
    x, xt = rng.standard_normal((90, 5)), rng.standard_normal((20, 5))
    y = np.column_stack([np.sin(x[:, 0]), np.cos(x[:, 1])])
    kw = dict(x_test=xt, tile=32, dtype="float64", client=thread_client, progress=False)

    with failing_tiles(3), pytest.raises(BuildError, match="1 of 9 tile"):  # 6 upper train + 3 test tiles
        build_kernel(ARCH, x, url, storage_options=opts, **kw)
    ks = open_kernel(url, storage_options=opts)
    missing = ks.missing_tiles("train_train") + ks.missing_tiles("test_train")
    assert len(missing) == 1
    assert not s3["fs"].exists(f"{s3['bucket']}/k.zarr.lock")  # released after the failure

    ks = build_kernel(ARCH, x, url, storage_options=opts, **kw)
    assert ks.last_build.tiles_computed == 1 and ks.complete
    local = build_kernel(ARCH, x, tmp_path / "k.zarr", **kw)
    # read here (synchronous scheduler): worker processes of a session-wide default client started
    # before this test set the credentials in the environment
    sync = dict(scheduler="synchronous")
    np.testing.assert_array_equal(ks.to_dask().compute(**sync), local.to_dask().compute(**sync))
    np.testing.assert_array_equal(ks.test_train_to_dask().compute(**sync),
                                  local.test_train_to_dask().compute(**sync))

    # few iterations: each checkpoint is a few dozen requests to the (slow) moto server
    skw = dict(noise=0.01, tol=1e-6, method="cg", preconditioner="pivoted_cholesky", rank=48,
               checkpoint_every=4, client=thread_client, progress=False)
    res = solve(ks, y, **skw)
    assert res.converged and res.iterations > 2
    group = ks.group[f"solves/{res.key}"]
    assert group.attrs["status"] == "done" and group.attrs["iteration"] == res.iterations
    again = solve(open_kernel(url, storage_options=opts), y, **skw)
    assert again.resumed_from == -1  # loaded from the store, not redone
    np.testing.assert_array_equal(again.alpha, res.alpha)
    ref = solve(local, y, **skw)
    np.testing.assert_allclose(res.alpha, ref.alpha, rtol=1e-10, atol=1e-12)

    mean, var = predict(ks, res, variance="lowrank", client=thread_client)  # reads the factor from S3
    mean_l, var_l = predict(local, ref, variance="lowrank", client=thread_client)
    np.testing.assert_allclose(mean, mean_l, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(var, var_l, rtol=1e-7, atol=1e-10)

    assert _no_secrets_in_bucket(s3["fs"], s3["bucket"]) > 20
    attrs = json.dumps(dict(ks.group.attrs)) + json.dumps({k: dict(g.attrs) for k, g in ks.group["solves"].groups()})
    assert KEY_ID not in attrs and SECRET not in attrs and "endpoint" not in attrs


@pytest.mark.slow
def test_pipeline_on_s3_workers_in_other_processes(s3, tmp_path, monkeypatch, failing_tiles):
    """run.store = s3://...; the endpoint comes from AWS_ENDPOINT_URL (no new config key), which
    the LocalCluster's worker processes inherit with the credentials."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3["endpoint"])
    url = f"s3://{s3['bucket']}/run.zarr"
    out = tmp_path / "run"
    sets = {"run.output": str(out), "run.store": url, "data.n_train": 300, "data.n_test": 40, "kernel.tile": 100,
            "solver.checkpoint_every": 4, "solver.rank": 64, "predict.variance": "lowrank", "report.plots": False}
    cfg = load_config(QUICK, sets)

    # 1. a failure mid-build (in-process workers, so the tile function can be patched)
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address="127.0.0.1:0") as lc, \
            Client(lc, set_as_default=False) as c:
        with failing_tiles(2, 5), pytest.raises(BuildError, match="2 of 9 tile"):
            run_pipeline(cfg, until="kernel", client=c, progress=False)
    assert len(open_kernel(url).missing_tiles()) + len(open_kernel(url).missing_tiles("test_train")) == 2

    # 2. the CLI resumes it on a cluster of worker processes (a cluster file), then solves and predicts
    cluster_file = tmp_path / "one-worker.toml"
    cluster_file.write_text('type = "local"\nn_workers = 1\n')
    args = ["-q", "run", str(QUICK), "--no-progress", "--cluster", str(cluster_file),
            *[f"--set={k}={json.dumps(v) if isinstance(v, str) else str(v).lower()}" for k, v in sets.items()]]
    assert main(args) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["stages"]["kernel"]["did_work"] and rep["stages"]["kernel"]["detail"]["tiles_computed"] == 2
    assert rep["stages"]["solve"]["detail"]["converged"]
    assert rep["metrics"]["srmse"] < 0.9 and np.isfinite(rep["metrics"]["nlpd"])
    assert rep["kernel"]["store"] == url

    # 3. a re-run finds everything done in the bucket (kernel records, the finished solve)
    assert main(args) == 0
    again = json.loads((out / "report.json").read_text())
    assert not any(again["stages"][s]["did_work"] for s in ("kernel", "solve", "predict"))
    assert again["metrics"] == rep["metrics"]

    assert _no_secrets_in_bucket(s3["fs"], s3["bucket"]) > 20
    for name in ("report.json", "run.log"):
        text = (out / name).read_text()
        assert KEY_ID not in text and SECRET not in text, name


def test_lock_on_object_storage(s3):
    opts = {"client_kwargs": {"endpoint_url": s3["endpoint"]}}
    url = f"s3://{s3['bucket']}/locked.zarr"
    lock_path = f"{s3['bucket']}/locked.zarr.lock"
    with store_lock(url, opts):
        assert s3["fs"].exists(lock_path)
        with pytest.raises(StoreLockedError, match="one writer per store"):
            with store_lock(url, opts):
                pass
    s3["fs"].invalidate_cache()
    assert not s3["fs"].exists(lock_path)
    # a lock left by a killed driver on this host is taken over at once by the re-run
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    s3["fs"].pipe_file(lock_path, json.dumps({"host": socket.gethostname(), "pid": dead.pid,
                                              "since": time.time(), "what": "build"}).encode())
    with store_lock(url, opts):
        pass
    # one by a live process elsewhere is respected
    s3["fs"].pipe_file(lock_path, json.dumps({"host": "another-node", "pid": 1, "since": time.time()}).encode())
    with pytest.raises(StoreLockedError, match="another-node"):
        with store_lock(url, opts):
            pass


def test_credentials_in_store_url_refused(tmp_path):
    with pytest.raises(ConfigError, match="without credentials") as info:
        load_config(QUICK, {"run.output": str(tmp_path), "run.store": f"s3://{KEY_ID}:{SECRET}@bucket/k.zarr"})
    assert SECRET not in str(info.value) and KEY_ID not in str(info.value)
