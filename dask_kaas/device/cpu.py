"""The CPU backend: NumPy arrays stand in for device memory.

Device copies are real copies into separately allocated host memory, so
bytes-to-device, hits, misses and evictions mean exactly what they mean on a
GPU, and every cache and placement path runs on a machine without one.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..graph.errors import KernelDefinitionError
from ..graph.kernels import Kernel
from ..graph.library import BUILTINS
from .backend import Backend, CompiledKernel


def host_memory_bytes() -> int:
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except Exception:  # noqa: BLE001
        return 8 * 2**30


class CpuBackend(Backend):
    name = "cpu"
    xp = np

    def __init__(self, **_: Any) -> None:
        pass

    def physical_capacity(self) -> int:
        return host_memory_bytes()

    def empty(self, shape: tuple[int, ...], dtype: np.dtype, stream: Any) -> np.ndarray:
        return np.empty(shape, dtype)

    def zeros(self, shape: tuple[int, ...], dtype: np.dtype, stream: Any) -> np.ndarray:
        return np.zeros(shape, dtype)

    def to_device(self, host: np.ndarray, stream: Any) -> np.ndarray:
        return np.array(host, copy=True, order="C")

    def to_host(self, dev: np.ndarray, stream: Any) -> np.ndarray:
        return np.array(dev, copy=True)

    def compile(self, kernel: Kernel) -> CompiledKernel:
        return cpu_callable(kernel)


def cpu_callable(kernel: Kernel) -> CompiledKernel:
    """The NumPy implementation of any kernel form."""
    if kernel.kind == Kernel.LIBRARY:
        fn = BUILTINS[kernel.name].fn
    elif kernel.kind == Kernel.ARRAY:
        fn = kernel.fn  # type: ignore[assignment]
    elif kernel.cpu is not None:
        fn = kernel.cpu
    else:
        raise KernelDefinitionError(
            "CUDA kernel has no CPU implementation: pass cpu=<array function> to "
            "Kernel.cuda/Kernel.cuda_file to run it on the CPU backend", kernel=kernel.name)

    def run(launch: Any, args: list, stream: Any) -> None:
        fn(np, *args)

    return run
