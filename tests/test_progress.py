"""Progress that a log file shows: timed lines while nothing finishes, estimates that say so, and
lines for every long stage (kernel tiles, preconditioner, CG, predictions)."""

from __future__ import annotations

import logging
import re

import numpy as np

from nngp_dask import Architecture
from nngp_dask.build import build_kernel
from nngp_dask.gp import predict, solve
from nngp_dask.kernels import kernel
from nngp_dask.monitor import Heartbeat

ARCH = Architecture(3, "relu", 1.6, 0.1)


def _lines(caplog, prefix: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith(prefix)]


def _work_until(caplog, prefix: str, count: int, x: np.ndarray) -> None:
    """Real work (kernel evaluations) until the heartbeat has logged ``count`` lines."""
    for _ in range(100_000):
        if len(_lines(caplog, prefix)) >= count:
            return
        kernel(ARCH, x)
    raise AssertionError(f"no {count} heartbeat line(s) while working")


def test_heartbeat_logs_on_a_timer_while_nothing_finishes(caplog, rng):
    x = rng.standard_normal((300, 16))
    with caplog.at_level(logging.INFO, logger="nngp_dask"):
        with Heartbeat("demo tiles", 4, every=0.02) as beat:
            _work_until(caplog, "demo tiles", 2, x)  # the first task has not finished: lines all the same
            beat(1, "after the first")
            seen = len(_lines(caplog, "demo tiles"))
            _work_until(caplog, "demo tiles", seen + 1, x)
    lines = _lines(caplog, "demo tiles")
    assert re.fullmatch(r"demo tiles: 0/4 after \d+ s \(none finished yet, no estimate\)", lines[0]), lines[0]
    assert re.fullmatch(r"demo tiles: 0/4 after \d+ s \(none finished yet, no estimate\)", lines[1]), lines[1]
    assert re.fullmatch(r"demo tiles: 1/4 after \d+ (s|min) \([0-9.e+-]+/s; est\. ~\d+ (s|min|h) left\) "
                        r"after the first", lines[-1]), lines[-1]
    assert not beat._thread.is_alive()  # the block's end stops the lines


def test_limit_only_estimate_says_at_most():
    beat = Heartbeat("CG iterations", 500, every=60, initial=0, bound=True)
    beat(10, "r 1e-2")
    assert "est. at most ~" in beat.line() and "(to the limit of 500)" in beat.line()
    beat(10, "r 1e-2", expected=20)
    assert "est. ~" in beat.line() and "at most" not in beat.line()


def test_solve_and_predict_log_every_long_stage(cluster_client, tmp_path, rng, caplog, monkeypatch):
    """Preconditioner, CG and predictions each log timed lines (interval shortened to 2 ms: the
    preconditioner's few tasks take milliseconds here)."""
    monkeypatch.setenv("NNGP_DASK_PROGRESS_EVERY", "0.002")
    x, xt = rng.standard_normal((160, 6)), rng.standard_normal((40, 6))
    y = np.sin(x[:, 0])
    ks = build_kernel(ARCH, x, tmp_path / "k.zarr", x_test=xt, tile=64, dtype="float64", client=cluster_client,
                      progress=False)
    with caplog.at_level(logging.INFO, logger="nngp_dask"):
        result = solve(ks, y, noise=1e-2, tol=1e-6, method="cg", preconditioner="nystrom", rank=120,
                       client=cluster_client, progress=False)
        mean, var = predict(ks, result, variance="exact", client=cluster_client, progress=False, batch=20)
    assert result.converged and mean.shape == (40,) and var.shape == (40,)
    pre = _lines(caplog, "preconditioner (Nystrom from the stored tiles): ")
    assert pre and all(re.match(r"preconditioner \(Nystrom from the stored tiles\): \d/3 after ", line) for line in pre)
    cg = _lines(caplog, "CG iterations: ")
    assert cg and all("worst relative residual" in line for line in cg if "none finished" not in line)
    assert any("est. ~" in line or "est. at most ~" in line for line in cg)
    pred = _lines(caplog, "predict: test points: ")
    assert pred and any("exact variances" in line for line in pred)
