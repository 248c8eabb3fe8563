"""The CUDA backend on a real GPU (collected everywhere, run where one is).

Every example and kernel form runs on the CUDA backend and is compared with
the NumPy reference; eviction under a small RMM pool; keep_on_device
chaining; several graphs at once on several streams.
"""

from __future__ import annotations

import numpy as np
import pytest
from distributed import wait

from dask_kaas import InOut, KaasClient, Kernel, KernelGraph, LocalKaasCluster, Out
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
    for w in info.values():
        assert w["allocator"] in ("rmm", "cupy")
        assert w["capacity_bytes"] <= w["pool_bytes"]


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
    from dask_kaas.device.nvrtc import compile_source

    n = 256
    x, b = f32(n, n), f32(n, n) / 16
    src = sgemm_wl.SGEMM_SOURCE
    ptx = tmp_path / "sgemm.ptx"
    ptx.write_bytes(compile_source(src, "sgemm", arch=_arch(gpu_client), output="ptx"))
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
    g.launch(Kernel.cuda_file(ptx, "sgemm"), [X, B, Out(outs["ptx"]), *dims], grid=grid,
             block=block)
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


def sleep_kernel_graph():
    src = r"""
    extern "C" __global__ void spin(float* y, long long cycles) {
        long long start = clock64();
        while (clock64() - start < cycles) { }
        y[threadIdx.x] = 1.0f;
    }"""
    g = KernelGraph("spin")
    x = g.input("x", (32,), np.float32)
    y = g.output("y", (32,), np.float32)
    g.launch(Kernel.library("copy"), [x, Out(y)])
    g.launch(Kernel.cuda(src, "spin"), [InOut(y), np.int64(50_000_000)], grid=1, block=32)
    return g


def test_graphs_overlap_on_several_streams(gpu_client):
    g = sleep_kernel_graph()
    futs = gpu_client.map_kernel_graph(g, [{"x": np.zeros(32, np.float32)}] * 8)
    wait(futs)
    for f in futs:
        np.testing.assert_array_equal(f.result()["y"], np.ones(32, np.float32))
    runs = gpu_client.kaas_state()["timeline"]
    by_worker: dict[str, list] = {}
    for r in runs:
        if r["graph"] == "spin":
            by_worker.setdefault(r["worker"], []).append((r["start"], r["end"]))
    overlaps = 0
    for spans in by_worker.values():
        spans.sort()
        overlaps += sum(1 for a, b in zip(spans, spans[1:]) if b[0] < a[1])
    assert overlaps >= 1, by_worker


def test_eviction_under_a_small_pool():
    with LocalKaasCluster(1, backend="cuda", device_memory_limit="96MB",
                          dashboard_address="127.0.0.1:0") as cluster, \
            KaasClient(cluster) as client:
        batch, d_in, hidden, d_out = 16, 1024, 2048, 1024  # 16 MiB of weights per model
        models = [mlp.make_model(f"t{i}", d_in, hidden, d_out, seed=i) for i in range(8)]
        graph = mlp.mlp_graph(batch, d_in, hidden, d_out)
        futs = {}
        for model, x in mlp.requests(models, 32, batch, d_in):
            futs[client.submit_kernel_graph(graph, mlp.inputs_for(model, x),
                                            tenant=model.tenant)] = (model, x)
        for f, (model, x) in futs.items():
            np.testing.assert_allclose(f.result()["y"], model.reference(x), rtol=1e-3,
                                       atol=1e-3)
        (w,) = client.kaas_stats()["workers"].values()
        assert w["evictions"] > 0 and w["peak_used_bytes"] <= w["capacity_bytes"]


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
