"""The one target encoding, the one set of metrics and the one posterior, against their definitions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg

from nngp_dask.gp import (accuracy, class_index, confusion_matrix, encode_labels, nlpd, one_hot_targets,
                          posterior_mean, predict_labels, rmse, variance_from_cholesky, variance_from_eigh,
                          variance_from_solve, variance_lowrank)
from nngp_dask.linalg import cholesky_factor


def test_centered_targets_are_lee_et_al_for_ten_classes():
    y = one_hot_targets(np.arange(10), 10)
    assert np.all(y[np.eye(10, dtype=bool)] == 0.9) and np.all(y[~np.eye(10, dtype=bool)] == -0.1)
    y3 = one_hot_targets(np.array([2, 0]), 3)
    np.testing.assert_array_equal(y3, [[-1 / 3, -1 / 3, 1 - 1 / 3], [1 - 1 / 3, -1 / 3, -1 / 3]])
    np.testing.assert_array_equal(one_hot_targets(np.array([1]), 2, "onehot"), [[0.0, 1.0]])
    with pytest.raises(ValueError, match="^targets"):
        one_hot_targets(np.array([0]), 2, "signed")


def test_unseen_labels_match_no_class():
    classes = np.array([3, 5, 7])
    np.testing.assert_array_equal(class_index([5, 4, 8, 3], classes), [1, -1, -1, 0])
    index, y = encode_labels(np.array([7, 9]), classes)
    np.testing.assert_array_equal(index, [2, -1])
    np.testing.assert_array_equal(y[1], np.full(3, -1 / 3))
    assert list(predict_labels(np.array([[0.1, 0.5, 0.2]]), classes)) == [5]


def test_metrics_are_their_definitions():
    y = np.array([0.0, 1.0, 3.0])
    mu = np.array([0.5, 1.0, 2.0])
    var = np.array([0.5, 1.0, 2.0])
    assert rmse(y, mu) == pytest.approx(math.sqrt((0.25 + 0 + 1) / 3), rel=1e-15)
    expected = np.mean([-math.log(math.sqrt(2 * math.pi * v)) - (a - b) ** 2 / (2 * v) for a, b, v in zip(y, mu, var)])
    assert nlpd(y, mu, var) == pytest.approx(-expected, rel=1e-14)
    assert accuracy([1, 2, 3], [1, 0, 3]) == pytest.approx(2 / 3)
    assert confusion_matrix([0, 1, 1, 9], [0, 0, 1, 1], [0, 1]) == [[1, 0], [1, 1]]


def test_every_variance_route_agrees():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 3))
    xs = rng.standard_normal((7, 3))
    k_all = np.exp(-0.5 * ((np.vstack([x, xs])[:, None] - np.vstack([x, xs])[None]) ** 2).sum(-1))
    k, kc, prior = k_all[:40, :40], k_all[40:, :40], np.diag(k_all)[40:]
    noise = 0.1
    a = k + noise * np.eye(40)
    want = np.maximum(prior - np.einsum("ij,ji->i", kc, np.linalg.solve(a, kc.T)), 0)
    lower = cholesky_factor(k, noise)[0]
    np.testing.assert_allclose(variance_from_cholesky(prior, kc.T, lower), want, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(variance_from_solve(prior, kc.T, np.linalg.solve(a, kc.T)), want, rtol=1e-10,
                               atol=1e-13)
    lam, u = scipy.linalg.eigh(k)
    np.testing.assert_allclose(variance_from_eigh(prior, kc @ u, 1 / (lam + noise)), want, rtol=1e-10, atol=1e-13)
    factor = u * np.sqrt(np.maximum(lam, 0))  # the full-rank factor: F F^T = K, exact
    np.testing.assert_allclose(variance_lowrank(prior, kc @ factor, factor, noise), want, rtol=1e-8, atol=1e-10)
    y = rng.standard_normal((40, 2))
    np.testing.assert_allclose(posterior_mean(kc, np.linalg.solve(a, y)), kc @ np.linalg.solve(a, y))
