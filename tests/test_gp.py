"""Solve and predict over a stored kernel, against dense NumPy/SciPy oracles."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time
from dataclasses import replace

import numpy as np
import pytest
import zarr

from nngp_dask import Architecture, kernel
from nngp_dask.build import build_kernel
from nngp_dask.gp import extrapolation, predict, solve, variance_mode
from nngp_dask.linalg import ConvergenceWarning
from nngp_dask.store import IncompleteKernelError

ARCH = Architecture(3, "relu", 1.6, 0.1)
NOISE = 0.01


@pytest.fixture(scope="module")
def problem(tmp_path_factory, cluster_client):
    rng = np.random.default_rng(7)
    n, m = 157, 23  # ragged against tile 50
    x, xt = rng.standard_normal((n, 8)), rng.standard_normal((m, 8))
    y = np.column_stack([np.sin(x[:, i % 8] * (1 + i // 8)) for i in range(10)])
    store = tmp_path_factory.mktemp("gp") / "k.zarr"
    ks = build_kernel(ARCH, x, store, x_test=xt, tile=50, dtype="float64", client=cluster_client, progress=False)
    k = kernel(ARCH, x, dtype="float64")
    ks_ = kernel(ARCH, xt, x, dtype="float64")
    a = k + NOISE * np.eye(n)
    alpha = np.linalg.solve(a, y)
    var = np.diag(kernel(ARCH, xt, dtype="float64")) - np.einsum("ij,ji->i", ks_, np.linalg.solve(a, ks_.T))
    return dict(ks=ks, x=x, xt=xt, y=y, alpha=alpha, mean=ks_ @ alpha, var=var, k=k)


def _rel(a, b):
    return np.abs(a - b).max() / np.abs(b).max()


# "none" and "jacobi" are checked against dense solves in tests/test_cg.py; over the distributed
# operator they cost hundreds of passes (~55 s of CI) and exercise no other code
@pytest.mark.parametrize("method,pre", [("cholesky", "none"), ("cg", "pivoted_cholesky"), ("cg", "nystrom"),
                                        ("block_cg", "nystrom")])
@pytest.mark.parametrize("cols", [1, 10])
def test_solution_mean_and_variance_match_dense(problem, cluster_client, method, pre, cols):
    y = problem["y"][:, 0] if cols == 1 else problem["y"]
    r = solve(problem["ks"], y, noise=NOISE, tol=1e-10, method=method, preconditioner=pre, rank=40,
              client=cluster_client, progress=False)
    assert r.converged and r.alpha.shape == y.shape
    ref_alpha = problem["alpha"][:, 0] if cols == 1 else problem["alpha"]
    assert _rel(r.alpha, ref_alpha) < 1e-6
    mean, var = predict(problem["ks"], r, variance="exact", client=cluster_client)
    assert _rel(mean, problem["mean"][:, 0] if cols == 1 else problem["mean"]) < 1e-6
    assert _rel(var, problem["var"]) < 1e-6


@pytest.mark.slow  # an unpreconditioned solve: hundreds of distributed CG passes
def test_preconditioner_saves_iterations(problem, cluster_client):
    its = {pre: solve(problem["ks"], problem["y"], noise=NOISE, tol=1e-8, method="cg", preconditioner=pre, rank=40,
                      client=cluster_client, progress=False).iterations
           for pre in ("none", "pivoted_cholesky")}
    assert its["pivoted_cholesky"] < 0.7 * its["none"], its


def test_lowrank_variance_is_conservative_and_close(problem, cluster_client):
    r = solve(problem["ks"], problem["y"], noise=NOISE, tol=1e-8, method="cg", preconditioner="pivoted_cholesky",
              rank=120, client=cluster_client, progress=False)
    _, var = predict(problem["ks"], r, variance="lowrank", client=cluster_client)
    assert np.median(var - problem["var"]) >= 0  # errs on the conservative side
    assert _rel(var, problem["var"]) < 0.1


def test_dense_variance_of_a_cg_solve_matches_dense_oracle_and_is_deterministic(problem, cluster_client):
    # a CG solve (ragged tiles: 157 points against tile 50) whose variance comes from one in-memory
    # factor of the stored tiles: only rounding separates it from the oracle, no CG tolerance
    r = solve(problem["ks"], problem["y"], noise=NOISE, tol=1e-10, method="cg", preconditioner="nystrom", rank=40,
              client=cluster_client, progress=False)
    assert variance_mode(problem["ks"], r, "auto") == "dense"
    mean, var = predict(problem["ks"], r, variance="auto", client=cluster_client)
    assert _rel(var, problem["var"]) < 1e-9
    assert _rel(mean, problem["mean"]) < 1e-6
    _, again = predict(problem["ks"], r, variance="dense", client=cluster_client)
    np.testing.assert_array_equal(again, var)


def test_auto_variance_picks_by_size_and_bad_mode_is_refused(problem, cluster_client, monkeypatch):
    import nngp_dask.gp.prediction as prediction

    ks = problem["ks"]
    kw = dict(noise=NOISE, tol=1e-10, client=cluster_client, progress=False)  # the other tests' solves, reused
    chol = solve(ks, problem["y"], method="cholesky", **kw)
    pc = solve(ks, problem["y"], method="cg", preconditioner="pivoted_cholesky", rank=40, **kw)
    monkeypatch.setattr(prediction, "DENSE_VARIANCE_MAX_N", 100)  # 157 training points: "too many"
    assert variance_mode(ks, chol, True) == "dense"  # its factor is the solve's own
    # 23 test points: their CG solves (2 m n^2 flops per iteration) against one factor (n^3 / 3)
    assert pc.iterations >= 2 and variance_mode(ks, pc, "auto") == "tiled"
    assert variance_mode(ks, replace(pc, iterations=1), "auto") == "exact"  # 6 * 23 < 157
    assert variance_mode(ks, pc, False) is None and variance_mode(ks, pc, "exact") == "exact"
    assert variance_mode(ks, pc, "lowrank") == "lowrank"  # only when asked for
    for bad in ("lanczos", 1, None):
        with pytest.raises(ValueError, match=r"variance: expected False, True, 'auto', 'exact', 'dense', 'tiled'"):
            predict(ks, pc, variance=bad, client=cluster_client)


def test_finished_solve_is_loaded_not_redone(problem, cluster_client):
    kw = dict(noise=NOISE, tol=1e-9, method="cg", preconditioner="jacobi", client=cluster_client, progress=False)
    first = solve(problem["ks"], problem["y"][:, :2], **kw)
    again = solve(problem["ks"], problem["y"][:, :2], **kw)
    assert again.resumed_from == -1 and again.iterations == first.iterations
    np.testing.assert_array_equal(again.alpha, first.alpha)


_KILL_SOLVE = """
import sys, numpy as np
from distributed import Client, LocalCluster
from nngp_dask.gp import solve
if __name__ == "__main__":
    y = np.load(sys.argv[2])
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False,
            dashboard_address="127.0.0.1:0") as c, Client(c) as cl:
        # tiny noise: many iterations, so the kill lands mid-solve
        solve(sys.argv[1], y, noise=1e-6, tol=1e-12, method="cg", preconditioner="none", maxiter=400,
              checkpoint_every=3, client=cl, progress=False)
"""


@pytest.mark.slow
def test_solve_resumes_after_sigkill(problem, thread_client, tmp_path):
    y = problem["y"][:, :3]
    np.save(tmp_path / "y.npy", y)
    url = problem["ks"].url
    proc = subprocess.Popen([sys.executable, "-c", _KILL_SOLVE, url, str(tmp_path / "y.npy")])
    deadline, reached = time.time() + 180, 0
    while time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
        solves = zarr.open_group(url, mode="r").get("solves")
        if solves is None:
            continue
        its = [g.attrs.get("iteration", 0) for _, g in solves.groups() if g.attrs.get("noise") == 1e-6]
        reached = max(its, default=0)
        if reached >= 9:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert reached >= 9, "the solve did not get far enough to be killed mid-way"
    kw = dict(noise=1e-6, tol=1e-12, method="cg", preconditioner="none", maxiter=400, checkpoint_every=3,
              client=thread_client, progress=False)
    resumed = solve(url, y, **kw)
    assert resumed.resumed_from >= 9  # iterations before the checkpoint were not redone
    fresh = solve(problem["ks"], y, **{**kw, "tol": 1.01e-12})  # another key: a clean run
    assert resumed.iterations == pytest.approx(fresh.iterations, abs=3)
    np.testing.assert_allclose(resumed.alpha, fresh.alpha, rtol=1e-6, atol=1e-8 * np.abs(fresh.alpha).max())


def test_a_resumed_solve_reloads_its_preconditioner_instead_of_rebuilding_it(problem, thread_client, monkeypatch,
                                                                             caplog):
    """A solve that stopped after its first checkpoints (here: maxiter) continues with the Nystrom
    factor it saved before its first iteration: no kernel column is read again, and the answer is
    the uninterrupted solve's."""
    import logging

    import nngp_dask.gp.regression as regression

    y = problem["y"][:, :2]
    kw = dict(noise=1e-3, tol=1e-10, method="cg", preconditioner="nystrom", rank=40, checkpoint_every=3,
              client=thread_client, progress=False)
    with pytest.warns(ConvergenceWarning):
        first = solve(problem["ks"], y, maxiter=6, **kw)
    assert first.iterations == 6 and not first.converged

    def no_rebuild(*a, **k):
        raise AssertionError("the preconditioner was built again")

    monkeypatch.setattr(regression, "solve_preconditioner", no_rebuild)
    with caplog.at_level(logging.INFO, logger="nngp_dask"):
        resumed = solve(problem["ks"], y, maxiter=400, **kw)
    monkeypatch.undo()
    assert resumed.resumed_from == 6 and resumed.converged
    assert any("reloaded from solve" in r.getMessage() for r in caplog.records)
    fresh = solve(problem["ks"], y, maxiter=400, **{**kw, "tol": 1.01e-10})  # another key: uninterrupted
    np.testing.assert_allclose(resumed.alpha, fresh.alpha, rtol=1e-6, atol=1e-7 * np.abs(fresh.alpha).max())


def test_nonconvergence_warns_and_says_so(tmp_path, thread_client):
    x = np.repeat(np.random.default_rng(1).standard_normal((20, 3)), 3, axis=0)  # rank-deficient kernel
    ks = build_kernel(Architecture(1, "identity", 1.0, 0.0), x, tmp_path / "s.zarr", tile=16, dtype="float64",
                      client=thread_client, progress=False)
    y = np.random.default_rng(2).standard_normal(60)  # not in the range of K
    with pytest.warns(ConvergenceWarning, match="raise the noise"):
        r = solve(ks, y, noise=0.0, tol=1e-10, method="cg", preconditioner="none", maxiter=50,
                  client=thread_client, progress=False)
    assert not r.converged


def test_a_cholesky_solve_hands_its_factor_to_the_exact_variances(problem, cluster_client, monkeypatch):
    import nngp_dask.gp.prediction as prediction

    r = solve(problem["ks"], problem["y"], noise=NOISE, method="cholesky", client=cluster_client, progress=False)
    assert r.factor is not None and r.factor.shape == (157, 157)
    calls = []
    real = prediction.cholesky_factor
    monkeypatch.setattr(prediction, "cholesky_factor", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    mean, var = predict(problem["ks"], r, variance=True, client=cluster_client, progress=False)
    assert calls == []  # the solve's own factor
    assert _rel(var, problem["var"]) < 1e-9 and _rel(mean, problem["mean"]) < 1e-9
    again = solve(problem["ks"], problem["y"], noise=NOISE, method="cholesky", client=cluster_client,
                  progress=False)
    assert again.resumed_from == -1 and again.factor is None  # loaded from the store: factorised anew
    _, var2 = predict(problem["ks"], again, variance=True, client=cluster_client, progress=False)
    assert calls == [1]
    np.testing.assert_allclose(var2, var, rtol=1e-12, atol=1e-14)


def test_predict_warns_of_test_points_far_outside_the_training_inputs(tmp_path, thread_client, caplog):
    rng = np.random.default_rng(4)
    x, xt = rng.standard_normal((40, 3)), rng.standard_normal((6, 3))
    xt[4] *= 3 * np.abs(x).max() / np.abs(xt[4]).max()  # e.g. a feature scaled unlike the training's
    y = np.sin(x[:, 0])
    ks = build_kernel(ARCH, x, tmp_path / "k.zarr", x_test=xt, tile=16, dtype="float64", client=thread_client,
                      progress=False)
    r = solve(ks, y, noise=NOISE, method="cholesky", client=thread_client, progress=False)
    # the oracle: the kernel's diagonals computed afresh, not the store's
    ratio = np.diag(kernel(ARCH, xt, dtype="float64")) / np.diag(kernel(ARCH, x, dtype="float64")).max()
    assert ratio[4] > 4 > ratio[np.arange(6) != 4].max()  # the ReLU kernel grows with |x|^2
    far = extrapolation(ks)
    assert far["test_points"] == 1 and far["worst_test_point"] == 4
    assert far["max_prior_ratio"] == pytest.approx(ratio[4], rel=1e-12)
    no_test = build_kernel(ARCH, x, tmp_path / "k0.zarr", tile=16, dtype="float64", client=thread_client,
                           progress=False)
    with pytest.raises(ValueError, match=r"store: .* holds no test inputs; pass x_test to build_kernel"):
        extrapolation(no_test)
    with caplog.at_level(logging.WARNING, logger="nngp_dask"):
        predict(ks, r, client=thread_client, progress=False)
    warned = [rec.getMessage() for rec in caplog.records if rec.levelno == logging.WARNING]
    assert len(warned) == 1
    assert (f"1 of 6 test point(s) have a prior variance K(x*, x*) above 4 times the largest training point's "
            f"(up to {ratio[4]:.3g} times, test point 4)") in warned[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="nngp_dask"):  # inside the training range: no warning
        predict(build_kernel(ARCH, x, tmp_path / "k2.zarr", x_test=np.delete(xt, 4, axis=0), tile=16,
                             dtype="float64", client=thread_client, progress=False),
                solve(tmp_path / "k2.zarr", y, noise=NOISE, method="cholesky", client=thread_client, progress=False),
                client=thread_client, progress=False)
    assert not [rec for rec in caplog.records if rec.levelno == logging.WARNING]


def test_bad_input_refused_before_work(problem):
    ks = problem["ks"]
    y = problem["y"]
    for kwargs, match in [(dict(y=y, noise=-1.0), "noise: expected a finite number >= 0"),
                          (dict(y=y[:-1], noise=NOISE), "y: expected 157 rows"),
                          (dict(y=np.where(np.arange(157)[:, None] == 5, np.nan, y), noise=NOISE), "row 5"),
                          (dict(y=y, noise=NOISE, tol=0.0), "tol: expected"),
                          (dict(y=y, noise=NOISE, preconditioner="magic"), "preconditioner: expected")]:
        with pytest.raises(ValueError, match=match):
            solve(ks, progress=False, **kwargs)


def test_incomplete_store_names_missing_tiles(tmp_path, thread_client):
    x = np.random.default_rng(3).standard_normal((40, 3))
    ks = build_kernel(ARCH, x, tmp_path / "k.zarr", tile=16, client=thread_client, progress=False)
    ks.group["done/train_train"][0, 2] = 0
    with pytest.raises(IncompleteKernelError, match=r"missing 1 tile\(s\): \(0, 2\)"):
        solve(ks, np.ones(40), noise=0.1, progress=False)


def test_cg_estimate_extrapolates_the_whole_residual_history():
    """The progress line's iteration estimate: log-linear in the worst column's residual, from the
    first iteration's (a resumed solve's history includes its interrupted run's iterations)."""
    from nngp_dask.gp.regression import _expected_iterations

    decay = np.array([[1.0, 1.0], [0.1, 0.5], [0.01, 0.25], [0.001, 0.125]])
    assert _expected_iterations(decay[:2], 1e-4, 500) is None  # one step says nothing about the rate
    assert _expected_iterations(decay, 0.125 / 8, 500) == 6  # the worst column halves each iteration
    assert _expected_iterations(decay, 1e-300, 500) == 500  # bounded by maxiter
    assert _expected_iterations(np.ones((4, 2)), 1e-4, 500) is None  # no decay yet: no estimate
