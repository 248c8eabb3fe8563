"""Compile CUDA C with NVRTC, without a GPU.

CuPy's own compile path asks the driver for the device's architecture and so
needs a GPU; NVRTC itself does not.  This module drives NVRTC through
``cuda-bindings`` (with the ``nvidia-cuda-nvrtc`` wheel) so that every CUDA
source shipped with dask_kaas can be checked on a machine without a GPU, and
so that tests can make PTX and cubin images for ``Kernel.cuda_file``.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..graph.errors import KernelDefinitionError
from ..graph.kernels import Kernel

DEFAULT_ARCH = "90"  # Hopper (H100/H200)


def _nvrtc():  # type: ignore[no-untyped-def]
    try:
        from cuda.bindings import nvrtc
    except ImportError as e:
        raise KernelDefinitionError(
            f"NVRTC is not available ({e}); pip install cuda-bindings nvidia-cuda-nvrtc"
        ) from None
    return nvrtc


def _check(result: object, what: str, kernel: str, log: str = "") -> None:
    nvrtc = _nvrtc()
    if result != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        raise KernelDefinitionError(f"NVRTC {what} failed ({result}){': ' + log if log else ''}",
                                    kernel=kernel)


def compile_source(source: str, name: str, options: Sequence[str] = (), arch: str = DEFAULT_ARCH,
                   output: str = "ptx", name_expressions: Sequence[str] = ()) -> bytes:
    """NVRTC-compile ``source``; returns PTX (``output="ptx"``) or a cubin.

    Raises KernelDefinitionError with NVRTC's log on a compile error.
    """
    nvrtc = _nvrtc()
    err, prog = nvrtc.nvrtcCreateProgram(source.encode(), f"{name}.cu".encode(), 0, [], [])
    _check(err, "program creation", name)
    try:
        for expr in name_expressions:
            (err,) = nvrtc.nvrtcAddNameExpression(prog, expr.encode())
            _check(err, f"name expression {expr!r}", name)
        target = f"compute_{arch}" if output == "ptx" else f"sm_{arch}"
        opts = [f"--gpu-architecture={target}".encode()] + [o.encode() for o in options]
        (err,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
        if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            _, size = nvrtc.nvrtcGetProgramLogSize(prog)
            log = b" " * size
            nvrtc.nvrtcGetProgramLog(prog, log)
            _check(err, "compilation", name, log.rstrip(b"\x00 ").decode(errors="replace"))
        if output == "ptx":
            err, size = nvrtc.nvrtcGetPTXSize(prog)
            _check(err, "PTX size", name)
            buf = b" " * size
            (err,) = nvrtc.nvrtcGetPTX(prog, buf)
        else:
            err, size = nvrtc.nvrtcGetCUBINSize(prog)
            _check(err, "cubin size", name)
            buf = b" " * size
            (err,) = nvrtc.nvrtcGetCUBIN(prog, buf)
        _check(err, f"{output} output", name)
        return buf.rstrip(b"\x00") if output == "ptx" else buf
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


def check_kernel(kernel: Kernel, arch: str = DEFAULT_ARCH) -> bytes:
    """Compile a ``Kernel.cuda`` as a worker would; returns its PTX."""
    if kernel.kind != Kernel.CUDA:
        raise KernelDefinitionError("only Kernel.cuda sources are compiled", kernel=kernel.name)
    return compile_source(kernel.source or "", kernel.name, kernel.options, arch,
                          name_expressions=kernel.name_expressions)
