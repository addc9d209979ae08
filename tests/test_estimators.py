"""scikit-learn estimators: the estimator checks, scikit-learn's GP as oracle, out of core = in memory."""

from __future__ import annotations

import numpy as np
import pytest

sklearn = pytest.importorskip("sklearn")

from sklearn.gaussian_process import GaussianProcessRegressor  # noqa: E402
from sklearn.model_selection import GridSearchCV  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402
from sklearn.utils.estimator_checks import parametrize_with_checks  # noqa: E402

from nngp_dask.estimators import NNGPClassifier, NNGPKernel, NNGPRegressor  # noqa: E402
from nngp_dask.select import marginal_likelihood  # noqa: E402


pytestmark = pytest.mark.usefixtures("single_threaded_blas")


def _expected_failed_checks(estimator):
    # Every applicable check passes (scikit-learn 1.9). The pandas checks are skipped by
    # scikit-learn itself when pandas is not installed, and the array-API check unless
    # SCIPY_ARRAY_API=1 (the estimators are NumPy-only, which that check then reports).
    return {}


# The optimizer (the default) runs in every check, on a small subset at one depth: the checks test
# the conventions, and the defaults' four depths on up to 1,000 points would cost ~30 s of CPU.
_FAST_FIT = dict(fit_depths=(2,), fit_subset=50)


@parametrize_with_checks([NNGPRegressor(**_FAST_FIT), NNGPClassifier(**_FAST_FIT)],
                         expected_failed_checks=_expected_failed_checks)
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)


def _data(n=80, m=25, d=4, seed=0, outputs=1):
    rng = np.random.default_rng(seed)
    x, xt = rng.standard_normal((n, d)), rng.standard_normal((m, d))
    f = lambda z: np.column_stack([np.sin(z[:, i] + 0.5 * z[:, i + 1]) for i in range(outputs)])  # noqa: E731
    y = f(x) + 0.05 * rng.standard_normal((n, outputs))
    return x, (y[:, 0] if outputs == 1 else y), xt


@pytest.mark.parametrize("outputs", [1, 3])
@pytest.mark.parametrize("kind", ["nngp", "ntk"])
def test_regressor_equals_sklearn_gaussian_process(outputs, kind):
    x, y, xt = _data(outputs=outputs)
    params = dict(depth=3, activation="relu", weight_var=1.6, bias_var=0.1)
    ours = NNGPRegressor(noise=0.02, kind=kind, optimizer=None, **params).fit(x, y)
    gpr = GaussianProcessRegressor(kernel=NNGPKernel(kind=kind, **params), alpha=0.02, optimizer=None).fit(x, y)
    mean, std = ours.predict(xt, return_std=True)
    ref_mean, ref_std = gpr.predict(xt, return_std=True)
    assert mean.shape == ref_mean.shape and std.shape == ref_std.shape
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(std, ref_std, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(ours.predict(xt), ref_mean, rtol=1e-9, atol=1e-12)
    # the sweep's exact marginal likelihood is scikit-learn's
    k = NNGPKernel(kind=kind, **params)(x)
    assert marginal_likelihood(k, y, 0.02).value == pytest.approx(gpr.log_marginal_likelihood_value_, rel=1e-9)


def test_grid_search_over_noise_in_a_pipeline():
    x, y, _ = _data(n=90)
    pipe = make_pipeline(StandardScaler(), NNGPRegressor(depth=2, optimizer=None))
    search = GridSearchCV(pipe, {"nngpregressor__noise": [1e-3, 1e-2, 1e-1, 1.0],
                                 "nngpregressor__depth": [1, 2]}, cv=3).fit(x, y)
    assert search.best_params_["nngpregressor__noise"] in (1e-3, 1e-2, 1e-1, 1.0)
    assert search.best_score_ > 0.5
    scores = search.cv_results_["mean_test_score"]
    assert np.all(np.isfinite(scores)) and search.best_score_ == scores.max()


def test_classifier_accuracy_targets_and_decision_shapes():
    rng = np.random.default_rng(2)
    centers = np.array([[3.0, 0, 0], [0, 3.0, 0], [0, 0, 3.0]])
    labels = np.array(["a", "b", "c"])[rng.integers(0, 3, 150)]
    x = centers[np.searchsorted(["a", "b", "c"], labels)] + rng.standard_normal((150, 3))
    clf = NNGPClassifier(depth=2, noise=0.1, optimizer=None).fit(x[:100], labels[:100])
    assert list(clf.classes_) == ["a", "b", "c"]
    assert clf.score(x[100:], labels[100:]) > 0.9
    assert clf.decision_function(x[100:]).shape == (50, 3)
    onehot = NNGPClassifier(depth=2, noise=0.1, targets="onehot", optimizer=None).fit(x[:100], labels[:100])
    np.testing.assert_array_equal(onehot.predict(x[100:]), clf.predict(x[100:]))
    binary = NNGPClassifier(depth=2, noise=0.1, optimizer=None).fit(x[:100], labels[:100] == "a")
    dec = binary.decision_function(x[100:])
    assert dec.shape == (50,)
    np.testing.assert_array_equal(binary.predict(x[100:]), dec > 0)
    assert not hasattr(clf, "predict_proba")


def test_failed_cholesky_advises_to_increase_noise():
    x, y, _ = _data(n=30)
    x = np.vstack([x, x])
    y = np.concatenate([y, y])
    with pytest.raises(np.linalg.LinAlgError, match="Increase noise"):
        NNGPRegressor(noise=0.0, optimizer=None).fit(x, y)
    with pytest.raises(ValueError, match="noise"):
        NNGPRegressor(noise=-1.0).fit(x, y)


def test_out_of_core_equals_in_memory(tmp_path, thread_client):
    x, y, xt = _data(n=90, m=30)
    kw = dict(depth=2, weight_var=1.4, bias_var=0.2, noise=0.01, normalize="unit_norm", optimizer=None)
    mem = NNGPRegressor(**kw).fit(x, y)
    ooc = NNGPRegressor(out_of_core=True, store=str(tmp_path / "k.zarr"), tile=40, **kw).fit(x, y)
    assert not mem.out_of_core_ and ooc.out_of_core_ and ooc.store_.endswith("k.zarr")
    np.testing.assert_allclose(ooc.alpha_, mem.alpha_, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(ooc.predict(xt), mem.predict(xt), rtol=1e-9, atol=1e-12)
    m1, s1 = ooc.predict(xt, return_std=True)
    m0, s0 = mem.predict(xt, return_std=True)
    np.testing.assert_allclose(m1, m0, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(s1, s0, rtol=1e-6, atol=1e-8)
    # "auto" switches above max_in_memory, into a temporary store
    auto = NNGPClassifier(max_in_memory=50, tile=64, **kw).fit(x, y > 0)
    ref = NNGPClassifier(**kw).fit(x, y > 0)
    assert auto.out_of_core_ and auto.store_ is not None
    np.testing.assert_allclose(auto.decision_function(xt), ref.decision_function(xt), rtol=1e-9, atol=1e-12)
    # a refit on other data replaces the store; the older estimator notices instead of mixing them up
    NNGPRegressor(out_of_core=True, store=str(tmp_path / "k.zarr"), tile=40, **kw).fit(x[:60], y[:60])
    with pytest.raises(ValueError, match="rebuilt"):
        ooc.predict(xt)


def test_nngp_kernel_in_gaussian_process_regressor_with_gradients():
    from sklearn.gaussian_process.kernels import WhiteKernel

    x, y, xt = _data(n=40)
    kern = NNGPKernel(depth=2, weight_var=1.6, bias_var=0.1)
    k, grad = kern(x, eval_gradient=True)
    assert grad.shape == (40, 40, 2)  # theta = (log bias_var, log weight_var), scikit-learn's order
    assert [h.name for h in kern.hyperparameters] == ["bias_var", "weight_var"]
    h = 1e-5
    for p in range(2):
        step = h * np.eye(2)[p]
        up, down = kern.clone_with_theta(kern.theta + step), kern.clone_with_theta(kern.theta - step)
        np.testing.assert_allclose(grad[..., p], (up(x) - down(x)) / (2 * h), rtol=1e-6, atol=1e-9)
    fixed = NNGPKernel(depth=2, weight_var_bounds="fixed", bias_var_bounds="fixed")
    assert fixed(x, eval_gradient=True)[1].shape == (40, 40, 0)
    gpr = GaussianProcessRegressor(kernel=NNGPKernel(depth=2) + WhiteKernel(1e-2), random_state=0).fit(x, y)
    assert gpr.log_marginal_likelihood_value_ > GaussianProcessRegressor(
        kernel=NNGPKernel(depth=2) + WhiteKernel(1e-2), optimizer=None).fit(x, y).log_marginal_likelihood_value_
    assert gpr.score(xt, np.sin(xt[:, 0] + 0.5 * xt[:, 1])) > 0.8


def test_normalize_y_sample_y_and_likelihood_equal_gaussian_process_regressor():
    x, y, xt = _data(n=50)
    y = 3.0 * y + 10.0
    params = dict(depth=2, weight_var=1.6, bias_var=0.1)
    ours = NNGPRegressor(noise=0.02, optimizer=None, normalize_y=True, **params).fit(x, y)
    gpr = GaussianProcessRegressor(kernel=NNGPKernel(**params), alpha=0.02, optimizer=None, normalize_y=True).fit(x, y)
    assert ours.log_marginal_likelihood_value_ == pytest.approx(gpr.log_marginal_likelihood_value_, rel=1e-9)
    for a, b in zip(ours.predict(xt[:8], return_std=True), gpr.predict(xt[:8], return_std=True)):
        np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-10)
    draws, ref = ours.sample_y(xt[:8], 3, random_state=1), gpr.sample_y(xt[:8], 3, random_state=1)
    assert draws.shape == ref.shape == (8, 3)
    np.testing.assert_allclose(draws, ref, rtol=1e-5, atol=1e-6)


def test_default_optimizer_fits_then_solves_with_the_fitted_values():
    from nngp_dask.select import fit_hyperparameters

    x, y, xt = _data(n=60)
    reg = NNGPRegressor(fit_depths=(1, 2), fit_subset=40, random_state=0).fit(x, y)
    seed = int(np.random.RandomState(0).randint(2**31 - 1))
    ref = fit_hyperparameters(x, y, arch=reg.arch_.replace(depth=3, weight_var=1.6, bias_var=0.1), noise=1e-2,
                              depths=(1, 2), subset=40, seed=seed)
    assert reg.arch_ == ref.architecture and reg.noise_ == ref.noise and reg.amplitude_ == ref.amplitude
    assert reg.log_marginal_likelihood_value_ != ref.log_marginal_likelihood  # the full set's, not the subset's
    fixed = NNGPRegressor(optimizer=None, depth=ref.architecture.depth, weight_var=ref.architecture.weight_var,
                          bias_var=ref.architecture.bias_var, noise=ref.noise).fit(x, y)
    np.testing.assert_allclose(reg.predict(xt), fixed.predict(xt), rtol=1e-10)
    np.testing.assert_allclose(reg.predict(xt, return_std=True)[1],
                               np.sqrt(ref.amplitude) * fixed.predict(xt, return_std=True)[1], rtol=1e-8)
    assert reg.score(xt, np.sin(xt[:, 0] + 0.5 * xt[:, 1])) > 0.8
    with pytest.raises(ValueError, match="optimizer: expected None or one of"):
        NNGPRegressor(optimizer="adam").fit(x, y)
