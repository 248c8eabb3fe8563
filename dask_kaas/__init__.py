"""dask_kaas: Kernel-as-a-Service on Dask.

Tenants submit graphs of GPU kernels; the system owns device memory and runs
each graph on the worker of a shared pool where it finishes soonest, usually
the one that already holds its weights.
"""

from . import config  # noqa: F401 - registers the kaas.* Dask config defaults
from .client import (
    KaasClient,
    kaas_set_weight,
    kaas_stats,
    map_kernel_graph,
    submit_kernel_graph,
)
from .cluster import LocalKaasCluster
from .const_identity import freeze_const
from .device.handles import DeviceArray
from .futures import DeviceArrayFuture, KernelGraphFuture
from .graph import *  # noqa: F401,F403
from .plugin.scheduler import KaasSchedulerPlugin
from .plugin.worker import KaasWorkerPlugin

__version__ = "0.1.0"

__all__ = [  # noqa: F405 - the graph model's names come from the star import
    "AccessDeniedError", "RequestParameterError", "TenantError",
    "ArgRef", "BackendUnavailableError", "Buffer", "BufferKind", "BufferRoleError",
    "DeviceArray", "DeviceArrayFuture", "DeviceFaultError", "DeviceOutOfMemoryError",
    "DuplicateBufferError",
    "GraphError", "GraphTooLargeError", "In", "InOut", "InputError", "InputMismatchError",
    "KaasClient", "KaasError", "KaasSchedulerPlugin", "KaasWorkerPlugin", "Kernel",
    "KernelDefinitionError", "KernelExecutionError", "KernelGraph", "KernelGraphFuture",
    "Launch", "LaunchConfigError", "LiteralTypeError", "LocalKaasCluster", "MissingInputError",
    "NoKaasWorkersError", "Out", "RequestTimeoutError", "SerializationError",
    "UnexpectedInputError", "UninitializedReadError", "UnknownBufferError", "UnwrittenOutputError",
    "freeze_const", "kaas_set_weight", "kaas_stats", "map_kernel_graph", "submit_kernel_graph",
]
