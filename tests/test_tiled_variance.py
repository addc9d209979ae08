"""The out-of-core Cholesky (panels of the factor outside memory) and the exact variances it gives,
against SciPy's dense factorisation and a dense NumPy solve."""

from __future__ import annotations

import os
import tempfile

import numpy as np
import pytest
import scipy.linalg

from nngp_dask import Architecture, _blas, build_kernel, kernel
from nngp_dask.gp import predict, solve
from nngp_dask.linalg import blocked_cholesky, cholesky_factor, dense, forward_sum_squares

ARCH = Architecture(3, "relu", 1.6, 0.1)
NOISE = 1e-3


WIDTH = 40


def _in_memory_panels():
    """``save``/``load`` over a dict: panel j holds rows ``j * WIDTH:`` of its columns."""
    saved: dict[int, np.ndarray] = {}

    def save(j, panel):
        saved[j] = panel.copy()

    def load(j, row0):
        return saved[j][row0 - j * WIDTH:]

    return saved, save, load


@pytest.mark.parametrize("n", [40, 157, 200])  # one panel; ragged last panel; panels that divide n
def test_blocked_cholesky_matches_scipy_and_its_forward_solve_matches_a_dense_one(n):
    rng = np.random.default_rng(n)
    x = rng.standard_normal((n, 6))
    k = kernel(ARCH, x, dtype="float64")
    saved, save, load = _in_memory_panels()
    reads = []

    def panel(c0, c1):
        reads.append((c0, c1))
        return k[c0:, c0:c1].astype(np.float32 if n == 200 else np.float64)  # float32 tiles are read as such

    beats = []
    logdet = blocked_cholesky(panel, n, WIDTH, NOISE, save, load, beat=beats.append)
    a = (k.astype(np.float32).astype(np.float64) if n == 200 else k) + NOISE * np.eye(n)
    lower = scipy.linalg.cholesky(a, lower=True)
    ours = np.zeros((n, n))
    for j, p in saved.items():
        ours[j * WIDTH:, j * WIDTH:j * WIDTH + p.shape[1]] = p
    assert np.abs(np.tril(ours) - lower).max() < 1e-10 * np.abs(lower).max()
    assert logdet == pytest.approx(np.linalg.slogdet(a)[1], rel=1e-12)
    assert reads == [(c0, min(c0 + WIDTH, n)) for c0 in range(0, n, WIDTH)]  # each panel of K read once
    assert beats[-1] == n
    b = rng.standard_normal((n, 7))
    expect = np.sum(scipy.linalg.solve_triangular(lower, b, lower=True) ** 2, axis=0)
    got = forward_sum_squares(b.copy(), n, WIDTH, load)
    np.testing.assert_allclose(got, expect, rtol=1e-10)


def test_in_memory_factor_by_blocks_equals_one_potrf(monkeypatch):
    # above POTRF_MAX_N the dense factor is taken by blocks (OpenBLAS's threaded syrk overruns its
    # buffer at large orders); shrunk here so that 157 points make ragged blocks of 40, solved and
    # updated in ragged strips of 24 rows
    monkeypatch.setattr(dense, "POTRF_MAX_N", 40)
    monkeypatch.setattr(dense, "_STRIP", 24)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((157, 6))
    k = kernel(ARCH, x, dtype="float64")
    got = np.tril(cholesky_factor(k, NOISE)[0])
    want = scipy.linalg.cholesky(k + NOISE * np.eye(157), lower=True)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    k[100, 100] = -1.0  # not positive definite in the third block
    with pytest.raises(np.linalg.LinAlgError, match="diagonal block of rows 80-119"):
        cholesky_factor(k, NOISE)
    for bad, message in ((np.eye(3, dtype=np.int64), "a: expected a float32 or float64 array"),
                         (np.ones((2, 3)), r"a: expected a non-empty square 2-D array \(n, n\), got shape \(2, 3\)")):
        with pytest.raises(ValueError, match=message):
            dense.cholesky_in_place(bad)


def test_cholesky_factor_overwrites_only_a_c_ordered_float64_kernel_when_asked():
    k = kernel(ARCH, np.random.default_rng(9).standard_normal((60, 4)), dtype="float64")
    for given, shared in ((k.copy(), True), (k.astype(np.float32), False), (np.asfortranarray(k), False)):
        before = given.copy()
        want = scipy.linalg.cholesky(before.astype(np.float64) + NOISE * np.eye(60), lower=True)
        c = cholesky_factor(given, NOISE, overwrite_k=True)[0]
        assert np.shares_memory(c, given) is shared
        np.testing.assert_allclose(np.tril(c), want, rtol=1e-10, atol=1e-12)
        if not shared:
            np.testing.assert_array_equal(given, before)
    bad = -k  # the advice names a noise from k's diagonal as given, not as overwritten
    with pytest.raises(np.linalg.LinAlgError, match=rf"e.g. to {max(NOISE * 10, 1e-6 * np.diag(k).mean()):.3g}"):
        cholesky_factor(bad, NOISE, overwrite_k=True)


@pytest.mark.parametrize("limit", [64, 4])  # one syrk; a GEMM above the limit
def test_gram_upper_is_the_product_on_either_side_of_the_syrk_limit(monkeypatch, limit):
    monkeypatch.setattr(_blas, "SYRK_MAX_N", limit)
    x = np.random.default_rng(7).standard_normal((30, 9))  # (k, r): the Gram is x.T @ x, 9 x 9
    upper = np.triu(np.ones((9, 9), bool))
    np.testing.assert_allclose(_blas.gram_upper(x.T)[upper], (x.T @ x)[upper], rtol=1e-12)
    c = np.asfortranarray(np.eye(9))
    np.testing.assert_allclose(_blas.gram_upper(x.T, c)[upper], (x.T @ x + np.eye(9))[upper], rtol=1e-12)


def test_blocked_cholesky_in_float32_is_scipys_factor_to_float32_rounding():
    n = 157  # a ragged last panel
    rng = np.random.default_rng(5)
    k = kernel(ARCH, rng.standard_normal((n, 6)), dtype="float64")
    saved, save, load = _in_memory_panels()
    logdet = blocked_cholesky(lambda c0, c1: k[c0:, c0:c1].astype(np.float32), n, WIDTH, NOISE, save, load,
                              dtype=np.float32)
    assert {p.dtype for p in saved.values()} == {np.dtype(np.float32)}
    a = k.astype(np.float32).astype(np.float64) + NOISE * np.eye(n)
    lower = scipy.linalg.cholesky(a, lower=True)
    ours = np.zeros((n, n))
    for j, p in saved.items():
        ours[j * WIDTH:, j * WIDTH:j * WIDTH + p.shape[1]] = p
    err = np.abs(np.tril(ours) - lower).max() / np.abs(lower).max()
    assert 1e-9 < err < 1e-4  # float32 rounding: not float64's, not worse
    assert logdet == pytest.approx(np.linalg.slogdet(a)[1], rel=1e-4)
    b = rng.standard_normal((n, 5))
    got = forward_sum_squares(b.astype(np.float32), n, WIDTH, load)
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, np.sum(scipy.linalg.solve_triangular(lower, b, lower=True) ** 2, axis=0),
                               rtol=1e-3)
    reads = []
    with pytest.raises(ValueError, match=r"dtype: expected numpy.float64 or numpy.float32, got <class 'numpy.int64'>"):
        blocked_cholesky(lambda c0, c1: reads.append(c0) or k[c0:, c0:c1], n, WIDTH, NOISE, save, load, dtype=np.int64)
    assert reads == []  # refused before any panel is read


def test_blocked_cholesky_of_an_indefinite_matrix_gives_the_one_advice():
    n = 90
    k = np.eye(n)
    k[45:, 45:] = 1.0  # rank one from column 45 on: the second panel's factorisation fails
    _, save, load = _in_memory_panels()
    advice = r"expected a positive definite matrix.*columns 40-79.*Increase noise"
    with pytest.raises(np.linalg.LinAlgError, match=advice):
        blocked_cholesky(lambda c0, c1: k[c0:, c0:c1], n, WIDTH, 0.0, save, load)


@pytest.fixture(scope="module")
def problem(tmp_path_factory, cluster_client):
    rng = np.random.default_rng(11)
    n, m = 157, 23  # ragged against tile 25 and against the panels of 50 below
    x, xt = rng.standard_normal((n, 5)), rng.standard_normal((m, 5))
    y = np.sin(x[:, 0]) + 0.1 * rng.standard_normal(n)
    ks = build_kernel(ARCH, x, tmp_path_factory.mktemp("tiled") / "k.zarr", x_test=xt, tile=25, dtype="float64",
                      client=cluster_client, progress=False)
    k, kx = kernel(ARCH, x, dtype="float64"), kernel(ARCH, xt, x, dtype="float64")
    a = k + NOISE * np.eye(n)
    var = np.diag(kernel(ARCH, xt, dtype="float64")) - np.einsum("ij,ji->i", kx, np.linalg.solve(a, kx.T))
    return dict(ks=ks, y=y, var=var)


def test_tiled_variance_of_a_stored_kernel_matches_the_dense_solve(problem, cluster_client, monkeypatch, tmp_path):
    import nngp_dask.gp.tiled_variance as tv

    monkeypatch.setattr(tv, "PANEL_COLUMNS", 50)  # 2 tiles of 25 per panel: 4 panels, the last ragged
    monkeypatch.setattr(tv, "RHS_BYTES", 157 * 8 * 10)  # test points in groups of 10: 3 passes over the factor
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where TMPDIR would point
    r = solve(problem["ks"], problem["y"], noise=NOISE, tol=1e-10, method="cg", preconditioner="nystrom", rank=40,
              client=cluster_client, progress=False)
    from collections import Counter

    from nngp_dask.store.tileio import TileIO

    reads: Counter = Counter()
    real_read = TileIO.read

    def counting(self, i, j, out=None, **kw):
        if self.part == "train_train":
            reads[i, j] += 1
        return real_read(self, i, j, out, **kw)

    monkeypatch.setattr(TileIO, "read", counting)  # in this process: the factor's reads, not the workers'
    mean, var = predict(problem["ks"], r, variance="tiled", client=cluster_client, progress=False)
    monkeypatch.setattr(TileIO, "read", real_read)
    assert reads == Counter(dict.fromkeys(problem["ks"].grid.upper_tiles(), 1))  # each stored tile once
    assert np.abs(var - problem["var"]).max() < 1e-9 * problem["var"].max()
    _, dense = predict(problem["ks"], r, variance="dense", client=cluster_client, progress=False)
    np.testing.assert_allclose(var, dense, rtol=1e-9, atol=1e-12)
    assert os.listdir(tmp_path) == []  # the factor's scratch folder is gone


def test_tiled_variance_refuses_when_the_scratch_disk_is_too_small(problem, cluster_client, monkeypatch, tmp_path):
    import shutil

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    r = solve(problem["ks"], problem["y"], noise=NOISE, tol=1e-8, method="cg", preconditioner="nystrom", rank=40,
              client=cluster_client, progress=False)
    with pytest.raises(OSError, match=r"variance: the out-of-core factor's scratch space: .* needed at "
                                       r".*, 0.98 kiB free on its disk; set TMPDIR"):
        predict(problem["ks"], r, variance="tiled", client=cluster_client, progress=False)
    assert os.listdir(tmp_path) == []
