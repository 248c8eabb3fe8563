"""A graph's report leaves its worker in the same write as Dask's own
task-finished (or task-erred) message for it, and before it (issue 20):
sent a tick earlier on its own, it opened the worker stream's batching
interval and Dask's message waited it out."""

from __future__ import annotations

import numpy as np
import pytest
from kaas_graphs import unary_graph

from dask_kaas import KaasClient, KernelGraph, LocalKaasCluster
from dask_kaas.graph.errors import KaasError
from dask_kaas.plugin.worker import PLUGIN_NAME, UPDATE_OP

N = 16


def scale(xp, x, y):
    if float(x[0]) < 0:
        raise ValueError("negative")
    y[...] = 2 * x


def graph() -> KernelGraph:
    return unary_graph("report-tick", scale, N)


def _record(dask_worker):
    comm = dask_worker.batched_stream.comm
    writes = []
    old = comm.write

    def write(msgs, *args, **kwargs):
        ops = []
        for m in msgs if isinstance(msgs, list) else [msgs]:
            if m.get("op") == UPDATE_OP:
                ops += [("report", r.get("key")) for r in m.get("reports") or ()]
            elif m.get("op") in ("task-finished", "task-erred"):
                ops.append((m["op"], m.get("key")))
        if ops:
            writes.append(ops)
        return old(msgs, *args, **kwargs)

    comm.write = write
    dask_worker._kaas_test_writes = (comm, old, writes)


def _collect(dask_worker):
    comm, old, writes = dask_worker._kaas_test_writes
    comm.write = old
    del dask_worker._kaas_test_writes
    return writes


def _setting(dask_worker, value):
    dask_worker.plugins[PLUGIN_NAME].report_with_result = value


@pytest.fixture(scope="module")
def rc():
    with LocalKaasCluster(1, backend="cpu", dashboard_address="127.0.0.1:0",
                          device_memory_limit="64MB") as cluster, KaasClient(cluster) as c:
        yield c


def _run(c, xs):
    c.run(_record)
    futs = []
    try:
        for v in xs:
            f = c.submit_kernel_graph(graph(), {"x": np.full(N, v, np.float32)}, tenant="rt")
            futs.append(f.key)
            if v < 0:
                with pytest.raises(KaasError):
                    f.result()
            else:
                np.testing.assert_allclose(f.result()["y"], 2 * v)
    finally:
        (writes,) = c.run(_collect).values()
    return futs, writes


def test_report_travels_in_the_same_write_as_task_finished_and_before_it(rc):
    keys, writes = _run(rc, [1, 2, -1, 3])
    for key in keys:
        holding = [w for w in writes if ("report", key) in w]
        assert len(holding) == 1, (key, writes)
        ops = holding[0]
        done = [op for op in ops if op[1] == key and op[0] != "report"]
        assert done, (key, writes)  # Dask's own message in the same write
        assert ops.index(("report", key)) < ops.index(done[0])
    st = rc.kaas_stats()["tenants"]["rt"]
    assert st["graphs_run"] >= 3


def test_report_on_its_own_when_turned_off(rc):
    rc.run(_setting, value=False)
    try:
        keys, writes = _run(rc, [4, 5])
    finally:
        rc.run(_setting, value=True)
    for key in keys:
        assert any(("report", key) in w for w in writes), writes


def test_a_held_report_whose_transition_never_comes_goes_with_the_periodic_flush(rc):
    def hold(dask_worker):
        p = dask_worker.plugins[PLUGIN_NAME]
        p._held["never-ran"] = {"key": "never-ran", "tenant": "rt-stale", "graph": "g",
                                "error": None, "hits": 0, "misses": 0}
        p._periodic_flush()
        first = "never-ran" in p._held
        p._periodic_flush()
        return first, "never-ran" in p._held

    (res,) = rc.run(hold).values()
    assert res == (True, False)
