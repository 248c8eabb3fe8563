"""Every answer right: const identity and the cache under equal consts.

Issue 16, items 1-3: a const and its transpose (or any array with the same
bytes in another order) must not share a cache identity; a const changed in
place must not be served stale; two const buffers of one graph with equal
contents share one key and must be pinned and loaded once.
"""

from __future__ import annotations

import logging
import os
import signal
from concurrent.futures import ThreadPoolExecutor

import dask
import numpy as np
import pytest

from dask_kaas import KaasClient, Kernel, KernelGraph, LocalKaasCluster, Out
from dask_kaas.client import _state
from dask_kaas.const_identity import content_token
from dask_kaas.device.backend import make_backend
from dask_kaas.device.cache import DeviceCache, Load
from dask_kaas.device.runtime import Identities, WorkerRuntime
from dask_kaas.request import GraphRequest, InputRef


def matmul_graph(n: int = 4) -> KernelGraph:
    g = KernelGraph("mm")
    x = g.input("x", (n, n), np.float64)
    w = g.const("w", (n, n), np.float64)
    y = g.output("y", (n, n), np.float64)
    g.launch(Kernel.library("gemm"), [x, w, Out(y)])
    return g


def two_bias_graph(n: int = 64) -> KernelGraph:
    g = KernelGraph("biases")
    x = g.input("x", (n,), np.float32)
    b1 = g.const("b1", (n,), np.float32)
    b2 = g.const("b2", (n,), np.float32)
    h = g.temp("h", (n,), np.float32)
    y = g.output("y", (n,), np.float32)
    g.launch(Kernel.library("add"), [x, b1, Out(h)])
    g.launch(Kernel.library("add"), [h, b2, Out(y)])
    return g


# -- item 1: identity follows the logical content, not the memory -------------

def test_token_tells_a_square_const_from_its_transpose():
    w = np.arange(16, dtype=np.float64).reshape(4, 4)
    assert content_token(w) != content_token(w.T)
    assert content_token(w) != content_token(np.asfortranarray(w).T)
    # the same logical content in another memory order is the same const
    assert content_token(w) == content_token(np.asfortranarray(w))
    sym = w + w.T
    assert content_token(sym) == content_token(sym.T)


@pytest.mark.parametrize("make", [
    lambda w: w.transpose(1, 0, 2),
    lambda w: w.transpose(2, 1, 0),
    lambda w: np.flip(w, 0),
    lambda w: w.view(np.int64),
    lambda w: w.reshape(4, 2, 4) if w.size == 32 else w,
])
def test_token_differs_for_other_contents_with_the_same_bytes(make):
    w = np.arange(32, dtype=np.float64).reshape(2, 4, 4)
    other = make(w)
    same = other.shape == w.shape and other.dtype == w.dtype and np.array_equal(other, w)
    assert (content_token(other) == content_token(w)) == same


def test_transposed_const_computes_with_its_own_values(cc):
    client = cc
    g = matmul_graph()
    rng = np.random.default_rng(0)
    x = rng.random((4, 4))
    w = rng.random((4, 4))
    for weights in (w, w.T, np.asfortranarray(w), np.asfortranarray(w).T):
        out = client.submit_kernel_graph(g, {"x": x, "w": weights}).result()["y"]
        np.testing.assert_allclose(out, x @ weights)


def test_two_clients_never_share_weights_of_other_contents(kaas_cluster):
    g = matmul_graph()
    rng = np.random.default_rng(1)
    x = rng.random((4, 4))
    w = rng.random((4, 4))
    with KaasClient(kaas_cluster) as a, KaasClient(kaas_cluster) as b:
        ya = a.submit_kernel_graph(g, {"x": x, "w": w}, tenant="a").result()["y"]
        yb = b.submit_kernel_graph(g, {"x": x, "w": np.asfortranarray(w.T)},
                                   tenant="b").result()["y"]
    np.testing.assert_allclose(ya, x @ w)
    np.testing.assert_allclose(yb, x @ w.T)


# -- item 2: a const changed in place is sent as it is at submission ----------

def test_const_changed_in_place_is_not_stale(cc):
    g = matmul_graph()
    x = np.eye(4)
    w = np.arange(16, dtype=np.float64).reshape(4, 4)
    first = cc.submit_kernel_graph(g, {"x": x, "w": w}).result()["y"]
    np.testing.assert_allclose(first, w)
    w[:] = 5.0
    second = cc.submit_kernel_graph(g, {"x": x, "w": w}).result()["y"]
    np.testing.assert_allclose(second, np.full((4, 4), 5.0))
    w[1, 2] = -1.0  # one element
    third = cc.submit_kernel_graph(g, {"x": x, "w": w}).result()["y"]
    np.testing.assert_allclose(third, w)


def test_resend_refuses_a_const_changed_since_its_submission(cc):
    """The registry keeps the array to send it again if every replica dies;
    an array changed since would be sent under the old content's key."""
    g = matmul_graph()
    w = np.arange(16, dtype=np.float64).reshape(4, 4)
    fut = cc.submit_kernel_graph(g, {"x": np.eye(4), "w": w})
    fut.result()
    reg = _state(cc).consts
    token = content_token(w)
    assert reg.has_array(token)
    w[0, 0] = 99.0
    with reg.lock:
        reg.entries[token].future = None  # as if every replica had died
    assert reg.resend(token) is None
    del fut


# -- item 3: equal consts in one graph are pinned and loaded once -------------

def test_cache_pins_and_loads_one_identity_once():
    cache = DeviceCache(make_backend("cpu"), 4096)
    arr = np.zeros(64)
    loads = [Load("same", arr.nbytes, lambda: arr, const=True)] * 2
    for _ in range(5):
        res = cache.reserve(loads, 0)
        assert res.misses + res.hits == 1
        cache.release(res)
    snap = cache.snapshot()
    assert snap["used_bytes"] == snap["cached_bytes"] == arr.nbytes
    assert snap["entries"] == 1 and snap["misses"] == 1 and snap["hits"] == 4
    cache.clear()
    assert cache.snapshot()["used_bytes"] == 0 and "same" not in cache
    # and it can be evicted for something else
    res = cache.reserve(loads, 0)
    cache.release(res)
    cache.release(cache.reserve([Load("big", 4096, lambda: np.zeros(512))], 0))
    assert "same" not in cache and cache.snapshot()["used_bytes"] == 4096


def test_runtime_with_two_equal_consts_keeps_the_cache_sound():
    g = two_bias_graph()
    rt = WorkerRuntime(make_backend("cpu"), 64 * 4 * 8)
    zeros = np.zeros(64, np.float32)
    for i in range(6):
        x = np.full(64, float(i), np.float32)
        req = GraphRequest(f"k{i}", "biases", "t", [
            InputRef("x", x.nbytes, None),
            InputRef("b1", zeros.nbytes, "zkey", const=True),
            InputRef("b2", zeros.nbytes, "zkey", const=True)])
        out, _ = rt.run(g, req, [x, zeros, zeros], Identities([None, "zkey", "zkey"]))
        np.testing.assert_array_equal(out["y"], x)
    snap = rt.cache.snapshot()
    assert snap["entries"] == 1 and snap["used_bytes"] == zeros.nbytes
    assert snap["private_bytes"] == 0
    rt.cache.clear()
    assert rt.cache.snapshot()["used_bytes"] == 0


def test_two_zero_biases_through_the_cluster(cc):
    g = two_bias_graph()
    cc.kaas_clear_caches()
    b1 = np.zeros(64, np.float32)  # two arrays, one content: one Dask key
    b2 = np.zeros(64, np.float32)
    for i in range(8):
        x = np.full(64, float(i), np.float32)
        y = cc.submit_kernel_graph(g, {"x": x, "b1": b1, "b2": b2}).result()["y"]
        np.testing.assert_array_equal(y, x)
    workers = cc.kaas_stats()["workers"]
    assert sum(w["misses"] for w in workers.values()) >= 1
    for w in workers.values():
        # one entry of 256 bytes where the zeros were loaded, counted once
        assert w["cached_bytes"] == w["used_bytes"] == 256 * w["entries"]
        assert w["entries"] <= 1 and w["private_bytes"] == 0
    cc.kaas_clear_caches()
    for w in cc.kaas_stats()["workers"].values():
        assert w["used_bytes"] == 0 and w["entries"] == 0


@pytest.fixture(scope="module")
def kaas_cluster():
    with LocalKaasCluster(2, backend="cpu", dashboard_address="127.0.0.1:0",
                          device_memory_limit="64MB") as cluster:
        yield cluster


@pytest.fixture
def cc(kaas_cluster):
    with KaasClient(kaas_cluster) as client:
        yield client


# -- item 5: a new const while a listed worker is silent ----------------------

def test_new_const_with_a_silent_worker_finishes_submitting():
    """A worker the scheduler still lists but that answers nothing (SIGSTOP:
    a killed process not yet noticed, a host whose link is down): Dask's
    ``scatter(broadcast=True)`` retried replication to it for ever, so the
    submission hung.  Now each scatter attempt is bounded and the second
    copy is best effort: the submission returns, and every result is right
    once the worker answers again."""
    with dask.config.set({"distributed.comm.timeouts.connect": "2s"}), \
            LocalKaasCluster(2, backend="cpu", dashboard_address="127.0.0.1:0",
                             device_memory_limit="64MB") as cluster, \
            KaasClient(cluster) as c:
        g = two_bias_graph()
        x = np.ones(64, np.float32)
        c.submit_kernel_graph(g, {"x": x, "b1": x, "b2": x}).result()
        pids = c.run(os.getpid)
        victim = sorted(pids)[0]
        os.kill(pids[victim], signal.SIGSTOP)
        try:
            _state(c).refresh()
            assert victim in _state(c).candidates()
            pool = ThreadPoolExecutor(1)
            futs, weights = [], []
            for i in range(4):
                b = np.full(64, i + 1, np.float32)
                weights.append(b)
                # bounded: the old code never returned from some of these
                futs.append(pool.submit(c.submit_kernel_graph, g,
                                        {"x": x, "b1": b, "b2": b}).result(timeout=150))
        finally:
            os.kill(pids[victim], signal.SIGCONT)
        for b, f in zip(weights, futs):
            np.testing.assert_array_equal(f.result(timeout=120)["y"], x + 2 * b)


# -- item 12: the request annotation does not ride on compute messages --------

def test_compute_messages_stay_msgpack(cc, caplog):
    """Dask sends a task's annotations with every compute-task message; a
    request object there is not msgpack data, so every batch of compute
    messages fell back to pickle (logged once per request)."""
    import msgpack

    g = two_bias_graph()
    x = np.ones(64, np.float32)
    with caplog.at_level(logging.INFO, logger="distributed.protocol.core"):
        futs = cc.map_kernel_graph(g, [{"x": x * i, "b1": x, "b2": x} for i in range(6)],
                                   keep_on_device=["y"])
        for i, f in enumerate(futs):
            np.testing.assert_array_equal(f.result()["y"], x * i + 2)

    def annotations(dask_scheduler):
        return {str(k): ts.annotations for k, ts in dask_scheduler.tasks.items()
                if str(k).startswith("kaas-")}

    seen = cc.run_on_scheduler(annotations)
    assert {str(f.key) for f in futs} <= set(seen)
    for key, ann in seen.items():
        assert "kaas" not in (ann or {}), key
        msgpack.dumps(ann or {})
    assert not [r for r in caplog.records if "falling back to pickle" in r.getMessage()]


# -- item 11: each request counted once, by how it ended -----------------------

def slow_add(xp, x, b, y, seconds):
    import time

    time.sleep(float(seconds))
    y[...] = x + b


def slow_add_graph(name, n, seconds):
    """``y = x + b`` (``b`` a const) taking ``seconds`` per request."""
    g = KernelGraph(name)
    x = g.input("x", (n,), np.float32)
    b = g.const("b", (n,), np.float32)
    y = g.output("y", (n,), np.float32)
    g.launch(Kernel.array(slow_add), [x, b, Out(y), np.float64(seconds)])
    return g


def test_requests_sent_again_after_a_lost_const_are_counted_once():
    """Every worker dies with requests in flight: Dask cancels them (their
    const went with the workers) and the client sends them again under the
    same keys.  They were counted cancelled and submitted twice."""
    n = 1024
    g = slow_add_graph("counted", n, 0.05)
    rng = np.random.default_rng(5)
    bias = rng.random(n, dtype=np.float32)
    xs = [rng.random(n, dtype=np.float32) for _ in range(16)]
    with LocalKaasCluster(2, backend="cpu", dashboard_address="127.0.0.1:0",
                          device_memory_limit="64MB") as cluster, \
            KaasClient(cluster) as c:
        futs = c.map_kernel_graph(g, [{"x": v, "b": bias} for v in xs], tenant="counted")
        futs[0].result(timeout=60)
        pids = c.run(os.getpid)
        for pid in pids.values():
            os.kill(pid, signal.SIGKILL)
        for v, f in zip(xs, futs):
            np.testing.assert_allclose(f.result(timeout=120)["y"], v + bias, rtol=1e-6)
        t = c.kaas_stats()["tenants"]["counted"]
        assert _state(c).resender.resent >= 1
        assert t["resent"] >= 1, t
        assert t["submitted"] == t["graphs_run"] == len(xs), t
        assert t["cancelled"] == 0 and t["errors"] == 0 and t["in_flight"] == 0, t


# -- item 8: chains of kept outputs survive the loss of every worker ----------

def kill_every_worker(c, n=2, timeout=120.0):
    """SIGKILL every worker, then wait for ``n`` new ones."""
    import time

    pids = c.run(os.getpid)
    for pid in pids.values():
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = set(c.scheduler_info()["workers"])
        if not now & set(pids) and len(now) >= n:
            return
        time.sleep(0.1)
    raise AssertionError(f"workers did not come back: {c.scheduler_info()['workers']}")


def test_chains_of_kept_outputs_are_sent_again_in_order():
    """Graphs that take the kept output of the one before, their const lost
    with every worker: each chain is sent again producer first, so no
    request names a dependency the scheduler already forgot."""
    n = 1024
    g = slow_add_graph("chain", n, 0.02)
    rng = np.random.default_rng(8)
    bias = rng.random(n, dtype=np.float32)
    starts = [rng.random(n, dtype=np.float32) for _ in range(6)]
    with LocalKaasCluster(2, backend="cpu", dashboard_address="127.0.0.1:0",
                          device_memory_limit="64MB") as cluster, \
            KaasClient(cluster) as c:
        chains = []
        for s in starts:
            links = [c.submit_kernel_graph(g, {"x": s, "b": bias}, keep_on_device=["y"])]
            for _ in range(3):
                links.append(c.submit_kernel_graph(g, {"x": links[-1]["y"], "b": bias},
                                                   keep_on_device=["y"]))
            chains.append(links)
        chains[0][0].result(timeout=60)
        for _ in range(2):  # twice: the second time some chains have finished
            kill_every_worker(c)
        for s, links in zip(starts, chains):
            for depth, f in enumerate(links, start=1):
                want = s + depth * bias
                np.testing.assert_allclose(f.result(timeout=120)["y"], want, rtol=1e-5)
                np.testing.assert_allclose(f["y"].result(timeout=120), want, rtol=1e-5)


# -- frozen consts: a token taken once, for arrays nobody can change ----------

def test_frozen_consts_compute_right_and_cannot_be_changed(cc):
    """``freeze_const`` copies into an immutable buffer so its token can be
    taken once; every way of changing it fails, its transpose is still
    another const, and the original changing leaves the frozen copy alone."""
    from dask_kaas import freeze_const
    from dask_kaas.const_identity import _frozen_tokens, is_frozen

    g = matmul_graph()
    rng = np.random.default_rng(3)
    x = rng.random((4, 4))
    w = rng.random((4, 4))
    f = freeze_const(w)
    assert is_frozen(f) and freeze_const(f) is f and content_token(f) == content_token(w)
    for weights, expect in ((f, w), (f.T, w.T), (f, w)):
        out = cc.submit_kernel_graph(g, {"x": x, "w": weights}).result()["y"]
        np.testing.assert_allclose(out, x @ expect)
    assert id(f) in _frozen_tokens  # taken once, kept while f lives
    with pytest.raises(ValueError):
        f[0, 0] = 1.0
    for view in (f, f.T, f[1:], f.view(np.uint8)):
        with pytest.raises(ValueError):
            view.flags.writeable = True
    w[:] = 0.0  # the original may change: the frozen copy does not
    out = cc.submit_kernel_graph(g, {"x": x, "w": f}).result()["y"]
    assert not np.allclose(out, 0.0)
    key = id(f)
    del f, weights
    import gc

    gc.collect()
    assert key not in _frozen_tokens  # leaves with its array


def test_only_arrays_nobody_can_change_count_as_frozen():
    """A read-only view of a writeable array, or an array made read-only
    whose memory something else can write, is hashed at every submission."""
    from dask_kaas.const_identity import _frozen_tokens, is_frozen

    w = np.arange(16, dtype=np.float64).reshape(4, 4)
    ro = w.view()
    ro.flags.writeable = False
    assert not is_frozen(ro)
    before = content_token(ro)
    w[0, 0] = 99.0  # changes what ro shows
    assert content_token(ro) != before and id(ro) not in _frozen_tokens
    buf = bytearray(32)  # a mutable buffer under a read-only array
    arr = np.frombuffer(buf, np.float64)
    arr.flags.writeable = False
    assert not is_frozen(arr)
    owned = np.zeros(4)
    owned.flags.writeable = False  # an owner can be made writeable again
    assert not is_frozen(owned)


@pytest.mark.parametrize("bad", [[1.0, 2.0], "abc", None, b"\xff\xfe", np.float64(1.0),
                                 np.array([object()]), np.ma.array([1.0, 2.0])])
def test_freeze_const_refuses_what_is_not_a_plain_array(bad):
    from dask_kaas import KaasError, freeze_const

    with pytest.raises(KaasError):
        freeze_const(bad)
