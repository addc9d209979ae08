"""The grid of square tiles that cuts a kernel matrix, ragged last row and column included."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

__all__ = ["TileGrid", "DEFAULT_TILE"]

#: Default tile edge. At d = 784 a 2048 x 2048 float32 tile is 16 MiB and takes ~0.1 s
#: (GEMM + depth-3 recursion) on one core: two orders of magnitude above the ~1 ms a
#: distributed task costs, while a few tiles per worker stay far below any memory limit
#: (see benchmarks/RESULTS.md, "tile size").
DEFAULT_TILE = 2048


@dataclass(frozen=True)
class TileGrid:
    """Square tiles of edge ``tile`` over an ``n_rows x n_cols`` matrix.

    Tile ``(I, J)`` covers rows ``I * tile : min((I + 1) * tile, n_rows)`` and the same for
    columns; the last row and column of tiles are ragged when ``tile`` does not divide n.
    """

    n_rows: int
    n_cols: int
    tile: int

    def __post_init__(self) -> None:
        for name in ("n_rows", "n_cols", "tile"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")

    @property
    def shape(self) -> tuple[int, int]:
        """Number of tiles along rows and columns."""
        return -(-self.n_rows // self.tile), -(-self.n_cols // self.tile)

    def rows(self, i: int) -> slice:
        return slice(i * self.tile, min((i + 1) * self.tile, self.n_rows))

    def cols(self, j: int) -> slice:
        return slice(j * self.tile, min((j + 1) * self.tile, self.n_cols))

    def all_tiles(self) -> Iterator[tuple[int, int]]:
        nr, nc = self.shape
        return ((i, j) for i in range(nr) for j in range(nc))

    def upper_tiles(self) -> Iterator[tuple[int, int]]:
        """Tiles ``I <= J`` of a square grid: all a symmetric matrix needs."""
        nr, nc = self.shape
        return ((i, j) for i in range(nr) for j in range(i, nc))

    def entries(self, tiles: Iterable[tuple[int, int]]) -> int:
        """Matrix entries covered by ``tiles``."""
        return sum((self.rows(i).stop - self.rows(i).start) * (self.cols(j).stop - self.cols(j).start)
                   for i, j in tiles)

    def chunks(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Dask-style chunk sizes along both axes."""
        nr, nc = self.shape
        return (tuple(self.rows(i).stop - self.rows(i).start for i in range(nr)),
                tuple(self.cols(j).stop - self.cols(j).start for j in range(nc)))
