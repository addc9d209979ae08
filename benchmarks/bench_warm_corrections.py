"""Can a cheap correction of the warm start cut a re-fit's CG iterations? (issue 17, in memory)

A re-fit after an append starts CG from ``[alpha_old; 0]`` (:mod:`nngp_dask.gp.warmstart`), whose
residual lives in the new rows: ``r_w = y_w - K_wo alpha_old``. The exact correction is the Schur
step ``d_w = S^{-1} r_w``, ``d_o = -(K_oo + noise I)^{-1} K_ow d_w`` with ``S = K_ww + noise I -
K_wo (K_oo + noise I)^{-1} K_ow``, whose ``d_o`` is a full solve with as many right-hand sides as
new rows. This compares, on an MNIST subset's kernel held in memory (the MNIST pipeline's
architecture, noise and tolerance; the re-fit's extended Nystrom preconditioner, landmarks from the
old rows), the CG iterations from:

* zeros (a cold start), and ``[alpha_old; 0]`` (what a re-fit does);
* plus the exact Schur step (the ideal: converged at once, but unaffordable out of core);
* plus a block step on the new rows alone (``d_w = (K_ww + noise I)^{-1} r_w``);
* plus the Schur step with the Nystrom factor in place of the old system (``K_wo (K_oo + noise
  I)^{-1} K_ow ~ F_w F_w^T`` and ``d_o = -M_oo^{-1} F_o F_w^T d_w``: costs O(n r) only);
* plus the same with the true ``K_ow`` and ``M_oo^{-1}`` for the old system's inverse.

and, instead of a better start, a faster rate: deflated PCG (Saad, Yeung, Erhel & Guyomarc'h 2000:
the first iterate corrected on the span of ``W``, every search direction ``A``-orthogonalised
against it) from ``[alpha_old; 0]``, with ``W`` the top ``k`` eigenvectors of the old preconditioned
operator padded with zeros for the new rows (``A_oo v = lambda M_oo v``: the best such a ``W`` can
be), and with ``W`` the top ``k`` Ritz vectors of the old solve's own search directions (what a
re-fit could afford: the old CG's directions ``P`` and products ``A P`` are computed anyway, and
``M P`` is the Nystrom preconditioner applied forwards, no pass over the kernel).

    NNGP_DASK_DATA=../shared/data python benchmarks/bench_warm_corrections.py --n 4000,8000
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import scipy.linalg

from nngp_dask import Architecture, kernel
from nngp_dask.gp.targets import one_hot_targets
from nngp_dask.kernels import normalize
from nngp_dask.linalg import ExtendedNystrom, Nystrom, batched_cg

ROOT = Path(__file__).resolve().parents[1]


def pcg(a: np.ndarray, b: np.ndarray, minv, x0: np.ndarray, tol: float, w: np.ndarray | None = None,
        maxiter: int = 500) -> tuple[int, np.ndarray, np.ndarray]:
    """Preconditioned CG per column (deflated on the span of ``w`` when given, Saad et al. 2000);
    the iterations to ``tol`` and the search directions with their products."""
    bn = np.linalg.norm(b, axis=0)
    x = x0.copy()
    if w is None:
        w = np.zeros((len(b), 0))
    aw = a @ w
    waw = w.T @ aw
    x += w @ np.linalg.solve(waw, w.T @ (b - a @ x)) if w.shape[1] else 0.0
    r = b - a @ x
    z = minv(r)
    p = z - (w @ np.linalg.solve(waw, aw.T @ z) if w.shape[1] else 0.0)
    rz = np.sum(r * z, axis=0)
    ps: list[np.ndarray] = []
    aps: list[np.ndarray] = []
    while len(ps) < maxiter:
        ap = a @ p
        ps.append(p.copy())
        aps.append(ap)
        step = rz / np.sum(p * ap, axis=0)
        x += step * p
        r -= step * ap
        if np.max(np.linalg.norm(r, axis=0) / bn) < tol:
            break
        z = minv(r)
        rz_new = np.sum(r * z, axis=0)
        p = z + (rz_new / rz) * p - (w @ np.linalg.solve(waw, aw.T @ z) if w.shape[1] else 0.0)
        rz = rz_new
    return len(ps), np.hstack(ps), np.hstack(aps)


def ritz_vectors(ps: np.ndarray, aps: np.ndarray, m: np.ndarray, k: int) -> np.ndarray:
    """The top ``k`` Ritz vectors of ``M^-1 A`` in the span of the search directions ``ps``."""
    g = ps.T @ (m @ ps)
    s, u = np.linalg.eigh((g + g.T) / 2)
    keep = s > s.max() * 1e-10  # the columns' directions are far from independent
    basis = u[:, keep] / np.sqrt(s[keep])
    h = basis.T @ (ps.T @ aps) @ basis
    _, y = np.linalg.eigh((h + h.T) / 2)
    return ps @ (basis @ y[:, -k:])


def run(x: np.ndarray, labels: np.ndarray, new_fraction: float, rank: int, noise: float, tol: float,
        deflate: list[int]) -> None:
    n = len(x)
    y = one_hot_targets(labels, 10)
    k = kernel(Architecture(5, "relu", 2.0, 0.0), x, dtype="float64")
    a = k + noise * np.eye(n)
    no = int(round(n * (1 - new_fraction)))
    o, w = slice(0, no), slice(no, n)
    old = Nystrom.build(lambda idx: k[:no][:, idx], no, rank, noise)
    alpha_old = batched_cg(lambda v: a[o, o] @ v, y[o], tol=tol, preconditioner=old).x
    landmarks, transform = old.info["landmarks"], old.info["transform"]
    pre = ExtendedNystrom.extend(old.lowrank_factor, None, transform, landmarks, k[w][:, landmarks], noise, pool=no)
    pre_old = ExtendedNystrom.extend(old.lowrank_factor, None, transform, landmarks, k[w][:0, landmarks], noise,
                                     pool=no)
    f = pre.lowrank_factor  # [F_o; F_w], as a re-fit extends it

    print(f"n = {n} ({n - no} new rows), Nystrom rank {rank}, noise {noise}, tol {tol}")

    def report(label: str, x0: np.ndarray) -> None:
        r0 = np.linalg.norm(y - a @ x0, axis=0) / np.linalg.norm(y, axis=0)
        res = batched_cg(lambda v: a @ v, y, tol=tol, preconditioner=pre, x0=x0)
        print(f"  {label:42s} starting relative residual {r0.max():7.4f}, {res.iterations:3d} CG iterations")

    warm = np.zeros_like(y)
    warm[o] = alpha_old
    r_w = y[w] - a[w, o] @ alpha_old

    def corrected(d_w: np.ndarray, d_o: np.ndarray) -> np.ndarray:
        x0 = warm.copy()
        x0[w] += d_w
        x0[o] += d_o
        return x0

    report("cold (zeros)", np.zeros_like(y))
    report("warm [alpha_old; 0]", warm)
    inv_kow = np.linalg.solve(a[o, o], a[o, w])
    d_w = np.linalg.solve(a[w, w] - a[w, o] @ inv_kow, r_w)
    report("warm + exact Schur step", corrected(d_w, -inv_kow @ d_w))
    report("warm + block step on the new rows", corrected(np.linalg.solve(a[w, w], r_w), 0.0))
    d_w = np.linalg.solve(a[w, w] - f[w] @ f[w].T, r_w)
    report("warm + Nystrom Schur step (F_o F_w^T)", corrected(d_w, -pre_old.apply(f[o] @ (f[w].T @ d_w))))
    d_w = np.linalg.solve(a[w, w] - a[w, o] @ pre_old.apply(a[o, w]), r_w)
    report("warm + Nystrom Schur step (true K_ow)", corrected(d_w, -pre_old.apply(a[o, w] @ d_w)))

    m_old = np.linalg.inv(old.apply(np.eye(no)))  # M_oo itself, for the ideal and for M P
    its, ps, aps = pcg(a[o, o], y[o], old.apply, np.zeros_like(y[o]), tol)
    lam, vecs = scipy.linalg.eigh(a[o, o], (m_old + m_old.T) / 2)
    print(f"  (old preconditioned operator: {int(np.sum(lam > 10))} eigenvalues above 10, the largest "
          f"{lam[-1]:.1f}; the old solve: {its} iterations, {ps.shape[1]} search directions)")
    print(f"  {'warm [alpha_old; 0], the same loop undeflated':58s} {pcg(a, y, pre.apply, warm, tol)[0]:3d} CG "
          "iterations (no confirming pass)")
    for k in deflate:
        for label, basis in ((f"top {k} old eigenvectors (ideal)", vecs[:, -k:]),
                             (f"top {k} Ritz vectors of the old solve", ritz_vectors(ps, aps, m_old, k))):
            wpad = np.zeros((n, k))
            wpad[o] = basis
            print(f"  {'warm + deflation, ' + label:58s} {pcg(a, y, pre.apply, warm, tol, wpad)[0]:3d} CG iterations")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", default="4000,8000", help="training points (the first n of MNIST's)")
    p.add_argument("--new-fraction", type=float, default=0.05)
    p.add_argument("--rank-fraction", type=float, default=0.075, help="Nystrom rank over n")
    p.add_argument("--deflate", default="50,200", help="sizes k of the deflation spaces ('' for none)")
    p.add_argument("--data", default=os.environ.get("NNGP_DASK_DATA", str(ROOT.parent / "shared" / "data")))
    args = p.parse_args()
    mnist = np.load(Path(args.data) / "mnist.npz")
    for n in map(int, args.n.split(",")):
        x = normalize(mnist["x_train"][:n].reshape(n, -1).astype(np.float64), "standardize")
        run(x, mnist["y_train"][:n].astype(np.intp), args.new_fraction, int(n * args.rank_fraction), 0.02, 1e-4,
            [int(k) for k in args.deflate.split(",") if k])


if __name__ == "__main__":
    main()
