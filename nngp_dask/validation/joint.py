"""Joint samples of a pair of inputs' network outputs, for the picture of how the finite-width
distribution approaches the kernel's Gaussian (``nngp-dask validate-kernel --plot``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

from ..kernels import Architecture, kernel
from .finite_width import empirical_covariance, sample_outputs

__all__ = ["JointSamples", "joint_samples"]


@dataclass(frozen=True)
class JointSamples:
    """Outputs ``(f(x1), f(x2))`` of random networks at several widths, and the NNGP Gaussian they approach.

    Attributes
    ----------
    architecture : Architecture
    widths : tuple of int
    networks : int
        Networks (samples) per width.
    kernel : ndarray, shape (2, 2)
        The NNGP covariance ``K(x_pair)`` (float64).
    outputs : tuple of ndarray, shape (networks, 2) each
        One per width.
    covariances : tuple of ndarray, shape (2, 2) each
        The empirical covariance of each width's outputs.
    """

    architecture: Architecture
    widths: tuple[int, ...]
    networks: int
    kernel: NDArray[np.float64]
    outputs: tuple[NDArray, ...]
    covariances: tuple[NDArray, ...]


def joint_samples(arch: Architecture, x_pair: ArrayLike, widths: Sequence[int], *, networks: int = 2000,
                  seed: int = 0) -> JointSamples:
    """Sample the outputs of random networks at two inputs, one batch per width.

    Narrow networks give visibly non-Gaussian joint distributions (a sharp peak at the origin
    and heavy tails: a product of few Gaussian factors); as the width grows the samples fill
    the NNGP Gaussian ``N(0, K(x_pair))`` (:func:`nngp_dask.plots.joint_distribution` draws them).

    Parameters
    ----------
    arch : Architecture
    x_pair : array_like, shape (2, d)
    widths : sequence of int
    networks : int
        Networks per width.
    seed : int
        Width ``i`` (in the given order) uses ``seed + i``.

    Returns
    -------
    JointSamples

    Raises
    ------
    ValueError
        When ``x_pair`` is not two points or ``widths`` is empty.
    """
    x_pair = np.asarray(x_pair, dtype=np.float64)
    if x_pair.ndim != 2 or x_pair.shape[0] != 2:
        raise ValueError(f"x_pair: expected shape (2, d), got {x_pair.shape}")
    widths = tuple(int(w) for w in widths)
    if not widths:
        raise ValueError("widths: expected at least one width")
    k = np.asarray(kernel(arch, x_pair, dtype="float64"))
    outputs = tuple(sample_outputs(arch, x_pair, width=w, networks=networks, seed=seed + i)
                    for i, w in enumerate(widths))
    return JointSamples(arch, widths, int(networks), k, outputs, tuple(empirical_covariance(f)[0] for f in outputs))
