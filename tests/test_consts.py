"""Consts on the cluster: bounded on the client, never lost while it lives.

Item 5 of issue 9: a new const right after a worker died, and a const whose
every replica died; item 9: the client's const registry is bounded and
releases what nothing uses.
"""

from __future__ import annotations

import gc
import os
import signal
import time

import dask
import numpy as np
import pytest
from distributed import as_completed, wait

from dask_kaas import KaasClient, KaasError, Kernel, KernelGraph, LocalKaasCluster, Out
from dask_kaas.client import _state
from dask_kaas.const_identity import content_token

N = 32 * 1024  # 128 KiB of float32


def scale(xp, x, w, y, seconds):
    time.sleep(float(seconds))
    y[...] = 2 * x + w


def graph(seconds=0.0, n=N):
    g = KernelGraph("consts")
    x = g.input("x", (n,), np.float32)
    w = g.const("w", (n,), np.float32)
    y = g.output("y", (n,), np.float32)
    g.launch(Kernel.array(scale), [x, w, Out(y), np.float64(seconds)])
    return g


def cluster_consts(client):
    """Const keys the scheduler still has."""
    return sorted(client.run_on_scheduler(
        lambda dask_scheduler: [k for k in dask_scheduler.tasks
                                if str(k).startswith("kaas-const-")]))


def eventually(fn, timeout=20.0):
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.05)


def kill(client, addrs):
    pids = client.run(os.getpid, workers=list(addrs))
    for pid in pids.values():
        os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def cc():
    with LocalKaasCluster(2, backend="cpu", dashboard_address="127.0.0.1:0",
                          device_memory_limit="64MB") as cluster, KaasClient(cluster) as c:
        yield c


def test_registry_releases_consts_nothing_uses(cc):
    """300 x 256 KiB stayed resident with no futures alive (issue 9, item 9)."""
    c = cc
    rng = np.random.default_rng(0)
    g = graph(n=2 * N)
    x = np.ones(2 * N, np.float32)
    ws = [rng.random(2 * N, dtype=np.float32) for _ in range(30)]
    futs = [c.submit_kernel_graph(g, {"x": x, "w": w}) for w in ws]
    for w, f in zip(ws, futs):
        np.testing.assert_allclose(f.result()["y"], 2 * x + w)
    assert len(cluster_consts(c)) >= 30
    # Futures gone, arrays still held: a cache for the next submission.
    del futs, f
    gc.collect()
    assert len(cluster_consts(c)) >= 30
    del ws, w
    gc.collect()
    assert eventually(lambda: not cluster_consts(c)), cluster_consts(c)
    assert not _state(c).consts.entries


def test_registry_idle_bytes_bounded_in_use_kept(cc):
    c = cc
    rng = np.random.default_rng(1)
    g = graph()
    x = np.ones(N, np.float32)
    ws = [rng.random(N, dtype=np.float32) for _ in range(10)]  # 128 KiB each
    with dask.config.set({"kaas.client-const-cache": "512KiB"}):
        futs = [c.submit_kernel_graph(g, {"x": x, "w": w}) for w in ws]
        wait(futs)
        reg = _state(c).consts
        # In use by live futures: all kept, whatever the budget.
        assert {e.users for e in reg.entries.values()} == {1} and len(reg.entries) == 10
        del futs
        gc.collect()
        reg.sweep()
        assert reg.nbytes <= 512 * 1024 and len(reg.entries) == 4
        # The most recently used stay; the program still has every array, so
        # an evicted one is simply sent again.
        kept = set(reg.entries)
        assert kept == {content_token(w) for w in ws[-4:]}
        y = c.submit_kernel_graph(g, {"x": x, "w": ws[0]}).result()["y"]
        np.testing.assert_allclose(y, 2 * x + ws[0])
    assert eventually(lambda: len(cluster_consts(c)) <= 5), cluster_consts(c)


@pytest.mark.parametrize("bad", ["lots", -1, True, [1], "1e400 GB", None])
def test_const_cache_setting_refused_clearly(cc, bad):
    c = cc
    w = np.random.default_rng(2).random(N, dtype=np.float32)
    with dask.config.set({"kaas.client-const-cache": bad}), \
            pytest.raises(KaasError, match="client-const-cache"):
        c.submit_kernel_graph(graph(), {"x": np.ones(N, np.float32), "w": w})


def test_new_const_right_after_a_worker_dies():
    """The client's worker list is a moment stale after a worker died: a new
    const scattered to it failed with a raw KeyError (issue 9, item 5)."""
    with LocalKaasCluster(2, backend="cpu", dashboard_address="127.0.0.1:0",
                          device_memory_limit="64MB") as cluster, KaasClient(cluster) as c:
        g = graph()
        x = np.ones(N, np.float32)
        w0 = np.zeros(N, np.float32)
        np.testing.assert_allclose(c.submit_kernel_graph(g, {"x": x, "w": w0}).result()["y"],
                                   2 * x)
        state = _state(c)
        victim = sorted(c.scheduler_info()["workers"])[0]
        kill(c, [victim])
        assert eventually(lambda: victim not in c.scheduler_info()["workers"])
        state.info_at = time.monotonic()  # as if refreshed just before the death
        assert victim in state.current_info()["candidates"]  # the stale list it holds
        for i in range(5):
            w = np.full(N, i + 1, np.float32)
            y = c.submit_kernel_graph(g, {"x": x, "w": w}).result(timeout=60)["y"]
            np.testing.assert_allclose(y, 2 * x + w)


def test_const_lost_with_every_worker_is_sent_again():
    """Every replica of a const dies (both workers killed at once), with
    requests pending and finished, and kept outputs: the client sends the
    const and the requests again, every future completes correctly."""
    with LocalKaasCluster(2, backend="cpu", dashboard_address="127.0.0.1:0",
                          device_memory_limit="64MB") as cluster, KaasClient(cluster) as c:
        rng = np.random.default_rng(3)
        w = rng.random(N, dtype=np.float32)
        xs = [rng.random(N, dtype=np.float32) for _ in range(30)]
        done = c.map_kernel_graph(graph(), [{"x": x, "w": w} for x in xs[:10]],
                                  keep_on_device=["y"])
        wait(done)
        pending = c.map_kernel_graph(graph(seconds=0.05), [{"x": x, "w": w} for x in xs[10:]])
        next(as_completed(pending))
        kill(c, c.scheduler_info()["workers"])
        for x, f in zip(xs, done + pending):
            np.testing.assert_allclose(f.result(timeout=120)["y"], 2 * x + w, rtol=1e-6)
        for x, f in zip(xs, done):
            np.testing.assert_allclose(f["y"].result(timeout=120), 2 * x + w, rtol=1e-6)
        assert _state(c).resender.resent >= 1
        # Requests the program let go are not sent again.
        del done, pending, f
        gc.collect()
        dropped = c.map_kernel_graph(graph(seconds=0.05), [{"x": x, "w": w} for x in xs[:5]])
        before = _state(c).resender.resent
        del dropped
        gc.collect()
        c.wait_for_workers(2, timeout=60)
        kill(c, c.scheduler_info()["workers"])
        c.wait_for_workers(2, timeout=60)
        time.sleep(1.0)
        assert _state(c).resender.resent == before


def test_sweep_survives_finalizers_that_sweep_while_it_runs(cc):
    """Dropping a released const's array during a sweep runs its weakref
    callback, which sweeps again (re-entrantly, same thread).  Those nested
    sweeps must wait for the running one, not forget entries out from under
    it (seen as KeyError from ``_forget`` when the demo's client closed)."""
    from dask_kaas.consts import ConstRegistry

    reg = ConstRegistry(cc, lambda refresh: [])
    arrays = [np.full(8, i, np.float32) for i in range(4)]
    keys = [reg.future(f"token-{i}", a).key for i, a in enumerate(arrays)]
    for e in reg.entries.values():
        e.fresh_at = 0.0  # idle: nothing uses them any more
    del arrays
    gc.collect()
    reg.sweep()  # each dropped array's callback sweeps again while this one runs
    assert not reg.entries
    assert all(reg.token_of(k) is None for k in keys)
