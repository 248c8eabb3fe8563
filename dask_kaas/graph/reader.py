"""Strict reading of a graph document: any bytes or text in, plain data or a
SerializationError out.

A document may come from anyone (a gateway, another language), so every
field is checked for its exact JSON type before the graph's builders see it:
no silent conversion (2.7 is not an int, "inf" is not a bool, a string is not
a list of options), no unknown or duplicate keys (a typo must not be
ignored), and bounds on size, nesting and numbers so that reading is cheap
whatever the input.  Errors name the field (``launches[2].args[0].dtype``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .. import config
from .buffers import dtype_name, normalize_dtype
from .errors import SerializationError
from .names import name_problem, show

#: Longest dtype name looked at (``"complex128"``, ``"<f4"``).
MAX_DTYPE_CHARS = 16


class Where:
    """The locator of a field, for error messages."""

    def __init__(self, graph: str | None = None, path: str = "",
                 buffer: str | None = None) -> None:
        self.graph = graph
        self.path = path
        self.buffer = buffer

    def at(self, key: str | int) -> Where:
        step = f"[{key}]" if isinstance(key, int) else (f".{key}" if self.path else key)
        return Where(self.graph, self.path + step, self.buffer)

    def about(self, buffer: str) -> Where:
        """The same field, about a buffer (named in the error's context)."""
        return Where(self.graph, self.path, buffer)

    def fail(self, message: str) -> SerializationError:
        where = f"field {self.path}: " if self.path else ""
        return SerializationError(where + message, graph=self.graph, buffer=self.buffer)


def max_document_bytes() -> int:
    from dask.utils import parse_bytes

    value = config.get("max-graph-document", "32MiB")
    try:
        limit = int(parse_bytes(value))
        if limit <= 0:
            raise ValueError("not positive")
    except (TypeError, ValueError, OverflowError):
        raise SerializationError(
            f"config kaas.max-graph-document must be a positive size, got {show(value)}") \
            from None
    return limit


def max_n_iter() -> int:
    """``kaas.max-n-iter`` (null: no cap, but still a 64-bit count)."""
    from ..limits import max_n_iter as configured

    cap = configured()
    return 2**63 - 1 if cap is None else cap


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    d: dict[str, Any] = {}
    for key, value in pairs:
        if key in d:
            raise SerializationError(f"duplicate key {show(key)} in a JSON object")
        d[key] = value
    return d


def _no_constant(name: str) -> Any:
    raise SerializationError(f"JSON has no {name}: write non-finite floats as the strings "
                             "'nan', 'inf', '-inf'")


def parse_document(text: Any) -> Any:
    """JSON text (str, or UTF-8 bytes) to plain data, within the size cap."""
    limit = max_document_bytes()
    if isinstance(text, (bytes, bytearray, memoryview)):
        raw = bytes(text)
        if len(raw) > limit:
            raise SerializationError(f"document of {len(raw)} bytes is larger than "
                                     f"kaas.max-graph-document ({limit} bytes)")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise SerializationError(f"document is not UTF-8: {e}") from None
    elif not isinstance(text, str):
        raise SerializationError(f"a graph document is JSON text or UTF-8 bytes, got "
                                 f"{type(text).__name__}")
    elif len(text) > limit:
        raise SerializationError(f"document of {len(text)} characters is larger than "
                                 f"kaas.max-graph-document ({limit} bytes)")
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates,
                          parse_constant=_no_constant)
    except RecursionError:
        raise SerializationError("document is nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, or an integer of over 4300 digits
        raise SerializationError(f"not valid JSON: {e}") from None


# -- typed fields --------------------------------------------------------------
def record(value: Any, at: Where, required: Sequence[str], optional: Sequence[str] = ()
           ) -> Mapping[str, Any]:
    """A JSON object with exactly these keys (the optional ones may be absent)."""
    if not isinstance(value, Mapping):
        raise at.fail(f"must be an object, got {type(value).__name__} {show(value)}")
    unknown = [k for k in value if k not in required and k not in optional]
    if unknown:
        raise at.fail(f"unknown key {show(unknown[0])} (expected "
                      f"{', '.join(list(required) + list(optional))})")
    missing = [k for k in required if k not in value]
    if missing:
        raise at.fail(f"lacks field {missing[0]!r}")
    return value


def array(value: Any, at: Where) -> Sequence[Any]:
    if not isinstance(value, (list, tuple)):
        raise at.fail(f"must be a list, got {type(value).__name__} {show(value)}")
    return value


def string(value: Any, at: Where, *, nonempty: bool = False) -> str:
    if not isinstance(value, str):
        raise at.fail(f"must be a string, got {type(value).__name__} {show(value)}")
    if nonempty and not value.strip():
        raise at.fail("must not be empty")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise at.fail("is not valid Unicode (lone surrogate)") from None
    return value


def strings(value: Any, at: Where) -> list[str]:
    return [string(v, at.at(i)) for i, v in enumerate(array(value, at))]


def name(value: Any, at: Where) -> str:
    problem = name_problem(value)
    if problem:
        raise at.fail(f"name {problem}")
    return value


def integer(value: Any, at: Where, lo: int, hi: int, bound: str | None = None) -> int:
    """An int (not a bool, not 2.0) in lo..hi; ``bound`` names the config key
    that sets ``hi``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise at.fail(f"must be an integer, got {type(value).__name__} {show(value)}")
    if not lo <= value <= hi:
        limit = f" ({bound} is {hi})" if bound and value > hi else ""
        raise at.fail(f"{show(value)} is outside {lo}..{hi}{limit}")
    return value


def one_of(value: Any, at: Where, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise at.fail(f"must be one of {', '.join(map(repr, choices))}, got {show(value)}")
    return value


def dtype(value: Any, at: Where) -> np.dtype:
    """A plain numeric dtype by name, one that is written back under a name
    that reads as the same dtype."""
    if not isinstance(value, str) or not 0 < len(value) <= MAX_DTYPE_CHARS:
        raise at.fail(f"must be a dtype name such as 'float32', got {show(value)}")
    try:
        dt = normalize_dtype(value)
        if np.dtype(dtype_name(dt)) != dt:
            raise TypeError("no name reads back as this dtype")
    except Exception as e:  # np.dtype may raise TypeError, ValueError or worse
        raise at.fail(f"bad dtype {show(value)}: {e}") from None
    return dt
