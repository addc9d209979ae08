"""TOML files of flat sections: the one reader and the one writer.

Pipeline files, cluster files and the sweep's best-candidate pipeline are all
``{section: {key: scalar, list or inline table}}``: :func:`read_toml` reads them with one error naming the
file, :func:`to_toml` writes them so that :mod:`tomllib` reads back exactly what was written.
"""

from __future__ import annotations

import json
import math
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["read_toml", "to_toml"]

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def read_toml(path: str | Path, what: str, error: type[ValueError] = ValueError) -> dict[str, Any]:
    """A TOML file as a dict.

    Parameters
    ----------
    path : str or Path
    what : str
        Names the file's role in errors (``"pipeline"``, ``"cluster"``).
    error : type of ValueError
        Raised, naming ``what`` and the file, when the file is missing or not valid TOML.

    Returns
    -------
    dict
    """
    p = Path(path)
    try:
        return tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise error(f"{what}: file {str(p)!r} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise error(f"{what}: {p} is not valid TOML ({exc})") from None


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.match(key) else json.dumps(key)


def _toml_value(dotted: str, value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        v = float(value)
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)  # always has '.' or 'e': a TOML float
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string (\" \\ \n \uXXXX escapes)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(dotted, v) for v in value) + "]"
    if isinstance(value, Mapping):  # an inline table, e.g. an activation with its parameters
        return "{" + ", ".join(f"{_toml_key(str(k))} = {_toml_value(f'{dotted}.{k}', v)}" for k, v in value.items()) \
            + "}"
    raise TypeError(f"{dotted}: expected a string, number, boolean, list or table for a TOML section, "
                    f"got {type(value).__name__} {value!r}")


def to_toml(data: Mapping[str, Any]) -> str:
    """TOML text of flat sections: ``{section: {key: scalar, list or inline table}}``.

    Top-level scalars come first, then one ``[section]`` table per mapping. Used for the
    resolved pipeline configuration (``nngp-dask validate``) and the sweep's best candidate.

    Parameters
    ----------
    data : mapping
        Values are strings, numbers (NumPy scalars included), booleans, lists of them, or
        mappings of them (written as inline tables, e.g. ``{name = "leaky_relu", slope = 0.2}``).

    Returns
    -------
    str
        Ends with a newline; ``tomllib.loads`` of it equals ``data``.

    Raises
    ------
    TypeError
        For a value TOML cannot hold, naming its dotted key.
    """
    lines: list[str] = []
    for key, value in data.items():
        if not isinstance(value, Mapping):
            lines.append(f"{_toml_key(key)} = {_toml_value(key, value)}")
    for section, table in data.items():
        if not isinstance(table, Mapping):
            continue
        if lines:
            lines.append("")
        lines.append(f"[{_toml_key(section)}]")
        for key, value in table.items():
            lines.append(f"{_toml_key(key)} = {_toml_value(f'{section}.{key}', value)}")
    return "\n".join(lines) + "\n"
