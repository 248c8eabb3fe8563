"""Kernel graphs on a real multi-process LocalKaasCluster (CPU backend)."""

from __future__ import annotations

import numpy as np
import pytest
from distributed import wait

import dask_kaas
from dask_kaas import (
    BufferRoleError,
    GraphTooLargeError,
    In,
    InOut,
    InputMismatchError,
    Kernel,
    KernelDefinitionError,
    KernelExecutionError,
    KernelGraph,
    Out,
)
from dask_kaas.workloads import jacobi as jacobi_wl
from dask_kaas.workloads import sgemm as sgemm_wl

rng = np.random.default_rng(42)


def f32(*shape):
    return rng.standard_normal(shape).astype(np.float32)


def gemm_graph(name: str, rows: int, n: int, x: str = "x", w: str = "w", y: str = "y"
               ) -> tuple[KernelGraph, dict]:
    """y = x @ w, with x (rows, n) an input and w (n, n) a const."""
    g = KernelGraph(name)
    bufs = {x: g.input(x, (rows, n), np.float32), w: g.const(w, (n, n), np.float32),
            y: g.output(y, (rows, n), np.float32)}
    g.launch(Kernel.library("gemm"), [bufs[x], bufs[w], Out(bufs[y])])
    return g, bufs


def where_ran(client, fut) -> str:
    (addr,) = client.who_has(fut)[fut.key]
    return addr


def totals(client) -> dict[str, int]:
    ws = client.kaas_stats()["workers"].values()
    return {k: sum(w[k] for w in ws) for k in ("hits", "misses", "bytes_to_device",
                                               "evictions", "graphs_run")}


def test_every_library_kernel(client):
    n = 16
    a, b, bias, v = f32(n, n), f32(n, n), f32(n), f32(n, n)
    g = KernelGraph("library")
    A = g.input("a", (n, n), np.float32)
    B = g.const("b", (n, n), np.float32)
    BIAS = g.input("bias", (n,), np.float32)
    V = g.input("v", (n, n), np.float32)
    mm, mm2, ab, r, c, s, ax = (g.output(k, s, np.float32) for k, s in [
        ("mm", (n, n)), ("mm2", (n, n)), ("ab", (n, n)), ("r", (n, n)), ("c", (n, n)),
        ("s", (1,)), ("ax", (n, n))])
    g.launch(Kernel.library("gemm"), [A, B, Out(mm)])
    g.launch(Kernel.library("copy"), [V, Out(mm2)])
    g.launch(Kernel.library("gemm"), [A, B, InOut(mm2), np.float32(2), np.float32(0.5)])
    g.launch(Kernel.library("add"), [mm, BIAS, Out(ab)])
    g.launch(Kernel.library("relu"), [ab, Out(r)])
    g.launch(Kernel.library("copy"), [r, Out(c)])
    g.launch(Kernel.library("reduce_sum"), [r, Out(s)])
    g.launch(Kernel.library("copy"), [V, Out(ax)])
    g.launch(Kernel.library("axpy"), [np.float32(3), A, InOut(ax)])
    out = client.submit_kernel_graph(g, {"a": a, "b": b, "bias": bias, "v": v}).result()
    tol = dict(rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out["mm"], a @ b, **tol)
    np.testing.assert_allclose(out["mm2"], 2 * (a @ b) + 0.5 * v, **tol)
    np.testing.assert_allclose(out["ab"], a @ b + bias, **tol)
    np.testing.assert_allclose(out["r"], np.maximum(a @ b + bias, 0), **tol)
    np.testing.assert_allclose(out["c"], out["r"])
    np.testing.assert_allclose(out["s"], [np.maximum(a @ b + bias, 0).sum()], rtol=1e-4)
    np.testing.assert_allclose(out["ax"], 3 * a + v, **tol)


def softplus(xp, x, y, beta):
    y[...] = xp.log1p(xp.exp(beta * x)) / beta


def test_array_function_and_cuda_kernels_with_cpu_implementations(client, tmp_path):
    n = 64
    x = f32(n, n)
    b = f32(n, n) / 8
    g = KernelGraph("forms")
    X = g.input("x", (n, n), np.float32)
    B = g.const("b", (n, n), np.float32)
    sp = g.output("sp", (n, n), np.float32)
    mm = g.output("mm", (n, n), np.float32)
    mm2 = g.output("mm2", (n, n), np.float32)
    g.launch(Kernel.array(softplus), [X, Out(sp), np.float32(2.0)])
    g.launch(sgemm_wl.sgemm, [X, B, Out(mm), np.int32(n), np.int32(n), np.int32(n)],
             grid=(4, 4), block=(16, 16))
    ptx = tmp_path / "sgemm.ptx"
    ptx.write_text("// PTX image; the CPU backend runs the cpu= implementation\n")
    from_file = Kernel.cuda_file(ptx, "sgemm", cpu=sgemm_wl.sgemm_cpu)
    g.launch(from_file, [X, B, Out(mm2), np.int32(n), np.int32(n), np.int32(n)],
             grid=(4, 4), block=(16, 16))
    out = client.submit_kernel_graph(g, {"x": x, "b": b}).result()
    np.testing.assert_allclose(out["sp"], np.log1p(np.exp(2 * x)) / 2, rtol=1e-5)
    np.testing.assert_allclose(out["mm"], x @ b, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out["mm2"], x @ b, rtol=1e-4, atol=1e-4)


def test_cuda_kernel_without_cpu_implementation_fails_clearly(client):
    g = KernelGraph("gpu-only")
    x = g.input("x", (4,), np.float32)
    y = g.output("y", (4,), np.float32)
    g.launch(Kernel.cuda('extern "C" __global__ void k(float*a,float*b){}', "k"), [x, Out(y)],
             grid=1, block=4)
    with pytest.raises(KernelDefinitionError, match="kernel 'k'.*no CPU implementation"):
        client.submit_kernel_graph(g, {"x": f32(4)})


def test_n_iter_jacobi(client):
    n, iters = 128, 40
    A, b = jacobi_wl.problem(n, seed=3)
    x0 = np.zeros(n, np.float32)
    out = client.submit_kernel_graph(jacobi_wl.jacobi_graph(n, iters),
                                     {"A": A, "b": b, "x0": x0}).result()
    np.testing.assert_allclose(out["x"], jacobi_wl.reference(A, b, x0, iters), rtol=1e-5,
                               atol=1e-6)
    assert not x0.any()


def test_in_place_inout_runs_n_iter_times(client):
    g = KernelGraph("accumulate", n_iter=7)
    x = g.input("x", (5,), np.float64)
    acc = g.input("acc", (5,), np.float64)  # updated in place: a private copy
    y = g.output("y", (5,), np.float64)
    g.launch(Kernel.library("axpy"), [np.float64(0.5), x, InOut(acc)])
    g.launch(Kernel.library("copy"), [acc, Out(y)])
    xv, av = np.arange(5.0), np.ones(5)
    out = client.submit_kernel_graph(g, {"x": xv, "acc": av}).result()
    np.testing.assert_allclose(out["y"], 1 + 7 * 0.5 * xv)
    np.testing.assert_array_equal(av, np.ones(5))


def test_keep_on_device_chain_is_placed_on_the_holder(client):
    placements = []
    import sgemm_chain  # examples/sgemm_chain.py

    placements = sgemm_chain.main(client, n=64, links=5)
    assert len(set(placements)) == 1, placements


def test_kept_output_reference_goes_to_its_worker(client):
    n = 32
    a, w = f32(n, n), f32(n, n)
    g1, _ = gemm_graph("produce", n, n, x="a", y="h")
    g2 = KernelGraph("consume")
    H2 = g2.input("h", (n, n), np.float32)
    Y = g2.output("y", (n, n), np.float32)
    g2.launch(Kernel.library("relu"), [H2, Out(Y)])
    f1 = client.submit_kernel_graph(g1, {"a": a, "w": w}, keep_on_device=["h"])
    wait(f1)
    before = totals(client)
    for _ in range(5):
        f2 = client.submit_kernel_graph(g2, {"h": f1["h"]})
        np.testing.assert_allclose(f2.result()["y"], np.maximum(a @ w, 0), rtol=1e-5)
        assert where_ran(client, f2) == where_ran(client, f1)
    after = totals(client)
    assert after["hits"] - before["hits"] == 5  # the kept output, found on the device
    assert after["misses"] == before["misses"]
    # The whole-graph result also carries it (as a host copy).
    np.testing.assert_allclose(f1.result()["h"], a @ w, rtol=1e-5)
    np.testing.assert_allclose(f1["h"].result(), a @ w, rtol=1e-5)
    with pytest.raises(KeyError, match="keeps no output 'zz'"):
        f1["zz"]


def host_weights(n, seed):
    return np.random.default_rng(seed).standard_normal((n, n)).astype(np.float32)


def total(outputs):
    return float(sum(v.sum() for v in outputs.values()))


def test_mixing_with_ordinary_dask_futures(client):
    n = 24
    w_fut = client.submit(host_weights, n, 7)  # weights made by a host task
    x_fut = client.scatter(f32(n, n))
    g, _ = gemm_graph("mixed", n, n)
    fut = client.submit_kernel_graph(g, {"x": x_fut, "w": w_fut}, keep_on_device=["y"])
    expect = x_fut.result() @ host_weights(n, 7)
    assert client.submit(total, fut).result() == pytest.approx(float(expect.sum()), rel=1e-4)
    assert client.submit(np.sum, fut["y"]).result() == pytest.approx(float(expect.sum()),
                                                                      rel=1e-4)
    np.testing.assert_allclose(fut.result()["y"], expect, rtol=1e-5)


def test_affinity_const_copied_once_and_graphs_stay(client):
    n = 256  # 256 KiB of weights
    w = f32(n, n)
    g, _ = gemm_graph("affinity", 4, n)
    before = totals(client)
    ran = []
    for _ in range(20):
        x = f32(4, n)
        fut = client.submit_kernel_graph(g, {"x": x, "w": w})
        np.testing.assert_allclose(fut.result()["y"], x @ w, rtol=1e-4, atol=1e-4)
        ran.append(where_ran(client, fut))
    after = totals(client)
    assert len(set(ran)) == 1, (ran, client.run_on_scheduler(placement_state))
    assert after["misses"] - before["misses"] == 1
    assert after["hits"] - before["hits"] == 19
    # bytes copied: the weights once, plus each request's own input
    assert after["bytes_to_device"] - before["bytes_to_device"] == w.nbytes + 20 * 4 * n * 4


def placement_state(dask_scheduler=None):
    p = dask_scheduler.extensions["kaas"]
    return {"queues": p.queues, "dispatch": p.costs.dispatch.value,
            "fetch": p.costs.fetch_latency.value, "h2d": p.costs.h2d.value,
            "runtimes": {k: v.value for k, v in p.costs.runtimes.items()},
            "resident": p.directory.snapshot(), "decisions": list(p.decisions)[-20:]}


def test_placement_holds_under_work_stealing(client):
    """Every graph runs on the worker the plugin pinned it to, even with a
    backlog that Dask's work stealing would like to spread."""
    import dask

    assert dask.config.get("distributed.scheduler.work-stealing")
    n = 128
    w = f32(n, n)
    g, b = gemm_graph("pinned", n, n)
    g.launch(Kernel.array(slow_copy), [b["w"], Out(b["y"])])
    futs = [client.submit_kernel_graph(g, {"x": f32(n, n), "w": w}) for _ in range(30)]
    wait(futs)
    pinned = client.run_on_scheduler(restrictions_of, [f.key for f in futs])
    for f in futs:
        restr, loose = pinned[f.key]
        assert not loose and len(restr) == 1
        assert where_ran(client, f) == restr[0]


def slow_copy(xp, w, y):
    import time

    time.sleep(0.01)
    y[...] = w


def restrictions_of(keys, dask_scheduler=None):
    out = {}
    for k in keys:
        ts = dask_scheduler.tasks[k]
        out[k] = (sorted(ts.worker_restrictions or ()), ts.loose_restrictions)
    return out


def raising_kernel(xp, x, y):
    raise RuntimeError("deliberate failure")


def test_kernel_failure_fails_only_its_request(client):
    n = 16
    w = f32(n, n)
    good, _ = gemm_graph("good", n, n)
    bad, b = gemm_graph("bad", n, n)
    bad.launch(Kernel.array(raising_kernel, name="explode"), [b["x"], Out(b["y"])])
    x = f32(n, n)
    f_bad = client.submit_kernel_graph(bad, {"x": x, "w": w}, tenant="t-bad")
    with pytest.raises(KernelExecutionError) as e:
        f_bad.result()
    assert "'explode'" in str(e.value) and "launch 1" in str(e.value)
    assert "deliberate failure" in str(e.value) and "graph 'bad'" in str(e.value)
    f_good = client.submit_kernel_graph(good, {"x": x, "w": w})
    np.testing.assert_allclose(f_good.result()["y"], x @ w, rtol=1e-4, atol=1e-4)
    st = client.kaas_stats()
    assert st["tenants"]["t-bad"]["errors"] == 1
    for ws in st["workers"].values():
        assert ws["private_bytes"] == 0 and ws["used_bytes"] == ws["cached_bytes"]


def test_submit_time_errors(client):
    g = KernelGraph("huge")
    x = g.input("x", (1,), np.float32)
    t = g.temp("t", (300 * 2**20 // 4,), np.float32)  # 300 MB, workers hold 256 MB
    y = g.output("y", (1,), np.float32)
    g.launch(Kernel.library("copy"), [x, Out(y)])
    g.launch(Kernel.array(touch), [x, Out(t)])
    with pytest.raises(GraphTooLargeError, match="'huge'"):
        client.submit_kernel_graph(g, {"x": f32(1)})
    small = KernelGraph("small")
    x = small.input("x", (2,), np.float32)
    y = small.output("y", (2,), np.float32)
    small.launch(Kernel.library("copy"), [x, Out(y)])
    with pytest.raises(BufferRoleError, match="only outputs"):
        client.submit_kernel_graph(small, {"x": f32(2)}, keep_on_device=["x"])
    wrong = client.scatter(np.zeros(3, np.float32))
    with pytest.raises(InputMismatchError, match="'x'.*shape \\(3,\\)"):
        client.submit_kernel_graph(small, {"x": wrong}).result()


def touch(xp, x, t):
    t[:1] = x


def test_module_level_submit_uses_default_client(client):
    small = KernelGraph("default-client")
    x = small.input("x", (3,), np.float32)
    y = small.output("y", (3,), np.float32)
    small.launch(Kernel.library("relu"), [In(x), Out(y)])
    xv = np.array([-1, 0, 2], np.float32)
    out = dask_kaas.submit_kernel_graph(small, {"x": xv}, client=client).result()
    np.testing.assert_array_equal(out["y"], [0, 0, 2])


def test_workers_sharing_a_device_are_told_how_many_share_it():
    """Each worker sizes its RMM pool from the device's free memory divided
    by ``kaas.workers-per-device``: the cluster must hand the count to the
    worker processes (a Nanny passes only its own config on), and keep the
    rest of the ``kaas`` section and the caller's own worker config."""
    import dask
    from distributed import Client

    from dask_kaas import LocalKaasCluster

    with dask.config.set({"kaas.max-n-iter": 777}):
        with LocalKaasCluster(2, backend="cpu", workers_per_device=2, dashboard_address=None,
                              config={"custom-setting": 5}) as cluster, Client(cluster) as c:
            seen = c.run(lambda: (dask.config.get("kaas.workers-per-device"),
                                  dask.config.get("kaas.max-n-iter"),
                                  dask.config.get("custom-setting")))
    assert sorted(seen.values()) == [(2, 777, 5), (2, 777, 5)]


def test_workers_per_device_config_must_be_a_dict():
    from dask_kaas import LocalKaasCluster
    from dask_kaas.graph.errors import KaasError

    with pytest.raises(KaasError, match="config must be a dict"):
        LocalKaasCluster(2, backend="cpu", workers_per_device=2, config=["x"])


def test_a_closing_workers_aborted_heartbeat_is_not_logged_as_an_error():
    """Worker.close closes its connections under a heartbeat in flight and
    Dask logs an ERROR with a traceback (seen at the end of the demo under
    load); demoted only while this process's KaaS workers are closing."""
    import logging

    from distributed.comm.core import CommClosedError

    from dask_kaas import LocalKaasCluster
    from dask_kaas.plugin.quiet_close import HEARTBEAT_FAILED

    seen = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record)

    log = logging.getLogger("distributed.worker")
    handler = Keep(level=logging.ERROR)
    log.addHandler(handler)

    def heartbeat_failed(error):
        try:
            raise error
        except Exception:
            log.exception(HEARTBEAT_FAILED)

    try:
        with LocalKaasCluster(1, backend="cpu", processes=False, protocol="tcp",
                              dashboard_address=None) as c:
            (nanny_or_worker,) = c.workers.values()
            heartbeat_failed(CommClosedError("in <TCP (closed)>: Stream is closed"))
            assert len(seen) == 1  # a running worker: a real failure, logged
        assert nanny_or_worker.status.name == "closed"
        heartbeat_failed(CommClosedError("in <TCP (closed)>: Stream is closed"))
        assert len(seen) == 1  # the worker closed its own connection: demoted
        heartbeat_failed(RuntimeError("something else"))
        log.error("another error of a closed worker")
        assert [r.getMessage() for r in seen[1:]] == [HEARTBEAT_FAILED,
                                                      "another error of a closed worker"]
    finally:
        log.removeHandler(handler)
