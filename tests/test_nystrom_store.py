"""The Nystrom preconditioner built on the workers from the stored tiles, against dense oracles."""

from __future__ import annotations

import numpy as np
import pytest

from nngp_dask import Architecture, kernel
from nngp_dask.build import build_kernel
from nngp_dask.gp.nystrom_store import stored_nystrom
from nngp_dask.linalg import Nystrom, SplitLowRank, factor_products, nystrom_landmarks

ARCH = Architecture(3, "relu", 1.6, 0.1)
N, RANK, NOISE = 700, 80, 1e-3


@pytest.fixture(scope="module")
def stored(tmp_path_factory, cluster_client):
    x = np.random.default_rng(1).standard_normal((N, 10))
    ks = build_kernel(ARCH, x, tmp_path_factory.mktemp("ny") / "k.zarr", tile=128, dtype="float32",  # ragged
                      client=cluster_client, progress=False)
    k = ks.to_dask().compute().astype(np.float64)  # the stored float32 values
    assert np.abs(k - kernel(ARCH, x, dtype="float64")).max() < 1e-6 * np.abs(k).max()
    lm = nystrom_landmarks(N, RANK, 0)
    c, w = k[:, lm], k[np.ix_(lm, lm)]
    lam, v = np.linalg.eigh(w)
    keep = lam > np.finfo(np.float32).eps * lam[-1]
    cv = c @ v[:, keep]
    approx = cv @ np.diag(1.0 / lam[keep]) @ cv.T  # C W^+ C^T, dense
    return dict(ks=ks, k=k, minv=np.linalg.inv(approx + NOISE * np.eye(N)))


def _rel(a, b):
    return np.abs(a - b).max() / np.abs(b).max()


@pytest.mark.parametrize("ratio,tol", [(1e-12, 1e-9), (1024.0, 1e-6), (1e12, 1e-6)])
def test_applied_inverse_is_the_dense_formula(stored, cluster_client, ratio, tol):
    pre = stored_nystrom(stored["ks"], cluster_client, RANK, NOISE, float64_ratio=ratio)
    assert pre.float64_columns == (RANK if ratio < 1 else 0 if ratio > 1e9 else pre.float64_columns)
    assert 0 < pre.float64_columns < RANK or ratio != 1024.0  # the default splits this problem
    d = pre.dense_inverse()
    assert _rel(d, stored["minv"]) < tol
    assert np.abs(d - d.T).max() < 1e-12 * np.abs(d).max()
    assert np.linalg.eigvalsh(0.5 * (d + d.T)).min() > 0
    # the preconditioned operator's spectrum, against the oracle's
    a = stored["k"] + NOISE * np.eye(N)
    def spectrum(minv):  # of M^-1 A, as of the similar L^T A L with M^-1 = L L^T
        low = np.linalg.cholesky(0.5 * (minv + minv.T))
        return np.linalg.eigvalsh(low.T @ a @ low)

    got, want = spectrum(d), spectrum(stored["minv"])
    assert _rel(got, want) < 1e2 * tol
    # the factor the solve saves: F F^T = C W^+ C^T, columns in descending s
    f = pre.factor_block(0, pre.rank)
    assert np.allclose(np.linalg.norm(f, axis=0), pre.singular_values, rtol=1e-6)
    assert np.all(np.diff(pre.singular_values) <= 0)
    assert np.array_equal(pre.info["landmarks"], nystrom_landmarks(N, RANK, 0))


def test_same_preconditioner_as_the_in_memory_build(stored, cluster_client):
    k = stored["k"]
    old = Nystrom.build(lambda idx: k[:, idx], N, RANK, NOISE, rcond=float(np.finfo(np.float32).eps))
    new = stored_nystrom(stored["ks"], cluster_client, RANK, NOISE)
    r = np.random.default_rng(0).standard_normal((N, 3))
    assert _rel(new.apply(r), old.apply(r)) < 1e-6
    assert new.rank == old.rank


def test_float32_factor_products_match_float64():
    rng = np.random.default_rng(2)
    f = rng.standard_normal((301, 17)).astype(np.float32)
    r, coef = rng.standard_normal((301, 4)), rng.standard_normal(17)
    out = np.ones((4, 301))
    factor_products(f, np.ascontiguousarray(r.T), coef, out, threads=3)
    f64 = f.astype(np.float64)
    assert _rel(out.T, 1.0 + f64 @ (coef[:, None] * (f64.T @ r))) < 1e-13
    with pytest.raises(ValueError, match="f_hi, f_lo: expected"):
        SplitLowRank(np.zeros((5, 2)), np.zeros((5, 2), np.float32), np.ones(3), 0.1)
    with pytest.raises(ValueError, match="noise: expected a finite number > 0"):
        SplitLowRank(np.zeros((5, 2)), np.zeros((5, 1), np.float32), np.ones(3), 0.0)
