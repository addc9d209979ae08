"""End-to-end pipelines through the CLI: quickstart, idempotence, resume after SIGKILL, bad configs."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from nngp_dask.cli import main
from nngp_dask.pipeline import SCHEMA, ConfigError, load_config, resolve
from nngp_dask.store import store_lock

from .probes import solve_iteration

ROOT = Path(__file__).resolve().parents[1]
QUICK = ROOT / "pipelines" / "quickstart.toml"
SMALL = ["--set", "data.n_train=600", "--set", "data.n_test=80", "--set", "kernel.tile=256",
         "--set", "cluster.n_workers=1", "--no-progress"]


def _out(tmp_path: Path) -> list[str]:
    return ["--set", f"run.output={tmp_path / 'run'}"]


def _report(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "run" / "report.json").read_text())


def test_quickstart_idempotent_and_noise_change_reruns_only_solve(tmp_path, capsys):
    assert main(["-q", "run", str(QUICK), *SMALL, *_out(tmp_path)]) == 0
    first = _report(tmp_path)
    assert first["metrics"]["srmse"] < 0.8 and np.isfinite(first["metrics"]["nlpd"])
    assert all(first["stages"][s]["did_work"] for s in ("kernel", "solve", "predict"))
    assert first["metrics"]["nlpd"] <= first["metrics"]["nlpd_unfitted"] and first["metrics"]["amplitude"] > 0
    for fig in ("cg_residuals.png", "kernel_heatmap.png", "predicted_vs_true.png", "calibration.png",
                "reliability.png"):
        assert fig in first["figures"] and (tmp_path / "run" / fig).stat().st_size > 1000
    assert (tmp_path / "run" / "run.log").read_text().count("stage kernel") >= 1
    assert "srmse" in capsys.readouterr().out

    assert main(["-q", "run", str(QUICK), *SMALL, *_out(tmp_path), "--no-plots"]) == 0
    again = _report(tmp_path)
    assert not any(again["stages"][s]["did_work"] for s in ("kernel", "solve", "predict"))
    assert again["metrics"] == first["metrics"]
    for s in ("kernel", "solve", "predict"):  # the times of the run that did the work, marked as such
        assert again["stages"][s]["seconds"] == first["stages"][s]["seconds"] > 0
        assert again["stages"][s]["status"] == "up to date" and again["stages"][s]["ran_at"] == first["started"]
        assert first["stages"][s]["status"] == "ran" and first["stages"][s]["ran_at"] == first["started"]
    tiles = [r["stages"]["kernel"]["detail"]["tiles_computed"] for r in (first, again)]
    assert tiles[0] == tiles[1] > 0
    assert f"up to date (time of the run of {first['started']})" in capsys.readouterr().out
    assert main(["inspect", str(tmp_path / "run" / "kernel.zarr")]) == 0
    shown = capsys.readouterr().out
    assert re.search(r"kernel_bytes: \d+\.\d\d (kB|MB|GB) \([\d,]+ bytes\)", shown), shown
    assert re.search(r"created: \d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d", shown), shown

    # the kernel as built: only the scores change, nothing is re-solved or re-predicted
    assert main(["-q", "run", str(QUICK), *SMALL, *_out(tmp_path), "--no-plots",
                 "--set", "solver.fit_amplitude=false"]) == 0
    unfitted = _report(tmp_path)
    assert not any(unfitted["stages"][s]["did_work"] for s in ("kernel", "solve", "predict"))
    assert "amplitude" not in unfitted["metrics"]
    assert unfitted["metrics"]["nlpd"] == pytest.approx(first["metrics"]["nlpd_unfitted"])
    assert first["metrics"]["noise_variance"] == pytest.approx(  # in the targets' units, scaled like the kernel
        first["metrics"]["amplitude"] * unfitted["metrics"]["noise_variance"])

    assert main(["-q", "run", str(QUICK), *SMALL, *_out(tmp_path), "--set", "solver.noise=0.05", "--no-plots"]) == 0
    changed = _report(tmp_path)
    assert not changed["stages"]["kernel"]["did_work"]
    assert changed["stages"]["solve"]["did_work"] and changed["stages"]["predict"]["did_work"]
    assert changed["metrics"] != first["metrics"]


@pytest.mark.slow  # four whole pipeline runs
def test_exact_dense_variances_make_an_auto_solve_a_cholesky_sharing_its_factor(tmp_path, monkeypatch):
    import nngp_dask.gp.regression as regression

    monkeypatch.setattr(regression, "DIRECT_MAX_N", 100)  # "auto" alone would take CG for these 600 points
    assert main(["-q", "run", str(QUICK), *SMALL, *_out(tmp_path), "--no-plots", "--set", "solver.method=auto",
                 "--set", "predict.variance=auto"]) == 0
    rep = _report(tmp_path)
    assert rep["stages"]["solve"]["detail"]["method"] == "cholesky"
    assert "exact variances from the same factor" in (tmp_path / "run" / "run.log").read_text()
    predict_detail = rep["stages"]["predict"]["detail"]
    assert predict_detail["variance"] == "dense" and predict_detail["extrapolation"]["test_points"] == 0
    assert 0.9 < rep["metrics"]["coverage"]["observed"][rep["metrics"]["coverage"]["levels"].index(0.95)] <= 1


def test_new_data_or_changed_architecture_rebuilds_the_kernel(tmp_path):
    assert main(["-q", "run", str(QUICK), *SMALL, *_out(tmp_path), "--no-plots"]) == 0
    first = _report(tmp_path)
    assert main(["-q", "run", str(QUICK), *SMALL, *_out(tmp_path), "--no-plots", "--set", "data.n_train=700"]) == 0
    more = _report(tmp_path)  # new data appended: a new input fingerprint
    assert more["stages"]["kernel"]["did_work"] and more["kernel"]["n_train"] == 700
    assert more["stages"]["kernel"]["fingerprint"] != first["stages"]["kernel"]["fingerprint"]
    assert main(["-q", "run", str(QUICK), *SMALL, *_out(tmp_path), "--no-plots", "--set", "data.n_train=700",
                 "--set", "architecture.depth=2"]) == 0
    changed = _report(tmp_path)
    assert changed["stages"]["kernel"]["did_work"] and changed["kernel"]["architecture"]["depth"] == 2


def test_classification_pipeline(tmp_path):
    assert main(["-q", "run", str(QUICK), *SMALL, *_out(tmp_path), "--set", "run.task=classification",
                 "--set", "predict.variance=lowrank"]) == 0
    rep = _report(tmp_path)
    assert rep["metrics"]["accuracy"] > 0.45  # 3 balanced classes: chance is 1/3
    assert "confusion_matrix.png" in rep["figures"] and "reliability.png" in rep["figures"]
    assert sum(map(sum, rep["metrics"]["confusion"])) == 80
    # uncertainty scores of the regressed one-hot targets
    assert np.isfinite(rep["metrics"]["nlpd"]) and len(rep["metrics"]["coverage"]["observed"]) == 11


def _spawn(tmp_path: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "nngp_dask.cli", "-q", "run", str(QUICK), "--no-plots", "--no-progress",
           *_out(tmp_path), *extra]
    return subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
        try:
            if ready():
                break
        except Exception:
            continue
    os.killpg(proc.pid, signal.SIGKILL)  # driver and its workers: a crashed node
    proc.wait()


@pytest.mark.slow
def test_resume_after_sigkill_in_kernel_and_solve(tmp_path):
    store = tmp_path / "run" / "kernel.zarr"
    args = ("--set", "data.n_train=1000", "--set", "data.n_test=50", "--set", "kernel.tile=64",
            # ~150 CG iterations (~500 without the preconditioner): time to land a kill, not more
            "--set", "solver.noise=1e-5", "--set", "solver.tol=1e-9", "--set", "solver.preconditioner=pivoted_cholesky",
            "--set", "solver.rank=128",
            "--set", "solver.checkpoint_every=2", "--set", "predict.variance=none", "--set", "cluster.n_workers=1")
    done = lambda: int(zarr.open_group(str(store), mode="r")["done/train_train"][...].sum())  # noqa: E731
    _kill_when(_spawn(tmp_path, *args), lambda: done() >= 30)
    total = 16 * 17 // 2
    killed_at = done()
    assert 30 <= killed_at < total, "the kill did not land mid-build"

    _kill_when(_spawn(tmp_path, *args), lambda: solve_iteration(store) >= 6)
    stopped_at = solve_iteration(store)
    assert stopped_at >= 6, "the kill did not land mid-solve"
    assert main(["-q", "run", str(QUICK), "--no-plots", "--no-progress", *_out(tmp_path), *args]) == 0
    rep = _report(tmp_path)
    kernel = rep["stages"]["kernel"]
    assert not kernel["did_work"]  # finished by the second run, which was killed before any report:
    assert kernel["ran_at"] != rep["started"] and kernel["seconds"] > kernel["this_run_s"]  # its time is kept
    assert rep["stages"]["solve"]["detail"]["resumed_from"] >= stopped_at - 2
    assert rep["stages"]["solve"]["detail"]["converged"]


def test_concurrent_run_refused(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    with store_lock(str(tmp_path / "run" / "pipeline")):
        assert main(["run", str(QUICK), *SMALL, *_out(tmp_path)]) == 75  # EX_TEMPFAIL: try again later
    assert "locked by pid" in capsys.readouterr().err


@pytest.mark.parametrize("override,message", [
    ("solver.noise=-1", "solver.noise: expected a number >= 0.0, got -1"),
    ("solver.nosie=1", "solver.nosie: unknown key"),
    ("architecture.depth=2.5", "architecture.depth: expected an integer, got float 2.5"),
    ("architecture.activation=swish", "architecture.activation: expected one of"),
    ("kernel.dtype=float16", "kernel.dtype: expected one of ['float32', 'float64', 'int16']"),
    ("kernel.page_cache=never", "kernel.page_cache: expected one of ['auto', 'keep', 'drop'], got 'never'"),
    ("report.plots=1", "report.plots: expected true or false"),
    ("run.store=../escape.zarr", "run.store: expected a path inside run.output"),
    ("data.path=${NNGP_DASK_SURELY_UNSET}", "data.path: environment variable NNGP_DASK_SURELY_UNSET is not set"),
    ("bogus.key=1", "bogus: unknown section"),
    ("data.augment=rotate", "data.augment: expected one of ['none', 'shift'], got 'rotate'"),
    ("data.augment_copies=0", "data.augment_copies: expected"),
    ("data.validation=-1", "data.validation: expected"),
])
def test_bad_configuration_is_one_line_exit_2(tmp_path, capsys, override, message):
    assert main(["run", str(QUICK), *_out(tmp_path), "--set", override]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()  # refused before any work


def test_bad_data_refused_and_existing_results_intact(tmp_path, capsys):
    assert main(["-q", "run", str(QUICK), *SMALL, *_out(tmp_path), "--no-plots"]) == 0
    before = (tmp_path / "run" / "report.json").read_bytes()
    bad = tmp_path / "bad.csv"
    bad.write_text("1,2,3\n4,nan,6\n7,8,9\n1,1,1\n")
    assert main(["-q", "run", str(QUICK), *_out(tmp_path), "--set", "data.source=csv",
                 "--set", f"data.path={bad}", "--set", "data.test_fraction=0.25"]) == 2
    assert "holds NaN or Inf" in capsys.readouterr().err
    assert (tmp_path / "run" / "report.json").read_bytes() == before
    assert main(["-q", "run", str(QUICK), *SMALL, *_out(tmp_path), "--set", "data.validation=1000000"]) == 2
    err = capsys.readouterr().err.strip()
    assert "data.validation: expected fewer than the" in err and len(err.splitlines()) == 1
    assert (tmp_path / "run" / "report.json").read_bytes() == before


def test_validate_inspect_and_schema(tmp_path, capsys):
    assert main(["validate", str(QUICK), "--set", "solver.noise=0.5"]) == 0
    assert "noise = 0.5" in capsys.readouterr().out
    assert main(["validate", "--schema"]) == 0
    text = capsys.readouterr().out
    assert all(f"[{s}]" in text for s in SCHEMA)
    assert main(["-q", "kernel", str(QUICK), *SMALL, *_out(tmp_path)]) == 0
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "run" / "kernel.zarr"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["tiles_train_train"] == "6/6" and info["n_train"] == 600


def test_shipped_pipelines_validate(monkeypatch):
    monkeypatch.setenv("NNGP_DASK_DATA", "/data")
    for path in (ROOT / "pipelines").glob("*.toml"):
        cfg = load_config(path)
        assert cfg["run"]["name"]
    with pytest.raises(ConfigError, match="run.task"):
        resolve({"run": {"task": "ranking"}})


def test_console_script_exit_codes(tmp_path):
    ok = subprocess.run([sys.executable, "-m", "nngp_dask.cli", "validate", str(QUICK)], capture_output=True, text=True)
    assert ok.returncode == 0
    bad = subprocess.run([sys.executable, "-m", "nngp_dask.cli", "validate", str(tmp_path / "missing.toml")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "does not exist" in bad.stderr
