"""Pipeline files: a documented TOML schema, validated with the key's dotted path in every error.

A pipeline file is data, never code. :data:`SCHEMA` is the single source of truth: defaults,
types, allowed values and the one-line documentation printed by ``nngp-dask validate --schema``.
``${VAR}`` in string values is replaced from the environment (unset variables are an error).
"""

from __future__ import annotations

import copy
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..fields import ConfigError, Field, expand_env
from ..kernels import ACTIVATIONS, NORMALIZATIONS
from ..linalg import PRECONDITIONERS
from ..store import POLICIES as PAGE_CACHE_POLICIES, is_remote
from ..tomlfile import read_toml, to_toml

__all__ = ["ConfigError", "SCHEMA", "load_config", "parse_overrides", "resolve", "schema_text", "to_toml"]


SCHEMA: dict[str, dict[str, Field]] = {
    "run": {
        "name": Field(str, "run", "name used in logs and the report"),
        "task": Field(str, "regression", "regression (RMSE, SRMSE, NLPD) or classification (regression on one-hot "
                      "targets, as Lee et al. 2018)", choices=("regression", "classification")),
        "output": Field(str, "runs/${name}", "directory of the run: kernel store, report.json, run.log, figures",
                        path=True),
        "store": Field(str, "kernel.zarr", "kernel store, relative to output (no '..'), or an fsspec URL "
                       "such as s3://bucket/run.zarr"),
        "seed": Field(int, 0, "seed for synthetic data and splits", minimum=0),
    },
    "data": {
        "source": Field(str, "synthetic", "synthetic | npz | npy | idx | csv | zarr",
                        choices=("synthetic", "npz", "npy", "idx", "csv", "zarr")),
        "path": Field(str, "", "npz/csv/zarr file, or the directory of npy/idx files", path=True),
        "x_train": Field(str, "x_train", "npz key, or file name (npy/idx) relative to path; a glob "
                          "(x_*.npy) concatenates its files by rows in file-name order"),
        "y_train": Field(str, "y_train", "npz key, or file name (npy/idx) relative to path; a glob "
                          "(x_*.npy) concatenates its files by rows in file-name order"),
        "x_test": Field(str, "x_test", "npz key, or file name (npy/idx) relative to path; a glob "
                          "(x_*.npy) concatenates its files by rows in file-name order"),
        "y_test": Field(str, "y_test", "npz key, or file name (npy/idx) relative to path; a glob "
                          "(x_*.npy) concatenates its files by rows in file-name order"),
        "target": Field(int, -1, "csv: index of the target column (negative counts from the end)"),
        "test_fraction": Field(float, 0.1, "csv: fraction held out for testing (random, seeded by run.seed)",
                               minimum=0.0, exclusive_minimum=True),
        "test_mask": Field(str, "", "csv: optional file of 0/1 rows marking the test rows (overrides "
                           "test_fraction)", path=True),
        "split": Field(int, 0, "csv: which column of test_mask to use (the standard splits)", minimum=0),
        "limit_train": Field(int, 0, "use only the first N training points (0: all)", minimum=0),
        "limit_test": Field(int, 0, "use only the first N test points (0: all)", minimum=0),
        "normalize": Field(str, "unit_norm", "per-example input normalisation", choices=NORMALIZATIONS),
        "n_train": Field(int, 2000, "synthetic: training points", minimum=1),
        "n_test": Field(int, 500, "synthetic: test points", minimum=1),
        "features": Field(int, 8, "synthetic: input dimension", minimum=1),
        "target_noise": Field(float, 0.05, "synthetic: standard deviation of the target noise", minimum=0.0),
    },
    "architecture": {
        "depth": Field(int, 3, "hidden layers L", minimum=0),
        "activation": Field(str, "relu", "activation name", choices=tuple(ACTIVATIONS)),
        "weight_var": Field(float, 1.6, "weight variance sigma_w^2 (weights ~ N(0, weight_var / fan_in))",
                            minimum=0.0, exclusive_minimum=True),
        "bias_var": Field(float, 0.1, "bias variance sigma_b^2", minimum=0.0),
    },
    "kernel": {
        "kind": Field(str, "nngp", "nngp (Bayesian posterior) or ntk (gradient-descent training)",
                      choices=("nngp", "ntk")),
        "tile": Field(int, 2048, "tile edge", minimum=1),
        "dtype": Field(str, "float32", "storage precision", choices=("float32", "float64")),
        "page_cache": Field(str, "auto", "keep written tiles in the OS page cache (keep), drop them once on disk "
                            "(drop), or drop them when the kernel exceeds half the host's memory (auto)",
                            choices=PAGE_CACHE_POLICIES),
    },
    "solver": {
        "noise": Field(float, 0.01, "observation noise variance added to the kernel diagonal", minimum=0.0),
        "tol": Field(float, 1e-4, "relative residual per right-hand side", minimum=0.0, exclusive_minimum=True),
        "maxiter": Field(int, 0, "CG iteration cap (0: automatic)", minimum=0),
        "preconditioner": Field(str, "auto", "CG preconditioner", choices=PRECONDITIONERS),
        "rank": Field(int, 1024, "rank of a low-rank preconditioner", minimum=1),
        "method": Field(str, "auto", "auto (Cholesky up to 5000 points, CG above), cg or cholesky",
                        choices=("auto", "cg", "cholesky")),
        "checkpoint_every": Field(int, 5, "CG iterations between checkpoints", minimum=1),
        "allow_unconverged": Field(bool, False, "finish with exit code 0 when CG stops before tol (default: the run "
                                   "completes, then the CLI exits 3)"),
    },
    "predict": {
        "variance": Field(str, "auto", "predictive variance: none, auto, exact or lowrank",
                          choices=("none", "auto", "exact", "lowrank")),
    },
    "report": {
        "plots": Field(bool, True, "write PNG figures beside report.json (needs matplotlib)"),
        "heatmap_points": Field(int, 400, "points in the kernel heat map", minimum=2),
    },
    "cluster": {
        "address": Field(str, "local", "local (embedded cluster), a scheduler address, or a cluster file"),
        "n_workers": Field(int, 0, "local: worker processes (0: one per core)", minimum=0),
        "threads_per_worker": Field(int, 1, "local: threads per worker process", minimum=1),
        "memory_limit": Field(str, "", "local: memory limit per worker, e.g. '8GiB' (empty: automatic)"),
        "secure": Field(bool, True, "local: mutual TLS between driver and workers, so no other local user can connect "
                        "(false: plain TCP on 127.0.0.1, 5-20 % faster CG passes; for single-user machines)"),
    },
}

def _coerce_override(text: str) -> Any:
    """``--set`` values are TOML scalars (``3``, ``1e-3``, ``true``, ``"s"``); bare words are strings."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``["solver.noise=1e-3", ...]`` -> ``{"solver.noise": 0.001, ...}``."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            raise ConfigError(f"--set: expected section.key=value, got {item!r}")
        out[key.strip()] = _coerce_override(value.strip())
    return out


def resolve(raw: Mapping[str, Any], overrides: Mapping[str, Any] | None = None, *,
            base_dir: str | Path = ".") -> dict[str, dict[str, Any]]:
    """Validate a parsed pipeline against :data:`SCHEMA`, apply overrides and defaults,
    expand ``${VAR}``, and resolve relative paths against ``base_dir``."""
    data = copy.deepcopy(dict(raw))
    for dotted, value in (overrides or {}).items():
        section, _, key = dotted.partition(".")
        if not isinstance(data.setdefault(section, {}), dict):
            raise ConfigError(f"{section}: expected a table, got {data[section]!r}")
        data[section][key] = value
    out: dict[str, dict[str, Any]] = {}
    for section in data:
        if section not in SCHEMA:
            raise ConfigError(f"{section}: unknown section; expected one of {list(SCHEMA)}")
        if not isinstance(data[section], dict):
            raise ConfigError(f"{section}: expected a table, got {data[section]!r}")
        for key in data[section]:
            if key not in SCHEMA[section]:
                raise ConfigError(f"{section}.{key}: unknown key; expected one of {list(SCHEMA[section])}")
    for section, fields in SCHEMA.items():
        out[section] = {}
        for key, spec in fields.items():
            given = data.get(section, {}).get(key, spec.default)
            out[section][key] = spec.check(f"{section}.{key}", given)
    local = {"name": out["run"]["name"]}
    for section, fields in SCHEMA.items():
        for key, spec in fields.items():
            value = out[section][key]
            if isinstance(value, str):
                value = expand_env(f"{section}.{key}", value, local)
                if spec.path and value and not is_remote(value):
                    value = str((Path(base_dir) / Path(value).expanduser()).resolve())
                out[section][key] = value
    _check_store(out["run"]["store"])
    if out["cluster"]["address"].endswith(".toml"):  # a cluster file: validated now, not at the kernel stage
        from ..cluster import load_cluster_file

        load_cluster_file(out["cluster"]["address"])
    _check_tls_address(out["cluster"]["address"])
    if out["data"]["source"] != "synthetic" and not out["data"]["path"]:
        raise ConfigError(f"data.path: expected a file or directory for source {out['data']['source']!r}, got ''")
    if out["data"]["test_fraction"] >= 1:
        raise ConfigError(f"data.test_fraction: expected a number in (0, 1), got {out['data']['test_fraction']}")
    return out


def _check_tls_address(address: str) -> None:
    """A bare ``tls://`` scheduler address works only if Dask's own configuration holds the client
    certificates; otherwise it needs a cluster file with a ``[tls]`` table (checked before any
    cluster is contacted, instead of an ssl_context error from deep inside distributed)."""
    if not address.startswith("tls://"):
        return
    import dask.config

    tls = "distributed.comm.tls."
    if dask.config.get(tls + "ca-file", None) and dask.config.get(tls + "client.cert", None):
        return
    raise ConfigError(f"cluster.address: {address!r} is a tls:// address, which needs TLS certificates; expected a "
                      "cluster file with a [tls] table (ca_file, cert, key), e.g. --cluster "
                      "cluster/scheduler-tls.toml, or Dask's distributed.comm.tls settings")


def _check_store(store: str) -> None:
    """The store lives inside the run's output directory (or at a URL): no absolute paths,
    no '..' that would let a pipeline file write elsewhere."""
    if is_remote(store):
        if "@" in store.split("://", 1)[1].split("/", 1)[0]:  # not echoed: it would hold a secret
            raise ConfigError("run.store: expected a URL without credentials (user:secret@ would be written to "
                              "report.json and run.log); give them through the environment, e.g. "
                              "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE")
        return
    p = Path(store)
    if p.is_absolute() or ".." in p.parts or not store:
        raise ConfigError(f"run.store: expected a path inside run.output (no '..', not absolute) or a URL, "
                          f"got {store!r}")


def load_config(path: str | Path, overrides: Mapping[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """Read and validate a pipeline file (relative paths resolve against the current directory)."""
    return resolve(read_toml(path, "pipeline", ConfigError), overrides)


def schema_text() -> str:
    """The schema as commented TOML (``nngp-dask validate --schema``)."""
    lines = []
    for section, fields in SCHEMA.items():
        lines.append(f"[{section}]")
        for key, spec in fields.items():
            default = spec.default
            shown = f'"{default}"' if isinstance(default, str) else str(default).lower() if isinstance(default, bool) \
                else repr(default)
            lines.append(f"{key} = {shown:<14} # {spec.doc}")
        lines.append("")
    return "\n".join(lines)
