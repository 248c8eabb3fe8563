"""The CUDA backend: CuPy kernels on an RMM pool, one stream per slot.

Each worker sees its device as device 0 (``CUDA_VISIBLE_DEVICES`` names it
first, as dask-cuda does).  Device memory comes from an RMM pool of a fixed
size with CuPy's allocator routed through it, so the DeviceCache's exact
accounting (allocation granularity included) keeps every graph inside the
pool: the cache evicts before RMM runs out.  Host-to-device copies of large
buffers go through pinned staging buffers in chunks, double-buffered so the
host copy of one chunk overlaps the DMA of the previous one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterator
from typing import Any

import numpy as np

from ..graph.errors import BackendUnavailableError, KernelDefinitionError
from ..graph.kernels import Kernel
from ..graph.launch import Launch
from ..graph.library import BUILTINS
from .backend import Backend, CompiledKernel
from .faults import is_sticky_fault

logger = logging.getLogger(__name__)

#: RMM hands out allocations in multiples of 256 bytes.
RMM_ALIGNMENT = 256
#: Copies at least this large are staged through pinned memory in chunks.
STAGING_THRESHOLD = 1 << 20
CHUNK = 8 << 20


def _round_up(n: int, k: int) -> int:
    return (n + k - 1) // k * k


class _Staging:
    """Two pinned host buffers and their events, for one stream."""

    def __init__(self, cupy: Any, cupyx: Any) -> None:
        self.buffers = [cupyx.empty_pinned((CHUNK,), dtype=np.uint8) for _ in range(2)]
        self.events = [cupy.cuda.Event(disable_timing=True) for _ in range(2)]
        self.used = [False, False]


class CudaBackend(Backend):
    name = "cuda"

    def __init__(self, device_memory_limit: Any = None, rmm_pool_size: Any = None,
                 **_: Any) -> None:
        from .. import config

        try:
            import cupy
            import cupyx
        except Exception as e:  # noqa: BLE001
            raise BackendUnavailableError(f"the cuda backend needs CuPy: {e}") from None
        if not cupy.is_available():
            raise BackendUnavailableError("the cuda backend needs a CUDA GPU; none is visible")
        self.cupy = cupy
        self.cupyx = cupyx
        self.xp = cupy
        self.device = cupy.cuda.Device(0)
        self.device.use()
        free, total = cupy.cuda.runtime.memGetInfo()
        self.total_bytes = int(total)
        wanted = rmm_pool_size if rmm_pool_size is not None else device_memory_limit
        pool = (int(total * config.GPU_DEFAULT_FRACTION) if wanted is None
                else config.parse_memory(wanted, int(total)))
        pool = min(pool, int(free)) // RMM_ALIGNMENT * RMM_ALIGNMENT
        self.pool_bytes = pool
        self.allocator = self._setup_pool(pool)
        self._staging: dict[int, _Staging] = {}
        props = cupy.cuda.runtime.getDeviceProperties(0)
        self.device_name = props["name"].decode() if isinstance(props["name"], bytes) \
            else str(props["name"])
        self.compute_capability = f"{props['major']}{props['minor']}"

    def _setup_pool(self, pool: int) -> str:
        cupy = self.cupy
        try:
            import rmm
            from rmm.allocators.cupy import rmm_cupy_allocator
        except Exception:  # noqa: BLE001 - RMM is optional; CuPy's own pool is the fallback
            mempool = cupy.cuda.MemoryPool()
            mempool.set_limit(size=pool)
            cupy.cuda.set_allocator(mempool.malloc)
            self._mempool = mempool
            logger.warning("dask_kaas: RMM is not installed; using CuPy's memory pool "
                           "(limit %d bytes)", pool)
            return "cupy"
        mr = rmm.mr.PoolMemoryResource(rmm.mr.CudaMemoryResource(), initial_pool_size=pool,
                                       maximum_pool_size=pool)
        rmm.mr.set_current_device_resource(mr)
        cupy.cuda.set_allocator(rmm_cupy_allocator)
        self._mr = mr
        return "rmm"

    # -- memory --------------------------------------------------------------
    def physical_capacity(self) -> int:
        return self.total_bytes

    def pool_capacity(self, requested: int) -> int:
        return min(requested, self.pool_bytes)

    def alloc_size(self, nbytes: int) -> int:
        granule = RMM_ALIGNMENT if self.allocator == "rmm" else 512
        return _round_up(int(nbytes), granule)

    def is_out_of_memory(self, exc: BaseException) -> bool:
        return isinstance(exc, (self.cupy.cuda.memory.OutOfMemoryError, MemoryError))

    def is_fatal(self, exc: BaseException) -> bool:
        cuda = self.cupy.cuda
        return is_sticky_fault(exc, (cuda.runtime.CUDARuntimeError, cuda.driver.CUDADriverError))

    def empty(self, shape: tuple[int, ...], dtype: np.dtype, stream: Any) -> Any:
        with stream:
            return self.cupy.empty(shape, dtype)

    def _staging_for(self, stream: Any) -> _Staging:
        st = self._staging.get(id(stream))
        if st is None:
            st = self._staging[id(stream)] = _Staging(self.cupy, self.cupyx)
        return st

    def to_device(self, host: np.ndarray, stream: Any) -> Any:
        cupy = self.cupy
        src = np.ascontiguousarray(host)
        with stream:
            dev = cupy.empty(src.shape, src.dtype)
        n = src.nbytes
        if n < STAGING_THRESHOLD:
            dev.set(src, stream=stream)
            return dev
        flat_src = src.reshape(-1).view(np.uint8)
        dst = dev.data.ptr
        st = self._staging_for(stream)
        kind = cupy.cuda.runtime.memcpyHostToDevice
        for i, off in enumerate(range(0, n, CHUNK)):
            k = i % 2
            m = min(CHUNK, n - off)
            if st.used[k]:
                st.events[k].synchronize()  # the DMA out of this buffer is done
            np.copyto(st.buffers[k][:m], flat_src[off:off + m])
            cupy.cuda.runtime.memcpyAsync(dst + off, st.buffers[k].ctypes.data, m, kind,
                                          stream.ptr)
            st.events[k].record(stream)
            st.used[k] = True
        return dev

    def to_host(self, dev: Any, stream: Any) -> np.ndarray:
        if stream is None:
            return self.cupy.asnumpy(dev)
        out = dev.get(stream=stream)
        stream.synchronize()
        return out

    # -- kernels -----------------------------------------------------------------
    def compile(self, kernel: Kernel) -> CompiledKernel:
        cupy = self.cupy
        if kernel.kind == Kernel.LIBRARY:
            fn = BUILTINS[kernel.name].fn
            return lambda launch, args, stream: _on(stream, fn, cupy, args)
        if kernel.kind == Kernel.ARRAY:
            afn = kernel.fn
            return lambda launch, args, stream: _on(stream, afn, cupy, args)
        if kernel.kind == Kernel.CUDA:
            module = cupy.RawModule(code=kernel.source, options=tuple(kernel.options),
                                    name_expressions=list(kernel.name_expressions) or None)
            raw = module.get_function(kernel.name)
        else:
            raw = self._load_image(kernel)
        return _raw_launcher(raw)

    def _load_image(self, kernel: Kernel) -> Any:
        """PTX or cubin: RawModule loads from a file, so write one first."""
        suffix = "." + (kernel.image_format or "ptx")
        fd, path = tempfile.mkstemp(suffix=suffix, prefix="kaas-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(kernel.image or b"")
            module = self.cupy.RawModule(path=path)
            return module.get_function(kernel.name)
        except self.cupy.cuda.driver.CUDADriverError as e:
            raise KernelDefinitionError(f"cannot load {suffix[1:]} image: {e}",
                                        kernel=kernel.name) from None
        finally:
            os.unlink(path)

    # -- streams -------------------------------------------------------------------
    def make_streams(self, n: int) -> list[Any]:
        return [self.cupy.cuda.Stream(non_blocking=True) for _ in range(n)]

    @contextlib.contextmanager
    def on_stream(self, stream: Any) -> Iterator[None]:
        with stream:
            yield

    def synchronize(self, stream: Any) -> None:
        stream.synchronize()

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "device": self.device_name,
                "compute_capability": self.compute_capability,
                "device_total_bytes": self.total_bytes, "pool_bytes": self.pool_bytes,
                "allocator": self.allocator,
                "visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", "")}

    def close(self) -> None:
        self._staging.clear()


def _on(stream: Any, fn: Any, xp: Any, args: list) -> None:
    with stream:
        fn(xp, *args)


def _raw_launcher(raw: Any) -> CompiledKernel:
    def launch(launch: Launch, args: list, stream: Any) -> None:
        raw(launch.grid, launch.block, tuple(args), shared_mem=launch.shared_mem,
            stream=stream)

    return launch
