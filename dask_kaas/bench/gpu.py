"""GPU micro-benchmark: what dask_kaas costs over CuPy and Dask themselves.

Three figures, each against a baseline measured in the same run:

- per-launch overhead inside a graph vs. launching the same RawKernel
  directly with CuPy (target: at most 1.2x);
- host-to-device bandwidth of a cache miss vs. a plain pinned memcpy
  (target: at least 80%);
- one request end to end vs. the same kernels run directly with CuPy plus a
  plain Dask round trip (target: at most 10% more).

Run ``python -m dask_kaas.bench.gpu --json gpu.json`` (or ``dask-kaas
bench-gpu``) on a machine with a GPU.  The first two figures share one CUDA
backend with a fixed pool, closed before the cluster of the third starts, so
no two RMM pools compete for the device.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
import uuid
from typing import Any

import numpy as np

ADD_SOURCE = r"""
extern "C" __global__ void add_one(float* x, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] += 1.0f;
}
"""


def _median_time(fn: Any, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def launch_overhead(backend: Any, launches: int = 400, repeat: int = 15) -> dict[str, float]:
    import cupy

    from ..device.runtime import WorkerRuntime
    from ..graph import InOut, Kernel, KernelGraph, Out
    from ..request import GraphRequest, InputRef

    n = 1024
    kernel = Kernel.cuda(ADD_SOURCE, "add_one")

    def graph(k: int) -> KernelGraph:
        g = KernelGraph(f"launches-{k}")
        x = g.input("x", (n,), np.float32)
        y = g.output("y", (n,), np.float32)
        g.launch(Kernel.library("copy"), [x, Out(y)])
        for _ in range(k):
            g.launch(kernel, [InOut(y), np.int32(n)], grid=(n + 255) // 256, block=256)
        return g

    rt = WorkerRuntime(backend, 1 << 30, slots=1)
    xv = np.zeros(n, np.float32)
    g1, gk = graph(1), graph(launches + 1)

    def run(g: KernelGraph) -> None:
        req = GraphRequest(uuid.uuid4().hex, g.name, "bench", [InputRef("x", xv.nbytes, None)])
        rt.run(g, req, [xv])

    run(g1), run(gk)  # compile, warm
    t1, tk = _median_time(lambda: run(g1), repeat), _median_time(lambda: run(gk), repeat)
    in_graph = (tk - t1) / launches
    raw = cupy.RawModule(code=ADD_SOURCE).get_function("add_one")
    dev = cupy.zeros(n, cupy.float32)
    stream = cupy.cuda.Stream(non_blocking=True)

    def direct() -> None:
        for _ in range(launches):
            raw(((n + 255) // 256,), (256,), (dev, np.int32(n)), stream=stream)
        stream.synchronize()

    direct()
    base = _median_time(direct, repeat) / launches
    rt.cache.close()  # not rt.close(): the backend is shared
    return {"per_launch_us": in_graph * 1e6, "cupy_per_launch_us": base * 1e6,
            "ratio": in_graph / base}


def miss_bandwidth(backend: Any, nbytes: int = 256 << 20, repeat: int = 7
                   ) -> dict[str, float]:
    import cupy
    import cupyx

    from ..device.cache import DeviceCache, Load

    cache = DeviceCache(backend, 2 * nbytes + (64 << 20))
    host = np.random.default_rng(0).random(nbytes // 8)
    stream = backend.make_streams(1)[0]

    def miss() -> None:
        res = cache.reserve([Load(uuid.uuid4().hex, host.nbytes, lambda: host)], 0, stream)
        stream.synchronize()
        cache.release(res)
        cache.clear()

    miss()
    t_miss = _median_time(miss, repeat)
    pinned = cupyx.empty_pinned(host.shape, host.dtype)
    pinned[...] = host
    dev = cupy.empty(host.shape, host.dtype)

    def plain() -> None:
        cupy.cuda.runtime.memcpyAsync(dev.data.ptr, pinned.ctypes.data, host.nbytes,
                                      cupy.cuda.runtime.memcpyHostToDevice, stream.ptr)
        stream.synchronize()

    plain()
    t_plain = _median_time(plain, repeat)
    cache.close()
    return {"bytes": nbytes, "miss_gb_s": nbytes / t_miss / 1e9,
            "pinned_memcpy_gb_s": nbytes / t_plain / 1e9, "fraction": t_plain / t_miss}


def noop(x: Any) -> Any:
    return x


def end_to_end(n: int = 2048, repeat: int = 50) -> dict[str, float]:
    import cupy

    from ..client import KaasClient
    from ..cluster import LocalKaasCluster
    from ..workloads.sgemm import link_graph_rect

    m = 64
    g = link_graph_rect(m, n)
    rng = np.random.default_rng(1)
    a = rng.standard_normal((m, n)).astype(np.float32)
    b = (rng.standard_normal((n, n)) / np.sqrt(n)).astype(np.float32)
    with LocalKaasCluster(1, backend="cuda", dashboard_address=None) as cluster, \
            KaasClient(cluster) as client:
        wb = client.scatter(b)
        for _ in range(5):
            client.submit_kernel_graph(g, {"a": a, "b": wb}).result()
        kaas = _median_time(lambda: client.submit_kernel_graph(g, {"a": a, "b": wb}).result(),
                            repeat)
        small = np.zeros(1, np.float32)
        dask_rt = _median_time(lambda: client.submit(noop, small, pure=False).result(), repeat)
    mod = cupy.RawModule(code=g.launches[0].kernel.source)
    sgemm = mod.get_function("sgemm")
    db = cupy.asarray(b)
    stream = cupy.cuda.Stream(non_blocking=True)

    def direct() -> None:
        with stream:
            da = cupy.asarray(a)
            dc = cupy.empty((m, n), cupy.float32)
            launch = g.launches[0]
            sgemm(launch.grid, launch.block, (da, db, dc, np.int32(m), np.int32(n), np.int32(n)),
                  stream=stream)
            cupy.maximum(dc, 0, out=dc)
            dc.get(stream=stream)
        stream.synchronize()

    direct()
    cupy_t = _median_time(direct, repeat)
    base = cupy_t + dask_rt
    return {"kaas_ms": kaas * 1e3, "cupy_ms": cupy_t * 1e3, "dask_round_trip_ms": dask_rt * 1e3,
            "baseline_ms": base * 1e3, "overhead": kaas / base - 1}


def run(args: argparse.Namespace) -> int:
    from ..device.backend import gpu_count

    if gpu_count() == 0:
        print("no CUDA GPU is visible: the GPU micro-benchmark needs one", file=sys.stderr)
        return 2
    from ..device.backend import make_backend

    backend = make_backend("cuda", rmm_pool_size="4GiB")
    try:
        doc: dict[str, Any] = {"device": backend.describe(),
                               "launch": launch_overhead(backend),
                               "bandwidth": miss_bandwidth(backend)}
    finally:
        backend.close()
    gc.collect()  # the pool goes with its last array
    doc["end_to_end"] = end_to_end()
    la, bw, e2e = doc["launch"], doc["bandwidth"], doc["end_to_end"]
    print(f"per-launch overhead: {la['per_launch_us']:.2f} us in a graph vs "
          f"{la['cupy_per_launch_us']:.2f} us direct CuPy ({la['ratio']:.2f}x; target <= 1.2x)")
    print(f"cache-miss H2D: {bw['miss_gb_s']:.1f} GB/s vs pinned memcpy "
          f"{bw['pinned_memcpy_gb_s']:.1f} GB/s ({100 * bw['fraction']:.0f}%; target >= 80%)")
    print(f"end to end: {e2e['kaas_ms']:.2f} ms vs CuPy {e2e['cupy_ms']:.2f} ms + Dask round trip "
          f"{e2e['dask_round_trip_ms']:.2f} ms ({100 * e2e['overhead']:+.1f}%; target <= +10%)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=2)
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", default=None, help="write the figures here")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dask-kaas bench-gpu", description=__doc__)
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
