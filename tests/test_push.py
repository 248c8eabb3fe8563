"""Results pushed to the submitting client with the worker's report
(plugin/push.py, issue 20): the value is the one the graph computed, no
gather goes to the scheduler for it, and everything the shortcut does not
cover (large results, kept outputs, failures, other clients) still works
through Dask's own path."""

from __future__ import annotations

import logging
import time

import numpy as np
import pytest
from distributed import Client
from kaas_graphs import array_graph

from dask_kaas import KernelGraph
from dask_kaas.graph.errors import KaasError
from dask_kaas.plugin.push import PUSH_OP, STORE_BYTES, PushedResults

N = 64


def affine(xp, x, w, y):
    if float(x[0]) < 0:
        raise ValueError("negative input")
    if float(x[0]) >= 1000:  # slow: another client can ask for it meanwhile
        time.sleep(0.5)
    y[...] = 3 * x + w


def graph(n: int = N, name: str = "push-affine") -> KernelGraph:
    return array_graph(name, affine, n)


def _count_gathers(dask_scheduler):
    """Count the scheduler's gather calls from now on (a wrapper around
    Dask's own handler; it still does the work)."""
    inner = dask_scheduler.handlers["gather"]
    calls = dask_scheduler._kaas_test_gathers = []

    async def gather(*args, **kwargs):
        calls.append(kwargs.get("keys"))
        return await inner(*args, **kwargs)

    gather.inner = inner
    dask_scheduler.handlers["gather"] = gather


def _gathers(dask_scheduler):
    calls = dask_scheduler._kaas_test_gathers
    dask_scheduler.handlers["gather"] = dask_scheduler.handlers["gather"].inner
    return [k for keys in calls for k in keys or ()]


def test_results_are_pushed_match_numpy_and_are_not_gathered(client):
    rng = np.random.default_rng(1)
    w = rng.standard_normal(N).astype(np.float32)
    xs = [np.abs(rng.standard_normal(N)).astype(np.float32) for _ in range(12)]
    pushed0 = client.kaas_stats()["pushed_results"]
    taken0 = client._kaas_state.pushed.taken
    client.run_on_scheduler(_count_gathers)
    try:
        futs = [client.submit_kernel_graph(graph(), {"x": x, "w": w}, tenant="push")
                for x in xs]
        outs = [f.result(timeout=60) for f in futs]
    finally:
        gathered = client.run_on_scheduler(_gathers)
    for x, out in zip(xs, outs):
        np.testing.assert_allclose(out["y"], 3 * x + w, rtol=1e-6)
        assert out["y"].dtype == np.float32 and out["y"].shape == (N,)
    state = client._kaas_state
    assert state.pushed.taken - taken0 == len(xs)
    assert client.kaas_stats()["pushed_results"] - pushed0 == len(xs)
    assert not set(gathered) & {f.key for f in futs}, gathered
    # the worker keeps its copy: Dask's gather still returns the same value
    again = client.gather(futs[0])
    np.testing.assert_allclose(again["y"], outs[0]["y"])
    # read twice: the second read gathers, same value
    np.testing.assert_allclose(futs[1].result()["y"], outs[1]["y"])


def test_a_result_above_the_limit_is_gathered(client):
    rng = np.random.default_rng(2)
    big = 4096  # 16 KiB of float32 output
    w = rng.standard_normal(big).astype(np.float32)
    x = np.abs(rng.standard_normal(big)).astype(np.float32)
    client.submit_kernel_graph(graph(big), {"x": x, "w": w}, tenant="push").result()
    state = client._kaas_state
    old = state.push_bytes
    state.push_bytes = big * 4 - 1
    taken0 = state.pushed.taken
    client.run_on_scheduler(_count_gathers)
    try:
        fut = client.submit_kernel_graph(graph(big), {"x": x, "w": w}, tenant="push")
        out = fut.result(timeout=60)
    finally:
        gathered = client.run_on_scheduler(_gathers)
        state.push_bytes = old
    np.testing.assert_allclose(out["y"], 3 * x + w, rtol=1e-6)
    assert state.pushed.taken == taken0
    assert fut.key in gathered
    # at the limit exactly, it is pushed
    state.push_bytes = big * 4
    try:
        out = client.submit_kernel_graph(graph(big), {"x": x, "w": w},
                                         tenant="push").result(timeout=60)
    finally:
        state.push_bytes = old
    np.testing.assert_allclose(out["y"], 3 * x + w, rtol=1e-6)
    assert state.pushed.taken == taken0 + 1


def test_kept_outputs_and_failures_take_dask_s_path(client):
    w = np.ones(N, np.float32)
    x = np.full(N, 2, np.float32)
    fut = client.submit_kernel_graph(graph(), {"x": x, "w": w}, tenant="push",
                                     keep_on_device=["y"])
    taken0 = client._kaas_state.pushed.taken
    np.testing.assert_allclose(fut.result(timeout=60)["y"], 7)
    np.testing.assert_allclose(fut["y"].result(timeout=60), 7)
    assert client._kaas_state.pushed.taken == taken0
    bad = client.submit_kernel_graph(graph(), {"x": -x, "w": w}, tenant="push")
    with pytest.raises(KaasError, match="negative input"):
        bad.result(timeout=60)
    assert client._kaas_state.pushed.taken == taken0


def test_another_client_wanting_the_key_is_not_pushed_to(client, cluster, caplog):
    """Only the submitter, as the scheduler saw it, receives the push: a
    plain Dask client holding a future of the same key gathers it and gets
    no message it has no handler for."""
    w = np.ones(N, np.float32)
    x = np.full(N, 1000, np.float32)
    with Client(cluster, set_as_default=False) as other:
        assert PUSH_OP not in other._stream_handlers
        slow = client.submit_kernel_graph(graph(), {"x": x, "w": w}, tenant="push")
        name = f"push-{slow.key}"
        client.publish_dataset(slow, name=name)
        theirs = other.get_dataset(name)
        with caplog.at_level(logging.ERROR, logger="distributed.client"):
            np.testing.assert_allclose(theirs.result(timeout=60)["y"], 3001)
            np.testing.assert_allclose(slow.result(timeout=60)["y"], 3001)
        assert not [r for r in caplog.records if PUSH_OP in r.getMessage()]
        client.unpublish_dataset(name)
        del theirs


class _ClientLike:
    """What PushedResults reads of a client: its futures and stream handlers."""

    def __init__(self) -> None:
        self.futures: dict = {}
        self._stream_handlers: dict = {}


def test_pushed_store_keeps_only_wanted_keys_within_its_cap():
    c = _ClientLike()
    store = PushedResults(c)  # type: ignore[arg-type]
    store.install()
    assert c._stream_handlers[PUSH_OP] == store.receive
    arr = np.zeros(1024, np.float32)
    store.receive(key="unknown", result={"y": arr})  # nobody's future: dropped
    for key in (b"\xff\xfe", "\udcff", None, ("tuple", 1), 10**30):  # hostile keys
        store.receive(key=key, result={"y": arr})
    store.receive(key="a", result={"y": arr}, extra="field", op="x")  # unknown fields
    assert store.results == {}
    c.futures["a"] = object()
    store.receive(key="a", result="not a dict")  # hostile payload: dropped
    store.receive(key="a", result={"y": arr})
    store.receive(key="a", result={"y": arr})  # sent again: replaced, counted once
    assert store.nbytes == arr.nbytes
    assert store.take("a")["y"] is arr and store.take("a") is None
    assert store.nbytes == 0 and store.taken == 1
    # over the byte cap the oldest go first; released futures before that
    big = np.zeros(STORE_BYTES // 4 // 4 + 1, np.float32)
    for k in "bcdef":
        c.futures[k] = object()
        store.receive(key=k, result={"y": big})
    assert store.nbytes <= STORE_BYTES
    assert "f" in store.results and "b" not in store.results
    del c.futures["f"]
    c.futures["g"] = object()
    store.receive(key="g", result={"y": big})
    assert "f" not in store.results and {"d", "e", "g"} <= set(store.results)


def _hold_scheduler_tick(dask_scheduler):
    dask_scheduler.extensions["kaas"]._periodic.stop()


def _hold_worker_tick(dask_worker):
    from dask_kaas.plugin.worker import PLUGIN_NAME

    dask_worker.plugins[PLUGIN_NAME]._callback.stop()


def _results_on_scheduler(dask_scheduler, tick=False):
    """How many pushed results the scheduler's logs of recent messages to
    clients hold (after two ticks of the plugin if ``tick``, which is then
    started again)."""
    ext = dask_scheduler.extensions["kaas"]
    if tick:  # two turns, each at least MIN_AGE_S after the one before
        ext.sent_results.tick(time.monotonic() + 1)
        ext.sent_results.tick(time.monotonic() + 2)
        ext._periodic.start()
    logs = [b.recent_message_log for b in dask_scheduler.client_comms.values()]
    return sum(1 for log in logs for payload in log if isinstance(payload, list)
               for m in payload if m.get("op") == PUSH_OP and m.get("result") is not None)


def _results_on_worker(dask_worker, tick=False):
    from dask_kaas.plugin.worker import PLUGIN_NAME, UPDATE_OP

    plugin = dask_worker.plugins[PLUGIN_NAME]
    if tick:
        plugin.sent_results.tick(time.monotonic() + 1)
        plugin.sent_results.tick(time.monotonic() + 2)
        plugin._callback.start()
    return sum(1 for payload in dask_worker.batched_stream.recent_message_log
               if isinstance(payload, list) for m in payload if m.get("op") == UPDATE_OP
               for r in m.get("reports") or () if r.get("result") is not None)


def test_pushed_data_leaves_dask_s_logs_of_recent_messages(client):
    """Dask keeps each stream's last 1,000 payloads: the results in them are
    dropped a tick or two after they were sent, on the scheduler and workers."""
    client.run_on_scheduler(_hold_scheduler_tick)
    client.run(_hold_worker_tick)
    w = np.ones(N, np.float32)
    for i in range(6):
        x = np.full(N, i, np.float32)
        out = client.submit_kernel_graph(graph(), {"x": x, "w": w}, tenant="push").result(60)
        np.testing.assert_allclose(out["y"], 3 * x + 1)
    assert client.run_on_scheduler(_results_on_scheduler) >= 6
    assert sum(client.run(_results_on_worker).values()) >= 6
    assert client.run_on_scheduler(_results_on_scheduler, tick=True) == 0
    assert sum(client.run(_results_on_worker, tick=True).values()) == 0


def _report_as_task(dask_worker, task_key, report_key):
    """The worker plugin's report() as the task ``task_key`` would call it,
    with a report naming ``report_key``: does the result stay in it?"""
    import threading

    from dask_kaas.plugin.worker import PLUGIN_NAME

    plugin = dask_worker.plugins[PLUGIN_NAME]
    ident = threading.get_ident()
    dask_worker.active_threads[ident] = task_key
    report = {"key": report_key, "tenant": "t", "graph": "g", "result": "outputs"}
    try:
        plugin.report(report)
    finally:
        del dask_worker.active_threads[ident]
        plugin._held.pop(task_key, None)
    return "result" in report


def test_a_request_naming_another_key_pushes_nothing(client):
    """A forged request whose ``key`` names another task (another tenant's
    request in flight) runs, but its outputs never travel under that key:
    the worker drops them from the report; and the forger gets its own
    result the ordinary way."""
    from test_handlers_hostile import submit_forged

    assert set(client.run(_report_as_task, task_key="kaas-a", report_key="kaas-a").values()) \
        == {True}
    assert set(client.run(_report_as_task, task_key="kaas-a", report_key="kaas-b").values()) \
        == {False}
    pushed0 = client.kaas_stats()["pushed_results"]
    victim = f"kaas-victim-{time.time_ns()}"
    fut = submit_forged(client, key=victim, push=1 << 20, tenant="push-forged-key")
    np.testing.assert_array_equal(fut.result(timeout=60)["y"], [0, 2, 0, 4])
    assert fut.key != victim
    assert client.kaas_stats()["pushed_results"] == pushed0


@pytest.mark.parametrize("value,expected", [
    ("256KiB", 256 * 1024), (0, 0), (None, 0), (-5, 0), ("not a size", 0), (True, 0),
    (float("inf"), 0), ([1, 2], 0), ("1TB", None), (10**30, None), ("\udcff", 0),
])
def test_push_result_bytes_setting_is_always_a_size_the_scheduler_accepts(value, expected):
    import dask

    from dask_kaas.plugin.access import MAX_PUSH_BYTES
    from dask_kaas.plugin.push import push_limit

    with dask.config.set({"kaas.push-result-bytes": value}):
        got = push_limit()
    assert got == (MAX_PUSH_BYTES if expected is None else expected)
