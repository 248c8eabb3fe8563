"""What a device backend must provide, and how one is chosen.

The cache, the executor and the plugins only ever talk to this interface, so
the same eviction, placement and accounting code runs over NumPy on a laptop
and over CuPy + RMM on a GPU.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from ..graph.errors import BackendUnavailableError
from ..graph.kernels import Kernel
from ..graph.launch import Launch

#: A compiled kernel: called with the launch and its argument values
#: (device arrays and NumPy scalars) on a stream.
CompiledKernel = Callable[[Launch, list, Any], None]


class Backend(abc.ABC):
    """A device and its memory, as seen by one worker."""

    name: str = "?"
    #: The array module kernels receive as ``xp``.
    xp: Any = np

    @abc.abstractmethod
    def physical_capacity(self) -> int:
        """Bytes of device memory this worker may use at most (before any
        configured limit)."""

    def cache_capacity(self, limit: Any = None) -> int:
        """Bytes the device cache may hold, for a configured limit (bytes, a
        string or a fraction of the device; None: the backend's default)."""
        from .. import config

        if limit is None:
            return config.CPU_DEFAULT_CAPACITY
        return config.parse_memory(limit, self.physical_capacity())

    def shared_mem_limit(self) -> int | None:
        """Most dynamic shared memory a launch may ask per block (the
        device's opt-in limit), or None where it means nothing (CPU)."""
        return None

    def is_out_of_memory(self, exc: BaseException) -> bool:
        """Whether ``exc`` is the device running out of memory: a failure of
        the worker's allocator (see ``oom.py``), never a ``MemoryError`` a
        kernel raised itself.  Memory is host memory here, so NumPy's own
        failure to allocate counts."""
        from . import oom

        return oom.is_marked(exc) or oom.is_numpy_allocation_failure(exc)

    def is_fatal(self, exc: BaseException) -> bool:
        """Whether ``exc`` left the device unusable for every later request
        (a sticky CUDA fault); the runtime then marks the worker broken."""
        return False

    def alloc_size(self, nbytes: int) -> int:
        """Bytes an allocation of ``nbytes`` really takes (granularity)."""
        return nbytes

    @abc.abstractmethod
    def empty(self, shape: tuple[int, ...], dtype: np.dtype, stream: Any) -> Any:
        """Allocate uninitialized device memory."""

    def zeros(self, shape: tuple[int, ...], dtype: np.dtype, stream: Any) -> Any:
        """Allocate device memory set to zero (ordered on ``stream``): what a
        graph's outputs and temps start as, so no request ever sees bytes an
        earlier one left behind."""
        arr = self.empty(shape, dtype, stream)
        arr.fill(0)
        return arr

    @abc.abstractmethod
    def to_device(self, host: np.ndarray, stream: Any) -> Any:
        """Copy a host array into new device memory."""

    @abc.abstractmethod
    def to_host(self, dev: Any, stream: Any) -> np.ndarray:
        """Copy device memory into a new host array (synchronously)."""

    @abc.abstractmethod
    def compile(self, kernel: Kernel) -> CompiledKernel:
        """Turn a kernel description into something callable (once per kernel,
        the kernel cache sees to that)."""

    def make_streams(self, n: int) -> list[Any]:
        """One stream per concurrency slot."""
        return [None] * n

    @contextlib.contextmanager
    def on_stream(self, stream: Any) -> Iterator[None]:
        yield

    def synchronize(self, stream: Any) -> None:  # noqa: B027 - a no-op by default
        """Wait until all work queued on ``stream`` is done."""

    def record_ready(self, stream: Any) -> Any:
        """A marker of the work queued on ``stream`` so far (a CUDA event):
        a cache entry loaded asynchronously on ``stream`` is ready once the
        marker is reached.  None where copies are synchronous (CPU)."""
        return None

    def wait_ready(self, marker: Any, stream: Any) -> None:  # noqa: B027 - no-op by default
        """Make work queued on ``stream`` from now on wait for ``marker``
        (from :meth:`record_ready`, possibly of another stream) without
        blocking the host; with ``stream`` None the host waits.  A None
        marker is ready."""

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name}

    def close(self) -> None:  # noqa: B027 - a no-op by default
        """Release device resources."""


def gpu_count() -> int:
    """Number of CUDA devices visible, without raising where CUDA is absent."""
    try:
        import cupy
    except Exception:  # noqa: BLE001 - no CuPy at all, or a broken install
        return 0
    try:
        if not cupy.is_available():
            return 0
        return int(cupy.cuda.runtime.getDeviceCount())
    except Exception:  # noqa: BLE001 - no driver
        return 0


def resolve_backend_name(name: str | None) -> str:
    """``auto`` becomes ``cuda`` where a GPU is visible, else ``cpu``;
    asking for ``cuda`` where there is none is a KaasError, not a CUDA trace."""
    name = (name or "auto").lower()
    if name == "auto":
        return "cuda" if gpu_count() > 0 else "cpu"
    if name == "cuda":
        if gpu_count() == 0:
            raise BackendUnavailableError(
                "backend 'cuda' was requested but no CUDA GPU is visible on this machine "
                "(cupy.is_available() is False or CuPy is not installed); use "
                "backend='cpu' or 'auto'")
        return "cuda"
    if name == "cpu":
        return "cpu"
    raise BackendUnavailableError(f"unknown backend {name!r}: expected 'auto', 'cpu' or 'cuda'")


def make_backend(name: str | None, **options: Any) -> Backend:
    resolved = resolve_backend_name(name)
    if resolved == "cuda":
        from .cuda import CudaBackend

        return CudaBackend(**options)
    from .cpu import CpuBackend

    return CpuBackend(**options)
