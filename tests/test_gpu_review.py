"""The GPU path's decisions, tested without a GPU (issue 17; issue 16 items 4, 10).

Each test runs the real code that makes the decision: the source policy in
front of NVRTC (and NVRTC itself, which needs no GPU), the kernel cache with
a loader whose modules count their unloads, the NVRTC choice with
cuda-bindings' library made unloadable, a kernel error unpickled in a
process where CuPy cannot be imported, the pool sizing numbers, the
runtime's fault, out-of-memory and deadline handling on the CPU backend.
What needs a device is in test_gpu.py.
"""

from __future__ import annotations

import gc
import pickle
import subprocess
import sys
import textwrap
import threading
import time
import types
import weakref

import dask
import numpy as np
import pytest

from dask_kaas import (
    DeviceFaultError,
    DeviceOutOfMemoryError,
    InOut,
    KaasError,
    Kernel,
    KernelDefinitionError,
    KernelExecutionError,
    KernelGraph,
    Out,
    RequestTimeoutError,
)
from dask_kaas.device.cpu import CpuBackend
from dask_kaas.device.cuda_source import (
    MAX_LOG_CHARS,
    option_problem,
    source_problem,
    tenant_log,
)
from dask_kaas.device.kernel_cache import KernelCache
from dask_kaas.device.runtime import Identities, WorkerRuntime
from dask_kaas.graph.errors import LiteralTypeError
from dask_kaas.request import GraphRequest, InputRef

GIB, MIB = 2**30, 2**20
KERNEL = 'extern "C" __global__ void k(float* y) { y[threadIdx.x] = 1.0f; }\n'
X = np.arange(4, dtype=np.float32)


def double(xp, x, y):
    y[...] = 2 * x


def one_kernel_graph(fn, name="g1", n_iter=1):
    g = KernelGraph(name, n_iter=n_iter)
    x = g.input("x", (4,), np.float32)
    y = g.output("y", (4,), np.float32)
    g.launch(Kernel.array(fn, name="k"), [x, Out(y)])
    return g


def run(rt, graph, key, wid=None, timeout=None, keep=None):
    req = GraphRequest(key, graph.name, "t", [InputRef("x", 16, None)])
    ids = Identities([wid], keep or {})
    return rt.run(graph, req, [X], ids, timeout=timeout)


# -- item 1: what a tenant's CUDA source may ask of the compiler -----------------

FILE_READS = [
    '#include "/etc/passwd"\n',
    "#include </etc/passwd>\n",
    '  #   include "secret.txt"\n',
    '%:include "/etc/passwd"\n',                   # digraph
    '??=include "/etc/passwd"\n',                  # trigraph (C++11 mode)
    '#/* a comment */include "/etc/passwd"\n',
    '#/* a comment\n spanning lines */ include "/etc/passwd"\n',
    '#inc\\\nlude "/etc/passwd"\n',                # line splice
    '#inc??/\nlude "/etc/passwd"\n',               # splice spelled as a trigraph
    '#\tinclude FILE\n',                           # computed include
    '#include_next <x.h>\n',
    '#import "/etc/passwd"\n',
    '#embed "/etc/passwd"\n',
    '#if __has_include("/etc/shadow")\n#endif\n',
    '#INCLUDE "/etc/passwd"\n',
    '#in\\u0063lude "/etc/passwd"\n',
    "// #include in a comment is refused too (no guessing what is code)\n",
]


@pytest.mark.parametrize("prefix", FILE_READS, ids=repr)
def test_every_spelling_of_a_file_read_is_refused(prefix):
    src = prefix + KERNEL
    assert source_problem(src) is not None
    with pytest.raises(KernelDefinitionError, match="refused"):
        Kernel.cuda(src, "k")


def _finishes(fn, *args, within=60.0):
    """Run ``fn`` in a thread; whether it returned within a generous bound
    (a quadratic scan of these inputs would take hours)."""
    done = []
    t = threading.Thread(target=lambda: done.append(fn(*args)), daemon=True)
    t.start()
    t.join(within)
    return bool(done)


@pytest.mark.parametrize("make", [
    lambda n: "#/*" * n,
    lambda n: "# /*#*/ " * n + "include",
    lambda n: "??=" * n,
    lambda n: "#" + " " * (3 * n),
    lambda n: "/*" + "#" * n,
    lambda n: "\\\n" * n,
], ids=["open-comments", "nested-introducers", "trigraphs", "blanks", "hashes", "splices"])
def test_the_source_check_is_linear_on_hostile_sources(make):
    src = make(400_000)
    assert _finishes(source_problem, src)
    assert _finishes(tenant_log, src, "k.cu")


def test_ordinary_directives_and_the_word_include_are_fine():
    src = ("#define N 4\n#pragma unroll\n#if N > 2\n#endif\n"
           '// this kernel needs no includes\nconst char* s = "include";\n' + KERNEL)
    assert source_problem(src) is None
    Kernel.cuda(src, "k")


@pytest.mark.parametrize("option", [
    "-I/etc", "--include-path=/", "-isystem/etc", "--pre-include=/etc/passwd", "-include",
    "/etc/passwd", "--create-pch=/tmp/x.pch", "--use-pch=/tmp/x.pch", "--pch-dir=/tmp",
    "--fdevice-time-trace=/tmp/trace.json", "-time=/tmp/t.csv", "-arch=sm_50",
    "--gpu-architecture=compute_50", "-std=c++03", "-DX\n#include <y>", "-Dx=\x00",
    "--maxrregcount=99999", "-Xptxas", "", "-", "\udcff",
], ids=repr)
def test_options_outside_the_allowlist_are_refused(option):
    assert option_problem(option) is not None
    with pytest.raises(KernelDefinitionError, match="not allowed|valid Unicode"):
        Kernel.cuda(KERNEL, "k", options=[option])


@pytest.mark.parametrize("option", ["-DN=4", "--define-macro=TILE=16", "-UX", "-std=c++17",
                                    "--std=c++20", "--use_fast_math", "--maxrregcount=64",
                                    "-lineinfo", "--ftz=true", "--fmad=false"])
def test_common_options_are_allowed(option):
    assert option_problem(option) is None


def test_a_graph_document_with_an_include_is_refused_when_read():
    with pytest.raises(KaasError, match="refused"):
        Kernel.from_dict({"kind": "cuda", "name": "k",
                          "source": '#include "/etc/passwd"\n' + KERNEL})


def test_a_kernel_that_skipped_the_constructor_is_refused_by_the_compiler():
    """A pickled Kernel is never built through Kernel.cuda: the worker's
    compile step checks again."""
    from dask_kaas.device.nvrtc import compile_for_device

    forged = Kernel(Kernel.CUDA, "k", source='#include "/etc/passwd"\n' + KERNEL)
    forged = pickle.loads(pickle.dumps(forged))
    with pytest.raises(KernelDefinitionError, match="refused"):
        compile_for_device(forged, ("ptx", 90))
    bad_option = Kernel(Kernel.CUDA, "k", source=KERNEL, options=("-I/etc",))
    with pytest.raises(KernelDefinitionError, match="not allowed"):
        compile_for_device(bad_option, ("ptx", 90))


def test_nvrtc_reads_an_included_file_and_the_policy_and_log_filter_stop_it(tmp_path):
    """The threat is real on this NVRTC: compiled raw, the log quotes the
    file.  Through dask_kaas the source is refused before NVRTC, and the
    log filter alone would also drop the other file's lines."""
    pytest.importorskip("cuda.bindings.nvrtc")
    from cuda.bindings import nvrtc

    from dask_kaas.device.nvrtc import compile_source

    secret = tmp_path / "secret.txt"
    secret.write_text("TOPSECRET_4242 = 1;\n")
    src = f'#include "{secret}"\n' + KERNEL
    err, prog = nvrtc.nvrtcCreateProgram(src.encode(), b"k.cu", 0, [], [])
    try:
        (err,) = nvrtc.nvrtcCompileProgram(prog, 1, [b"--gpu-architecture=compute_90"])
        assert err != nvrtc.nvrtcResult.NVRTC_SUCCESS
        _, size = nvrtc.nvrtcGetProgramLogSize(prog)
        raw = b" " * size
        nvrtc.nvrtcGetProgramLog(prog, raw)
    finally:
        nvrtc.nvrtcDestroyProgram(prog)
    raw_log = raw.decode(errors="replace")
    assert "TOPSECRET_4242" in raw_log  # what a tenant read before
    assert "TOPSECRET_4242" not in tenant_log(raw_log, "k.cu")
    with pytest.raises(KernelDefinitionError) as info:
        compile_source(src, "k")
    assert "TOPSECRET" not in str(info.value) and "refused" in str(info.value)


def test_a_compile_error_in_the_tenants_own_source_is_still_explained():
    pytest.importorskip("cuda.bindings.nvrtc")
    from dask_kaas.device.nvrtc import compile_source

    with pytest.raises(KernelDefinitionError, match=r"k\.cu\(1\).*undefined_thing"):
        compile_source('extern "C" __global__ void k() { undefined_thing(); }', "k")


def test_compiler_logs_are_cut_to_the_tenants_file_and_a_bounded_size():
    log = ("k.cu(3): error: bad\n    x = 1;\n    ^\n\n"
           "/srv/worker/secret.h(1): error: identifier \"HUNTER2\" is undefined\n"
           "    HUNTER2 = 1;\n\n"
           '2 errors detected in the compilation of "/tmp/kaas/k.cu".\n')
    out = tenant_log(log, "k.cu")
    assert "k.cu(3): error: bad" in out and "x = 1;" in out
    assert "HUNTER2" not in out and "/srv" not in out and "/tmp/kaas" not in out
    assert "left out" in out
    huge = "\n".join(f"k.cu({i}): error: {'x' * 200}" for i in range(1000))
    assert len(tenant_log(huge, "k.cu")) <= MAX_LOG_CHARS + 100
    assert tenant_log("k.cu(1): \x00error", "k.cu") == "k.cu(1): error"


# -- item 2: a kernel's key is computed once ----------------------------------------

def test_a_kernels_key_is_computed_once_and_never_travels(monkeypatch):
    import hashlib

    k = Kernel.cuda(KERNEL, "k")
    monkeypatch.setattr(hashlib, "sha256", lambda *a: pytest.fail("hashed on a launch"))
    key = k.cache_key()
    assert k.cache_key() is key  # the same tuple: nothing recomputed
    state = k.__getstate__()
    assert "_key" not in state
    k2 = pickle.loads(pickle.dumps(k))
    assert k2._key is None and k2.cache_key() == key and k2 == k
    assert Kernel.cuda(KERNEL + "// v2\n", "k").cache_key() != key
    assert Kernel.cuda(KERNEL, "k", options=["-DN=1"]).cache_key() != key


def test_a_forged_key_in_a_pickle_is_ignored():
    k = Kernel.cuda(KERNEL, "k")
    other = Kernel.cuda(KERNEL.replace("1.0f", "2.0f"), "k")
    state = k.__getstate__()
    state["_key"] = other.cache_key()  # claim to be the other tenant's kernel
    forged = Kernel.__new__(Kernel)
    forged.__setstate__(state)
    assert forged.cache_key() == k.cache_key() != other.cache_key()


def test_equal_kernels_from_separate_requests_compile_once():
    compiled = []

    class Counting(CpuBackend):
        def compile(self, kernel):
            compiled.append(kernel.name)
            return super().compile(kernel)

    cache = KernelCache(Counting())
    for _ in range(3):
        k = pickle.loads(pickle.dumps(Kernel.library("relu")))
        cache.get(k)
    assert compiled == ["relu"] and cache.hits == 2


# -- item 3: a module per compiled kernel, unloaded on eviction ---------------------

class FakeModule:
    """Counts loads and unloads as cupy.cuda.function.Module would do them."""

    loaded: set = set()
    unloads: list = []

    def __init__(self):
        self.ptr = None

    def load(self, image):
        assert isinstance(image, bytes)
        if image.startswith(b"BAD"):
            raise FakeDriverError(218, "CUDA_ERROR_INVALID_PTX")
        if image.startswith(b"OOM"):
            raise FakeDriverError(2, "CUDA_ERROR_OUT_OF_MEMORY")
        if image.startswith(b"STICKY"):
            raise FakeDriverError(700, "CUDA_ERROR_ILLEGAL_ADDRESS")
        self.ptr = image
        FakeModule.loaded.add(id(self))

    def get_function(self, name):
        return FakeFunction(self, name)

    def __del__(self):
        if self.ptr is not None:
            FakeModule.loaded.discard(id(self))
            FakeModule.unloads.append(self.ptr)


class FakeFunction:
    shared_size_bytes = 0

    def __init__(self, module, name):
        self.module, self.name = module, name
        self.calls = 0

    def __call__(self, grid, block, args, shared_mem=0, stream=None):
        assert id(self.module) in FakeModule.loaded  # never launched from an unloaded one
        self.calls += 1


class FakeDriverError(RuntimeError):
    def __init__(self, status, text):
        super().__init__(text)
        self.status = status


def fake_cupy():
    cuda = types.SimpleNamespace(function=types.SimpleNamespace(Module=FakeModule),
                                 driver=types.SimpleNamespace(CUDADriverError=FakeDriverError))
    return types.SimpleNamespace(cuda=cuda)  # no RawModule: CuPy's memoized path is not used


def fake_kernels(api=None, image=("cubin", 90)):
    from dask_kaas.device.cuda_kernels import CudaKernels
    from dask_kaas.device.faults import is_sticky_fault

    return CudaKernels(fake_cupy(), api, image, None, "test", 227 * 1024,
                       lambda e: is_sticky_fault(e, (FakeDriverError,)))


class FakeCudaBackend(CpuBackend):
    name = "fake-cuda"

    def __init__(self, **kw):
        super().__init__(**kw)
        self.kernels = fake_kernels()

    def compile(self, kernel):
        if kernel.kind == Kernel.CUDA_FILE:
            return self.kernels.compile(kernel)
        return super().compile(kernel)

    def is_fatal(self, exc):
        return self.kernels.is_fatal(exc)


def image_kernel(tag: str) -> Kernel:
    return Kernel(Kernel.CUDA_FILE, "k", image=f"IMAGE-{tag}".encode(), image_format="cubin")


def test_evicting_a_kernel_unloads_its_module():
    FakeModule.unloads.clear()
    cache = KernelCache(FakeCudaBackend(), max_entries=2)
    first = weakref.ref(cache.get(image_kernel("a")))
    cache.get(image_kernel("b"))
    assert FakeModule.unloads == []
    cache.get(image_kernel("c"))  # a leaves the cache
    gc.collect()
    assert first() is None and FakeModule.unloads == [b"IMAGE-a"]
    assert len(cache) == 2 and cache.evictions == 1
    for tag in "defgh":  # a tenant varying its source: modules stay bounded
        cache.get(image_kernel(tag))
    gc.collect()
    assert len(FakeModule.loaded) <= 2 + 1 and len(FakeModule.unloads) == 6


def test_a_running_graph_keeps_an_evicted_module_loaded_until_its_stream_is_done():
    """One kernel cache entry, a graph with two kernels: compiling the second
    evicts the first, but the graph holds both launchers until it has
    synchronized, so the first still launches from a loaded module."""
    FakeModule.unloads.clear()
    rt = WorkerRuntime(FakeCudaBackend(), 10_000)
    rt.kernels = KernelCache(rt.backend, max_entries=1)
    g = KernelGraph("two")
    y = g.output("y", (4,), np.float32)
    g.launch(image_kernel("one"), [InOut(y)], grid=1, block=1)
    g.launch(image_kernel("two"), [InOut(y)], grid=1, block=1)
    req = GraphRequest("r", "two", "t", [])
    rt.run(g, req, [], Identities([]))  # FakeFunction asserts its module is loaded
    gc.collect()
    assert FakeModule.unloads == [b"IMAGE-one"]
    assert len(rt.kernels) == 1


def test_image_load_failures_are_told_apart():
    from dask_kaas.device import oom

    kernels = fake_kernels()
    with pytest.raises(KernelDefinitionError, match="cannot load cubin image.*INVALID_PTX"):
        kernels.load(b"BAD", "cubin", "k", "k")
    with pytest.raises(FakeDriverError) as info:  # module data did not fit: evict and retry
        kernels.load(b"OOM", "cubin", "k", "k")
    assert oom.is_marked(info.value)
    with pytest.raises(FakeDriverError, match="ILLEGAL_ADDRESS"):  # the device: not the image
        kernels.load(b"STICKY", "cubin", "k", "k")


def test_each_launcher_keeps_its_own_shared_memory_state():
    from dask_kaas.device.cuda_kernels import ModuleLauncher
    from dask_kaas.graph.launch import Launch

    class Fn(FakeFunction):
        max_dynamic_shared_size_bytes = 0

    mods = [FakeModule(), FakeModule()]
    for m in mods:
        m.load(b"IMAGE")
    a = ModuleLauncher(mods[0], Fn(mods[0], "k"), 227 * 1024)
    b = ModuleLauncher(mods[1], Fn(mods[1], "k"), 227 * 1024)
    k = image_kernel("s")
    a(Launch(k, (), (1, 1, 1), (1, 1, 1), 100 * 1024), [], None)
    assert a.function.max_dynamic_shared_size_bytes == 100 * 1024
    assert b.state["allowed"] is None and b.function.max_dynamic_shared_size_bytes == 0


# -- item 4: no libnvrtc --------------------------------------------------------------

class DynamicLibNotFoundError(RuntimeError):
    """What cuda-pathfinder raises when libnvrtc cannot be found."""


class CupyLikeNvrtc:
    """CuPy's NVRTC wrapper (``cupy.cuda.nvrtc``) as CuPy 14 defines it, on
    top of cuda-bindings: str sources and options, NVRTCError on failure,
    bytes images without the trailing NUL."""

    class NVRTCError(RuntimeError):
        pass

    def __init__(self):
        from cuda.bindings import nvrtc

        self.nv = nvrtc

    def _ok(self, err):
        if err != self.nv.nvrtcResult.NVRTC_SUCCESS:
            raise self.NVRTCError(str(err))

    def getVersion(self):  # noqa: N802 - CuPy's names
        err, major, minor = self.nv.nvrtcVersion()
        self._ok(err)
        return major, minor

    def getSupportedArchs(self):  # noqa: N802
        err, archs = self.nv.nvrtcGetSupportedArchs()
        self._ok(err)
        return tuple(archs)

    def createProgram(self, src, name, headers, include_names):  # noqa: N802
        assert isinstance(src, str) and not headers and not include_names
        err, prog = self.nv.nvrtcCreateProgram(src.encode(), name.encode(), 0, [], [])
        self._ok(err)
        return prog

    def addNameExpression(self, prog, name):  # noqa: N802
        self._ok(self.nv.nvrtcAddNameExpression(prog, name.encode())[0])

    def compileProgram(self, prog, options):  # noqa: N802
        opts = [o.encode() for o in options]
        self._ok(self.nv.nvrtcCompileProgram(prog, len(opts), opts)[0])

    def getProgramLog(self, prog):  # noqa: N802
        _, size = self.nv.nvrtcGetProgramLogSize(prog)
        buf = b" " * size
        self.nv.nvrtcGetProgramLog(prog, buf)
        return buf.rstrip(b"\x00").decode()

    def getPTX(self, prog):  # noqa: N802
        _, size = self.nv.nvrtcGetPTXSize(prog)
        buf = b" " * size
        self.nv.nvrtcGetPTX(prog, buf)
        return buf[:-1]

    def getCUBIN(self, prog):  # noqa: N802
        _, size = self.nv.nvrtcGetCUBINSize(prog)
        buf = b" " * size
        self.nv.nvrtcGetCUBIN(prog, buf)
        return buf[:-1]

    def getLoweredName(self, prog, name):  # noqa: N802
        err, low = self.nv.nvrtcGetLoweredName(prog, name.encode())
        self._ok(err)
        return low.decode()

    def destroyProgram(self, prog):  # noqa: N802
        self.nv.nvrtcDestroyProgram(prog)


@pytest.fixture
def no_libnvrtc(monkeypatch):
    pytest.importorskip("cuda.bindings.nvrtc")
    from cuda.bindings import nvrtc

    def missing(*_):
        raise DynamicLibNotFoundError("Failure finding libnvrtc.so: no such file")

    monkeypatch.setattr(nvrtc, "nvrtcVersion", missing)
    monkeypatch.setattr(nvrtc, "nvrtcGetSupportedArchs", missing)


def test_without_libnvrtc_the_worker_uses_cupys_nvrtc_and_says_why(no_libnvrtc):
    from dask_kaas.device.nvrtc import CupyNvrtc, choose_api

    api, version, note = choose_api(CupyLikeNvrtcOverRealLib())
    assert isinstance(api, CupyNvrtc) and version[0] >= 12
    assert note.startswith("cupy (") and "DynamicLibNotFoundError" in note
    api, version, note = choose_api(None)
    assert api is None and version is None
    assert note.startswith("none (") and "libnvrtc" in note


class CupyLikeNvrtcOverRealLib(CupyLikeNvrtc):
    """The fallback reaches libnvrtc its own way (as CuPy does) even though
    cuda-bindings' nvrtcVersion is broken by the fixture."""

    def getVersion(self):  # noqa: N802
        return 13, 0


def test_cupys_nvrtc_compiles_through_the_same_policy_and_choice():
    pytest.importorskip("cuda.bindings.nvrtc")
    from dask_kaas.device.nvrtc import CupyNvrtc, compile_for_device

    api = CupyNvrtc(CupyLikeNvrtc())
    tmpl = Kernel.cuda("template <typename T> __global__ void fill(T* y) { y[0] = T(1); }",
                       "fill<float>", name_expressions=["fill<float>"])
    ptx, fn = compile_for_device(tmpl, ("ptx", 90), api)
    assert b".entry" in ptx and fn.startswith("_Z") and fn.encode() in ptx
    cubin, _ = compile_for_device(Kernel.cuda(KERNEL, "k"), ("cubin", 90), api)
    assert cubin[:4] == b"\x7fELF"
    with pytest.raises(KernelDefinitionError, match=r"k\.cu\(1\).*nothing_here"):
        compile_for_device(Kernel.cuda('extern "C" __global__ void k() { nothing_here(); }',
                                       "k"), ("ptx", 90), api)
    forged = Kernel(Kernel.CUDA, "k", source='#include "/etc/passwd"\n' + KERNEL)
    with pytest.raises(KernelDefinitionError, match="refused"):
        compile_for_device(forged, ("ptx", 90), api)


def test_a_cuda_backend_without_any_nvrtc_still_starts_and_refuses_sources(no_libnvrtc):
    """CudaBackend._choose_compiler with NVRTC missing everywhere: no
    exception (the worker starts), and CUDA sources fail saying why."""
    from dask_kaas.device.cuda import CudaBackend

    be = CudaBackend.__new__(CudaBackend)
    cupy = fake_cupy()
    cupy.cuda.runtime = types.SimpleNamespace(CUDARuntimeError=FakeDriverError)

    class BrokenNvrtc:
        def getVersion(self):  # noqa: N802
            raise OSError("libnvrtc.so.13: cannot open shared object file")

    cupy.cuda.nvrtc = BrokenNvrtc()
    be.cupy, be.driver_version, be.arch, be.shared_mem_optin = cupy, (13, 0), 90, 227 * 1024
    be._choose_compiler()
    assert be.kernel_compiler.startswith("none (") and "cannot open shared object" in \
        be.kernel_compiler
    with pytest.raises(KernelDefinitionError, match="no NVRTC on this worker.*DynamicLib"):
        be.compile(Kernel.cuda(KERNEL, "k"))
    be.compile(image_kernel("still loads"))  # PTX/cubin files need no NVRTC


# -- item 5: errors that unpickle where CuPy is missing -------------------------------

FAKE_CUPY = '''
class CUDADriverError(RuntimeError):
    """Like CuPy's: unpickling it needs the driver."""
    def __init__(self, status):
        self.status = status
        super().__init__(f"CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES: status {status}")
    def __reduce__(self):
        return (_needs_the_driver, (self.status,))

def _needs_the_driver(status):
    return CUDADriverError(status)
'''


@pytest.fixture
def fake_cupy_backends(tmp_path, monkeypatch):
    pkg = tmp_path / "cupy_backends" / "cuda" / "api"
    pkg.mkdir(parents=True)
    for d in (tmp_path / "cupy_backends", tmp_path / "cupy_backends" / "cuda", pkg):
        (d / "__init__.py").write_text("")
    (pkg / "driver.py").write_text(FAKE_CUPY)
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    mod = importlib.import_module("cupy_backends.cuda.api.driver")
    yield mod
    for name in [m for m in sys.modules if m.startswith("cupy_backends")]:
        del sys.modules[name]


def unpickle_without_cupy(blob: bytes) -> str:
    code = textwrap.dedent("""
        import sys
        sys.modules["cupy"] = sys.modules["cupy_backends"] = None  # not importable
        from distributed.protocol import pickle
        e = pickle.loads(sys.stdin.buffer.read())
        chain, c = [], e
        while c is not None:
            chain.append(f"{type(c).__name__}: {c}")
            c = c.__cause__
        print(" <- ".join(chain))
    """)
    out = subprocess.run([sys.executable, "-c", code], input=blob, capture_output=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr.decode()
    return out.stdout.decode().strip()


def dask_blob(exc: BaseException) -> bytes:
    """The error as Dask ships a task's error (tblib for tracebacks)."""
    import tblib.pickling_support
    from distributed.core import collect_causes
    from distributed.protocol import pickle as dpickle

    tblib.pickling_support.install(exc, *collect_causes(exc))
    return dpickle.dumps(exc)


def test_a_cupy_error_raised_by_a_kernel_travels_as_a_stand_in(fake_cupy_backends):
    err_type = fake_cupy_backends.CUDADriverError

    def launches_badly(xp, x, y):
        raise err_type(701)

    rt = WorkerRuntime(CpuBackend(), 10_000)
    with pytest.raises(KernelExecutionError) as info:
        run(rt, one_kernel_graph(launches_badly), "r")
    cause = info.value.__cause__
    assert type(cause).__name__ == "UserCodeError" and "CUDADriverError" in str(cause)
    assert cause.__traceback__ is not None  # the kernel's frames still ride along
    shown = unpickle_without_cupy(dask_blob(info.value))
    assert shown.startswith("KernelExecutionError: graph 'g1'")
    assert "UserCodeError: CUDADriverError: CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES" in shown


def test_a_cupy_error_deep_in_a_chain_is_replaced_link_by_link(fake_cupy_backends):
    err_type = fake_cupy_backends.CUDADriverError

    def wraps(xp, x, y):
        try:
            raise err_type(719)
        except err_type as e:
            raise ValueError("my kernel gave up") from e

    rt = WorkerRuntime(CpuBackend(), 10_000)
    with pytest.raises(KernelExecutionError) as info:
        run(rt, one_kernel_graph(wraps), "r")
    shown = unpickle_without_cupy(dask_blob(info.value))
    assert "UserCodeError: ValueError: my kernel gave up <- UserCodeError: CUDADriverError" \
        in shown


def test_a_compile_error_from_cupy_travels_as_a_stand_in(fake_cupy_backends):
    err_type = fake_cupy_backends.CUDADriverError

    class FailsToCompile(CpuBackend):
        def compile(self, kernel):
            raise err_type(218)

    with pytest.raises(KernelDefinitionError) as info:
        KernelCache(FailsToCompile()).get(Kernel.library("relu"))
    assert type(info.value.__cause__).__name__ == "UserCodeError"
    assert "KernelDefinitionError" in unpickle_without_cupy(dask_blob(info.value))


def test_a_cycle_in_a_cause_chain_ends():
    from dask_kaas.device.user_errors import _chain

    a, b = ValueError("a"), ValueError("b")
    a.__cause__, b.__cause__ = b, a
    assert len(_chain(a)) == 2


# -- item 6: the size of a kept output, clearing off the loop ---------------------------

def test_a_kept_handle_reports_the_size_it_carries():
    from dask.sizeof import sizeof
    from distributed.comm.utils import OFFLOAD_THRESHOLD

    from dask_kaas.device.handles import DeviceArray

    small = DeviceArray("b1", (4096,), np.float32)
    assert sizeof(small) >= 16384
    big = DeviceArray("b2", (4096, 4096), np.float32)  # 64 MiB: serialized in a thread
    assert sizeof(big) > OFFLOAD_THRESHOLD and sizeof(big) >= 64 * MIB


def kept_runtime(backend):
    rt = WorkerRuntime(backend, 10_000)
    g = one_kernel_graph(double, "keeper")
    outs, _ = run(rt, g, "r", keep={"y": "kept-1"})
    return rt, outs["y"]


class WatchedBackend(CpuBackend):
    """Records, for each copy to the host, the thread and whether the cache
    lock was held."""

    def __init__(self):
        super().__init__()
        self.copies = []
        self.cache = None

    def to_host(self, dev, stream):
        held = self.cache._cond._is_owned() if self.cache is not None else None
        self.copies.append((threading.current_thread().name, held))
        return super().to_host(dev, stream)


def test_clear_writes_kept_outputs_back_outside_the_cache_lock():
    be = WatchedBackend()
    rt, handle = kept_runtime(be)
    be.cache = rt.cache
    rt.cache.clear()
    assert be.copies and all(held is False for _, held in be.copies), be.copies
    assert "kept-1" not in rt.cache and rt.cache.used_bytes == 0
    np.testing.assert_array_equal(np.asarray(handle), 2 * X)  # the data survived


def test_the_clear_handler_runs_the_clear_in_a_thread():
    import asyncio

    from dask_kaas.plugin.worker import KaasWorkerPlugin

    be = WatchedBackend()
    rt, handle = kept_runtime(be)
    plugin = KaasWorkerPlugin(backend="cpu")
    plugin.runtime = rt
    loop_thread = []

    async def main():
        loop_thread.append(threading.current_thread().name)
        return await plugin.handle_clear()

    assert asyncio.run(main()) == 0
    assert be.copies and all(name != loop_thread[0] for name, _ in be.copies)
    np.testing.assert_array_equal(np.asarray(handle), 2 * X)


# -- item 7: the pool leaves a reserve and shares the device --------------------------

def test_the_pool_leaves_a_reserve_outside_it():
    from dask_kaas.device.sizing import Headroom, size_device_memory

    room = Headroom(0.05, 256 * MIB)
    s = size_device_memory(80 * GIB, 10 * GIB, pool="20GiB", headroom=room, reserve=2 * GIB)
    assert s.pool_bytes == 8 * GIB and s.reserve_bytes == 2 * GIB  # never all that is free
    s = size_device_memory(80 * GIB, 79 * GIB, pool="20GiB", headroom=room, reserve=2 * GIB)
    assert s.pool_bytes == 20 * GIB  # room enough: as asked


def test_workers_sharing_a_device_divide_it():
    from dask_kaas.device.sizing import Headroom, size_device_memory

    room = Headroom(0.05, 256 * MIB)
    total = 80 * GIB
    # Two workers starting at once see the same free memory.
    a = size_device_memory(total, 79 * GIB, headroom=room, reserve=GIB, workers_per_device=2)
    assert a.pool_bytes == (total - 2 * GIB) // 2
    assert 2 * a.pool_bytes + 2 * GIB <= total
    # The second to start sees what the first left, and still gets its share.
    b = size_device_memory(total, total - a.pool_bytes - GIB // 2, headroom=room,
                           reserve=GIB, workers_per_device=2)
    assert b.pool_bytes <= a.pool_bytes and b.pool_bytes >= a.pool_bytes - GIB
    with dask.config.set({"kaas.workers-per-device": 4, "kaas.device-memory-reserve": "1GiB"}):
        c = size_device_memory(total, 79 * GIB, headroom=room)
    assert c.workers_per_device == 4 and c.pool_bytes == (total - 4 * GIB) // 4 // 256 * 256


@pytest.mark.parametrize("bad", [-1, True, 2**51, "lots", [1], 1.5], ids=repr)
def test_bad_reserve_settings_are_refused(bad):
    from dask_kaas.device.sizing import reserve_from_config

    with pytest.raises(KaasError, match="device-memory-reserve"):
        reserve_from_config(bad)


@pytest.mark.parametrize("bad", [0, -2, True, 10**9, "two", 2.0, [2]], ids=repr)
def test_bad_workers_per_device_settings_are_refused(bad):
    from dask_kaas.device.sizing import size_device_memory, workers_per_device_from_config

    with pytest.raises(KaasError, match="workers-per-device"):
        workers_per_device_from_config(bad)
    with dask.config.set({"kaas.workers-per-device": bad}), \
            pytest.raises(KaasError, match="workers-per-device"):
        size_device_memory(80 * GIB, 79 * GIB)


# -- item 8: literals with no CUDA type ------------------------------------------------

@pytest.mark.parametrize("value", [np.longdouble(1.5), np.clongdouble(1 + 2j)], ids=repr)
def test_long_double_literals_are_refused_at_declaration(value):
    if np.dtype(type(value)).itemsize <= (8 if np.dtype(type(value)).kind == "f" else 16):
        pytest.skip("long double is double on this platform")
    g = KernelGraph("lit")
    y = g.output("y", (4,), np.float64)
    with pytest.raises(LiteralTypeError, match="no CUDA type"):
        g.launch(Kernel.cuda('extern "C" __global__ void k(double* y, double a) {}', "k"),
                 [InOut(y), value], grid=1, block=1)
    assert g.launches == []


SCALED: list = []


def scale(xp, x, y, a):
    SCALED.append(a)
    y[...] = x * a


def test_a_smuggled_long_double_literal_is_refused_before_any_kernel_runs():
    if np.dtype(np.longdouble).itemsize <= 8:
        pytest.skip("long double is double on this platform")
    SCALED.clear()
    g = KernelGraph("smuggled")
    x = g.input("x", (4,), np.float32)
    y = g.output("y", (4,), np.float32)
    launch = g.launch(Kernel.array(scale, name="scale"), [x, Out(y), np.float64(1.5)])
    object.__setattr__(launch, "args", launch.args[:2] + (np.longdouble(1.5),))
    g = pickle.loads(pickle.dumps(g))  # as it arrives on a worker
    rt = WorkerRuntime(CpuBackend(), 10_000)
    with pytest.raises(LiteralTypeError, match="graph 'smuggled', launch 0.*no CUDA type"):
        run(rt, g, "r")
    assert SCALED == []


# -- item 9: faults -------------------------------------------------------------------

class StickyError(RuntimeError):
    """A sticky CUDA fault, as is_sticky_fault reads one."""

    def __init__(self):
        super().__init__("CUDA_ERROR_ILLEGAL_ADDRESS: an illegal memory access")


class FaultyBackend(CpuBackend):
    """Copies to the host and kernels fail with a sticky fault once armed."""

    def __init__(self):
        super().__init__()
        self.armed = False

    def is_fatal(self, exc):
        return isinstance(exc, StickyError)

    def to_host(self, dev, stream):
        if self.armed:
            raise StickyError()
        return super().to_host(dev, stream)

    def synchronize(self, stream):
        if self.armed:
            raise StickyError()


def test_a_fault_met_reading_a_kept_output_marks_the_worker_broken():
    be = FaultyBackend()
    changes = []
    rt, handle = kept_runtime(be)
    rt.on_state_change = lambda: changes.append(rt.broken)
    be.armed = True
    with pytest.raises(DeviceFaultError, match="kept-1.*illegal memory access"):
        handle.get()
    assert rt.broken and "ILLEGAL_ADDRESS" in rt.broken and changes == [rt.broken]


def test_a_fault_met_writing_back_while_clearing_marks_the_worker_broken():
    be = FaultyBackend()
    rt, handle = kept_runtime(be)
    be.armed = True
    with pytest.raises(DeviceFaultError):
        rt.cache.clear()
    assert rt.broken is not None
    assert rt.cache._entries["kept-1"].pins == 0  # nothing left pinned by the failed copy


def breaks(xp, x, y):
    raise StickyError()


def test_the_request_that_met_a_fault_first_is_blamed_and_the_next_is_placed_again():
    handed_back = []

    class HandedBackError(Exception):
        pass

    def reschedule(reason):
        handed_back.append(reason)
        raise HandedBackError(reason)

    rt = WorkerRuntime(FaultyBackend(), 10_000, reschedule=reschedule)
    with pytest.raises(DeviceFaultError, match="illegal memory access") as first:
        run(rt, one_kernel_graph(breaks, "culprit"), "a")
    assert not getattr(first.value, "innocent", True)
    # The device is sticky now: the next request meets the same fault.
    with pytest.raises(HandedBackError):
        run(rt, one_kernel_graph(breaks, "bystander"), "b")
    assert handed_back == [rt.broken]
    # Without a hook (no worker plugin) it is still a DeviceFaultError.
    rt.reschedule = None
    with pytest.raises(DeviceFaultError) as third:
        run(rt, one_kernel_graph(breaks, "bystander"), "c")
    assert third.value.innocent is True


def test_the_hand_back_is_a_reschedule_that_the_task_function_passes_on():
    from distributed import Reschedule

    from dask_kaas.plugin.worker import RescheduledError

    e = RescheduledError("placed elsewhere")
    assert isinstance(e, Reschedule) and isinstance(e, KaasError)


# -- issue 16 item 4: a kernel's own MemoryError --------------------------------------

def test_a_kernel_raising_memory_error_fails_once_and_evicts_nothing():
    calls = []

    def greedy(xp, x, y):
        calls.append(1)
        raise MemoryError("my own bookkeeping ran out")

    rt = WorkerRuntime(CpuBackend(), 10_000)
    run(rt, one_kernel_graph(double), "warm", wid="other-tenant-const")
    with pytest.raises(KernelExecutionError, match="kernel raised: MemoryError") as info:
        run(rt, one_kernel_graph(greedy), "r")
    assert not isinstance(info.value, DeviceOutOfMemoryError)
    assert isinstance(info.value.__cause__, MemoryError)
    assert calls == [1]
    assert "other-tenant-const" in rt.cache and rt.cache.stats.evictions == 0
    assert rt.cache._private_bytes == 0


def test_the_allocators_failure_is_still_out_of_memory():
    from dask_kaas.device import oom

    def inner(nbytes):
        raise MemoryError("std::bad_alloc: out_of_memory: RMM failure")

    malloc = oom.tagging_allocator(inner)
    with pytest.raises(MemoryError) as info:
        malloc(1 << 40)
    assert oom.is_marked(info.value)
    assert not oom.is_marked(MemoryError("raised by a kernel"))
    ok = oom.tagging_allocator(lambda n: ("ptr", n))
    assert ok(16) == ("ptr", 16)


# -- issue 16 item 10: the n_iter loop stops at the deadline ----------------------------

def test_a_timed_out_long_graph_stops_between_launches_and_frees_its_slot():
    launches = []
    deadline_at = []

    def step(xp, x, y):
        launches.append(time.monotonic())
        time.sleep(0.01)
        y[...] += 1

    g = KernelGraph("long", n_iter=100_000)
    x = g.input("x", (4,), np.float32)
    y = g.output("y", (4,), np.float32)
    g.launch(Kernel.array(step, name="step"), [x, InOut(y)])
    rt = WorkerRuntime(CpuBackend(), 10_000, slots=1)
    t0 = time.monotonic()
    with pytest.raises(RequestTimeoutError):
        run(rt, g, "long-1", timeout=0.3)
    deadline_at.append(time.monotonic())
    # The kernel's thread stops at its next launch: the slot comes back
    # without any restart (no overdue entry left).
    end = time.monotonic() + 30
    while rt.overdue and time.monotonic() < end:
        time.sleep(0.02)
    assert rt.overdue == {}
    n = len(launches)
    time.sleep(0.3)
    assert len(launches) == n  # nothing launched after it stopped
    assert n < 100_000 and launches[-1] - t0 < 10
    out, _ = run(rt, one_kernel_graph(double), "after", timeout=5)  # the slot is free
    np.testing.assert_array_equal(out["y"], 2 * X)


def test_a_cancelled_long_graph_stops_between_launches():
    launches = []

    def step(xp, x, y):
        launches.append(1)
        time.sleep(0.01)

    g = KernelGraph("long", n_iter=100_000)
    x = g.input("x", (4,), np.float32)
    y = g.output("y", (4,), np.float32)
    g.launch(Kernel.array(step, name="step"), [x, Out(y)])
    rt = WorkerRuntime(CpuBackend(), 10_000)
    threading.Timer(0.2, rt.set_overdue, ("long-2", True)).start()  # as the plugin does
    with pytest.raises(KaasError, match="cancelled"):
        run(rt, g, "long-2")
    assert 0 < len(launches) < 100_000


# -- item 10: the device check's own plumbing ------------------------------------------

def test_the_device_check_dry_run_returns_one_archive_and_a_summary(tmp_path):
    """scripts/gpu-check.sh --dry-run on this CPU machine (the versions stage
    only: the full dry run runs this file).  Two files come back, the
    summary fits a screen, and a cuda-bindings wheel is left to the image."""
    import os
    import shutil
    import tarfile
    from pathlib import Path

    if not all(shutil.which(t) for t in ("bash", "setsid", "timeout", "tar")):
        pytest.skip("needs bash, setsid, timeout and tar")
    pytest.importorskip("cuda.bindings")
    wheels = tmp_path / "whl"
    wheels.mkdir()
    (wheels / "cuda_bindings-13.0.1-cp312-cp312-manylinux_2_28_x86_64.whl").write_bytes(b"")
    (wheels / "rmm_cu13-26.10.0-cp312-cp312-manylinux_2_28_x86_64.whl").write_bytes(b"")
    out = tmp_path / "out"
    script = Path(__file__).resolve().parent.parent / "scripts" / "gpu-check.sh"
    env = dict(os.environ, OUT=str(out), WHEELS_DIR=str(wheels), STAGES="versions",
               PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(script), "--dry-run"], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["gpu-check.tar.gz", "summary.txt"]
    summary = (out / "summary.txt").read_text()
    assert len(summary.splitlines()) <= 40 and "DRY RUN" in summary
    assert "versions: rc=0" in summary and "1 wheel(s) left to the image" in summary
    with tarfile.open(out / "gpu-check.tar.gz") as tar:
        names = {n.lstrip("./") for n in tar.getnames()}
        assert {"versions.log", "wheels.txt", "summary.txt"} <= names
        listed = tar.extractfile("./wheels.txt").read().decode()
    assert "skipped cuda_bindings" in listed and "would install" in listed and "rmm_cu13" in listed
    bad = subprocess.run(["bash", str(script), "--bogus"], env=env, capture_output=True,
                         text=True, timeout=30)
    assert bad.returncode == 2 and "unknown argument" in bad.stderr
