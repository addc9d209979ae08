"""Hyperparameters by the marginal likelihood, ARD, and the estimators' GP conventions.

Oracles: the ARD kernel is the isotropic kernel on rescaled inputs (exact); the log marginal
likelihood is scipy.stats.multivariate_normal.logpdf of the dense covariance; gradients are
central differences of that dense likelihood; NNGPKernel's gradient is checked against
differences of scikit-learn's own kernel evaluation.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats

from nngp_dask.kernels import Architecture, diagonals, kernel, kernel_log_gradient, tile, with_log_hyperparameters
from nngp_dask.select import fit_hyperparameters, profile_log_marginal_likelihood, storage_noise_floor, subset_size
from nngp_dask.select.fit import _Objective  # the objective's gradient is what is tested

RNG = np.random.default_rng(7)
X = RNG.standard_normal((40, 3))
Y = np.sin(X[:, 0]) + 0.5 * X[:, 1] ** 2 + 0.1 * RNG.standard_normal(40)
V = (0.5, 2.5, 0.1)


def _dense_lml(arch: Architecture, x, y, noise: float, amplitude: float) -> float:
    k = kernel(arch, x, dtype="float64")
    cov = amplitude * (k + noise * np.eye(len(x)))
    y2 = np.asarray(y).reshape(len(x), -1)
    return float(sum(scipy.stats.multivariate_normal(np.zeros(len(x)), cov).logpdf(y2[:, j])
                     for j in range(y2.shape[1])))


@pytest.mark.parametrize("activation", ["relu", "erf"])
def test_ard_kernel_is_the_isotropic_kernel_on_rescaled_inputs(activation):
    w = 1.7
    ard = Architecture(3, activation, w, 0.2, input_weight_var=V)
    iso = Architecture(3, activation, w, 0.2)
    scaled = X * np.sqrt(np.array(V) / w)
    np.testing.assert_allclose(kernel(ard, X, dtype="float64"), kernel(iso, scaled, dtype="float64"),
                               rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(diagonals(ard, X), diagonals(iso, scaled), rtol=1e-13)
    # a ragged, non-symmetric tile: rows 0..12 against columns 5..39
    a, b = X[:13], X[5:]
    got = tile(ard, a, b, diagonals(ard, a), diagonals(ard, b), dtype="float64")
    np.testing.assert_allclose(got, kernel(iso, scaled[:13], scaled[5:], dtype="float64"), rtol=1e-12, atol=1e-14)


def test_ard_identity_and_bad_values():
    ard = Architecture(2, "relu", 1.6, 0.1, input_weight_var=V)
    assert Architecture.from_dict(ard.to_dict()) == ard
    assert ard.fingerprint != ard.replace(input_weight_var=(0.5, 2.5, 0.2)).fingerprint
    assert ard.fingerprint != ard.replace(input_weight_var=None).fingerprint
    assert "input_weight_var" not in ard.replace(input_weight_var=None).to_dict()  # older stores keep their identity
    with pytest.raises(ValueError, match=r"input_weight_var\[1\]: expected a number > 0, got -1"):
        Architecture(2, input_weight_var=(1.0, -1.0))
    with pytest.raises(ValueError, match="input_weight_var: expected 3 values .* got 2"):
        kernel(Architecture(2, input_weight_var=(1.0, 1.0)), X)


def test_kernel_log_gradient_at_depth_zero_is_the_closed_form():
    arch = Architecture(0, "relu", 1.3, 0.4, input_weight_var=V)
    g = kernel_log_gradient(arch, X, ["weight_var", "bias_var", "input_weight_var"])
    assert g.shape == (40, 40, 5)
    np.testing.assert_allclose(g[..., 0], 0.0, atol=1e-12)  # with ARD, weight_var is not in the input layer
    np.testing.assert_allclose(g[..., 1], 0.4, rtol=1e-8)
    for i, v in enumerate(V):
        np.testing.assert_allclose(g[..., 2 + i], v * np.outer(X[:, i], X[:, i]) / 3, rtol=1e-7, atol=1e-12)


def test_profile_likelihood_is_the_dense_likelihood_at_its_closed_form_amplitude():
    arch = Architecture(2, "relu", 1.6, 0.1)
    k = kernel(arch, X, dtype="float64")
    y2 = np.column_stack([Y, np.cos(X[:, 2])])
    value, s, _ = profile_log_marginal_likelihood(k, y2, 0.05)
    assert value == pytest.approx(_dense_lml(arch, X, y2, 0.05, s), rel=1e-10)
    for off in (0.9, 1.1):  # s* maximises over the amplitude
        assert _dense_lml(arch, X, y2, 0.05, s * off) < value


@pytest.mark.parametrize("ard", [False, True])
def test_objective_gradient_matches_differences_of_the_dense_likelihood(ard):
    names = ("weight_var", "bias_var") + (("input_weight_var",) if ard else ())
    arch = Architecture(2, "relu", 1.6, 0.1, input_weight_var=V if ard else None)
    obj = _Objective(arch, X, Y[:, None], names, "nngp")
    theta = np.concatenate([[math.log(0.03)], np.log([1.6, 0.1]), np.log(V) if ard else []])

    def dense(th):  # the profile likelihood from scipy: K / mean diag, r, s* (all recomputed here)
        a = with_log_hyperparameters(arch, names, th[1:])
        k = kernel(a, X, dtype="float64")
        m = np.mean(np.diag(k))
        c0 = k / m + math.exp(th[0]) * np.eye(len(X))
        s = float(Y @ np.linalg.solve(c0, Y)) / len(X)
        return scipy.stats.multivariate_normal(np.zeros(len(X)), s * c0).logpdf(Y)

    value, grad = obj(theta)
    assert -value == pytest.approx(dense(theta), rel=1e-10)
    h = 1e-5
    fd = np.array([(dense(theta + h * e) - dense(theta - h * e)) / (2 * h) for e in np.eye(theta.size)])
    np.testing.assert_allclose(-grad, fd, rtol=2e-4, atol=2e-5 * np.abs(fd).max())


def test_fit_raises_the_likelihood_and_reports_the_dense_value():
    start = Architecture(3, "relu", 1.6, 0.1)
    res = fit_hyperparameters(X, Y, arch=start, noise=1e-2, depths=(1, 2), ard=True, subset=30, seed=1)
    assert res.n_subset == 30 and set(res.per_depth) == {1, 2}
    idx = np.sort(np.random.default_rng(1).choice(40, 30, replace=False))
    dense = _dense_lml(res.architecture, X[idx], Y[idx], res.noise, res.amplitude)
    assert res.log_marginal_likelihood == pytest.approx(dense, rel=1e-9)
    # better than the start at its own best amplitude
    k0 = kernel(start, X[idx], dtype="float64")
    m0 = np.mean(np.diag(k0))
    before, _, _ = profile_log_marginal_likelihood(k0 / m0, Y[idx, None], 1e-2 / m0)
    assert res.log_marginal_likelihood > before + 1.0
    assert len(res.architecture.input_weight_var) == 3
    overrides = res.pipeline_overrides()
    assert overrides["solver.noise"] == res.noise and overrides["architecture.depth"] == res.architecture.depth
    # the summary says the noise in the targets' units too (the kernel's own scale is free)
    m = np.mean(np.diag(kernel(res.architecture, X[idx], dtype="float64")))
    assert res.relative_noise == pytest.approx(res.noise / m, rel=1e-9)
    assert f"noise variance in the targets' units {res.noise * res.amplitude:.4g}" in res.summary()


def test_the_noise_stays_above_what_the_storage_resolves():
    # noiseless targets: the likelihood wants the noise at its lower bound
    x = np.random.default_rng(3).standard_normal((60, 3))
    y = np.sin(x[:, 0]) + 0.5 * x[:, 1]
    start = Architecture(2, "relu", 1.6, 0.1)
    free = fit_hyperparameters(x, y, arch=start, noise=1e-2, subset=None)
    floor = storage_noise_floor("float32", 36000)  # kin40k's training split in float32 tiles
    assert floor == pytest.approx(8 * math.sqrt(36000) * np.finfo(np.float32).eps / 2)  # 9.0e-5
    assert storage_noise_floor("float64", 36000) == 1e-6  # the fit's own bound
    held = fit_hyperparameters(x, y, arch=start, noise=1e-2, subset=None, noise_floor=floor)
    assert free.relative_noise < floor  # (at the fit's own bound, 1e-6, for these noiseless targets)
    assert held.relative_noise == pytest.approx(floor) and held.noise_at_floor
    assert held.log_marginal_likelihood < free.log_marginal_likelihood  # a constraint that binds costs likelihood
    for bad in (-1.0, 10.0, "1e-4", math.nan, True):
        with pytest.raises(ValueError, match="noise_floor: expected a number in"):
            fit_hyperparameters(x, y, arch=start, noise_floor=bad)


def test_subset_size_from_a_memory_budget():
    assert subset_size(10_000, 2000) == 2000
    assert subset_size(10_000, 0, memory=7 * 8 * 500 ** 2) == 500
    assert subset_size(300, 2000, memory=1 << 30) == 300
    with pytest.raises(ValueError, match="at least 2 points"):
        subset_size(10, 1)


QUICK = __import__("pathlib").Path(__file__).resolve().parents[1] / "pipelines" / "quickstart.toml"


def test_cli_fit_prints_and_writes_a_pipeline_that_runs_with_the_fitted_values(tmp_path, capsys):
    from nngp_dask.cli import main
    from nngp_dask.pipeline import load_config

    out = tmp_path / "fitted.toml"
    argv = ["fit", str(QUICK), "--set", f"run.output={tmp_path / 'run'}", "--set", "data.n_train=120",
            "--subset", "60", "--depths", "2", "--ard", "--no-progress", "--write", str(out)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "fitted on 60 points" in text and "solver.noise" in text
    fit = __import__("json").loads((tmp_path / "run" / "fit.json").read_text())
    cfg = load_config(out)
    assert cfg["fit"]["enabled"] is False
    for dotted, value in fit["overrides"].items():
        section, _, key = dotted.partition(".")
        assert cfg[section][key] == pytest.approx(value, rel=1e-12)
    assert len(cfg["architecture"]["input_weight_var"]) == 8 and cfg["architecture"]["depth"] == 2
    assert main(argv) == 0  # a re-run reuses fit.json (same fingerprint)
    assert __import__("json").loads((tmp_path / "run" / "fit.json").read_text()) == fit
    assert main(["fit", str(QUICK), "--depths", "x"]) == 2
    assert "--depths: expected MIN:MAX" in capsys.readouterr().err
    assert main(["fit", str(QUICK), "--set", "fit.depth_min=3", "--set", "fit.depth_max=2"]) == 2
    assert "fit.depth_max: expected a depth >= fit.depth_min (3), got 2" in capsys.readouterr().err


def test_pipeline_fit_stage_solves_and_scores_with_the_fitted_values(tmp_path, cluster_client):
    from nngp_dask.pipeline import load_config, run_pipeline
    from nngp_dask.pipeline.datasets import load_dataset

    cfg = load_config(QUICK, {"run.output": str(tmp_path / "run"), "data.n_train": 150, "data.n_test": 40,
                              "kernel.dtype": "float64", "solver.method": "cholesky", "fit.enabled": True,
                              "fit.subset": 80, "fit.depth_min": 2, "fit.depth_max": 2,
                                  "solver.fit_amplitude": False})  # the subset's amplitude, not the full data's
    rep = run_pipeline(cfg, client=cluster_client, plots=False, progress=False)
    fitted = rep["stages"]["fit"]["detail"]["fitted"]
    a, s = rep["config"]["architecture"], rep["config"]["solver"]
    assert (a["weight_var"], a["bias_var"], s["noise"], s["amplitude"]) == (
        fitted["architecture.weight_var"], fitted["architecture.bias_var"], fitted["solver.noise"],
        fitted["solver.amplitude"])
    assert rep["kernel"]["architecture"]["weight_var"] == a["weight_var"]  # the store holds the fitted kernel
    # oracle: the dense GP with the fitted values, in the pipeline's standardised target units
    ds = load_dataset(cfg["data"], task="regression", seed=0)
    xtr, xte = ds.x_train.read(0, 150), ds.x_test.read(0, 40)
    ytr, yte = np.asarray(ds.y_train).ravel(), np.asarray(ds.y_test).ravel()
    mu_y, sd_y = ytr.mean(), ytr.std()
    arch = Architecture(2, "relu", a["weight_var"], a["bias_var"])
    c = kernel(arch, xtr, dtype="float64") + s["noise"] * np.eye(150)
    ks = kernel(arch, xte, xtr, dtype="float64")
    mean = ks @ np.linalg.solve(c, (ytr - mu_y) / sd_y)
    var = s["amplitude"] * (np.diag(kernel(arch, xte, dtype="float64")) - np.sum(ks * np.linalg.solve(c, ks.T).T, 1)
                            + s["noise"])
    nlpd = -np.mean(scipy.stats.norm(mean * sd_y + mu_y, np.sqrt(var) * sd_y).logpdf(yte))
    assert rep["metrics"]["nlpd"] == pytest.approx(nlpd, rel=1e-6)
    assert rep["metrics"]["rmse"] == pytest.approx(np.sqrt(np.mean((mean * sd_y + mu_y - yte) ** 2)), rel=1e-8)
