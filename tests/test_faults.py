"""Faults of a stored kernel and of the run around it (issue 14, items 3, 5 and 6).

3. Damaged tiles (bits flipped, 64 bytes overwritten with 0xFF, truncated, deleted while the
   completion record stays) are refused by every read path with a CorruptTileError naming the
   tile, and the next build (or the same pipeline run) rewrites exactly that tile.
5. The lock is written whole or not at all (a full disk leaves none), an unreadable one is
   taken over with a warning, its heartbeat is refreshed, a holder on another host whose
   heartbeat stopped is taken over, and SIGTERM releases it.
6. Exit codes: 75 when locked, 3 when CG did not converge (0 with solver.allow_unconverged),
   listed in --help.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

import nngp_dask
from nngp_dask import Architecture, build_kernel, kernel
from nngp_dask.cli import main
from nngp_dask.store import (FORMAT_VERSION, CorruptTileError, StoreLockedError, StoreMismatchError, open_kernel,
                             store_lock)

try:  # the S3 cases reuse test_s3's moto server; skipped without moto/s3fs
    from tests.test_s3 import s3, s3_server  # noqa: F401  (fixtures)
    HAVE_S3 = True
except BaseException:  # pytest.importorskip raises a BaseException
    HAVE_S3 = False

ROOT = Path(__file__).resolve().parents[1]
QUICK = ROOT / "pipelines" / "quickstart.toml"
SMALL = ["--set", "data.n_train=600", "--set", "data.n_test=80", "--set", "kernel.tile=256",
         "--set", "cluster.n_workers=1", "--no-progress", "--no-plots"]
ARCH = Architecture(2, "relu", 1.6, 0.1)
DAMAGES = ["flip_bits", "overwrite_64_bytes_ff", "truncate", "delete"]


@pytest.fixture
def nngp_log(caplog):
    """caplog on the package's logger, which the CLI detaches from the root logger."""
    logger = logging.getLogger("nngp_dask")
    old = logger.level, logger.propagate
    logger.addHandler(caplog.handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # each record once, whether or not the root logger has caplog too
    yield caplog
    logger.removeHandler(caplog.handler)
    logger.setLevel(old[0])
    logger.propagate = old[1]


def _damage(path: Path, how: str) -> None:
    if how == "delete":
        path.unlink()
        return
    data = bytearray(path.read_bytes())
    if how == "flip_bits":
        for pos in (17, len(data) // 2, len(data) - 9):
            data[pos] ^= 0x24
    elif how == "overwrite_64_bytes_ff":
        data[1000:1064] = b"\xff" * 64
    elif how == "truncate":
        data = data[: len(data) // 3]
    path.write_bytes(bytes(data))


def _chunk(store: Path, part: str, i: int, j: int) -> Path:
    return store / "kernel" / part / "c" / str(i) / str(j)


def _small_store(tmp_path: Path, client, rng, *, name: str = "k.zarr"):
    x, xt = rng.standard_normal((50, 3)), rng.standard_normal((20, 3))
    ks = build_kernel(ARCH, x, tmp_path / name, x_test=xt, tile=16, dtype="float64", client=client, progress=False)
    return ks, x, xt


# --- 3. tile integrity ----------------------------------------------------------------------------
@pytest.mark.parametrize("how", DAMAGES)
def test_damaged_train_tile_refused_by_the_solve_then_rebuilt(thread_client, tmp_path, rng, how):
    ks, x, xt = _small_store(tmp_path, thread_client, rng)  # 4 x 4 tiles of 16 (the last ragged)
    y = np.sin(x[:, 0])
    clean = nngp_dask.solve(ks, y, noise=0.1, method="cg", preconditioner="none", client=thread_client,
                            progress=False)
    path = _chunk(tmp_path / "k.zarr", "train_train", 1, 3)
    original = path.read_bytes()
    assert len(original) == 16 * 16 * 8 + 4  # the values (padded to the full tile), then their CRC32C
    _damage(path, how)
    with pytest.raises(CorruptTileError, match=r"kernel tile \(1, 3\) of .*k\.zarr/kernel/train_train") as err:
        nngp_dask.solve(ks, y, noise=0.2, method="cg", preconditioner="none", client=thread_client, progress=False)
    assert "run the build again" in str(err.value)
    assert open_kernel(ks.url).missing_tiles() == [(1, 3)]  # its record is cleared: never used again
    with pytest.raises(ValueError, match="missing 1 tile"):
        nngp_dask.solve(ks.url, y, noise=0.2, method="cg", client=thread_client, progress=False)

    ks = build_kernel(ARCH, x, tmp_path / "k.zarr", x_test=xt, tile=16, dtype="float64", client=thread_client,
                      progress=False)
    assert ks.last_build.tiles_computed == 1
    assert path.read_bytes() == original
    again = nngp_dask.solve(ks, y, noise=0.1, method="cg", preconditioner="none", client=thread_client,
                            progress=False)
    np.testing.assert_array_equal(again.alpha, clean.alpha)


@pytest.mark.parametrize("how", DAMAGES)
def test_damaged_test_tile_refused_by_predict(thread_client, tmp_path, rng, how):
    ks, x, xt = _small_store(tmp_path, thread_client, rng)
    result = nngp_dask.solve(ks, np.sin(x[:, 0]), noise=0.1, method="cg", client=thread_client, progress=False)
    want_mean, want_var = nngp_dask.predict(ks, result, variance="exact", client=thread_client)
    _damage(_chunk(tmp_path / "k.zarr", "test_train", 1, 2), how)
    with pytest.raises(CorruptTileError, match=r"kernel tile \(1, 2\) of .*kernel/test_train"):
        nngp_dask.predict(ks, result, client=thread_client)
    ks = build_kernel(ARCH, x, tmp_path / "k.zarr", x_test=xt, tile=16, dtype="float64", client=thread_client,
                      progress=False)
    assert ks.last_build.tiles_computed == 1
    mean, var = nngp_dask.predict(ks, result, variance="exact", client=thread_client)
    np.testing.assert_array_equal(mean, want_mean)
    np.testing.assert_array_equal(var, want_var)


@pytest.mark.parametrize("how", ["flip_bits", "delete"])
def test_every_read_path_verifies(thread_client, tmp_path, rng, how):
    """The dask views (Cholesky solves, exact variances of Cholesky solves) and the row reads of
    the exact variance check the tiles too; zarr itself checks the CRC32C when it reads."""
    ks, x, xt = _small_store(tmp_path, thread_client, rng)
    np.testing.assert_allclose(ks.to_dask().compute(), kernel(ARCH, x, dtype="float64"), rtol=1e-12)
    result = nngp_dask.solve(ks, np.sin(x[:, 0]), noise=0.1, method="cg", client=thread_client, progress=False)
    _damage(_chunk(tmp_path / "k.zarr", "train_train", 0, 2), how)
    with pytest.raises(CorruptTileError, match=r"\(0, 2\)"):  # reads through to_dask()
        nngp_dask.solve(open_kernel(ks.url), np.cos(x[:, 0]), noise=0.1, method="cholesky", progress=False)
    with pytest.raises(ValueError, match=r"missing 1 tile\(s\): \(0, 2\)"):  # its record cleared
        ks.to_dask()
    _damage(_chunk(tmp_path / "k.zarr", "test_train", 0, 1), how)
    with pytest.raises(CorruptTileError, match=r"\(0, 1\)"):
        ks.test_train_to_dask().compute()
    with pytest.raises(CorruptTileError, match=r"\(0, 1\)"):
        ks.read_rows("test_train", slice(0, 5))
    if how == "flip_bits":
        codecs = [type(c).__name__ for c in ks.array("kernel/train_train").metadata.codecs]
        assert codecs == ["BytesCodec", "Crc32cCodec"]
        with pytest.raises(ValueError, match="checksum"):
            ks.array("kernel/test_train")[0:16, 16:32]
    del result


def test_resumed_build_rebuilds_missing_or_truncated_tiles_without_reading_them(thread_client, tmp_path, rng,
                                                                               nngp_log):
    ks, x, xt = _small_store(tmp_path, thread_client, rng)
    want = ks.to_dask().compute()
    _damage(_chunk(tmp_path / "k.zarr", "train_train", 0, 0), "delete")
    _damage(_chunk(tmp_path / "k.zarr", "test_train", 1, 3), "truncate")
    ks = build_kernel(ARCH, x, tmp_path / "k.zarr", x_test=xt, tile=16, dtype="float64", client=thread_client,
                      progress=False)
    assert ks.last_build.tiles_computed == 2
    assert "(0, 0) is recorded as written but its chunk is missing" in nngp_log.text
    assert "(1, 3) has 684 bytes, expected 2052" in nngp_log.text
    np.testing.assert_array_equal(ks.to_dask().compute(), want)
    assert ks.check_tiles("train_train", full=True) == [] and ks.check_tiles("test_train", full=True) == []


def test_full_check_finds_flipped_bits(thread_client, tmp_path, rng):
    ks, _, _ = _small_store(tmp_path, thread_client, rng)
    _damage(_chunk(tmp_path / "k.zarr", "train_train", 2, 2), "flip_bits")
    assert ks.check_tiles("train_train") == []  # the size check alone cannot see it
    assert ks.check_tiles("train_train", full=True) == [(2, 2, "failed its crc32c check")]


def test_store_without_checksums_refused_with_the_fix(thread_client, tmp_path, rng):
    ks, x, xt = _small_store(tmp_path, thread_client, rng)
    g = zarr.open_group(str(tmp_path / "k.zarr"), mode="r+")
    meta = dict(g.attrs["nngp_dask"])
    g.attrs["nngp_dask"] = {**meta, "format": 1}  # what every store written before checksums says
    with pytest.raises(StoreMismatchError, match="format 1, written before tile checksums.*rebuild"):
        open_kernel(tmp_path / "k.zarr")
    with pytest.raises(StoreMismatchError, match="rebuild"):
        build_kernel(ARCH, x, tmp_path / "k.zarr", x_test=xt, tile=16, dtype="float64", client=thread_client,
                     progress=False)
    ks = build_kernel(ARCH, x, tmp_path / "k.zarr", x_test=xt, tile=16, dtype="float64", client=thread_client,
                      progress=False, overwrite=True)
    assert ks.meta["format"] == FORMAT_VERSION == 2 and ks.last_build.tiles_computed == 10 + 8


@pytest.mark.slow  # two whole pipeline runs
def test_pipeline_run_rebuilds_a_damaged_tile_and_carries_on(tmp_path, nngp_log):
    out = ["--set", f"run.output={tmp_path / 'run'}"]
    assert main(["-q", "run", str(QUICK), *SMALL, *out]) == 0
    path = _chunk(tmp_path / "run" / "kernel.zarr", "train_train", 0, 1)
    original = path.read_bytes()
    _damage(path, "flip_bits")
    # a new noise: the solve reads every tile again
    assert main(["-q", "run", str(QUICK), *SMALL, *out, "--set", "solver.noise=0.05"]) == 0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["stages"]["kernel"]["detail"]["tiles_computed"] == 1
    assert path.read_bytes() == original
    assert "kernel tile (0, 1)" in nngp_log.text and "rebuilding it and carrying on" in nngp_log.text
    assert report["metrics"]["srmse"] < 0.8


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_S3, reason="needs s3fs and moto")
def test_damaged_tile_on_object_storage(s3, thread_client, rng):  # noqa: F811
    opts = {"client_kwargs": {"endpoint_url": s3["endpoint"]}}
    url = f"s3://{s3['bucket']}/k.zarr"
    x, xt = rng.standard_normal((50, 3)), rng.standard_normal((20, 3))
    kw = dict(x_test=xt, tile=16, dtype="float64", client=thread_client, progress=False, storage_options=opts)
    ks = build_kernel(ARCH, x, url, **kw)
    key = f"{s3['bucket']}/k.zarr/kernel/train_train/c/1/2"
    blob = bytearray(s3["fs"].cat_file(key))
    blob[40] ^= 0x01
    s3["fs"].pipe_file(key, bytes(blob))
    with pytest.raises(CorruptTileError, match=r"\(1, 2\) of s3://.*failed its crc32c check"):
        nngp_dask.solve(ks, np.sin(x[:, 0]), noise=0.1, method="cg", client=thread_client, progress=False)
    s3["fs"].rm_file(f"{s3['bucket']}/k.zarr/kernel/test_train/c/0/0")
    ks = build_kernel(ARCH, x, url, **kw)
    assert ks.last_build.tiles_computed == 2  # the flagged tile and the deleted one (found by a listing)
    np.testing.assert_allclose(ks.to_dask().compute(), kernel(ARCH, x, dtype="float64"), rtol=1e-12)


# --- 5. the lock -------------------------------------------------------------------------------------
_FULL_DISK = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
from nngp_dask.store import store_lock
resource.setrlimit(resource.RLIMIT_FSIZE, (0, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
try:
    with store_lock(sys.argv[1], name="full disk"):
        sys.exit(3)
except OSError as exc:
    print("write failed:", exc)
    sys.exit(0)
"""


def test_full_disk_while_locking_leaves_no_lock(tmp_path):
    store = tmp_path / "run" / "pipeline"
    store.parent.mkdir()
    proc = subprocess.run([sys.executable, "-c", _FULL_DISK, str(store)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "write failed" in proc.stdout
    assert os.listdir(store.parent) == []  # neither a partial lock nor its temporary file
    with store_lock(str(store)):  # nothing blocks the next run
        pass


def test_unreadable_lock_is_taken_over_with_a_warning(tmp_path, nngp_log):
    store = str(tmp_path / "k.zarr")
    for blob in (b"", b'{"host": "no', b"[1, 2]"):
        Path(store + ".lock").write_bytes(blob)
        with store_lock(store):
            assert json.loads(Path(store + ".lock").read_text())["pid"] == os.getpid()
        assert not Path(store + ".lock").exists()
    assert nngp_log.text.count("is unreadable") == 3


def test_lock_heartbeat_and_takeover_from_another_host(tmp_path, monkeypatch, nngp_log):
    monkeypatch.setenv("NNGP_DASK_LOCK_HEARTBEAT", "0.1")
    monkeypatch.setenv("NNGP_DASK_LOCK_TTL", "3")
    store, lock = str(tmp_path / "k.zarr"), tmp_path / "k.zarr.lock"
    with store_lock(store, name="build"):
        first = json.loads(lock.read_text())
        time.sleep(0.5)
        later = json.loads(lock.read_text())
    assert (first["host"], first["pid"], first["what"]) == (socket.gethostname(), os.getpid(), "build")
    assert later["heartbeat"] > first["heartbeat"] + 0.2 and later["since"] == first["since"]
    assert not lock.exists()

    other = {"host": "node-b", "pid": 4242, "what": "pipeline quickstart", "token": "x"}
    lock.write_text(json.dumps({**other, "since": time.time() - 100, "heartbeat": time.time()}))
    with pytest.raises(StoreLockedError, match="locked by pid 4242 on node-b"):  # alive: its heartbeat is fresh
        with store_lock(store):
            pass
    lock.write_text(json.dumps({**other, "since": time.time() - 100, "heartbeat": time.time() - 10}))
    with store_lock(store):  # node-b died: its heartbeat stopped 10 s ago (TTL 3 s)
        assert json.loads(lock.read_text())["host"] == socket.gethostname()
    assert "taking over the lock" in nngp_log.text and "pid 4242 on node-b" in nngp_log.text
    assert not lock.exists()


def test_a_lock_taken_over_is_not_removed_by_its_old_holder(tmp_path, monkeypatch):
    monkeypatch.setenv("NNGP_DASK_LOCK_HEARTBEAT", "0.1")
    store, lock = str(tmp_path / "k.zarr"), tmp_path / "k.zarr.lock"
    with store_lock(store):
        theirs = json.dumps({"host": "node-c", "pid": 7, "since": time.time(), "heartbeat": time.time(),
                             "token": "theirs"})
        lock.write_text(theirs)  # as if node-c had judged this lock stale and taken it over
        time.sleep(0.3)
    assert lock.read_text() == theirs  # neither refreshed nor removed by the old holder


@pytest.mark.skipif(not HAVE_S3, reason="needs s3fs and moto")
def test_lock_on_object_storage_heartbeat_and_takeover(s3, monkeypatch, nngp_log):  # noqa: F811
    monkeypatch.setenv("NNGP_DASK_LOCK_HEARTBEAT", "0.2")
    monkeypatch.setenv("NNGP_DASK_LOCK_TTL", "5")
    opts = {"client_kwargs": {"endpoint_url": s3["endpoint"]}}
    url, key = f"s3://{s3['bucket']}/k.zarr", f"{s3['bucket']}/k.zarr.lock"
    with store_lock(url, opts):
        first = json.loads(s3["fs"].cat_file(key))
        time.sleep(0.7)
        s3["fs"].invalidate_cache()
        assert json.loads(s3["fs"].cat_file(key))["heartbeat"] > first["heartbeat"]
    s3["fs"].pipe_file(key, b"")  # unreadable
    with store_lock(url, opts):
        pass
    s3["fs"].pipe_file(key, json.dumps({"host": "node-b", "pid": 1, "since": 0, "heartbeat": time.time() - 60,
                                        "token": "b"}).encode())
    with store_lock(url, opts):
        pass
    assert "is unreadable" in nngp_log.text and "pid 1 on node-b" in nngp_log.text
    s3["fs"].invalidate_cache()
    assert not s3["fs"].exists(key)


def test_sigterm_releases_the_locks_and_exits_143(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "nngp_dask.cli", "run", str(QUICK), "--set", f"run.output={out}",
           "--set", "data.n_train=6000", "--set", "kernel.tile=512", "--set", "cluster.n_workers=1",
           "--no-progress", "--no-plots"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (out / "kernel.zarr.lock").exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be terminated"
        assert (out / "pipeline.lock").exists()
        proc.send_signal(signal.SIGTERM)  # mid-build: both locks held
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err[-2000:]
    assert "terminated (SIGTERM)" in err
    assert not (out / "pipeline.lock").exists() and not (out / "kernel.zarr.lock").exists()


def test_main_leaves_the_callers_signal_handlers_alone(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    assert main(["validate", str(QUICK)]) == 0
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_sigterm_inside_a_callback_from_c_is_not_lost():
    # Numba's compiler calls back into Python through ctypes; Python drops an exception raised
    # there ("Exception ignored ..."), and a SIGTERM landing in one let the run carry on (CI, once)
    import ctypes

    from nngp_dask.cli import Terminated, _signals_unwind

    landed = []

    @ctypes.CFUNCTYPE(None)
    def callback() -> None:
        landed.append(True)
        os.kill(os.getpid(), signal.SIGTERM)  # its handler runs, and raises, in here
        time.sleep(0.01)

    before = sys.unraisablehook, signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated), _signals_unwind():
        callback()
        for _ in range(100):  # raised at the next line of Python outside the callback
            time.sleep(0.01)
    assert landed and (sys.unraisablehook, signal.getsignal(signal.SIGTERM)) == before


def test_main_leaves_the_callers_logging_alone(capsys):
    # a handler left on pytest's captured stderr, or a logger left detached from the root, broke
    # the log assertions of whichever test ran next (CI, random order)
    pkg, dist = logging.getLogger("nngp_dask"), logging.getLogger("distributed")
    before = list(pkg.handlers), pkg.level, pkg.propagate, dist.level
    assert main(["validate", str(QUICK)]) == 0
    assert main(["--debug", "validate", str(QUICK)]) == 0
    assert (list(pkg.handlers), pkg.level, pkg.propagate, dist.level) == before


# --- 6. exit codes -----------------------------------------------------------------------------------
def test_locked_output_exits_75(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    with store_lock(str(tmp_path / "run" / "pipeline"), name="pipeline other"):
        assert main(["run", str(QUICK), *SMALL, "--set", f"run.output={tmp_path / 'run'}"]) == 75
    err = capsys.readouterr().err
    assert "locked by pid" in err and err.count("\n") == 1


@pytest.mark.slow  # two whole pipeline runs
def test_unconverged_cg_exits_3_unless_allowed(tmp_path, capsys):
    args = ["-q", "run", str(QUICK), *SMALL, "--set", f"run.output={tmp_path / 'run'}", "--set", "solver.maxiter=2",
            "--set", "solver.tol=1e-10", "--set", "solver.preconditioner=none"]
    with pytest.warns(nngp_dask.ConvergenceWarning, match="did not converge after 2 iterations"):
        assert main(args) == 3
    err = capsys.readouterr().err
    assert "not converged" in err and "solver.allow_unconverged" in err
    assert (tmp_path / "run" / "report.json").exists()  # the run is complete, its report written
    assert main([*args, "--set", "solver.allow_unconverged=true"]) == 0


def test_help_lists_the_exit_codes(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for code in ("0", "1", "2", "3", "75", "130", "143"):
        assert f"\n  {code:>3}  " in text, code
