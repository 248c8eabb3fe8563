"""Every CUDA source shipped with dask_kaas (package and examples) compiles.

NVRTC needs no GPU, so this runs everywhere: a syntax error in a kernel
cannot land.
"""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import dask_kaas.workloads
from dask_kaas import Kernel, KernelDefinitionError

pytest.importorskip("cuda.bindings.nvrtc", reason="cuda-bindings is part of the test extra")

from dask_kaas.device.nvrtc import (  # noqa: E402
    check_kernel,
    choose_image,
    compile_for_device,
    compile_source,
    nvrtc_version,
    supported_archs,
)


def shipped_cuda_kernels() -> list[tuple[str, Kernel]]:
    found = []
    mods = [importlib.import_module(f"dask_kaas.workloads.{m.name}")
            for m in pkgutil.iter_modules(dask_kaas.workloads.__path__)]
    for name in ("jacobi", "sgemm_chain", "mlp_inference"):  # examples/ (on sys.path)
        mods.append(importlib.import_module(name))
    seen = set()
    for mod in mods:
        for attr, value in vars(mod).items():
            if isinstance(value, Kernel) and value.kind == Kernel.CUDA and id(value) not in seen:
                seen.add(id(value))
                found.append((f"{mod.__name__}.{attr}", value))
    return found


KERNELS = shipped_cuda_kernels()


def test_the_package_ships_cuda_kernels():
    assert {k.name for _, k in KERNELS} >= {"jacobi_step", "sgemm"}


@pytest.mark.parametrize("arch", ["80", "90"])
@pytest.mark.parametrize("where,kernel", KERNELS, ids=[w for w, _ in KERNELS])
def test_shipped_kernel_compiles_with_nvrtc(where, kernel, arch):
    ptx = check_kernel(kernel, arch=arch)
    assert f".target sm_{arch}".encode() in ptx
    assert f".entry {kernel.name}".encode() in ptx  # extern "C": the name is not mangled


def test_a_syntax_error_is_reported_with_the_compiler_log():
    bad = Kernel.cuda('extern "C" __global__ void broken(float* x) { x[0] = ; }', "broken")
    with pytest.raises(KernelDefinitionError, match="kernel 'broken'.*compilation.*expected"):
        check_kernel(bad)


def test_cubin_and_template_name_expressions():
    src = "template<typename T> __global__ void scale(T* x, T a) { x[threadIdx.x] *= a; }"
    cubin = compile_source(src, "scale<float>", output="cubin",
                           name_expressions=["scale<float>"])
    assert cubin[:4] == b"\x7fELF"


def test_this_nvrtc_on_an_older_driver_of_its_major_version_makes_a_loadable_cubin():
    """The case that failed: NVRTC 13.5's PTX (ISA 9.5) on a CUDA 13.0 driver."""
    from dask_kaas.workloads.sgemm import sgemm

    nvrtc = nvrtc_version()
    archs = supported_archs()
    image = choose_image(nvrtc, (nvrtc[0], 0), 90, archs)
    assert image == ("cubin", 90)
    binary, function = compile_for_device(sgemm, image)
    assert binary[:4] == b"\x7fELF" and function == "sgemm"


def test_template_kernels_load_by_their_lowered_name():
    k = Kernel.cuda("template<typename T> __global__ void scale(T* x, T a) "
                    "{ x[threadIdx.x] *= a; }", "scale<double>",
                    name_expressions=["scale<float>", "scale<double>"])
    binary, function = compile_for_device(k, ("cubin", 80))
    assert function == "_Z5scaleIdEvPT_S0_" and function.encode() in binary
    ptx, function = compile_for_device(k, ("ptx", 80))
    assert f".entry {function}".encode() in ptx and b".target sm_80" in ptx


def test_an_unknown_output_kind_is_refused():
    with pytest.raises(KernelDefinitionError, match="unknown NVRTC output 'fatbin'"):
        compile_source("__global__ void f() {}", "f", output="fatbin")
