"""Finite-width sampler and the Monte Carlo validation of the NNGP kernel."""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import FrozenInstanceError

import numpy as np
import pytest

from nngp_dask import ACTIVATIONS, Architecture, Elementwise, kernel
from nngp_dask.validate_cli import add_arguments, run_from_args
from nngp_dask.validation import (ValidationResult, average_kernels, default_inputs, empirical_covariance, layer_map,
                                  sample_kernels, sample_outputs, validate_kernel)

X = default_inputs(4, 8, seed=0)


def _within(cov, stderr, k, width, *, sigmas=5.0, bias=0.5):
    """|cov - K| <= sigmas * stderr + bias / width * max|K| entrywise (the O(1/width) allowance)."""
    tol = sigmas * stderr + bias / width * np.abs(k).max()
    return np.abs(cov - k) <= tol


# --------------------------------------------------------------------------------------------
# Sampler


def test_sampler_reproducible_batch_independent_and_nested():
    arch = Architecture(2, "relu", 2.0, 0.1)
    a = sample_outputs(arch, X, width=32, networks=40, seed=3, batch=7)
    b = sample_outputs(arch, X, width=32, networks=40, seed=3, batch=40)
    c = sample_outputs(arch, X, width=32, networks=10, seed=3)
    d = sample_outputs(arch, X, width=32, networks=40, seed=4)
    assert a.shape == (40, 4)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a[:10], c)
    assert not np.allclose(a, d)


def test_sampler_kernels_belong_to_the_same_networks():
    """Row i of sample_kernels is the readout-integrated covariance of row i's network:
    with the readout drawn, E over many networks of f f^T equals the mean kernel."""
    arch = Architecture(1, "erf", 1.5, 0.2)
    k_last = sample_kernels(arch, X, width=16, networks=30, seed=1)
    k_all = sample_kernels(arch, X, width=16, networks=30, seed=1, all_depths=True)
    assert k_all.shape == (30, 2, 4, 4)
    np.testing.assert_array_equal(k_all[:, -1], k_last)
    k0 = kernel(arch, X, dtype="float64", all_depths=True)[0]
    np.testing.assert_allclose(k_all[:, 0], np.broadcast_to(k0, (30, 4, 4)), rtol=1e-12)


def test_depth_zero_weights_and_bias_variances():
    """A depth-0 network is w.x + b with w ~ N(0, weight_var / d), b ~ N(0, bias_var):
    covariance bias_var + weight_var <x, x'> / d."""
    arch = Architecture(0, "relu", 3.0, 0.5)
    f = sample_outputs(arch, X, width=1, networks=20000, seed=0)
    cov, se = empirical_covariance(f)
    k = kernel(arch, X, dtype="float64")
    assert np.all(np.abs(cov - k) <= 5 * se)
    assert abs(f.mean(axis=0)).max() < 5 * math.sqrt(k.diagonal().max() / 20000)


def test_projected_and_dense_sampling_have_the_same_distribution():
    """Width 2: strongly non-Gaussian outputs; second and fourth moments agree between methods."""
    arch = Architecture(2, "relu", 2.0, 0.1)
    stats = {}
    for method in ("dense", "projected"):
        f = sample_outputs(arch, X, width=2, networks=20000, seed=11 if method == "dense" else 12, method=method)
        p2 = f[:, 0] * f[:, 1]
        p4 = f[:, 0] ** 2 * f[:, 1] ** 2
        stats[method] = [(p.mean(), p.std(ddof=1) / math.sqrt(p.size)) for p in (p2, p4)]
    for (m1, s1), (m2, s2) in zip(stats["dense"], stats["projected"]):
        assert abs(m1 - m2) <= 5 * math.hypot(s1, s2)
    # the dense path also matches the kernel at a moderate width
    k = kernel(arch, X, dtype="float64")
    cov, se = average_kernels(sample_kernels(arch, X, width=128, networks=300, seed=2, method="dense"))
    assert _within(cov, se, k, 128).all()


@pytest.mark.parametrize("name", ["relu", "erf", "tanh"])
def test_covariance_at_width_4096_matches_kernel(name):
    """Raw outputs (second moment) and readout-integrated kernels both agree with the NNGP kernel
    within 5 standard errors plus an O(1/width) bias allowance."""
    arch = Architecture(2, name, 2.0, 0.1)
    k = kernel(arch, X, dtype="float64")
    width, nets = 4096, 600
    cov, se = empirical_covariance(sample_outputs(arch, X, width=width, networks=nets, seed=5))
    assert _within(cov, se, k, width).all(), (cov, k, se)
    # the tolerance is meaningful: 5 s.e. of a Gaussian second moment with 600 samples is ~ 30 %
    assert (5 * se).max() / np.abs(k).max() < 0.4
    cov, se = average_kernels(sample_kernels(arch, X, width=width, networks=nets, seed=6))
    assert _within(cov, se, k, width).all(), (cov, k, se)
    assert (np.abs(cov - k) / np.abs(k).max()).max() < 5e-3  # the readout estimator is tight


@pytest.mark.parametrize("name", [a for a in ACTIVATIONS if a != "two_slope"])
def test_every_activation_samples(name):
    arch = Architecture(2, name, 1.5, 0.1)
    for dtype in (np.float64, np.float32):
        f = sample_outputs(arch, X, width=8, networks=5, seed=0, dtype=dtype)
        assert f.shape == (5, 4) and f.dtype == dtype and np.isfinite(f).all()


def test_user_callable_activation_matches_kernel():
    act = Elementwise(fn=np.sin, name="sin")
    arch = Architecture(2, act, 2.0, 0.1)
    k = kernel(arch, X, dtype="float64")
    cov, se = average_kernels(sample_kernels(arch, X, width=1024, networks=200, seed=1))
    assert _within(cov, se, k, 1024).all()


def test_empirical_covariance_matches_naive():
    f = np.random.default_rng(0).standard_normal((50, 3))
    cov, se = empirical_covariance(f)
    prod = f[:, :, None] * f[:, None, :]
    np.testing.assert_allclose(cov, prod.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(se, prod.std(axis=0, ddof=1) / math.sqrt(50), rtol=1e-9)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"width": 0}, "width"),
        ({"networks": 0}, "networks"),
        ({"seed": -1}, "seed"),
        ({"batch": 0}, "batch"),
        ({"method": "fast"}, "method"),
        ({"dtype": np.int32}, "dtype"),
    ],
)
def test_sampler_rejects_bad_arguments(kwargs, match):
    args = {"width": 4, "networks": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        sample_outputs(Architecture(1), X, **args)


# --------------------------------------------------------------------------------------------
# Validation


def test_layer_map_reproduces_the_kernel_recursion():
    for name in ("relu", "erf", "tanh"):
        arch = Architecture(3, name, 1.8, 0.2)
        ks = kernel(arch, X, dtype="float64", all_depths=True)
        np.testing.assert_allclose(layer_map(arch, ks[:-1]), ks[1:], rtol=1e-9, atol=1e-12)


def test_error_at_width_64_exceeds_error_at_4096():
    arch = Architecture(2, "relu", 2.0, 0.1)
    r = validate_kernel(arch, X, widths=(64, 4096), networks=300, seed=1)
    assert r.errors[0] > 2 * r.errors[1]
    # the finite-width bias is resolved at both widths and falls about 64-fold
    assert all(r.resolved)
    assert 20 < r.biases[0] / r.biases[1] < 200
    assert r.consistent


def test_validation_slopes_and_report():
    arch = Architecture(2, "tanh", 2.0, 0.1)
    r = validate_kernel(arch, X, max_width=256, networks=256, seed=0)
    assert r.widths == (4, 8, 16, 32, 64, 128, 256)
    assert r.bias_fit is not None and -1.3 < r.bias_fit.slope < -0.7
    assert r.sample_fit is not None and -0.85 < r.sample_fit.slope < -0.2
    assert r.error_fit is not None and r.error_fit.slope < -0.3
    assert r.consistent and r.max_z < 6
    assert 0.02 < r.bias_coefficient < 0.2  # bias ~ c / width
    for e, f in zip(r.errors, r.noise_floors):
        assert e < 5 * f + 0.2 / 4  # error = noise + bias
    text = r.table()
    assert "slope of bias vs width" in text and "256" in text and "consistent" in text
    d = json.loads(json.dumps(r.to_dict()))
    assert d["widths"] == list(r.widths) and d["architecture"]["depth"] == 2
    assert np.asarray(d["kernel"]).shape == (4, 4)
    with pytest.raises(FrozenInstanceError):
        r.seed = 1  # type: ignore[misc]
    assert isinstance(r, ValidationResult)


def test_depth_one_has_no_bias_and_output_estimator():
    arch = Architecture(1, "relu", 2.0, 0.0)
    r = validate_kernel(arch, X, widths=(8, 64), networks=200, estimator="outputs")
    assert r.biases == (0.0, 0.0) and r.bias_fit is None and r.bias_coefficient is None
    assert r.estimator == "outputs" and r.consistent
    # raw outputs: the noise floor does not shrink with width (about sqrt(2 / networks))
    assert 0.03 < r.noise_floors[1] < 0.3


def test_kernel_check_detects_a_wrong_kernel():
    """Networks use 1.1 * tanh while the kernel is computed for tanh: the check fails."""

    class Mislabelled(Elementwise):
        def __call__(self, x):
            return 1.1 * np.tanh(x)

    arch = Architecture(2, Mislabelled(fn=np.tanh, name="tanh"), 2.0, 0.1)
    r = validate_kernel(arch, X, widths=(256,), networks=100, seed=0)
    assert not r.consistent and r.max_z > 10
    assert "INCONSISTENT" in r.table()


def test_validation_rejects_bad_arguments():
    arch = Architecture(2)
    with pytest.raises(ValueError, match="estimator"):
        validate_kernel(arch, X, estimator="nope")
    with pytest.raises(ValueError, match="networks"):
        validate_kernel(arch, X, networks=3)
    with pytest.raises(ValueError, match="widths"):
        validate_kernel(arch, X, widths=(64, 8))
    with pytest.raises(ValueError, match="points"):
        default_inputs(0)


def _parse(argv):
    return add_arguments(argparse.ArgumentParser()).parse_args(argv)


def test_cli_prints_table_and_writes_figures(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "figs"
    args = _parse(["--depth", "2", "--activation", "erf", "--max-width", "32", "--networks", "64",
                   "--points", "3", "--out", str(out)])
    assert run_from_args(args) == 0
    text = capsys.readouterr().out
    assert "slope of error vs width" in text and "slope of error vs networks" in text
    for name in ("error_vs_width.png", "joint_distribution.png", "result.json"):
        assert (out / name).stat().st_size > 0
    assert json.loads((out / "result.json").read_text())["widths"] == [4, 8, 16, 32]


def test_cli_no_plots(tmp_path, capsys):
    args = _parse(["--max-width", "16", "--networks", "32", "--out", str(tmp_path), "--no-plots"])
    assert args.points == 4 and args.activation == "relu"
    assert run_from_args(args) == 0
    assert "slope" in capsys.readouterr().out
    assert not list(tmp_path.glob("*.png"))
