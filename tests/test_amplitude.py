"""The closed-form kernel amplitude against a dense marginal-likelihood oracle, and what it buys."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.optimize
from scipy.stats import multivariate_normal

from nngp_dask import Architecture, kernel
from nngp_dask.gp import amplitude_mle, coverage, nlpd
from nngp_dask.pipeline.evaluation import Targets, evaluate

ARCH = Architecture(3, "relu", 1.6, 0.1)


def _problem(amplitude: float, n: int = 160, m: int = 120, k: int = 3, noise: float = 0.05, seed: int = 3):
    """Targets drawn from the GP with kernel ``amplitude * K`` and noise ``amplitude * noise``."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n + m, 5))
    kall = kernel(ARCH, x, dtype="float64")
    cov = amplitude * (kall + noise * np.eye(n + m))
    y = np.linalg.cholesky(cov) @ rng.standard_normal((n + m, k))
    return kall, y, n, noise


def test_amplitude_is_the_dense_marginal_likelihood_optimum():
    kall, y, n, noise = _problem(7.0)
    c0 = kall[:n, :n] + noise * np.eye(n)
    alpha = np.linalg.solve(c0, y[:n])
    s_star = amplitude_mle(y[:n], alpha)

    def neg_log_ml(log_s: float) -> float:
        # the dense density of every column under N(0, s C0): no closed form used
        dist = multivariate_normal(np.zeros(n), np.exp(log_s) * c0)
        return -float(np.sum(dist.logpdf(y[:n].T)))

    opt = scipy.optimize.minimize_scalar(neg_log_ml, bounds=(-5.0, 5.0), method="bounded",
                                         options={"xatol": 1e-10})
    assert s_star == pytest.approx(np.exp(opt.x), rel=1e-6)
    assert amplitude_mle(y[:n, 0], alpha[:, 0]) == pytest.approx(float(y[:n, 0] @ alpha[:, 0]) / n)
    with pytest.raises(ValueError, match="alpha: expected the shape of y"):
        amplitude_mle(y[:n], alpha[:, :1])


def test_fitted_amplitude_calibrates_a_10x_wrong_kernel():
    kall, y, n, noise = _problem(10.0, seed=5)
    k, ks, kss = kall[:n, :n], kall[n:, :n], kall[n:, n:]
    a = k + noise * np.eye(n)
    alpha = np.linalg.solve(a, y[:n])
    mean = ks @ alpha
    var = np.diag(kss) - np.einsum("ij,ji->i", ks, np.linalg.solve(a, ks.T))
    s = amplitude_mle(y[:n], alpha)
    assert 5.0 < s < 20.0  # the truth is 10
    truth = y[n:]
    wrong, fitted = nlpd(truth, mean, (var + noise)[:, None]), nlpd(truth, mean, s * (var + noise)[:, None])
    assert fitted < wrong - 0.5
    # evaluate() reports both, and the fitted intervals cover about what they promise
    metrics = evaluate("regression", truth[:, 0], mean[:, 0], var, noise, Targets(y[:n, 0], None), s)
    assert metrics["nlpd"] < metrics["nlpd_unfitted"] and metrics["amplitude"] == s
    assert abs(metrics["coverage"]["observed"][8] - 0.9) < 0.1 < abs(metrics["coverage_unfitted"][8] - 0.9)
    assert "amplitude" not in evaluate("regression", truth[:, 0], mean[:, 0], var, noise, Targets(y[:n, 0], None))


def test_coverage_counts_entries_inside_central_intervals():
    y = np.array([0.0, 1.0, 2.0, 3.0])
    # |errors| 0, 1, 2, 3 with unit sd; half-widths 0.674, 1.96 and 3.29 hold 1, 2 and 4 of them
    assert coverage(y, np.zeros(4), np.ones(4), levels=(0.5, 0.95, 0.999)) == [0.25, 0.5, 1.0]
    # the variance broadcasts over columns; sd 2 doubles the half-widths
    assert coverage(np.column_stack([y, y]), np.zeros((4, 2)), np.full((4, 1), 4.0), levels=(0.5,)) == [0.5]
