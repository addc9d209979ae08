"""ruff and mypy on the package, with the rule set and configuration of pyproject.toml
(docs/ARCHITECTURE.md, "Lint and types", says why those rules).

Both run as subprocesses of this interpreter (``python -m ruff``, ``python -m mypy``: the ``test``
extra installs them). ruff keeps no cache; mypy's cache goes under the system temp directory, one
per checkout, so nothing is written into the source tree and a second run is incremental.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "nngp_dask"


def _run(*args: str, stdin: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, input=stdin, capture_output=True, text=True,
                          timeout=timeout)


def _report(proc: subprocess.CompletedProcess[str]) -> str:
    return f"exit code {proc.returncode}\n{proc.stdout}{proc.stderr}"


def test_ruff_passes_on_the_package():
    proc = _run("ruff", "check", "--no-cache", "nngp_dask")
    assert proc.returncode == 0, _report(proc)


def test_ruff_checks_every_module_of_the_package():
    # an exclude pattern that matched a subpackage (``build`` once excluded nngp_dask/build/ too)
    # would leave its modules unchecked while the test above passes
    proc = _run("ruff", "check", "--no-cache", "--show-files", "nngp_dask")
    shown = {Path(line).resolve() for line in proc.stdout.splitlines() if line.endswith(".py")}
    assert shown == {p.resolve() for p in PACKAGE.rglob("*.py")}, _report(proc)


def test_ruff_applies_the_project_rules():
    # guards the test above against a configuration that checks nothing: an unused import and an
    # unsorted import block in a (virtual) module of the package must be reported
    probe = "import sys\nimport os\n"
    proc = _run("ruff", "check", "--no-cache", "--stdin-filename", "nngp_dask/_lint_probe.py", "-", stdin=probe)
    assert proc.returncode == 1, _report(proc)
    assert "F401" in proc.stdout and "I001" in proc.stdout, _report(proc)


def test_mypy_passes_on_the_package():
    cache = Path(tempfile.gettempdir()) / f"nngp-dask-mypy-{hashlib.sha1(str(ROOT).encode()).hexdigest()[:12]}"
    proc = _run("mypy", "--cache-dir", str(cache), "nngp_dask")
    assert proc.returncode == 0, _report(proc)
    # every module was checked (a configuration that excluded some would still say "Success")
    modules = len(list(PACKAGE.rglob("*.py")))
    assert f"no issues found in {modules} source files" in proc.stdout, _report(proc)
