"""Bad input and data loss (issue 14, items 1, 2, 4, 7, 8, 9): each case is refused with one line
naming the field, the value and what was expected (exit 2 from the CLI), before any work, and
leaves what exists intact."""

from __future__ import annotations

import contextlib
import gzip
import logging
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import zarr

import nngp_dask
import nngp_dask.build.tasks as build_tasks
from nngp_dask import (Architecture, InputError, KernelOverflowError, NotAKernelStoreError, StoreMismatchError,
                       build_kernel, kernel, normalize, open_kernel, predict, solve)
from nngp_dask.cli import main

ROOT = Path(__file__).resolve().parents[1]
QUICK = ROOT / "pipelines" / "quickstart.toml"
ARCH = Architecture(2, "relu", 1.6, 0.1)
SMALL = ["--set", "data.n_train=200", "--set", "data.n_test=40", "--set", "kernel.tile=128",
         "--set", "cluster.n_workers=1", "--no-progress", "--no-plots"]


# --- helpers ---------------------------------------------------------------------------------
def _files(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` with its content (the whole tree, to compare before and after)."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _victim(path: Path) -> Path:
    """A folder of someone's work: the issue's reproduction."""
    (path / "sub").mkdir(parents=True)
    (path / "sub" / "notes.txt").write_text("keep\n")
    (path / "thesis.tex").write_text("keep\n")
    return path


def _one_line_exit_2(capsys, argv: list[str], *expected: str) -> str:
    """``nngp-dask -q ARGV`` exits 2 with one line on stderr holding each of ``expected``."""
    assert main(["-q", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for text in expected:
        assert text in err, err
    return err


def _out(tmp_path: Path) -> list[str]:
    return ["--set", f"run.output={tmp_path / 'run'}"]


@contextlib.contextmanager
def _log_records():
    """Records of the ``nngp_dask`` logger (the CLI stops it propagating to the root's caplog)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("nngp_dask")
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


@pytest.fixture(scope="module")
def good_store(tmp_path_factory, inproc_client):
    """A complete kernel store with test inputs (copy it before changing it)."""
    rng = np.random.default_rng(14)
    path = tmp_path_factory.mktemp("good") / "k.zarr"
    build_kernel(ARCH, rng.standard_normal((60, 4)), path, x_test=rng.standard_normal((12, 4)), tile=32,
                 client=inproc_client, progress=False)
    return path


def _copy(store: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy.zarr"
    shutil.copytree(store, dst)
    return dst


def _edit_meta(store: Path, edit) -> None:
    g = zarr.open_group(str(store), mode="r+")
    meta = dict(g.attrs["nngp_dask"])
    edit(meta)
    g.attrs["nngp_dask"] = meta


# --- 1: nothing nngp-dask did not write is ever wiped ---------------------------------------
@pytest.mark.parametrize("overwrite", [False, True])
def test_build_refuses_a_folder_that_is_not_a_kernel_store(tmp_path, overwrite):
    victim = _victim(tmp_path / "victim")
    before = _files(victim)
    with pytest.raises(NotAKernelStoreError, match=r"victim' is a non-empty folder that is not an nngp-dask kernel "
                                                   r"store \(it holds 'sub', 'thesis.tex'\)") as err:
        build_kernel(ARCH, np.random.default_rng(0).random((100, 3)), victim, progress=False, overwrite=overwrite)
    assert isinstance(err.value, ValueError) and "\n" not in str(err.value)
    assert _files(victim) == before
    assert sorted(os.listdir(tmp_path)) == ["victim"]  # not even a lock file left beside it


def test_build_refuses_other_zarr_data_even_with_overwrite(tmp_path):
    g = zarr.open_group(str(tmp_path / "other.zarr"), mode="w")
    g.create_array("data", shape=(3,), dtype="f8")[:] = [1, 2, 3]
    before = _files(tmp_path / "other.zarr")
    with pytest.raises(NotAKernelStoreError, match="holds other Zarr data"):
        build_kernel(ARCH, np.ones((5, 2)), tmp_path / "other.zarr", progress=False, overwrite=True)
    assert _files(tmp_path / "other.zarr") == before


@pytest.mark.parametrize("where", ["store", "parent"])
def test_build_refuses_a_store_path_that_is_or_is_under_a_file(tmp_path, where):
    (tmp_path / "file").write_text("keep\n")
    store = tmp_path / "file" if where == "store" else tmp_path / "file" / "k.zarr"
    with pytest.raises(NotAKernelStoreError, match="is a file"):
        build_kernel(ARCH, np.ones((5, 2)), store, progress=False, overwrite=True)
    assert (tmp_path / "file").read_text() == "keep\n"


def test_estimator_refuses_a_folder_that_is_not_a_kernel_store(tmp_path):
    from nngp_dask.estimators import NNGPRegressor

    victim = _victim(tmp_path / "victim")
    before = _files(victim)
    rng = np.random.default_rng(1)
    with pytest.raises(NotAKernelStoreError, match="victim' is a non-empty folder"):
        NNGPRegressor(out_of_core=True, store=str(victim)).fit(rng.random((50, 3)), rng.random(50))
    assert _files(victim) == before


def test_cli_refuses_a_store_folder_that_is_not_a_kernel_store(tmp_path, capsys):
    victim = _victim(tmp_path / "run" / "victim")
    before = _files(victim)
    _one_line_exit_2(capsys, ["run", str(QUICK), *_out(tmp_path), *SMALL, "--set", "run.store=victim"],
                     "victim' is a non-empty folder that is not an nngp-dask kernel store")
    assert _files(victim) == before
    assert sorted(os.listdir(tmp_path / "run")) == ["victim"]  # refused before any work (no log, no lock)


def test_a_store_may_be_created_in_an_empty_folder(tmp_path, inproc_client):
    (tmp_path / "empty").mkdir()
    ks = build_kernel(ARCH, np.random.default_rng(2).random((20, 3)), tmp_path / "empty", client=inproc_client,
                      progress=False)
    assert ks.complete


# --- 2: NaN/Inf are refused before normalising, at their row and column ---------------------
@pytest.mark.parametrize("method", ["unit_norm", "standardize"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_inputs_refused_before_normalising(tmp_path, method, bad):
    x = np.random.default_rng(3).random((40, 5))
    x[17, 2] = bad
    with pytest.raises(InputError, match=r"x: row 17 holds NaN or Inf \(.*at column 2\)"):
        build_kernel(ARCH, x, tmp_path / "k.zarr", normalize=method, progress=False)
    assert not (tmp_path / "k.zarr").exists()
    with pytest.raises(InputError, match=r"row 17 holds NaN or Inf \(.*at column 2\)"):
        normalize(x, method)


def test_nonfinite_row_counts_from_the_start_of_a_long_input(tmp_path):
    x = np.random.default_rng(4).random((9000, 2))  # more rows than one streamed chunk
    x[8765, 1] = np.nan
    with pytest.raises(InputError, match=r"x_test: row 8765 holds NaN or Inf \(nan at column 1\)"):
        build_kernel(ARCH, x[:10], tmp_path / "k.zarr", x_test=x, normalize="unit_norm", progress=False)


def test_pipeline_names_the_row_of_a_nan_target(tmp_path, capsys):
    rng = np.random.default_rng(5)
    y = rng.random(40)
    y[17] = np.nan
    np.savez(tmp_path / "d.npz", x_train=rng.random((40, 3)), y_train=y, x_test=rng.random((9, 3)),
             y_test=rng.random(9))
    _one_line_exit_2(capsys, ["run", str(QUICK), *_out(tmp_path), *SMALL, "--set", "data.source=npz",
                              "--set", f"data.path={tmp_path / 'd.npz'}"],
                     "y_train: row 17 holds NaN or Inf")


def test_pipeline_names_the_row_and_column_of_the_csv_file(tmp_path, capsys):
    table = np.random.default_rng(6).random((40, 4))
    table[39, 1] = np.inf  # the file's last row: never row 39 of the training split
    np.savetxt(tmp_path / "d.csv", table, delimiter=",")
    _one_line_exit_2(capsys, ["run", str(QUICK), *_out(tmp_path), *SMALL, "--set", "data.source=csv",
                              "--set", f"data.path={tmp_path / 'd.csv'}", "--set", "data.normalize=unit_norm"],
                     "d.csv: row 39 holds NaN or Inf (inf at column 1)")


# --- 4: a kernel that overflows is refused, never stored ------------------------------------
@pytest.mark.parametrize("arch,scale,expected", [
    (Architecture(1000, "relu", 4.0), 1.0, r"overflows float32 \(3.4e\+38\) at layer 12\d of depth=1000 with "
                                           r"weight_var=4.0"),
    (Architecture(2), 1e160, "the inputs are too large"),
])
def test_kernel_refuses_to_overflow(arch, scale, expected):
    x = np.random.default_rng(7).random((30, 3)) * scale
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and no RuntimeWarning on the way
        with pytest.raises(KernelOverflowError, match=expected):
            kernel(arch, x)
        with pytest.raises(KernelOverflowError, match="non-finite"):
            kernel(arch, x[:10], x[10:])


def test_kernel_of_a_deep_net_in_float64_is_finite():
    k = kernel(Architecture(1000, "relu", 4.0), np.random.default_rng(8).random((10, 3)), dtype="float64")
    assert np.isfinite(k).all()  # 2^1000 fits in float64: only float32 storage overflows


@pytest.mark.parametrize("arch,scale", [(Architecture(1000, "relu", 4.0), 1.0), (ARCH, 1e160)])
def test_build_refuses_to_overflow_before_writing(tmp_path, good_store, arch, scale):
    x = np.random.default_rng(9).random((60, 4)) * scale
    with pytest.raises(KernelOverflowError, match="the kernel of x would hold non-finite values"):
        build_kernel(arch, x, tmp_path / "new.zarr", progress=False)
    assert not (tmp_path / "new.zarr").exists()
    store = _copy(good_store, tmp_path)  # an existing result with other settings, overwrite=True: kept
    before = _files(store)
    with pytest.raises(KernelOverflowError):
        build_kernel(arch, x, store, overwrite=True, progress=False)
    assert _files(store) == before and open_kernel(store).complete


def test_a_tile_with_non_finite_values_is_neither_stored_nor_recorded(tmp_path, inproc_client, monkeypatch):
    real = build_tasks.tile_fn

    def overflowing(arch, xr, xc, dr, dc, **kw):
        out = real(arch, xr, xc, dr, dc, **kw)
        if xr.shape[0] == 8 and xc.shape[0] == 8:  # the last, ragged tile (1, 1)
            out[:] = np.inf
        return out

    monkeypatch.setattr(build_tasks, "tile_fn", overflowing)
    x = np.random.default_rng(10).random((40, 3))
    with pytest.raises(KernelOverflowError, match=r"kernel/train_train tile \(1, 1\) has non-finite values: .*"
                                                  r"depth=2, weight_var=1.6"):
        build_kernel(ARCH, x, tmp_path / "k.zarr", tile=32, client=inproc_client, progress=False)
    ks = open_kernel(tmp_path / "k.zarr")
    assert ks.missing_tiles() == [(1, 1)] and not ks.complete
    assert np.isnan(ks.array("kernel/train_train")[32:, 32:]).all()  # nothing written there


def test_cli_overflow_is_one_line_exit_2(tmp_path, capsys):
    _one_line_exit_2(capsys, ["kernel", str(QUICK), *_out(tmp_path), *SMALL, "--set", "architecture.depth=1000",
                              "--set", "architecture.weight_var=4"],
                     "depth=1000", "weight_var=4.0")
    assert not (tmp_path / "run" / "kernel.zarr").exists()


# --- 7: damaged data files are one line naming the file -------------------------------------
def _truncated(path: Path, keep: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


@pytest.mark.parametrize("case", ["npz", "npz_compressed", "csv_gz", "csv_gz_not_gzip", "npy"])
def test_damaged_data_file_is_one_line_exit_2(tmp_path, capsys, case):
    rng = np.random.default_rng(11)
    parts = {"x_train": rng.random((300, 8)), "y_train": rng.random(300), "x_test": rng.random((30, 8)),
             "y_test": rng.random(30)}
    if case.startswith("npz"):
        bad = tmp_path / "d.npz"
        (np.savez_compressed if case == "npz_compressed" else np.savez)(bad, **parts)
        _truncated(bad)
        args, name = ["--set", "data.source=npz", "--set", f"data.path={bad}"], str(bad)
    elif case.startswith("csv"):
        bad = tmp_path / "d.csv.gz"
        text = "\n".join(",".join(f"{v:.6f}" for v in row) for row in rng.random((3000, 5)))
        if case == "csv_gz":
            with gzip.open(bad, "wt") as f:
                f.write(text)
            _truncated(bad)
        else:
            bad.write_text(text)  # named .gz, but plain text
        args, name = ["--set", "data.source=csv", "--set", f"data.path={bad}"], str(bad)
    else:
        folder = tmp_path / "npy"
        folder.mkdir()
        for key, value in parts.items():
            np.save(folder / f"{key}.npy", value)
        _truncated(folder / "x_train.npy")
        args, name = ["--set", "data.source=npy", "--set", f"data.path={folder}", "--set", "data.x_train=x_train.npy",
                      "--set", "data.y_train=y_train.npy", "--set", "data.x_test=x_test.npy",
                      "--set", "data.y_test=y_test.npy"], str(folder / "x_train.npy")
    _one_line_exit_2(capsys, ["run", str(QUICK), *_out(tmp_path), *SMALL, *args], name, "cannot be read")


# --- 8: non-finite numbers in a pipeline file -----------------------------------------------
@pytest.mark.parametrize("override,key", [
    ("solver.noise=inf", "solver.noise"),
    ("solver.tol=nan", "solver.tol"),
    ("architecture.weight_var=nan", "architecture.weight_var"),
    ("architecture.bias_var=inf", "architecture.bias_var"),
    ("data.test_fraction=nan", "data.test_fraction"),
])
@pytest.mark.parametrize("command", ["validate", "run"])
def test_nonfinite_config_numbers_refused(tmp_path, capsys, override, key, command):
    _one_line_exit_2(capsys, [command, str(QUICK), *_out(tmp_path), "--set", override],
                     f"{key}: expected a finite number, got")
    assert not (tmp_path / "run").exists()  # before any work


# --- 9: the rest ----------------------------------------------------------------------------
def test_a_tile_larger_than_the_kernel_is_one_tile(tmp_path, inproc_client):
    x = np.random.default_rng(12).random((50, 3))
    ks = build_kernel(ARCH, x, tmp_path / "k.zarr", x_test=x[:7], tile=1_000_000_000, client=inproc_client,
                      progress=False)
    assert ks.tile == 50 and ks.complete
    np.testing.assert_allclose(ks.to_dask().compute(), kernel(ARCH, x), rtol=2e-6)


def test_output_path_that_is_a_file(tmp_path, capsys):
    (tmp_path / "out").write_text("keep\n")
    _one_line_exit_2(capsys, ["run", str(QUICK), "--set", f"run.output={tmp_path / 'out'}", *SMALL],
                     "run.output:", "is a file; expected a folder")
    assert (tmp_path / "out").read_text() == "keep\n"


def test_inspect_path_that_is_a_file(tmp_path, capsys):
    (tmp_path / "f").write_text("keep\n")
    _one_line_exit_2(capsys, ["inspect", str(tmp_path / "f")], "is a file, not a kernel store")


def _extra_field(store: Path) -> None:
    _edit_meta(store, lambda m: m.update(identity={**m["identity"], "colour": "blue"}))


def _missing_field(store: Path) -> None:
    _edit_meta(store, lambda m: m.update(identity={k: v for k, v in m["identity"].items() if k != "features"}))


def _garbage(store: Path) -> None:
    (store / "zarr.json").write_text("{ this is not json")


@pytest.mark.parametrize("damage,expected", [
    (_extra_field, "its identity has unexpected field(s) ['colour']"),
    (_missing_field, "its identity has missing field(s) ['features']"),
    (_garbage, "its zarr.json cannot be read"),
])
def test_unreadable_store_is_named_not_a_type_error(tmp_path, capsys, good_store, damage, expected):
    store = _copy(good_store, tmp_path)
    damage(store)
    before = _files(store)
    with pytest.raises(NotAKernelStoreError, match="not a valid nngp-dask kernel store") as err:
        open_kernel(store)
    assert expected in str(err.value)
    _one_line_exit_2(capsys, ["inspect", str(store)], "not a valid nngp-dask kernel store")
    with pytest.raises(NotAKernelStoreError):  # a build never replaces it without overwrite
        build_kernel(ARCH, np.ones((5, 4)), store, progress=False)
    assert _files(store) == before


def test_empty_split_is_refused_without_runtime_warnings(tmp_path, capsys):
    np.savez(tmp_path / "d.npz", x_train=np.empty((0, 3)), y_train=np.empty(0), x_test=np.ones((4, 3)),
             y_test=np.ones(4))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _one_line_exit_2(capsys, ["run", str(QUICK), *_out(tmp_path), *SMALL, "--set", "data.source=npz",
                                  "--set", f"data.path={tmp_path / 'd.npz'}"], "the train split is empty")
    assert [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)] == []


def test_solve_checkpoint_every_zero(good_store):
    with pytest.raises(ValueError, match="checkpoint_every: expected an integer >= 1 .*got 0"):
        solve(good_store, np.ones(60), noise=0.1, method="cg", checkpoint_every=0, progress=False)


def test_kernel_with_a_name_instead_of_an_architecture():
    with pytest.raises(TypeError, match="arch: expected an Architecture .*got str 'relu'"):
        kernel("relu", np.ones((3, 2)))
    with pytest.raises(TypeError, match="arch: expected an Architecture"):
        nngp_dask.diagonals("relu", np.ones((3, 2)))


def test_predict_with_an_array_instead_of_a_solve(good_store):
    with pytest.raises(TypeError, match="result: expected the SolveResult of nngp_dask.solve .*got ndarray"):
        predict(good_store, np.ones(60))
    with pytest.raises(TypeError, match="store: expected a KernelStore or a store path/URL, got ndarray"):
        solve(np.ones((60, 60)), np.ones(60), noise=0.1)


@pytest.mark.parametrize("command", ["validate", "run"])
def test_tls_address_without_a_cluster_file(tmp_path, capsys, command):
    import dask

    with dask.config.set({"distributed.comm.tls.ca-file": None, "distributed.comm.tls.client.cert": None}):
        _one_line_exit_2(capsys, [command, str(QUICK), *_out(tmp_path), "--set",
                                  "cluster.address=tls://127.0.0.1:8786"],
                         "cluster.address: 'tls://127.0.0.1:8786'", "a cluster file with a [tls] table")
    assert not (tmp_path / "run").exists()


def test_store_of_another_version_is_named(tmp_path, good_store):
    assert open_kernel(good_store).meta["version"] == nngp_dask.__version__  # recorded when written
    store = _copy(good_store, tmp_path)
    _edit_meta(store, lambda m: m.update(version="0.0.1"))
    with _log_records() as records:
        open_kernel(store)
        open_kernel(store)  # once per process
    lines = [r.getMessage() for r in records if r.levelno == logging.WARNING]
    assert len(lines) == 1 and "nngp-dask 0.0.1" in lines[0] and f"nngp-dask {nngp_dask.__version__}" in lines[0]


def test_refusals_are_value_errors_for_the_cli():
    assert issubclass(NotAKernelStoreError, StoreMismatchError) and issubclass(KernelOverflowError, ValueError)
    assert {"NotAKernelStoreError", "KernelOverflowError"} <= set(nngp_dask.__all__)


def test_build_refuses_a_store_that_will_not_fit_before_writing(tmp_path, monkeypatch, inproc_client):
    """The disk is made to look nearly full (a real full disk cannot be arranged in a test): the
    build names what it needs and what is free, and writes nothing."""
    from collections import namedtuple

    import nngp_dask.store.layout as layout

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(layout.shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 20_000, 20_000))
    x = np.random.default_rng(3).random((100, 4))
    with pytest.raises(OSError, match=r"store: 10 kernel tile\(s\) of 32 x 32 float32: 40.04 kiB needed at .*, "
                                      r"19.53 kiB free on its disk; free space"):
        build_kernel(ARCH, x, tmp_path / "k.zarr", tile=32, client=inproc_client, progress=False)
    assert not (tmp_path / "k.zarr").exists()
    monkeypatch.undo()
    assert build_kernel(ARCH, x, tmp_path / "k.zarr", tile=32, client=inproc_client,
                        progress=False).complete
