"""Datasets for pipelines: a synthetic generator, and train/test splits read from files.

Inputs come back as row-sliceable sources (ingestion streams them into the store); targets,
which are small, as arrays.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from ..kernels import InputError, nonfinite_message
from ..store import ArraySource, as_source, open_source, read_all, read_csv
from .augment import Shifted

__all__ = ["Dataset", "synthetic", "load_dataset"]


@dataclass(frozen=True)
class Dataset:
    x_train: ArraySource
    y_train: NDArray
    x_test: ArraySource
    y_test: NDArray
    description: str


def synthetic(n_train: int = 2000, n_test: int = 500, features: int = 16, *, noise: float = 0.05,
              seed: int = 0, task: str = "regression") -> Dataset:
    """A smooth random function of Gaussian inputs (regression), or its sign pattern over 3
    classes (classification): a small, fast, reproducible stand-in for real data."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n_train + n_test, features))
    w = rng.standard_normal((features, 3)) / np.sqrt(features)
    z = x @ w
    f = np.sin(2.0 * z[:, 0]) + 0.5 * z[:, 1] ** 2 - 0.3 * np.abs(z[:, 2])
    if task == "classification":
        y = np.digitize(f, np.quantile(f, [1 / 3, 2 / 3])).astype(np.int64)
    else:
        y = f + noise * rng.standard_normal(f.shape)
    return Dataset(as_source(x[:n_train]), y[:n_train], as_source(x[n_train:]), y[n_train:],
                   f"synthetic {task}: {n_train} train / {n_test} test points, {features} features, seed {seed}")


class _Rows:
    """Rows ``start:stop`` of a source (``stop`` 0: to the end), itself a source."""

    def __init__(self, source: ArraySource, start: int = 0, stop: int = 0) -> None:
        self.source, self.start = source, start
        self.stop = min(source.shape[0], stop) if stop else source.shape[0]
        self.shape = (self.stop - start, *source.shape[1:])
        self.dtype = source.dtype

    def read(self, start: int, stop: int) -> NDArray:
        return self.source.read(self.start + start, self.start + min(stop, self.shape[0]))


class _Concat:
    """Sources stacked by rows, read a slice at a time (a growing dataset kept as dated files)."""

    def __init__(self, sources: list[ArraySource]) -> None:
        self.sources = sources
        self.starts = np.cumsum([0] + [s.shape[0] for s in sources])
        self.shape = (int(self.starts[-1]), *sources[0].shape[1:])
        self.dtype = np.result_type(*(s.dtype for s in sources))

    def read(self, start: int, stop: int) -> NDArray:
        parts = [s.read(max(start - lo, 0), min(stop, hi) - lo)
                 for s, lo, hi in zip(self.sources, self.starts[:-1], self.starts[1:]) if start < hi and stop > lo]
        return np.concatenate(parts).astype(self.dtype, copy=False) if parts else \
            np.empty((0, *self.shape[1:]), self.dtype)


def _files(path: str, key: str, name: str) -> ArraySource:
    """The file ``name`` in ``path``, or, when ``name`` is a glob (``x_*.npy``), every match
    concatenated by rows in the byte order of the file names (dated names, 2026-12-01, sort by date)."""
    if not glob.has_magic(name):
        return open_source(os.path.join(path, name))
    matches = sorted(glob.glob(os.path.join(glob.escape(path), name)), key=lambda p: os.path.basename(p).encode())
    if not matches:
        raise InputError(f"data.{key}: {name!r} matches no file in {path!r}; expected at least one")
    sources = [open_source(m) for m in matches]
    shapes = {tuple(s.shape[1:]) for s in sources}
    if len(shapes) > 1:
        raise InputError(f"data.{key}: the files {name!r} matches have rows of different shapes {sorted(shapes)}; "
                         "expected one shape")
    return sources[0] if len(sources) == 1 else _Concat(sources)


def _targets(source: ArraySource, limit: int) -> NDArray:
    y = read_all(source)
    y = y[:limit] if limit else y
    return y.reshape(y.shape[0], -1)[:, 0] if y.ndim > 1 and y.shape[1] == 1 else y


def load_dataset(data: dict[str, Any], *, task: str, seed: int = 0) -> Dataset:
    """Build the dataset a pipeline's ``[data]`` section describes: read it, hold out
    ``validation`` training points in place of the test set, augment the training images."""
    ds = _read(data, task=task, seed=seed)
    held = data.get("validation", 0)  # a section from before these keys, or written by hand
    if held:
        n = ds.x_train.shape[0]
        if held >= n:
            raise InputError(f"data.validation: expected fewer than the {n} training points, got {held}")
        ds = Dataset(_Rows(ds.x_train, 0, n - held), ds.y_train[:n - held], _Rows(ds.x_train, n - held),
                     ds.y_train[n - held:], f"{ds.description}; validation: the last {held} training points "
                     "stand in for the test set")
    if data.get("augment", "none") == "shift":
        copies, shift = data.get("augment_copies", 1), data.get("augment_shift", 1)
        x = Shifted(ds.x_train, copies, shift, seed)
        ds = Dataset(x, np.concatenate([ds.y_train] * (1 + copies)), ds.x_test, ds.y_test,
                     f"{ds.description}; augmented: {copies} cop{'y' if copies == 1 else 'ies'} of each training "
                     f"image shifted by up to {shift} pixel(s) ({x.shape[0]} training points)")
    return ds


def _read(data: dict[str, Any], *, task: str, seed: int) -> Dataset:
    src, path = data["source"], data["path"]
    lt, le = data["limit_train"], data["limit_test"]
    if src == "synthetic":
        return synthetic(data["n_train"], data["n_test"], data["features"], noise=data["target_noise"],
                         seed=seed, task=task)
    if src == "csv":
        table = read_csv(path)
        bad = nonfinite_message(table, f"data.path: {os.path.basename(path)}")  # rows and columns of the file
        if bad is not None:
            raise InputError(bad)
        col = data["target"] % table.shape[1]
        x, y = np.delete(table, col, axis=1), table[:, col]
        if data["test_mask"]:
            masks = read_csv(data["test_mask"])
            if data["split"] >= masks.shape[1]:
                raise InputError(f"data.split: expected < {masks.shape[1]} (columns of {data['test_mask']}), "
                                 f"got {data['split']}")
            mask = masks[:, data["split"]].astype(bool)
            if mask.shape[0] != x.shape[0]:
                raise InputError(f"data.test_mask: expected {x.shape[0]} rows (as {path}), got {mask.shape[0]}")
        else:
            rng = np.random.default_rng(seed)
            mask = np.zeros(x.shape[0], bool)
            mask[rng.permutation(x.shape[0])[: max(1, round(data["test_fraction"] * x.shape[0]))]] = True
        xtr, ytr, xte, yte = x[~mask], y[~mask], x[mask], y[mask]
        xtr, ytr = (xtr[:lt], ytr[:lt]) if lt else (xtr, ytr)
        xte, yte = (xte[:le], yte[:le]) if le else (xte, yte)
        return _checked(Dataset(as_source(xtr), ytr, as_source(xte), yte,
                                f"{os.path.basename(path)}: {len(ytr)} train / {len(yte)} test rows, "
                                f"{x.shape[1]} features"))
    if src == "npz":
        def part(key: str) -> ArraySource:
            return open_source(path, key=data[key])
    else:
        def part(key: str) -> ArraySource:
            return _files(path, key, data[key])
    xtr, xte = part("x_train"), part("x_test")
    ytr, yte = _targets(part("y_train"), lt), _targets(part("y_test"), le)
    xtr, xte = _Rows(xtr, stop=lt), _Rows(xte, stop=le)
    if xtr.shape[0] != len(ytr) or xte.shape[0] != len(yte):
        raise InputError(f"data: {xtr.shape[0]} training inputs but {len(ytr)} targets, {xte.shape[0]} test "
                         f"inputs but {len(yte)} targets; expected equal counts")
    return _checked(Dataset(xtr, ytr, xte, yte, f"{os.path.basename(path.rstrip('/'))}: {xtr.shape[0]} train / "
                            f"{xte.shape[0]} test points"))


def _checked(ds: Dataset) -> Dataset:
    """Refuse empty splits and non-finite targets before anything is computed from them (their
    mean and scale would turn one NaN into a NaN everywhere, reported at row 0). Inputs are
    checked as they are ingested, before normalising, with their rows and columns."""
    for name, x, y in (("train", ds.x_train, ds.y_train), ("test", ds.x_test, ds.y_test)):
        if x.shape[0] == 0:
            raise InputError(f"data: the {name} split is empty (x_{name} has shape {tuple(x.shape)}); expected at "
                             "least one row")
        y_arr = np.asarray(y)
        if y_arr.dtype.kind not in "biuf":
            raise InputError(f"y_{name}: expected numeric targets, got dtype {y_arr.dtype}")
        bad = nonfinite_message(y_arr, f"y_{name}", what="targets")
        if bad is not None:
            raise InputError(bad)
    return ds
