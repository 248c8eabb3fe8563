"""One rule for every name a request carries (graphs, buffers, kernels, tenants).

Names travel into Dask keys, logs, the dashboard, Prometheus labels and JSON,
so they are bounded and must encode as UTF-8 (no lone surrogates, which a
JSON ``"\\ud800"`` escape can produce and which break every later encode).
"""

from __future__ import annotations

import reprlib
from typing import Any

#: Longest graph, buffer, kernel or tenant name.
MAX_NAME_CHARS = 200

_short = reprlib.Repr()
_short.maxstring = 60
_short.maxother = 60
_short.maxlevel = 2
_short.maxlist = _short.maxtuple = _short.maxdict = 4


def show(value: Any) -> str:
    """A bounded repr of a hostile value, safe to put in an error message
    (never huge, never recursing into deep nesting)."""
    try:
        return _short.repr(value)
    except Exception:  # a hostile __repr__
        return f"<{type(value).__name__}>"


def name_problem(value: Any) -> str | None:
    """Why ``value`` is not a valid name, or None if it is."""
    if not isinstance(value, str):
        return f"must be a string, got {type(value).__name__} {show(value)}"
    if not value:
        return "must not be empty"
    if len(value) > MAX_NAME_CHARS:
        return f"is {len(value)} characters long, more than {MAX_NAME_CHARS}"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return f"is not valid Unicode (lone surrogate) {show(value)}"
    return None
