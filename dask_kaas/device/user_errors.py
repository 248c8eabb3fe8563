"""Turning a failure of user code into a KaasError the client can read.

The error keeps the user's exception as its ``__cause__``, so the traceback
the client prints (Dask ships it with tblib) shows the kernel's own frames.
Two things could still turn it into a bare ``Exception`` on the way: a user
exception that cannot be pickled, and a message longer than Dask's
``distributed.admin.max-error-length``.  So the quoted message is cut, and an
exception that does not survive pickling travels as a stand-in that has the
same type name, message and traceback.
"""

from __future__ import annotations

from typing import Any

from ..graph.errors import KaasError

#: Longest user exception message quoted in a KaasError.
MAX_MESSAGE = 2000


class UserCodeError(Exception):
    """Stand-in for a user exception that could not travel to the client."""


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
    if not _travels(cause):
        stand_in = UserCodeError(describe(cause))
        cause = stand_in.with_traceback(cause.__traceback__)
    err.__cause__ = cause
    err.__suppress_context__ = True
    return err
