"""Concurrent submissions coalesce into one message (dask_kaas/coalesce.py,
issue 20): every caller gets its own futures and values, a lone caller is
sent at once, a failing submission fails only its caller, and on a real
cluster many threads' requests reach the scheduler in fewer messages than
requests while each still runs as its own task."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from kaas_graphs import array_graph

from dask_kaas import KernelGraph
from dask_kaas.coalesce import SubmitCoalescer


class _Recorder:
    """A send function that records what it was asked to send and takes
    ``delay`` seconds, as a real send does, so that others queue behind it."""

    def __init__(self, delay: float = 0.0, bad: object = None) -> None:
        self.calls: list[tuple] = []
        self.delay = delay
        self.bad = bad
        self.lock = threading.Lock()

    def __call__(self, client, graph, requests, columns, keep, priority, resource):
        time.sleep(self.delay)
        if self.bad is not None and self.bad in requests:
            raise ValueError(f"cannot send {self.bad}")
        with self.lock:
            self.calls.append((graph, list(requests), [list(c) for c in columns], keep,
                               priority))
        return [f"future-of-{r}" for r in requests]


def _submit_from_threads(co, items, start_together=True):
    out: dict[int, object] = {}
    barrier = threading.Barrier(len(items))

    def one(i, args):
        if start_together:
            barrier.wait()
        try:
            out[i] = co.submit(*args)
        except BaseException as e:  # noqa: BLE001 - compared below
            out[i] = e

    threads = [threading.Thread(target=one, args=(i, a)) for i, a in enumerate(items)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads), "a caller never returned"
    return out


def test_a_lone_submission_is_sent_at_once_and_alone():
    send = _Recorder()
    co = SubmitCoalescer(send, 500)
    assert co.submit(None, "g", ["r1"], [["x1"]], [], 0, "GPU") == ["future-of-r1"]
    assert send.calls == [("g", ["r1"], [["x1"]], [], 0)]
    assert (co.messages, co.requests) == (1, 1)


def test_callers_queued_behind_a_send_share_the_next_message():
    send = _Recorder(delay=0.05)
    co = SubmitCoalescer(send, 500)
    items = [(None, "g", [f"r{i}"], [[f"x{i}"], [f"w{i}"]], [], 0, "GPU") for i in range(8)]
    out = _submit_from_threads(co, items)
    for i in range(8):  # every caller its own future, in its own order
        assert out[i] == [f"future-of-r{i}"]
    assert co.requests == 8 and co.messages < 8
    merged = [c for c in send.calls if len(c[1]) > 1]
    assert merged
    for _, reqs, cols, _, _ in send.calls:  # columns stay aligned with requests
        assert cols == [[r.replace("r", "x") for r in reqs], [r.replace("r", "w") for r in reqs]]


def test_only_same_graph_keep_and_priority_merge_and_slices_are_bounded():
    send = _Recorder(delay=0.05)
    co = SubmitCoalescer(send, 3)
    items = [(None, "g" if i % 2 else "h", [f"r{i}a", f"r{i}b"], [[1, 2]], [], i % 2, "GPU")
             for i in range(8)]
    out = _submit_from_threads(co, items)
    for i in range(8):
        assert out[i] == [f"future-of-r{i}a", f"future-of-r{i}b"]
    for graph, reqs, _, _, priority in send.calls:
        assert len(reqs) <= 3 or len(reqs) == 2  # never more than the slice (or one item)
        assert all(int(r[1:-1]) % 2 == priority for r in reqs)
        assert all((int(r[1:-1]) % 2 == 1) == (graph == "g") for r in reqs)


def test_a_failing_submission_fails_only_its_caller():
    send = _Recorder(delay=0.05, bad="r3")
    co = SubmitCoalescer(send, 500)
    items = [(None, "g", [f"r{i}"], [[i]], [], 0, "GPU") for i in range(6)]
    out = _submit_from_threads(co, items)
    assert isinstance(out[3], ValueError) and "r3" in str(out[3])
    for i in (0, 1, 2, 4, 5):
        assert out[i] == [f"future-of-r{i}"]
    # and the coalescer still works afterwards
    assert co.submit(None, "g", ["z"], [[0]], [], 0, "GPU") == ["future-of-z"]


def test_an_exception_that_is_not_an_error_still_frees_every_caller():
    class Stop(BaseException):
        pass

    def send(*args):
        time.sleep(0.02)
        raise Stop()

    co = SubmitCoalescer(send, 500)
    out = _submit_from_threads(co, [(None, "g", [f"r{i}"], [[i]], [], 0, "GPU")
                                    for i in range(4)])
    assert len(out) == 4 and all(isinstance(v, BaseException) for v in out.values())
    assert any(isinstance(v, Stop) for v in out.values())


# -- on a real cluster ---------------------------------------------------------
N = 32


def slow_affine(xp, x, w, y):
    time.sleep(0.002)
    y[...] = 2 * x + w


def graph() -> KernelGraph:
    return array_graph("coalesce-affine", slow_affine, N)


def _count_update_graphs(dask_scheduler):
    inner = dask_scheduler.stream_handlers["update-graph"]
    calls = dask_scheduler._kaas_test_updates = []

    async def update_graph(*args, **kwargs):  # Dask awaits a coroutine function
        calls.append(1)
        return await inner(*args, **kwargs)

    update_graph.inner = inner
    dask_scheduler.stream_handlers["update-graph"] = update_graph


def _updates(dask_scheduler):
    dask_scheduler.stream_handlers["update-graph"] = \
        dask_scheduler.stream_handlers["update-graph"].inner
    return len(dask_scheduler._kaas_test_updates)


@pytest.mark.parametrize("coalesce", [True, False])
def test_threads_of_one_client_share_messages_and_every_answer_is_right(client, coalesce):
    g = graph()
    rng = np.random.default_rng(5)
    tenants = [(f"co-{t}", rng.standard_normal(N).astype(np.float32)) for t in range(4)]
    client.submit_kernel_graph(g, {"x": np.zeros(N, np.float32), "w": tenants[0][1]},
                               tenant=tenants[0][0]).result()  # warm
    state = client._kaas_state
    old, state.coalesce = state.coalesce, coalesce
    real_send = state.coalescer._send

    def slow_send(*args):
        # every send takes a while, as on a loaded machine: the threads that
        # submit meanwhile always queue behind it (merging does not depend on
        # how fast this machine happens to be)
        time.sleep(0.02)
        return real_send(*args)

    state.coalescer._send = slow_send
    wrong, errors, sent = [], [], [0]
    barrier = threading.Barrier(8)
    m0, r0 = state.coalescer.messages, state.coalescer.requests
    client.run_on_scheduler(_count_update_graphs)

    def loop(c: int) -> None:
        tenant, w = tenants[c % len(tenants)]
        try:
            barrier.wait()  # all at once: the first sends queue behind each other
            for i in range(15):
                x = np.full(N, c * 100 + i, np.float32)
                out = client.submit_kernel_graph(g, {"x": x, "w": w}, tenant=tenant).result(60)
                sent[0] += 1
                if not np.allclose(out["y"], 2 * x + w):
                    wrong.append((c, i))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    try:
        threads = [threading.Thread(target=loop, args=(c,)) for c in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    finally:
        state.coalesce = old
        state.coalescer._send = real_send
        updates = client.run_on_scheduler(_updates)
    assert not errors and not wrong and sent[0] == 120
    messages = state.coalescer.messages - m0
    if coalesce:
        assert state.coalescer.requests - r0 == 120
        assert updates == messages < 120, (updates, messages)  # requests shared messages
    else:
        assert messages == 0 and updates == 120
    stats = client.kaas_stats()["tenants"]
    assert all(stats[t]["graphs_run"] >= 15 for t, _ in tenants)


class _InterruptedEvent:
    """A threading.Event whose wait is interrupted (KeyboardInterrupt) in a
    thread marked for it -- before anything happened, or just after it was
    woken -- as Ctrl-C interrupts a waiting main thread."""

    marked: dict[int, str] = {}
    real = threading.Event

    def __init__(self) -> None:
        self._ev = self.real()

    def set(self) -> None:
        self._ev.set()

    def clear(self) -> None:
        self._ev.clear()

    def is_set(self) -> bool:
        return self._ev.is_set()

    def wait(self, timeout=None):
        how = self.marked.pop(threading.get_ident(), None)
        if how == "at once":
            time.sleep(0.02)
            raise KeyboardInterrupt
        woken = self._ev.wait(timeout)
        if how == "when woken":
            raise KeyboardInterrupt
        return woken


@pytest.mark.parametrize("how", ["at once", "when woken"])
def test_a_caller_interrupted_while_waiting_never_blocks_the_others(monkeypatch, how):
    import dask_kaas.coalesce as coalesce_mod

    monkeypatch.setattr(coalesce_mod.threading, "Event", _InterruptedEvent)
    send = _Recorder(delay=0.2)
    co = SubmitCoalescer(send, 500)
    out: dict[str, object] = {}

    def call(name: str, mark: str | None = None) -> None:
        if mark:
            _InterruptedEvent.marked[threading.get_ident()] = mark
        try:
            out[name] = co.submit(None, "g", [name], [[name]], [], 0, "GPU")
        except BaseException as e:  # noqa: BLE001 - compared below
            out[name] = e

    leader = threading.Thread(target=call, args=("a",))
    leader.start()
    time.sleep(0.05)  # "a" is sending
    waiter = threading.Thread(target=call, args=("b", how))
    waiter.start()
    time.sleep(0.02)
    behind = threading.Thread(target=call, args=("c",))
    behind.start()
    for t in (leader, waiter, behind):
        t.join(10)
    assert not any(t.is_alive() for t in (leader, waiter, behind)), out
    assert out["a"] == ["future-of-a"] and out["c"] == ["future-of-c"]
    assert isinstance(out["b"], KeyboardInterrupt)
    sent = [r for call_ in send.calls for r in call_[1]]
    assert ("b" in sent) == (how == "when woken")  # taken back only if never handed over
    # and the coalescer still sends
    assert co.submit(None, "g", ["d"], [["d"]], [], 0, "GPU") == ["future-of-d"]


def test_a_caller_with_annotations_of_its_own_is_not_coalesced(client):
    """Dask annotations are per thread and read by the thread that sends: a
    caller that set its own is sent by itself, with them."""
    import dask

    from dask_kaas.client import _state
    from dask_kaas.coalesce import may_coalesce

    assert may_coalesce()
    with dask.annotate(retries=2):
        assert not may_coalesce()
        g = graph()
        w = np.ones(N, np.float32)
        before = _state(client).coalescer.requests
        fut = client.submit_kernel_graph(g, {"x": np.ones(N, np.float32), "w": w},
                                         tenant="co-annotated")
    assert _state(client).coalescer.requests == before
    np.testing.assert_allclose(fut.result(60)["y"], 3)
    retries = client.run_on_scheduler(
        lambda dask_scheduler, key: dask_scheduler.tasks[key].retries, key=fut.key)
    assert retries == 2


@pytest.mark.parametrize("value", ["maybe", "false", 2, 0.5, [True], {"on": 1}, "\udcff"])
def test_a_malformed_coalesce_setting_is_a_clear_error(value):
    import dask

    from dask_kaas.coalesce import coalesce_setting
    from dask_kaas.graph.errors import KaasError

    with dask.config.set({"kaas.coalesce-submissions": value}):
        with pytest.raises(KaasError, match="coalesce-submissions"):
            coalesce_setting()
    for ok, expected in ((True, True), (False, False), (None, True)):
        with dask.config.set({"kaas.coalesce-submissions": ok}):
            assert coalesce_setting() is expected
