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

from dask_kaas.device.nvrtc import check_kernel, compile_source  # noqa: E402


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
