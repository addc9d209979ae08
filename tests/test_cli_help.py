"""The command line as people meet it: ``python -m nngp_dask``, help texts, the schema's choices."""

from __future__ import annotations

import subprocess
import sys

import pytest

from nngp_dask import __version__
from nngp_dask.cli import main
from nngp_dask.pipeline import SCHEMA


def test_python_dash_m_runs_the_cli():
    out = subprocess.run([sys.executable, "-m", "nngp_dask", "--version"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == f"nngp-dask {__version__}"
    bad = subprocess.run([sys.executable, "-m", "nngp_dask", "inspect", "/nonexistent/k.zarr"], capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and "nngp-dask: error:" in bad.stderr


def test_schema_lists_the_choices_of_every_enumerated_key(capsys):
    assert main(["validate", "--schema"]) == 0
    text = capsys.readouterr().out
    lines, section = {}, ""
    for line in text.splitlines():
        if line.startswith("["):
            section = line.strip("[]")
        elif " = " in line:
            lines[section, line.split(" = ")[0]] = line
    for section, fields in SCHEMA.items():
        for key, spec in fields.items():
            if spec.choices:
                line = lines[section, key]
                assert f"(one of: {', '.join(map(str, spec.choices))})" in line, line


@pytest.mark.parametrize("command,words", [("inspect", "ISO 8601"), ("validate", "--schema prints every key")])
def test_subcommands_have_descriptions(capsys, command, words):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    assert words in capsys.readouterr().out
