"""KernelCache: each kernel is compiled (or resolved) once per worker.

A compiled kernel owns what it loaded: on the CUDA backend the launcher
holds its own ``cupy.cuda.function.Module`` (never CuPy's process-wide
memoized modules), so dropping an entry here is what unloads it.  The cache
holds at most ``max_entries`` kernels, so a tenant varying a comment in its
source cannot load modules without bound.  A graph that is running keeps a
reference to its launchers until its stream is synchronized (see
``WorkerRuntime._run``): an evicted module is unloaded only once no kernel
of it can still be in flight.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

from ..graph.errors import KaasError, KernelDefinitionError
from ..graph.kernels import Kernel
from .backend import Backend, CompiledKernel
from .user_errors import user_failure

#: Kernels kept compiled per worker, unless configured otherwise.
DEFAULT_MAX_ENTRIES = 256


class KernelCache:
    def __init__(self, backend: Backend, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        if isinstance(max_entries, bool) or not isinstance(max_entries, int) or max_entries < 1:
            raise ValueError(f"max_entries must be a positive int, got {max_entries!r}")
        self.backend = backend
        self.max_entries = max_entries
        self._entries: OrderedDict[Any, CompiledKernel] = OrderedDict()
        self._lock = threading.Lock()
        self.compiles = 0
        self.hits = 0
        self.evictions = 0

    def get(self, kernel: Kernel) -> CompiledKernel:
        key = kernel.cache_key()
        with self._lock:
            fn = self._entries.get(key)
            if fn is not None:
                self._entries.move_to_end(key)
                self.hits += 1
                return fn
        # Compile outside the lock; a duplicate compile under a race is
        # harmless (the loser's module is unloaded when its caller is done).
        failure: KaasError | None = None
        try:
            fn = self.backend.compile(kernel)
        except KaasError:
            raise
        except Exception as e:  # noqa: BLE001 - compiler errors of any kind
            if self.backend.is_fatal(e) or self.backend.is_out_of_memory(e):
                raise  # the device, not the kernel: the runtime handles these
            # Through user_failure: a CuPy or driver error must not ride along
            # as itself (it does not unpickle where CuPy is missing).
            failure = user_failure(KernelDefinitionError,
                                   f"could not compile for the {self.backend.name} backend",
                                   e, kernel=kernel.name)
        if failure is not None:
            raise failure
        evicted: list[CompiledKernel] = []
        with self._lock:
            self.compiles += 1
            self._entries[key] = fn
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                evicted.append(self._entries.popitem(last=False)[1])
                self.evictions += 1
        del evicted  # unloaded here, outside the lock, unless a graph still holds one
        return fn

    def clear(self) -> None:
        """Drop every compiled kernel (their modules unload once unused)."""
        with self._lock:
            entries, self._entries = self._entries, OrderedDict()
        del entries

    def __len__(self) -> int:
        return len(self._entries)
