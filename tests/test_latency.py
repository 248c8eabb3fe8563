"""The control-plane cuts of issue 20, as behaviour: a graph released at
submission (no release pass) still keeps the in-flight bound and fair order,
counts exactly, and falls back to the hold when Dask cannot send it yet; the
streams' batching intervals are shortened as configured."""

from __future__ import annotations

import threading
import time

import dask
import numpy as np
import pytest
from distributed.diagnostics.plugin import SchedulerPlugin

from dask_kaas import InOut, KaasClient, Kernel, KernelGraph, LocalKaasCluster, Out

N = 64


def sleep_scale(xp, x, y, seconds):
    time.sleep(float(seconds))
    y[...] = 2 * x


def graph(seconds: float, name: str = "lat") -> KernelGraph:
    g = KernelGraph(name)
    x = g.input("x", (N,), np.float32)
    w = g.const("w", (N,), np.float32)
    y = g.output("y", (N,), np.float32)
    g.launch(Kernel.array(sleep_scale), [x, Out(y), np.float64(seconds)])
    g.launch(Kernel.library("axpy"), [np.float32(1), w, InOut(y)])
    return g


def inputs(i, w):
    return {"x": np.full(N, i, np.float32), "w": w}


class Starts(SchedulerPlugin):
    """Records, for each graph task that reaches a worker, the state it came
    from (``waiting``: released at submission; ``no-worker``: held, then
    released by a pass), its tenant, the backlog then, and the most graphs
    ever processing on one worker."""

    name = "kaas-test-latency-starts"

    def __init__(self) -> None:
        self.starts: list[tuple[str, str, str, dict[str, int]]] = []
        self.peak: dict[str, int] = {}
        self.scheduler = None

    async def start(self, scheduler):
        self.scheduler = scheduler

    def transition(self, key, start, finish, *args, **kwargs):
        if finish != "processing":
            return
        kaas = self.scheduler.extensions.get("kaas")
        rec = kaas.requests.get(key) if kaas is not None else None
        if rec is None:
            return
        self.starts.append((key, start, rec.request.tenant, kaas.dispatch.queue.backlog()))
        ws = self.scheduler.tasks[key].processing_on
        n = sum(1 for t in ws.processing if t.key in kaas.requests)
        self.peak[ws.address] = max(self.peak.get(ws.address, 0), n)


def observed(c):
    return c.run_on_scheduler(lambda dask_scheduler: (
        list(dask_scheduler.plugins[Starts.name].starts),
        dict(dask_scheduler.plugins[Starts.name].peak)))


def reset(c):
    def clear(dask_scheduler):
        p = dask_scheduler.plugins[Starts.name]
        p.starts.clear()
        p.peak.clear()

    c.run_on_scheduler(clear)


def dispatch_state(c):
    return c.run_on_scheduler(
        lambda dask_scheduler: dask_scheduler.extensions["kaas"].dispatch.snapshot())


def tenant_stats(c, tenant):
    return c.kaas_stats()["tenants"][tenant]


@pytest.fixture(scope="module")
def lat_client():
    with LocalKaasCluster(2, backend="cpu", dashboard_address="127.0.0.1:0",
                          device_memory_limit="64MB") as cluster, KaasClient(cluster) as c:
        c.register_plugin(Starts())
        yield c


def test_one_request_at_a_time_is_released_at_submission_and_counted_once(lat_client):
    c = lat_client
    g = graph(0.0, "lat-one")
    w = np.ones(N, np.float32)
    c.submit_kernel_graph(g, inputs(0, w), tenant="solo").result()  # the const is there now
    reset(c)
    before = dispatch_state(c)
    for i in range(20):
        np.testing.assert_allclose(
            c.submit_kernel_graph(g, inputs(i, w), tenant="solo").result()["y"], 2 * i + 1)
    starts, _ = observed(c)
    after = dispatch_state(c)
    # Nothing was held: each went straight from waiting to its worker, and
    # was booked (charged, counted as a release) like any release.
    assert [s[1] for s in starts] == ["waiting"] * 20, starts
    assert after["releases_at_submit"] - before["releases_at_submit"] == 20
    assert after["releases"] - before["releases"] == 20
    assert after["backlog"] == {} and after["in_flight"] == {} and after["running"] == 0
    st = tenant_stats(c, "solo")
    assert st["submitted"] == st["graphs_run"] == 21 and st["in_flight"] == 0
    assert st["errors"] == st["cancelled"] == 0


def test_concurrent_single_submissions_keep_the_in_flight_bound(lat_client):
    """Many threads each submitting one request at a time: the ones that
    find a free slot go at submission, the rest are held; a worker never has
    more than slots x (1 + prefetch) graphs."""
    c = lat_client
    g = graph(0.01, "lat-threads")
    w = np.ones(N, np.float32)
    c.submit_kernel_graph(g, inputs(0, w), tenant="threads").result()
    reset(c)
    errors: list[BaseException] = []

    def loop(t: int) -> None:
        try:
            for i in range(15):
                v = 100 * t + i
                got = c.submit_kernel_graph(g, inputs(v, w), tenant=f"th{t % 2}").result()
                np.testing.assert_allclose(got["y"], 2 * v + 1)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=loop, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    starts, peak = observed(c)
    assert len(starts) == 120
    kinds = {s[1] for s in starts}
    assert kinds <= {"waiting", "no-worker"}, kinds
    assert len(peak) == 2 and max(peak.values()) <= 2, peak  # slots x (1 + prefetch)
    # A release at submission only ever happens with nothing held.
    assert all(not backlog for _, start, _, backlog in starts if start == "waiting"), starts
    state = dispatch_state(c)
    assert state["backlog"] == {} and state["in_flight"] == {} and state["running"] == 0
    for tenant in ("th0", "th1"):
        st = tenant_stats(c, tenant)
        assert st["submitted"] == st["graphs_run"] == 60 and st["in_flight"] == 0


def test_a_new_tenant_behind_a_backlog_is_held_and_goes_in_fair_order(lat_client):
    """While another tenant has requests held, a new submission is not
    released at submission (it would jump the fair order): it is held, and
    the fair order puts it ahead of the backlog."""
    c = lat_client
    g = graph(0.02, "lat-fair")
    w = np.ones(N, np.float32)
    c.submit_kernel_graph(g, inputs(0, w), tenant="heavy").result()
    reset(c)
    heavy = c.map_kernel_graph(g, [inputs(i, w) for i in range(40)], tenant="heavy")
    time.sleep(0.1)
    light = c.submit_kernel_graph(g, inputs(7, w), tenant="light")
    np.testing.assert_allclose(light.result()["y"], 15)
    for i, f in enumerate(heavy):
        np.testing.assert_allclose(f.result()["y"], 2 * i + 1)
    starts, peak = observed(c)
    order = [s[0] for s in starts]
    light_start = next(s for s in starts if s[0] == light.key)
    assert light_start[1] == "no-worker", light_start  # held, not released at submission
    # Fair order: light (no device time used yet) goes before most of heavy.
    assert order.index(light.key) < 20, order.index(light.key)
    assert max(peak.values()) <= 2, peak


def test_a_request_whose_input_is_not_ready_is_held_not_released_at_submission(lat_client):
    c = lat_client
    g = graph(0.0, "lat-dep")
    w = np.ones(N, np.float32)
    reset(c)
    x = c.submit(lambda: (time.sleep(0.3), np.full(N, 3, np.float32))[1], pure=False)
    f = c.submit_kernel_graph(g, {"x": x, "w": w}, tenant="dep")
    np.testing.assert_allclose(f.result()["y"], 7)
    starts, _ = observed(c)
    (start,) = [s for s in starts if s[0] == f.key]
    assert start[1] == "no-worker", start
    st = tenant_stats(c, "dep")
    assert st["submitted"] == st["graphs_run"] == 1


def test_release_at_submission_can_be_turned_off(lat_client):
    c = lat_client
    g = graph(0.0, "lat-off")
    w = np.ones(N, np.float32)
    c.submit_kernel_graph(g, inputs(0, w), tenant="off").result()

    def setting(dask_scheduler, value):
        dask_scheduler.extensions["kaas"].dispatch.release_at_submit = value

    reset(c)
    c.run_on_scheduler(setting, value=False)
    try:
        for i in range(5):
            np.testing.assert_allclose(
                c.submit_kernel_graph(g, inputs(i, w), tenant="off").result()["y"], 2 * i + 1)
    finally:
        c.run_on_scheduler(setting, value=True)
    starts, _ = observed(c)
    assert [s[1] for s in starts] == ["no-worker"] * 5


def test_stream_intervals_are_shortened_as_configured(lat_client):
    c = lat_client
    g = graph(0.0, "lat-int")
    c.submit_kernel_graph(g, inputs(1, np.ones(N, np.float32)), tenant="int").result()
    assert c.scheduler_comm.interval == pytest.approx(0.001)
    intervals = c.run_on_scheduler(lambda dask_scheduler: [
        comm.interval for comm in dask_scheduler.stream_comms.values()])
    assert intervals and all(i == pytest.approx(0.001) for i in intervals), intervals


def test_client_stream_interval_setting_is_respected():
    with dask.config.set({"kaas.client-stream-interval": "4ms"}), \
            LocalKaasCluster(1, backend="cpu", dashboard_address="127.0.0.1:0",
                             device_memory_limit="64MB") as cluster, \
            KaasClient(cluster) as c:
        c.submit_kernel_graph(graph(0.0, "lat-cfg"), inputs(1, np.ones(N, np.float32)),
                              tenant="cfg").result()
        assert c.scheduler_comm.interval == pytest.approx(0.004)
