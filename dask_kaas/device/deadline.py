"""Time limits for requests whose kernel may never return.

A Python thread cannot be stopped from outside, so a request with a time
limit runs in a thread of its own while the Dask task's thread waits for it
with a deadline.  At the deadline the task fails (and the client hears of it)
although the kernel's thread runs on, still holding its slot and memory; the
worker reports such overdue requests so that nothing new is placed on that
slot, and the scheduler restarts the worker if the kernel does not return
within a grace period.

The clock starts when the graph holds its slot and its memory (the runtime
calls :func:`started`): time spent waiting behind other requests is not the
request's fault and must not fail it.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from ..graph.errors import RequestTimeoutError

T = TypeVar("T")

_current = threading.local()
#: Longest single wait on the condition (the loop waits again).
MAX_WAIT_S = 3600.0


def started() -> None:
    """Start the calling thread's request clock (no-op without a limit)."""
    job = getattr(_current, "job", None)
    if job is not None:
        job.start()


def expired() -> bool:
    """Whether the calling thread's request is past its time limit (its
    client has been told so, or is about to be): the runtime then launches
    nothing more.  Cheap enough to ask between every two launches."""
    job = getattr(_current, "job", None)
    return job is not None and job.expired()


class _Job:
    """One request running in its own thread, watched by the task's thread."""

    def __init__(self, timeout: float, on_overdue: Callable[[], None],
                 on_late_return: Callable[[], None], graph: str | None) -> None:
        self.timeout = timeout
        self.graph = graph
        self.on_overdue = on_overdue
        self.on_late_return = on_late_return
        self.cond = threading.Condition()
        self.started_at: float | None = None
        self.finished = False
        self.overdue = False
        self.result: Any = None
        self.error: BaseException | None = None

    def start(self) -> None:
        with self.cond:
            if self.started_at is None:
                self.started_at = time.monotonic()
                self.cond.notify_all()

    def expired(self) -> bool:
        started = self.started_at
        return self.overdue or (started is not None
                                and time.monotonic() - started >= self.timeout)

    def run(self, fn: Callable[[], Any]) -> None:
        _current.job = self
        try:
            self.result = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the waiting thread
            self.error = e
        finally:
            _current.job = None
            with self.cond:
                self.finished = True
                self.cond.notify_all()
                if self.overdue:
                    # Under the lock, so it cannot overtake on_overdue.
                    self.on_late_return()

    def wait(self) -> Any:
        with self.cond:
            while not self.finished:
                if self.started_at is None:
                    self.cond.wait()
                    continue
                remaining = self.started_at + self.timeout - time.monotonic()
                if remaining <= 0:
                    self.overdue = True
                    self.on_overdue()
                    raise RequestTimeoutError(
                        f"ran longer than its time limit of {self.timeout:g} s; its kernel "
                        "keeps its slot until it returns", graph=self.graph)
                # In steps: a limit of 1e300 s is valid but no lock can wait that long.
                self.cond.wait(min(remaining, MAX_WAIT_S))
        if self.error is not None:
            try:
                raise self.error
            finally:
                self.error = None  # no reference cycle through the traceback
        return self.result


def run_within(fn: Callable[[], T], timeout: float | None, *,
               on_overdue: Callable[[], None] = lambda: None,
               on_late_return: Callable[[], None] = lambda: None,
               graph: str | None = None) -> T:
    """``fn()``, or RequestTimeoutError once it has run ``timeout`` seconds
    past its :func:`started` call.  ``on_overdue`` is called when the limit
    passes with ``fn`` still running, ``on_late_return`` when such an ``fn``
    finally returns; both run under a lock and must be quick."""
    if timeout is None:
        return fn()
    job = _Job(timeout, on_overdue, on_late_return, graph)
    _runners.submit(job, fn)
    return job.wait()


class _Runners:
    """Daemon threads that run limited requests, reused while idle: starting
    a thread per request costs more than the handoff.  A runner stuck in a
    kernel that never returns is simply not idle, so another one starts."""

    #: Idle runners kept at most (the rest exit).
    MAX_IDLE = 8

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: queue.SimpleQueue[tuple[_Job, Callable[[], Any]]] = queue.SimpleQueue()
        self._idle = 0

    def submit(self, job: _Job, fn: Callable[[], Any]) -> None:
        with self._lock:
            spawn = self._idle == 0
            if not spawn:
                self._idle -= 1  # that runner is taken by this job
        self._jobs.put((job, fn))
        if spawn:
            threading.Thread(target=self._loop, name="kaas-request", daemon=True).start()

    def _loop(self) -> None:
        while True:
            job, fn = self._jobs.get()
            job.run(fn)
            with self._lock:
                if self._idle >= self.MAX_IDLE:
                    return
                self._idle += 1


_runners = _Runners()
