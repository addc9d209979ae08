"""Batched and block CG, preconditioners and SLQ against dense linear algebra on a real NNGP kernel."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats

from nngp_dask import Architecture, kernel
from nngp_dask.linalg import (
    CGResult,
    CGState,
    ConvergenceWarning,
    Identity,
    Jacobi,
    Nystrom,
    PivotedCholesky,
    batched_cg,
    block_cg,
    dense_solve,
    log_marginal_likelihood,
    logdet_dense,
    make_preconditioner,
    slq_logdet,
)

N = 437  # ragged on purpose
N_DUP = 37  # the last N_DUP inputs repeat the first ones: K is exactly singular
NOISE = 0.05
PRECONDITIONERS = ["none", "jacobi", "pivoted_cholesky", "nystrom", "auto"]
# what holds for both solvers is tested on both
both_solvers = pytest.mark.parametrize("cg", [batched_cg, block_cg], ids=["batched", "block"])


@pytest.fixture(scope="module")
def k_train() -> np.ndarray:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((N - N_DUP, 20))
    x = np.vstack([x, x[:N_DUP]])
    return kernel(Architecture(3, "relu", 1.6, 0.1), x, dtype="float64")


@pytest.fixture(scope="module")
def system(k_train):
    """(matmat, A, diag, column_fn) of A = K + NOISE I."""
    a = k_train + NOISE * np.eye(N)
    return (lambda v: a @ v), a, np.diag(k_train).copy(), (lambda idx: k_train[:, idx])


def _precond(name, system, rank=128, noise=NOISE):
    _, _, diag, column_fn = system
    return make_preconditioner(name, diag=diag, column_fn=column_fn, noise=noise, rank=rank, seed=3)


def _rhs(k, seed=1):
    return np.random.default_rng(seed).standard_normal((N, k))


def _counting(matmat):
    """``matmat`` that records the width of every block it is given, and that record."""
    widths: list[int] = []

    def counting(v):
        widths.append(v.shape[1])
        return matmat(v)

    return counting, widths


# ------------------------------------------------------------------------------------------
# correctness
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", PRECONDITIONERS)
@pytest.mark.parametrize("k", [1, 10])
@both_solvers
def test_cg_matches_dense_cholesky(k_train, system, name, k, cg):
    matmat, _, _, _ = system
    b = _rhs(k)[:, 0] if k == 1 else _rhs(k)
    expected = dense_solve(k_train, b, NOISE)
    res = cg(matmat, b, tol=1e-10, preconditioner=_precond(name, system))
    assert isinstance(res, CGResult)
    assert res.converged and res.converged_columns.all()
    assert res.x.shape == b.shape and res.alpha is res.x and res.x.flags.writeable
    assert np.linalg.norm(res.x - expected) <= 1e-6 * np.linalg.norm(expected)
    assert res.residuals.shape == (res.iterations + 1, k)
    assert np.isfinite(res.residuals).all() and res.residuals[-1].max() <= 1e-10
    assert "converged" in res.summary()


@both_solvers
def test_lowrank_preconditioners_reduce_iterations(system, cg):
    matmat = system[0]
    b = _rhs(10)
    plain = cg(matmat, b, tol=1e-8).iterations
    for name in ("pivoted_cholesky", "nystrom"):
        its = cg(matmat, b, tol=1e-8, preconditioner=_precond(name, system)).iterations
        assert its < 0.75 * plain, (name, its, plain)


@both_solvers
def test_warm_start_at_solution_needs_no_iteration(k_train, system, cg):
    b = _rhs(3)
    x0 = dense_solve(k_train, b, NOISE)
    res = cg(system[0], b, tol=1e-8, x0=x0)
    assert res.iterations == 0 and res.converged


@both_solvers
def test_zero_columns_return_zeros(system, cg):
    b = _rhs(3)
    b[:, 1] = 0.0
    passed = []

    def matmat(v):
        passed.append(v.copy())
        return system[0](v)

    res = cg(matmat, b, tol=1e-10)
    assert res.converged
    assert np.array_equal(res.x[:, 1], np.zeros(N))
    assert (res.residuals[:, 1] == 0).all()
    assert all(np.all(np.any(v != 0, axis=0)) for v in passed)  # the zero column never goes in


def test_one_product_per_iteration_and_confirmed_true_residuals(k_train, system):
    """Columns converging at different iterations cost no extra product: each column's true
    residual is checked inside the next iteration's product, and stands below tol at the end."""
    matmat, a = system[0], system[1]
    _, vecs = np.linalg.eigh(a)
    b = np.column_stack([_rhs(3), vecs[:, -1] + 1e-3 * _rhs(1)[:, 0]])  # the last converges early
    counting, widths = _counting(matmat)
    res = batched_cg(counting, b, tol=1e-8, true_residual_every=0)
    assert res.converged and len(widths) == res.iterations
    claimed = np.argmax(res.residuals <= 1e-8, axis=0)  # the iteration each column's residual got there
    assert len(set(claimed.tolist())) > 1
    for i, width in enumerate(widths, 1):  # iteration i: the directions still active, the iterates to confirm
        assert width == np.sum(claimed + 1 >= i) + np.sum(claimed == i - 1)
    true = np.linalg.norm(b - a @ res.x, axis=0) / np.linalg.norm(b, axis=0)
    assert np.all(true <= 1e-8)
    np.testing.assert_allclose(res.residuals[-1], true, rtol=1e-6)


@both_solvers
def test_a_non_finite_confirmation_is_a_breakdown_not_a_convergence(system, cg):
    matmat = system[0]
    b = _rhs(2)

    def nan_for_iterates(v):  # the iterates checked ride after the 2 directions
        out = matmat(v)
        out[:, 2:] = np.nan
        return out

    with pytest.warns(ConvergenceWarning, match="broke down"):
        res = cg(nan_for_iterates, b, tol=1e-6, true_residual_every=0)
    assert not res.converged and np.isinf(res.residuals[-1]).any()
    assert not np.isnan(res.residuals).any()


def test_per_column_convergence_freezes_easy_column(system):
    matmat, a, _, _ = system
    _, vecs = np.linalg.eigh(a)
    b = np.column_stack([_rhs(1)[:, 0], vecs[:, -1]])  # an eigenvector converges in one step
    counting, widths = _counting(matmat)
    res = batched_cg(counting, b, tol=1e-10, true_residual_every=0)
    assert res.converged and res.iterations > 10
    easy = res.residuals[:, 1]
    done = int(np.argmax(easy <= 1e-10))  # its recursive residual gets there
    assert done <= 2
    assert (easy[done + 1:] == easy[done + 1]).all()  # confirmed in the next product, then frozen
    # both directions, then both plus the easy column's iterate (its true residual), then the other
    # direction only, and at last its direction with its own iterate, confirmed
    assert widths[:done] == [2] * done and widths[done] == 3 and set(widths[done + 1:-1]) == {1}
    assert widths[-1] == 2


def test_block_cg_solves_dependent_right_hand_sides(k_train, system):
    """Zero-mean one-hot targets (ten columns spanning nine directions), a repeated column and a
    multiple of another: the dependent directions are deflated, not divided by zero."""
    labels = np.random.default_rng(4).integers(0, 10, N)
    onehot = np.eye(10)[labels] - 0.1
    b = np.column_stack([onehot, onehot[:, 3], -2.5 * onehot[:, 7]])
    for pre in ("none", "nystrom"):
        res = block_cg(system[0], b, tol=1e-10, preconditioner=_precond(pre, system))
        expected = dense_solve(k_train, b, NOISE)
        assert res.converged
        assert np.linalg.norm(res.x - expected) <= 1e-6 * np.linalg.norm(expected)
        np.testing.assert_array_equal(res.x[:, 10], res.x[:, 3])  # one block: identical columns stay identical


def test_block_cg_needs_fewer_iterations_than_batched(system):
    """Each column searches every column's Krylov space: on this kernel's spectrum that is fewer
    passes for the same tolerance (the MNIST figures are in benchmarks/RESULTS.md)."""
    b = _rhs(10)
    for pre in ("none", "nystrom"):
        kw = dict(tol=1e-8, preconditioner=_precond(pre, system, rank=32))
        batched, block = batched_cg(system[0], b, **kw), block_cg(system[0], b, **kw)
        assert block.converged and batched.converged
        assert block.iterations < 0.8 * batched.iterations, (pre, block.iterations, batched.iterations)


def test_block_cg_on_one_column_is_preconditioned_cg(system):
    b = _rhs(1)[:, 0]
    kw = dict(tol=1e-9, preconditioner=_precond("pivoted_cholesky", system))
    batched, block = batched_cg(system[0], b, **kw), block_cg(system[0], b, **kw)
    # the same recurrence up to rounding (alpha = p^T r / p^T A p against r^T z / p^T A p): the same
    # residual history, give or take the last iteration at the tolerance
    assert abs(block.iterations - batched.iterations) <= 1
    common = min(block.iterations, batched.iterations)
    np.testing.assert_allclose(block.residuals[:common], batched.residuals[:common], rtol=1e-4, atol=1e-14)
    np.testing.assert_allclose(block.x, batched.x, rtol=1e-6, atol=1e-10)


def test_block_cg_passes_every_active_direction_and_confirms_at_once(system):
    matmat, a = system[0], system[1]
    b = _rhs(3)
    counting, widths = _counting(matmat)
    res = block_cg(counting, b, tol=1e-8, true_residual_every=0)
    assert res.converged and len(widths) == res.iterations
    # the block's three directions every iteration; the three iterates ride along in the last one
    assert widths[:-1] == [3] * (res.iterations - 1) and widths[-1] == 6
    true = np.linalg.norm(b - a @ res.x, axis=0) / np.linalg.norm(b, axis=0)
    np.testing.assert_allclose(res.residuals[-1], true, rtol=1e-6)


def test_block_cg_breaks_down_on_an_indefinite_matrix(system):
    a = system[1] - 0.5 * np.trace(system[1]) / N * np.eye(N)  # eigenvalues of both signs
    with pytest.warns(ConvergenceWarning, match="broke down"):
        res = block_cg(lambda v: a @ v, _rhs(2), tol=1e-10)
    assert not res.converged and np.isfinite(res.x).all()


# ------------------------------------------------------------------------------------------
# checkpoint / resume
# ------------------------------------------------------------------------------------------


class _Crash(RuntimeError):
    pass


@pytest.mark.parametrize("name", ["none", "pivoted_cholesky"])
@both_solvers
def test_resume_is_bit_identical(system, name, cg):
    matmat = system[0]
    pre = _precond(name, system)
    b = _rhs(4)
    kw = dict(tol=1e-10, preconditioner=pre, true_residual_every=5)
    full = cg(matmat, b, **kw)

    saved = {}

    def checkpoint(state):
        if state.iteration == 7:
            saved.update(state.to_arrays())
            raise _Crash  # the process dies after checkpointing iteration 7

    with pytest.raises(_Crash):
        cg(matmat, b, callback=checkpoint, **kw)
    resumed = cg(matmat, b, state=CGState.from_arrays(saved), **kw)
    assert resumed.iterations == full.iterations
    assert np.array_equal(resumed.x, full.x)
    assert np.array_equal(resumed.residuals, full.residuals)
    assert resumed.state == full.state

    # from a state whose column awaits the confirmation of its residual in the next product
    states = []
    cg(matmat, _rhs(4), callback=states.append, **kw)
    waiting = [s for s in states if np.any(s.active & (s.residuals[-1] <= kw["tol"]))]
    assert waiting
    again = cg(matmat, b, state=waiting[0], **kw)
    assert np.array_equal(again.x, full.x) and again.state == full.state

    # the same through maxiter and CGResult.state
    with pytest.warns(ConvergenceWarning):
        part = cg(matmat, b, maxiter=7, **kw)
    assert part.iterations == 7 and not part.converged
    again = cg(matmat, b, state=part.state, **kw)
    assert np.array_equal(again.x, full.x) and again.iterations == full.iterations


@both_solvers
def test_state_is_immutable_and_round_trips(system, cg):
    states = []
    cg(system[0], _rhs(2), tol=1e-6, callback=states.append)
    s = states[3]
    assert s.iteration == 4 and s.residuals.shape == (5, 2)
    with pytest.raises(ValueError):
        s.x[0, 0] = 1.0  # read-only
    arrays = s.to_arrays()
    assert set(arrays) == {"x", "r", "z", "p", "rz", "iteration", "active", "residuals", "b_norm"}
    assert CGState.from_arrays(arrays) == s
    assert states[0] != s


# ------------------------------------------------------------------------------------------
# failure modes
# ------------------------------------------------------------------------------------------


@both_solvers
def test_singular_kernel_without_noise_does_not_converge(k_train, cg):
    b = _rhs(1)[:, 0]  # differs on duplicated inputs: outside the range of K
    with pytest.warns(ConvergenceWarning) as record:
        res = cg(lambda v: k_train @ v, b, tol=1e-8, maxiter=200)
    assert not res.converged and not res.converged_columns[0]
    assert np.isfinite(res.residuals).all()
    message = str(record[0].message)
    assert "noise" in message and "rank" in message and "float64" in message


@both_solvers
def test_maxiter_warns_with_advice(system, cg):
    with pytest.warns(ConvergenceWarning, match="maxiter=3"):
        res = cg(system[0], _rhs(2), tol=1e-12, maxiter=3)
    assert res.iterations == 3 and not res.converged and "NOT converged" in res.summary()


def test_dense_solve_failure_advises_noise(k_train):
    with pytest.raises(np.linalg.LinAlgError, match="[Ii]ncrease noise") as info:
        dense_solve(k_train - 1.0 * np.eye(N), _rhs(1), 0.0)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"tol": 0.0}, "tol"),
        ({"tol": -1e-3}, "tol"),
        ({"tol": float("nan")}, "tol"),
        ({"b": np.full((N, 2), np.nan)}, "b"),
        ({"b": np.ones((N, 2, 2))}, "b"),
        ({"b": np.array([1.0, np.inf] + [0.0] * (N - 2))}, "b"),
        ({"maxiter": -1}, "maxiter"),
        ({"x0": np.zeros((N, 3))}, "x0"),
        ({"matmat": lambda v: v[:-1]}, "matmat"),
        ({"preconditioner": "jacobi"}, "preconditioner"),
        ({"true_residual_every": -5}, "true_residual_every"),
    ],
)
@both_solvers
def test_bad_inputs_raise(system, kwargs, field, cg):
    args = {"matmat": system[0], "b": np.ones((N, 2))}
    args.update(kwargs)
    matmat, b = args.pop("matmat"), args.pop("b")
    with pytest.raises(ValueError, match=f"^{field}"):
        cg(matmat, b, **args)


@both_solvers
def test_state_for_another_rhs_is_refused(system, cg):
    states = []
    with pytest.warns(ConvergenceWarning):
        cg(system[0], _rhs(2), tol=1e-6, maxiter=3, callback=states.append)
    with pytest.raises(ValueError, match="^state"):
        cg(system[0], _rhs(2, seed=9), state=states[-1])
    with pytest.raises(ValueError, match="^state"):
        cg(system[0], _rhs(3), state=states[-1])
    with pytest.raises(ValueError, match="^x0"):
        cg(system[0], _rhs(2), state=states[-1], x0=np.zeros((N, 2)))


def test_bad_preconditioner_arguments(system):
    _, _, diag, column_fn = system
    with pytest.raises(ValueError, match="^preconditioner.*'cholesky'"):
        make_preconditioner("cholesky", diag=diag, column_fn=column_fn, noise=NOISE)
    with pytest.raises(ValueError, match="^noise"):
        make_preconditioner("pivoted_cholesky", diag=diag, column_fn=column_fn, noise=0.0)
    with pytest.raises(ValueError, match="^column_fn"):
        make_preconditioner("nystrom", diag=diag, noise=NOISE)
    with pytest.raises(ValueError, match="^column_fn"):
        PivotedCholesky.build(diag, lambda idx: np.zeros((N, 1 + len(idx))), 4, NOISE)
    with pytest.raises(ValueError, match="^diag"):
        Jacobi(-diag, NOISE)
    with pytest.raises(ValueError, match="^rank"):
        Nystrom.build(column_fn, N, -1, NOISE)


# ------------------------------------------------------------------------------------------
# preconditioners
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["pivoted_cholesky", "nystrom"])
def test_woodbury_apply_equals_dense_inverse(system, name):
    pre = _precond(name, system, rank=40)
    lf = pre.lowrank_factor
    assert lf.shape == (N, pre.rank) and pre.rank == 40 and pre.name == name
    m = lf @ lf.T + NOISE * np.eye(N)
    r = _rhs(5)
    expected = np.linalg.solve(m, r)
    assert np.allclose(pre.apply(r), expected, rtol=1e-9, atol=1e-12 * np.abs(expected).max())
    assert np.allclose(pre.apply(r[:, 0]), expected[:, 0], rtol=1e-9, atol=1e-12 * np.abs(expected).max())
    inv = pre.dense_inverse()
    assert np.allclose(inv, inv.T, atol=1e-12 * np.abs(inv).max())
    assert np.linalg.eigvalsh(inv).min() > 0
    assert np.isclose(pre.logdet(), np.linalg.slogdet(m)[1])


def test_pivoted_cholesky_approximates_kernel(k_train, system):
    _, _, diag, column_fn = system
    pre = PivotedCholesky.build(diag, column_fn, 300, NOISE, tol=1e-12)
    err = k_train - pre.lowrank_factor @ pre.lowrank_factor.T
    assert np.linalg.eigvalsh(err).min() > -1e-8  # L L^T <= K
    assert np.trace(err) <= 0.05 * np.trace(k_train)
    assert len(set(pre.info["pivots"].tolist())) == pre.rank
    blocked = PivotedCholesky.build(diag, column_fn, 300, NOISE, tol=1e-12, block_size=16)
    err_b = k_train - blocked.lowrank_factor @ blocked.lowrank_factor.T
    assert np.trace(err_b) <= 2 * np.trace(err) + 1e-12


def test_nystrom_factor_is_the_nystrom_approximation_in_svd_order(k_train, system):
    """F F^T = C W^+ C^T (the column-subset Nystrom approximation, computed densely here), with
    orthogonal columns in descending norm: the low-rank variance keeps its leading columns."""
    _, _, _, column_fn = system
    pre = Nystrom.build(column_fn, N, 60, NOISE, seed=3)
    s_idx = pre.info["landmarks"]
    c = k_train[:, s_idx]
    want = c @ np.linalg.pinv(k_train[np.ix_(s_idx, s_idx)], rcond=1e-10, hermitian=True) @ c.T
    f = pre.lowrank_factor
    np.testing.assert_allclose(f @ f.T, want, atol=1e-8 * np.abs(want).max())
    gram = f.T @ f
    np.testing.assert_allclose(gram, np.diag(pre.singular_values ** 2), atol=1e-8 * gram.max())
    assert np.all(np.diff(pre.singular_values) <= 0)


def test_diagonal_preconditioners(system):
    _, _, diag, _ = system
    r = _rhs(3)
    assert np.array_equal(Identity(N).apply(r), r)
    assert np.allclose(Jacobi(diag, NOISE).apply(r), r / (diag + NOISE)[:, None])
    assert Jacobi(diag, NOISE).lowrank_factor is None and Identity(N).rank == 0
    assert make_preconditioner("auto", diag=diag, noise=NOISE).name == "jacobi"


# ------------------------------------------------------------------------------------------
# log-determinants and the marginal likelihood
# ------------------------------------------------------------------------------------------


def test_slq_within_three_standard_errors(k_train, system):
    exact = logdet_dense(k_train, NOISE)
    assert np.isclose(exact, np.linalg.slogdet(system[1])[1])
    est = slq_logdet(system[0], N, num_probes=30, lanczos_steps=40, seed=5)
    assert 0 < est.stderr < 0.05 * abs(exact)
    assert abs(est.logdet - exact) <= 3 * est.stderr
    no_reorth = slq_logdet(system[0], N, num_probes=30, lanczos_steps=40, seed=5, reorthogonalize=False)
    assert abs(no_reorth.logdet - exact) <= 3 * no_reorth.stderr


def test_dense_logdet_and_marginal_likelihood(k_train, system):
    y = _rhs(3)
    alpha, logdet = dense_solve(k_train, y, NOISE, return_logdet=True)
    assert np.isclose(logdet, logdet_dense(k_train, NOISE))
    dist = scipy.stats.multivariate_normal(mean=np.zeros(N), cov=system[1])
    expected = sum(dist.logpdf(y[:, j]) for j in range(3))
    assert np.isclose(log_marginal_likelihood(y, alpha, logdet, N), expected, rtol=1e-10)
    assert np.isclose(log_marginal_likelihood(y[:, 0], alpha[:, 0], logdet), dist.logpdf(y[:, 0]), rtol=1e-10)
    with pytest.raises(ValueError, match="^n"):
        log_marginal_likelihood(y, alpha, logdet, N + 1)
    with pytest.raises(ValueError, match="^alpha"):
        log_marginal_likelihood(y, alpha[:, :2], logdet)
