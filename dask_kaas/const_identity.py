"""What a const is, to the cache: its content, not its memory.

:func:`content_token` names a const array by its dtype, shape and elements in
logical order (its Dask key and device-cache identity derive from it), taken
at every submission so an array changed in place is never served stale;
:func:`freeze_const` makes an immutable copy whose token is taken once.
"""

from __future__ import annotations

import weakref
from typing import Any

import numpy as np
import xxhash

from .graph.errors import KaasError


def content_token(arr: np.ndarray) -> str:
    """The identity of a const: its dtype, shape and elements in logical
    (C) order.

    Hashing memory as it lies would give a square ``W`` and ``W.T`` (or a
    Fortran-ordered array whose memory equals another's C-ordered one) one
    identity, and so one cached copy.  XXH3 reads several GB/s, so this is
    taken at every submission rather than cached per array object: an array
    changed in place is never served stale.  The one exception is an array
    nobody can change (:func:`is_frozen`, made by :func:`freeze_const`):
    its token is taken once.
    """
    if type(arr) is np.ndarray and is_frozen(arr):
        token = _frozen_tokens.get(id(arr))
        if token is None:
            token = _hash_content(arr)
            _frozen_tokens[id(arr)] = token
            # Runs when the array is collected, before its id can be reused.
            weakref.finalize(arr, _frozen_tokens.pop, id(arr), None)
        return token
    return _hash_content(arr)


def _hash_content(arr: np.ndarray) -> str:
    arr = np.asarray(arr)
    h = xxhash.xxh3_128()
    h.update(f"{arr.dtype.str}|{arr.shape}|".encode())
    if arr.dtype.hasobject:  # refused by validation before it gets here
        raise KaasError("a const array cannot hold Python objects")
    h.update(memoryview(np.ascontiguousarray(arr)).cast("B"))
    return h.hexdigest()


#: id(frozen array) -> its content token (entries leave with their arrays).
_frozen_tokens: dict[int, str] = {}


def is_frozen(arr: np.ndarray) -> bool:
    """Whether no one can change ``arr``'s elements: every array on its base
    chain is read-only and the chain ends in a ``bytes`` object, whose
    buffer is immutable (NumPy refuses to make such an array, or any view of
    it, writeable again).  A read-only view of a writeable array does not
    count: the array it views can still change."""
    a: Any = arr
    while isinstance(a, np.ndarray):
        if a.flags.writeable:
            return False
        a = a.base
    return type(a) is bytes


def freeze_const(arr: np.ndarray) -> np.ndarray:
    """An immutable copy of ``arr`` to submit as a const: its content token
    is taken once instead of at every submission (8 MiB of weights: ~0.15 ms
    per request on a quiet machine, more while the cluster shares the memory
    bandwidth).  An array already frozen comes back as it is.

    Keep the returned array and pass it in place of the original; changing
    the original afterwards does not change the frozen copy.
    """
    if type(arr) is not np.ndarray:
        raise KaasError(f"freeze_const takes a NumPy array, got {type(arr).__name__}")
    if arr.dtype.hasobject:
        raise KaasError("a const array cannot hold Python objects")
    if is_frozen(arr):
        return arr
    data = np.ascontiguousarray(arr).tobytes()
    return np.frombuffer(data, dtype=arr.dtype).reshape(arr.shape)
