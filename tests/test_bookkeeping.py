"""Exact request bookkeeping on every path a Dask task can take.

Every test drives a real cluster and reads the scheduler plugin's tables
(through ``run_on_scheduler``): a request must be counted once, however it
ends, and leave no booking behind (fair share, worker queues, plans).
"""

from __future__ import annotations

import gc
import os
import signal
import time
from typing import Any

import numpy as np
import pytest
from distributed import as_completed, wait
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from kaas_graphs import unary_graph

from dask_kaas import KaasClient, Kernel, KernelGraph, LocalKaasCluster, Out

N = 64


def scale(xp, x, w, y, seconds):
    time.sleep(float(seconds))
    y[...] = 2 * x + w


def explode(xp, x, y):
    raise ValueError("kernel refuses")


def graph(name="book", seconds=0.02, const=True):
    g = KernelGraph(name)
    x = g.input("x", (N,), np.float32)
    w = (g.const if const else g.input)("w", (N,), np.float32)
    y = g.output("y", (N,), np.float32)
    g.launch(Kernel.array(scale), [x, w, Out(y), np.float64(seconds)])
    return g


def failing_graph():
    return unary_graph("book-fails", explode, N)


def late_failure(seconds):
    time.sleep(seconds)
    raise RuntimeError("input task fails")


def book(client, tenant=None):
    """The plugin's bookkeeping, read on the scheduler."""

    def read(dask_scheduler, tenant=tenant):
        p = dask_scheduler.extensions["kaas"]
        t = p.tenants.get(tenant)
        return {
            "tenant": t.to_dict(time.time()) if t is not None else None,
            "requests": len(p.requests),
            "tenant_requests": sum(r.request.tenant == tenant for r in p.requests.values()),
            # The dispatcher's fair-share backlog and released requests.
            "backlog": len(p.dispatch.queue),
            "running": p.dispatch.queue.running(),
            "queued": sum(len(q) for q in p.queues.values()),
            "free_at": len(p.free_at),
            "planned": sum(sum(h.values()) for h in p.directory._planned.values()),
        }

    return client.run_on_scheduler(read)


def settle(client, tenant, until, timeout=30.0):
    """Poll the scheduler until ``until(state)`` holds (Dask forgets
    released keys asynchronously); the last state is returned either way."""
    deadline = time.monotonic() + timeout
    while True:
        st = book(client, tenant)
        if until(st) or time.monotonic() > deadline:
            return st
        time.sleep(0.05)


def idle(st):
    """Nothing booked anywhere."""
    return (st["backlog"] == 0 and st["running"] == 0 and st["queued"] == 0
            and st["free_at"] == 0 and st["planned"] == 0)


def rng_inputs(n, seed, w):
    rng = np.random.default_rng(seed)
    return [{"x": rng.random(N, dtype=np.float32), "w": w} for _ in range(n)]


@pytest.fixture(scope="module")
def bk_client():
    with LocalKaasCluster(2, backend="cpu", dashboard_address="127.0.0.1:0",
                          device_memory_limit="64MB") as cluster, KaasClient(cluster) as c:
        yield c


def test_request_whose_input_errs_is_finished(bk_client):
    """Item 3: the input future fails, so the request goes erred from
    waiting (not from processing): it must still end, once."""
    c = bk_client
    g = graph()
    w = np.ones(N, np.float32)
    early = c.submit(late_failure, 0.0, pure=False)
    wait(early)
    late = c.submit(late_failure, 0.3, pure=False)
    futs = (c.map_kernel_graph(g, [{"x": early, "w": w}] * 50, tenant="t-input")
            + c.map_kernel_graph(g, [{"x": late, "w": w}] * 50, tenant="t-input"))
    for f in futs:
        with pytest.raises(RuntimeError, match="input task fails"):
            f.result()
    st = settle(c, "t-input", lambda st: idle(st) and st["tenant"]["in_flight"] == 0)
    t = st["tenant"]
    assert (t["submitted"], t["errors"], t["graphs_run"], t["in_flight"]) == (100, 100, 0, 0)
    assert idle(st), st
    ok = c.submit_kernel_graph(g, {"x": np.ones(N, np.float32), "w": w}, tenant="t-input")
    np.testing.assert_array_equal(ok.result()["y"], np.full(N, 3, np.float32))
    # The raised exceptions hold this frame (and so the futures) for the
    # client's future states: let go explicitly.
    del futs, early, late, ok


def test_kernel_error_is_counted_once(bk_client):
    c = bk_client
    futs = c.map_kernel_graph(failing_graph(), [{"x": np.ones(N, np.float32)}] * 12,
                              tenant="t-kernel-error")
    wait(futs)
    assert all(f.status == "error" for f in futs)
    st = settle(c, "t-kernel-error", lambda st: idle(st))
    t = st["tenant"]
    assert (t["submitted"], t["errors"], t["graphs_run"], t["in_flight"]) == (12, 12, 0, 0)
    assert idle(st), st


def test_cancelled_requests_leave_nothing_in_flight(bk_client):
    c = bk_client
    w = np.ones(N, np.float32)
    futs = c.map_kernel_graph(graph(seconds=0.05), rng_inputs(40, 1, w), tenant="t-cancel")
    next(as_completed(futs))
    c.cancel(futs)
    st = settle(c, "t-cancel", lambda st: st["tenant"]["in_flight"] == 0 and idle(st))
    t = st["tenant"]
    assert t["in_flight"] == 0 and t["submitted"] == 40, t
    assert t["graphs_run"] + t["cancelled"] == 40 and t["cancelled"] >= 20, t
    assert t["graphs_run"] >= 1 and t["errors"] == 0, t
    assert idle(st), st


def test_released_futures_and_a_client_that_leaves(bk_client):
    """Futures dropped unfinished, and a client that disconnects with work
    queued: Dask forgets the tasks, the plugin counts them cancelled."""
    c = bk_client
    w = np.ones(N, np.float32)
    futs = c.map_kernel_graph(graph(seconds=0.05), rng_inputs(30, 2, w), tenant="t-drop")
    del futs
    with KaasClient(c.scheduler.address) as other:
        other.map_kernel_graph(graph(seconds=0.05), rng_inputs(30, 3, w), tenant="t-gone")
        time.sleep(0.2)
    for tenant in ("t-drop", "t-gone"):
        st = settle(c, tenant, lambda st: st["tenant"]["in_flight"] == 0 and idle(st))
        t = st["tenant"]
        assert t["in_flight"] == 0 and t["submitted"] == 30, (tenant, t)
        assert t["graphs_run"] + t["cancelled"] == 30 and t["cancelled"] >= 1, (tenant, t)
    assert idle(st), st


def test_retried_request_is_a_new_attempt(bk_client):
    c = bk_client
    futs = c.map_kernel_graph(failing_graph(), [{"x": np.ones(N, np.float32)}] * 3,
                              tenant="t-retry")
    wait(futs)
    c.retry(futs)
    wait(futs)
    st = settle(c, "t-retry", lambda st: st["tenant"]["in_flight"] == 0 and idle(st))
    t = st["tenant"]
    assert (t["submitted"], t["errors"], t["in_flight"]) == (6, 6, 0), t
    assert idle(st), st


def kill(client, addr):
    pid = client.run(os.getpid, workers=[addr])[addr]
    os.kill(pid, signal.SIGKILL)


def test_worker_loss_and_recomputation_count_each_request_once():
    """A worker dies with requests queued on it, then another dies holding
    finished results, which Dask recomputes: every request is run once in
    the tenant's figures, the reruns show as recomputed, nothing stays booked.
    (Inputs travel inline here: losing every copy of a const is
    test_consts's subject.)"""
    with LocalKaasCluster(2, backend="cpu", dashboard_address="127.0.0.1:0",
                          device_memory_limit="64MB") as cluster, KaasClient(cluster) as c:
        w = np.full(N, 0.5, np.float32)
        inputs = rng_inputs(40, 4, w)
        futs = c.map_kernel_graph(graph(seconds=0.03, const=False), inputs, tenant="t-loss")
        done = 0
        for _ in as_completed(futs):
            done += 1
            if done == 8:
                break
        kill(c, sorted(c.scheduler_info()["workers"])[0])
        for inp, f in zip(inputs, futs):
            np.testing.assert_allclose(f.result(timeout=60)["y"], 2 * inp["x"] + w)
        st = settle(c, "t-loss", idle)
        t = st["tenant"]
        assert (t["submitted"], t["graphs_run"], t["errors"], t["in_flight"]) == (40, 40, 0, 0)
        assert idle(st), st
        before = t["recomputed"]  # results the first victim held were rerun too
        # Now lose finished results: the client still wants them, Dask reruns them.
        c.wait_for_workers(2, timeout=30)
        who = c.who_has(futs)
        holder = max(c.scheduler_info()["workers"],
                     key=lambda a: sum(a in who[f.key] for f in futs))
        lost = sum(who[f.key] == (holder,) for f in futs)
        assert lost >= 1
        kill(c, holder)
        for inp, f in zip(inputs, futs):
            np.testing.assert_allclose(f.result(timeout=60)["y"], 2 * inp["x"] + w)
        st = settle(c, "t-loss",
                    lambda st: idle(st) and st["tenant"]["recomputed"] >= before + lost)
        t = st["tenant"]
        assert (t["submitted"], t["graphs_run"], t["errors"], t["in_flight"]) == (40, 40, 0, 0)
        assert t["recomputed"] == before + lost, (t, before, lost)
        assert idle(st), st


class BookMachine(RuleBasedStateMachine):
    """Random sequences of submissions that succeed, fail in the kernel or
    fail through an input, cancellations, dropped futures, retries and a
    worker kill, against the real scheduler: at every step no tenant's
    figures exceed what was submitted, and once everything settles each
    request is counted exactly once and nothing stays booked."""

    client: KaasClient
    examples = 0

    def __init__(self) -> None:
        super().__init__()
        BookMachine.examples += 1
        self.prefix = f"m{BookMachine.examples}-"
        self.held: list[tuple[str, str, Any]] = []  # (tenant, kind, future)
        self.model: dict[str, dict[str, int]] = {}
        self.kills = 0

    def _count(self, tenant: str, kind: str, n: int) -> None:
        # ok/fail: requests submitted that would succeed/fail; cancel_ok and
        # drop_fail: those let go early (each may still have ended first).
        m = self.model.setdefault(tenant, {"ok": 0, "fail": 0, "cancel_ok": 0, "drop_fail": 0})
        m[kind] += n

    @rule(n=st.integers(1, 6), tenant=st.sampled_from("abc"), seconds=st.sampled_from([0, 0.02]))
    def submit_ok(self, n, tenant, seconds):
        tenant = self.prefix + tenant
        w = np.ones(N, np.float32)
        futs = self.client.map_kernel_graph(graph("m-ok", seconds, const=False),
                                            rng_inputs(n, n, w), tenant=tenant)
        self.held += [(tenant, "ok", f) for f in futs]
        self._count(tenant, "ok", n)

    @rule(n=st.integers(1, 4), tenant=st.sampled_from("abc"))
    def submit_failing_kernel(self, n, tenant):
        tenant = self.prefix + tenant
        futs = self.client.map_kernel_graph(failing_graph(), [{"x": np.ones(N, np.float32)}] * n,
                                            tenant=tenant)
        self.held += [(tenant, "fail", f) for f in futs]
        self._count(tenant, "fail", n)

    @rule(n=st.integers(1, 4), tenant=st.sampled_from("abc"), delay=st.sampled_from([0, 0.05]))
    def submit_failing_input(self, n, tenant, delay):
        tenant = self.prefix + tenant
        bad = self.client.submit(late_failure, delay, pure=False)
        w = np.ones(N, np.float32)
        futs = self.client.map_kernel_graph(graph("m-in", 0, const=False),
                                            [{"x": bad, "w": w}] * n, tenant=tenant)
        self.held += [(tenant, "fail", f) for f in futs]
        self._count(tenant, "fail", n)

    @rule(data=st.data())
    def cancel_some(self, data):
        oks = [h for h in self.held if h[1] == "ok"]
        if not oks:
            return
        # Draw positions, not futures: Hypothesis keeps what it draws.
        picks = data.draw(st.lists(st.integers(0, len(oks) - 1), max_size=4, unique=True))
        chosen = [oks[i] for i in picks]
        self.client.cancel([f for _, _, f in chosen])
        for h in chosen:
            self.held.remove(h)
            self._count(h[0], "cancel_ok", 1)

    @rule(data=st.data())
    def drop_some(self, data):
        if not self.held:
            return
        picks = data.draw(st.lists(st.integers(0, len(self.held) - 1), max_size=4, unique=True))
        chosen = [self.held[i] for i in picks]
        for h in chosen:
            self.held.remove(h)
            self._count(h[0], "cancel_ok" if h[1] == "ok" else "drop_fail", 1)

    @rule()
    def retry_failures(self):
        failed = [h for h in self.held if h[1] == "fail" and h[2].status == "error"]
        if failed:
            self.client.retry([f for _, _, f in failed])
            for tenant, _, _ in failed:
                self._count(tenant, "fail", 1)

    @precondition(lambda self: self.kills == 0)
    @rule()
    def kill_a_worker(self):
        self.kills += 1
        self.client.wait_for_workers(2, timeout=30)
        try:
            kill(self.client, sorted(self.client.scheduler_info()["workers"])[-1])
        except (OSError, KeyError):  # (CommClosedError too) a worker still starting
            pass

    @invariant()
    def never_more_than_submitted(self):
        for tenant, m in self.model.items():
            t = book(self.client, tenant)["tenant"]
            if t is None:
                continue
            assert t["in_flight"] >= 0, t
            assert t["errors"] <= m["fail"], (t, m)
            assert t["graphs_run"] <= m["ok"], (t, m)
            assert t["cancelled"] <= m["cancel_ok"] + m["drop_fail"], (t, m)

    def teardown(self):
        wait([f for _, _, f in self.held], timeout=60)
        statuses = [(kind, f.status) for _, kind, f in self.held]
        self.held.clear()
        # A failed future's exception holds the frames that raised it, and so
        # its futures: a cycle only the collector frees.
        gc.collect()
        for kind, status in statuses:
            assert status == ("finished" if kind == "ok" else "error"), (kind, status)
        self.client.wait_for_workers(2, timeout=30)
        for tenant, m in self.model.items():
            st = settle(self.client, tenant,
                        lambda st: st["tenant_requests"] == 0 and idle(st)
                        and st["tenant"]["in_flight"] == 0)
            t = st["tenant"]
            assert t["submitted"] == m["ok"] + m["fail"], (t, m)
            assert t["graphs_run"] + t["errors"] + t["cancelled"] == t["submitted"], (t, m)
            assert m["fail"] - m["drop_fail"] <= t["errors"] <= m["fail"], (t, m)
            assert m["ok"] - m["cancel_ok"] <= t["graphs_run"] <= m["ok"], (t, m)
            assert t["cancelled"] <= m["cancel_ok"] + m["drop_fail"], (t, m)
            assert t["in_flight"] == 0, (t, m)
            assert st["tenant_requests"] == 0 and idle(st), st


def test_bookkeeping_state_machine(bk_client):
    BookMachine.client = bk_client
    run_state_machine_as_test(BookMachine, settings=settings(
        max_examples=int(os.environ.get("KAAS_MACHINE_EXAMPLES", 6)), stateful_step_count=8,
        deadline=None, suppress_health_check=list(HealthCheck)))
