"""Turning a failure of user code into a KaasError the client can read.

The error keeps the user's exception as its ``__cause__``, so the traceback
the client prints (Dask ships it with tblib) shows the kernel's own frames.
Two things could still turn it into a bare ``Exception`` on the way: a user
exception that cannot be pickled, and a message longer than Dask's
``distributed.admin.max-error-length``.  So the quoted message is cut, and an
exception that does not survive pickling travels as a stand-in that has the
same type name, message and traceback.

Exceptions of the GPU stack (CuPy, cupy_backends, cuda-bindings, RMM) always
travel as stand-ins, wherever they sit in the chain: unpickling CuPy's
``CUDADriverError`` calls into the driver, so on a client or gateway without
CuPy (or without a GPU) Dask would hand over a bare ``Exception(<bytes>)``
in place of the whole KaasError.
"""

from __future__ import annotations

from typing import Any

from ..graph.errors import KaasError

#: Longest user exception message quoted in a KaasError.
MAX_MESSAGE = 2000


#: Top-level packages whose exceptions never travel as themselves.
DEVICE_STACK = frozenset({"cupy", "cupyx", "cupy_backends", "cuda", "rmm"})
#: Causes and contexts followed at most (a chain may be a cycle or endless).
MAX_CHAIN = 16


class UserCodeError(Exception):
    """Stand-in for a user exception that could not travel to the client."""


def _from_device_stack(e: BaseException) -> bool:
    module = getattr(type(e), "__module__", "") or ""
    return module.split(".", 1)[0] in DEVICE_STACK


def _chain(e: BaseException) -> list[BaseException]:
    """``e`` and the exceptions it was raised from or during, in order."""
    out: list[BaseException] = []
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen and len(out) < MAX_CHAIN:
        out.append(cur)
        seen.add(id(cur))
        cur = cur.__cause__ if cur.__cause__ is not None else (
            None if cur.__suppress_context__ else cur.__context__)
    return out


def _stand_in(e: BaseException) -> BaseException:
    """A picklable copy of ``e`` and of its chain: every link becomes a
    UserCodeError naming the original type, with the original traceback."""
    links = [UserCodeError(describe(x)).with_traceback(x.__traceback__) for x in _chain(e)]
    for outer, inner in zip(links, links[1:]):
        outer.__cause__ = inner
        outer.__suppress_context__ = True
    return links[0]


def describe(e: BaseException) -> str:
    """``Type: message`` of a user exception, its message cut to MAX_MESSAGE."""
    try:
        text = str(e)
    except BaseException:  # noqa: BLE001 - a user __str__ may raise anything
        text = "<unprintable>"
    if len(text) > MAX_MESSAGE:
        text = text[:MAX_MESSAGE] + f"... ({len(text) - MAX_MESSAGE} more characters)"
    return f"{type(e).__name__}: {text}"


def _travels(e: BaseException) -> bool:
    """Whether Dask can pickle ``e`` (with its traceback and causes) as it
    does for a task's error."""
    import tblib.pickling_support
    from distributed.core import collect_causes
    from distributed.protocol import pickle

    try:
        tblib.pickling_support.install(e, *collect_causes(e))
        pickle.loads(pickle.dumps(e))
        return True
    except BaseException:  # noqa: BLE001 - anything in a user's __reduce__
        return False


def user_failure(cls: type[KaasError], detail: str, cause: BaseException,
                 **where: Any) -> KaasError:
    """``cls(f"{detail}: {cause}")`` chained to ``cause``.  Raise it outside
    the ``except`` block that caught ``cause`` so that the unpicklable
    original does not ride along as ``__context__``."""
    err = cls(f"{detail}: {describe(cause)}", **where)
    if any(_from_device_stack(x) for x in _chain(cause)) or not _travels(cause):
        cause = _stand_in(cause)
    err.__cause__ = cause
    err.__suppress_context__ = True
    return err
