"""DeviceArray: the value of an output kept on a worker's device.

It is what the Dask key of a kept output holds.  On the worker that made it,
the bytes live in the DeviceCache and the handle only names them; wherever
the handle has to travel (to another worker, to the client, to disk) it is
pickled, and pickling copies the bytes to the host.  So a later graph placed
on the same worker finds the buffer on the device, and anything else gets a
correct host copy without knowing about devices at all.
"""

from __future__ import annotations

import sys
import weakref
from typing import Any

import numpy as np

from ..graph.errors import KaasError


class DeviceArray:
    __slots__ = ("buffer_id", "shape", "dtype", "_host", "_cache", "__weakref__")

    def __init__(self, buffer_id: str, shape: tuple[int, ...], dtype: Any,
                 cache: Any = None, host: np.ndarray | None = None) -> None:
        self.buffer_id = buffer_id
        self.shape = tuple(shape)
        self.dtype = np.dtype(dtype)
        self._host = host
        self._cache = weakref.ref(cache) if cache is not None else None

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    @property
    def on_device(self) -> bool:
        """True while this process's device cache holds the data."""
        cache = self._cache() if self._cache is not None else None
        return cache is not None and self.buffer_id in cache

    def _store_host(self, host: np.ndarray) -> None:
        """Called by the cache when it evicts the device copy (write-back)."""
        self._host = host

    def get(self) -> np.ndarray:
        """A host (NumPy) copy of the data."""
        if self._host is not None:
            return self._host
        cache = self._cache() if self._cache is not None else None
        host = cache.read_host(self.buffer_id) if cache is not None else None
        if host is None:
            # The cache may have written it back between the two checks.
            if self._host is not None:
                return self._host
            raise KaasError("device data of a kept output is gone (its worker's cache "
                            "was closed)", buffer=self.buffer_id)
        return host

    # Read-only NumPy behaviour for ordinary Dask tasks that receive a handle:
    # anything an ndarray has is answered from a host copy.
    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.get(), name)

    def __getitem__(self, index: Any) -> Any:
        return self.get()[index]

    def __len__(self) -> int:
        return self.shape[0] if self.shape else 0

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        arr = self.get()
        return arr.astype(dtype) if dtype is not None else arr

    def __reduce__(self) -> tuple[Any, ...]:
        return (DeviceArray, (self.buffer_id, self.shape, self.dtype.str, None, self.get()))

    def __sizeof__(self) -> int:
        # The size of what the handle carries wherever it goes (pickling
        # copies the bytes to the host).  Dask decides from ``sizeof`` whether
        # to serialize a message in a thread (``distributed.comm.offload``)
        # and counts transfers with it: reporting only the handle (~192
        # bytes) made it copy whole buffers on the event loop and log 192
        # bytes for a 16 KiB transfer.  Dask may also spill a large handle
        # under host-memory pressure; that writes the data back to the host,
        # which is correct, only no longer resident on the device.
        return object.__sizeof__(self) + sys.getsizeof(self.buffer_id) + self.nbytes

    def __repr__(self) -> str:
        where = "device" if self.on_device else "host"
        return (f"<DeviceArray {self.buffer_id!r} shape={self.shape} dtype={self.dtype} "
                f"on {where}>")
