"""Batch and Kubernetes cluster files as shipped: the job-script one-liner on a fresh home
directory, submissions that fail at once, keys passed through to dask-jobqueue and
dask-kubernetes, and the deployment files (Dockerfile, manifests, sbatch script).

No batch system and no Kubernetes here: dask-jobqueue is real, and where a refused submission is
needed a stand-in ``sbatch`` prints SLURM's own error message and exits 1.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from nngp_dask.cluster import ClusterSubmitError, client_for, jobqueue_kwargs, kubernetes_kwargs, load_cluster_file
from nngp_dask.cluster.runtime import ClusterConfigError, resolve_cluster

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"


def _slurm_copy(tmp_path: Path, **changes: object) -> Path:
    """cluster/slurm.toml with the scheduler on loopback (tests bind nothing else) and ``changes``."""
    text = (CLUSTER / "slurm.toml").read_text()
    text = re.sub(r'^interface = ""', 'interface = "lo"', text, flags=re.M)
    text = re.sub(r'^dashboard_address = .*$', 'dashboard_address = "127.0.0.1:0"', text, flags=re.M)
    for key, value in changes.items():
        line = f"{key} = {value!r}".replace("'", '"')
        text, found = re.subn(rf"^{key} = .*$", line, text, flags=re.M)
        text += "" if found else line + "\n"
    path = tmp_path / "slurm.toml"
    path.write_text(text)
    return path


def _env(home: Path, path: str) -> dict[str, str]:
    return {**os.environ, "HOME": str(home), "PATH": path, "PYTHONPATH": str(ROOT)}


def test_job_script_one_liner_works_on_a_fresh_home(tmp_path):
    """cluster/README.md's command, run as written (the cluster file swapped for a loopback copy)."""
    pytest.importorskip("dask_jobqueue")
    block = re.search(r'^python -c "(from dask_jobqueue.*?)"$', (CLUSTER / "README.md").read_text(), re.M | re.S)
    code = block.group(1).replace("\\\n", "\n").replace("'cluster/slurm.toml'", repr(str(_slurm_copy(tmp_path))))
    home = tmp_path / "home"
    home.mkdir()
    out = subprocess.run([sys.executable, "-c", "\n".join(line.strip() for line in code.splitlines())],
                         cwd=ROOT, env=_env(home, os.environ["PATH"]), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "#SBATCH -p cpu" in out.stdout and "--tls-key" in out.stdout
    shared = home / ".nngp-dask" / "jobqueue"
    assert shared.is_dir() and oct(shared.stat().st_mode & 0o777) == "0o700"
    assert f"#SBATCH -e {home}/.nngp-dask/logs/slurm/" in out.stdout  # job logs: not in the repository


def test_run_without_sbatch_fails_at_once_and_writes_nothing_in_the_repository(tmp_path):
    pytest.importorskip("dask_jobqueue")
    home, empty = tmp_path / "home", tmp_path / "bin"
    home.mkdir()
    empty.mkdir()
    before = sorted(p.relative_to(ROOT) for p in CLUSTER.rglob("*"))
    out = subprocess.run([sys.executable, "-m", "nngp_dask", "run", "pipelines/quickstart.toml", "--no-plots",
                          "--cluster", "cluster/slurm.toml", "--set", f"run.output={tmp_path / 'run'}"],
                         cwd=ROOT, env=_env(home, str(empty)), capture_output=True, text=True, timeout=120)
    assert out.returncode == 1, out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("nngp-dask: failed: ClusterSubmitError: cluster/slurm.toml: cannot submit slurm jobs: "
                           "'sbatch' is not on PATH"), out.stderr
    assert "submitted" not in out.stderr and "waiting for" not in out.stderr
    assert sorted(p.relative_to(ROOT) for p in CLUSTER.rglob("*")) == before
    assert not [p for p in home.rglob("*") if "dask-jobqueue.worker" in p.name]


def test_refused_submission_fails_at_once_and_removes_its_tls_files(tmp_path, monkeypatch):
    pytest.importorskip("dask_jobqueue")
    home, bin_dir = tmp_path / "home", tmp_path / "bin"
    home.mkdir()
    bin_dir.mkdir()
    sbatch = bin_dir / "sbatch"
    sbatch.write_text('#!/bin/sh\necho "sbatch: error: invalid partition specified: cpu" >&2\nexit 1\n')
    sbatch.chmod(0o755)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    # a key dask-jobqueue does not take: one line naming the file, before any submission
    typo = _slurm_copy(tmp_path, core=4)
    with pytest.raises(TypeError, match=f"{re.escape(str(typo))}: core: not an option of SLURMCluster"):
        with client_for(typo):
            pass
    path = _slurm_copy(tmp_path, jobs=2, job_directives_skip=["--mem"])
    with pytest.raises(ClusterSubmitError, match="submitting slurm worker jobs failed: RuntimeError: .*"
                                                 "sbatch: error: invalid partition specified: cpu"):
        with client_for(path):
            pass
    shared = home / ".nngp-dask" / "jobqueue"
    assert shared.is_dir() and not list(shared.iterdir())  # the run's TLS folder is gone


def test_batch_and_kubernetes_keys_pass_through_owned_keys_checked(tmp_path, monkeypatch):
    dask_jobqueue = pytest.importorskip("dask_jobqueue")
    monkeypatch.setenv("NNGP_TEST_TEAM", "gp")
    raw = tomllib.loads(_slurm_copy(tmp_path).read_text()) | {
        "shared_temp_directory": str(tmp_path / "shared"), "log_directory": str(tmp_path / "logs"),
        "job_directives_skip": ["--mem", "-p"], "job_name": "nngp-${NNGP_TEST_TEAM}",
        "scheduler_options": {"idle_timeout": 60}}
    kw = jobqueue_kwargs(resolve_cluster(raw, base_dir=tmp_path, name="slurm.toml"))
    assert kw["job_directives_skip"] == ["--mem", "-p"] and kw["job_name"] == "nngp-gp"
    assert kw["scheduler_options"] == {"dashboard_address": "127.0.0.1:0", "idle_timeout": 60}
    with dask_jobqueue.SLURMCluster(**kw) as cluster:
        script = cluster.job_script()
    assert "#SBATCH --mem" not in script and "#SBATCH -p" not in script and "#SBATCH -J nngp-gp" in script
    assert "#SBATCH -t 04:00:00" in script  # the keys nngp-dask owns still apply
    with pytest.raises(ClusterConfigError, match="slurm.toml: cores: expected an integer"):
        resolve_cluster(raw | {"cores": "16"}, base_dir=tmp_path, name="slurm.toml")
    with pytest.raises(ClusterConfigError, match="slurm.toml: job_name: environment variable NNGP_SURELY_UNSET"):
        resolve_cluster(raw | {"job_name": "${NNGP_SURELY_UNSET}"}, base_dir=tmp_path, name="slurm.toml")
    kube = tomllib.loads((CLUSTER / "kubernetes.toml").read_text()) | {"port_forward_cluster_ip": True}
    assert kubernetes_kwargs(resolve_cluster(kube, base_dir=CLUSTER))["port_forward_cluster_ip"] is True
    # a finite default wait: a job that never starts does not hang the driver
    assert 0 < load_cluster_file(CLUSTER / "slurm.toml")["wait_timeout"] < float("inf")
    assert resolve_cluster({"type": "pbs", "cores": 4, "memory": "8GB"})["wait_timeout"] == 3600


def test_deployment_files_hold_together():
    yaml = pytest.importorskip("yaml")
    docs = list(yaml.safe_load_all((CLUSTER / "kubernetes" / "driver.yaml").read_text()))
    by_kind = {d["kind"]: d for d in docs}
    assert set(by_kind) == {"ServiceAccount", "Role", "RoleBinding", "Job"}
    account = by_kind["ServiceAccount"]["metadata"]["name"]
    binding = by_kind["RoleBinding"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account}]
    assert binding["roleRef"]["kind"] == "Role" and binding["roleRef"]["name"] == by_kind["Role"]["metadata"]["name"]
    dask_rule = next(r for r in by_kind["Role"]["rules"] if r["apiGroups"] == ["kubernetes.dask.org"])
    assert {"daskclusters", "daskworkergroups"} <= set(dask_rule["resources"])
    assert {"create", "delete", "patch", "watch"} <= set(dask_rule["verbs"])
    pod = by_kind["Job"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == account
    args = pod["containers"][0]["args"]
    assert (ROOT / args[args.index("--cluster") + 1]).is_file() and (ROOT / args[2]).is_file()
    # the image a driver runs holds dask-kubernetes, an extra pyproject declares
    install = re.search(r'pip install "\.\[([a-z0-9,]+)\]"', (CLUSTER / "Dockerfile").read_text()).group(1).split(",")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert "kubernetes" in install and set(install) <= set(extras)
    # SLURM opens --output before the script runs: no folder the script would have to make
    output = re.search(r"^#SBATCH --output=(\S+)", (CLUSTER / "slurm-pipeline.sbatch").read_text(), re.M).group(1)
    assert "/" not in output
