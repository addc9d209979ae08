"""The stored-kernel operator and its compiled tile products, against dense NumPy products."""

from __future__ import annotations

import numpy as np
import pytest

from nngp_dask import Architecture, kernel
from nngp_dask.linalg import tile_matmat_t
from nngp_dask.build import build_kernel
from nngp_dask.gp import StoredKernelOperator
from nngp_dask.gp.operator import _balanced_groups

from .oracles import dense_matmat


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("a", [1, 2, 3, 4, 5, 7, 9])  # every remainder of the four-row blocking
@pytest.mark.parametrize("transpose_too", [False, True])
def test_tile_products_equal_float64_blas(rng, dtype, a, transpose_too):
    n, b, nrhs, r0, c0 = 40, 13, 3, 2, 21
    k = rng.standard_normal((a, b)).astype(dtype)
    v_t = rng.standard_normal((nrhs, n))
    out_t = rng.standard_normal((nrhs, n))
    want = out_t.copy()
    k64 = k.astype(np.float64)  # the tile's own values, products in float64
    want[:, r0:r0 + a] += (k64 @ v_t[:, c0:c0 + b].T).T
    if transpose_too:
        want[:, c0:c0 + b] += (k64.T @ v_t[:, r0:r0 + a].T).T
    tile_matmat_t(k, v_t, out_t, r0, c0, transpose_too=transpose_too)
    np.testing.assert_allclose(out_t, want, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("a", [1, 4, 6])
@pytest.mark.parametrize("transpose_too", [False, True])
def test_quantised_tile_products_equal_the_dequantised_tile_s(rng, a, transpose_too):
    """An int16 tile is multiplied as ``offset + scale * q`` without being widened in memory."""
    n, b, nrhs, r0, c0, offset, scale = 40, 13, 3, 2, 21, 1.5, 3e-6
    q = rng.integers(-32768, 32768, (a, b)).astype(np.int16)
    v_t, out_t = rng.standard_normal((nrhs, n)), rng.standard_normal((nrhs, n))
    want, k64 = out_t.copy(), offset + scale * q.astype(np.float64)
    want[:, r0:r0 + a] += (k64 @ v_t[:, c0:c0 + b].T).T
    if transpose_too:
        want[:, c0:c0 + b] += (k64.T @ v_t[:, r0:r0 + a].T).T
    tile_matmat_t(q, v_t, out_t, r0, c0, transpose_too=transpose_too, offset=offset, scale=scale)
    np.testing.assert_allclose(out_t, want, rtol=1e-12, atol=1e-12)


def _stored(ks, part="train_train"):
    """The stored kernel in float64, from the tiles as stored (int16 tiles as offset + scale * q)."""
    io, t = ks.tiles(part), ks.tile
    rows = ks.shape[0] if part == "train_train" else ks.n_test
    out = np.empty((rows, ks.shape[1]))
    for i in range(-(-rows // t)):
        for j in range(-(-ks.shape[1] // t)):
            if part == "train_train" and i > j:
                continue
            q, offset, scale = io.read_packed(i, j)
            block = offset + scale * q.astype(np.float64)
            out[i * t:i * t + block.shape[0], j * t:j * t + block.shape[1]] = block
            if part == "train_train":
                out[j * t:j * t + block.shape[1], i * t:i * t + block.shape[0]] = block.T
    return out


def test_tile_products_accumulate_in_float64(rng):
    # terms that cancel in float32 but not in float64: a float32 accumulation would give 0
    k = np.ones((1, 3), np.float32)
    v_t = np.array([[1.0, 1e-9, -1.0]])
    out_t = np.zeros((1, 3))
    tile_matmat_t(k, v_t, out_t, 0, 0, transpose_too=False)
    assert out_t[0, 0] == pytest.approx(1e-9, rel=1e-6)


def test_tile_products_propagate_nan(rng):
    k = rng.standard_normal((6, 5)).astype(np.float32)
    k[4, 2] = np.nan
    v_t, out_t = rng.standard_normal((2, 20)), np.zeros((2, 20))
    tile_matmat_t(k, v_t, out_t, 0, 10, transpose_too=True)
    assert np.isnan(out_t[:, 4]).all() and np.isnan(out_t[:, 12]).all()  # row 4 and column 2 of the tile
    assert not np.isnan(out_t[:, [0, 1, 2, 3, 5, 10, 11, 13, 14]]).any()


def test_tile_products_refuse_strided_vectors(rng):
    v = rng.standard_normal((20, 2))
    with pytest.raises(ValueError, match="C-contiguous"):
        tile_matmat_t(np.ones((2, 2)), v.T, np.zeros((2, 20)), 0, 0, transpose_too=False)


@pytest.mark.parametrize("dtype", ["float32", "float64", "int16"])
def test_stored_operator_on_a_two_threaded_worker(tmp_path, thread_client, rng, dtype):
    # one worker, two threads: its run is split in two groups, computed side by side and summed
    arch = Architecture(2, "relu", 1.6, 0.1)
    x = rng.standard_normal((107, 5))
    ks = build_kernel(arch, x, tmp_path / "k.zarr", tile=16, dtype=dtype, client=thread_client, progress=False)
    k = _stored(ks) if dtype == "int16" else kernel(arch, x, dtype=dtype).astype(np.float64)
    v = rng.standard_normal((107, 3))
    got = StoredKernelOperator(ks, 0.25, thread_client).matmat(v)
    np.testing.assert_allclose(got, k @ v + 0.25 * v, rtol=1e-12, atol=1e-12)


def test_mapped_tile_reads_equal_copies_and_keep_their_values_when_the_tile_is_rewritten(tmp_path, thread_client,
                                                                                         rng):
    """A CG pass maps the chunk files instead of copying them: the same verified values, read-only
    (ragged tiles included), and a tile rewritten meanwhile (a new file renamed over the old one)
    leaves an existing mapping as it was."""
    arch = Architecture(2, "relu", 1.6, 0.1)
    x = rng.standard_normal((40, 4))  # ragged against tile 16
    ks = build_kernel(arch, x, tmp_path / "k.zarr", tile=16, dtype="float32", client=thread_client, progress=False)
    io = ks.tiles("train_train")
    for i, j in ks.grid.upper_tiles():
        copied, mapped = io.read(i, j), io.read(i, j, mapped=True)
        np.testing.assert_array_equal(mapped, copied)
        assert mapped.shape == copied.shape and not mapped.flags.writeable
    mapped = io.read(1, 2, mapped=True)
    before = mapped.copy()
    io.write(1, 2, np.zeros_like(before))
    np.testing.assert_array_equal(mapped, before)
    np.testing.assert_array_equal(io.read(1, 2, mapped=True), 0.0)


def test_mapped_reads_fall_back_to_map_populate_where_the_kernel_refuses_the_page_in_advice(tmp_path, thread_client,
                                                                                          rng, monkeypatch):
    """Tiles are paged in with MADV_HUGEPAGE + MADV_POPULATE_READ (store.pagecache.map_pages); a
    kernel that answers EINVAL (before Linux 5.14) gets MAP_POPULATE from then on, the same values."""
    from nngp_dask.store import pagecache

    if not pagecache._POPULATE or pagecache._HUGEPAGE is None:
        pytest.skip("no MAP_POPULATE / MADV_HUGEPAGE on this platform")
    ks = build_kernel(Architecture(2, "relu", 1.6, 0.1), rng.standard_normal((40, 4)), tmp_path / "k.zarr", tile=16,
                      dtype="float32", client=thread_client, progress=False)
    io = ks.tiles("train_train")
    want = io.read(0, 1)
    np.testing.assert_array_equal(io.read(0, 1, mapped=True), want)
    monkeypatch.setattr(pagecache, "_POPULATE_READ", 0x7FFF)  # an advice no kernel knows: EINVAL
    np.testing.assert_array_equal(io.read(0, 1, mapped=True), want)
    assert pagecache._POPULATE_READ is None
    np.testing.assert_array_equal(io.read(1, 2, mapped=True), io.read(1, 2))


def test_every_other_product_reads_the_tiles_backwards(tmp_path, thread_client, rng, monkeypatch):
    """Alternating passes turn back at each end (so a kernel larger than the page cache starts each
    pass on the tiles the last one read); the products are the same to rounding."""
    from nngp_dask.store import TileIO

    arch = Architecture(2, "relu", 1.6, 0.1)
    x = rng.standard_normal((75, 4))  # ragged against tile 16
    ks = build_kernel(arch, x, tmp_path / "k.zarr", tile=16, dtype="float32", client=thread_client, progress=False)
    want = kernel(arch, x, dtype="float32").astype(np.float64)
    reads: list = []
    real_read = TileIO.read_packed

    def recording(self, i, j, out=None, **kw):
        reads.append((i, j))
        return real_read(self, i, j, out, **kw)

    monkeypatch.setattr(TileIO, "read_packed", recording)  # in-process workers: their reads
    op = StoredKernelOperator(ks, 0.5, thread_client)
    v = rng.standard_normal((75, 2))
    passes = []
    for _ in range(3):
        reads.clear()
        np.testing.assert_allclose(op.matmat(v), want @ v + 0.5 * v, rtol=1e-12, atol=1e-12)
        passes.append(list(reads))
    tiles = list(ks.grid.upper_tiles())
    for p in passes:  # every tile once per pass (two threads: two runs, each in its own order)
        assert sorted(p) == sorted(tiles)
    runs = _balanced_groups(tiles, 2)  # one worker, two threads: two runs read side by side
    for p, backwards in zip(passes, (False, True, False)):
        for run in runs:  # each run's reads, in the order they happened
            assert [t for t in p if t in run] == (run[::-1] if backwards else run)
    fixed = StoredKernelOperator(ks, 0.5, thread_client, alternate=False)
    for _ in range(2):
        reads.clear()
        fixed.matmat(v)
        for run in runs:
            assert [t for t in reads if t in run] == run


@pytest.mark.parametrize("dtype", ["float32", "float64", "int16"])
def test_stored_operator_equals_dense_products(tmp_path, cluster_client, rng, dtype):
    arch = Architecture(2, "relu", 1.6, 0.1)
    x, xt = rng.standard_normal((107, 5)), rng.standard_normal((31, 5))  # ragged against tile 16
    ks = build_kernel(arch, x, tmp_path / "k.zarr", x_test=xt, tile=16, dtype=dtype, client=cluster_client,
                      progress=False)
    if dtype == "int16":  # the stored values, in float64 (their accuracy: tests/test_tile_formats.py)
        k, ks_ = _stored(ks), _stored(ks, "test_train")
    else:
        k = kernel(arch, x, dtype=dtype).astype(np.float64)  # the stored values, in float64
        ks_ = kernel(arch, xt, x, dtype=dtype).astype(np.float64)
    op = StoredKernelOperator(ks, 0.25, cluster_client)
    v = rng.standard_normal((107, 4))
    dense = dense_matmat(k, 0.25)
    np.testing.assert_allclose(op.matmat(v), dense(v), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(op(v[:, 1]), dense(v[:, 1]), rtol=1e-12, atol=1e-12)
    factor = rng.standard_normal((107, 3))
    mean, sq, proj = op.test_products(v, factor)
    np.testing.assert_allclose(mean, ks_ @ v, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(sq, (ks_ ** 2).sum(1), rtol=1e-12)
    np.testing.assert_allclose(proj, ks_ @ factor, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("nthreads", [{}, {"a": 1}, {"a": 1, "b": 1}, {"a": 2, "b": 1, "c": 1}])
def test_worker_runs_cover_the_upper_tiles_once_in_contiguous_runs(nthreads):
    from nngp_dask.gp.operator import _worker_runs
    from nngp_dask.tiling import TileGrid

    tiles = list(TileGrid(1000, 1000, 64).upper_tiles())  # 16 x 16 tiles, the last ragged
    runs = _worker_runs(nthreads, tiles)
    assert [w for w, _ in runs] == (sorted(nthreads) or [None])
    assert [t for _, groups in runs for grp in groups for t in grp] == tiles  # in order, each once
    for (w, groups) in runs:
        assert len(groups) == nthreads.get(w, 1)  # one per thread
    if len(runs) > 1:  # a later run starts lower down, so it is sent only the rows below its start
        starts = [groups[0][0][0] for _, groups in runs]
        assert starts == sorted(starts) and starts[0] == 0 and starts[-1] > 0


def test_a_worker_gone_before_the_scatter_is_a_retried_loss():
    """distributed's scheduler looks the scatter's worker up by address: one that left since
    ``nthreads()`` raises KeyError there, which the product must retry like any lost worker
    (seen once in a fresh CI run of the killed-worker solve test)."""
    from nngp_dask.gp.operator import _RETRYABLE, _scatter_to

    class Client:
        def __init__(self, error):
            self.error = error

        def scatter(self, data, hash, workers):
            raise self.error

    gone = "tcp://127.0.0.1:1"
    with pytest.raises(_RETRYABLE, match="left before"):
        _scatter_to(Client(KeyError(gone)), np.zeros(2), gone)
    with pytest.raises(KeyError):  # any other KeyError is a bug, not a lost worker
        _scatter_to(Client(KeyError("other")), np.zeros(2), gone)
