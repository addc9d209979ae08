"""Label-preserving augmentation of training images, generated as rows are read, never stored.

A translated copy of a digit is still that digit; an NNGP kernel on raw pixels does not know it
(it has no convolution, no pooling), so adding translated copies to the training set teaches the
GP the invariance through the data. The copies are a deterministic function of the originals
and the seed: a kernel store built from them is fingerprinted like any other inputs, and a
re-run regenerates exactly the same rows.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import NDArray

from ..kernels import InputError
from ..store import ArraySource

__all__ = ["Shifted", "shift_images"]


def shift_images(images: NDArray, dy: int, dx: int) -> NDArray:
    """``images`` (k, h, w) translated by ``dy`` rows and ``dx`` columns; the pixels moved in
    from outside are 0 (the background of MNIST-like images, before any normalisation)."""
    out = np.zeros_like(images)
    h, w = images.shape[1:]
    out[:, max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        images[:, max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return out


class Shifted:
    """The rows of ``source``, then ``copies`` translated copies of all of them (copy ``c`` of row
    ``i`` is row ``(c + 1) n + i``), itself a source.

    Each copy's offset ``(dy, dx)`` is drawn uniformly from ``{-shift..shift}^2`` without
    ``(0, 0)``, seeded by ``seed``. Rows are images ``(h, w)``, or flattened square images.

    Raises
    ------
    InputError
        The rows are neither images nor flattened square images, or ``shift`` leaves no pixel.
    """

    def __init__(self, source: ArraySource, copies: int, shift: int, seed: int) -> None:
        n, rest = source.shape[0], tuple(source.shape[1:])
        if len(rest) == 2:
            self.image = (int(rest[0]), int(rest[1]))
        else:
            d = int(np.prod(rest)) if rest else 1
            side = math.isqrt(d)
            if len(rest) != 1 or side * side != d:
                raise InputError(f"data.augment: 'shift' translates images; expected rows of (height, width) or "
                                 f"flattened square images, got rows of shape {rest}")
            self.image = (side, side)
        if shift >= min(self.image):
            raise InputError(f"data.augment_shift: expected fewer pixels than the {self.image} images' side, "
                             f"got {shift}")
        self.source, self.n, self.copies = source, n, copies
        self.shape = (n * (1 + copies), *rest)
        self.dtype = source.dtype
        offsets = np.array([(dy, dx) for dy in range(-shift, shift + 1) for dx in range(-shift, shift + 1)
                            if (dy, dx) != (0, 0)])
        self.offsets = offsets[np.random.default_rng(seed).integers(len(offsets), size=n * copies)]

    def read(self, start: int, stop: int) -> NDArray:
        stop = min(stop, self.shape[0])
        parts = []
        for c in range(start // self.n, -(-stop // self.n) if stop > start else start // self.n):
            lo, hi = max(start, c * self.n), min(stop, (c + 1) * self.n)
            rows = np.asarray(self.source.read(lo - c * self.n, hi - c * self.n))
            if c > 0:
                rows = self._shifted(rows, self.offsets[lo - self.n:hi - self.n])
            parts.append(rows)
        return np.concatenate(parts) if parts else np.empty((0, *self.shape[1:]), self.dtype)

    def _shifted(self, rows: NDArray, offsets: NDArray) -> NDArray:
        images = rows.reshape(len(rows), *self.image)
        out = np.empty_like(images)
        for dy, dx in np.unique(offsets, axis=0):  # a few dozen offsets: one vectorised shift each
            pick = np.flatnonzero((offsets[:, 0] == dy) & (offsets[:, 1] == dx))
            out[pick] = shift_images(images[pick], int(dy), int(dx))
        return out.reshape(rows.shape)
