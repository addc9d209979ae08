"""The kernel store: the Zarr layout (the one place that names paths), its identity, the
:class:`KernelStore`, tile I/O with checksums, the lock, input sources and the page-cache policy."""

from .errors import CorruptTileError, IncompleteKernelError, NotAKernelStoreError, StoreLockedError, StoreMismatchError
from .kernel_store import KernelStore, open_kernel, store_contents
from .layout import (ATTR, DIAGONALS, DONE, FORMAT_VERSION, INPUTS, KERNEL, SOLVES, TEST_PRIOR, StoreIdentity,
                     array_codecs, diagonals_path, dimension_names, done_path, format_message, has_checksum,
                     inputs_path, is_remote, kernel_path, local_chunk_file, normalise_url, open_group, remove_interrupted_writes, solve_path)
from .lock import LOCK_HEARTBEAT_S, LOCK_TTL_HEARTBEATS, store_lock
from .pagecache import POLICIES, DropBehind, check_policy, drop_from_cache, host_memory, wants_drop
from .sources import IDX_DTYPES, ArraySource, as_source, open_source, read_all, read_csv
from .tileio import VERIFIED_TTL_S, TileIO, read_tile_task, tile_io

__all__ = [
    "CorruptTileError",
    "IncompleteKernelError",
    "NotAKernelStoreError",
    "StoreLockedError",
    "StoreMismatchError",
    "ATTR",
    "DIAGONALS",
    "DONE",
    "FORMAT_VERSION",
    "INPUTS",
    "KERNEL",
    "SOLVES",
    "TEST_PRIOR",
    "StoreIdentity",
    "array_codecs",
    "diagonals_path",
    "dimension_names",
    "done_path",
    "format_message",
    "has_checksum",
    "inputs_path",
    "is_remote",
    "kernel_path",
    "local_chunk_file",
    "normalise_url",
    "open_group",
    "remove_interrupted_writes",
    "solve_path",
    "POLICIES",
    "DropBehind",
    "check_policy",
    "drop_from_cache",
    "host_memory",
    "wants_drop",
    "IDX_DTYPES",
    "ArraySource",
    "as_source",
    "open_source",
    "read_all",
    "read_csv",
    "VERIFIED_TTL_S",
    "TileIO",
    "read_tile_task",
    "tile_io",
    "LOCK_HEARTBEAT_S",
    "LOCK_TTL_HEARTBEATS",
    "store_lock",
    "KernelStore",
    "open_kernel",
    "store_contents",
]
