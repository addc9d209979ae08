"""int16 tiles (``dtype="int16"``): every stored value within half a level of its tile's range of
the float32 kernel, half the bytes, checksummed with their scales, grown bit-identically, on local
disks and object storage; solves and predictions agree with float32 tiles to the quantisation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from nngp_dask import Architecture, build_kernel, kernel, predict, solve
from nngp_dask.pipeline import ConfigError, load_config
from nngp_dask.store import (
    QUANTIZED_NOTE,
    CorruptTileError,
    StoreMismatchError,
    check_store_dtype,
    dequantize,
    quantize,
    unit_roundoff,
)

try:  # the S3 case reuses test_s3's moto server; skipped without moto/s3fs
    from tests.test_s3 import s3, s3_server  # noqa: F401  (fixtures)
    HAVE_S3 = True
except BaseException:  # pytest.importorskip raises a BaseException
    HAVE_S3 = False

ARCH = Architecture(3, "relu", 1.6, 0.1)
QUICK = Path(__file__).resolve().parents[1] / "pipelines" / "quickstart.toml"
TILE = 32


def _level(values: np.ndarray) -> float:
    return float(values.max() - values.min()) / 65535


# --- the format, as pure functions ------------------------------------------------------------------
def test_quantised_values_are_within_half_a_level_and_keep_the_extremes(rng):
    v = 1.2 + 0.8 * rng.random((37, 29))
    q, offset, scale = quantize(v)
    assert q.dtype == np.int16 and scale == pytest.approx(_level(v), rel=1e-12)
    back = dequantize(q, offset, scale, np.float64)
    assert np.abs(back - v).max() <= 0.5 * scale * (1 + 1e-9)
    assert back[np.unravel_index(v.argmin(), v.shape)] == pytest.approx(v.min(), abs=1e-14)
    assert back[np.unravel_index(v.argmax(), v.shape)] == pytest.approx(v.max(), abs=1e-14)
    assert q.min() == -32768 and q.max() == 32767  # all 65,536 levels in use
    assert dequantize(q, offset, scale).dtype == np.float32


def test_a_constant_tile_is_exact_and_a_symmetric_one_stays_symmetric(rng):
    q, offset, scale = quantize(np.full((4, 5), 1.75))
    assert scale == 0.0 and (dequantize(q, offset, scale, np.float64) == 1.75).all()
    a = rng.random((30, 30))
    q, _, _ = quantize(a + a.T)
    np.testing.assert_array_equal(q, q.T)


def test_store_dtypes_are_named_when_refused():
    assert [check_store_dtype(d) for d in ("float32", np.float64, "int16")] == ["float32", "float64", "int16"]
    with pytest.raises(ValueError, match=r"dtype: expected one of 'float32', 'float64', 'int16', got 'float16'"):
        check_store_dtype("float16")
    assert unit_roundoff("int16") == pytest.approx(1 / 65535) and unit_roundoff("float32") == 2.0 ** -24


# --- a store of int16 tiles -------------------------------------------------------------------------
@pytest.fixture
def stores(tmp_path, thread_client, rng):
    """The same kernel (ragged: 75 training and 20 test points in tiles of 32) as int16 and float32."""
    x, xt = rng.standard_normal((75, 6)), rng.standard_normal((20, 6))
    kw = dict(x_test=xt, tile=TILE, client=thread_client, progress=False)
    return (build_kernel(ARCH, x, tmp_path / "q.zarr", dtype="int16", **kw),
            build_kernel(ARCH, x, tmp_path / "f.zarr", dtype="float32", **kw), x, xt)


def test_every_stored_value_is_within_half_a_level_of_its_tile(stores):
    q, f, x, xt = stores
    for part, want in (("train_train", kernel(ARCH, x, dtype="float32")),
                       ("test_train", kernel(ARCH, xt, x, dtype="float32"))):
        io, grid = q.tiles(part), (q.grid if part == "train_train" else q.test_grid)
        assert io.quantized and io.array.attrs["tile_format"] == QUANTIZED_NOTE
        for i, j in (grid.upper_tiles() if part == "train_train" else np.ndindex(*grid.shape)):
            exact = want[i * TILE:(i + 1) * TILE, j * TILE:(j + 1) * TILE].astype(np.float64)
            got = io.read(i, j)
            assert got.dtype == np.float32 and got.shape == exact.shape  # ragged at the edges
            # half a level, plus float32's rounding of the values read (and of the computed ones)
            bound = 0.5 * _level(exact) + 4 * np.finfo(np.float32).eps * np.abs(exact).max()
            assert np.abs(got - exact).max() <= bound, (part, i, j)
    assert q.dtype == np.float32 and q.stored_dtype == "int16"
    dense = q.to_dask().compute()
    np.testing.assert_array_equal(dense, dense.T)  # diagonal tiles quantised symmetrically
    np.testing.assert_allclose(dense, f.to_dask().compute(), atol=2e-4 * float(np.abs(dense).max()))


def test_int16_tiles_take_half_the_bytes_of_float32(stores):
    q, f, _, _ = stores
    assert q.nbytes_stored() * 2 == f.nbytes_stored() == q.nbytes_total() * 2
    chunk = Path(q.url) / "kernel" / "train_train" / "c" / "0" / "1"
    assert chunk.stat().st_size == TILE * TILE * 2 + 16 + 4  # values, offset and scale, CRC32C


def test_a_damaged_scale_is_caught_by_the_checksum(stores):
    q, *_ = stores
    chunk = Path(q.url) / "kernel" / "train_train" / "c" / "0" / "1"
    data = bytearray(chunk.read_bytes())
    data[TILE * TILE * 2 + 9] ^= 0x10  # a bit of the scale, between the values and the checksum
    chunk.write_bytes(bytes(data))
    with pytest.raises(CorruptTileError, match=r"kernel tile \(0, 1\) .* failed its crc32c check"):
        q.tiles().read(0, 1)


def test_solve_and_predict_agree_with_float32_tiles(stores, thread_client):
    q, f, x, _ = stores
    y = np.sin(x[:, :2])
    kw = dict(noise=0.05, method="cg", tol=1e-8, client=thread_client, progress=False)
    sq, sf = solve(q, y, **kw), solve(f, y, **kw)
    mq, vq = predict(q, sq, variance="tiled", client=thread_client, progress=False)
    mf, vf = predict(f, sf, variance="tiled", client=thread_client, progress=False)
    np.testing.assert_allclose(predict(q, sq, variance="dense", progress=False)[1], vq, rtol=1e-9, atol=1e-12)
    # |dK| <= half a level (~1e-5 here) per entry; the noise 0.05 bounds how far that moves them
    np.testing.assert_allclose(mq, mf, atol=2e-3)
    np.testing.assert_allclose(vq, vf, atol=2e-3)


def test_a_bad_dtype_is_refused_before_any_work_and_the_store_stays(stores):
    q, _, x, xt = stores
    before = {p: p.read_bytes() for p in Path(q.url).rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match=r"^dtype: expected one of 'float32', 'float64', 'int16', got 'float16'$"):
        build_kernel(ARCH, x, q.url, x_test=xt, tile=TILE, dtype="float16", overwrite=True, progress=False)
    assert {p: p.read_bytes() for p in Path(q.url).rglob("*") if p.is_file()} == before


def test_a_float32_build_refuses_an_int16_store(stores):
    q, _, x, xt = stores
    with pytest.raises(StoreMismatchError, match="dtype: store has 'int16', requested 'float32'"):
        build_kernel(ARCH, x, q.url, x_test=xt, tile=TILE, dtype="float32", progress=False)


def test_an_int16_append_is_bit_identical_to_a_fresh_build(thread_client, tmp_path, rng):
    x = rng.standard_normal((70, 5))
    kw = dict(tile=16, dtype="int16", client=thread_client, progress=False)
    build_kernel(ARCH, x[:45], tmp_path / "grown.zarr", **kw)
    grown = build_kernel(ARCH, x, tmp_path / "grown.zarr", append=True, **kw)
    fresh = build_kernel(ARCH, x, tmp_path / "fresh.zarr", **kw)
    assert grown.last_build.update == "append"
    for i, j in fresh.grid.upper_tiles():
        path = Path("kernel") / "train_train" / "c" / str(i) / str(j)
        assert (Path(grown.url) / path).read_bytes() == (Path(fresh.url) / path).read_bytes(), (i, j)


def test_pipelines_take_int16_and_name_what_they_accept():
    assert load_config(QUICK, {"kernel.dtype": "int16"})["kernel"]["dtype"] == "int16"
    with pytest.raises(ConfigError, match=r"kernel\.dtype: expected one of .*'int16'\], got 'float16'"):
        load_config(QUICK, {"kernel.dtype": "float16"})


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_S3, reason="needs s3fs and moto")
def test_int16_tiles_on_object_storage(s3, thread_client, tmp_path, rng):
    opts = {"client_kwargs": {"endpoint_url": s3["endpoint"]}}
    x, xt = rng.standard_normal((40, 3)), rng.standard_normal((9, 3))
    kw = dict(x_test=xt, tile=16, dtype="int16", client=thread_client, progress=False)
    remote = build_kernel(ARCH, x, f"s3://{s3['bucket']}/q.zarr", storage_options=opts, **kw)
    local = build_kernel(ARCH, x, tmp_path / "q.zarr", **kw)
    key = f"{s3['bucket']}/q.zarr/kernel/train_train/c/1/2"
    assert s3["fs"].cat_file(key) == (tmp_path / "q.zarr" / "kernel" / "train_train" / "c" / "1" / "2").read_bytes()
    np.testing.assert_array_equal(remote.to_dask().compute(), local.to_dask().compute())
    rows = slice(0, 9)
    np.testing.assert_array_equal(remote.read_rows("test_train", rows), local.read_rows("test_train", rows))
