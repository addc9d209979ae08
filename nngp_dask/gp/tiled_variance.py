"""Exact predictive variances past the in-memory size: ``K + noise I`` factorised panel by panel
from the stored tiles, the factor kept in scratch files.

The in-memory factor (``variance="dense"``) needs ``8 n^2`` bytes at its peak, 10.4 GB for
kin40k's 36,000 training points; CG per test point costs ``2 n^2`` flops per point and
iteration. Here (:func:`nngp_dask.linalg.blocked_cholesky`) the driver holds a panel of ``n x w``
float64 (``w`` about 2,048 columns), an earlier one read back and their product (about ``4 n w``
float64 at the peak, 2.6 GB at n = 40,000), and the test points' right-hand sides in groups of
``RHS_BYTES``; the factor's ``4 n^2`` bytes (its lower half in float64) go to a temporary folder
(``TMPDIR``, deleted afterwards, refused up front when the disk lacks the space). The flops are
the dense factor's, ``n^3 / 3`` plus ``n^2`` per test point, and the result is exact to rounding.

A float32 factor (``dtype=numpy.float32``) takes half the time but is not what :func:`predict`
uses: on the fitted kin40k model, whose latent variances are ~7e-4 of the prior, its variances
were 2.6 % off in median (benchmarks/RESULTS.md, section 12).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
from numpy.typing import NDArray

from ..linalg import blocked_cholesky, forward_sum_squares, panel_bounds
from ..store import KernelStore, check_free_space
from .posterior import variance_from_reduction

__all__ = ["PANEL_COLUMNS", "RHS_BYTES", "check_scratch", "tiled_variances"]

log = logging.getLogger("nngp_dask")

#: Panel width, rounded to whole tiles: wider panels mean fewer passes over the factor's files
#: (``n^3 / (3 w)`` bytes read in all) and two ``n x w`` float64 panels in memory.
PANEL_COLUMNS = 2048
#: Test points are taken in groups whose right-hand sides (``n`` float64 each) fill this many bytes;
#: each group is one pass over the factor.
RHS_BYTES = 512 * 2**20


class _PanelFiles:
    """Panels of the factor as raw files of ``dtype`` in ``folder`` (rows ``c0:``, C order)."""

    def __init__(self, folder: str, n: int, width: int, dtype: type[np.floating]) -> None:
        self.folder, self.n, self.width, self.dtype = folder, n, width, np.dtype(dtype)

    def _file(self, j: int) -> str:
        return os.path.join(self.folder, f"panel-{j:05d}.{self.dtype.str[1:]}")

    def save(self, j: int, panel: NDArray) -> None:
        with open(self._file(j), "wb") as f:
            np.ascontiguousarray(panel, dtype=self.dtype).tofile(f)

    def load(self, j: int, row0: int) -> NDArray:
        c0 = j * self.width
        cols = min(self.width, self.n - c0)
        # rows row0.. of a panel whose first row is c0: read exactly those bytes (no mapping, so
        # nothing of the file stays in this process's memory)
        return np.fromfile(self._file(j), dtype=self.dtype, count=(self.n - row0) * cols,
                           offset=(row0 - c0) * cols * self.dtype.itemsize).reshape(self.n - row0, cols)


def _kernel_panel(ks: KernelStore) -> Callable[[int, int], NDArray]:
    """``(c0, c1) -> K[c0:, c0:c1]`` from the verified upper tiles (``c0`` on a tile boundary)."""
    io, t, n = ks.tiles("train_train"), ks.tile, ks.shape[0]

    def panel(c0: int, c1: int) -> NDArray:
        out = np.empty((n - c0, c1 - c0), dtype=ks.dtype)
        first, last = c0 // t, -(-c1 // t)  # the panel's tile columns

        def place(bi: int, bj: int, block: NDArray) -> None:
            out[bi * t - c0:bi * t - c0 + block.shape[0], bj * t - c0:bj * t - c0 + block.shape[1]] = block

        for bj in range(first, last):
            for bi in range(first, -(-n // t)):
                if bj < bi < last:
                    continue  # inside the panel's diagonal block: placed as the mirror of (bj, bi)
                block = io.read(bi, bj) if bi <= bj else io.read(bj, bi).T
                place(bi, bj, block)
                if bi < bj:
                    place(bj, bi, block.T)  # each stored tile is read once per panel
        return out

    return panel


def panel_width(tile: int) -> int:
    """``PANEL_COLUMNS`` rounded to a whole number of tiles (at least one)."""
    return tile * max(1, round(PANEL_COLUMNS / tile))


def check_scratch(n: int, tile: int, itemsize: int = 8) -> int:
    """The scratch bytes of the factor of ``n`` points (its lower half in panels, ``itemsize``
    bytes a number); raises :class:`OSError` with one line when ``TMPDIR``'s disk has less free
    space. :func:`nngp_dask.gp.predict` calls it before any work."""
    nbytes = sum((n - c0) * (c1 - c0) * itemsize for c0, c1 in panel_bounds(n, panel_width(tile)))
    check_free_space(tempfile.gettempdir(), nbytes, "the out-of-core factor's scratch space", field="variance",
                     advice="set TMPDIR to a larger disk, or use variance='lowrank'")
    return nbytes


@contextmanager
def _scratch(n: int, tile: int, itemsize: int) -> Iterator[tuple[str, int]]:
    nbytes = check_scratch(n, tile, itemsize)  # again: the disk may have filled since predict checked
    folder = tempfile.mkdtemp(prefix="nngp-dask-factor-", dir=tempfile.gettempdir())
    try:
        yield folder, nbytes
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def tiled_variances(ks: KernelStore, noise: float, prior: NDArray, read_test: Callable[[slice], NDArray], *,
                    dtype: type[np.floating] = np.float64, beat: Callable[[int, str], None] | None = None
                    ) -> NDArray[np.float64]:
    """Latent variances of every test point from an out-of-core Cholesky factor of ``K + noise I``.

    Parameters
    ----------
    ks : KernelStore
        A complete train x train kernel.
    noise : float
        The solve's noise.
    prior : ndarray, shape (m,)
        ``K(x*, x*)`` of the test points.
    read_test : callable ``(rows) -> ndarray, shape (n, len(rows))``
        ``K(X, X*)`` for a slice of test points.
    dtype : {numpy.float64, numpy.float32}
        The factor's precision (float32: see the module's note).
    beat : callable ``(done, message)``, optional
        Progress (test points done, and what is happening).

    Returns
    -------
    ndarray, shape (m,)
        Variances clipped at 0.

    Raises
    ------
    OSError
        When ``TMPDIR``'s disk lacks the factor's space (:func:`check_scratch`).
    """
    n, m, t = ks.shape[0], prior.shape[0], ks.tile
    width, itemsize = panel_width(t), np.dtype(dtype).itemsize
    with _scratch(n, t, itemsize) as (folder, nbytes):
        files = _PanelFiles(folder, n, width, dtype)
        note = (lambda c: beat(0, f"out-of-core Cholesky: {c} of {n} columns")) if beat else None
        log.info("variances: out-of-core %s Cholesky of the %d x %d kernel in panels of %d columns (%.1f GB of "
                 "scratch in %s)", np.dtype(dtype).name, n, n, width, nbytes / 1e9, folder)
        blocked_cholesky(_kernel_panel(ks), n, width, noise, files.save, files.load, dtype=dtype, beat=note)
        group = max(1, RHS_BYTES // (itemsize * n))
        if group > t:
            group -= group % t  # whole rows of test tiles: each is read once

        var = np.empty(m)
        for start in range(0, m, group):
            stop = min(start + group, m)
            if beat is not None:
                beat(start, f"variances of test points {start}-{stop - 1}: one pass over the factor")
            rhs = np.array(read_test(slice(start, stop)), dtype=dtype)
            var[start:stop] = variance_from_reduction(prior[start:stop], forward_sum_squares(rhs, n, width, files.load))
    return var
