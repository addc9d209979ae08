"""The kernel core against independent oracles, identities, and its own contracts."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.special import erf

from nngp_dask import Architecture, Elementwise, InputError, diagonals, get_activation, kernel, normalize, tile
from nngp_dask.finite_width import empirical_covariance, sample_outputs

from .oracles import gauss_hermite_2d, polar_dual, reference_kernel

RNG = np.random.default_rng(1234)
X = RNG.standard_normal((7, 5))
X[3] = X[1]  # identical points
X[5] = 0.0  # a zero vector

TWO_SLOPES = {"relu": (0.0, 1.0), "abs": (-1.0, 1.0), "identity": (1.0, 1.0)}


def _two_slope_fn(a, b):
    return lambda x: np.where(x < 0, a * x, b * x)


def _two_slope_deriv(a, b):
    return lambda x: np.where(x < 0, a, b) * np.ones_like(x)


HOMOGENEOUS = [
    ("relu", {}, (0.0, 1.0)),
    ("leaky_relu", {"slope": 0.2}, (0.2, 1.0)),
    ("abs", {}, (-1.0, 1.0)),
    ("identity", {}, (1.0, 1.0)),
    ("two_slope", {"negative_slope": -0.3, "positive_slope": 0.7}, (-0.3, 0.7)),
]


@pytest.mark.parametrize("name,opts,slopes", HOMOGENEOUS)
@pytest.mark.parametrize("depth", [1, 3])
def test_two_slope_family_matches_polar_quadrature(name, opts, slopes, depth):
    arch = Architecture(depth, {"name": name, **opts}, weight_var=1.7, bias_var=0.2)
    a, b = slopes
    f, fp = _two_slope_fn(a, b), _two_slope_deriv(a, b)
    k_ref, t_ref = reference_kernel(
        arch, X, lambda p, q, r: polar_dual(f, 1, p, q, r), lambda p, q, r: polar_dual(fp, 0, p, q, r)
    )
    k, t = kernel(arch, X, kind="both", dtype="float64")
    np.testing.assert_allclose(k, k_ref, rtol=1e-12, atol=1e-12)
    # E[phi' phi'] has a square-root singularity at c = 1, so at identical points a rounding
    # of 1e-16 in the oracle's own c shows as ~1e-8: that is the problem's conditioning.
    np.testing.assert_allclose(t, t_ref, rtol=1e-7, atol=1e-12)
    off = ~np.eye(len(X), dtype=bool) & ~np.isclose(k_ref, np.diag(k_ref)[:, None])
    np.testing.assert_allclose(t[off], t_ref[off], rtol=1e-11)


def test_step_matches_polar_quadrature():
    arch = Architecture(2, "step", weight_var=1.3, bias_var=0.4)
    f = lambda x: (x > 0).astype(float)  # noqa: E731
    k_ref, _ = reference_kernel(arch, X, lambda p, q, r: polar_dual(f, 0, p, q, r))
    k = kernel(arch, X, dtype="float64")
    # rows 1 and 3 are the same point at different indices: there the step kernel's
    # square-root singularity at c = 1 amplifies rounding (documented), elsewhere exact
    distinct = np.ones_like(k, dtype=bool)
    distinct[1, 3] = distinct[3, 1] = False
    np.testing.assert_allclose(k[distinct], k_ref[distinct], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(k[1, 3], k_ref[1, 3], rtol=1e-4)
    with pytest.raises(ValueError, match="NTK of activation 'step'"):
        kernel(arch, X, kind="ntk")


@pytest.mark.parametrize("depth", [1, 4])
def test_erf_matches_gauss_hermite(depth):
    arch = Architecture(depth, "erf", weight_var=2.0, bias_var=0.3)
    k_ref, t_ref = reference_kernel(
        arch,
        X,
        lambda p, q, r: gauss_hermite_2d(erf, p, q, r),
        lambda p, q, r: gauss_hermite_2d(lambda z: 2 / math.sqrt(math.pi) * np.exp(-z * z), p, q, r),
    )
    k, t = kernel(arch, X, kind="both", dtype="float64")
    # the oracle (degree-200 Gauss-Hermite) converges to ~1e-9 at the largest variance here (~10)
    np.testing.assert_allclose(k, k_ref, rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(t, t_ref, rtol=1e-8, atol=1e-12)


SMOOTH = {
    "tanh": (np.tanh, lambda z: 1 - np.tanh(z) ** 2),
    "sigmoid": (lambda z: 1 / (1 + np.exp(-z)), lambda z: np.exp(-z) / (1 + np.exp(-z)) ** 2),
    "gelu": (lambda z: 0.5 * z * (1 + erf(z / math.sqrt(2))),
             lambda z: 0.5 * (1 + erf(z / math.sqrt(2))) + z * np.exp(-z * z / 2) / math.sqrt(2 * math.pi)),
    "softplus": (lambda z: np.logaddexp(0, z), lambda z: 1 / (1 + np.exp(-z))),
    "silu": (lambda z: z / (1 + np.exp(-z)),
             lambda z: 1 / (1 + np.exp(-z)) + z * np.exp(-z) / (1 + np.exp(-z)) ** 2),
}


@pytest.mark.parametrize("name", sorted(SMOOTH))
def test_series_activations_match_gauss_hermite(name):
    """The Mehler series (one GEMV-like pass per entry) against per-entry 2-D quadrature."""
    f, fp = SMOOTH[name]
    arch = Architecture(3, name, weight_var=1.5, bias_var=0.1)
    k_ref, t_ref = reference_kernel(
        arch, X, lambda p, q, r: gauss_hermite_2d(f, p, q, r), lambda p, q, r: gauss_hermite_2d(fp, p, q, r)
    )
    k, t = kernel(arch, X, kind="both", dtype="float64")
    np.testing.assert_allclose(k, k_ref, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(t, t_ref, rtol=1e-8, atol=1e-9)


def test_series_truncation_bound_holds_for_user_function():
    """A user's callable: the documented bound sqrt(tail_i tail_j) covers the one-layer error."""
    fn = lambda z: np.sin(z) + 0.3 * z  # noqa: E731
    act = Elementwise(fn=fn, name="mine", degree=12)
    arch = Architecture(1, act, weight_var=2.0, bias_var=0.0)
    x = RNG.standard_normal((6, 4))
    k = kernel(arch, x, dtype="float64")
    k0 = 2.0 * x @ x.T / 4
    ref = np.array([[2.0 * gauss_hermite_2d(fn, k0[i, i], k0[j, j], k0[i, j]) for j in range(6)] for i in range(6)])
    tail = act.truncation_error(np.diag(k0))
    bound = 2.0 * np.sqrt(np.outer(tail, tail))
    assert np.all(np.abs(k - ref) <= bound + 1e-12)
    assert bound.max() > 1e-6  # degree 12 is visibly truncated: the bound is not vacuous
    precise = kernel(Architecture(1, Elementwise(fn=fn, name="mine", degree=60), 2.0, 0.0), x, dtype="float64")
    np.testing.assert_allclose(precise, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["relu", "erf", "tanh"])
def test_monte_carlo_finite_width_converges(name):
    """Sampled networks: within a few standard errors at width 1024; visibly worse at width 4."""
    arch = Architecture(2, name, weight_var=1.6, bias_var=0.2)
    x = normalize(RNG.standard_normal((4, 6)), "unit_norm")
    k = kernel(arch, x, dtype="float64")
    out = sample_outputs(arch, x, width=1024, networks=3000, seed=7)
    cov, se = empirical_covariance(out)
    # 5 standard errors plus an O(1/width) bias allowance
    assert np.all(np.abs(cov - k) <= 5 * se + 4.0 / 1024 * np.abs(k).max())
    narrow, _ = empirical_covariance(sample_outputs(arch, x, width=4, networks=3000, seed=7))
    assert np.abs(narrow - k).max() > np.abs(cov - k).max()


def test_identities():
    x = RNG.standard_normal((9, 4))
    relu = kernel(Architecture(3, "relu", 1.4, 0.3), x, dtype="float64")
    two = kernel(Architecture(3, {"name": "two_slope", "negative_slope": 0, "positive_slope": 1}, 1.4, 0.3), x,
                 dtype="float64")
    np.testing.assert_array_equal(relu, two)
    leaky = kernel(Architecture(2, {"name": "leaky_relu", "slope": 0.1}, 1.4, 0.3), x, dtype="float64")
    two = kernel(Architecture(2, {"name": "two_slope", "negative_slope": 0.1}, 1.4, 0.3), x, dtype="float64")
    np.testing.assert_array_equal(leaky, two)
    # abs and identity through the general two-slope arithmetic (identity has its own fast path)
    from nngp_dask.activations import TwoSlope

    for a, b, name in ((-1.0, 1.0, "abs"), (1.0, 1.0 + 1e-300, "identity")):
        general = kernel(Architecture(2, TwoSlope("two_slope", a, b), 1.4, 0.3), x, dtype="float64")
        named = kernel(Architecture(2, name, 1.4, 0.3), x, dtype="float64")
        np.testing.assert_allclose(general, named, rtol=1e-12, atol=1e-12)
    # depth 0 is the affine input kernel
    k0 = kernel(Architecture(0, "relu", 1.4, 0.3), x, dtype="float64")
    np.testing.assert_allclose(k0, 0.3 + 1.4 * x @ x.T / 4, rtol=1e-14)
    # the identity network applies the affine map L times
    lin = 0.3 + 1.4 * x @ x.T / 4
    for _ in range(5):
        lin = 0.3 + 1.4 * lin
    np.testing.assert_allclose(kernel(Architecture(5, "identity", 1.4, 0.3), x, dtype="float64"), lin, rtol=1e-13)


@pytest.mark.parametrize("act", ["relu", "erf", "tanh"])
@pytest.mark.parametrize("kind", ["nngp", "ntk"])
def test_tiles_on_ragged_blocks_equal_full_matrix(act, kind):
    arch = Architecture(3, act, 1.6, 0.1)
    x = RNG.standard_normal((53, 11))
    full = kernel(arch, x, kind=kind, dtype="float64")
    diag = diagonals(arch, x)
    edges = [0, 16, 32, 48, 53]  # tile 16, ragged last tile
    for i0, i1 in zip(edges[:-1], edges[1:]):
        for j0, j1 in zip(edges[:-1], edges[1:]):
            block = tile(arch, x[i0:i1], x[j0:j1], diag[:, i0:i1], diag[:, j0:j1], kind=kind, dtype="float64",
                         symmetric=(i0 == j0))
            np.testing.assert_allclose(block, full[i0:i1, j0:j1], rtol=1e-13, atol=1e-14)


def test_all_depths_in_one_pass():
    x = RNG.standard_normal((20, 6))
    arch = Architecture(4, "relu", 1.6, 0.1)
    k_all, t_all = kernel(arch, x, kind="both", all_depths=True, dtype="float64")
    assert k_all.shape == (5, 20, 20)
    for depth in range(5):
        k, t = kernel(arch.replace(depth=depth), x, kind="both", dtype="float64")
        np.testing.assert_allclose(k_all[depth], k, rtol=1e-14)
        np.testing.assert_allclose(t_all[depth], t, rtol=1e-14)


@pytest.mark.parametrize("act", ["relu", "erf", "tanh", "abs", "step", "identity", "gelu"])
def test_float32_agrees_with_float64_and_is_psd(act):
    """Stated tolerance: float32 storage is within 1e-6 of the float64 kernel relative to its scale
    (the recursion runs in float64 registers; only the GEMM and the final rounding are float32)."""
    x = normalize(RNG.standard_normal((120, 30)), "unit_norm")
    arch = Architecture(3, act, 1.6, 0.1)
    k64 = kernel(arch, x, dtype="float64")
    k32 = kernel(arch, x, dtype="float32")
    assert k32.dtype == np.float32
    scale = np.abs(k64).max()
    assert np.abs(k32 - k64).max() <= 1e-6 * scale * (10 if act == "step" else 1)
    np.testing.assert_array_equal(k64, k64.T)
    assert np.linalg.eigvalsh(k64).min() >= -1e-12 * scale


@pytest.mark.parametrize("act", ["relu", "erf", "tanh", "step", "abs"])
def test_no_nan_for_identical_points_zero_vectors_and_depth_100(act):
    x = np.zeros((4, 3))
    x[1] = [1.0, 2.0, 3.0]
    x[2] = x[1]
    for bias_var in (0.0, 0.5):
        arch = Architecture(100, act, 1.0, bias_var)
        kind = "nngp" if act == "step" else "both"
        out = kernel(arch, x, kind=kind, dtype="float64")
        for k in (out if isinstance(out, tuple) else (out,)):
            assert np.isfinite(k).all()
        k = out[0] if isinstance(out, tuple) else out
        np.testing.assert_allclose(np.diag(k), diagonals(arch, x)[-1], rtol=0, atol=0)
        np.testing.assert_allclose(k[1, 2], k[1, 1], rtol=1e-12)


def test_diagonal_equals_separately_computed_diagonal():
    x = RNG.standard_normal((31, 8))
    for act in ["relu", "erf", "tanh", "step", "identity"]:
        arch = Architecture(3, act, 1.6, 0.1)
        k = kernel(arch, x, dtype="float64")
        np.testing.assert_array_equal(np.diag(k), diagonals(arch, x)[-1])
        if act != "step":
            t = kernel(arch, x, kind="ntk", dtype="float64")
            np.testing.assert_array_equal(np.diag(t), diagonals(arch, x, kind="ntk")[-1])


# --- the boundary --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        ({"depth": -1}, ValueError, "depth: expected an integer >= 0, got -1"),
        ({"depth": 2.0}, TypeError, "depth: expected an integer"),
        ({"depth": True}, TypeError, "depth"),
        ({"weight_var": 0.0}, ValueError, "weight_var: expected a number > 0, got 0.0"),
        ({"weight_var": float("nan")}, ValueError, "weight_var: expected a finite number"),
        ({"bias_var": -0.1}, ValueError, "bias_var: expected a number >= 0, got -0.1"),
        ({"bias_var": "1"}, TypeError, "bias_var: expected a real number"),
        ({"activation": "swish"}, ValueError, "activation.name: expected one of"),
        ({"activation": {"name": "leaky_relu", "alpha": 1}}, ValueError, "activation.alpha: unknown option"),
        ({"activation": 3}, TypeError, "activation: expected a name"),
    ],
)
def test_architecture_validation(kwargs, exc, match):
    args = {"depth": 2, "activation": "relu", "weight_var": 1.0, "bias_var": 0.0, **kwargs}
    with pytest.raises(exc, match=match):
        Architecture(**args)


def test_architecture_round_trip_and_fingerprint():
    archs = [
        Architecture(3, "relu", 1.6, 0.1),
        Architecture(2, {"name": "leaky_relu", "slope": 0.3}, 1.0, 0.0),
        Architecture(1, {"name": "two_slope", "negative_slope": -0.5, "positive_slope": 2.0}, 1.0, 0.0),
        Architecture(4, {"name": "tanh", "degree": 80}, 2.0, 0.5),
        Architecture(0, "erf", 1.0, 1.0),
    ]
    prints = set()
    for arch in archs:
        again = Architecture.from_dict(arch.to_dict())
        assert again == arch and again.fingerprint == arch.fingerprint
        prints.add(arch.fingerprint)
    assert len(prints) == len(archs)
    assert Architecture(3, "relu", 1.6, 0.1).fingerprint == "%s" % archs[0].fingerprint
    assert Architecture(3, "relu", 1.6, 0.1000001).fingerprint != archs[0].fingerprint
    with pytest.raises(AttributeError):
        archs[0].depth = 4  # type: ignore[misc]
    with pytest.raises(ValueError, match="architecture.width: unknown key"):
        Architecture.from_dict({"depth": 1, "width": 3})
    custom = Architecture(1, Elementwise(fn=np.sin, name="sin"), 1.0, 0.0)
    other = Architecture(1, Elementwise(fn=np.cos, name="sin"), 1.0, 0.0)
    assert custom.fingerprint != other.fingerprint  # same name, different function
    with pytest.raises(ValueError, match="custom function 'sin' cannot be written"):
        custom.to_dict()
    assert get_activation({"name": "relu"}) == get_activation("relu")


def test_input_validation():
    arch = Architecture(1, "relu")
    bad = np.ones((5, 3))
    bad[3, 1] = np.nan
    with pytest.raises(InputError, match="x1: row 3 holds NaN or Inf"):
        kernel(arch, bad)
    with pytest.raises(InputError, match="x2: expected 3 features"):
        kernel(arch, np.ones((5, 3)), np.ones((5, 4)))
    with pytest.raises(InputError, match="expected a 2-D array"):
        kernel(arch, np.ones(5))
    with pytest.raises(InputError, match="expected a non-empty array"):
        kernel(arch, np.ones((0, 3)))
    with pytest.raises(InputError, match="expected a numeric array"):
        kernel(arch, np.array([["a"]]))
    with pytest.raises(ValueError, match="dtype: expected 'float32' or 'float64', got 'float16'"):
        kernel(arch, np.ones((2, 2)), dtype="float16")
    with pytest.raises(ValueError, match="kind: expected one of"):
        kernel(arch, np.ones((2, 2)), kind="gp")


def test_normalizations():
    x = RNG.standard_normal((6, 10)) * 3 + 1
    x[2] = 0.0
    u = normalize(x, "unit_norm")
    np.testing.assert_allclose((u[[0, 1, 3, 4, 5]] ** 2).mean(axis=1), 1.0)
    assert np.all(u[2] == 0)
    s = normalize(x, "standardize")
    np.testing.assert_allclose(s[[0, 1, 3]].mean(axis=1), 0.0, atol=1e-12)
    np.testing.assert_allclose(s[[0, 1, 3]].std(axis=1), 1.0)
    assert normalize(x, "none") is x
    with pytest.raises(InputError, match="normalization: expected one of"):
        normalize(x, "l2")
