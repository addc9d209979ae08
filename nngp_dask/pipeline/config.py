"""Pipeline files: a documented TOML schema, validated with the key's dotted path in every error.

A pipeline file is data, never code. :data:`SCHEMA` is the single source of truth: defaults,
types, allowed values and the one-line documentation printed by ``nngp-dask validate --schema``.
``${VAR}`` in string values is replaced from the environment (unset variables are an error).
"""

from __future__ import annotations

import copy
import math
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .. import defaults
from ..fields import ConfigError, Field, expand_env
from ..gp import METHODS
from ..kernels import ACTIVATION_PARAMETERS, ACTIVATIONS, NORMALIZATIONS, get_activation
from ..linalg import PRECONDITIONERS
from ..store import POLICIES as PAGE_CACHE_POLICIES, STORE_DTYPES, is_remote
from ..tomlfile import read_toml, to_toml

__all__ = ["ConfigError", "SCHEMA", "load_config", "parse_overrides", "resolve", "schema_text", "to_toml"]


def _activation(dotted: str, value: str | dict) -> str | dict:
    """An activation name, or a table of its name and parameters, checked now (one line naming the
    parameter) rather than when the kernel stage builds the architecture."""
    try:
        get_activation(value)
    except (ValueError, TypeError) as exc:
        text = str(exc)
        raise ConfigError(f"{dotted}{text[len('activation'):]}" if text.startswith("activation") else
                          f"{dotted}: {text}") from None
    return value


def _parameters_doc() -> str:
    """``leaky_relu: slope; two_slope: ...; tanh, sigmoid, ...: degree, nodes`` (names sharing parameters grouped)."""
    by_params: dict[tuple[str, ...], list[str]] = {}
    for name, params in ACTIVATION_PARAMETERS.items():
        if params:
            by_params.setdefault(params, []).append(name)
    return "; ".join(f"{', '.join(names)}: {', '.join(params)}" for params, names in by_params.items())


_PARAMETRISED = _parameters_doc()

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
        "validation": Field(int, 0, "hold out the last N training points (after limit_train) and use them "
                            "instead of the test set: model selection that never sees the test set (0: off)",
                            minimum=0),
        "augment": Field(str, "none", "label-preserving augmentation of the training images: none | shift "
                         "(copies translated by a few pixels, generated as they are read, never stored)",
                         choices=("none", "shift")),
        "augment_copies": Field(int, 1, "shift: translated copies of each training image", minimum=1),
        "augment_shift": Field(int, 1, "shift: the largest translation in pixels along each axis (each copy's "
                               "offset drawn at random, seeded by run.seed, never (0, 0))", minimum=1),
        "normalize": Field(str, "unit_norm", "per-example input normalisation", choices=NORMALIZATIONS),
        "n_train": Field(int, 2000, "synthetic: training points", minimum=1),
        "n_test": Field(int, 500, "synthetic: test points", minimum=1),
        "features": Field(int, 8, "synthetic: input dimension", minimum=1),
        "target_noise": Field(float, 0.05, "synthetic: standard deviation of the target noise", minimum=0.0),
    },
    "architecture": {
        "depth": Field(int, defaults.DEPTH, "hidden layers L", minimum=0),
        "activation": Field((str, dict), defaults.ACTIVATION, "activation name, or an inline table of the name and "
                            f"its parameters, e.g. {{name = \"leaky_relu\", slope = 0.2}} ({_PARAMETRISED})",
                            choices=tuple(ACTIVATIONS), validate=_activation),
        "weight_var": Field(float, defaults.WEIGHT_VAR, "weight variance sigma_w^2 (weights ~ N(0, weight_var / "
                            "fan_in))", minimum=0.0, exclusive_minimum=True),
        "bias_var": Field(float, defaults.BIAS_VAR, "bias variance sigma_b^2", minimum=0.0),
        "input_weight_var": Field(list, [], "ARD: one first-layer weight variance per input feature, replacing "
                                  "weight_var in the input layer (empty: isotropic)"),
    },
    "kernel": {
        "kind": Field(str, "nngp", "nngp (Bayesian posterior) or ntk (gradient-descent training)",
                      choices=("nngp", "ntk")),
        "tile": Field(int, 2048, "tile edge", minimum=1),
        "dtype": Field(str, defaults.STORE_DTYPE, "storage precision (products accumulate in float64); int16: "
                       "each tile quantised across its range, half float32's bytes (for kernels past the page cache)",
                       choices=STORE_DTYPES),
        "page_cache": Field(str, "auto", "keep written tiles in the OS page cache (keep), drop them once on disk "
                            "(drop), or drop them when the kernel exceeds half the host's memory (auto)",
                            choices=PAGE_CACHE_POLICIES),
    },
    "solver": {
        "noise": Field(float, defaults.NOISE, "observation noise variance added to the kernel diagonal", minimum=0.0),
        "amplitude": Field(float, 1.0, "prior amplitude s: the targets' covariance is s (K + noise I); scales the "
                           "predictive variances (NLPD), not the mean", minimum=0.0, exclusive_minimum=True),
        "tol": Field(float, defaults.TOL, "relative residual per right-hand side (the shipped pipelines use 1e-4)",
                     minimum=0.0, exclusive_minimum=True),
        "maxiter": Field(int, 0, "CG iteration cap (0: automatic)", minimum=0),
        "preconditioner": Field(str, "auto", "CG preconditioner", choices=PRECONDITIONERS),
        "rank": Field(int, 1024, "rank of a low-rank preconditioner", minimum=1),
        "method": Field(str, "auto", "auto (Cholesky up to 5000 points, or up to 16384 when predict.variance "
                        "takes the dense factor, which the solve then shares; CG above), cg, block_cg (all "
                        "right-hand sides share one Krylov space: fewer passes for several of them) or cholesky",
                        choices=METHODS),
        "checkpoint_every": Field(int, 5, "CG iterations between checkpoints", minimum=1),
        "fit_amplitude": Field(bool, True, "scale the predictive variance by the kernel amplitude that maximises the "
                               "marginal likelihood on all training data (closed form from the solve; it supersedes "
                               "solver.amplitude; false: solver.amplitude as given)"),
        "allow_unconverged": Field(bool, False, "finish with exit code 0 when CG stops before tol (default: the run "
                                   "completes, then the CLI exits 3)"),
    },
    "fit": {
        "enabled": Field(bool, False, "before the kernel stage, fit depth, weight_var, bias_var, solver.noise, "
                         "solver.amplitude (and ARD) by the exact marginal likelihood on a subset; the given "
                         "values are the starting point"),
        "subset": Field(int, 2000, "training points the likelihood is maximised on (random; 0: as many as "
                        "fit.memory allows)", minimum=0),
        "memory": Field(str, "2GiB", "memory budget of the fit (7 n^2 float64 for n points), e.g. '8GiB'"),
        "restarts": Field(int, 0, "random starts per depth besides the given values", minimum=0),
        "ard": Field(bool, False, "also fit one input variance per feature (architecture.input_weight_var)"),
        "depth_min": Field(int, 1, "smallest depth tried", minimum=0),
        "depth_max": Field(int, 4, "largest depth tried", minimum=0),
        "maxiter": Field(int, 200, "L-BFGS-B iterations per start", minimum=1),
        "seed": Field(int, 0, "seed of the subset and the restarts", minimum=0),
    },
    "predict": {
        "variance": Field(str, "auto", "predictive variance: none; auto (dense up to 16384 training points, "
                          "else tiled, or exact for a few test points); dense (one in-memory Cholesky of "
                          "K + noise I, 8 n^2 bytes); tiled (the same Cholesky out of core, 4 n^2 bytes of "
                          "scratch in TMPDIR); exact (one CG per test point); lowrank (cheap, coarse)",
                          choices=("none", "auto", "dense", "tiled", "exact", "lowrank")),
    },
    "report": {
        "plots": Field(bool, True, "write PNG figures beside report.json (needs matplotlib)"),
        "heatmap_points": Field(int, 400, "points in the kernel heat map", minimum=2),
    },
    "cluster": {
        "address": Field(str, "auto", "auto (Dask's scheduler-address, i.e. DASK_SCHEDULER_ADDRESS, when set, else the "
                         "embedded cluster), local (always the embedded cluster), a scheduler address, or a cluster "
                         "file"),
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
    address = out["cluster"]["address"]
    if address == "auto":  # Dask's scheduler-address, if set, is what the run will connect to
        from ..cluster import configured_scheduler

        address = configured_scheduler() or address
    _check_tls_address(address)
    if out["data"]["source"] != "synthetic" and not out["data"]["path"]:
        raise ConfigError(f"data.path: expected a file or directory for source {out['data']['source']!r}, got ''")
    _check_fit(out)
    if out["data"]["test_fraction"] >= 1:
        raise ConfigError(f"data.test_fraction: expected a number in (0, 1), got {out['data']['test_fraction']}")
    return out


def _check_fit(out: dict[str, dict[str, Any]]) -> None:
    for i, v in enumerate(out["architecture"]["input_weight_var"]):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v > 0 and math.isfinite(v)):
            raise ConfigError(f"architecture.input_weight_var[{i}]: expected a number > 0, got {v!r}")
    f = out["fit"]
    if f["depth_min"] > f["depth_max"]:
        raise ConfigError(f"fit.depth_max: expected a depth >= fit.depth_min ({f['depth_min']}), got {f['depth_max']}")
    try:
        from dask.utils import parse_bytes

        parse_bytes(f["memory"])
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"fit.memory: expected a size such as '2GiB', got {f['memory']!r}") from exc


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
            choices = f" (one of: {', '.join(map(str, spec.choices))})" if spec.choices else ""
            lines.append(f"{key} = {shown:<14} # {spec.doc}{choices}")
        lines.append("")
    return "\n".join(lines)
