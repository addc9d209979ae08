"""The errors of the kernel store (raised by every module of :mod:`nngp_dask.store`)."""

from __future__ import annotations

__all__ = ["CorruptTileError", "IncompleteKernelError", "NotAKernelStoreError", "StoreLockedError",
           "StoreMismatchError"]


class StoreMismatchError(ValueError):
    """The store was built for other inputs, another architecture or other settings."""


class NotAKernelStoreError(StoreMismatchError):
    """The path holds something nngp-dask did not write (a file, a folder of other files, other
    Zarr data) or a store it cannot read (a damaged ``zarr.json``, an identity of another
    version). nngp-dask never writes into it, and never deletes it, even with ``overwrite=True``."""


class StoreLockedError(RuntimeError):
    """Another process holds the store's write lock."""


class IncompleteKernelError(ValueError):
    """A kernel is used before all of its tiles are written."""


class CorruptTileError(IncompleteKernelError):
    """A stored tile failed its CRC32C check, has the wrong size, or is recorded as written but
    its chunk is missing. Its completion record has been cleared: the next build rewrites it."""
