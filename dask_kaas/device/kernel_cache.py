"""KernelCache: each kernel is compiled (or resolved) once per worker."""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

from ..graph.errors import KaasError, KernelDefinitionError
from ..graph.kernels import Kernel
from .backend import Backend, CompiledKernel


class KernelCache:
    def __init__(self, backend: Backend, max_entries: int = 1024) -> None:
        self.backend = backend
        self.max_entries = max_entries
        self._entries: OrderedDict[Any, CompiledKernel] = OrderedDict()
        self._lock = threading.Lock()
        self.compiles = 0
        self.hits = 0

    def get(self, kernel: Kernel) -> CompiledKernel:
        key = kernel.cache_key()
        with self._lock:
            fn = self._entries.get(key)
            if fn is not None:
                self._entries.move_to_end(key)
                self.hits += 1
                return fn
        # Compile outside the lock; a duplicate compile under a race is harmless.
        try:
            fn = self.backend.compile(kernel)
        except KaasError:
            raise
        except Exception as e:  # noqa: BLE001 - compiler errors of any kind
            if self.backend.is_fatal(e) or self.backend.is_out_of_memory(e):
                raise  # the device, not the kernel: the runtime handles these
            raise KernelDefinitionError(
                f"could not compile for the {self.backend.name} backend: "
                f"{type(e).__name__}: {e}", kernel=kernel.name) from e
        with self._lock:
            self.compiles += 1
            self._entries[key] = fn
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        return fn

    def __len__(self) -> int:
        return len(self._entries)
