"""The quick start as a new user meets it: its first run from an empty Numba cache, against warm
runs (cache filled, fresh output each time) and up-to-date re-runs, all in one run of this script.

    python benchmarks/bench_coldstart.py --repeat 3

Each run is the README's command (``nngp-dask run pipelines/quickstart.toml``) in a subprocess, timed
from start to exit, with ``NUMBA_CACHE_DIR`` pointing at a new empty folder for the whole script;
figures are drawn when matplotlib is installed, as in the README. Prints the wall times and the
ratios first / best warm and best up-to-date re-run.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUICK = ROOT / "pipelines" / "quickstart.toml"


def run(output: Path, env: dict[str, str], cwd: Path) -> float:
    cmd = [sys.executable, "-c", "import sys; from nngp_dask.cli import main; sys.exit(main())", "-q", "run",
           str(QUICK), "--set", f"run.output={output}"]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode:
        sys.exit(f"{' '.join(cmd)} exited {done.returncode}:\n{done.stderr[-3000:]}")
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3, help="warm runs and up-to-date re-runs (best of)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="nngp-coldstart-"))
    env = {**os.environ, "NUMBA_CACHE_DIR": str(work / "numba-cache")}
    try:
        first = run(work / "cold", env, work)
        print(f"first run (empty Numba cache): {first:6.1f} s", flush=True)
        warm = [run(work / f"warm{i}", env, work) for i in range(args.repeat)]
        print(f"warm runs (new output each):   {', '.join(f'{w:.1f}' for w in warm)} s", flush=True)
        again = [run(work / "warm0", env, work) for _ in range(args.repeat)]
        print(f"up-to-date re-runs:            {', '.join(f'{a:.2f}' for a in again)} s")
        print(f"first / best warm: {first / min(warm):.2f}x (goal <= 1.5x); best up-to-date re-run "
              f"{min(again):.2f} s (goal <= 2 s)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
