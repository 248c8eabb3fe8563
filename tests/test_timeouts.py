"""Request time limits, the n_iter cap and worker restarts (issue 9, item 2).

Real LocalKaasClusters on the CPU backend (Nanny workers, so a restart is a
new process).  A kernel that never returns must cost only its own request:
its task fails at the deadline, nothing new is placed on its slot, and its
worker is restarted after the grace period while bystanders run elsewhere.
"""

from __future__ import annotations

import math
import os
import threading
import time

import dask
import numpy as np
import pytest
from kaas_graphs import N, scale_graph

from dask_kaas import (
    GraphError,
    InOut,
    KaasClient,
    KaasError,
    Kernel,
    KernelExecutionError,
    KernelGraph,
    LocalKaasCluster,
    Out,
    RequestTimeoutError,
)
from dask_kaas.device import deadline

GRACE_S = 3.0


def sleeper_graph(seconds: float, name: str = "sleeper") -> KernelGraph:
    """A kernel that sleeps ``seconds`` (inf: never returns)."""
    def nap(xp, x, y):
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            time.sleep(0.01)
        y[...] = x

    g = KernelGraph(name)
    x = g.input("x", (N,), np.float32)
    y = g.output("y", (N,), np.float32)
    g.launch(Kernel.array(nap, name="nap"), [x, Out(y)])
    return g


@pytest.fixture(scope="module")
def client():
    # A restarted worker may take a while to come back on a loaded machine:
    # LocalCluster must not give up on it (after 15 s by default).
    with dask.config.set({"kaas.request-timeout-grace": GRACE_S,
                          "distributed.deploy.lost-worker-timeout": "120s"}), \
            LocalKaasCluster(2, backend="cpu", dashboard_address="127.0.0.1:0",
                             device_memory_limit="64MB") as cluster, \
            KaasClient(cluster) as c:
        yield c


def pids(client) -> dict[str, int]:
    return client.run(os.getpid)


def restarts(client) -> list[dict]:
    return client.run_on_scheduler(
        lambda dask_scheduler: list(dask_scheduler.extensions["kaas"].restarts.history))


def worker_stats(client) -> dict[str, dict]:
    return client.kaas_stats()["workers"]


def replaced(client, old: str) -> bool:
    """Whether worker ``old`` is gone and a new one took its place; then the
    client's cached worker list (where consts are scattered to) is renewed
    at once rather than after its time to live."""
    from dask_kaas.client import _state

    addrs = pids(client)
    if len(addrs) != 2 or old in addrs:
        return False
    _state(client).refresh()
    return True


def until(cond, timeout: float = 60.0, what: str = "condition"):
    deadline_ = time.monotonic() + timeout
    while time.monotonic() < deadline_:
        value = cond()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"{what} not reached in {timeout} s")


def check_bystanders(client, n: int = 20, seed: int = 0, const: bool = True) -> list:
    rng = np.random.default_rng(seed)
    w = rng.random(N, np.float32)
    xs = [rng.random(N, np.float32) for _ in range(n)]
    g = scale_graph() if const else scale_graph("scale-no-const", const=False)
    futs = client.map_kernel_graph(g, [{"x": x, "w": w} for x in xs], tenant="bystander")
    for f, x in zip(futs, xs):
        np.testing.assert_allclose(f.result(timeout=120)["y"], 2 * x + w, rtol=1e-6)
    return futs


# -- the deadline runner, without Dask -------------------------------------------

def test_run_within_counts_from_started_and_reports_a_late_return():
    events = []
    release = threading.Event()

    def job():
        time.sleep(0.2)  # waiting for a slot: not counted
        deadline.started()
        release.wait(30)
        return "late"

    with pytest.raises(RequestTimeoutError, match="'g'.*0.1 s"):
        deadline.run_within(job, 0.1, graph="g", on_overdue=lambda: events.append("overdue"),
                            on_late_return=lambda: events.append("returned"))
    assert events == ["overdue"]
    release.set()
    until(lambda: events == ["overdue", "returned"], 10, "late return")


def test_run_within_passes_results_and_any_exception_through():
    def ok():
        deadline.started()
        return 42

    assert deadline.run_within(ok, 5.0) == 42

    def slow_ok():
        deadline.started()
        time.sleep(0.1)  # so that the caller really waits
        return 43

    assert deadline.run_within(slow_ok, 1e300) == 43  # valid, if longer than a lock waits

    def exits():
        raise SystemExit(2)

    with pytest.raises(SystemExit):
        deadline.run_within(exits, 5.0)
    assert deadline.run_within(lambda: 7, None) == 7


def test_a_stuck_runner_does_not_hold_up_later_limited_requests():
    release = threading.Event()

    def stuck():
        deadline.started()
        release.wait(30)

    def ok():
        deadline.started()
        return threading.current_thread().name

    try:
        with pytest.raises(RequestTimeoutError):
            deadline.run_within(stuck, 0.05)
        names = [deadline.run_within(ok, 5.0) for _ in range(20)]
        assert all(n == "kaas-request" for n in names)
    finally:
        release.set()


# -- on a cluster ------------------------------------------------------------------

def test_a_huge_but_finite_timeout_is_accepted(client):
    rng = np.random.default_rng(9)
    x, w = rng.random(N, np.float32), rng.random(N, np.float32)
    out = client.submit_kernel_graph(scale_graph("patient"), {"x": x, "w": w}, timeout=1e300)
    np.testing.assert_allclose(out.result(timeout=60)["y"], 2 * x + w, rtol=1e-6)


def test_request_within_its_limit_is_unaffected(client):
    rng = np.random.default_rng(3)
    x, w = rng.random(N, np.float32), rng.random(N, np.float32)
    g = scale_graph("limited")
    out = client.submit_kernel_graph(g, {"x": x, "w": w}, timeout=60,
                                     keep_on_device=["y"])
    np.testing.assert_allclose(out.result()["y"], 2 * x + w, rtol=1e-6)
    np.testing.assert_allclose(out["y"].result(), 2 * x + w, rtol=1e-6)


def test_late_kernel_fails_at_its_deadline_and_its_slot_takes_no_new_work(client):
    """The kernel returns after 2 s, past its 0.3 s limit but within the grace
    period: the request fails, bystanders all run on the other worker, the
    slot comes back and no worker is restarted."""
    before, history = pids(client), len(restarts(client))
    fut = client.submit_kernel_graph(sleeper_graph(2.0), {"x": np.ones(N, np.float32)},
                                     timeout=0.3, tenant="slow")
    with pytest.raises(RequestTimeoutError, match="'sleeper'"):
        fut.result(timeout=30)  # ends at the deadline, long before the kernel does
    stuck = [a for a, st in worker_stats(client).items() if st["overdue"]]
    assert len(stuck) == 1
    futs = check_bystanders(client, 10, seed=1)
    who = client.who_has(futs)
    assert all(who[f.key] and stuck[0] not in who[f.key] for f in futs), who
    until(lambda: not any(st["overdue"] for st in worker_stats(client).values()), 30,
          "slot released")
    assert pids(client) == before and len(restarts(client)) == history


def test_runaway_kernel_gets_its_worker_restarted(client):
    before = pids(client)
    fut = client.submit_kernel_graph(sleeper_graph(math.inf, "runaway"),
                                     {"x": np.ones(N, np.float32)}, timeout=0.5)
    with pytest.raises(RequestTimeoutError):
        fut.result(timeout=30)
    record = until(lambda: [r for r in restarts(client) if "runaway" in r["reason"]
                            or "after its time limit" in r["reason"]], 60, "restart")
    stuck = record[-1]["worker"]
    assert stuck in before
    until(lambda: replaced(client, stuck), 60, "new worker")
    after = pids(client)
    # The other worker kept its process; the stuck one is a new process.
    assert set(before.values()) & set(after.values()) == {
        pid for addr, pid in before.items() if addr != stuck}
    check_bystanders(client, 20, seed=2, const=False)


def test_cancelled_runaway_gets_its_worker_restarted(client):
    """No time limit at all: the client cancels a request whose kernel never
    returns.  Its slot takes no new work, and after the grace period its
    worker is restarted."""
    before = pids(client)
    fut = client.submit_kernel_graph(sleeper_graph(math.inf, "abandoned"),
                                     {"x": np.ones(N, np.float32)})
    until(lambda: any(st["running"] for st in worker_stats(client).values()), 30, "running")
    fut.cancel()
    stuck = until(lambda: [a for a, st in worker_stats(client).items() if st["overdue"]], 30,
                  "overdue after cancel")
    futs = check_bystanders(client, 10, seed=6)  # while the slot is still held
    who = client.who_has(futs)
    assert all(who[f.key] and stuck[0] not in who[f.key] for f in futs), who
    record = until(lambda: [r for r in restarts(client) if r["worker"] == stuck[0]], 60,
                   "restart")
    assert "cancelled" in record[-1]["reason"] and stuck[0] in before
    until(lambda: replaced(client, stuck[0]), 60, "new worker")
    check_bystanders(client, 20, seed=7, const=False)


def breaks_device(xp, x, y):
    """What a sticky CUDA fault looks like to the runtime: the request fails
    and the device is marked broken (the CUDA backend does this itself)."""
    from distributed import get_worker

    get_worker().plugins["dask-kaas"].runtime.broken = "test: sticky device fault"
    raise RuntimeError("an illegal memory access was encountered")


def test_broken_device_gets_its_worker_restarted_and_queued_requests_run_elsewhere(client):
    before = pids(client)
    g = KernelGraph("breaker")
    x = g.input("x", (N,), np.float32)
    y = g.output("y", (N,), np.float32)
    g.launch(Kernel.array(breaks_device), [x, Out(y)])
    breaker = client.submit_kernel_graph(g, {"x": np.ones(N, np.float32)})
    # Submitted at once: some are queued on the breaking worker.
    check_bystanders(client, 20, seed=4, const=False)
    with pytest.raises(KernelExecutionError, match="illegal memory access"):
        breaker.result(timeout=60)
    record = until(lambda: [r for r in restarts(client) if "sticky device fault" in r["reason"]],
                   60, "restart")
    until(lambda: replaced(client, record[-1]["worker"]), 60, "new worker")
    assert record[-1]["worker"] in before
    check_bystanders(client, 20, seed=5, const=False)


# -- hostile values ----------------------------------------------------------------

@pytest.mark.parametrize("bad", [0, -1, float("nan"), float("inf"), -float("inf"), "5", b"5",
                                 True, 10**400, [1], {"s": 1}, complex(1, 1)],
                         ids=repr)
def test_bad_timeouts_are_refused_on_the_client(client, bad):
    with pytest.raises(KaasError, match="'scale'.*timeout"):
        client.submit_kernel_graph(scale_graph(), {"x": np.ones(N, np.float32),
                                                   "w": np.ones(N, np.float32)}, timeout=bad)
    with pytest.raises(KaasError, match="timeout"):
        client.map_kernel_graph(scale_graph(), [], timeout=bad)


@pytest.mark.parametrize("bad", ["abc", "-3s", 0, float("nan"), [1], True])
def test_bad_configured_timeout_is_a_kaas_error(client, bad):
    with dask.config.set({"kaas.request-timeout": bad}), \
            pytest.raises(KaasError, match="kaas.request-timeout"):
        client.submit_kernel_graph(scale_graph(), {"x": np.ones(N, np.float32),
                                                   "w": np.ones(N, np.float32)})


@pytest.mark.parametrize("bad", ["soon", "-1s", 0, float("inf"), [3], True])
def test_bad_grace_setting_is_a_kaas_error_and_the_guard_falls_back(bad):
    from dask_kaas.limits import DEFAULT_GRACE_S, timeout_grace
    from dask_kaas.plugin.restart import _grace

    with dask.config.set({"kaas.request-timeout-grace": bad}):
        with pytest.raises(KaasError, match="kaas.request-timeout-grace"):
            timeout_grace()
        assert _grace() == DEFAULT_GRACE_S
    with dask.config.set({"kaas.request-timeout-grace": "250ms"}):
        assert timeout_grace() == 0.25


def test_configured_timeout_applies_when_none_is_given(client):
    with dask.config.set({"kaas.request-timeout": "300ms"}):
        fut = client.submit_kernel_graph(sleeper_graph(1.0, "configured"),
                                         {"x": np.ones(N, np.float32)})
    with pytest.raises(RequestTimeoutError, match="0.3 s"):
        fut.result(timeout=30)


def test_n_iter_cap_on_the_client(client):
    with dask.config.set({"kaas.max-n-iter": 100}):
        with pytest.raises(GraphError, match="'capped'.*n_iter 101.*kaas.max-n-iter"):
            client.submit_kernel_graph(scale_graph("capped", n_iter=101),
                                       {"x": np.ones(N, np.float32),
                                        "w": np.ones(N, np.float32)})
        for bad in ("many", -1, 2.5, True):
            with dask.config.set({"kaas.max-n-iter": bad}), \
                    pytest.raises(KaasError, match="kaas.max-n-iter"):
                client.submit_kernel_graph(scale_graph("capped"),
                                           {"x": np.ones(N, np.float32),
                                            "w": np.ones(N, np.float32)})


def test_n_iter_cap_on_the_worker_stops_a_forged_request(client):
    """A request built by hand (no client-side check) with n_iter 10**12:
    the worker refuses it instead of looping for days."""
    from dask_kaas.plugin.tasks import run_kernel_graph
    from dask_kaas.request import GraphRequest, InputRef

    g = scale_graph("forged-iter")
    g.n_iter = 10**12
    req = GraphRequest(key="forged-iter-1", graph=g.name, tenant="mallory", inputs=[
        InputRef("x", 4 * N, None), InputRef("w", 4 * N, None)], timeout=30)
    fut = client.submit(run_kernel_graph, g, req, np.ones(N, np.float32),
                        np.ones(N, np.float32), key=req.key, resources={"GPU": 1}, pure=False)
    with pytest.raises(GraphError, match="'forged-iter'.*exceeds kaas.max-n-iter"):
        fut.result(timeout=60)


@pytest.mark.parametrize("bad", [float("nan"), -5, "1s", 10**400])
def test_forged_timeout_field_is_refused_by_the_worker(client, bad):
    from dask_kaas.plugin.tasks import run_kernel_graph
    from dask_kaas.request import GraphRequest, InputRef

    g = scale_graph("forged-timeout")
    req = GraphRequest(key=f"forged-timeout-{bad!r}", graph=g.name, tenant="mallory",
                       inputs=[InputRef("x", 4 * N, None), InputRef("w", 4 * N, None)],
                       timeout=bad)
    fut = client.submit(run_kernel_graph, g, req, np.ones(N, np.float32),
                        np.ones(N, np.float32), key=req.key, resources={"GPU": 1}, pure=False)
    with pytest.raises(KaasError, match="timeout"):
        fut.result(timeout=60)


def long_iter_graph(n_iter: int = 100_000) -> KernelGraph:
    """~10 ms per launch, ``n_iter`` launches: far past any limit."""
    def step(xp, x, y):
        time.sleep(0.01)
        x += 1  # an input the graph updates: its private copy
        y[...] = x

    g = KernelGraph("long-iter", n_iter=n_iter)
    x = g.input("x", (N,), np.float32)
    y = g.output("y", (N,), np.float32)
    g.launch(Kernel.array(step, name="step"), [InOut(x), Out(y)])
    return g


def test_a_long_n_iter_graph_past_its_limit_stops_without_a_restart(client):
    """Issue 16 item 10: the loop checks the deadline between launches, so
    the slot comes back long before the grace period and nobody's worker
    (nor its cache) is lost."""
    before, history = pids(client), len(restarts(client))
    fut = client.submit_kernel_graph(long_iter_graph(), {"x": np.ones(N, np.float32)},
                                     timeout=0.5, tenant="looper")
    with pytest.raises(RequestTimeoutError, match="'long-iter'"):
        fut.result(timeout=30)
    until(lambda: not any(st["overdue"] for st in worker_stats(client).values()), 30,
          "slot released")
    time.sleep(GRACE_S + 1.0)  # past the grace period: a stuck slot would be restarted now
    assert pids(client) == before and len(restarts(client)) == history
    check_bystanders(client, 10, seed=11)
