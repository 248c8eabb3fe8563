"""Stamps and CPU counters the latency profile puts around Dask's own
handlers for its traced window (``dask-kaas bench --scenario
latency-profile``): installed on the scheduler through ``run_on_scheduler``,
on the workers through ``client.run``, and removed after; on the client, a
stamp when the scheduler's "key-in-memory" arrives.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any

#: Attribute under which a probe keeps its records on a scheduler or worker.
PROBE = "_kaas_latency_probe"


# -- wrappers ------------------------------------------------------------------
def _new_acc() -> dict[str, list[float]]:
    return {}


def _timed(fn: Callable[..., Any], acc: dict[str, list[float]], name: str,
           stamps: dict[str, dict[Any, float]] | None = None,
           key_of: Callable[[tuple, dict], Any] | None = None) -> Callable[..., Any]:
    """``fn`` counting calls, wall and thread CPU into ``acc[name]`` (and
    stamping the start time per key into ``stamps[name]``)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        w0, c0 = time.perf_counter(), time.thread_time()
        if stamps is not None and key_of is not None:
            for k in key_of(args, kwargs) or ():
                stamps.setdefault(name, {}).setdefault(k, time.time())
        try:
            return fn(*args, **kwargs)
        finally:
            rec = acc.setdefault(name, [0, 0.0, 0.0])
            rec[0] += 1
            rec[1] += time.perf_counter() - w0
            rec[2] += time.thread_time() - c0

    wrapper.__wrapped_probe__ = fn  # type: ignore[attr-defined]
    return wrapper


def _timed_async(fn: Callable[..., Any], acc: dict[str, list[float]], name: str,
                 stamps: dict[str, dict[Any, float]],
                 key_of: Callable[[tuple, dict], Any]) -> Callable[..., Any]:
    """A coroutine handler timed by wall clock only (it yields to others)."""

    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        w0 = time.perf_counter()
        t = time.time()
        for k in key_of(args, kwargs) or ():
            stamps.setdefault(name, {}).setdefault(k, t)
        try:
            return await fn(*args, **kwargs)
        finally:
            rec = acc.setdefault(name, [0, 0.0, 0.0])
            rec[0] += 1
            rec[1] += time.perf_counter() - w0
            for k in key_of(args, kwargs) or ():
                stamps.setdefault(name + ":end", {}).setdefault(k, time.time())

    wrapper.__wrapped_probe__ = fn  # type: ignore[attr-defined]
    return wrapper


def _keys_kw(args: tuple, kwargs: dict) -> list[Any]:
    keys = kwargs.get("keys")
    if keys is None:
        key = kwargs.get("key")
        return [] if key is None else [key]
    return list(keys)


# -- scheduler probe -------------------------------------------------------------
def _scheduler_install(dask_scheduler: Any) -> None:
    import distributed.scheduler as dsched

    s = dask_scheduler
    _remove_probe(s)
    acc, stamps = _new_acc(), {}
    undo: list[Callable[[], None]] = []

    def patch(obj: Any, attr: str, new: Any) -> None:
        old = obj[attr] if isinstance(obj, dict) else getattr(obj, attr)
        if isinstance(obj, dict):
            obj[attr] = new
            undo.append(lambda: obj.__setitem__(attr, old))
        else:
            setattr(obj, attr, new)
            undo.append(lambda: setattr(obj, attr, old))
        return old

    patch(s.stream_handlers, "update-graph",
          _timed_async(s.stream_handlers["update-graph"], acc, "update_graph", stamps, _keys_kw))
    patch(dsched, "_materialize_graph",
          _timed(dsched._materialize_graph, acc, "materialize (offload thread)"))
    patch(s, "_create_taskstate_from_graph",
          _timed(s._create_taskstate_from_graph, acc, "new tasks + first transitions"))
    patch(s.stream_handlers, "task-finished",
          _timed(s.stream_handlers["task-finished"], acc, "task-finished", stamps, _keys_kw))
    patch(s.handlers, "gather",
          _timed_async(s.handlers["gather"], acc, "gather", stamps, _keys_kw))
    plugin = s.extensions.get("kaas")
    if plugin is not None:
        from ..plugin.worker import UPDATE_OP

        patch(plugin, "update_graph", _timed(plugin.update_graph, acc, "kaas: update_graph hook"))
        patch(plugin, "transition", _timed(plugin.transition, acc, "kaas: transition hooks"))
        patch(plugin.dispatch, "release_pass",
              _timed(plugin.dispatch.release_pass, acc, "kaas: release pass"))
        patch(s.stream_handlers, UPDATE_OP,
              _timed(s.stream_handlers[UPDATE_OP], acc, "kaas: worker report"))
    setattr(s, PROBE, {"acc": acc, "stamps": stamps, "undo": undo,
                       "cpu0": time.process_time(), "log0": len(s.transition_log)})


def _remove_probe(server: Any) -> None:
    """Undo a probe's patches on a scheduler or worker (if it has one)."""
    probe = getattr(server, PROBE, None)
    if probe is not None:
        for fn in reversed(probe["undo"]):
            fn()
        delattr(server, PROBE)


def _scheduler_collect(dask_scheduler: Any, keys: list[str]) -> dict[str, Any]:
    probe = getattr(dask_scheduler, PROBE)
    wanted = set(keys)
    log: dict[str, list[tuple[str, str, float]]] = {}
    for t in list(dask_scheduler.transition_log)[-(20 * len(keys) + 1000):]:
        key, start, finish, ts = t[0], t[1], t[2], t[-1]
        if key in wanted:
            log.setdefault(key, []).append((start, finish, ts))
    out = {"acc": probe["acc"], "stamps": probe["stamps"], "log": log,
           "cpu": time.process_time() - probe["cpu0"]}
    _remove_probe(dask_scheduler)
    return out


# -- worker probe ------------------------------------------------------------------
def _worker_install(dask_worker: Any) -> None:
    import distributed.worker as dworker

    w = dask_worker
    _remove_probe(w)
    acc, stamps = _new_acc(), {}
    undo: list[Callable[[], None]] = []
    old_run = dworker._run_task
    dworker._run_task = _timed(old_run, acc, "execute (thread)")
    undo.append(lambda: setattr(dworker, "_run_task", old_run))
    old_ct = w.stream_handlers["compute-task"]
    w.stream_handlers["compute-task"] = _timed(old_ct, acc, "compute-task", stamps, _keys_kw)
    undo.append(lambda: w.stream_handlers.__setitem__("compute-task", old_ct))
    old_gd = w.handlers["get_data"]
    w.handlers["get_data"] = _timed_async(old_gd, acc, "get_data", stamps, _keys_kw)
    undo.append(lambda: w.handlers.__setitem__("get_data", old_gd))
    setattr(w, PROBE, {"acc": acc, "stamps": stamps, "undo": undo,
                       "cpu0": time.process_time()})


def _worker_collect(dask_worker: Any, keys: list[str]) -> dict[str, Any]:
    probe = getattr(dask_worker, PROBE)
    wanted = set(keys)
    log: dict[str, list[tuple[str, str, float]]] = {}
    for entry in list(dask_worker.state.log)[-(20 * len(keys) + 1000):]:
        if len(entry) >= 7 and entry[0] in wanted:  # (key, start, rec, final, recs, sid, t)
            log.setdefault(entry[0], []).append((entry[1], entry[3], entry[-1]))
    out = {"acc": probe["acc"], "stamps": probe["stamps"], "log": log,
           "cpu": time.process_time() - probe["cpu0"]}
    _remove_probe(dask_worker)
    return out


# -- the client side ---------------------------------------------------------------
class _ClientProbe:
    """Stamps when the scheduler's "key-in-memory" reaches this client."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.in_memory: dict[Any, float] = {}
        self._old = client._stream_handlers["key-in-memory"]

        def handler(key: Any = None, **kwargs: Any) -> Any:
            self.in_memory.setdefault(key, time.time())
            return self._old(key=key, **kwargs)

        client._stream_handlers["key-in-memory"] = handler

    def close(self) -> None:
        self.client._stream_handlers["key-in-memory"] = self._old
