"""DeviceCache and WorkerRuntime on the CPU backend, without Dask."""

from __future__ import annotations

import gc
import threading

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from dask_kaas import (
    DeviceOutOfMemoryError,
    InputMismatchError,
    Kernel,
    KernelExecutionError,
    KernelGraph,
    Out,
)
from dask_kaas.device.backend import make_backend
from dask_kaas.device.cache import DeviceCache, Load
from dask_kaas.device.runtime import Identities, WorkerRuntime
from dask_kaas.request import GraphRequest, InputRef


def load(bid, n, fill=1.0):
    arr = np.full(n // 8, fill)
    return Load(bid, arr.nbytes, lambda: arr)


def test_hit_miss_and_lru_eviction():
    cache = DeviceCache(make_backend("cpu"), 3 * 800)
    for bid in "abc":
        cache.release(cache.reserve([load(bid, 800)], 0))
    assert cache.stats.misses == 3 and cache.used_bytes == 2400
    res = cache.reserve([load("a", 800)], 0)  # hit; "a" becomes most recent
    assert res.hits == 1 and res.bytes_to_device == 0
    cache.release(res)
    cache.release(cache.reserve([load("d", 800)], 0))  # evicts "b", the least recent
    assert set(cache.resident()) == {"a", "c", "d"}
    assert cache.stats.evictions == 1
    assert cache.stats.bytes_to_device == 4 * 800
    assert cache.stats.peak_used_bytes <= cache.capacity_bytes


def test_pinned_buffers_are_not_evicted_and_oversized_requests_refused():
    cache = DeviceCache(make_backend("cpu"), 1600)
    held = cache.reserve([load("a", 800)], 0)
    with pytest.raises(DeviceOutOfMemoryError, match="1600"):
        cache.reserve([load("b", 800)], 1000)
    cache.release(cache.reserve([load("b", 800)], 0))
    assert "a" in cache and "b" in cache
    cache.release(held)


def test_reservation_waits_for_memory_held_by_another_graph():
    cache = DeviceCache(make_backend("cpu"), 1600)
    held = cache.reserve([load("a", 800)], 800)
    got = []

    def other():
        res = cache.reserve([load("b", 800)], 800)  # needs "a" unpinned and evicted
        got.append(res)
        cache.release(res)

    t = threading.Thread(target=other)
    t.start()
    t.join(0.3)
    assert t.is_alive() and not got  # waiting, not over capacity
    cache.release(held)
    t.join(5)
    assert got and cache.stats.peak_used_bytes <= 1600


def test_kept_output_is_written_back_on_eviction():
    from dask_kaas.device.handles import DeviceArray

    cache = DeviceCache(make_backend("cpu"), 1600)
    res = cache.reserve([], 800)
    data = np.arange(100, dtype=np.float64)
    handle = DeviceArray("out", data.shape, data.dtype, cache=cache)
    cache.release(res, {"out": (data.copy(), 800, handle)})
    assert handle.on_device and handle._host is None
    cache.release(cache.reserve([load("x", 800)], 0))
    cache.release(cache.reserve([load("y", 800)], 0))  # evicts "out"
    assert not handle.on_device and cache.stats.writebacks == 1
    np.testing.assert_array_equal(handle.get(), data)


class CacheMachine(RuleBasedStateMachine):
    """Random reserve/release/discard sequences keep exact accounting."""

    def __init__(self):
        super().__init__()
        self.cache = DeviceCache(make_backend("cpu"), 4000, wait_timeout=0.01)
        self.held = []
        self.model_bytes = {}

    @rule(ids=st.lists(st.sampled_from("abcdefg"), max_size=3, unique=True),
          sizes=st.integers(1, 12), private=st.integers(0, 1500))
    def reserve(self, ids, sizes, private):
        loads = [load(i, sizes * 80 + 80 * (ord(i) - 97)) for i in ids]
        try:
            self.held.append(self.cache.reserve(loads, private))
        except DeviceOutOfMemoryError:
            pass

    @rule()
    def release(self):
        if self.held:
            self.cache.release(self.held.pop(0))

    @rule(bid=st.sampled_from("abcdefg"))
    def discard(self, bid):
        self.cache.discard(bid)

    @invariant()
    def accounting_is_exact(self):
        c = self.cache
        assert c.used_bytes <= c.capacity_bytes
        assert c._entry_bytes == sum(e.nbytes for e in c._entries.values())
        assert c._private_bytes == sum(r.private_bytes for r in self.held)
        for r in self.held:
            for bid in r.pinned:
                assert c._entries[bid].pins >= 1

    def teardown(self):
        while self.held:
            self.cache.release(self.held.pop())
        assert self.cache.used_bytes == self.cache._entry_bytes
        assert all(e.pins == 0 for e in self.cache._entries.values())


TestCacheMachine = CacheMachine.TestCase
TestCacheMachine.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)


# -- WorkerRuntime -----------------------------------------------------------

def bad_fn(xp, x, y):
    raise ValueError("boom at row 3")


def mm_graph(kernel=None):
    g = KernelGraph("mm")
    x = g.input("x", (8, 8), np.float32)
    w = g.const("w", (8, 8), np.float32)
    y = g.output("y", (8, 8), np.float32)
    g.launch(kernel or Kernel.library("gemm"), [x, w, Out(y)] if kernel is None else [x, Out(y)])
    return g


def req(key, wid="w-id", keep=None):
    return GraphRequest(key, "mm", "t", [InputRef("x", 256, None), InputRef("w", 256, wid,
                                                                         const=True)],
                        keep=keep or {})


def ids(wid="w-id", keep=None):
    """What the worker plugin derives from the Dask keys it received: here
    the input x is inline (private), the const w is cached as ``wid``."""
    return Identities([None, wid], keep or {})


def test_runtime_failure_leaves_cache_consistent():
    rt = WorkerRuntime(make_backend("cpu"), 10_000)
    X = np.ones((8, 8), np.float32)
    W = np.eye(8, dtype=np.float32)
    bad = mm_graph(Kernel.array(bad_fn, name="bad_kernel"))
    with pytest.raises(KernelExecutionError, match="bad_kernel.*ValueError: boom at row 3") as e:
        rt.run(bad, GraphRequest("k0", "mm", "t", [InputRef("x", 256, None),
                                                   InputRef("w", 256, "w-id", const=True)]),
               [X, W], ids())
    assert e.value.graph == "mm" and e.value.launch == 0
    assert rt.cache._private_bytes == 0
    assert all(e.pins == 0 for e in rt.cache._entries.values())
    out, report = rt.run(mm_graph(), req("k1"), [X, W], ids())
    np.testing.assert_array_equal(out["y"], X @ W)
    assert report["hits"] == 1  # the const loaded by the failed request stayed valid
    assert rt.stats()["errors"] == 1 and rt.stats()["graphs_run"] == 2


def test_runtime_checks_values_only_the_worker_sees():
    rt = WorkerRuntime(make_backend("cpu"), 10_000)
    with pytest.raises(InputMismatchError, match="'w'.*float64"):
        rt.run(mm_graph(), req("k"), [np.ones((8, 8), np.float32), np.ones((8, 8))], ids())
    assert rt.cache.used_bytes == 0


def test_kept_output_handle_lifecycle():
    rt = WorkerRuntime(make_backend("cpu"), 10_000)
    X = np.ones((8, 8), np.float32)
    out, _ = rt.run(mm_graph(), req("k", keep={"y": "k-y"}), [X, np.eye(8, dtype=np.float32)],
                    ids(keep={"y": "k-y"}))
    h = out["y"]
    assert h.on_device and "k-y" in rt.cache
    np.testing.assert_array_equal(np.asarray(h), X)
    del out, h
    gc.collect()
    assert "k-y" not in rt.cache  # dropped with its last reference


def test_buffers_queued_graphs_need_are_evicted_last():
    soon = {"a"}
    cache = DeviceCache(make_backend("cpu"), 3 * 800, needed_soon=lambda: soon)
    for bid in "abc":
        cache.release(cache.reserve([load(bid, 800)], 0))
    cache.release(cache.reserve([load("d", 800)], 0))  # "a" is LRU but needed soon
    assert set(cache.resident()) == {"a", "c", "d"}
    soon.clear()
    cache.release(cache.reserve([load("e", 800)], 0))  # now plain LRU: "a" goes
    assert set(cache.resident()) == {"c", "d", "e"}


def test_worker_plugin_pickles_its_settings_only():
    import pickle

    from dask_kaas import KaasWorkerPlugin

    p = KaasWorkerPlugin("cpu", "64MB")
    p.needed_soon()  # has runtime state (a lock) that must not travel
    q = pickle.loads(pickle.dumps(p))
    assert (q.backend, q.device_memory_limit, q.runtime) == ("cpu", "64MB", None)


class FlakyBackend:
    """A CPU backend whose allocations fail ``failures`` times with MemoryError."""

    def __new__(cls, failures):
        from dask_kaas.device.cpu import CpuBackend

        class _Flaky(CpuBackend):
            left = failures

            def zeros(self, shape, dtype, stream):  # what graphs' own buffers use
                if type(self).left > 0:
                    type(self).left -= 1
                    raise MemoryError("out of device memory")
                return super().zeros(shape, dtype, stream)

        return _Flaky()


def test_real_out_of_memory_empties_the_cache_and_retries_once():
    X, W = np.ones((8, 8), np.float32), np.eye(8, dtype=np.float32)
    rt = WorkerRuntime(FlakyBackend(0), 10_000)
    rt.run(mm_graph(), req("warm", wid="other"), [X, W], ids("other"))
    assert "other" in rt.cache
    rt.backend = rt.cache.backend = FlakyBackend(1)
    out, _ = rt.run(mm_graph(), req("k1"), [X, W], ids())
    np.testing.assert_array_equal(out["y"], X @ W)
    assert "other" not in rt.cache  # emptied to make room
    rt.backend = rt.cache.backend = FlakyBackend(2)
    with pytest.raises(DeviceOutOfMemoryError, match="even after emptying"):
        rt.run(mm_graph(), req("k2"), [X, W], ids())
    assert rt.cache._private_bytes == 0
