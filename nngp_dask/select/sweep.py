"""Model selection at scale: hyperparameter sweeps that reuse work, and their criteria.

Three pieces of work are shared between the candidates of a grid over
``(weight_var, bias_var, depth, noise)`` (docs/DESIGN.md section 2):

1. the input Gram ``<x, x'>`` (the only GEMM, ``O(n^2 d)``) does not depend on any
   hyperparameter: it is computed **once** (:func:`~nngp_dask.kernels.gram_block`) and every
   candidate's kernel is derived from it by the elementwise recursion
   (:func:`~nngp_dask.kernels.recurse_gram`);
2. ``K^0 = bias_var + weight_var <x, x'> / d`` depends on ``(weight_var, bias_var)`` only, so
   **one** recursion per pair to the deepest depth yields every depth ``0..L`` on the way
   (``all_depths``): the recursion cost of a depth sweep is that of its deepest member;
3. the noise needs no new kernel: one Cholesky factorisation per noise, or one
   eigendecomposition ``K = U diag(lambda) U^T`` that gives every noise's solve, predictive
   variance and ``log det(K + noise I) = sum log(lambda + noise)`` (chosen when the grid has
   at least :data:`~nngp_dask.select.EIGH_MIN_NOISES` noises, where it is cheaper).

Selection criteria (``criterion``): the validation ``accuracy`` (classification as regression
on one-hot targets, Lee et al. 2018), ``rmse`` or ``nlpd`` (Gaussian negative log predictive
density) on a held-out split, or the training set's log marginal likelihood
(``marginal_likelihood``; Rasmussen & Williams 2006, eq. 2.30): exact from the Cholesky
factor (or the eigenvalues) for ``n <= exact_max_n``, above it the data-fit term from CG and
``log det`` from stochastic Lanczos quadrature (:func:`nngp_dask.linalg.slq.slq_logdet`) with its
standard error (column ``lml_stderr``).

Everything here is in memory (``n`` up to ~20k on a 24 GiB machine in float32). The same
primitives work per tile: :func:`~nngp_dask.kernels.gram_block` and
:func:`~nngp_dask.select.sweep_kernels` accept a row block and a column block, and the per-point
diagonals depend only on each point, so a tiled sweep computes one Gram block per tile and every
candidate's tile from it.

Where the pieces live: the Gram reuse in :mod:`nngp_dask.kernels.gram`, the grid in
:mod:`nngp_dask.select.grids`, one kernel solved for every noise in
:mod:`nngp_dask.select.evaluate`, the result table in :mod:`nngp_dask.select.result`; this module
runs the sweep.

Examples
--------
>>> import numpy as np
>>> from nngp_dask.select import run_sweep
>>> rng = np.random.default_rng(0)
>>> x = rng.standard_normal((120, 5)); y = (x[:, 0] > 0).astype(int)
>>> res = run_sweep(x, y, grid=dict(weight_var=[1.0, 2.0], bias_var=[0.1], depth=[1, 2], noise=[1e-2]),
...                 task="classification", criterion="accuracy", validation_fraction=0.25, seed=0)
>>> len(res.to_rows()), res.best["depth"] in (1, 2), res.best["accuracy"] > 0.5
(4, True, True)
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, DTypeLike, NDArray

from .. import defaults
from ..gp import DIRECT_MAX_N, TARGETS, encode_labels, one_hot_targets
from ..kernels import (
    NORMALIZATIONS,
    Architecture,
    InputError,
    check_dtype,
    check_inputs,
    check_kind,
    depth_kernels,
    gram_block,
    normalize as normalize_rows,
    point_diagonals,
)
from .evaluate import SweepProblem, evaluate_noises
from .grids import CRITERIA, EIGH_MIN_NOISES, SOLVERS, TASKS, check_grid
from .result import COLUMNS, SweepResult

__all__ = ["run_sweep"]


def _available_bytes() -> int:
    import psutil  # a dependency of nngp-dask

    return int(psutil.virtual_memory().available)


def _split(n: int, fraction: Any, seed: int | None) -> tuple[NDArray[np.intp], NDArray[np.intp]]:
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float, np.floating)) \
            or not 0.0 <= float(fraction) < 1.0:
        raise ValueError(f"validation_fraction: expected a number in [0, 1), got {fraction!r}")
    n_val = round(float(fraction) * n)
    if fraction > 0:
        n_val = max(n_val, 1)
    if n - n_val < 1:
        raise ValueError(f"validation_fraction: {fraction} leaves no training point of {n}")
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def run_sweep(
    x_train: ArrayLike,
    y_train: ArrayLike,
    *,
    grid: Mapping[str, Any],
    activation: Any = defaults.ACTIVATION,
    kind: str = "nngp",
    task: str = "classification",
    criterion: str | None = None,
    validation_fraction: float = 0.1,
    x_val: ArrayLike | None = None,
    y_val: ArrayLike | None = None,
    normalize: str = "none",
    relative_noise: bool = False,
    targets: str = "centered",
    dtype: DTypeLike = defaults.IN_MEMORY_DTYPE,
    solver: str = "auto",
    exact_max_n: int = DIRECT_MAX_N,
    tol: float = defaults.TOL,
    num_probes: int = 16,
    lanczos_steps: int = 50,
    seed: int | None = 0,
    memory_limit: int | None = None,
    progress: bool = False,
) -> SweepResult:
    """Evaluate every ``(weight_var, bias_var, depth, noise)`` of ``grid``, reusing work.

    One Gram of the fit split (and one of validation x fit), one recursion per
    ``(weight_var, bias_var)`` giving every depth, and per kernel one factorisation per noise
    (or one eigendecomposition for all of them).

    Parameters
    ----------
    x_train : array_like, shape (n, d)
    y_train : array_like, shape (n,) (labels for classification) or (n,) / (n, c) (regression)
    grid : dict
        Lists (or single values) under ``weight_var``, ``bias_var``, ``depth``, ``noise``;
        a key left out takes the pipeline default (1.6, 0.1, 3, 0.01).
    activation : str, dict or Activation
    kind : {"nngp", "ntk"}
    task : {"classification", "regression"}
        Classification is regression on one-hot ``targets`` (argmax of the posterior mean).
    criterion : {"accuracy", "rmse", "nlpd", "marginal_likelihood"}, optional
        Default ``"accuracy"`` for classification, ``"rmse"`` for regression. ``nlpd`` uses the
        predictive variance of the latent function plus the noise, averaged over validation
        points and outputs. ``marginal_likelihood`` is that of the fit split (exact for
        ``n_fit <= exact_max_n``, else SLQ with a standard error).
    validation_fraction : float, default 0.1
        Held out of ``x_train`` at random (``seed``) when ``x_val`` is not given; 0 (only
        with ``criterion="marginal_likelihood"``) fits on everything.
    x_val, y_val : array_like, optional
        An explicit validation set (then all of ``x_train`` is fitted).
    normalize : {"none", "unit_norm", "standardize"}
        Per-example normalisation (:func:`nngp_dask.normalize`), applied to both sets.
    relative_noise : bool
        Grid noises are relative to the mean kernel diagonal of each candidate (``noise_abs =
        noise * mean diag K``): comparable across weight/bias variances and depths.
    targets : {"centered", "onehot"}
        Classification targets (:func:`nngp_dask.gp.targets.one_hot_targets`).
    dtype : {"float32", "float64"}, default "float64"
        Kernel precision (solves are float64; CG multiplies a float32 kernel in float32). In memory,
        like the estimators; a stored kernel defaults to float32 (:mod:`nngp_dask.defaults`).
    solver : {"auto", "cholesky", "eigh", "cg"}
        ``"auto"``: for ``n_fit <= exact_max_n`` Cholesky per noise, or ``eigh`` when the grid
        has at least :data:`EIGH_MIN_NOISES` noises; above, preconditioned CG (and SLQ when the
        criterion is the marginal likelihood).
    exact_max_n : int
        Size threshold of the exact path (default :data:`nngp_dask.gp.DIRECT_MAX_N`).
    tol : float, default 1e-5
        CG relative residual (:data:`nngp_dask.defaults.TOL`, as ``solve``).
    num_probes, lanczos_steps : int
        SLQ settings.
    seed : int or None
        Validation split and SLQ probes.
    memory_limit : int, optional
        Bytes the all-depths kernel stack may take (default half the available memory); above
        it each depth is recursed separately (more recursion, still one Gram).
    progress : bool
        A progress bar over ``(weight_var, bias_var)`` pairs.

    Returns
    -------
    SweepResult

    Raises
    ------
    ValueError, InputError
        Bad settings or data, before any work starts.
    """
    t_start = time.perf_counter()
    if task not in TASKS:
        raise ValueError(f"task: expected one of {list(TASKS)}, got {task!r}")
    if criterion is None:
        criterion = "accuracy" if task == "classification" else "rmse"
    if criterion not in CRITERIA:
        raise ValueError(f"criterion: expected one of {list(CRITERIA)}, got {criterion!r}")
    if criterion == "accuracy" and task != "classification":
        raise ValueError("criterion: 'accuracy' needs task='classification'; expected 'rmse', 'nlpd' or "
                         "'marginal_likelihood' for regression")
    if solver not in SOLVERS:
        raise ValueError(f"solver: expected one of {list(SOLVERS)}, got {solver!r}")
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize: expected one of {list(NORMALIZATIONS)}, got {normalize!r}")
    if targets not in TARGETS:
        raise ValueError(f"targets: expected one of {list(TARGETS)}, got {targets!r}")
    if isinstance(exact_max_n, bool) or not isinstance(exact_max_n, (int, np.integer)) or exact_max_n < 0:
        raise ValueError(f"exact_max_n: expected an integer >= 0, got {exact_max_n!r}")
    dt = check_dtype(dtype)
    g = check_grid(grid)
    probe = Architecture(max(g["depth"]), activation, g["weight_var"][0], g["bias_var"][0])
    check_kind(kind, probe)

    x = check_inputs(x_train, "x_train")
    y = np.asarray(y_train)
    if y.ndim not in (1, 2) or y.shape[0] != x.shape[0]:
        raise InputError(f"y_train: expected {x.shape[0]} rows (one per input) of shape (n,) or (n, c), "
                         f"got shape {y.shape}")
    fit_index = val_index = None
    xv: NDArray | None
    yv: NDArray | None
    if x_val is not None:
        if y_val is None:
            raise ValueError("y_val: expected the validation targets together with x_val, got None")
        xv = check_inputs(x_val, "x_val", features=x.shape[1])
        yv = np.asarray(y_val)
        if yv.shape[0] != xv.shape[0] or yv.ndim != y.ndim:
            raise InputError(f"y_val: expected {xv.shape[0]} rows shaped like y_train, got shape {yv.shape}")
        xf, yf = x, y
    elif y_val is not None:
        raise ValueError("x_val: expected the validation inputs together with y_val, got None")
    else:
        fit_index, val_index = _split(x.shape[0], validation_fraction, seed)
        xf, yf = x[fit_index], y[fit_index]
        xv, yv = (x[val_index], y[val_index]) if val_index.size else (None, None)
    if xv is None and criterion != "marginal_likelihood":
        raise ValueError(f"validation_fraction: criterion {criterion!r} needs a validation set; expected a "
                         "fraction > 0 or x_val/y_val (or criterion='marginal_likelihood')")
    xf = normalize_rows(xf, normalize)
    xv = normalize_rows(xv, normalize) if xv is not None else None

    classes = None
    labels_val = None
    if task == "classification":
        if yf.ndim != 1:
            raise InputError(f"y_train: expected class labels of shape (n,) for classification, got {yf.shape}")
        classes, idx = np.unique(yf, return_inverse=True)
        y_fit = one_hot_targets(idx, classes.size, targets)
        if yv is not None:
            labels_val, y_val_enc = encode_labels(yv, classes, targets)
        else:
            y_val_enc = None
    else:
        if yf.dtype.kind not in "biuf":
            raise InputError(f"y_train: expected numeric targets for regression, got dtype {yf.dtype}")
        y_fit = np.asarray(yf, dtype=np.float64).reshape(yf.shape[0], -1)
        y_val_enc = np.asarray(yv, dtype=np.float64).reshape(yv.shape[0], -1) if yv is not None else None
    if not np.all(np.isfinite(y_fit)) or (y_val_enc is not None and not np.all(np.isfinite(y_val_enc))):
        raise InputError("y_train: expected finite targets, got NaN or Inf")

    n_fit, n_val = xf.shape[0], (xv.shape[0] if xv is not None else 0)
    exact = n_fit <= exact_max_n
    method = solver
    if solver == "auto":
        method = ("eigh" if len(g["noise"]) >= EIGH_MIN_NOISES else "cholesky") if exact else "cg"
    prob = SweepProblem(y_fit=y_fit, y_val=y_val_enc, labels_val=labels_val,
                    need_var=xv is not None and (criterion == "nlpd" or (task == "regression" and method != "cg")),
                    need_ml_cg=criterion == "marginal_likelihood", tol=float(tol), num_probes=num_probes,
                    lanczos_steps=lanczos_steps, seed=seed)

    depths = sorted(g["depth"])
    layers = max(depths) + 1
    stack_bytes = layers * (n_fit * n_fit + n_fit * n_val) * dt.itemsize * (2 if kind == "ntk" else 1)
    budget = memory_limit if memory_limit is not None else _available_bytes() // 2
    stacked = stack_bytes <= budget

    timings: dict[str, Any] = {"gram_s": 0.0, "recursion_s": 0.0, "solve_s": 0.0, "grams": 0, "recursions": 0,
                               "stacked": stacked}
    t0 = time.perf_counter()
    block_ff = gram_block(xf, dtype=dt)
    block_vf = gram_block(xv, xf, dtype=dt) if xv is not None else None
    timings["gram_s"] = time.perf_counter() - t0
    timings["grams"] = 1 + (block_vf is not None)

    pairs = list(itertools.product(g["weight_var"], g["bias_var"]))
    by_key: dict[tuple, dict[str, Any]] = {}
    from tqdm.auto import tqdm

    for wv, bv in tqdm(pairs, desc="sweep", unit="pair", disable=not progress):
        arch_max = Architecture(max(depths), activation, wv, bv)
        t0 = time.perf_counter()
        ff = depth_kernels(arch_max, block_ff, depths, kind, stacked)
        vf = depth_kernels(arch_max, block_vf, depths, kind, stacked) if block_vf is not None else None
        prior_all = (point_diagonals(arch_max, block_vf.sqnorm_rows, block_vf.features, kind)[1]
                     if block_vf is not None else None)
        pending = time.perf_counter() - t0
        for depth in depths:
            t0 = time.perf_counter()
            _, k_ff = next(ff)
            k_vf = next(vf)[1] if vf is not None else None
            timings["recursion_s"] += time.perf_counter() - t0 + pending
            pending = 0.0
            t0 = time.perf_counter()
            mean_diag = float(np.mean(np.diagonal(k_ff), dtype=np.float64))
            noises_abs = [nz * mean_diag if relative_noise else nz for nz in g["noise"]]
            results = evaluate_noises(k_ff, k_vf, prior_all[depth] if prior_all is not None else None, noises_abs,
                                method, prob)
            timings["solve_s"] += time.perf_counter() - t0
            for nz, nz_abs, res in zip(g["noise"], noises_abs, results):
                row = dict.fromkeys(COLUMNS)
                row.update(weight_var=wv, bias_var=bv, depth=depth, noise=nz, noise_abs=float(nz_abs),
                           solver=method)
                row.update(res)
                by_key[(wv, bv, depth, nz)] = row
            del k_ff, k_vf
        timings["recursions"] += (1 if stacked else len(depths)) * (1 + (block_vf is not None))
        del ff, vf
    rows = tuple(by_key[key] for key in itertools.product(g["weight_var"], g["bias_var"], g["depth"], g["noise"]))
    timings["total_s"] = time.perf_counter() - t_start
    settings = {
        "activation": probe.activation.to_dict(), "activation_name": probe.activation.name, "kind": kind,
        "normalize": normalize, "dtype": dt.name, "relative_noise": bool(relative_noise), "targets": targets,
        "n_fit": n_fit, "n_val": n_val, "features": x.shape[1], "solver": method, "exact_max_n": int(exact_max_n),
        "classes": classes.tolist() if classes is not None else None, "seed": seed,
    }
    result = SweepResult(rows=rows, criterion=criterion, task=task, best_index=None, grid=g, timings=timings,
                         settings=settings, fit_index=fit_index, val_index=val_index)
    ranking = result._ranking()
    return SweepResult(rows=rows, criterion=criterion, task=task, best_index=ranking[0] if ranking else None, grid=g,
                       timings=timings, settings=settings, fit_index=fit_index, val_index=val_index)
