"""The CUDA backend on a real GPU (collected everywhere, run where one is).

Every example and kernel form runs on the CUDA backend and is compared with
the NumPy reference; cross-stream hits on a large const; buffers larger
than a staging chunk; more than 48 KiB of shared memory; eviction checked
against RMM's own statistics; keep_on_device chaining; graphs overlapping on
two streams, measured with CUDA events.  The decisions behind these paths
are tested without a GPU in test_cuda_logic.py and test_gpu_review.py; the
second review's device checks are at the end of this file (modules
unloaded on eviction, CuPy's NVRTC fallback compiling for real, the
allocator's out-of-memory told from a kernel's, an ``n_iter`` graph
stopping at its deadline, include refusal on a worker, blame on a fault
between two slots).
"""

from __future__ import annotations

import importlib.util
import threading

import numpy as np
import pytest

from dask_kaas import (
    InOut,
    KaasClient,
    Kernel,
    KernelDefinitionError,
    KernelGraph,
    LocalKaasCluster,
    Out,
)
from dask_kaas.workloads import jacobi as jacobi_wl
from dask_kaas.workloads import mlp
from dask_kaas.workloads import sgemm as sgemm_wl

pytestmark = pytest.mark.gpu

rng = np.random.default_rng(11)


def f32(*shape):
    return rng.standard_normal(shape).astype(np.float32)


@pytest.fixture(scope="module")
def gpu_client():
    with LocalKaasCluster(backend="cuda", device_memory_limit="2GB", slots=2,
                          dashboard_address="127.0.0.1:0") as cluster, \
            KaasClient(cluster) as client:
        yield client


def test_workers_run_the_cuda_backend_on_an_rmm_pool(gpu_client):
    info = gpu_client.kaas_stats()["workers"]
    assert info and all(w["backend"] == "cuda" for w in info.values())
    rmm_installed = importlib.util.find_spec("rmm") is not None
    for w in info.values():
        # Where RMM is installed, falling back to CuPy's pool is a failure.
        assert w["allocator"] == ("rmm" if rmm_installed else "cupy"), w["allocator_note"]
        assert w["capacity_bytes"] + w["headroom_bytes"] <= w["pool_bytes"]
        assert w["headroom_bytes"] >= 256 * 2**20
        assert w["kernel_image"] and w["kernel_image_error"] is None
        assert w["shared_mem_per_block_optin"] >= 48 * 1024
        if rmm_installed:
            assert 0 <= w["pool_used_bytes"] <= w["pool_peak_bytes"] <= w["pool_bytes"]


def test_examples_on_the_gpu(gpu_client):
    import jacobi
    import mlp_inference
    import sgemm_chain

    assert jacobi.main(gpu_client, n=512, iterations=100) < 1e-2
    workers = sgemm_chain.main(gpu_client, n=256, links=6)
    assert len(set(workers)) == 1
    done = mlp_inference.main(gpu_client, tenants=4, n_requests=40)
    assert sum(done.values()) == 40


def scale_add(xp, x, y, a):
    y[...] = a * x + xp.float32(1)


def test_every_kernel_form(gpu_client, tmp_path):
    pytest.importorskip("cuda.bindings.nvrtc", reason="PTX/cubin files are made with NVRTC")
    from dask_kaas.device.nvrtc import compile_source

    n = 256
    x, b = f32(n, n), f32(n, n) / 16
    src = sgemm_wl.SGEMM_SOURCE
    ptx = tmp_path / "sgemm.ptx"
    ptx.write_bytes(compile_source(src, "sgemm", arch=_arch(gpu_client), output="ptx"))
    ptx_loads = _ptx_loads(gpu_client)
    cubin = tmp_path / "sgemm.cubin"
    cubin.write_bytes(compile_source(src, "sgemm", arch=_arch(gpu_client), output="cubin"))
    templ = Kernel.cuda(
        "template<typename T> __global__ void axpb(const T* x, T* y, T a, T b, int n) {"
        " int i = blockIdx.x * blockDim.x + threadIdx.x; if (i < n) y[i] = a * x[i] + b; }",
        "axpb<float>", name_expressions=["axpb<float>"])
    g = KernelGraph("forms-gpu")
    X = g.input("x", (n, n), np.float32)
    B = g.const("b", (n, n), np.float32)
    outs = {k: g.output(k, (n, n), np.float32)
            for k in ("src", "ptx", "cubin", "lib", "arr", "tmpl")}
    dims = [np.int32(n), np.int32(n), np.int32(n)]
    grid, block = ((n + 15) // 16, (n + 15) // 16), (16, 16)
    g.launch(sgemm_wl.sgemm, [X, B, Out(outs["src"]), *dims], grid=grid, block=block)
    if ptx_loads:
        g.launch(Kernel.cuda_file(ptx, "sgemm"), [X, B, Out(outs["ptx"]), *dims], grid=grid,
                 block=block)
    else:  # NVRTC newer than the driver: its PTX cannot load, and says so
        g.launch(Kernel.library("gemm"), [X, B, Out(outs["ptx"])])
        bad = KernelGraph("ptx-too-new")
        bx, bb = bad.input("x", (n, n), np.float32), bad.const("b", (n, n), np.float32)
        bad.launch(Kernel.cuda_file(ptx, "sgemm"), [bx, bb, Out(bad.output("o", (n, n),
                   np.float32)), *dims], grid=grid, block=block)
        with pytest.raises(KernelDefinitionError, match="cannot load ptx image"):
            gpu_client.submit_kernel_graph(bad, {"x": x, "b": b}).result()
    g.launch(Kernel.cuda_file(cubin, "sgemm"), [X, B, Out(outs["cubin"]), *dims], grid=grid,
             block=block)
    g.launch(Kernel.library("gemm"), [X, B, Out(outs["lib"])])
    g.launch(Kernel.array(scale_add), [X, Out(outs["arr"]), np.float32(3)])
    g.launch(templ, [X, Out(outs["tmpl"]), np.float32(2), np.float32(-1), np.int32(n * n)],
             grid=(n * n + 255) // 256, block=256)
    out = gpu_client.submit_kernel_graph(g, {"x": x, "b": b}).result()
    for k in ("src", "ptx", "cubin", "lib"):
        np.testing.assert_allclose(out[k], x @ b, rtol=1e-3, atol=1e-3, err_msg=k)
    np.testing.assert_allclose(out["arr"], 3 * x + 1, rtol=1e-6)
    np.testing.assert_allclose(out["tmpl"], 2 * x - 1, rtol=1e-6)


def _arch(client) -> str:
    (w,) = list(client.kaas_stats()["workers"].values())[:1]
    return w["compute_capability"]


def _ptx_loads(client) -> bool:
    """Whether this NVRTC's PTX is one the workers' driver can read."""
    from dask_kaas.device.nvrtc import nvrtc_version

    (w,) = list(client.kaas_stats()["workers"].values())[:1]
    driver = tuple(int(p) for p in w["driver_cuda_version"].split("."))
    return nvrtc_version() <= driver


def test_shared_memory_and_literal_dtypes(gpu_client):
    src = r"""
    extern "C" __global__ void block_sum(const double* x, double* out, long long n, short k) {
        extern __shared__ double buf[];
        long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
        buf[threadIdx.x] = i < n ? x[i] * k : 0.0;
        __syncthreads();
        for (int s = blockDim.x / 2; s > 0; s >>= 1) {
            if (threadIdx.x < s) buf[threadIdx.x] += buf[threadIdx.x + s];
            __syncthreads();
        }
        if (threadIdx.x == 0) out[blockIdx.x] = buf[0];
    }"""
    n, block = 1 << 16, 256
    g = KernelGraph("blocksum")
    x = g.input("x", (n,), np.float64)
    out = g.output("out", (n // block,), np.float64)
    g.launch(Kernel.cuda(src, "block_sum"), [x, Out(out), np.int64(n), np.int16(3)],
             grid=n // block, block=block, shared_mem=block * 8)
    xv = rng.random(n)
    res = gpu_client.submit_kernel_graph(g, {"x": xv}).result()["out"]
    np.testing.assert_allclose(res, (3 * xv).reshape(-1, block).sum(axis=1), rtol=1e-12)


def test_keep_on_device_chain_stays_on_one_gpu_worker(gpu_client):
    n = 512
    g = sgemm_wl.link_graph(n)
    a = f32(n, n)
    bs = [f32(n, n) / np.sqrt(n) for _ in range(4)]
    cur, futs = a, []
    for b in bs:
        f = gpu_client.submit_kernel_graph(g, {"a": cur, "b": b}, keep_on_device=["c"])
        futs.append(f)
        cur = f["c"]
    expect = a
    for b in bs:
        expect = np.maximum(expect @ b, 0)
    np.testing.assert_allclose(cur.result(), expect, rtol=1e-2, atol=1e-2)
    who = gpu_client.who_has(futs)
    assert len({who[f.key][0] for f in futs}) == 1


SPIN_SOURCE = r"""
extern "C" __global__ void spin(float* y, long long cycles) {
    long long start = clock64();
    while (clock64() - start < cycles) { }
    y[threadIdx.x] = 1.0f;
}"""

#: CUDA events recorded by the mark kernel, by graph tag.
EVENTS: dict[int, list] = {}


def mark(xp, y, tag):
    """An array kernel runs on its slot's stream: record an event there."""
    event = xp.cuda.Event()
    event.record()
    EVENTS.setdefault(int(tag), []).append(event)


def spin_graph(tag: int) -> KernelGraph:
    g = KernelGraph(f"spin-{tag}")
    x = g.input("x", (32,), np.float32)
    y = g.output("y", (32,), np.float32)
    g.launch(Kernel.library("copy"), [x, Out(y)])
    g.launch(Kernel.array(mark), [InOut(y), np.int32(tag)])
    g.launch(Kernel.cuda(SPIN_SOURCE, "spin"), [InOut(y), np.int64(50_000_000)], grid=1,
             block=32)
    g.launch(Kernel.array(mark), [InOut(y), np.int32(tag)])
    return g


def test_two_slots_run_graphs_at_the_same_time_on_the_gpu():
    """Measured on the GPU with CUDA events, not with host clocks."""
    import cupy

    from dask_kaas.device.cuda import CudaBackend
    from dask_kaas.device.runtime import WorkerRuntime
    from dask_kaas.request import GraphRequest, InputRef

    backend = CudaBackend(device_memory_limit="512MB")
    rt = WorkerRuntime(backend, backend.cache_capacity(), slots=2)
    try:
        # Compile (and load) every kernel first: otherwise both threads
        # compile cold at once and the measured spans hold NVRTC, not the GPU.
        warm = GraphRequest("spin-warm", "spin-9", "t", [InputRef("x", 128, None)])
        rt.run(spin_graph(9), warm, [np.zeros(32, np.float32)])
        EVENTS.clear()
        ref = cupy.cuda.Event()
        ref.record()
        ref.synchronize()
        results = {}

        def run(tag):
            req = GraphRequest(f"spin-{tag}", f"spin-{tag}", "t", [InputRef("x", 128, None)])
            results[tag] = rt.run(spin_graph(tag), req, [np.zeros(32, np.float32)])[0]["y"]

        threads = [threading.Thread(target=run, args=(t,)) for t in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        for tag in (0, 1):
            np.testing.assert_array_equal(results[tag], np.ones(32, np.float32))
        spans = {tag: [cupy.cuda.get_elapsed_time(ref, e) for e in EVENTS[tag]]
                 for tag in (0, 1)}
        (s0, e0), (s1, e1) = spans[0], spans[1]
        overlap = min(e0, e1) - max(s0, s1)
        assert overlap > 0.5 * min(e0 - s0, e1 - s1), spans
    finally:
        rt.close()


def test_eviction_under_a_small_pool_frees_what_rmm_counts():
    with LocalKaasCluster(1, backend="cuda", device_memory_limit="96MB",
                          dashboard_address="127.0.0.1:0") as cluster, \
            KaasClient(cluster) as client:
        batch, d_in, hidden, d_out = 16, 1024, 2048, 1024  # 16 MiB of weights per model
        models = [mlp.make_model(f"t{i}", d_in, hidden, d_out, seed=i) for i in range(8)]
        graph = mlp.mlp_graph(batch, d_in, hidden, d_out)
        warm = client.submit_kernel_graph(graph, mlp.inputs_for(models[0], f32(batch, d_in)))
        warm.result()
        client.kaas_clear_caches()
        (base,) = client.kaas_stats()["workers"].values()
        assert base["entries"] == 0
        futs = {}
        for model, x in mlp.requests(models, 32, batch, d_in):
            futs[client.submit_kernel_graph(graph, mlp.inputs_for(model, x),
                                            tenant=model.tenant)] = (model, x)
        for f, (model, x) in futs.items():
            np.testing.assert_allclose(f.result()["y"], model.reference(x), rtol=1e-3,
                                       atol=1e-3)
        (w,) = client.kaas_stats()["workers"].values()
        assert w["evictions"] > 0 and w["peak_used_bytes"] <= w["capacity_bytes"]
        # RMM's own count of live bytes is what the cache says it holds (the cache
        # rounds each buffer up to 256 bytes): evicted buffers were really freed.
        live = w["pool_used_bytes"] - base["pool_used_bytes"]
        assert w["used_bytes"] - 256 * w["entries"] <= live <= w["used_bytes"], w
        if w["allocator"] == "rmm":
            assert live + base["pool_used_bytes"] <= w["pool_peak_bytes"] <= w["pool_bytes"]
        client.kaas_clear_caches()
        (after,) = client.kaas_stats()["workers"].values()
        assert after["pool_used_bytes"] - base["pool_used_bytes"] < 16 * 2**20, (base, after)


def gemm_graph(m: int, k: int, n: int) -> KernelGraph:
    g = KernelGraph(f"gemm-{m}x{k}x{n}")
    x = g.input("x", (m, k), np.float32)
    w = g.const("w", (k, n), np.float32)
    y = g.output("y", (m, n), np.float32)
    g.launch(Kernel.library("gemm"), [x, w, Out(y)])
    return g


def test_cross_stream_hits_on_a_large_const_read_it_whole(gpu_client):
    """The first request of a burst loads the 40 MiB const on one slot's
    stream; the next, on the other slot, hits it while that copy may still
    be in flight.  Five bursts of 40 requests, every result checked."""
    k, n = 2560, 4096  # 40 MiB of float32
    w = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
    graph = gemm_graph(8, k, n)
    (info,) = list(gpu_client.kaas_stats()["workers"].values())[:1]
    assert info["slots"] == 2
    for burst in range(5):
        gpu_client.kaas_clear_caches()
        xs = [f32(8, k) for _ in range(40)]
        futs = gpu_client.map_kernel_graph(graph, [{"x": x, "w": w} for x in xs])
        for x, f in zip(xs, futs):
            np.testing.assert_allclose(f.result()["y"], x @ w, rtol=1e-3, atol=1e-3,
                                       err_msg=f"burst {burst}")


def test_buffers_larger_than_a_staging_chunk_arrive_whole(gpu_client):
    from dask_kaas.device.staging import CHUNK

    n = 2 * CHUNK + 4097  # three chunks, the last one short and odd
    data = rng.integers(0, 256, n, dtype=np.uint8)
    g = KernelGraph("big-copy")
    a = g.input("a", (n,), np.uint8)
    c = g.const("c", (n,), np.uint8)
    oa, oc = g.output("oa", (n,), np.uint8), g.output("oc", (n,), np.uint8)
    g.launch(Kernel.library("copy"), [a, Out(oa)])
    g.launch(Kernel.library("copy"), [c, Out(oc)])
    other = data[::-1].copy()
    out = gpu_client.submit_kernel_graph(g, {"a": data, "c": other}).result()
    np.testing.assert_array_equal(out["oa"], data)  # per-request input
    np.testing.assert_array_equal(out["oc"], other)  # cached const


TILE_SUM_SOURCE = r"""
extern "C" __global__ void tile_sum(const double* x, double* out, int per_block) {
    extern __shared__ double tile[];
    const double* mine = x + (long long)blockIdx.x * per_block;
    for (int i = threadIdx.x; i < per_block; i += blockDim.x) tile[i] = mine[i];
    __syncthreads();
    if (threadIdx.x == 0) {
        double s = 0.0;
        for (int i = 0; i < per_block; ++i) s += tile[i];
        out[blockIdx.x] = s;
    }
}"""


def test_a_launch_with_more_than_48_kib_of_shared_memory(gpu_client):
    per_block, blocks = 100 * 1024 // 8, 64  # 100 KiB of dynamic shared memory per block
    g = KernelGraph("tile-sum")
    x = g.input("x", (blocks * per_block,), np.float64)
    out = g.output("out", (blocks,), np.float64)
    g.launch(Kernel.cuda(TILE_SUM_SOURCE, "tile_sum"), [x, Out(out), np.int32(per_block)],
             grid=blocks, block=256, shared_mem=per_block * 8)
    xv = rng.random(blocks * per_block)
    res = gpu_client.submit_kernel_graph(g, {"x": xv}).result()["out"]
    np.testing.assert_allclose(res, xv.reshape(blocks, per_block).sum(axis=1), rtol=1e-12)


WILD_SOURCE = r"""
extern "C" __global__ void wild(float* y) {
    float* nowhere = (float*)0x10;
    y[threadIdx.x] = nowhere[threadIdx.x * 4096];
}"""


def test_an_illegal_address_is_a_device_fault_of_that_request():
    from dask_kaas import DeviceFaultError

    with LocalKaasCluster(1, backend="cuda", device_memory_limit="256MB",
                          dashboard_address="127.0.0.1:0") as cluster, \
            KaasClient(cluster) as client:
        g = KernelGraph("wild")
        x = g.input("x", (32,), np.float32)
        y = g.output("y", (32,), np.float32)
        g.launch(Kernel.library("copy"), [x, Out(y)])
        g.launch(Kernel.cuda(WILD_SOURCE, "wild"), [InOut(y)], grid=1, block=32)
        with pytest.raises(DeviceFaultError, match="graph 'wild'.*(illegal|Illegal|ILLEGAL)"):
            client.submit_kernel_graph(g, {"x": np.zeros(32, np.float32)}).result()


def test_two_workers_share_one_gpu():
    with LocalKaasCluster(2, backend="cuda", workers_per_device=2,
                          dashboard_address="127.0.0.1:0") as cluster, \
            KaasClient(cluster) as client:
        ws = client.kaas_stats()["workers"]
        assert len(ws) == 2
        total = next(iter(ws.values()))["device_total_bytes"]
        assert all(w["capacity_bytes"] <= 0.41 * total for w in ws.values())
        a, w = f32(64, 64), f32(64, 64)
        g = sgemm_wl.link_graph(64)
        np.testing.assert_allclose(client.submit_kernel_graph(g, {"a": a, "b": w})
                                   .result()["c"], np.maximum(a @ w, 0), rtol=1e-3,
                                   atol=1e-3)


def test_jacobi_cuda_matches_cpu_implementation(gpu_client):
    n, iters = 1024, 30
    A, b = jacobi_wl.problem(n, seed=5)
    x0 = np.zeros(n, np.float32)
    out = gpu_client.submit_kernel_graph(jacobi_wl.jacobi_graph(n, iters),
                                         {"A": A, "b": b, "x0": x0}).result()["x"]
    np.testing.assert_allclose(out, jacobi_wl.reference(A, b, x0, iters), rtol=1e-4,
                               atol=1e-5)


# -- the second review (issue 17; issue 16 items 4 and 10) ---------------------------

@pytest.fixture
def gpu_runtime():
    from dask_kaas.device.cuda import CudaBackend
    from dask_kaas.device.runtime import WorkerRuntime

    backend = CudaBackend(device_memory_limit="512MB")
    rt = WorkerRuntime(backend, backend.cache_capacity(), slots=2)
    try:
        yield rt
    finally:
        rt.close()


def _request(key, graph, inputs=("x",)):
    from dask_kaas.request import GraphRequest, InputRef

    return GraphRequest(key, graph.name, "t", [InputRef(n, 128, None) for n in inputs])


def copied_then(name: str, kernel: Kernel, extra: list, n_iter: int = 1) -> KernelGraph:
    """x copied to y, then ``kernel`` on InOut(y) plus ``extra`` literals."""
    g = KernelGraph(name, n_iter=n_iter)
    x = g.input("x", (32,), np.float32)
    y = g.output("y", (32,), np.float32)
    g.launch(Kernel.library("copy"), [x, Out(y)])
    g.launch(kernel, [InOut(y), *extra], grid=1, block=32)
    return g


X32 = np.zeros(32, np.float32)


def fill_graph(tag: int) -> KernelGraph:
    src = (f"// variant {tag}\n"
           'extern "C" __global__ void fill(float* y, float v) { y[threadIdx.x] = v; }')
    g = KernelGraph(f"fill-{tag}")
    x = g.input("x", (32,), np.float32)
    y = g.output("y", (32,), np.float32)
    g.launch(Kernel.library("copy"), [x, Out(y)])
    g.launch(Kernel.cuda(src, "fill"), [InOut(y), np.float32(tag)], grid=1, block=32)
    return g


def test_evicted_kernels_unload_their_modules_on_the_gpu(gpu_runtime):
    import gc
    import weakref

    from dask_kaas.device.kernel_cache import KernelCache

    rt = gpu_runtime
    rt.kernels = KernelCache(rt.backend, max_entries=3)  # copy + the two latest fills
    refs = []
    for tag in range(6):  # a tenant varying a comment
        out = rt.run(fill_graph(tag), _request(f"f{tag}", fill_graph(tag)),
                     [np.zeros(32, np.float32)])[0]["y"]
        np.testing.assert_array_equal(out, np.full(32, tag, np.float32))
        launcher = rt.kernels.get(fill_graph(tag).launches[1].kernel)
        refs.append(weakref.ref(launcher))  # the module's only holder
        del launcher
    gc.collect()
    alive = [r() is not None for r in refs]
    assert alive[-2:] == [True, True] and not any(alive[:-2]), alive
    again = rt.run(fill_graph(0), _request("f0b", fill_graph(0)), [np.zeros(32, np.float32)])
    np.testing.assert_array_equal(again[0]["y"], np.zeros(32, np.float32))


def test_cupys_nvrtc_compiles_and_runs_a_kernel(gpu_runtime):
    """The fallback for a worker without cuda-bindings' libnvrtc, for real."""
    import cupy

    from dask_kaas.device.nvrtc import CupyNvrtc, choose_image, compile_for_device

    be = gpu_runtime.backend
    api = CupyNvrtc(cupy.cuda.nvrtc)
    image = choose_image(api.version(), be.driver_version, be.arch, api.archs())
    tmpl = Kernel.cuda("template <typename T> __global__ void put(T* y, T v) "
                       "{ y[threadIdx.x] = v; }", "put<float>", name_expressions=["put<float>"])
    binary, function = compile_for_device(tmpl, image, api)
    launcher = be._kernels.load(binary, image[0], "put<float>", function)
    y = cupy.zeros(32, cupy.float32)
    from dask_kaas.graph.launch import Launch

    stream = cupy.cuda.Stream(non_blocking=True)
    launcher(Launch(tmpl, (), (1, 1, 1), (32, 1, 1), 0), [y, np.float32(7)], stream)
    stream.synchronize()
    np.testing.assert_array_equal(y.get(), np.full(32, 7, np.float32))
    with pytest.raises(KernelDefinitionError, match="refused"):
        compile_for_device(Kernel(Kernel.CUDA, "k", source='#include "/etc/hostname"\n'),
                           image, api)


def _huge(xp, x, y):
    xp.empty(1 << 45, xp.uint8)  # 32 TiB: the allocator fails


def _raises_memory_error(xp, x, y):
    raise MemoryError("the kernel's own")


def test_the_allocators_oom_is_retried_and_a_kernels_memory_error_is_not(gpu_runtime):
    import cupy

    from dask_kaas import DeviceOutOfMemoryError, KernelExecutionError

    assert hasattr(cupy.cuda.get_allocator(), "__wrapped__")  # the tagging allocator
    rt = gpu_runtime
    for fn, err in ((_huge, DeviceOutOfMemoryError), (_raises_memory_error,
                                                       KernelExecutionError)):
        g = KernelGraph(fn.__name__.strip("_"))
        x = g.input("x", (32,), np.float32)
        g.launch(Kernel.array(fn, name="k"), [x, Out(g.output("y", (32,), np.float32))])
        with pytest.raises(err) as info:
            rt.run(g, _request("m", g), [np.zeros(32, np.float32)])
        assert type(info.value) is err


def test_a_long_n_iter_graph_stops_at_its_deadline_on_the_gpu(gpu_runtime):
    from dask_kaas import RequestTimeoutError

    rt = gpu_runtime
    # ~10 ms per launch: 1000 s in all
    g = copied_then("spin-long", Kernel.cuda(SPIN_SOURCE, "spin"), [np.int64(20_000_000)],
                    n_iter=100_000)
    with pytest.raises(RequestTimeoutError):
        rt.run(g, _request("long", g), [X32], timeout=1.0)
    import time

    end = time.monotonic() + 30
    while rt.overdue and time.monotonic() < end:
        time.sleep(0.05)
    assert rt.overdue == {}  # stopped within a few launches: no restart needed


def test_a_forged_include_is_refused_by_the_worker(gpu_client):
    g = copied_then("forged", Kernel.cuda(SPIN_SOURCE, "spin"), [np.int64(1)])
    forged = g.launches[1].kernel
    forged.source = '#include "/etc/hostname"\n' + SPIN_SOURCE  # skips Kernel.cuda's check
    forged._key = None
    with pytest.raises(KernelDefinitionError, match="refused") as info:
        gpu_client.submit_kernel_graph(g, {"x": X32}).result()
    assert "/etc/hostname(" not in str(info.value)


def test_pool_leaves_the_reserve_outside_it(gpu_client):
    for w in gpu_client.kaas_stats()["workers"].values():
        assert w["device_reserve_bytes"] >= 2**30
        assert w["pool_bytes"] + w["device_reserve_bytes"] <= w["device_total_bytes"]


def test_a_fault_on_one_slot_blames_one_request(gpu_runtime):
    """A wild kernel on one slot while another slot spins: exactly one of the
    two is blamed; the other finished first or is handed back.  Last in this
    file: the fault poisons this process's CUDA context for good."""
    from dask_kaas import DeviceFaultError

    rt = gpu_runtime
    handed_back = []

    def reschedule(reason):
        handed_back.append(reason)
        raise RuntimeError("handed back")

    rt.reschedule = reschedule
    wild = copied_then("wild", Kernel.cuda(WILD_SOURCE, "wild"), [])
    spin = copied_then("spin-bystander", Kernel.cuda(SPIN_SOURCE, "spin"),
                       [np.int64(2_000_000_000)])  # ~1 s
    results = {}

    def go(name, g):
        try:
            results[name] = rt.run(g, _request(name, g), [X32])
        except BaseException as e:  # noqa: BLE001
            results[name] = e

    threads = [threading.Thread(target=go, args=a) for a in (("spin", spin), ("wild", wild))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    blamed = [n for n, r in results.items() if isinstance(r, DeviceFaultError)]
    assert len(blamed) == 1, results
    assert rt.broken is not None and len(handed_back) <= 1
