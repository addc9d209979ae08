"""Pipeline files: a documented TOML schema, validated with the key's dotted path in every error.

A pipeline file is data, never code. :data:`SCHEMA` is the single source of truth: defaults,
types, allowed values and the one-line documentation printed by ``nngp-dask validate --schema``.
``${VAR}`` in string values is replaced from the environment (unset variables are an error).
"""

from __future__ import annotations

import copy
import math
import os
import re
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .activations import ACTIVATIONS
from .inputs import NORMALIZATIONS
from .pagecache import POLICIES as PAGE_CACHE_POLICIES
from .preconditioners import PRECONDITIONERS
from .tomlfile import read_toml, to_toml

__all__ = ["ConfigError", "SCHEMA", "load_config", "parse_overrides", "resolve", "schema_text", "to_toml"]


class ConfigError(ValueError):
    """A pipeline file or override that does not match the schema."""


class _F:
    """One field: accepted types, default, allowed values or bounds, doc."""

    def __init__(self, types: type | tuple[type, ...], default: Any, doc: str, *, choices: Sequence[Any] | None = None,
                 minimum: float | None = None, exclusive_minimum: bool = False, path: bool = False) -> None:
        self.types = types if isinstance(types, tuple) else (types,)
        self.default, self.doc, self.choices = default, doc, choices
        self.minimum, self.exclusive_minimum, self.path = minimum, exclusive_minimum, path

    def check(self, dotted: str, value: Any) -> Any:
        if float in self.types and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(value, bool) and bool not in self.types:
            raise ConfigError(f"{dotted}: expected {self._type_name()}, got {value!r}")
        if not isinstance(value, self.types):
            raise ConfigError(f"{dotted}: expected {self._type_name()}, got {type(value).__name__} {value!r}")
        if isinstance(value, float) and not math.isfinite(value):  # NaN would pass every bound below
            raise ConfigError(f"{dotted}: expected a finite number, got {value!r}")
        if self.choices is not None and value not in self.choices:
            raise ConfigError(f"{dotted}: expected one of {list(self.choices)}, got {value!r}")
        if self.minimum is not None and (value < self.minimum or (self.exclusive_minimum and value == self.minimum)):
            op = ">" if self.exclusive_minimum else ">="
            raise ConfigError(f"{dotted}: expected a number {op} {self.minimum}, got {value!r}")
        return value

    def _type_name(self) -> str:
        names = {str: "a string", int: "an integer", float: "a number", bool: "true or false", list: "a list"}
        return " or ".join(names.get(t, t.__name__) for t in self.types)


SCHEMA: dict[str, dict[str, _F]] = {
    "run": {
        "name": _F(str, "run", "name used in logs and the report"),
        "task": _F(str, "regression", "regression (RMSE, SRMSE, NLPD) or classification (regression on one-hot "
                   "targets, as Lee et al. 2018)", choices=("regression", "classification")),
        "output": _F(str, "runs/${name}", "directory of the run: kernel store, report.json, run.log, figures",
                     path=True),
        "store": _F(str, "kernel.zarr", "kernel store, relative to output (no '..'), or an fsspec URL "
                    "such as s3://bucket/run.zarr"),
        "seed": _F(int, 0, "seed for synthetic data and splits", minimum=0),
    },
    "data": {
        "source": _F(str, "synthetic", "synthetic | npz | npy | idx | csv | zarr",
                     choices=("synthetic", "npz", "npy", "idx", "csv", "zarr")),
        "path": _F(str, "", "npz/csv/zarr file, or the directory of npy/idx files", path=True),
        "x_train": _F(str, "x_train", "npz key, or file name (npy/idx) relative to path"),
        "y_train": _F(str, "y_train", "npz key, or file name (npy/idx) relative to path"),
        "x_test": _F(str, "x_test", "npz key, or file name (npy/idx) relative to path"),
        "y_test": _F(str, "y_test", "npz key, or file name (npy/idx) relative to path"),
        "target": _F(int, -1, "csv: index of the target column (negative counts from the end)"),
        "test_fraction": _F(float, 0.1, "csv: fraction held out for testing (random, seeded by run.seed)",
                            minimum=0.0, exclusive_minimum=True),
        "test_mask": _F(str, "", "csv: optional file of 0/1 rows marking the test rows (overrides "
                        "test_fraction)", path=True),
        "split": _F(int, 0, "csv: which column of test_mask to use (the standard splits)", minimum=0),
        "limit_train": _F(int, 0, "use only the first N training points (0: all)", minimum=0),
        "limit_test": _F(int, 0, "use only the first N test points (0: all)", minimum=0),
        "normalize": _F(str, "unit_norm", "per-example input normalisation", choices=NORMALIZATIONS),
        "n_train": _F(int, 2000, "synthetic: training points", minimum=1),
        "n_test": _F(int, 500, "synthetic: test points", minimum=1),
        "features": _F(int, 8, "synthetic: input dimension", minimum=1),
        "target_noise": _F(float, 0.05, "synthetic: standard deviation of the target noise", minimum=0.0),
    },
    "architecture": {
        "depth": _F(int, 3, "hidden layers L", minimum=0),
        "activation": _F(str, "relu", "activation name", choices=tuple(ACTIVATIONS)),
        "weight_var": _F(float, 1.6, "weight variance sigma_w^2 (weights ~ N(0, weight_var / fan_in))",
                         minimum=0.0, exclusive_minimum=True),
        "bias_var": _F(float, 0.1, "bias variance sigma_b^2", minimum=0.0),
    },
    "kernel": {
        "kind": _F(str, "nngp", "nngp (Bayesian posterior) or ntk (gradient-descent training)",
                   choices=("nngp", "ntk")),
        "tile": _F(int, 2048, "tile edge", minimum=1),
        "dtype": _F(str, "float32", "storage precision", choices=("float32", "float64")),
        "page_cache": _F(str, "auto", "keep written tiles in the OS page cache (keep), drop them once on disk "
                         "(drop), or drop them when the kernel exceeds half the host's memory (auto)",
                         choices=PAGE_CACHE_POLICIES),
    },
    "solver": {
        "noise": _F(float, 0.01, "observation noise variance added to the kernel diagonal", minimum=0.0),
        "tol": _F(float, 1e-4, "relative residual per right-hand side", minimum=0.0, exclusive_minimum=True),
        "maxiter": _F(int, 0, "CG iteration cap (0: automatic)", minimum=0),
        "preconditioner": _F(str, "auto", "CG preconditioner", choices=PRECONDITIONERS),
        "rank": _F(int, 1024, "rank of a low-rank preconditioner", minimum=1),
        "method": _F(str, "auto", "auto (Cholesky up to 5000 points, CG above), cg or cholesky",
                     choices=("auto", "cg", "cholesky")),
        "checkpoint_every": _F(int, 5, "CG iterations between checkpoints", minimum=1),
        "allow_unconverged": _F(bool, False, "finish with exit code 0 when CG stops before tol (default: the run "
                                "completes, then the CLI exits 3)"),
    },
    "predict": {
        "variance": _F(str, "auto", "predictive variance: none, auto, exact or lowrank",
                       choices=("none", "auto", "exact", "lowrank")),
    },
    "report": {
        "plots": _F(bool, True, "write PNG figures beside report.json (needs matplotlib)"),
        "heatmap_points": _F(int, 400, "points in the kernel heat map", minimum=2),
    },
    "cluster": {
        "address": _F(str, "local", "local (embedded cluster), a scheduler address, or a cluster file"),
        "n_workers": _F(int, 0, "local: worker processes (0: one per core)", minimum=0),
        "threads_per_worker": _F(int, 1, "local: threads per worker process", minimum=1),
        "memory_limit": _F(str, "", "local: memory limit per worker, e.g. '8GiB' (empty: automatic)"),
        "secure": _F(bool, True, "local: mutual TLS between driver and workers, so no other local user can connect "
                     "(false: plain TCP on 127.0.0.1, 5-20 % faster CG passes; for single-user machines)"),
    },
}

_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _expand(dotted: str, value: str, local: Mapping[str, str]) -> str:
    def sub(m: re.Match) -> str:
        name = m.group(1)
        if name in local:
            return local[name]
        if name not in os.environ:
            raise ConfigError(f"{dotted}: environment variable {name} is not set (used as ${{{name}}})")
        return os.environ[name]

    return _ENV.sub(sub, value)


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
                value = _expand(f"{section}.{key}", value, local)
                if spec.path and value and "://" not in value:
                    value = str((Path(base_dir) / Path(value).expanduser()).resolve())
                out[section][key] = value
    _check_store(out["run"]["store"])
    if out["cluster"]["address"].endswith(".toml"):  # a cluster file: validated now, not at the kernel stage
        from .runtime import load_cluster_file

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
    if "://" in store:
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
