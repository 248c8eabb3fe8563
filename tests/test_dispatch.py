"""Late binding on a real cluster: graphs wait in the scheduler, in fair
order, and reach a worker only when it has a free slot."""

from __future__ import annotations

import os
import signal
import time

import dask
import numpy as np
import pytest
from distributed import as_completed, get_worker, wait
from distributed.diagnostics.plugin import SchedulerPlugin

from dask_kaas import InOut, KaasClient, Kernel, KernelGraph, LocalKaasCluster, Out
from dask_kaas.plugin.dispatcher import HOLD

N = 64


def slow_on_worker_zero(xp, x, y, seconds):
    """Sleeps 4x longer on the worker named 0: a slow device."""
    time.sleep(float(seconds) * (4 if get_worker().name == 0 else 1))
    y[...] = 2 * x


def fails_until_marked(xp, x, y, marker):
    if not os.path.exists(str(marker)):
        raise RuntimeError("marker missing")
    y[...] = 2 * x


def graph(seconds=0.01, kernel=slow_on_worker_zero, name="late"):
    g = KernelGraph(name)
    x = g.input("x", (N,), np.float32)
    w = g.const("w", (N,), np.float32)
    y = g.output("y", (N,), np.float32)
    g.launch(Kernel.array(kernel), [x, Out(y), np.float64(seconds)])
    g.launch(Kernel.library("axpy"), [np.float32(1), w, InOut(y)])
    return g


def plain_graph(seconds):
    g = KernelGraph("plain")
    x = g.input("x", (N,), np.float32)
    w = g.const("w", (N,), np.float32)
    y = g.output("y", (N,), np.float32)
    g.launch(Kernel.array(sleep_scale), [x, Out(y), np.float64(seconds)])
    g.launch(Kernel.library("axpy"), [np.float32(1), w, InOut(y)])
    return g


def sleep_scale(xp, x, y, seconds):
    time.sleep(float(seconds))
    y[...] = 2 * x


class InFlightObserver(SchedulerPlugin):
    """Records the most KaaS graph tasks ever processing on each worker, and
    each release's tenant with the backlog at that moment."""

    name = "kaas-test-in-flight"

    def __init__(self) -> None:
        self.peak: dict[str, int] = {}
        self.releases: list[tuple[str, dict[str, int]]] = []
        self.scheduler = None

    async def start(self, scheduler):
        self.scheduler = scheduler

    def transition(self, key, start, finish, *args, **kwargs):
        if finish != "processing" or not str(key).startswith("kaas-"):
            return
        kaas = self.scheduler.extensions.get("kaas")
        rec = kaas.requests.get(key) if kaas is not None else None
        if rec is not None and start == "no-worker":
            self.releases.append((rec.request.tenant, kaas.dispatch.queue.backlog()))
        ts = self.scheduler.tasks.get(key)
        ws = ts.processing_on if ts is not None else None
        if ws is None:
            return
        n = sum(1 for t in ws.processing if str(t.key).startswith("kaas-")
                and "-out-" not in str(t.key))
        self.peak[ws.address] = max(self.peak.get(ws.address, 0), n)


def peak_in_flight(c):
    return c.run_on_scheduler(
        lambda dask_scheduler: dict(dask_scheduler.plugins[InFlightObserver.name].peak))


def dispatch_state(c):
    return c.run_on_scheduler(
        lambda dask_scheduler: dask_scheduler.extensions["kaas"].dispatch.snapshot())


@pytest.fixture(scope="module")
def lb_client():
    with LocalKaasCluster(2, backend="cpu", dashboard_address="127.0.0.1:0",
                          device_memory_limit="64MB") as cluster, KaasClient(cluster) as c:
        c.register_plugin(InFlightObserver())
        yield c


def inputs(i, w):
    return {"x": np.full(N, i, np.float32), "w": w}


@pytest.mark.parametrize("policy", ["affinity", "dask", "round_robin"])
def test_flood_of_separate_submissions_keeps_one_plus_prefetch_per_worker(lb_client, policy):
    c = lb_client
    g = plain_graph(0.002)
    w = np.ones(N, np.float32)
    c.run_on_scheduler(lambda dask_scheduler: dask_scheduler.plugins[
        InFlightObserver.name].peak.clear())
    c.kaas_set_policy(policy)
    try:
        futs = [c.submit_kernel_graph(g, inputs(i, w), tenant=f"t{i % 3}") for i in range(300)]
        for i, f in enumerate(futs):
            np.testing.assert_allclose(f.result()["y"], 2 * i + 1)
    finally:
        c.kaas_set_policy("affinity")
    peak = peak_in_flight(c)
    assert len(peak) == 2 and max(peak.values()) <= 2, peak  # slots x (1 + prefetch)
    state = dispatch_state(c)
    assert state["backlog"] == {} and state["in_flight"] == {} and state["running"] == 0
    assert state["releases"] >= 300
    # The room kept up to date release by release matches a full recount.
    assert state["room"] == {w: 2 for w in c.scheduler_info()["workers"]}, state["room"]


def test_slow_worker_gets_about_a_fifth_of_the_work(lb_client):
    c = lb_client
    g = graph(0.01)
    w = np.ones(N, np.float32)
    futs = [c.submit_kernel_graph(g, inputs(i, w)) for i in range(200)]
    wait(futs)
    names = c.run(lambda dask_worker: dask_worker.name)
    slow = next(a for a, n in names.items() if n == 0)
    who = c.who_has(futs)
    on_slow = sum(1 for f in futs if who[f.key] == (slow,))
    assert on_slow <= 200 / 3, on_slow  # pinned at submission: 100 of 200


def test_weights_two_to_one_with_interleaved_separate_submissions(lb_client):
    c = lb_client
    g = plain_graph(0.05)  # slow enough that separate submissions keep both backlogged
    w = np.ones(N, np.float32)
    c.submit_kernel_graph(g, inputs(0, w)).result()  # learn the run time
    c.kaas_set_weight("gold", 2.0)
    c.run_on_scheduler(lambda dask_scheduler: dask_scheduler.plugins[
        InFlightObserver.name].releases.clear())
    try:
        futs = []
        for i in range(120):
            for tenant in ("gold", "silver"):
                futs.append(c.submit_kernel_graph(g, inputs(i, w), tenant=tenant))
        wait(futs)
    finally:
        c.kaas_set_weight("gold", 1.0)
    releases = c.run_on_scheduler(lambda dask_scheduler: list(dask_scheduler.plugins[
        InFlightObserver.name].releases))
    # Releases made while both tenants had queued work:
    both = [t for t, backlog in releases if {"gold", "silver"} <= set(backlog)]
    assert len(both) >= 60, len(releases)
    ratio = both.count("gold") / both.count("silver")
    assert 1.8 <= ratio <= 2.2, (both.count("gold"), both.count("silver"))


def test_cancel_held_and_running_requests(lb_client):
    c = lb_client
    g = plain_graph(0.05)
    w = np.ones(N, np.float32)
    futs = [c.submit_kernel_graph(g, inputs(i, w), tenant="cancel") for i in range(40)]
    time.sleep(0.3)
    held = [f for f in futs if f.status == "pending"][-20:]
    running = c.run_on_scheduler(lambda dask_scheduler: [
        k for k, ts in dask_scheduler.tasks.items()
        if str(k).startswith("kaas-plain") and ts.state == "processing"])
    assert running
    c.cancel(held + [f for f in futs if f.key in running])
    gone = {f.key for f in held} | set(running)
    for i, f in enumerate(futs):
        if f.key not in gone:
            np.testing.assert_allclose(f.result()["y"], 2 * i + 1)
    deadline = time.time() + 10
    while time.time() < deadline:
        state = dispatch_state(c)
        if not state["backlog"] and not state["in_flight"] and not state["running"]:
            break
        time.sleep(0.05)
    assert state["backlog"] == {} and state["in_flight"] == {} and state["running"] == 0
    # Cancelled work is refunded: cancel's virtual runtime is what ran.
    assert c.submit_kernel_graph(g, inputs(1, w), tenant="cancel").result()["y"][0] == 3


def test_retry_goes_back_through_the_queue(lb_client, tmp_path):
    c = lb_client
    marker = tmp_path / "ok"
    g2 = KernelGraph("retry")
    x2 = g2.input("x", (N,), np.float32)
    y2 = g2.output("y", (N,), np.float32)
    path = str(marker)

    def kernel(xp, x, y):
        fails_until_marked(xp, x, y, path)

    g2.launch(Kernel.array(kernel), [x2, Out(y2)])
    f = c.submit_kernel_graph(g2, {"x": np.ones(N, np.float32)})
    with pytest.raises(Exception, match="marker missing"):
        f.result()
    marker.write_text("ok")
    f.retry()
    np.testing.assert_allclose(f.result()["y"], 2.0)
    assert dispatch_state(c)["in_flight"] == {}


def boom(n):
    raise ValueError("upstream failed")


def test_errored_dependency_fails_the_graph_without_holding_it(lb_client):
    c = lb_client
    g = plain_graph(0.0)
    bad = c.submit(boom, 1)
    f = c.submit_kernel_graph(g, {"x": bad, "w": np.ones(N, np.float32)})
    with pytest.raises(ValueError, match="upstream failed"):
        f.result()
    state = dispatch_state(c)
    assert state["backlog"] == {} and state["in_flight"] == {}
    ok = c.submit_kernel_graph(g, inputs(2, np.ones(N, np.float32)))
    np.testing.assert_allclose(ok.result()["y"], 5.0)


def test_failed_release_does_not_spin_and_recovers(lb_client):
    """A held graph no worker can take (an extra resource nobody has) fails
    its release once per pass, stays held, and the others run past it."""
    c = lb_client
    g = plain_graph(0.2)
    w = np.ones(N, np.float32)
    blockers = [c.submit_kernel_graph(g, inputs(i, w)) for i in range(4)]
    victim = c.submit_kernel_graph(g, inputs(7, w), priority=10)

    def poison(dask_scheduler, key=victim.key):
        ts = dask_scheduler.tasks.get(key)
        if ts is None or ts.state != "no-worker":
            return None
        ts.resource_restrictions = dict(ts.resource_restrictions, TPU=1)
        return sorted(ts.worker_restrictions or ())

    deadline = time.time() + 10
    while (restriction := c.run_on_scheduler(poison)) is None and time.time() < deadline:
        time.sleep(0.01)
    assert restriction == [HOLD]
    before = dispatch_state(c)["failed_releases"]
    others = [c.submit_kernel_graph(g, inputs(i, w)) for i in range(4)]
    wait(blockers + others)
    time.sleep(0.5)
    failed = dispatch_state(c)["failed_releases"] - before
    assert 1 <= failed <= 30, failed  # one per pass at most, no busy loop
    assert victim.status == "pending"

    def heal(dask_scheduler, key=victim.key):
        ts = dask_scheduler.tasks[key]
        ts.resource_restrictions = {k: v for k, v in ts.resource_restrictions.items()
                                    if k != "TPU"}
        dask_scheduler.extensions["kaas"].dispatch.wake()

    c.run_on_scheduler(heal)
    np.testing.assert_allclose(victim.result(timeout=30)["y"], 15.0)


def test_adaptive_target_sees_the_held_backlog(lb_client):
    c = lb_client
    g = plain_graph(0.05)
    w = np.ones(N, np.float32)
    c.submit_kernel_graph(g, inputs(0, w)).result()  # Dask learns the task duration

    def look(dask_scheduler):
        return (sum(1 for ts in dask_scheduler.unrunnable if ts.worker_restrictions == {HOLD}),
                dask_scheduler.adaptive_target(target_duration="100ms"))

    idle_held, idle_target = c.run_on_scheduler(look)
    futs = [c.submit_kernel_graph(g, inputs(i, w)) for i in range(60)]
    deadline = time.time() + 10
    while (got := c.run_on_scheduler(look))[0] < 20 and time.time() < deadline:
        time.sleep(0.01)
    held, target = got
    assert idle_held == 0 and idle_target <= 2
    assert held >= 20 and target > 2, (held, target)  # Dask would ask for more workers
    wait(futs)


def test_worker_loss_sends_released_graphs_back_to_the_queue():
    with LocalKaasCluster(2, backend="cpu", dashboard_address="127.0.0.1:0",
                          device_memory_limit="64MB") as cluster, KaasClient(cluster) as c:
        g = plain_graph(0.03)
        w = np.ones(N, np.float32)
        futs = [c.submit_kernel_graph(g, inputs(i, w), tenant=f"t{i % 2}") for i in range(80)]
        done = 0
        for _ in as_completed(futs):
            done += 1
            if done == 10:
                break
        victim = sorted(c.scheduler_info()["workers"])[0]
        pid = c.run(os.getpid, workers=[victim])[victim]
        os.kill(pid, signal.SIGKILL)
        for i, f in enumerate(futs):
            np.testing.assert_allclose(f.result(timeout=120)["y"], 2 * i + 1)
        # A result the victim computed and pushed just before it died is the
        # right answer, but Dask still recomputes the key it lost (the future
        # is held): the books are clean once that is done.
        deadline = time.monotonic() + 30
        while True:
            state = dispatch_state(c)
            clean = victim not in state["in_flight"] and state["running"] == 0
            if clean or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert victim not in state["in_flight"] and state["running"] == 0, state
        assert state["backlog"] == {}


def test_no_workers_timeout_does_not_fail_held_graphs():
    with dask.config.set({"distributed.scheduler.no-workers-timeout": "1s",
                          "kaas.dispatch-interval": "50ms"}), \
            LocalKaasCluster(1, backend="cpu", dashboard_address="127.0.0.1:0",
                             device_memory_limit="64MB") as cluster, \
            KaasClient(cluster) as c:
        g = plain_graph(0.05)
        w = np.ones(N, np.float32)
        futs = [c.submit_kernel_graph(g, inputs(i, w)) for i in range(60)]  # ~3 s of work
        for i, f in enumerate(futs):
            np.testing.assert_allclose(f.result(timeout=60)["y"], 2 * i + 1)


def test_two_clients_with_equal_weights_share_the_pool_equally(lb_client):
    import threading

    c = lb_client
    g = plain_graph(0.04)
    w = np.ones(N, np.float32)
    c.submit_kernel_graph(g, inputs(0, w)).result()
    c.run_on_scheduler(lambda dask_scheduler: dask_scheduler.plugins[
        InFlightObserver.name].releases.clear())
    futs: dict[str, list] = {"big": [], "small": []}
    with KaasClient(c.scheduler.address) as other:
        def flood(client, tenant, n):
            for i in range(n):
                futs[tenant].append(client.submit_kernel_graph(g, inputs(i, w), tenant=tenant))

        threads = [threading.Thread(target=flood, args=(c, "big", 80)),
                   threading.Thread(target=flood, args=(other, "small", 40))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for fs in futs.values():
            for i, f in enumerate(fs):
                np.testing.assert_allclose(f.result()["y"], 2 * i + 1)
    releases = c.run_on_scheduler(lambda dask_scheduler: list(dask_scheduler.plugins[
        InFlightObserver.name].releases))
    both = [t for t, backlog in releases if {"big", "small"} <= set(backlog)]
    assert len(both) >= 20, releases
    ratio = both.count("big") / both.count("small")
    assert 0.8 <= ratio <= 1.25, (both.count("big"), both.count("small"))


def test_kept_output_is_pinned_when_its_graph_is_released(lb_client):
    c = lb_client
    g = plain_graph(0.1)
    w = np.ones(N, np.float32)
    blockers = [c.submit_kernel_graph(g, inputs(i, w)) for i in range(6)]
    f = c.submit_kernel_graph(g, inputs(5, w), keep_on_device=["y"])
    sel = f["y"]

    def restrictions(dask_scheduler, keys=(f.key, sel.key)):
        return [(dask_scheduler.tasks[k].state, sorted(dask_scheduler.tasks[k].worker_restrictions
                                                       or ())) for k in keys
                if k in dask_scheduler.tasks]

    deadline = time.time() + 10
    while len(got := c.run_on_scheduler(restrictions)) < 2 and time.time() < deadline:
        time.sleep(0.01)
    (g_state, g_where), (s_state, s_where) = got
    workers = set(c.scheduler_info()["workers"])
    assert g_state == "no-worker" and g_where == [HOLD]  # held: no worker chosen yet
    assert not set(s_where) & workers  # so its kept output is not pinned anywhere yet
    np.testing.assert_allclose(sel.result(), 11.0)
    who = c.who_has([f, sel])
    assert who[sel.key] == who[f.key] and len(who[f.key]) == 1
    wait(blockers)


@pytest.mark.parametrize("think", [0.0, 0.03])
def test_weights_hold_for_clients_that_wait_for_each_result(lb_client, think):
    """Four threads per tenant, each sending its next request ``think``
    seconds after the last one returns (an HTTP client's round trip): 8
    requests for 4 places, so a tenant often has nothing queued for a
    moment, and its weight must still hold.

    Each request keeps a worker busy for 120 ms, so that the clients' own
    work between requests (slow on a loaded machine) stays small beside it:
    a weight does not throttle a tenant below what it asks for, and a
    client too slow to keep its requests queued would measure that instead.
    """
    import threading

    c = lb_client
    g = plain_graph(0.12)
    w = np.ones(N, np.float32)
    for tenant in ("gold", "silver"):
        c.submit_kernel_graph(g, inputs(0, w), tenant=tenant).result()  # learn the run time
    c.kaas_set_weight("gold", 2.0)
    done: dict[str, list[float]] = {"gold": [], "silver": []}
    wrong = []
    stop_at = time.monotonic() + 14.0

    def loop(tenant, seed):
        i = seed
        while time.monotonic() < stop_at:
            y = c.submit_kernel_graph(g, inputs(i, w), tenant=tenant).result()["y"]
            if not np.allclose(y, 2 * i + 1):
                wrong.append((tenant, i))
            done[tenant].append(time.monotonic())
            i += 8
            time.sleep(think)

    threads = [threading.Thread(target=loop, args=(t, k))
               for k, t in enumerate(["gold", "silver"] * 4)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        c.kaas_set_weight("gold", 1.0)
    assert not wrong
    # Skip the first two seconds (both tenants ramping up).
    start = stop_at - 12.0
    gold = sum(1 for t in done["gold"] if t >= start)
    silver = sum(1 for t in done["silver"] if t >= start)
    assert silver >= 15, (gold, silver)
    assert 1.55 <= gold / silver <= 2.5, (gold, silver)
