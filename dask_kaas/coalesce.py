"""Concurrent submissions from many threads leave in one message.

Why: every ``update-graph`` message costs the scheduler a fixed amount of
work before its first task (deserialising the graph in an executor thread,
materialising it, the plugin's hook) and the client a serialisation and a
write; with many threads each submitting one request at a time (a model
server's request handlers, the closed-loop clients of the benchmark) that
fixed cost was most of the control plane's CPU per request.  Requests sent
four to a message cost 2.1 ms of client and scheduler CPU each instead of
3.1 (``BENCHMARKS.md``, control plane).

How: group commit, with no timer.  A thread that submits when nobody is
sending sends at once, alone -- a lone client's latency does not change.
Threads that submit while a send is in progress queue their requests; when
it ends, the first of them sends everything queued, merged into one message
per graph (and ``keep``/priority/resource), and the others wait only for
that send.  Each request is still its own Dask task with its own key,
tenant and annotation, so placement, fair share and late binding see
exactly what they saw before.  A merged send that fails is retried item by
item, so one bad submission fails only its own caller.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

#: send(client, graph, requests, columns, keep, priority, resource) -> futures
Send = Callable[..., list[Any]]


def coalesce_setting() -> bool:
    """``kaas.coalesce-submissions``: a boolean (null: the default, on)."""
    from . import config
    from .graph.errors import KaasError

    value = config.get("coalesce-submissions", True)
    if value is None:
        return True
    if not isinstance(value, bool):
        from .graph.names import show

        raise KaasError(f"config kaas.coalesce-submissions must be true or false, "
                        f"got {show(value)}")
    return value


def may_coalesce() -> bool:
    """Whether this thread's submission may go in another thread's message:
    not when the caller set Dask annotations of its own (``dask.annotate``:
    per thread, read by the thread that sends) or submits from inside a task
    (Dask records the submitting task, also per thread)."""
    import dask
    from distributed.worker import thread_state

    return not dask.get_annotations() and getattr(thread_state, "key", None) is None


class _Pending:
    """One caller's submission, waiting to be sent."""

    __slots__ = ("args", "done", "futures", "error", "lead")

    def __init__(self, args: tuple) -> None:
        self.args = args
        self.done = threading.Event()
        self.futures: list[Any] | None = None
        self.error: BaseException | None = None
        #: woken to send what queued behind the previous send
        self.lead = False


class SubmitCoalescer:
    """One per client: merges the submissions that queue behind a send."""

    def __init__(self, send: Send, max_requests: int) -> None:
        self._send = send
        self._max = max_requests
        self._lock = threading.Lock()
        self._queue: list[_Pending] = []
        self._sending = False
        #: messages sent and requests in them (statistics, tests)
        self.messages = 0
        self.requests = 0

    def submit(self, client: Any, graph: Any, requests: list, columns: list[list[Any]],
               keep: list[str], priority: int, resource: str) -> list[Any]:
        item = _Pending((client, graph, requests, columns, keep, priority, resource))
        with self._lock:
            self._queue.append(item)
            lead = not self._sending
            self._sending = True
        if not lead:
            self._wait(item)
            lead = item.lead  # the previous sender handed the queue over
        if lead:
            self._drain()
        if item.error is not None:
            raise item.error
        assert item.futures is not None
        return item.futures

    def _wait(self, item: _Pending) -> None:
        """Wait to be sent or handed the queue.  A caller interrupted here
        (KeyboardInterrupt) takes its request back if it is still queued,
        or sends the queue on if it was just handed it: the coalescer never
        waits for a caller that left."""
        try:
            item.done.wait()
        except BaseException:
            with self._lock:
                handed = item.lead
                if not handed and item in self._queue:
                    self._queue.remove(item)
            if handed:
                self._drain()
            raise

    def _drain(self) -> None:
        """Send what is queued (the caller's own request among it), then
        hand over to the first of whatever queued meanwhile: nobody sends
        for ever, and nobody waits for more than the send before theirs."""
        with self._lock:
            batch, self._queue = self._queue, []
        try:
            self._send_batch(batch)
        finally:
            for item in batch:  # whatever happened, no caller waits for ever
                if not item.done.is_set() and item.futures is None and item.error is None:
                    item.error = RuntimeError("submission interrupted")
                    item.done.set()
            with self._lock:
                nxt = self._queue[0] if self._queue else None
                if nxt is None:
                    self._sending = False
                else:
                    nxt.lead = True
            if nxt is not None:
                nxt.done.set()

    def _send_batch(self, batch: list[_Pending]) -> None:
        groups: dict[tuple, list[_Pending]] = {}
        for item in batch:
            _, graph, _, _, keep, priority, resource = item.args
            groups.setdefault((id(graph), tuple(keep), priority, resource), []).append(item)
        for items in groups.values():
            while items:
                part, n = [], 0
                while items and (not part or n + len(items[0].args[2]) <= self._max):
                    n += len(items[0].args[2])
                    part.append(items.pop(0))
                self._send_group(part)

    def _send_group(self, items: list[_Pending]) -> None:
        if len(items) > 1:
            try:
                futs = self._send_merged(items)
            except Exception:  # noqa: BLE001 - sent again one by one below
                pass
            else:
                self.messages += 1
                lo = 0
                for item in items:
                    n = len(item.args[2])
                    self._done(item, futs[lo:lo + n], None)
                    lo += n
                return
        for item in items:
            try:
                futs, error = self._send(*item.args), None
            except Exception as e:  # noqa: BLE001 - raised in its caller's thread
                futs, error = None, e
            # (an interrupt goes up in this thread; _drain frees the others)
            self.messages += 1
            self._done(item, futs, error)

    def _send_merged(self, items: list[_Pending]) -> list[Any]:
        client, graph, _, _, keep, priority, resource = items[0].args
        requests = [r for item in items for r in item.args[2]]
        columns = [[v for item in items for v in item.args[3][i]]
                   for i in range(len(items[0].args[3]))]
        return self._send(client, graph, requests, columns, keep, priority, resource)

    def _done(self, item: _Pending, futures: list[Any] | None,
              error: BaseException | None) -> None:
        item.futures, item.error = futures, error
        self.requests += len(item.args[2])
        item.done.set()
