"""dask_kaas inside someone else's Dask cluster: Dask's own behaviour stays.

Dask's Active Memory Manager keeps the replicas Dask would keep for ordinary
keys, every AMM policy the user configured keeps running, and importing the
preload does not drag Bokeh into every process.
"""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
from distributed import Client, Event, LocalCluster
from distributed.active_memory_manager import ActiveMemoryManagerPolicy, ReduceReplicas

from dask_kaas import KaasClient, Kernel, KernelGraph, LocalKaasCluster, Out
from dask_kaas.plugin.amm import DeviceAwareDropper

AMM_OFF = {
    "distributed.scheduler.active-memory-manager.start": False,
    "distributed.scheduler.active-memory-manager.policies": [
        {"class": "distributed.active_memory_manager.ReduceReplicas"}],
}


def test_importing_the_preload_imports_no_bokeh():
    code = ("import sys, dask_kaas.preload; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'bokeh' "
            "or m.startswith('distributed.dashboard')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stdout


def test_reduce_replicas_counts_waiters_as_dask_does():
    """The issue's minimal case, on an ordinary cluster with the preload: x on
    all 4 workers, one waiter on each of two workers and one waiting behind
    another task: one AMM pass keeps 3 replicas, as Dask alone does."""
    import dask

    config = {**AMM_OFF, "distributed.scheduler.preload": ["dask_kaas.preload"]}
    with dask.config.set(config), \
            LocalCluster(n_workers=4, threads_per_worker=1, processes=False, protocol="tcp",
                         host="127.0.0.1", dashboard_address=None) as cluster, \
            Client(cluster) as c:
        c.wait_for_workers(4, timeout=30)
        s = cluster.scheduler
        assert "dask-kaas" in s.plugins  # the preload really installed dask_kaas
        w1, w2, _, w4 = sorted(s.workers)
        ev = Event()
        x = c.scatter({"x": 123}, broadcast=True)["x"]
        y = c.submit(lambda ev: ev.wait(), ev, key="y", workers=[w4])
        on_w1 = c.submit(lambda x, ev: ev.wait(), x, ev, key="zw1", workers=[w1])
        on_w2 = c.submit(lambda x, ev: ev.wait(), x, ev, key="zw2", workers=[w2])
        behind = c.submit(lambda x, y: None, x, y, key="znp")
        deadline = time.monotonic() + 10
        while len(s.tasks) < 5 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert c.run_on_scheduler(_processing_on, keys=["zw1", "zw2", "znp"]) == [
            w1, w2, None]
        c.run_on_scheduler(lambda dask_scheduler: dask_scheduler.extensions["amm"]
                           .run_once())
        time.sleep(0.5)
        assert len(c.who_has()["x"]) == 3
        ev.set()
        c.gather([y, on_w1, on_w2, behind])


def _processing_on(dask_scheduler, keys):  # type: ignore[no-untyped-def]
    out = []
    for k in keys:
        ws = dask_scheduler.tasks[k].processing_on
        out.append(ws.address if ws is not None else None)
    return out


class CountingPolicy(ActiveMemoryManagerPolicy):
    """A user's own AMM policy: counts its runs, suggests nothing."""

    runs = 0

    def run(self):  # type: ignore[no-untyped-def]
        type(self).runs += 1
        return
        yield  # a generator that suggests nothing


def test_user_amm_policies_keep_running_with_kaas():
    config = {
        "distributed.scheduler.active-memory-manager.start": True,
        "distributed.scheduler.active-memory-manager.interval": "50ms",
        "distributed.scheduler.active-memory-manager.policies": [
            {"class": "distributed.active_memory_manager.ReduceReplicas"},
            {"class": f"{__name__}.CountingPolicy"},
        ],
    }
    import dask

    with dask.config.set(config), \
            LocalKaasCluster(2, backend="cpu", dashboard_address=None) as cluster, \
            KaasClient(cluster) as client:
        client.submit_kernel_graph(_graph(), _inputs(np.ones((16, 16), np.float32))).result()
        amm = cluster.scheduler.extensions["amm"]
        assert sorted(type(p).__name__ for p in amm.policies) == [
            "CountingPolicy", "ReduceReplicas"]
        assert all(type(p) in (ReduceReplicas, CountingPolicy) for p in amm.policies)
        before = CountingPolicy.runs
        time.sleep(0.5)
        assert CountingPolicy.runs > before  # still run by the AMM after KaaS started
        # Ordinary data is still reduced to one replica by Dask's own policy.
        x = client.scatter(np.arange(10), broadcast=True)
        deadline = time.monotonic() + 10
        while len(client.who_has(x)[x.key]) > 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(client.who_has(x)[x.key]) == 1


def _graph() -> KernelGraph:
    g = KernelGraph("amm")
    x = g.input("x", (16, 16), np.float32)
    w = g.const("w", (16, 16), np.float32)
    y = g.output("y", (16, 16), np.float32)
    g.launch(Kernel.library("gemm"), [x, w, Out(y)])
    return g


def _inputs(w: np.ndarray) -> dict[str, np.ndarray]:
    return {"x": np.full((16, 16), 2, np.float32), "w": w}


def test_host_copy_beside_a_device_copy_survives_the_amm():
    """Three host replicas of a const, one device copy: Dask alone keeps one
    replica (anywhere); with dask_kaas the device holder keeps its replica
    and a second one stays for worker loss."""
    import dask

    with dask.config.set(AMM_OFF), \
            LocalKaasCluster(3, backend="cpu", dashboard_address=None) as cluster, \
            KaasClient(cluster) as client:
        w = np.random.default_rng(1).random((16, 16), np.float32)
        out = client.submit_kernel_graph(_graph(), _inputs(w)).result()["y"]
        np.testing.assert_allclose(out, np.full((16, 16), 2, np.float32) @ w, rtol=1e-5)
        key = next(k for k in client.who_has() if str(k).startswith("kaas-const-"))
        device = _device_holders(client, key)
        assert len(device) == 1
        client.replicate([_future(client, key)], n=3)
        assert len(client.who_has()[key]) == 3
        client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.extensions["amm"]
                                .run_once())
        deadline = time.monotonic() + 10
        while len(client.who_has()[key]) > 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # no further drops
        holders = set(client.who_has()[key])
        assert len(holders) == 2
        assert device <= holders


def _device_holders(client: Client, key: str) -> set[str]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        held = {w for w, bufs in client.kaas_state()["resident"].items() if key in bufs}
        if held:
            return held
        time.sleep(0.05)
    return set()


def _future(client: Client, key: str):  # type: ignore[no-untyped-def]
    from distributed import Future

    return Future(key, client)


def test_plugin_on_a_plain_cluster_adds_the_page_and_gives_the_amm_back():
    """A client registering dask_kaas on an ordinary LocalCluster gets the
    KaaS page in the running dashboard; closing the plugin gives the AMM back
    its own drop choice."""
    import urllib.request

    from dask_kaas.plugin.scheduler import KaasSchedulerPlugin

    with LocalCluster(n_workers=2, processes=False, protocol="tcp", host="127.0.0.1",
                      resources={"GPU": 1},
                      dashboard_address="127.0.0.1:0") as cluster, Client(cluster) as client:
        amm = cluster.scheduler.extensions["amm"]
        original = amm._find_dropper
        client.register_plugin(KaasSchedulerPlugin())
        assert isinstance(amm._find_dropper, DeviceAwareDropper)
        base = cluster.dashboard_link.rsplit("/", 1)[0]
        with urllib.request.urlopen(f"{base}/status", timeout=30) as r:
            assert b"kaas" in r.read()  # the menu entry on Dask's own pages
        with urllib.request.urlopen(f"{base}/kaas", timeout=30) as r:
            assert r.status == 200
        client.run_on_scheduler(_close_kaas)
        assert amm._find_dropper == original


async def _close_kaas(dask_scheduler):  # type: ignore[no-untyped-def]
    await dask_scheduler.plugins["dask-kaas"].close()
