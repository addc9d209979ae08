"""Schema fields shared by pipeline files and cluster files: one typed key, ``${VAR}`` expansion.

Both :mod:`nngp_dask.pipeline.config` (pipeline files) and :mod:`nngp_dask.cluster.runtime` (cluster files)
describe their keys with :class:`Field` and report a bad key as a :class:`ConfigError`.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = ["ConfigError", "Field", "expand_env"]


class ConfigError(ValueError):
    """A pipeline file or override that does not match the schema."""


class Field:
    """One key of a schema: accepted types, default, allowed values or bounds, and its doc line.

    Parameters
    ----------
    types : type or tuple of type
    default : object
        Used when the key is left out.
    doc : str
        One line, printed by ``nngp-dask validate --schema``.
    choices : sequence, optional
        Allowed values of a scalar (a table is left to ``validate``).
    minimum : float, optional
    exclusive_minimum : bool
    path : bool
        A path, resolved against the file's folder.
    validate : callable, optional
        ``validate(dotted, value)`` after the checks above: returns the value, or raises
        :class:`ConfigError` naming ``dotted`` (e.g. an activation and its parameters).
    """

    def __init__(self, types: type | tuple[type, ...], default: Any, doc: str, *, choices: Sequence[Any] | None = None,
                 minimum: float | None = None, exclusive_minimum: bool = False, path: bool = False,
                 validate: Callable[[str, Any], Any] | None = None) -> None:
        self.types: tuple[type[Any], ...] = types if isinstance(types, tuple) else (types,)
        self.default, self.doc, self.choices = default, doc, choices
        self.minimum, self.exclusive_minimum, self.path = minimum, exclusive_minimum, path
        self.validate = validate

    def check(self, dotted: str, value: Any) -> Any:
        """``value`` if it fits (an int widened to float where a float is expected), else a
        :class:`ConfigError` naming ``dotted``, the value and what was expected."""
        if float in self.types and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(value, bool) and bool not in self.types:
            raise ConfigError(f"{dotted}: expected {self._type_name()}, got {value!r}")
        if not isinstance(value, self.types):
            raise ConfigError(f"{dotted}: expected {self._type_name()}, got {type(value).__name__} {value!r}")
        if isinstance(value, float) and not math.isfinite(value):  # NaN would pass every bound below
            raise ConfigError(f"{dotted}: expected a finite number, got {value!r}")
        if isinstance(value, dict):
            return self.validate(dotted, value) if self.validate is not None else value
        if self.choices is not None and value not in self.choices:
            raise ConfigError(f"{dotted}: expected one of {list(self.choices)}, got {value!r}")
        if self.minimum is not None and (value < self.minimum or (self.exclusive_minimum and value == self.minimum)):
            op = ">" if self.exclusive_minimum else ">="
            raise ConfigError(f"{dotted}: expected a number {op} {self.minimum}, got {value!r}")
        return self.validate(dotted, value) if self.validate is not None else value

    def _type_name(self) -> str:
        names = {str: "a string", int: "an integer", float: "a number", bool: "true or false", list: "a list",
                 dict: "a table"}
        return " or ".join(names.get(t, t.__name__) for t in self.types)


_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def expand_env(dotted: str, value: str, local: Mapping[str, str]) -> str:
    """``value`` with every ``${VAR}`` replaced, from ``local`` first, then the environment.

    Parameters
    ----------
    dotted : str
        The key, named in the error.
    value : str
    local : mapping
        Names known to the file itself (``${name}`` of a pipeline).

    Returns
    -------
    str

    Raises
    ------
    ConfigError
        Naming the key and the unset variable.
    """
    def sub(m: re.Match) -> str:
        name = m.group(1)
        if name in local:
            return local[name]
        if name not in os.environ:
            raise ConfigError(f"{dotted}: environment variable {name} is not set (used as ${{{name}}})")
        return os.environ[name]

    return _ENV.sub(sub, value)
