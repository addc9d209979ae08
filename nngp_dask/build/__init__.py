"""Building a kernel store: inputs ingested once (:mod:`.ingest`), one worker task per tile that
computes, writes and records it (:mod:`.tasks`), and the driver that submits the graph and returns
the store (:mod:`.driver`)."""

from .driver import BuildError, build_kernel
from .ingest import PreparedInputs, prepare_inputs

__all__ = [
    "BuildError",
    "PreparedInputs",
    "build_kernel",
    "prepare_inputs",
]
