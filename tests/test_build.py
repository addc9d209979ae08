"""The tiled, stored kernel: equality with the in-memory kernel, resume, refusal, locking, ingest."""

from __future__ import annotations

import gzip
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import zarr

from nngp_dask import Architecture, kernel
from nngp_dask.build import BuildError, build_kernel, prepare_inputs
from nngp_dask.kernels import InputError, normalize
from nngp_dask.store import IncompleteKernelError, StoreLockedError, StoreMismatchError, open_kernel, store_lock

ARCH = Architecture(2, "relu", 1.6, 0.1)


def _tree_state(path):
    """(relative path, size, mtime) of every file under path."""
    out = []
    for root, _, files in os.walk(path):
        for f in files:
            p = os.path.join(root, f)
            st = os.stat(p)
            out.append((os.path.relpath(p, path), st.st_size, st.st_mtime_ns))
    return sorted(out)


@pytest.mark.parametrize("n,m,tile", [(97, 31, 32), (64, 20, 64), (50, 7, 128)])
@pytest.mark.parametrize("kind", ["nngp", "ntk"])
def test_tiled_equals_in_memory(cluster_client, tmp_path, rng, n, m, tile, kind):
    x, xt = rng.standard_normal((n, 9)), rng.standard_normal((m, 9))
    ks = build_kernel(ARCH, x, tmp_path / "k.zarr", x_test=xt, kind=kind, tile=tile, dtype="float64",
                      client=cluster_client, progress=False)
    assert ks.missing_tiles() == [] and ks.missing_tiles("test_train") == []
    # BLAS may sum a one-column ragged tile in another order than the full GEMM: 1 ulp
    np.testing.assert_allclose(ks.to_dask().compute(), kernel(ARCH, x, kind=kind, dtype="float64"),
                               rtol=1e-14, atol=0)
    np.testing.assert_allclose(ks.test_train_to_dask().compute(), kernel(ARCH, xt, x, kind=kind, dtype="float64"),
                               rtol=1e-14, atol=0)
    np.testing.assert_allclose(ks.test_prior(), np.diag(kernel(ARCH, xt, kind=kind, dtype="float64")),
                               rtol=1e-14)
    assert ks.shape == (n, n) and ks.architecture == ARCH


def test_float32_and_normalisation(cluster_client, tmp_path, rng):
    x = rng.standard_normal((70, 5)) * 3
    ks = build_kernel(ARCH, x, tmp_path / "k.zarr", tile=32, normalize="unit_norm", client=cluster_client,
                      progress=False)
    assert ks.dtype == np.float32
    np.testing.assert_allclose(ks.to_dask().compute(), kernel(ARCH, normalize(x, "unit_norm")), rtol=2e-6)


def test_only_upper_tiles_are_stored(cluster_client, tmp_path, rng):
    x = rng.standard_normal((100, 4))
    ks = build_kernel(ARCH, x, tmp_path / "k.zarr", tile=32, client=cluster_client, progress=False)
    arr = ks.array("kernel/train_train")
    assert arr.nchunks_initialized == 4 * 5 // 2  # 10 of 16 tiles
    assert np.isnan(arr[40, 0])  # a lower tile was never written


def test_resume_after_exception_recomputes_only_missing(thread_client, tmp_path, rng, failing_tiles):
    x = rng.standard_normal((130, 6))  # 5 x 5 tiles of 32 (ragged): 15 upper tiles
    store = tmp_path / "k.zarr"
    with failing_tiles(6), pytest.raises(BuildError, match="1 of 15 tile"):
        build_kernel(ARCH, x, store, tile=32, dtype="float64", client=thread_client, progress=False)
    ks = open_kernel(store)
    assert len(ks.missing_tiles()) == 1
    with pytest.raises(IncompleteKernelError, match="missing 1 tile"):
        ks.to_dask()
    # what a write killed between zarr's temporary file and its rename leaves behind
    unfinished = store / "kernel" / "train_train" / "c" / "1" / "3.0123abcd.partial"
    unfinished.parent.mkdir(parents=True, exist_ok=True)
    unfinished.write_bytes(b"\0" * 64)
    ks = build_kernel(ARCH, x, store, tile=32, dtype="float64", client=thread_client, progress=False)
    assert ks.last_build.tiles_computed == 1
    assert not unfinished.exists()
    clean = build_kernel(ARCH, x, tmp_path / "clean.zarr", tile=32, dtype="float64", client=thread_client,
                         progress=False)
    np.testing.assert_array_equal(ks.to_dask().compute(), clean.to_dask().compute())


def test_progress_is_logged_without_a_progress_bar(thread_client, tmp_path, rng, monkeypatch, caplog):
    monkeypatch.setenv("NNGP_DASK_PROGRESS_EVERY", "0.005")  # timed lines, from the heartbeat's thread
    with caplog.at_level("INFO", logger="nngp_dask"):
        build_kernel(ARCH, rng.standard_normal((100, 4)), tmp_path / "k.zarr", tile=32, client=thread_client,
                     progress=False)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("kernel tiles: ")]
    counts = [int(line.split(": ")[1].split("/")[0]) for line in lines]
    assert counts and counts == sorted(counts) and all(0 <= c <= 10 for c in counts)  # 10 upper tiles
    assert all("/10 after " in line for line in lines)


_KILL_SCRIPT = """
import sys, numpy as np
from distributed import Client, LocalCluster
from nngp_dask import Architecture
from nngp_dask.build import build_kernel
if __name__ == "__main__":
    x = np.load(sys.argv[2])
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
            dashboard_address="127.0.0.1:0") as c, Client(c) as cl:
        build_kernel(Architecture(2, "relu", 1.6, 0.1), x, sys.argv[1], tile=16, dtype="float64",
                     client=cl, progress=False)
"""


@pytest.mark.slow
def test_resume_after_sigkill(thread_client, tmp_path, rng):
    x = rng.standard_normal((400, 40))  # 25 x 25 tiles of 16: 325 upper tiles (~50 ms each, one thread)
    np.save(tmp_path / "x.npy", x)
    store = tmp_path / "k.zarr"
    proc = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, str(store), str(tmp_path / "x.npy")])
    deadline = time.time() + 120
    done = 0
    while time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
        try:
            done = int(zarr.open_group(str(store), mode="r")["done/train_train"][...].sum())
        except Exception:
            continue
        if done >= 40:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert done >= 40, "the build did not get far enough to be killed mid-way"
    ks = open_kernel(store)
    missing = len(ks.missing_tiles())
    assert 0 < missing < 325
    ks = build_kernel(ARCH, x, store, tile=16, dtype="float64", client=thread_client, progress=False)
    assert ks.last_build.tiles_computed == missing  # the lock left by the killed run was taken over
    clean = build_kernel(ARCH, x, tmp_path / "clean.zarr", tile=16, dtype="float64", client=thread_client,
                         progress=False)
    np.testing.assert_array_equal(ks.to_dask().compute(), clean.to_dask().compute())


@pytest.mark.parametrize("change", ["architecture", "inputs", "tile", "dtype", "kind"])
def test_mismatched_store_refused_and_untouched(thread_client, tmp_path, rng, change):
    x = rng.standard_normal((40, 3))
    store = tmp_path / "k.zarr"
    build_kernel(ARCH, x, store, tile=16, client=thread_client, progress=False)
    before = _tree_state(store)
    kwargs = dict(arch=ARCH, x=x, tile=16, dtype="float32", kind="nngp")
    kwargs.update({"architecture": {"arch": ARCH.replace(depth=3)}, "inputs": {"x": x + 1e-9},
                   "tile": {"tile": 32}, "dtype": {"dtype": "float64"}, "kind": {"kind": "ntk"}}[change])
    field = {"architecture": "architecture", "inputs": "x_train", "tile": "tile", "dtype": "dtype",
             "kind": "kind"}[change]
    arch = kwargs.pop("arch")
    xx = kwargs.pop("x")
    with pytest.raises(StoreMismatchError, match=field):
        build_kernel(arch, xx, store, client=thread_client, progress=False, **kwargs)
    assert _tree_state(store) == before
    ks = build_kernel(arch, xx, store, client=thread_client, progress=False, overwrite=True, **kwargs)
    assert ks.missing_tiles() == []


def test_foreign_zarr_refused(tmp_path, rng):
    g = zarr.open_group(str(tmp_path / "other.zarr"), mode="w")
    g.create_array("data", shape=(3,), dtype="f8")
    with pytest.raises(StoreMismatchError, match="other Zarr data"):
        build_kernel(ARCH, rng.standard_normal((5, 2)), tmp_path / "other.zarr", progress=False)


def test_concurrent_writer_refused(tmp_path, rng):
    store = str(tmp_path / "k.zarr")
    with store_lock(store):
        with pytest.raises(StoreLockedError, match="locked by pid"):
            build_kernel(ARCH, rng.standard_normal((5, 2)), store, progress=False)


def test_bad_inputs_named_before_work(tmp_path, rng):
    x = rng.standard_normal((50, 3))
    x[37, 1] = np.nan
    with pytest.raises(InputError, match="row 37"):
        build_kernel(ARCH, x, tmp_path / "k.zarr", progress=False)
    assert not (tmp_path / "k.zarr").exists()
    with pytest.raises(InputError, match="expected 3 features"):
        build_kernel(ARCH, x[:30], tmp_path / "k.zarr", x_test=np.ones((2, 4)), progress=False)
    with pytest.raises(ValueError, match="tile: expected a positive integer"):
        build_kernel(ARCH, np.ones((4, 3)), tmp_path / "k.zarr", tile=0, progress=False)
    with pytest.raises(ValueError, match="kind"):
        build_kernel(ARCH, np.ones((4, 3)), tmp_path / "k.zarr", kind="gp", progress=False)


def _write_idx(path, arr):
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in arr.shape)
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def test_every_input_format_gives_the_same_store(thread_client, tmp_path, rng):
    images = rng.integers(0, 256, size=(45, 4, 5)).astype(np.uint8)
    flat = images.reshape(45, -1).astype(np.float64)
    np.save(tmp_path / "x.npy", images)
    np.savez(tmp_path / "x.npz", x_train=images)
    np.savetxt(tmp_path / "x.csv", flat, delimiter=",", header=",".join(f"f{i}" for i in range(20)), comments="")
    _write_idx(tmp_path / "x-ubyte", images)
    _write_idx(tmp_path / "x-ubyte.gz", images)
    z = zarr.open_array(str(tmp_path / "x.zarr"), mode="w", shape=flat.shape, chunks=(10, 20), dtype="f8")
    z[:] = flat
    from nngp_dask.store import open_source

    prints = set()
    for src in [flat, open_source(tmp_path / "x.npy"), open_source(tmp_path / "x.npz", key="x_train"),
                open_source(tmp_path / "x.csv"), open_source(tmp_path / "x-ubyte"),
                open_source(tmp_path / "x-ubyte.gz"), open_source(tmp_path / "x.zarr")]:
        prints.add(prepare_inputs(src, normalize="unit_norm").fingerprint)
    assert len(prints) == 1
    ks = build_kernel(ARCH, str(tmp_path / "x.npy"), tmp_path / "k.zarr", tile=16, normalize="unit_norm",
                      dtype="float64", client=thread_client, progress=False)
    np.testing.assert_allclose(ks.to_dask().compute(), kernel(ARCH, normalize(flat, "unit_norm"), dtype="float64"),
                               rtol=1e-14, atol=0)


@pytest.mark.parametrize("features", [3, 18])
def test_precompile_runs_for_ard_architectures(features):
    """The build compiles its kernels first on inputs of its own; with ARD those must have one
    column per input weight. (A process's first build is the only one that compiles, so a test
    order with a plain build first hid this: an ARD pipeline failed in a fresh process.)"""
    from nngp_dask.build.precompile import _compile

    arch = ARCH.replace(input_weight_var=tuple(np.linspace(0.5, 2.0, features)))
    assert _compile(arch, np.dtype(np.float32)) >= 0.0
