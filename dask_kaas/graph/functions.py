"""Array functions named in the JSON form as ``"module:function"``.

A document is data from outside, so naming a function must not be a way to
run code: reading a reference imports only modules listed in
``kaas.array-modules`` (the shipped workloads and NumPy by default), and resolves
a function from any other module only if this process imported it already
(code its owner chose to load).  The standard library and ``builtins`` are
refused unless listed (``os:system``, ``sys:exit``, ``builtins:exec`` are
never a kernel), as are private names and a walk through attributes that
leaves the named module (``dask_kaas.config:os.system``).  The same rule
decides what may be written, so whatever is written can be read back.
"""

from __future__ import annotations

import importlib
import sys
import types
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .. import config
from .errors import SerializationError

if TYPE_CHECKING:
    from .reader import Where

#: Longest reference accepted (a dotted module path and a qualname).
MAX_REF_CHARS = 400


def allowed_prefixes() -> tuple[str, ...]:
    value = config.get("array-modules", None) or []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise SerializationError(
            f"config kaas.array-modules must be a list of module names, got {value!r}")
    return tuple(value)


def _listed(module: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in allowed_prefixes())


def _stdlib(module: str) -> bool:
    return module.partition(".")[0] in sys.stdlib_module_names


def module_allowed(module: str) -> bool:
    """Listed in ``kaas.array-modules``, or already imported and not part of
    the standard library."""
    if _listed(module):
        return True
    return module in sys.modules and not _stdlib(module)


def _identifiers(text: str, sep: str) -> list[str] | None:
    parts = text.split(sep)
    if all(p.isidentifier() and p.isascii() and not p.startswith("_") for p in parts):
        return parts
    return None


def resolve_function(ref: Any) -> Callable[..., Any]:
    """The function a ``"module:function"`` reference names, under the rule
    above; anything else is a SerializationError naming the reference."""
    if not isinstance(ref, str):
        raise SerializationError(f"a function reference must be a string, got "
                                 f"{type(ref).__name__}")
    if len(ref) > MAX_REF_CHARS:
        raise SerializationError(f"function reference longer than {MAX_REF_CHARS} characters")
    module_name, colon, qualname = ref.partition(":")
    modules = _identifiers(module_name, ".")
    parts = _identifiers(qualname, ".")
    if not colon or modules is None or parts is None:
        raise SerializationError(
            f"function reference {ref!r} is not 'module:function' of public names")
    if not module_allowed(module_name):
        raise SerializationError(
            f"function reference {ref!r}: module {module_name!r} is neither imported nor "
            f"listed in kaas.array-modules {list(allowed_prefixes())} (the standard "
            "library never is, unless listed)")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as e:  # an import may fail in any way; the document is at fault
        raise SerializationError(
            f"cannot import {module_name!r} for {ref!r}: {type(e).__name__}: {e}") from None
    for part in parts:
        try:
            obj = getattr(obj, part, None)
        except Exception:  # a module's __getattr__ may raise anything
            obj = None
        if obj is None or isinstance(obj, types.ModuleType):
            raise SerializationError(
                f"{ref!r} does not name a function defined in {module_name!r}")
    if not callable(obj):
        raise SerializationError(f"{ref!r} is not callable")
    home = getattr(obj, "__module__", None)
    if not isinstance(home, str) or not module_allowed(home):
        raise SerializationError(
            f"{ref!r} is defined in module {home!r}, which kaas.array-modules does not allow")
    return obj


def function_ref(fn: Callable[..., Any]) -> str:
    """``module:qualname`` of an importable function, for the JSON form."""
    module = getattr(fn, "__module__", None)
    qualname = getattr(fn, "__qualname__", None)
    if not isinstance(module, str) or not isinstance(qualname, str) or "<" in qualname \
            or module == "__main__":
        raise SerializationError(
            f"function {qualname or fn!r} cannot be named in JSON: only functions "
            "importable as 'module:function' can (not lambdas, nested functions or "
            "functions defined in __main__); submitting the graph from Python "
            "still works")
    ref = f"{module}:{qualname}"
    try:
        resolved = resolve_function(ref)
    except SerializationError as e:
        raise SerializationError(f"function {ref} cannot be named in JSON: {e.detail}") \
            from None
    if resolved is not fn:
        raise SerializationError(f"function {ref} does not resolve back to itself on import")
    return ref


def read_function(ref: Any, at: Where) -> Callable[..., Any]:
    """Resolve a reference from a document, and make sure the function can be
    written back (a graph read must always round-trip)."""
    try:
        fn = resolve_function(ref)
        function_ref(fn)
    except SerializationError as e:
        raise at.fail(e.detail) from None
    return fn
