"""Matrix-free products with a stored kernel: ``(K + noise I) V`` and ``K(X*, X) V``.

Each upper tile K_IJ is read once per product and used twice (``K_IJ V_J`` into block I and
``K_IJ^T V_I`` into block J) by one compiled pass that accumulates in float64 (``_products``).
The tile products run as Dask tasks next to the store: every worker streams a contiguous run
of tiles, gets only the rows of V that run touches and sends back one sum of its products over
those rows (what travels matters: over TLS it costs about 5 ms per MB, benchmarks/RESULTS.md).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import CancelledError, ThreadPoolExecutor
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy.sparse.linalg import LinearOperator

from ..cluster import LazyClient
from ..linalg import tile_matmat_t
from ..store import KernelStore, TileIO, dequantize, open_kernel, tile_io

__all__ = ["KernelLinearOperator", "StoredKernelOperator", "aslinearoperator", "stored_matmat"]

log = logging.getLogger("nngp_dask")

#: Failures of the cluster rather than of the computation: a worker lost during a scatter or a
#: gather (CommClosedError is an OSError; so is a transient object-storage error inside a task),
#: or the scattered vectors lost with the worker that held them (the tasks are then cancelled,
#: "lost dependencies"). Dask itself reruns the tasks of a dead worker; these are what it cannot,
#: so the whole product, a pure function, is redone. The vectors are scattered to one worker and
#: fetched from there by the others, not broadcast: a broadcast's replication to a worker that
#: dies meanwhile retries for ever on the scheduler (distributed 2026.8), hanging the product.
_RETRYABLE = (OSError, CancelledError)
_RETRIES = 3


def retrying(what: str, fn: Callable[[], Any]) -> Any:
    for attempt in range(_RETRIES + 1):
        try:
            return fn()
        except _RETRYABLE as exc:
            if attempt == _RETRIES:
                raise
            log.warning("%s failed (%s: %s); retrying (%d of %d)", what, type(exc).__name__, exc, attempt + 1,
                        _RETRIES)
            time.sleep(min(2.0 ** attempt, 10.0))
    raise AssertionError("unreachable")  # pragma: no cover


def _run_products(io: TileIO, tiles: Sequence[tuple[int, int]], v_t: NDArray, start: int, tile: int,
                  backwards: bool = False) -> NDArray[np.float64]:
    """``K V`` over a row-major run of upper tiles, transposed, for rows ``start:`` of V."""
    out_t = np.zeros_like(v_t)
    for i, j in (reversed(tiles) if backwards else tiles):
        # float64 accumulation even for float32 tiles: rounding V to float32 makes the operator
        # nonlinear, and unpreconditioned CG on MNIST then diverges (benchmarks/RESULTS.md).
        # Mapped, not copied: the product reads the page cache itself (RESULTS.md section 21)
        k, offset, scale = io.read_packed(i, j, mapped=True)  # int16 tiles stay int16 (linalg.products)
        tile_matmat_t(k, v_t, out_t, i * tile - start, j * tile - start, transpose_too=i != j, offset=offset,
                      scale=scale)
    return out_t


def stored_matmat(ks: KernelStore, x: NDArray) -> NDArray[np.float64]:
    """``K x`` (float64) in this process, each stored train x train tile read once and verified:
    the residual check of a dense solve, without a second n x n array."""
    x2 = np.asarray(x, dtype=np.float64).reshape(x.shape[0], -1)
    out_t = _run_products(ks.tiles("train_train"), list(ks.grid.upper_tiles()), np.ascontiguousarray(x2.T), 0,
                          ks.tile)
    return out_t.T.reshape(x.shape)


def _train_tiles_task(url: str, options: str, token: str, groups: Sequence[Sequence[tuple[int, int]]],
                      v_t: NDArray, start: int, tile: int, backwards: bool = False) -> NDArray[np.float64]:
    """One worker's share of ``K V``, transposed: the sum over its ``groups`` (one per thread of
    the worker, run side by side: tile reads and products release the GIL), each run in its order
    or ``backwards``.

    ``v_t`` holds rows ``start:`` of V transposed: a row-major run of upper tiles touches no row
    above its first tile's, so no more goes out and no more comes back. Each tile is verified as
    it is read (:class:`~nngp_dask.store.TileIO`).
    """
    io = tile_io(url, options, token, "train_train")
    if len(groups) == 1:
        return _run_products(io, groups[0], v_t, start, tile, backwards)
    with ThreadPoolExecutor(len(groups)) as pool:
        parts = list(pool.map(lambda grp: _run_products(io, grp, v_t, start, tile, backwards), groups))
    total = parts[0]
    for part in parts[1:]:
        total += part
    return total


def _test_rows_task(url: str, options: str, token: str, i: int, tile: int, alpha_t: NDArray | None,
                    factor: NDArray | None) -> tuple[int, NDArray | None, NDArray | None, NDArray | None]:
    """One row band of K(X*, X): its mean block, and for the low-rank variance the squared row
    norms and the projections onto ``factor``. ``alpha_t`` is alpha transposed, (k, n)."""
    io = tile_io(url, options, token, "test_train")
    m, n = io.shape
    rows = slice(i * tile, min((i + 1) * tile, m))
    mean_t = np.zeros((alpha_t.shape[0], rows.stop - rows.start)) if alpha_t is not None else None
    sq = np.zeros(rows.stop - rows.start) if factor is not None else None
    proj = np.zeros((rows.stop - rows.start, factor.shape[1])) if factor is not None else None
    for j in range(-(-n // tile)):
        cols = slice(j * tile, min((j + 1) * tile, n))
        k, offset, scale = io.read_packed(i, j, mapped=True)
        if mean_t is not None and alpha_t is not None:  # (set together)
            tile_matmat_t(k, alpha_t, mean_t, 0, cols.start, transpose_too=False, offset=offset, scale=scale)
        if factor is not None:
            k = dequantize(k, offset, scale, np.float64) if io.quantized else np.asarray(k, dtype=np.float64)
            sq += np.einsum("ij,ij->i", k, k)
            proj += k @ factor[cols]
    return i, (mean_t.T if mean_t is not None else None), sq, proj


def _scatter_to(client: Any, data: NDArray, worker: str | None) -> Any:
    """``data`` scattered to ``worker`` only, not broadcast (see _RETRYABLE).

    A worker that left between ``client.nthreads()`` and the scatter is a lost worker like any
    other: the scheduler's scatter looks it up by address and raises KeyError (distributed
    2026.7), which is re-raised as a retryable OSError.
    """
    try:
        return client.scatter(data, hash=False, workers=[worker] if worker else None)
    except KeyError as exc:
        if worker is None or worker not in str(exc):
            raise
        raise ConnectionError(f"worker {worker} left before the vectors reached it") from exc


def _prefer(worker: str | None) -> dict[str, Any]:
    """Submit options that prefer ``worker`` (None: any worker). ``allow_other_workers`` keeps it a
    preference, so a dead worker's tasks still run elsewhere."""
    return {"workers": [worker], "allow_other_workers": True} if worker else {}


def placement(client: Any, count: int) -> list[dict[str, Any]]:
    """Submit options spreading ``count`` tasks round-robin over the worker threads.

    Left to itself the scheduler may run every task on the worker holding the scattered inputs
    (locality), one worker busy and the other idle.
    """
    slots = [w for w, threads in sorted(client.nthreads().items()) for _ in range(threads)]
    return [_prefer(slots[t % len(slots)] if slots else None) for t in range(count)]


def _balanced_groups(tiles: list[tuple[int, int]], groups: int) -> list[list[tuple[int, int]]]:
    """Contiguous runs of tiles of about equal count (row-major keeps each run's V_I local)."""
    groups = max(1, min(groups, len(tiles)))
    bounds = np.linspace(0, len(tiles), groups + 1).round().astype(int)
    return [tiles[a:b] for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def _worker_runs(nthreads: dict[str, int], tiles: list[tuple[int, int]]
                 ) -> list[tuple[str | None, list[list[tuple[int, int]]]]]:
    """Split the upper tiles into a contiguous run per worker, in proportion to its threads,
    and each run into one group per thread.

    Contiguous runs are what keeps a pass's traffic small: the worker whose run starts at tile
    row I needs, and returns, only rows ``I * tile:`` of V; a worker holding the bottom rows
    gets a fraction of V. ``None`` stands for "any worker" while none has joined.
    """
    workers: list[tuple[str | None, int]] = sorted(nthreads.items()) or [(None, 1)]
    groups = _balanced_groups(tiles, sum(max(t, 1) for _, t in workers))
    bounds = np.cumsum([0] + [max(t, 1) for _, t in workers])
    runs = [(w, groups[a:b]) for (w, _), a, b in zip(workers, bounds[:-1], bounds[1:])]
    return [(w, grp) for w, grp in runs if grp]


class StoredKernelOperator:
    """``V -> (K + noise I) V`` over the upper tiles of a complete kernel store.

    Parameters
    ----------
    store : KernelStore
    noise : float
        Added to the diagonal (``noise I``).
    client : distributed.Client
        Runs the tile products (one task per worker and product); the vectors stay in this
        process.
    alternate : bool, default True
        Read the tiles in the opposite order on every other product. A kernel larger than the
        page cache read in the same order each time finds none of it cached (least recently used
        is evicted first: always the tile needed next); turning back at each end starts every
        pass on the tiles the last one read, still cached. The sum is the same up to rounding;
        the order follows ``passes_before + calls``, so a resumed solve that sets
        ``passes_before`` to the products its interrupted run made continues it bit for bit.
    """

    def __init__(self, store: KernelStore, noise: float, client: Any, *, alternate: bool = True) -> None:
        store.require_complete("train_train")
        self.store = store
        self.noise = float(noise)
        self.client = client
        self.n = store.shape[0]
        self._options = json.dumps(store.storage_options or {}, sort_keys=True)
        self._token = store.identity.token()
        self._tiles = list(store.grid.upper_tiles())
        self.alternate = alternate
        self.passes_before = 0
        self.calls = 0
        self.seconds = 0.0

    def __call__(self, v: NDArray) -> NDArray[np.float64]:
        return self.matmat(v)

    def matmat(self, v: NDArray) -> NDArray[np.float64]:
        """``(K + noise I) V`` for V of shape (n, k), float64."""
        t0 = time.perf_counter()
        v = np.asarray(v, dtype=np.float64)
        squeeze = v.ndim == 1
        v_t = np.ascontiguousarray((v[:, None] if squeeze else v).T)

        backwards = self.alternate and (self.passes_before + self.calls) % 2 == 1

        def product() -> NDArray[np.float64]:
            # the worker set is read afresh on each attempt: a retry follows a lost worker
            parts = []
            for worker, groups in _worker_runs(self.client.nthreads(), self._tiles):
                start = groups[0][0][0] * self.store.tile
                where = _prefer(worker)
                vf = _scatter_to(self.client, np.ascontiguousarray(v_t[:, start:]), worker)
                parts.append((start, self.client.submit(_train_tiles_task, self.store.url, self._options, self._token,
                                                        groups, vf, start, self.store.tile, backwards, pure=False,
                                                        **where)))
            out_t = self.noise * v_t
            for (start, _), part in zip(parts, self.client.gather([f for _, f in parts])):
                out_t[:, start:] += part
            return out_t

        out_t = retrying("kernel product", product)
        self.calls += 1
        self.seconds += time.perf_counter() - t0
        return out_t[0].copy() if squeeze else out_t.T.copy()

    def test_products(self, alpha: NDArray | None, factor: NDArray | None = None
                      ) -> tuple[NDArray | None, NDArray | None, NDArray | None]:
        """Stream K(X*, X) once: ``K* alpha`` (m, k), and with ``factor`` (n, r) also the squared
        row norms ``||k*||^2`` (m,) and ``K* factor`` (m, r)."""
        grid = self.store.test_grid
        if grid is None:
            raise ValueError(f"store: {self.store.url!r} holds no test inputs; pass x_test to build_kernel")
        self.store.require_complete("test_train")
        m, tile = grid.n_rows, self.store.tile

        def products() -> list:
            af = self.client.scatter(np.ascontiguousarray(np.asarray(alpha, dtype=np.float64).T), hash=False) \
                if alpha is not None else None
            ff = self.client.scatter(factor, hash=False) if factor is not None else None
            futures = [self.client.submit(_test_rows_task, self.store.url, self._options, self._token, i, tile, af, ff,
                                          pure=False, **where)
                       for i, where in zip(range(grid.shape[0]), placement(self.client, grid.shape[0]))]
            return self.client.gather(futures)

        parts = retrying("test kernel products", products)
        mean = np.empty((m, alpha.shape[1])) if alpha is not None else None
        sq = np.empty(m) if factor is not None else None
        proj = np.empty((m, factor.shape[1])) if factor is not None else None
        for i, mb, sb, pb in parts:
            rows = slice(i * tile, i * tile + (mb.shape[0] if mb is not None else sb.shape[0]))
            if mean is not None:
                mean[rows] = mb
            if sq is not None and proj is not None:  # (set together)
                sq[rows], proj[rows] = sb, pb
        return mean, sq, proj


class KernelLinearOperator(LinearOperator):
    """``K + noise I`` of a complete stored kernel as a :class:`scipy.sparse.linalg.LinearOperator`.

    ``matvec`` / ``matmat`` stream the stored tiles through :class:`StoredKernelOperator` (one
    pass over the upper tiles per product, float64 accumulation), so SciPy's iterative methods
    (``eigsh``, ``minres``, ``cg``, ``lobpcg``, ...) run on a kernel that does not fit in memory.
    The operator is symmetric: its adjoint is itself. Use it as a context manager (or call
    :meth:`close`): a cluster it started is closed then.

    Parameters
    ----------
    store : KernelStore, str or os.PathLike
        A complete kernel store (or its path / URL).
    noise : float, default 0.0
        Added to the diagonal.
    client : distributed.Client, address, cluster file or None
        Where the tile products run, as for :func:`nngp_dask.solve`. None: the current default
        client, else Dask's ``scheduler-address``, else an embedded cluster started at the first
        product.
    """

    def __init__(self, store: KernelStore | str | os.PathLike, noise: float = 0.0, client: Any = None) -> None:
        ks = store if isinstance(store, KernelStore) else open_kernel(store)
        ks.require_complete("train_train")
        if isinstance(noise, bool) or not isinstance(noise, (int, float, np.integer, np.floating)) \
                or not math.isfinite(noise) or noise < 0:
            raise ValueError(f"noise: expected a finite number >= 0, got {noise!r}")
        self.store, self.noise = ks, float(noise)
        self._client = LazyClient(client)
        self._op: StoredKernelOperator | None = None
        super().__init__(dtype=np.dtype(np.float64), shape=(ks.shape[0], ks.shape[0]))

    def _product(self, v: NDArray) -> NDArray[np.float64]:
        if self._op is None:
            self._op = StoredKernelOperator(self.store, self.noise, self._client.get())
        return self._op.matmat(v)

    def _matvec(self, x: NDArray) -> NDArray[np.float64]:
        return self._product(np.asarray(x).reshape(-1))

    def _rmatvec(self, x: NDArray) -> NDArray[np.float64]:
        return self._matvec(np.conj(x))  # real symmetric

    def _matmat(self, x: NDArray) -> NDArray[np.float64]:
        return self._product(np.asarray(x))

    def _adjoint(self) -> KernelLinearOperator:
        return self

    @property
    def calls(self) -> int:
        """Products computed so far (each one pass over the stored tiles)."""
        return self._op.calls if self._op is not None else 0

    def close(self) -> None:
        """Close the cluster this operator started, if any (a given client stays open)."""
        self._op = None
        self._client.__exit__(None, None, None)

    def __enter__(self) -> KernelLinearOperator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def aslinearoperator(store: KernelStore | str | os.PathLike, noise: float = 0.0,
                     client: Any = None) -> KernelLinearOperator:
    """The stored kernel plus ``noise I`` as a SciPy ``LinearOperator``; see :class:`KernelLinearOperator`.

    Examples
    --------
    >>> from scipy.sparse.linalg import eigsh, minres                      # doctest: +SKIP
    >>> with aslinearoperator("k.zarr", noise=1e-2) as op:                # doctest: +SKIP
    ...     top = eigsh(op, k=5, which="LA", return_eigenvectors=False)
    ...     alpha, info = minres(op, y)
    """
    return KernelLinearOperator(store, noise, client)
