"""The CUDA backend: CuPy kernels on an RMM pool, one stream per slot.

Each worker sees its device as device 0 (``CUDA_VISIBLE_DEVICES`` names it
first, as dask-cuda does).  Device memory comes from an RMM pool of a fixed
size with CuPy's allocator routed through it; the DeviceCache gets the pool
less a headroom for what it cannot account (kernel temporaries, RMM's free
lists), see ``sizing.py``, and its exact accounting (allocation granularity
included) keeps every graph inside the pool.  RMM's own statistics are
reported next to the cache's.  The RMM resource and CuPy's allocator are
process-wide, so one process holds one CUDA backend at a time.

CUDA C kernels are compiled with NVRTC into a cubin for the device (or PTX
only where the driver can read it, see ``nvrtc.choose_image``), and each
is loaded into a module of its own that the kernel cache can unload (see
``cuda_kernels.py``).  CuPy's allocations go through a wrapper that marks
the pool's out-of-memory errors as the device's (``oom.py``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np

from ..graph.errors import BackendUnavailableError, KernelDefinitionError
from ..graph.kernels import Kernel
from . import oom
from .backend import Backend, CompiledKernel
from .cuda_kernels import DEFAULT_DYNAMIC_SHARED, CudaKernels, opt_in_shared_memory
from .faults import is_sticky_fault
from .nvrtc import cuda_version
from .sizing import RMM_ALIGNMENT, Headroom, size_device_memory
from .staging import STAGING_THRESHOLD, StagedCopier

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_DYNAMIC_SHARED", "CudaBackend", "opt_in_shared_memory"]

#: ``cudaDevAttrMaxSharedMemoryPerBlockOptin``.
ATTR_SHARED_OPTIN = 97

_live_lock = threading.Lock()
_live: list[CudaBackend] = []


def _round_up(n: int, k: int) -> int:
    return (n + k - 1) // k * k


class CudaBackend(Backend):
    name = "cuda"

    def __init__(self, device_memory_limit: Any = None, rmm_pool_size: Any = None,
                 headroom: Headroom | None = None, reserve: Any = None,
                 workers_per_device: Any = None, **_: Any) -> None:
        try:
            import cupy
            import cupyx
        except Exception as e:  # noqa: BLE001
            raise BackendUnavailableError(f"the cuda backend needs CuPy: {e}") from None
        if not cupy.is_available():
            raise BackendUnavailableError("the cuda backend needs a CUDA GPU; none is visible")
        with _live_lock:
            if _live:
                raise BackendUnavailableError(
                    "a CUDA backend is already live in this process: the RMM memory resource "
                    "and CuPy's allocator are process-wide, so run one worker per process "
                    "(processes=True) or close the other backend first")
            _live.append(self)
        try:
            self._start(cupy, cupyx, device_memory_limit, rmm_pool_size, headroom, reserve,
                        workers_per_device)
        except BaseException:
            self.close()
            raise

    def _start(self, cupy: Any, cupyx: Any, limit: Any, pool: Any,
               headroom: Headroom | None, reserve: Any, workers_per_device: Any) -> None:
        self.cupy = cupy
        self.cupyx = cupyx
        self.xp = cupy
        runtime = cupy.cuda.runtime
        self.device = cupy.cuda.Device(0)
        self.device.use()
        free, total = runtime.memGetInfo()
        self.total_bytes = int(total)
        self.sizing = size_device_memory(int(total), int(free), limit, pool, headroom,
                                         reserve=reserve,
                                         workers_per_device=workers_per_device)
        self.pool_bytes = self.sizing.pool_bytes
        self._mr: Any = None
        self._mempool: Any = None
        self._prev_mr: Any = None
        self._prev_allocator = cupy.cuda.get_allocator()
        self.allocator, self.allocator_note = self._setup_pool(self.pool_bytes)
        self._copier = StagedCopier(cupy, cupyx)
        props = runtime.getDeviceProperties(0)
        name = props["name"]
        self.device_name = name.decode() if isinstance(name, bytes) else str(name)
        self.arch = int(props["major"]) * 10 + int(props["minor"])
        self.compute_capability = str(self.arch)
        self.shared_mem_optin = int(runtime.deviceGetAttribute(ATTR_SHARED_OPTIN, 0))
        self.driver_version = cuda_version(runtime.driverGetVersion())
        self._choose_compiler()

    def _setup_pool(self, pool: int) -> tuple[str, str | None]:
        cupy = self.cupy
        try:
            import rmm
            from rmm.allocators.cupy import rmm_cupy_allocator
        except Exception as e:  # noqa: BLE001 - RMM is optional; CuPy's own pool is the fallback
            note = ("RMM is not installed" if isinstance(e, ImportError) and e.name == "rmm"
                    else f"RMM failed to import ({type(e).__name__}: {e})")
            mempool = cupy.cuda.MemoryPool()
            mempool.set_limit(size=pool)
            cupy.cuda.set_allocator(oom.tagging_allocator(mempool.malloc))
            self._mempool = mempool
            logger.warning("dask_kaas: %s; using CuPy's memory pool (limit %d bytes)", note, pool)
            return "cupy", note
        upstream = rmm.mr.PoolMemoryResource(rmm.mr.CudaMemoryResource(),
                                             initial_pool_size=pool, maximum_pool_size=pool)
        mr = rmm.mr.StatisticsResourceAdaptor(upstream)
        self._prev_mr = rmm.mr.get_current_device_resource()
        rmm.mr.set_current_device_resource(mr)
        cupy.cuda.set_allocator(oom.tagging_allocator(rmm_cupy_allocator))
        self._mr = mr
        return "rmm", None

    def _choose_compiler(self) -> None:
        """NVRTC through cuda-bindings where it loads (so the image is ours
        to choose), else CuPy's NVRTC wrapper through the same steps; with
        neither, the worker still starts and refuses CUDA sources saying
        why.  ``kernel_compiler`` records which and why."""
        from . import nvrtc

        try:
            cupy_nvrtc = self.cupy.cuda.nvrtc
        except Exception:  # noqa: BLE001 - a CuPy without its NVRTC wrapper
            cupy_nvrtc = None
        api, version, note = nvrtc.choose_api(cupy_nvrtc)
        self.kernel_compiler = note
        self.nvrtc_version = version
        image: tuple[str, int] | None = None
        image_error: str | None = None
        if api is not None:
            try:
                image = nvrtc.choose_image(version, self.driver_version, self.arch, api.archs())
            except KernelDefinitionError as e:
                image_error = e.detail
            except Exception as e:  # noqa: BLE001 - the architecture query failed
                image_error = f"NVRTC's architectures are unknown ({type(e).__name__}: {e})"
        else:
            image_error = note
        if note != "nvrtc":
            logger.warning("dask_kaas: CUDA sources are compiled with %s", note)
        self._kernels = CudaKernels(self.cupy, api, image, image_error, note,
                                    self.shared_mem_optin, self.is_fatal)

    # -- memory --------------------------------------------------------------
    def physical_capacity(self) -> int:
        return self.total_bytes

    def cache_capacity(self, limit: Any = None) -> int:
        # The limit was part of the sizing when the backend was made.
        return self.sizing.cache_bytes

    def alloc_size(self, nbytes: int) -> int:
        granule = RMM_ALIGNMENT if self.allocator == "rmm" else 512
        return _round_up(int(nbytes), granule)

    def is_out_of_memory(self, exc: BaseException) -> bool:
        # Only what the worker's allocator raised (oom.tagging_allocator):
        # a kernel's own ``raise MemoryError`` is that request's failure.
        return oom.is_marked(exc)

    def is_fatal(self, exc: BaseException) -> bool:
        cuda = self.cupy.cuda
        return is_sticky_fault(exc, (cuda.runtime.CUDARuntimeError, cuda.driver.CUDADriverError))

    def pool_statistics(self) -> dict[str, int | None]:
        """What the allocator itself says is in use (RMM's statistics)."""
        if self._mr is not None:
            counts = self._mr.allocation_counts
            return {"pool_used_bytes": int(counts.current_bytes),
                    "pool_peak_bytes": int(counts.peak_bytes),
                    "pool_allocations": int(counts.total_count)}
        if self._mempool is not None:
            return {"pool_used_bytes": int(self._mempool.used_bytes()),
                    "pool_peak_bytes": None, "pool_allocations": None}
        return {}

    def empty(self, shape: tuple[int, ...], dtype: np.dtype, stream: Any) -> Any:
        with stream:
            return self.cupy.empty(shape, dtype)

    def zeros(self, shape: tuple[int, ...], dtype: np.dtype, stream: Any) -> Any:
        # cupy.zeros is an allocation plus a memsetAsync on the current stream.
        with stream:
            return self.cupy.zeros(shape, dtype)

    def to_device(self, host: np.ndarray, stream: Any) -> Any:
        src = np.asarray(host, order="C")  # keeps 0-d shapes
        with stream:
            dev = self.cupy.empty(src.shape, src.dtype)
        if src.nbytes < STAGING_THRESHOLD:
            dev.set(src, stream=stream)
        else:
            self._copier.copy(dev.data.ptr, src, stream)
        return dev

    def to_host(self, dev: Any, stream: Any) -> np.ndarray:
        if stream is None:
            return self.cupy.asnumpy(dev)
        out = dev.get(stream=stream)
        stream.synchronize()
        return out

    # -- ordering between streams ---------------------------------------------
    def record_ready(self, stream: Any) -> Any:
        event = self.cupy.cuda.Event(disable_timing=True)
        event.record(stream)
        return event

    def wait_ready(self, marker: Any, stream: Any) -> None:
        if marker is None:
            return
        if stream is None:
            marker.synchronize()
        else:
            stream.wait_event(marker)

    # -- kernels -----------------------------------------------------------------
    def shared_mem_limit(self) -> int | None:
        return self.shared_mem_optin

    def compile(self, kernel: Kernel) -> CompiledKernel:
        return self._kernels.compile(kernel)

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
        image = None
        if self._kernels.image is not None:
            fmt, arch = self._kernels.image
            image = f"{fmt} {'sm' if fmt == 'cubin' else 'compute'}_{arch}"
        info = {"backend": self.name, "device": self.device_name,
                "compute_capability": self.compute_capability,
                "device_total_bytes": self.total_bytes, "pool_bytes": self.pool_bytes,
                "headroom_bytes": self.sizing.headroom_bytes,
                "allocator": self.allocator, "allocator_note": self.allocator_note,
                "driver_cuda_version": ".".join(map(str, self.driver_version)),
                "nvrtc_version": (".".join(map(str, self.nvrtc_version))
                                  if self.nvrtc_version else None),
                "kernel_compiler": self.kernel_compiler,
                "kernel_image": image,
                "kernel_image_error": self._kernels.image_error,
                "device_reserve_bytes": self.sizing.reserve_bytes,
                "workers_per_device": self.sizing.workers_per_device,
                "shared_mem_per_block_optin": self.shared_mem_optin,
                "visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", "")}
        info.update(self.pool_statistics())
        return info

    def close(self) -> None:
        """Give the process's allocator and RMM resource back as they were,
        so that the pool is freed once the last array of it is gone."""
        with _live_lock:
            if self not in _live:
                return
            _live.remove(self)
        # Also called when __init__ failed half way: undo what was done.
        if getattr(self, "_copier", None) is not None:
            self._copier.close()
        if getattr(self, "_prev_allocator", None) is not None:
            self.cupy.cuda.set_allocator(self._prev_allocator)
        if getattr(self, "_mr", None) is not None:
            import rmm

            rmm.mr.set_current_device_resource(self._prev_mr)
        self._mr = self._mempool = None
