"""Turning CUDA kernels into launchers that own their module.

CuPy's ``RawModule``/``RawKernel`` memoize loaded modules for the life of
the process (``_get_raw_module`` in ``raw.pyx`` is ``_util.memoize``d), so
no cache of ours could ever unload one: a tenant varying a comment in its
source would load modules without bound.  Here every compiled kernel loads
its image into a ``cupy.cuda.function.Module`` of its own (``cuModuleLoadData``
from the bytes, no file) and its launcher holds that module: when the
kernel cache drops the launcher and no running graph holds it any more, the
module is unloaded (``Module.__dealloc__`` calls ``cuModuleUnload``).  The
shared-memory opt-in state lives in the launcher, one per loaded function.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from ..graph.errors import KernelDefinitionError, LaunchConfigError
from ..graph.kernels import Kernel
from ..graph.launch import Launch
from ..graph.library import BUILTINS
from . import oom
from .backend import CompiledKernel

CUDA_ERROR_OUT_OF_MEMORY = 2

#: Dynamic shared memory a kernel may use without opting in to more.
DEFAULT_DYNAMIC_SHARED = 48 * 1024


class ModuleLauncher:
    """Launches one function of a module it keeps loaded.

    Past 48 KiB of shared memory per block (static plus dynamic) a kernel
    must opt in first by raising its ``max_dynamic_shared_size_bytes``, or
    the launch fails with CUDA_ERROR_INVALID_VALUE.  Raised under a lock
    (setting the attribute is not thread-safe) to the largest size asked
    so far."""

    __slots__ = ("module", "function", "optin", "state", "lock", "__weakref__")

    def __init__(self, module: Any, function: Any, optin: int) -> None:
        self.module = module  # unloaded when the last launcher of it goes
        self.function = function
        self.optin = optin
        self.state: dict[str, Any] = {"static": None, "allowed": None}
        self.lock = threading.Lock()

    def __call__(self, launch: Launch, args: list, stream: Any) -> None:
        need = launch.shared_mem
        state = self.state
        if need and (state["allowed"] is None or need > state["allowed"]):
            with self.lock:
                opt_in_shared_memory(self.function, need, self.optin, state)
        self.function(launch.grid, launch.block, tuple(args), shared_mem=need, stream=stream)


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


class CudaKernels:
    """The CUDA backend's compiler and loader.

    ``api`` is the NVRTC in use (``nvrtc.choose_api``; None: no NVRTC, and
    ``compiler_note`` says why), ``image`` the (format, arch) every source
    is compiled to (None: ``image_error`` says why), ``is_fatal`` tells a
    sticky device fault from a bad image.
    """

    def __init__(self, cupy: Any, api: Any, image: tuple[str, int] | None,
                 image_error: str | None, compiler_note: str, optin: int,
                 is_fatal: Callable[[BaseException], bool]) -> None:
        self.cupy = cupy
        self.api = api
        self.image = image
        self.image_error = image_error
        self.compiler_note = compiler_note
        self.optin = optin
        self.is_fatal = is_fatal

    def compile(self, kernel: Kernel) -> CompiledKernel:
        cupy = self.cupy
        if kernel.kind == Kernel.LIBRARY:
            fn = BUILTINS[kernel.name].fn
            return lambda launch, args, stream: _on(stream, fn, cupy, args)
        if kernel.kind == Kernel.ARRAY:
            afn = kernel.fn
            return lambda launch, args, stream: _on(stream, afn, cupy, args)
        if kernel.kind == Kernel.CUDA:
            from .nvrtc import compile_for_device

            if self.api is None:
                raise KernelDefinitionError(f"no NVRTC on this worker: {self.compiler_note}",
                                            kernel=kernel.name)
            if self.image is None:
                raise KernelDefinitionError(self.image_error or "no image format",
                                            kernel=kernel.name)
            image, function = compile_for_device(kernel, self.image, self.api)
            return self.load(image, self.image[0], kernel.name, function)
        if kernel.kind == Kernel.CUDA_FILE:
            return self.load(kernel.image or b"", kernel.image_format or "ptx", kernel.name,
                             kernel.name)
        raise KernelDefinitionError(f"unknown kernel kind {kernel.kind!r}", kernel=kernel.name)

    def load(self, image: bytes, fmt: str, kernel: str, function: str) -> ModuleLauncher:
        """Load ``image`` into a module of its own and look up ``function``."""
        module = self.cupy.cuda.function.Module()
        failure: KernelDefinitionError | None = None
        try:
            module.load(bytes(image))
            fn = module.get_function(function)
        except Exception as e:  # noqa: BLE001 - CUDADriverError, or a bad name
            if self.is_fatal(e):
                raise  # the device faulted earlier: not this image's fault
            if getattr(e, "status", None) == CUDA_ERROR_OUT_OF_MEMORY:
                oom.mark(e)
                raise  # module data did not fit: evict and retry, not a bad kernel
            failure = KernelDefinitionError(
                f"cannot load {fmt} image or find {function!r} in it: "
                f"{type(e).__name__}: {e}", kernel=kernel)
        if failure is not None:
            raise failure
        return ModuleLauncher(module, fn, self.optin)


def _on(stream: Any, fn: Any, xp: Any, args: list) -> None:
    with stream:
        fn(xp, *args)
