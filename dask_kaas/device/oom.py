"""Which out-of-memory errors are the device's, and which are a user's.

Only an allocation made through the worker's own allocator is device
out-of-memory: the runtime then empties the cache and runs the graph once
more.  A kernel that simply raises ``MemoryError`` gets neither: it fails
its own request (as a KernelExecutionError chained to it), is run once, and
evicts nobody's consts.  So the CUDA backend routes CuPy's allocations
through :func:`tagging_allocator`, which marks the MemoryError that the
pool (RMM's ``bad_alloc``, CuPy's ``OutOfMemoryError``) raises, and the
runtime marks a MemoryError from its own allocations (inputs copied in,
zeroed outputs and temps); only a marked error counts, and on the CPU
backend NumPy's own failure to allocate.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

#: Attribute set on a MemoryError raised by the worker's allocator.
MARK = "_kaas_device_oom"


def mark(exc: BaseException) -> BaseException:
    """Mark ``exc`` as raised by the worker's allocator."""
    try:
        setattr(exc, MARK, True)
    except (AttributeError, TypeError):  # an exception type without a __dict__
        pass
    return exc


def is_marked(exc: BaseException) -> bool:
    return getattr(exc, MARK, False) is True


def tagging_allocator(inner: Callable[[int], Any]) -> Callable[[int], Any]:
    """``inner`` (a CuPy allocator: bytes -> MemoryPointer) whose failures
    to allocate are marked as the device's."""
    def malloc(nbytes: int) -> Any:
        try:
            return inner(nbytes)
        except MemoryError as e:
            mark(e)
            raise

    malloc.__wrapped__ = inner  # type: ignore[attr-defined]
    return malloc


def is_numpy_allocation_failure(exc: BaseException) -> bool:
    """NumPy's own failure to allocate an array (``_ArrayMemoryError``),
    which the CPU backend's memory is: never raised by a plain ``raise``."""
    cls = type(exc)
    return cls.__qualname__ == "_ArrayMemoryError" and cls.__module__.startswith("numpy")
