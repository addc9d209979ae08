"""Scheduled re-fits that grow: an appended store equals a fresh build bit for bit, computing only the
tiles that touch new rows; anything else rebuilds (or is refused) naming why; a killed append
resumes; a new test set recomputes only the test tiles; the solve starts warm from the prefix's."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from nngp_dask import Architecture, build_kernel, open_kernel, predict, solve
from nngp_dask.build import writer
from nngp_dask.kernels import kernel as kernel_fn
from nngp_dask.linalg import ExtendedNystrom, Nystrom, dense_solve, orthogonal_factor
from nngp_dask.store import IncompleteKernelError, StoreMismatchError

ARCH = Architecture(2, "relu", 1.6, 0.1)
TILE = 16


def _files(store: Path, *groups: str) -> dict[str, bytes]:
    """The bytes of every data file under ``groups`` (kernel tiles, inputs, diagonals)."""
    out = {}
    for group in groups:
        for root, _, names in os.walk(store / group):
            for name in names:
                if name != "zarr.json":
                    path = Path(root) / name
                    out[str(path.relative_to(store))] = path.read_bytes()
    return out


def _stamps(store: Path) -> dict[str, tuple[int, int]]:
    return {p: (s.st_ino, s.st_mtime_ns) for p in map(str, (store / "kernel").rglob("*")) if (s := os.stat(p))}


@pytest.mark.parametrize("n_old, kind", [(45, "ntk"), (48, "nngp")])  # ragged last tile row / exact multiple
def test_append_is_bit_identical_to_a_fresh_build(thread_client, tmp_path, rng, n_old, kind):
    x, xt = rng.standard_normal((70, 6)), rng.standard_normal((20, 6))
    store, fresh = tmp_path / "grown.zarr", tmp_path / "fresh.zarr"
    kw = dict(tile=TILE, kind=kind, dtype="float32", normalize="unit_norm", client=thread_client, progress=False)
    build_kernel(ARCH, x[:n_old], store, x_test=xt, **kw)
    before = _stamps(store)
    grown = build_kernel(ARCH, x, store, x_test=xt, append=True, **kw)
    ref = build_kernel(ARCH, x, fresh, x_test=xt, **kw)
    stats = grown.last_build
    full = n_old // TILE  # tile rows/columns of the old store that stay (its ragged last one is recomputed)
    kept = full * (full + 1) // 2 + 2 * full  # upper train tiles + test tile rows (2) x kept columns
    assert (stats.update, stats.tiles_kept) == ("append", kept)
    assert stats.tiles_computed == stats.tiles_total - kept == ref.last_build.tiles_computed - kept
    groups = ("kernel", "inputs", "diagonals")
    assert _files(store, *groups) == _files(fresh, *groups)
    assert grown.identity == ref.identity and grown.meta["blocks"] == ref.meta["blocks"]
    assert grown.meta["lineage"][-1]["n_train"] == n_old
    for j in range(full):  # the kept tiles' files were not rewritten
        path = str(store / "kernel" / "train_train" / "c" / "0" / str(j))
        assert os.stat(path).st_ino == before[path][0] and os.stat(path).st_mtime_ns == before[path][1]
    np.testing.assert_array_equal(grown.to_dask().compute(), ref.to_dask().compute())


def test_an_append_reads_its_kept_tiles_into_the_page_cache(thread_client, tmp_path, rng, monkeypatch):
    """While the new tiles compute, the kept ones are read ahead for the solve that follows
    (here to the end, deterministically; a real build stops it when its tiles are done)."""
    from nngp_dask.build import driver
    from nngp_dask.store import ReadAhead

    read: list[list[str]] = []

    class ToTheEnd(ReadAhead):
        def __exit__(self, *exc: object) -> None:
            if self.paths:  # started: let it read everything before stopping it
                self._thread.join()
            super().__exit__(*exc)
            read.append(self.paths)

    monkeypatch.setattr(driver, "ReadAhead", ToTheEnd)
    x, xt = rng.standard_normal((70, 6)), rng.standard_normal((20, 6))
    kw = dict(tile=TILE, dtype="float32", client=thread_client, progress=False)
    first = build_kernel(ARCH, x[:40], tmp_path / "k.zarr", x_test=xt, **kw)
    assert first.last_build.read_ahead_bytes == 0 and read == [[]]  # a new store: nothing kept
    grown = build_kernel(ARCH, x, tmp_path / "k.zarr", x_test=xt, append=True, **kw)
    kept = [(0, 0), (0, 1), (1, 1)]  # tiles of rows 0:32; the ragged third column is rebuilt
    test_kept = [(i, j) for i in range(2) for j in range(2)]
    want = ([grown.tiles("train_train").path(i, j) for i, j in kept]
            + [grown.tiles("test_train").path(i, j) for i, j in test_kept])
    assert read[-1] == want
    assert grown.last_build.read_ahead_bytes == sum(os.path.getsize(p) for p in want)
    monkeypatch.setattr(driver, "_workers_here", lambda client: False)  # e.g. workers on other hosts
    build_kernel(ARCH, np.vstack([x, x[:20] + 1]), tmp_path / "k.zarr", x_test=xt, append=True, **kw)
    assert read[-1] == []


@pytest.mark.parametrize("change, reason", [
    ("changed", "rows 16:32 differ"),
    ("reordered", "rows 0:16 differ"),
    ("removed", "fewer than the 40"),
    ("same_n", "rows changed or reordered"),
    ("tile", "tile: store has 16, requested 8"),
    ("dtype", "dtype: store has 'float32', requested 'float64'"),
    ("normalize", "normalize: store has 'none', requested 'unit_norm'"),
])
def test_anything_but_an_append_rebuilds_naming_why(thread_client, tmp_path, rng, change, reason, caplog):
    x = rng.standard_normal((60, 4))
    store = tmp_path / "k.zarr"
    build_kernel(ARCH, x[:40], store, tile=TILE, client=thread_client, progress=False)
    new, kw = x.copy(), {"tile": TILE, "dtype": "float32", "normalize": "none"}
    if change == "changed":
        new[20, 1] += 1e-12
    elif change == "reordered":
        new[[3, 4]] = new[[4, 3]]
    elif change == "removed":
        new = x[:30]
    elif change == "same_n":
        new = x[:40].copy()
        new[39] = x[50]
    elif change in ("tile", "dtype", "normalize"):
        kw[change] = {"tile": 8, "dtype": "float64", "normalize": "unit_norm"}[change]
    files = _files(store, "kernel", "inputs", "done")
    with pytest.raises(StoreMismatchError, match="not an incremental update: .*" + reason.replace("(", r"\(")):
        build_kernel(ARCH, new, store, client=thread_client, progress=False, append=True, **kw)
    assert _files(store, "kernel", "inputs", "done") == files  # refused: untouched
    caplog.set_level("WARNING", logger="nngp_dask")
    ks = build_kernel(ARCH, new, store, client=thread_client, progress=False, overwrite=True, **kw)
    assert ks.last_build.update.startswith("rebuilt: ") and reason in ks.last_build.update
    assert ks.last_build.tiles_kept == 0 and ks.complete
    assert [r.getMessage() for r in caplog.records if "rebuilding store" in r.getMessage()][0].count("\n") == 0


def test_without_overwrite_or_append_a_grown_store_is_refused_as_before(thread_client, tmp_path, rng):
    x = rng.standard_normal((50, 4))
    store = tmp_path / "k.zarr"
    build_kernel(ARCH, x[:40], store, tile=TILE, client=thread_client, progress=False)
    with pytest.raises(StoreMismatchError, match=r"x_train.*append=True to grow it"):
        build_kernel(ARCH, x, store, tile=TILE, client=thread_client, progress=False)
    ks = build_kernel(ARCH, x, store, tile=TILE, client=thread_client, progress=False, overwrite=True, append=False)
    assert ks.last_build.update.startswith("rebuilt: ") and ks.last_build.tiles_kept == 0


def test_new_test_set_recomputes_only_test_tiles_and_keeps_the_solve(thread_client, tmp_path, rng):
    x, xt = rng.standard_normal((50, 5)), rng.standard_normal((30, 5))
    store, fresh = tmp_path / "k.zarr", tmp_path / "fresh.zarr"
    kw = dict(tile=TILE, client=thread_client, progress=False, dtype="float64")
    ks = build_kernel(ARCH, x, store, x_test=xt[:10], **kw)
    y = np.sin(x[:, 0])
    first = solve(ks, y, noise=0.1)
    train_files = _files(store, "kernel/train_train")
    ks = build_kernel(ARCH, x, store, x_test=xt, overwrite=True, **kw)  # new rows in the test set
    assert ks.last_build.update == "test set"
    assert ks.last_build.tiles_computed == 2 * 4 and ks.last_build.tiles_kept == 4 * 5 // 2
    assert _files(store, "kernel/train_train") == train_files
    ref = build_kernel(ARCH, x, fresh, x_test=xt, **kw)
    assert _files(store, "kernel", "inputs", "diagonals") == _files(fresh, "kernel", "inputs", "diagonals")
    again = solve(ks, y, noise=0.1)  # the train kernel did not change: nor does its solve
    assert again.resumed_from == -1 and again.key == first.key
    ks = build_kernel(ARCH, x, store, overwrite=True, **kw)  # the test set removed
    assert ks.n_test == 0 and ks.last_build.tiles_computed == 0 and ref.n_test == 30


def test_interrupted_update_never_opens_and_resumes(thread_client, tmp_path, rng, monkeypatch):
    x = rng.standard_normal((70, 5))
    store, fresh = tmp_path / "k.zarr", tmp_path / "fresh.zarr"
    kw = dict(tile=TILE, client=thread_client, progress=False)
    build_kernel(ARCH, x[:45], store, **kw)

    def dies(*args, **kwargs):
        raise KeyboardInterrupt("killed while writing the new rows")

    monkeypatch.setattr(writer, "_write_inputs", dies)
    with pytest.raises(KeyboardInterrupt):
        build_kernel(ARCH, x, store, append=True, **kw)
    monkeypatch.undo()
    with pytest.raises(IncompleteKernelError, match="in-place update did not finish"):
        open_kernel(store)
    ks = build_kernel(ARCH, x, store, append=True, **kw)
    assert ks.last_build.update == "append (resumed)" and ks.complete
    build_kernel(ARCH, x, fresh, **kw)
    assert _files(store, "kernel", "inputs", "diagonals") == _files(fresh, "kernel", "inputs", "diagonals")


_APPEND_SCRIPT = """
import sys, numpy as np
from distributed import Client, LocalCluster
from nngp_dask import Architecture
from nngp_dask.build import build_kernel
if __name__ == "__main__":
    x = np.load(sys.argv[2])
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
            dashboard_address="127.0.0.1:0") as c, Client(c) as cl:
        build_kernel(Architecture(2, "relu", 1.6, 0.1), x, sys.argv[1], tile=16, dtype="float64",
                     client=cl, progress=False, append=True)
"""


@pytest.mark.slow
def test_sigkill_during_an_append_resumes(thread_client, tmp_path, rng):
    x = rng.standard_normal((400, 40))  # 25 x 25 tiles of 16; the first 10 tile rows are kept
    np.save(tmp_path / "x.npy", x)
    store = tmp_path / "k.zarr"
    kw = dict(tile=16, dtype="float64", client=thread_client, progress=False)
    build_kernel(ARCH, x[:170], store, **kw)
    proc = subprocess.Popen([sys.executable, "-c", _APPEND_SCRIPT, str(store), str(tmp_path / "x.npy")])
    deadline, done, kept = time.time() + 120, 0, 10 * 11 // 2
    while time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
        try:
            mask = zarr.open_group(str(store), mode="r")["done/train_train"][...]
        except Exception:
            continue
        done = int(mask.sum()) if mask.shape == (25, 25) else 0
        if done >= kept + 20:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert done >= kept + 20, "the append did not get far enough to be killed mid-way"
    ks = open_kernel(store)
    missing = len(ks.missing_tiles())
    assert not ks.complete and 0 < missing < 325 - kept
    ks = build_kernel(ARCH, x, store, **kw)  # same identity now: an ordinary resume
    assert ks.last_build.tiles_computed == missing
    clean = build_kernel(ARCH, x, tmp_path / "clean.zarr", **kw)
    np.testing.assert_array_equal(ks.to_dask().compute(), clean.to_dask().compute())


def test_warm_start_after_an_append(thread_client, tmp_path, rng):
    x, xt = rng.standard_normal((330, 6)), rng.standard_normal((40, 6))
    y = np.stack([np.sin(x[:, 0]) + 0.3 * x[:, 1], np.cos(x[:, 2])], axis=1)
    store, fresh = tmp_path / "k.zarr", tmp_path / "fresh.zarr"
    kw = dict(x_test=xt, tile=64, dtype="float64", normalize="unit_norm", client=thread_client, progress=False)
    sk = dict(noise=0.1, tol=1e-6, method="cg", preconditioner="nystrom", rank=40, client=thread_client,
              progress=False)
    build_kernel(ARCH, x[:310], store, **kw)
    solve(store, y[:310], **sk)
    grown = build_kernel(ARCH, x, store, append=True, **kw)
    warm = solve(grown, y, **sk)
    ref = build_kernel(ARCH, x, fresh, **kw)
    cold = solve(ref, y, **sk)
    info = warm.info["warm_start"]
    assert info["rows"] == 310 and info["targets_unchanged"] and "warm_start" not in cold.info
    assert "extended from 310 to 330 rows" in warm.info["preconditioner_reused"]
    assert info["start_residual"] < 0.2 and cold.residuals[0].max() == 1.0
    assert warm.converged and warm.iterations < cold.iterations
    k = ref.to_dask().compute()
    exact = dense_solve(k, y, 0.1)
    true_residual = np.linalg.norm(k @ warm.alpha + 0.1 * warm.alpha - y, axis=0) / np.linalg.norm(y, axis=0)
    assert true_residual.max() <= 1e-6
    np.testing.assert_allclose(warm.alpha, exact, atol=1e-3 * np.abs(exact).max())
    mean_w, var_w = predict(grown, warm, variance="lowrank", client=thread_client)  # the extended factor
    mean_c, var_c = predict(ref, cold, variance="lowrank", client=thread_client)
    np.testing.assert_allclose(mean_w, ref.test_train_to_dask().compute() @ exact, atol=1e-4)
    np.testing.assert_allclose(mean_w, mean_c, atol=1e-4)
    assert np.all(var_w >= 0) and np.all(var_w <= ref.test_prior() + 1e-12)


def _grown_kernel_and_small_nystrom(rng, n: int, n_old: int, rank: int, noise: float):
    """A kernel of n points and the Nystrom preconditioner of its first n_old rows, and its landmarks."""
    k = kernel_fn(ARCH, rng.standard_normal((n, 5)), dtype="float64")
    small = Nystrom.build(lambda idx: k[:n_old, idx], n_old, rank, noise)
    return k, small, small.info["landmarks"]


def test_extended_nystrom_is_the_nystrom_of_the_grown_kernel(rng):
    noise = 0.05
    k, small, s = _grown_kernel_and_small_nystrom(rng, 120, 100, 30, noise)
    ext = ExtendedNystrom.extend(small.lowrank_factor, None, small.info["transform"], s, k[100:][:, s], noise, pool=100)
    c = k[:, s]  # oracle: C W^-1 C^T with the same landmarks on the grown kernel (W well conditioned here)
    approx = c @ np.linalg.solve(k[np.ix_(s, s)], c.T)
    f = ext.lowrank_factor
    np.testing.assert_allclose(f @ f.T, approx, atol=1e-8 * np.abs(approx).max())
    r = rng.standard_normal((120, 3))
    np.testing.assert_allclose(ext.apply(r), np.linalg.solve(approx + noise * np.eye(120), r), rtol=1e-7, atol=1e-9)
    u = orthogonal_factor(f)
    np.testing.assert_allclose(u @ u.T, f @ f.T, atol=1e-9 * np.abs(approx).max())
    gram = u.T @ u
    np.testing.assert_allclose(gram - np.diag(np.diag(gram)), 0, atol=1e-9 * gram.max())
    again = ExtendedNystrom.extend(f[:110], ext.info["gram"] - f[110:].T @ f[110:], small.info["transform"], s,
                                   k[110:][:, s], noise, pool=100)  # extended twice: the same factor
    np.testing.assert_allclose(again.lowrank_factor, f, atol=1e-12 * np.abs(f).max())


def test_an_extended_float32_factor_stays_float32_and_is_inverted_exactly(rng):
    # as a solve stores it: the old rows' factor in float32, applied by the compiled passes
    noise = 0.05
    k, small, s = _grown_kernel_and_small_nystrom(rng, 150, 130, 40, noise)
    f32 = small.lowrank_factor.astype(np.float32)
    ext = ExtendedNystrom.extend(f32, None, small.info["transform"], s, k[130:][:, s], noise, pool=130)
    assert ext.nbytes == f32.nbytes + 20 * f32.shape[1] * 8  # the old rows not widened to float64
    f = ext.lowrank_factor
    np.testing.assert_array_equal(f[:130], f32)
    np.testing.assert_allclose(f[130:], k[130:][:, s] @ small.info["transform"], rtol=1e-12)
    # exactly the Woodbury form it is built for: the float32 values, their Gram's diagonal
    gram = np.diag(np.sum(f[:130] ** 2, axis=0)) + f[130:].T @ f[130:]
    np.testing.assert_allclose(ext.info["gram"], gram, rtol=1e-12)
    r = rng.standard_normal((150, 4))
    want = (r - f @ np.linalg.solve(noise * np.eye(f.shape[1]) + gram, f.T @ r)) / noise
    np.testing.assert_allclose(ext.apply(r), want, rtol=1e-9, atol=1e-9 * np.abs(want).max())
    np.testing.assert_allclose(ext.apply(r[:, 0]), want[:, 0], rtol=1e-9, atol=1e-9 * np.abs(want).max())
    # which inverts F F^T + noise I to float32's non-orthogonality of the old columns
    np.testing.assert_allclose(ext.apply(r), np.linalg.solve(f @ f.T + noise * np.eye(150), r),
                               rtol=1e-3, atol=1e-3 * np.abs(want).max())


@pytest.mark.slow  # two pipeline runs
def test_pipeline_on_a_growing_folder_of_dated_files_appends_and_starts_warm(thread_client, tmp_path, rng):
    from nngp_dask.pipeline import resolve, run_pipeline

    data = tmp_path / "data"
    data.mkdir()
    x, xt = rng.standard_normal((340, 5)), rng.standard_normal((30, 5))
    f = lambda a: np.sin(a[:, 0]) + 0.5 * a[:, 1]  # noqa: E731
    np.save(data / "x_test.npy", xt)
    np.save(data / "y_test.npy", f(xt))
    for day, rows in (("2026-12-01", slice(0, 200)), ("2026-12-02", slice(200, 300))):
        np.save(data / f"x_{day}.npy", x[rows])
        np.save(data / f"y_{day}.npy", f(x[rows]))
    cfg = resolve({"run": {"output": str(tmp_path / "run")},
                   "data": {"source": "npy", "path": str(data), "x_train": "x_2*.npy", "y_train": "y_2*.npy",
                            "x_test": "x_test.npy", "y_test": "y_test.npy",
                            "normalize": "unit_norm"},
                   "kernel": {"tile": 64}, "solver": {"method": "cg", "preconditioner": "nystrom", "rank": 30},
                   "predict": {"variance": "lowrank"}})
    first = run_pipeline(cfg, client=thread_client, plots=False, progress=False)
    assert first["kernel"]["n_train"] == 300 and first["reused"]["kernel"].startswith("new")
    np.save(data / "x_2026-12-03.npy", x[300:])  # the next day's file: sorted last, an append
    np.save(data / "y_2026-12-03.npy", f(x[300:]))
    again = run_pipeline(cfg, client=thread_client, plots=False, progress=False)
    assert again["kernel"]["n_train"] == 340
    # 300 rows: 4 full tile rows of 64 stay (10 train tiles, 4 test tiles); 340: 21 + 6 tiles
    assert again["reused"]["kernel"] == "append: 14 of 27 tiles kept, 13 built"
    assert again["reused"]["solve"].startswith("warm start from the 300-row prefix's solution")
    assert "extended from 300 to 340 rows" in again["stages"]["solve"]["detail"]["preconditioner_reused"]
    assert abs(again["metrics"]["srmse"] - first["metrics"]["srmse"]) < 0.2


def test_a_glob_of_dated_files_is_read_in_name_order(tmp_path, rng):
    from nngp_dask.kernels import InputError
    from nngp_dask.pipeline.datasets import load_dataset

    parts = {"2026-12-10": rng.standard_normal((3, 2)), "2026-12-09": rng.standard_normal((4, 2)),
             "2026-12-11": rng.standard_normal((2, 2))}
    for day, x in parts.items():
        np.save(tmp_path / f"x_{day}.npy", x)
        np.save(tmp_path / f"y_{day}.npy", x[:, 0])
    np.save(tmp_path / "x_test.npy", parts["2026-12-09"])
    np.save(tmp_path / "y_test.npy", parts["2026-12-09"][:, 0])
    data = {"source": "npy", "path": str(tmp_path), "x_train": "x_2*.npy", "y_train": "y_2*.npy",
            "x_test": "x_test.npy", "y_test": "y_test.npy", "limit_train": 0, "limit_test": 0}
    ds = load_dataset(data, task="regression")
    expected = np.concatenate([parts[d] for d in sorted(parts)])
    np.testing.assert_array_equal(ds.x_train.read(0, 9), expected)
    np.testing.assert_array_equal(ds.x_train.read(2, 6), expected[2:6])  # a slice across two files
    np.testing.assert_array_equal(ds.y_train, expected[:, 0])
    with pytest.raises(InputError, match=r"data.x_train: 'z_\*.npy' matches no file"):
        load_dataset({**data, "x_train": "z_*.npy"}, task="regression")


@pytest.mark.parametrize("field,value", [("append", "yes"), ("append", 1), ("overwrite", "no")])
def test_append_and_overwrite_must_be_booleans_and_the_store_stays(thread_client, tmp_path, rng, field, value):
    x = rng.standard_normal((40, 3))
    build_kernel(ARCH, x, tmp_path / "k.zarr", tile=16, dtype="float64", client=thread_client, progress=False)
    store = tmp_path / "k.zarr"
    before = _files(store, "kernel", "inputs", "diagonals"), (store / "zarr.json").read_bytes()
    assert before[0]  # tiles, inputs and diagonals were read
    grown = np.vstack([x, rng.standard_normal((8, 3))])
    with pytest.raises(TypeError, match=f"^{field}: expected True"):
        build_kernel(ARCH, grown, tmp_path / "k.zarr", tile=16, dtype="float64", client=thread_client,
                     progress=False, **{field: value})
    assert (_files(store, "kernel", "inputs", "diagonals"), (store / "zarr.json").read_bytes()) == before
