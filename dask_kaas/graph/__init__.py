"""The kernel-graph data model: pure data, no Dask and no device."""

from .buffers import Buffer, BufferKind
from .errors import (
    AccessDeniedError,
    BackendUnavailableError,
    BufferRoleError,
    DeviceFaultError,
    DeviceOutOfMemoryError,
    DuplicateBufferError,
    GraphError,
    GraphTooLargeError,
    InputError,
    InputMismatchError,
    KaasError,
    KernelDefinitionError,
    KernelExecutionError,
    LaunchConfigError,
    LiteralTypeError,
    MissingInputError,
    NoKaasWorkersError,
    RequestParameterError,
    RequestTimeoutError,
    SerializationError,
    TenantError,
    UnexpectedInputError,
    UninitializedReadError,
    UnknownBufferError,
    UnwrittenOutputError,
)
from .graph import KernelGraph
from .kernels import Kernel
from .launch import ArgRef, In, InOut, Launch, Out
from .library import BUILTINS

__all__ = [
    "AccessDeniedError", "RequestParameterError", "TenantError",
    "ArgRef", "BUILTINS", "BackendUnavailableError", "Buffer", "BufferKind",
    "BufferRoleError", "DeviceFaultError", "DeviceOutOfMemoryError", "DuplicateBufferError",
    "GraphError",
    "GraphTooLargeError", "In", "InOut", "InputError", "InputMismatchError", "KaasError",
    "Kernel", "KernelDefinitionError", "KernelExecutionError", "KernelGraph", "Launch",
    "LaunchConfigError", "LiteralTypeError", "MissingInputError", "NoKaasWorkersError",
    "Out", "RequestTimeoutError", "SerializationError", "UnexpectedInputError",
    "UninitializedReadError", "UnknownBufferError", "UnwrittenOutputError",
]
