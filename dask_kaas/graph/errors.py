"""The exception hierarchy of dask_kaas.

Every failure a user can cause or meet has its own subclass of
:class:`KaasError`, and its message names the graph, the launch (index and
kernel) and the buffer involved, so that an error seen in a log on the other
side of a cluster still points at the line of the graph that caused it.
Exceptions cross process boundaries (Dask pickles them from worker to client),
so each one rebuilds itself from its message and context alone.
"""

from __future__ import annotations

from typing import Any


def describe(graph: str | None = None, launch: int | None = None,
             kernel: str | None = None, buffer: str | None = None) -> str:
    """A compact "graph 'g', launch 2 (kernel 'gemm'), buffer 'x'" locator."""
    parts = []
    if graph is not None:
        parts.append(f"graph {graph!r}")
    if launch is not None:
        parts.append(f"launch {launch}" + (f" (kernel {kernel!r})" if kernel else ""))
    elif kernel is not None:
        parts.append(f"kernel {kernel!r}")
    if buffer is not None:
        parts.append(f"buffer {buffer!r}")
    return ", ".join(parts)


class KaasError(Exception):
    """Base class of every error raised by dask_kaas."""

    def __init__(self, message: str, *, graph: str | None = None,
                 launch: int | None = None, kernel: str | None = None,
                 buffer: str | None = None) -> None:
        self.graph = graph
        self.launch = launch
        self.kernel = kernel
        self.buffer = buffer
        self.detail = message
        where = describe(graph, launch, kernel, buffer)
        super().__init__(f"{where}: {message}" if where else message)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self.detail, self.graph, self.launch,
                           self.kernel, self.buffer))


def _rebuild(cls: type, detail: str, graph: Any, launch: Any, kernel: Any,
             buffer: Any) -> KaasError:
    return cls(detail, graph=graph, launch=launch, kernel=kernel, buffer=buffer)


class GraphError(KaasError):
    """The graph itself is malformed (independent of any inputs)."""


class UnknownBufferError(GraphError):
    """A launch names a buffer that is not part of this graph."""


class DuplicateBufferError(GraphError):
    """Two buffers of one graph share a name."""


class UninitializedReadError(GraphError):
    """A temp or output buffer is read before any launch writes it."""


class UnwrittenOutputError(GraphError):
    """An output buffer is never written by any launch."""


class BufferRoleError(GraphError):
    """A buffer is used against its role (e.g. a const is written)."""


class LiteralTypeError(GraphError):
    """A scalar argument is not a NumPy scalar with an explicit dtype."""


class LaunchConfigError(GraphError):
    """Grid, block or shared-memory settings are out of range."""


class KernelDefinitionError(GraphError):
    """A kernel cannot be built or has no implementation for a backend."""


class SerializationError(GraphError):
    """A graph cannot be written to (or read from) its dict/JSON form."""


class InputError(KaasError):
    """The inputs given with a submission do not match the graph."""


class MissingInputError(InputError):
    """An input or const buffer was given no value."""


class UnexpectedInputError(InputError):
    """A value was given for a name that is not an input of the graph."""


class InputMismatchError(InputError):
    """An input value's shape or dtype differs from its buffer."""


class GraphTooLargeError(KaasError):
    """The graph's buffers do not fit on any worker's device."""


class KernelExecutionError(KaasError):
    """A kernel raised while the graph ran on a worker."""


class DeviceFaultError(KernelExecutionError):
    """A kernel faulted the device (illegal address, launch failure, ...).

    The CUDA context stays in a sticky error state after such a fault, so
    every later graph on that worker would fail too: the worker is marked
    broken and restarted, and its other requests are placed again.
    """


class RequestTimeoutError(KaasError):
    """A request ran past its time limit (``timeout=`` or ``kaas.request-timeout``)."""


class BackendUnavailableError(KaasError):
    """The requested device backend cannot run on this machine."""


class DeviceOutOfMemoryError(KaasError):
    """Device memory ran out and eviction could not make room."""


class NoKaasWorkersError(KaasError):
    """The cluster has no worker able to run kernel graphs."""


class TenantError(KaasError):
    """A tenant name is not a non-empty string of at most 200 characters."""


class RequestParameterError(KaasError):
    """A submission or handler parameter (priority, weight, policy, ...) is
    of the wrong type or out of range."""


class AccessDeniedError(KaasError):
    """The caller's identity may not do this (an operator action, another
    tenant's settings, or submitting as another tenant)."""
