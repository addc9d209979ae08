"""The kernel core against independent oracles, identities, and its own contracts."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.special import erf

from nngp_dask import Architecture, Elementwise, InputError, diagonals, get_activation, kernel, normalize, tile
from nngp_dask.validation import empirical_covariance, sample_outputs

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
    with pytest.raises(ValueError, match="NTK of activation 'step'"):
        diagonals(arch, X, kind="ntk")
    # a zero-variance point (zero input, no bias): u = 0 exactly and step(0) = 0, as in the network
    no_bias = Architecture(2, "step", weight_var=1.3, bias_var=0.0)
    k_ref, _ = reference_kernel(no_bias, X, lambda p, q, r: polar_dual(f, 0, p, q, r))
    k = kernel(no_bias, X, dtype="float64")
    assert np.all(k[5] == 0) and np.all(k[:, 5] == 0)
    np.testing.assert_allclose(k[distinct], k_ref[distinct], rtol=1e-12, atol=1e-12)


def _derf(z):
    return 2 / math.sqrt(math.pi) * np.exp(-z * z)


@pytest.mark.parametrize("depth", [1, 4])
def test_erf_matches_gauss_hermite(depth):
    # Inputs scaled so that every variance stays <= ~1.5: there the degree-150 Gauss-Hermite
    # oracle is at round-off (at variance 10 it is only ~1e-6; the closed form is exact there
    # too, see test_erf_closed_form_at_large_variance).
    x = X / 3
    arch = Architecture(depth, "erf", weight_var=2.0, bias_var=0.3)
    k_ref, t_ref = reference_kernel(
        arch,
        x,
        lambda p, q, r: gauss_hermite_2d(erf, p, q, r, degree=150),
        lambda p, q, r: gauss_hermite_2d(_derf, p, q, r, degree=150),
    )
    assert diagonals(arch, x).max() < 1.5
    k, t = kernel(arch, x, kind="both", dtype="float64")
    np.testing.assert_allclose(k, k_ref, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(t, t_ref, rtol=1e-12, atol=1e-14)


def test_erf_closed_form_at_large_variance():
    """Where 2-D Gauss-Hermite does not converge, an adaptive 1-D integral of the same
    quantities (u = v, and v = -u) checks Williams' formula: E[erf(u)^2] and E[erf'(u)^2]."""
    from scipy.integrate import quad

    arch = Architecture(1, "erf", weight_var=1.0, bias_var=0.0)
    for variance in (0.1, 3.0, 30.0, 300.0):
        x = np.array([[math.sqrt(variance)], [-math.sqrt(variance)]])  # K^0 = variance, c = -1
        k, t = kernel(arch, x, kind="both", dtype="float64")
        s = math.sqrt(variance)
        pdf = lambda z: math.exp(-z * z / 2) / math.sqrt(2 * math.pi)  # noqa: E731
        opts = dict(epsabs=1e-15, epsrel=1e-13, limit=400, points=[0.0])
        e = 2 * quad(lambda z: erf(s * z) ** 2 * pdf(z), 0, 40, **opts)[0]
        ed = 2 * quad(lambda z: _derf(s * z) ** 2 * pdf(z), 0, 40, **opts)[0]
        np.testing.assert_allclose(k, [[e, -e], [-e, e]], rtol=1e-12)
        np.testing.assert_allclose(np.diag(t), e + variance * ed, rtol=1e-12)


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
    """The Mehler series (one Horner pass per entry) against per-entry 2-D quadrature, three layers.

    Inputs are scaled so that every variance stays moderate (<= ~1.2, softplus ~2): there the
    documented truncation bound of the degree-64 series is below 1e-9 at every layer (checked),
    and the degree-120 oracle is at round-off. Larger variances: test_series_error_within_bound.
    """
    f, fp = SMOOTH[name]
    x = 0.4 * X
    arch = Architecture(3, name, weight_var=1.5, bias_var=0.1)
    k_ref, t_ref = reference_kernel(
        arch,
        x,
        lambda p, q, r: gauss_hermite_2d(f, p, q, r, degree=120),
        lambda p, q, r: gauss_hermite_2d(fp, p, q, r, degree=120),
    )
    diag = diagonals(arch, x)
    tail = max(arch.activation.truncation_error(diag[layer]).max() for layer in range(arch.depth))
    assert tail < 1e-9
    k, t = kernel(arch, x, kind="both", dtype="float64")
    # K^{l+1} inherits weight_var * (its own tail + E' * the error of K^l), E' <= ~1 here
    np.testing.assert_allclose(k, k_ref, rtol=1e-12, atol=1e-13 + 2 * arch.depth * arch.weight_var * tail)
    # the derivative series converges more slowly (tanh: ~1e-10 here); no bound is reported for it
    np.testing.assert_allclose(t, t_ref, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", ["tanh", "gelu", "user"])
def test_series_error_within_truncation_bound(name):
    """Where the series is visibly truncated, the documented bound ``weight_var sqrt(tail_i tail_j)``
    covers the one-layer error, is attained on the diagonal (where the error is exactly the
    tail), and a higher degree converges."""
    if name == "user":
        fn = lambda z: np.sin(z) + 0.3 * z  # noqa: E731
        act, floor = Elementwise(fn=fn, name="mine", degree=12), 1e-6
        x = 1.5 * np.random.default_rng(10).standard_normal((6, 4))
    else:
        # variances up to 4.4: tanh's tail is ~1e-5 there, gelu's ~1e-8
        fn, act, x = SMOOTH[name][0], get_activation(name), X
        floor = {"tanh": 1e-6, "gelu": 1e-9}[name]
    arch = Architecture(1, act, weight_var=1.5, bias_var=0.1)
    k0 = 0.1 + 1.5 * x @ x.T / x.shape[1]
    kd = np.diag(k0)
    ref = 0.1 + 1.5 * gauss_hermite_2d(fn, kd[:, None], kd[None, :], k0, degree=300)
    k = kernel(arch, x, dtype="float64")
    tail = act.truncation_error(kd)
    bound = 1.5 * np.sqrt(np.outer(tail, tail))
    err = np.abs(k - ref)
    assert bound.max() > floor  # visibly truncated: the bound is not vacuous
    # the bound is the truncation's; the coefficients' quadrature (default 240 nodes) adds ~1e-11
    # at variance 4.4 (a pair with a zero-tail point once passed only by the tail's rounding noise)
    assert np.all(err <= bound + 5e-11)
    np.testing.assert_allclose(np.diag(ref) - np.diag(k), np.diag(bound), rtol=1e-3, atol=1e-12)
    precise = Elementwise(fn=fn, name=act.name, degree=160, nodes=300)
    k_hi = kernel(Architecture(1, precise, 1.5, 0.1), x, dtype="float64")
    if name == "tanh":  # 1e-5 -> 1e-8 (at variance 4.4 tanh needs degree ~250 for round-off)
        assert np.abs(k_hi - ref).max() < 1e-2 * err.max()
    else:
        np.testing.assert_allclose(k_hi, ref, rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("name", ["relu", "erf", "tanh"])
def test_monte_carlo_finite_width_converges(name):
    """Sampled networks: within 5 standard errors at width 1024; visibly worse at width 4.

    The estimator (raw second moment of zero-mean outputs) is unbiased for the width-1024
    network's covariance; that differs from the infinite-width kernel by O(1 / width)
    (measured: below 0.4 max|k| / width for these three at widths 16..256), allowed for here.
    """
    arch = Architecture(2, name, weight_var=1.6, bias_var=0.2)
    x = normalize(np.random.default_rng(11).standard_normal((4, 6)), "unit_norm")
    k = kernel(arch, x, dtype="float64")
    out = sample_outputs(arch, x, width=1024, networks=3000, seed=7)
    cov, se = empirical_covariance(out)
    assert np.all(np.abs(cov - k) <= 5 * se + 1.0 / 1024 * np.abs(k).max())
    narrow, _ = empirical_covariance(sample_outputs(arch, x, width=4, networks=3000, seed=7))
    assert np.abs(narrow - k).max() > np.abs(cov - k).max()


def test_vectorisable_arccos_and_arcsin_within_one_and_two_ulp_of_libm():
    # the recursion's own acos and asin (nngp_dask/kernels/_recursion.py: fdlibm's approximation,
    # all branches computed so that the layer loop vectorises) against the C library's
    from numba import njit

    from nngp_dask.kernels._recursion import _acos, _asin

    @njit
    def both(x, a, b):
        for i in range(x.shape[0]):
            a[i] = _acos(x[i])
            b[i] = _asin(x[i])

    rng = np.random.default_rng(5)
    x = np.concatenate([rng.uniform(-1, 1, 200_000), 1 - rng.random(20_000) ** 6, rng.random(20_000) ** 6 - 1,
                        rng.uniform(-1e-9, 1e-9, 1_000), np.nextafter([0.5, -0.5, 1.0, -1.0], 0.0),
                        [0.5, -0.5, 0.975, -0.975, 0.0, -0.0, 1e-300]])
    acos, asin = np.empty_like(x), np.empty_like(x)
    both(x, acos, asin)
    ulps = lambda ours, libm: np.abs(ours - libm) / np.spacing(np.maximum(np.abs(libm), 1e-300))  # noqa: E731
    assert ulps(acos, np.arccos(x)).max() <= 1.0
    assert ulps(asin, np.arcsin(x)).max() <= 2.0
    both(np.array([1.0, -1.0, 0.0]), acos[:3], asin[:3])
    assert list(acos[:3]) == [0.0, math.pi, math.pi / 2] and list(asin[:3]) == [math.pi / 2, -math.pi / 2, 0.0]


def test_identities():
    x = np.random.default_rng(12).standard_normal((9, 4))
    relu = kernel(Architecture(3, "relu", 1.4, 0.3), x, dtype="float64")
    two = kernel(Architecture(3, {"name": "two_slope", "negative_slope": 0, "positive_slope": 1}, 1.4, 0.3), x,
                 dtype="float64")
    np.testing.assert_array_equal(relu, two)
    leaky = kernel(Architecture(2, {"name": "leaky_relu", "slope": 0.1}, 1.4, 0.3), x, dtype="float64")
    two = kernel(Architecture(2, {"name": "two_slope", "negative_slope": 0.1, "positive_slope": 1.0}, 1.4, 0.3), x,
                 dtype="float64")
    np.testing.assert_array_equal(leaky, two)
    # abs and identity through the general two-slope arithmetic (identity has its own fast path)
    from nngp_dask.kernels import TwoSlope

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
    x = np.random.default_rng(13).standard_normal((53, 11))
    full = kernel(arch, x, kind=kind, dtype="float64")
    diag = diagonals(arch, x)
    edges = [0, 16, 32, 48, 53]  # tile 16, ragged last tile
    for i0, i1 in zip(edges[:-1], edges[1:]):
        for j0, j1 in zip(edges[:-1], edges[1:]):
            block = tile(arch, x[i0:i1], x[j0:j1], diag[:, i0:i1], diag[:, j0:j1], kind=kind, dtype="float64",
                         symmetric=(i0 == j0))
            np.testing.assert_allclose(block, full[i0:i1, j0:j1], rtol=1e-13, atol=1e-14)


def test_all_depths_in_one_pass():
    x = np.random.default_rng(14).standard_normal((20, 6))
    for act in ("relu", "tanh"):
        arch = Architecture(4, act, 1.6, 0.1)
        k_all, t_all = kernel(arch, x, kind="both", all_depths=True, dtype="float64")
        assert k_all.shape == t_all.shape == (5, 20, 20)
        for depth in range(5):
            k, t = kernel(arch.replace(depth=depth), x, kind="both", dtype="float64")
            np.testing.assert_allclose(k_all[depth], k, rtol=1e-14)
            np.testing.assert_allclose(t_all[depth], t, rtol=1e-14)
        # every depth's diagonal is the separately computed per-point diagonal, exactly
        np.testing.assert_array_equal(np.diagonal(k_all, axis1=1, axis2=2), diagonals(arch, x))
        np.testing.assert_array_equal(np.diagonal(t_all, axis1=1, axis2=2), diagonals(arch, x, kind="ntk"))
        # non-symmetric tiles too
        y = np.random.default_rng(15).standard_normal((7, 6))
        k_xy = tile(arch, x, y, diagonals(arch, x), diagonals(arch, y), dtype="float64", all_depths=True)
        for depth in range(5):
            np.testing.assert_allclose(k_xy[depth], kernel(arch.replace(depth=depth), x, y, dtype="float64"),
                                       rtol=1e-14)


@pytest.mark.parametrize("act", ["relu", "erf", "tanh", "identity"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_kind_both_equals_separate_kinds(act, dtype):
    """One pass for both kernels gives bit-for-bit what two passes give, symmetric or not."""
    arch = Architecture(3, act, 1.6, 0.1)
    rng = np.random.default_rng(16)
    x, y = rng.standard_normal((19, 6)), rng.standard_normal((5, 6))
    for args in ((x,), (x, y)):
        k, t = kernel(arch, *args, kind="both", dtype=dtype)
        assert k.dtype == t.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(k, kernel(arch, *args, kind="nngp", dtype=dtype))
        np.testing.assert_array_equal(t, kernel(arch, *args, kind="ntk", dtype=dtype))


@pytest.mark.parametrize("act", ["relu", "erf", "tanh", "abs", "step", "identity", "gelu"])
def test_float32_agrees_with_float64_and_is_psd(act):
    """Stated tolerance: float32 storage is within 1e-6 of the float64 kernel relative to its scale
    (the recursion runs in float64 registers; only the GEMM and the final rounding are float32)."""
    x = normalize(np.random.default_rng(17).standard_normal((120, 30)), "unit_norm")
    arch = Architecture(3, act, 1.6, 0.1)
    k64 = kernel(arch, x, dtype="float64")
    k32 = kernel(arch, x, dtype="float32")
    assert k32.dtype == np.float32
    scale = np.abs(k64).max()
    assert np.abs(k32 - k64).max() <= 1e-6 * scale * (10 if act == "step" else 1)
    np.testing.assert_array_equal(k64, k64.T)
    np.testing.assert_array_equal(k32, k32.T)
    assert np.linalg.eigvalsh(k64).min() >= -1e-12 * scale
    # the diagonal is the per-point diagonal rounded once to float32
    np.testing.assert_array_equal(np.diag(k32), diagonals(arch, x)[-1].astype(np.float32))
    if arch.activation.has_ntk:
        # Same for the NTK of well-separated points. (Near-duplicates are worse for relu/abs: the
        # derivative dual's arccos singularity at c = 1 amplifies the float32 Gram's rounding,
        # ~5e-5 relative at c = 1 - 5e-7; the float64 path has no such loss.)
        t64 = kernel(arch, x, kind="ntk", dtype="float64")
        t32 = kernel(arch, x, kind="ntk", dtype="float32")
        assert np.abs(t32 - t64).max() <= 1e-6 * np.abs(t64).max()


@pytest.mark.parametrize("act", ["relu", "erf", "tanh", "step", "abs"])
def test_no_nan_for_identical_points_zero_vectors_and_depth_100(act):
    """Depth 100 with zero vectors and a point repeated at two indices.

    Identical points at different indices have a correlation of 1 up to rounding (their Gram
    entry comes from the GEMM, their variances from the per-point diagonal). How far that
    rounding travels is the conditioning of the dual at c = 1: the NNGP duals of relu, abs,
    erf, tanh are Lipschitz there, so the pair stays equal to ~1e-14 after 100 layers; the
    derivative dual of relu/abs, (pi - arccos c) / (2 pi), has a square-root singularity, so a
    1e-16 rounding becomes ~1e-8 per layer in the NTK; the step's NNGP dual has the same
    singularity and is *expanding* at c = 1, so after tens of layers the pair sits at the map's
    fixed point like every other pair (see the Step docstring).
    """
    x = np.zeros((5, 3))  # rows 0 and 3: zero vectors
    x[1] = [1.0, 2.0, 3.0]
    x[2] = x[1]  # identical to row 1
    x[4] = [1.0, 2.0, 2.5]  # a distinct, nearby point
    for bias_var in (0.0, 0.5):
        arch = Architecture(100, act, 1.0, bias_var)
        kind = "nngp" if act == "step" else "both"
        with np.errstate(divide="raise", invalid="raise", over="raise"):  # no inf * 0, no 0 / 0
            out = kernel(arch, x, kind=kind, dtype="float64")
            diag = diagonals(arch, x)
            diag_t = diagonals(arch, x, kind="ntk") if kind == "both" else None
        k, t = out if isinstance(out, tuple) else (out, None)
        assert np.isfinite(k).all() and (t is None or np.isfinite(t).all())
        np.testing.assert_array_equal(np.diag(k), diag[-1])
        if t is not None:
            np.testing.assert_array_equal(np.diag(t), diag_t[-1])
        pairs = [(1, 2)]
        if bias_var == 0.0:
            # phi(0) = 0 for all of these: a zero input stays exactly 0, as in the network
            assert np.all(k[[0, 3]] == 0) and np.all(k[:, [0, 3]] == 0)
        else:
            pairs.append((0, 3))
        for a, b in pairs:
            if act != "step":
                np.testing.assert_allclose(k[a, b], k[a, a], rtol=1e-12)
                np.testing.assert_allclose(t[a, b], t[a, a], rtol=1e-12 if act in ("erf", "tanh") else 1e-5)
            else:
                # what holds whatever the rounding: identical points are at least as correlated
                # as any distinct pair (the map c -> (pi - arccos c) / pi is increasing), and <= 1
                corr = lambda i, j: k[i, j] / math.sqrt(k[i, i] * k[j, j])  # noqa: E731
                assert corr(a, 4) - 1e-12 <= corr(a, b) <= 1.0
        if act == "step":
            # at moderate depth the identical pair is still close to the exact value (c = 1)
            k3 = kernel(arch.replace(depth=3), x, dtype="float64")
            for a, b in pairs:
                np.testing.assert_allclose(k3[a, b], k3[a, a], rtol=1e-3)


def test_diagonal_equals_separately_computed_diagonal():
    """The diagonal of K(x, x) equals the separately computed diagonal bit for bit (NNGP and NTK)."""
    x = np.random.default_rng(18).standard_normal((31, 8))
    for act in ["relu", "erf", "tanh", "step", "identity"]:
        arch = Architecture(3, act, 1.6, 0.1)
        for dtype in ("float64", "float32"):
            k = kernel(arch, x, dtype=dtype)
            np.testing.assert_array_equal(np.diag(k), diagonals(arch, x)[-1].astype(dtype))
            if act != "step":
                t = kernel(arch, x, kind="ntk", dtype=dtype)
                np.testing.assert_array_equal(np.diag(t), diagonals(arch, x, kind="ntk")[-1].astype(dtype))
        # and in a diagonal tile of a larger matrix
        diag = diagonals(arch, x)
        block = tile(arch, x[8:20], x[8:20], diag[:, 8:20], diag[:, 8:20], dtype="float64", symmetric=True)
        np.testing.assert_array_equal(np.diag(block), diag[-1, 8:20])


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
        ({"activation": {"name": "leaky_relu", "alpha": 1}}, ValueError, "activation.alpha: unknown parameter"),
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
    x = np.random.default_rng(19).standard_normal((6, 10)) * 3 + 1
    x[2] = 0.0
    u = normalize(x, "unit_norm")
    np.testing.assert_allclose((u[[0, 1, 3, 4, 5]] ** 2).mean(axis=1), 1.0)
    assert np.all(u[2] == 0)
    s = normalize(x, "standardize")
    np.testing.assert_allclose(s[[0, 1, 3]].mean(axis=1), 0.0, atol=1e-12)
    np.testing.assert_allclose(s[[0, 1, 3]].std(axis=1), 1.0)
    # constant rows become zero, also where centring leaves rounding residue (0.3 * 784: its mean
    # is not 0.3 exactly) that a division by its norm would blow up to +-1
    for value, d in ((0.3, 784), (7.7, 784), (0.1, 20), (0.0, 10)):
        assert np.all(normalize(np.full((2, d), value), "standardize") == 0), (value, d)
    assert normalize(x, "none") is x
    with pytest.raises(InputError, match="normalization: expected one of"):
        normalize(x, "l2")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_input_gram_by_block_rows_above_the_syrk_limit_equals_the_product(monkeypatch, dtype):
    # above SYRK_MAX_N the symmetric Gram is built by block rows (OpenBLAS's threaded syrk
    # overruns a buffer at large orders); shrunk so 50 rows make ragged blocks of 16
    from nngp_dask.kernels import tiles

    monkeypatch.setattr(tiles, "SYRK_MAX_N", 16)
    a = np.random.default_rng(5).standard_normal((50, 7))
    got = tiles.input_gram(a, a, np.dtype(dtype), symmetric=True)
    want = a.astype(dtype) @ a.astype(dtype).T
    upper = np.triu(np.ones((50, 50), bool))
    np.testing.assert_allclose(got[upper], want[upper], rtol=1e-5 if dtype == np.float32 else 1e-12)
