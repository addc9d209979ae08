"""Hyperparameter sweeps: kernels from one Gram equal direct builds; criteria equal their oracles."""

from __future__ import annotations

import math
import tomllib

import numpy as np
import pytest

from nngp_dask import Architecture, kernel
from nngp_dask.gp import one_hot_targets
from nngp_dask.kernels import gram_block, recurse_gram
from nngp_dask.linalg import dense_solve, logdet_dense
from nngp_dask.select import EIGH_MIN_NOISES, marginal_likelihood, run_sweep, sweep_kernels
from nngp_dask.tomlfile import to_toml


pytestmark = pytest.mark.usefixtures("single_threaded_blas")


def _classification(n=160, d=6, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d))
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(int) + (x[:, 2] > 0.8)
    return x, y


def _regression(n=150, d=5, seed=1, outputs=1):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d))
    y = np.column_stack([np.sin(x[:, i] + x[:, i + 1]) for i in range(outputs)]) + 0.1 * rng.standard_normal((n, outputs))
    return x, (y[:, 0] if outputs == 1 else y)


# --- kernels -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,rtol", [("float64", 1e-13), ("float32", 2e-7)])
@pytest.mark.parametrize("activation,kind", [("relu", "nngp"), ("relu", "ntk"), ("erf", "nngp"), ("tanh", "nngp")])
def test_sweep_kernels_equal_direct_builds(dtype, rtol, activation, kind):
    rng = np.random.default_rng(5)
    x, xt = rng.standard_normal((37, 7)), rng.standard_normal((11, 7))
    grid = dict(weight_var=[0.8, 2.0], bias_var=[0.0, 0.3], depth=[0, 1, 3])
    for rows, cols in ((x, None), (xt, x)):
        seen = 0
        for arch, k in sweep_kernels(rows, cols, activation=activation, kind=kind, dtype=dtype, **grid):
            ref = kernel(arch, rows, cols, kind=kind, dtype=dtype)
            assert k.dtype == ref.dtype and k.shape == ref.shape
            np.testing.assert_allclose(k, ref, rtol=rtol, atol=0)
            seen += 1
        assert seen == 2 * 2 * 3


def test_recurse_gram_leaves_the_gram_for_the_next_candidate():
    x = np.random.default_rng(0).standard_normal((20, 4))
    block = gram_block(x)
    before = block.gram.copy()
    for wv in (1.0, 2.0):
        arch = Architecture(2, "relu", wv, 0.1)
        np.testing.assert_array_equal(recurse_gram(arch, block), kernel(arch, x, dtype="float64"))
    np.testing.assert_array_equal(block.gram, before)


# --- criteria ----------------------------------------------------------------------------------


def test_classification_sweep_rows_equal_direct_evaluation():
    x, y = _classification()
    grid = dict(weight_var=[1.0, 2.0], bias_var=[0.1], depth=[1, 2], noise=[1e-2, 1e-1])
    res = run_sweep(x, y, grid=grid, task="classification", validation_fraction=0.25, seed=3)
    assert len(res.rows) == 2 * 1 * 2 * 2 and res.criterion == "accuracy"
    fi, vi = res.fit_index, res.val_index
    assert len(vi) == 40 and np.intersect1d(fi, vi).size == 0 and len(fi) + len(vi) == len(x)
    classes = np.unique(y[fi])
    y_enc = one_hot_targets(np.searchsorted(classes, y[fi]), classes.size, "centered")
    for row in res.rows:
        arch = Architecture(row["depth"], "relu", row["weight_var"], row["bias_var"])
        k = kernel(arch, x[fi], dtype="float64")
        alpha, logdet = dense_solve(k, y_enc, row["noise"], return_logdet=True)
        pred = kernel(arch, x[vi], x[fi], dtype="float64") @ alpha
        assert row["accuracy"] == pytest.approx(np.mean(classes[np.argmax(pred, 1)] == y[vi]), abs=1e-12)
        fit = float(np.sum(y_enc * alpha))
        lml = -0.5 * fit - 0.5 * 3 * logdet - 0.5 * 3 * len(fi) * math.log(2 * math.pi)
        assert row["log_marginal_likelihood"] == pytest.approx(lml, rel=1e-10)
        assert row["lml_method"] == "exact" and row["solver"] == "cholesky"
    accs = [r["accuracy"] for r in res.rows]
    assert res.best["accuracy"] == max(accs)


def test_marginal_likelihood_criterion_is_exact_below_the_threshold():
    x, y = _regression(outputs=2)
    grid = dict(weight_var=[1.0, 2.0], bias_var=[0.0, 0.2], depth=[1, 3], noise=[0.05])
    res = run_sweep(x, y, grid=grid, task="regression", criterion="marginal_likelihood", validation_fraction=0.0)
    assert res.settings["n_val"] == 0 and res.settings["n_fit"] == len(x)
    for row in res.rows:
        k = kernel(Architecture(row["depth"], "relu", row["weight_var"], row["bias_var"]), x, dtype="float64")
        alpha = dense_solve(k, y, 0.05)
        exact = -0.5 * np.sum(y * alpha) - logdet_dense(k, 0.05) - len(x) * math.log(2 * math.pi)
        assert row["log_marginal_likelihood"] == pytest.approx(exact, rel=1e-10)
        assert row["lml_stderr"] == 0.0 and row["accuracy"] is None and row["rmse"] is None
    assert res.best["log_marginal_likelihood"] == max(r["log_marginal_likelihood"] for r in res.rows)


def test_slq_marginal_likelihood_within_its_error_bars():
    rng = np.random.default_rng(3)
    n = 1500
    x = rng.standard_normal((n, 20))
    y = np.sin(x[:, :2].sum(1)) + 0.1 * rng.standard_normal(n)
    k = kernel(Architecture(3, "relu", 1.6, 0.1), x, dtype="float64")
    exact = marginal_likelihood(k, y, 0.05, method="exact")
    est = marginal_likelihood(k, y, 0.05, method="slq", seed=0)
    assert exact.method == "exact" and est.method == "slq" and est.stderr > 0
    assert abs(est.value - exact.value) <= 3 * est.stderr
    assert est.stderr < 0.02 * abs(exact.value)  # error bars that are useful for ranking
    auto = marginal_likelihood(k, y, 0.05, exact_max_n=1000, seed=0)
    assert auto.method == "slq" and auto.value == pytest.approx(est.value, rel=1e-6)


def test_cg_and_slq_path_agrees_with_the_exact_path():
    x, y = _regression(n=200)
    grid = dict(weight_var=[1.5], bias_var=[0.1], depth=[1, 2], noise=[0.05, 0.2])
    kw = dict(grid=grid, task="regression", criterion="marginal_likelihood", seed=0)
    exact = run_sweep(x, y, **kw)
    cg = run_sweep(x, y, exact_max_n=10, tol=1e-10, **kw)
    assert cg.settings["solver"] == "cg" and exact.settings["solver"] == "cholesky"
    for a, b in zip(exact.rows, cg.rows):
        assert b["lml_method"] == "slq" and b["converged"]
        assert b["rmse"] == pytest.approx(a["rmse"], rel=1e-7)
        assert abs(b["log_marginal_likelihood"] - a["log_marginal_likelihood"]) <= 3 * b["lml_stderr"]


def test_eigh_equals_cholesky_for_every_noise_and_metric():
    x, y = _regression(n=120)
    grid = dict(weight_var=[1.2, 2.0], bias_var=[0.1], depth=[2], noise=list(np.geomspace(1e-3, 1.0, EIGH_MIN_NOISES)))
    kw = dict(grid=grid, task="regression", criterion="nlpd", seed=1)
    auto = run_sweep(x, y, **kw)
    chol = run_sweep(x, y, solver="cholesky", **kw)
    assert auto.settings["solver"] == "eigh"
    for a, b in zip(auto.rows, chol.rows):
        for col in ("rmse", "nlpd", "log_marginal_likelihood"):
            assert a[col] == pytest.approx(b[col], rel=1e-7), col
    assert auto.best_index == chol.best_index


def test_nlpd_equals_the_gaussian_predictive_density():
    x, y = _regression(n=100)
    res = run_sweep(x, y, grid=dict(weight_var=[1.6], bias_var=[0.1], depth=[2], noise=[0.03]), task="regression",
                    criterion="nlpd", validation_fraction=0.2, seed=2)
    fi, vi = res.fit_index, res.val_index
    arch = Architecture(2, "relu", 1.6, 0.1)
    k, ks, kss = (kernel(arch, x[fi], dtype="float64"), kernel(arch, x[vi], x[fi], dtype="float64"),
                  kernel(arch, x[vi], dtype="float64"))
    a = k + 0.03 * np.eye(len(fi))
    mean = ks @ np.linalg.solve(a, y[fi])
    var = np.diag(kss) - np.einsum("ij,ji->i", ks, np.linalg.solve(a, ks.T)) + 0.03
    nlpd = np.mean(0.5 * np.log(2 * np.pi * var) + (y[vi] - mean) ** 2 / (2 * var))
    assert res.best["nlpd"] == pytest.approx(nlpd, rel=1e-9)
    assert res.best["rmse"] == pytest.approx(np.sqrt(np.mean((y[vi] - mean) ** 2)), rel=1e-9)


def test_relative_noise_and_per_depth_recursion():
    x, y = _classification(n=90)
    grid = dict(weight_var=[1.0, 2.0], bias_var=[0.2], depth=[1, 3], noise=[0.01, 0.1])
    stacked = run_sweep(x, y, grid=grid, relative_noise=True, seed=0)
    per_depth = run_sweep(x, y, grid=grid, relative_noise=True, seed=0, memory_limit=0)
    assert stacked.timings["stacked"] and not per_depth.timings["stacked"]
    assert stacked.timings["grams"] == 2 and stacked.timings["recursions"] == 2 * 2
    for a, b in zip(stacked.rows, per_depth.rows):
        assert a == b
        arch = Architecture(a["depth"], "relu", a["weight_var"], a["bias_var"])
        mean_diag = np.mean(np.diag(kernel(arch, x[stacked.fit_index], dtype="float64")))
        assert a["noise_abs"] == pytest.approx(a["noise"] * mean_diag, rel=1e-12)


def test_failed_candidate_is_kept_with_advice_and_never_chosen():
    x, y = _classification(n=60)
    x = np.vstack([x, x[:5]])  # duplicated points: K is singular, noise 0 cannot be factorised
    y = np.concatenate([y, y[:5]])
    res = run_sweep(x, y, grid=dict(weight_var=[1.6], bias_var=[0.1], depth=[1], noise=[0.0, 0.1]),
                    x_val=x[:10], y_val=y[:10])
    bad, good = res.rows
    assert "increase" in bad["error"].lower() and bad["accuracy"] is None
    assert res.best == good and good["error"] is None


# --- reporting ---------------------------------------------------------------------------------


def test_table_rows_plot_and_pipeline_toml(tmp_path):
    pytest.importorskip("matplotlib")
    x, y = _classification(n=100)
    grid = dict(weight_var=[1.0, 1.6, 2.2], bias_var=[0.0, 0.2], depth=[1, 2], noise=[0.01])
    res = run_sweep(x, y, grid=grid, seed=0)
    text = res.table()
    assert text.count("\n") == 2 + len(res.rows) and "*" in text and "accuracy" in text
    assert res.table(sort=True, top=3).splitlines()[3].startswith("*")
    rows = res.to_rows()
    assert len(rows) == 12 and rows[0]["weight_var"] == 1.0 and rows is not res.to_rows()
    rows[0]["depth"] = 99
    assert res.rows[0]["depth"] != 99
    png = res.plot(tmp_path / "sweep.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    template = {"run": {"name": "mnist", "task": "classification"}, "solver": {"tol": 1e-4},
                "architecture": {"depth": 7}, "data": {"source": "npz", "limit_train": 1000}}
    parsed = tomllib.loads(res.best_pipeline_toml(template))
    best = res.best
    assert parsed["architecture"] == {"depth": best["depth"], "activation": "relu", "weight_var": best["weight_var"],
                                      "bias_var": best["bias_var"]}
    assert parsed["solver"] == {"tol": 1e-4, "noise": best["noise_abs"]}
    assert parsed["run"] == template["run"] and parsed["data"]["limit_train"] == 1000
    assert parsed["data"]["normalize"] == "none" and parsed["kernel"]["kind"] == "nngp"
    try:
        from nngp_dask.pipeline import resolve
    except ImportError:
        return
    cfg = resolve({k: v for k, v in parsed.items() if k != "data"} | {"data": {"normalize": "none"}})
    assert cfg["architecture"]["weight_var"] == best["weight_var"]


def test_toml_writer_round_trips_flat_sections():
    data = {"top": 1, "a": {"s": 'quo"te\\n', "f": 1e-5, "i": 3, "b": True, "l": [1, 2.5, "x"], "weird key": 0.1}}
    assert tomllib.loads(to_toml(data)) == data
    nested = {"a": {"b": {"c": 1, "d": "x", "e": [0.5]}}}  # a value that is a table: written inline
    assert to_toml(nested) == '[a]\nb = {c = 1, d = "x", e = [0.5]}\n' and tomllib.loads(to_toml(nested)) == nested
    with pytest.raises(TypeError, match="a.b.c: expected a string, number, boolean, list or table"):
        to_toml({"a": {"b": {"c": object()}}})


@pytest.mark.parametrize("kwargs,match", [
    (dict(grid={"width": [1]}), "grid.width: unknown key"),
    (dict(grid={"depth": [-1]}), "grid.depth"),
    (dict(grid={"weight_var": [0.0]}), "grid.weight_var"),
    (dict(grid={}, task="regression", criterion="accuracy"), "accuracy"),
    (dict(grid={}, validation_fraction=0.0), "validation"),
    (dict(grid={}, solver="lu"), "solver"),
    (dict(grid={}, activation="step", kind="ntk"), "NTK"),
])
def test_bad_settings_are_refused_before_any_work(kwargs, match):
    x, y = _classification(n=20)
    with pytest.raises((ValueError, TypeError), match=match):
        run_sweep(x, y, **kwargs)
