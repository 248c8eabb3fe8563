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
only where the driver can read it, see ``nvrtc.choose_image``).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np

from ..graph.errors import BackendUnavailableError, KernelDefinitionError, LaunchConfigError
from ..graph.kernels import Kernel
from ..graph.launch import Launch
from ..graph.library import BUILTINS
from .backend import Backend, CompiledKernel
from .faults import is_sticky_fault
from .nvrtc import cuda_version
from .sizing import RMM_ALIGNMENT, Headroom, size_device_memory
from .staging import STAGING_THRESHOLD, StagedCopier

logger = logging.getLogger(__name__)

#: Dynamic shared memory a kernel may use without opting in to more.
DEFAULT_DYNAMIC_SHARED = 48 * 1024
#: ``cudaDevAttrMaxSharedMemoryPerBlockOptin``.
ATTR_SHARED_OPTIN = 97

_live_lock = threading.Lock()
_live: list[CudaBackend] = []
#: Loaded function (CUfunction address) -> its shared-memory opt-in state.
_shared_state: dict[int, dict[str, Any]] = {}
_shared_lock = threading.Lock()


def _round_up(n: int, k: int) -> int:
    return (n + k - 1) // k * k


class CudaBackend(Backend):
    name = "cuda"

    def __init__(self, device_memory_limit: Any = None, rmm_pool_size: Any = None,
                 headroom: Headroom | None = None, **_: Any) -> None:
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
            self._start(cupy, cupyx, device_memory_limit, rmm_pool_size, headroom)
        except BaseException:
            self.close()
            raise

    def _start(self, cupy: Any, cupyx: Any, limit: Any, pool: Any,
               headroom: Headroom | None) -> None:
        self.cupy = cupy
        self.cupyx = cupyx
        self.xp = cupy
        runtime = cupy.cuda.runtime
        self.device = cupy.cuda.Device(0)
        self.device.use()
        free, total = runtime.memGetInfo()
        self.total_bytes = int(total)
        self.sizing = size_device_memory(int(total), int(free), limit, pool, headroom)
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
        self._image_dir = tempfile.mkdtemp(prefix="kaas-images-")
        self._image_lock = threading.Lock()
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
            cupy.cuda.set_allocator(mempool.malloc)
            self._mempool = mempool
            logger.warning("dask_kaas: %s; using CuPy's memory pool (limit %d bytes)", note, pool)
            return "cupy", note
        upstream = rmm.mr.PoolMemoryResource(rmm.mr.CudaMemoryResource(),
                                             initial_pool_size=pool, maximum_pool_size=pool)
        mr = rmm.mr.StatisticsResourceAdaptor(upstream)
        self._prev_mr = rmm.mr.get_current_device_resource()
        rmm.mr.set_current_device_resource(mr)
        cupy.cuda.set_allocator(rmm_cupy_allocator)
        self._mr = mr
        return "rmm", None

    def _choose_compiler(self) -> None:
        """NVRTC through cuda-bindings when present (so the image is ours to
        choose), else CuPy's compiler (which also makes cubins by default)."""
        from . import nvrtc

        self.kernel_compiler = "nvrtc"
        self._image: tuple[str, int] | None = None
        self._image_error: str | None = None
        try:
            self.nvrtc_version = nvrtc.nvrtc_version()
            archs = nvrtc.supported_archs()
        except KernelDefinitionError as e:
            self.kernel_compiler = f"cupy ({e.detail})"
            major, minor = self.cupy.cuda.nvrtc.getVersion()
            self.nvrtc_version = (int(major), int(minor))
            return
        try:
            self._image = nvrtc.choose_image(self.nvrtc_version, self.driver_version, self.arch,
                                             archs)
        except KernelDefinitionError as e:
            self._image_error = e.detail

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
        return isinstance(exc, (self.cupy.cuda.memory.OutOfMemoryError, MemoryError))

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
        cupy = self.cupy
        if kernel.kind == Kernel.LIBRARY:
            fn = BUILTINS[kernel.name].fn
            return lambda launch, args, stream: _on(stream, fn, cupy, args)
        if kernel.kind == Kernel.ARRAY:
            afn = kernel.fn
            return lambda launch, args, stream: _on(stream, afn, cupy, args)
        if kernel.kind == Kernel.CUDA and self.kernel_compiler != "nvrtc":
            module = cupy.RawModule(code=kernel.source, options=tuple(kernel.options),
                                    name_expressions=list(kernel.name_expressions) or None)
            raw = module.get_function(kernel.name)
        elif kernel.kind == Kernel.CUDA:
            from .nvrtc import compile_for_device

            if self._image is None:
                raise KernelDefinitionError(self._image_error or "no NVRTC", kernel=kernel.name)
            image, function = compile_for_device(kernel, self._image)
            raw = self._load_image(image, self._image[0], kernel.name, function)
        else:
            raw = self._load_image(kernel.image or b"", kernel.image_format or "ptx",
                                   kernel.name, kernel.name)
        return _raw_launcher(raw, self.shared_mem_optin)

    def _load_image(self, image: bytes, fmt: str, kernel: str, function: str) -> Any:
        """RawModule loads from a file, and CuPy memoizes modules by path: so
        the file is named by the image's hash (a path always means the same
        bytes), written whole before anyone loads it, and kept until close
        (two slots may load the same kernel at once)."""
        path = image_file(self._image_dir, image, fmt, self._image_lock)
        try:
            module = self.cupy.RawModule(path=path)
            return module.get_function(function)  # loads the module now
        except self.cupy.cuda.driver.CUDADriverError as e:
            if self.is_fatal(e):
                raise  # the device faulted earlier: not this image's fault
            raise KernelDefinitionError(f"cannot load {fmt} image: {e}", kernel=kernel) from None

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
        if self.kernel_compiler != "nvrtc":
            image = "cupy's choice"
        elif self._image is not None:
            fmt, arch = self._image
            image = f"{fmt} {'sm' if fmt == 'cubin' else 'compute'}_{arch}"
        info = {"backend": self.name, "device": self.device_name,
                "compute_capability": self.compute_capability,
                "device_total_bytes": self.total_bytes, "pool_bytes": self.pool_bytes,
                "headroom_bytes": self.sizing.headroom_bytes,
                "allocator": self.allocator, "allocator_note": self.allocator_note,
                "driver_cuda_version": ".".join(map(str, self.driver_version)),
                "nvrtc_version": ".".join(map(str, self.nvrtc_version)),
                "kernel_compiler": self.kernel_compiler,
                "kernel_image": image,
                "kernel_image_error": self._image_error,
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
        if getattr(self, "_image_dir", None):
            shutil.rmtree(self._image_dir, ignore_errors=True)


def image_file(directory: str, image: bytes, fmt: str, lock: threading.Lock) -> str:
    """The path of a file in ``directory`` holding exactly ``image``, named
    by its hash and written whole (through a rename) before it is returned."""
    digest = hashlib.sha256(image).hexdigest()
    path = os.path.join(directory, f"{digest}.{fmt}")
    with lock:
        if not os.path.exists(path):
            tmp = f"{path}.{threading.get_ident()}.tmp"
            with open(tmp, "wb") as f:
                f.write(image)
            os.replace(tmp, path)
    return path


def _on(stream: Any, fn: Any, xp: Any, args: list) -> None:
    with stream:
        fn(xp, *args)


def _raw_launcher(raw: Any, optin: int) -> CompiledKernel:
    """Launch a RawKernel.  Past 48 KiB of shared memory per block (static
    plus dynamic) a kernel must opt in first by raising its
    ``max_dynamic_shared_size_bytes``, or the launch fails with
    CUDA_ERROR_INVALID_VALUE.  Raised under a lock (setting the attribute is
    not thread-safe) to the largest size asked so far."""
    # The loaded function of device 0 (the worker's only one), called directly:
    # RawKernel.__call__ would look it up again on every launch.
    function = raw.kernel
    lock = _shared_lock
    with lock:  # one state per loaded function, however often it was compiled
        state = _shared_state.setdefault(function.ptr, {"static": None, "allowed": None})

    def launch(launch: Launch, args: list, stream: Any) -> None:
        need = launch.shared_mem
        if need and (state["allowed"] is None or need > state["allowed"]):
            with lock:
                opt_in_shared_memory(raw, need, optin, state)
        function(launch.grid, launch.block, tuple(args), shared_mem=need, stream=stream)

    return launch


def opt_in_shared_memory(raw: Any, need: int, optin: int, state: dict[str, Any]) -> None:
    """Make ``raw`` accept ``need`` bytes of dynamic shared memory, or say
    why the device cannot.  ``state`` remembers the kernel's static shared
    memory and what it accepts now."""
    if state["static"] is None:
        state["static"] = int(raw.shared_size_bytes)
    static = state["static"]
    if state["allowed"] is None:
        state["allowed"] = max(0, DEFAULT_DYNAMIC_SHARED - static)
    if need <= state["allowed"]:
        return
    if static + need > optin:
        raise LaunchConfigError(
            f"needs {need} bytes of dynamic shared memory per block on top of {static} "
            f"static, more than the device's {optin}")
    raw.max_dynamic_shared_size_bytes = need
    state["allowed"] = need
