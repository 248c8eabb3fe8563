"""Compile CUDA C with NVRTC, without a GPU.

CuPy's own compile path asks the driver for the device's architecture and so
needs a GPU; NVRTC itself does not.  This module drives NVRTC through
``cuda-bindings`` (with the ``nvidia-cuda-nvrtc`` wheel) so that every CUDA
source shipped with dask_kaas can be checked on a machine without a GPU, and
so that tests can make PTX and cubin images for ``Kernel.cuda_file``.

Where cuda-bindings or its libnvrtc is missing, a worker compiles with
CuPy's own NVRTC wrapper (:class:`CupyNvrtc`) through the same steps: the
same source policy (``cuda_source``), the same image choice, the same
tenant-safe logs.  Every compile goes through :func:`compile_with`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from ..graph.errors import KernelDefinitionError
from ..graph.kernels import Kernel
from .cuda_source import check_source, tenant_log

DEFAULT_ARCH = "90"  # Hopper (H100/H200)


def _nvrtc():  # type: ignore[no-untyped-def]
    try:
        from cuda.bindings import nvrtc
    except Exception as e:  # noqa: BLE001 - ImportError, or a broken install
        raise KernelDefinitionError(
            f"NVRTC is not available ({type(e).__name__}: {e}); "
            "pip install cuda-bindings nvidia-cuda-nvrtc") from None
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
    return compile_with(BINDINGS, source, name, options, arch, output, name_expressions)[0]


class NvrtcApi(Protocol):
    """One way to reach libnvrtc (cuda-bindings, or CuPy's wrapper)."""

    name: str

    def version(self) -> tuple[int, int]: ...

    def archs(self) -> tuple[int, ...]: ...

    def compile(self, source: str, name: str, options: Sequence[str], target: str,
                output: str, name_expressions: Sequence[str]
                ) -> tuple[bytes, dict[str, str]]: ...


def compile_with(api: NvrtcApi, source: str, name: str, options: Sequence[str], arch: str,
                 output: str, name_expressions: Sequence[str] = ()
                 ) -> tuple[bytes, dict[str, str]]:
    """The image and the lowered (mangled) name of each name expression.
    The source and options are checked first (no file of the worker is
    ever read), and a failed compile's log is cut to the tenant's own file."""
    if output not in ("ptx", "cubin"):
        raise KernelDefinitionError(f"unknown NVRTC output {output!r}", kernel=name)
    check_source(source, options, name)
    target = f"compute_{arch}" if output == "ptx" else f"sm_{arch}"
    return api.compile(source, name, options, target, output, name_expressions)


class BindingsNvrtc:
    """NVRTC through cuda-bindings."""

    name = "cuda-bindings"

    def version(self) -> tuple[int, int]:
        nvrtc = _nvrtc()
        try:
            err, major, minor = nvrtc.nvrtcVersion()
        except Exception as e:  # noqa: BLE001 - e.g. DynamicLibNotFoundError: no libnvrtc
            raise KernelDefinitionError(
                f"libnvrtc cannot be loaded through cuda-bindings ({type(e).__name__}: {e})"
            ) from None
        _check(err, "version query", "?")
        return int(major), int(minor)

    def archs(self) -> tuple[int, ...]:
        nvrtc = _nvrtc()
        try:
            err, archs = nvrtc.nvrtcGetSupportedArchs()
        except Exception as e:  # noqa: BLE001 - as in version()
            raise KernelDefinitionError(
                f"libnvrtc cannot be loaded through cuda-bindings ({type(e).__name__}: {e})"
            ) from None
        _check(err, "architecture query", "?")
        return tuple(int(a) for a in archs)

    def compile(self, source: str, name: str, options: Sequence[str], target: str,
                output: str, name_expressions: Sequence[str]
                ) -> tuple[bytes, dict[str, str]]:
        return _compile_bindings(source, name, options, target, output, name_expressions)


def _compile_bindings(source: str, name: str, options: Sequence[str], target: str,
                      output: str, name_expressions: Sequence[str]
                      ) -> tuple[bytes, dict[str, str]]:
    nvrtc = _nvrtc()
    err, prog = nvrtc.nvrtcCreateProgram(source.encode(), f"{name}.cu".encode(), 0, [], [])
    _check(err, "program creation", name)
    try:
        for expr in name_expressions:
            (err,) = nvrtc.nvrtcAddNameExpression(prog, expr.encode())
            _check(err, f"name expression {expr!r}", name)
        opts = [f"--gpu-architecture={target}".encode()] + [o.encode() for o in options]
        (err,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
        if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            _, size = nvrtc.nvrtcGetProgramLogSize(prog)
            log = b" " * size
            nvrtc.nvrtcGetProgramLog(prog, log)
            text = log.rstrip(b"\x00 ").decode(errors="replace")
            _check(err, "compilation", name, tenant_log(text, f"{name}.cu"))
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
        lowered = {}
        for expr in name_expressions:
            err, low = nvrtc.nvrtcGetLoweredName(prog, expr.encode())
            _check(err, f"lowered name of {expr!r}", name)
            lowered[expr] = low.decode() if isinstance(low, bytes) else str(low)
        return (buf.rstrip(b"\x00") if output == "ptx" else buf), lowered
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


# -- which image a worker makes ------------------------------------------------

class CupyNvrtc:
    """NVRTC through CuPy's own wrapper (``cupy.cuda.nvrtc``, i.e.
    ``cupy_backends.cuda.libs.nvrtc``): the fallback where cuda-bindings or
    its libnvrtc is missing.  Its calls raise ``NVRTCError`` on failure;
    ``getPTX``/``getCUBIN`` return bytes without the trailing NUL."""

    name = "cupy"

    def __init__(self, module: Any) -> None:
        self.nv = module

    def version(self) -> tuple[int, int]:
        major, minor = self.nv.getVersion()
        return int(major), int(minor)

    def archs(self) -> tuple[int, ...]:
        return tuple(int(a) for a in self.nv.getSupportedArchs())

    def compile(self, source: str, name: str, options: Sequence[str], target: str,
                output: str, name_expressions: Sequence[str]
                ) -> tuple[bytes, dict[str, str]]:
        nv = self.nv
        prog = nv.createProgram(source, f"{name}.cu", (), ())
        try:
            for expr in name_expressions:
                nv.addNameExpression(prog, expr)
            log = None
            try:
                nv.compileProgram(prog, [f"--gpu-architecture={target}", *options])
            except Exception as e:  # noqa: BLE001 - NVRTCError; the log says why
                try:
                    text = str(nv.getProgramLog(prog))
                except Exception:  # noqa: BLE001
                    text = ""
                log = f"NVRTC compilation failed ({type(e).__name__}: {e}): " \
                      f"{tenant_log(text, f'{name}.cu')}"
            if log is not None:
                raise KernelDefinitionError(log, kernel=name)
            image = bytes(nv.getPTX(prog) if output == "ptx" else nv.getCUBIN(prog))
            lowered = {expr: str(nv.getLoweredName(prog, expr)) for expr in name_expressions}
            return image, lowered
        finally:
            nv.destroyProgram(prog)


BINDINGS = BindingsNvrtc()


def nvrtc_version() -> tuple[int, int]:
    """The (major, minor) CUDA version of the NVRTC library loaded here."""
    return BINDINGS.version()


def supported_archs() -> tuple[int, ...]:
    """The SM architectures this NVRTC can make a cubin for (e.g. 90)."""
    return BINDINGS.archs()


def choose_api(cupy_nvrtc: Any) -> tuple[NvrtcApi | None, tuple[int, int] | None, str]:
    """The NVRTC a worker compiles with: cuda-bindings' where it loads, else
    CuPy's (``cupy_nvrtc``: ``cupy.cuda.nvrtc``, or None).  Returns the API
    (None: no NVRTC at all), its version and a note saying why."""
    try:
        return BINDINGS, BINDINGS.version(), "nvrtc"
    except KernelDefinitionError as e:
        why = e.detail
    if cupy_nvrtc is None:
        return None, None, f"none ({why}; CuPy's NVRTC is not available either)"
    api = CupyNvrtc(cupy_nvrtc)
    try:
        return api, api.version(), f"cupy ({why})"
    except Exception as e:  # noqa: BLE001 - no libnvrtc for CuPy either
        return None, None, f"none ({why}; CuPy's NVRTC: {type(e).__name__}: {e})"


def cuda_version(encoded: int) -> tuple[int, int]:
    """``cudaDriverGetVersion``'s 13000 -> (13, 0)."""
    return int(encoded) // 1000, int(encoded) % 1000 // 10


def choose_image(nvrtc: tuple[int, int], driver: tuple[int, int], arch: int,
                 archs: Sequence[int]) -> tuple[str, int]:
    """The image to compile for a device: ("cubin", arch) or ("ptx", arch).

    A cubin holds machine code for exactly the device's architecture and
    loads on any driver of NVRTC's CUDA major version or newer (CUDA minor
    version compatibility).  PTX is compiled by the driver when the module
    is loaded, and a driver reads only the PTX ISA of its own CUDA version or
    older: NVRTC 13.5's PTX 9.5 fails on a CUDA 13.0 driver with
    CUDA_ERROR_UNSUPPORTED_PTX_VERSION.  So: a cubin where NVRTC knows the
    architecture, else PTX for the newest architecture it knows below the
    device's, and only when NVRTC is no newer than the driver.
    """
    def ver(v: tuple[int, int]) -> str:
        return f"{v[0]}.{v[1]}"

    if nvrtc[0] > driver[0]:
        raise KernelDefinitionError(
            f"NVRTC {ver(nvrtc)} is newer than the driver's CUDA {ver(driver)}: neither its "
            f"cubin nor its PTX loads there; install NVRTC {driver[0]}.x "
            f"(nvidia-cuda-nvrtc=={driver[0]}.*) or a newer driver")
    if arch in archs:
        return "cubin", arch
    older = [a for a in archs if a < arch]
    if older and nvrtc <= driver:
        return "ptx", max(older)
    raise KernelDefinitionError(
        f"NVRTC {ver(nvrtc)} cannot make a cubin for sm_{arch}"
        + (f" and its PTX is newer than the driver's CUDA {ver(driver)}" if older else
           " nor PTX for an older architecture")
        + "; use an NVRTC that knows the device")


def compile_for_device(kernel: Kernel, image: tuple[str, int],
                       api: NvrtcApi | None = None) -> tuple[bytes, str]:
    """Compile a ``Kernel.cuda`` into the image :func:`choose_image` chose;
    returns the image and the name of the function to load from it."""
    output, arch = image
    binary, lowered = compile_with(api or BINDINGS, kernel.source or "", kernel.name,
                                   kernel.options, str(arch), output, kernel.name_expressions)
    return binary, lowered.get(kernel.name, kernel.name)


def check_kernel(kernel: Kernel, arch: str = DEFAULT_ARCH) -> bytes:
    """Compile a ``Kernel.cuda`` as a worker would; returns its PTX."""
    if kernel.kind != Kernel.CUDA:
        raise KernelDefinitionError("only Kernel.cuda sources are compiled", kernel=kernel.name)
    return compile_source(kernel.source or "", kernel.name, kernel.options, arch,
                          name_expressions=kernel.name_expressions)
