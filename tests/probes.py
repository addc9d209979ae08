"""Progress of a run read from outside while it writes the store (the kill-and-resume tests).

The files are read directly, not through zarr's group listings: a listing taken while the run
rewrites a group's metadata meets zarr's in-flight ``zarr.<uuid>.partial`` and warns.
"""

from __future__ import annotations

import json
from pathlib import Path


def solve_iteration(store: Path) -> int:
    """The largest CG iteration any solve in ``store`` has checkpointed (0 before the first)."""

    def attrs(path: Path) -> dict:
        try:
            return json.loads(path.read_text()).get("attributes", {})
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    return max((attrs(p).get("iteration", 0) for p in Path(store).glob("solves/*/zarr.json")), default=0)
