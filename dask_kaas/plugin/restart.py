"""Restarting workers that cannot get their device back on their own.

Two cases, both reported by the worker in its statistics (over the stream
the scheduler plugin already reads):

- ``broken``: the device hit a sticky fault; nothing more can run there.
- ``overdue``: a request passed its time limit and failed (or was cancelled
  while it ran), but its kernel's thread still holds a slot.  If it has not
  returned ``kaas.request-timeout-grace`` seconds later, only a new process
  gets that slot back.

The restart goes through ``Scheduler.restart_workers``: with a Nanny the
process is killed and started again; without one the worker is removed.
Either way the scheduler plugin's ``remove_worker`` places the graphs pinned
to the old worker elsewhere, and Dask runs the tasks it had again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from ..graph.errors import KaasError
from ..limits import DEFAULT_GRACE_S, timeout_grace

if TYPE_CHECKING:
    from distributed import Scheduler

logger = logging.getLogger(__name__)


def _grace() -> float:
    """The grace period; a malformed setting must not stop the scheduler
    from reading worker updates, so it is logged and the default used."""
    try:
        return timeout_grace()
    except KaasError as e:
        logger.error("dask_kaas: %s; using %g s", e, DEFAULT_GRACE_S)
        return DEFAULT_GRACE_S


class RestartGuard:
    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        #: worker -> overdue request key -> when the scheduler first heard of it
        self.overdue: dict[str, dict[str, float]] = {}
        self.restarting: set[str] = set()
        #: Restarts asked for: {"worker", "reason", "time"}, newest last.
        self.history: deque[dict[str, Any]] = deque(maxlen=100)
        self._pending: set[Any] = set()

    def observe(self, worker: str, stats: dict[str, Any] | None) -> None:
        """A worker's latest statistics arrived."""
        if not stats:
            return
        broken = stats.get("broken")
        if broken:
            self.restart(worker, f"device broken: {broken}")
            return
        keys = set(stats.get("overdue") or ())
        before = self.overdue.get(worker, {})
        now = time.monotonic()
        seen = {k: before.get(k, now) for k in keys}
        for key in keys - before.keys():
            self._later(_grace(), self._check, worker, key)
        if seen:
            self.overdue[worker] = seen
        else:
            self.overdue.pop(worker, None)

    def _check(self, worker: str, key: str) -> None:
        if key in self.overdue.get(worker, {}):
            self.restart(worker, f"request {key!r} still running {_grace():g} s "
                                 "after its time limit passed or it was cancelled")

    def restart(self, worker: str, reason: str) -> None:
        if worker in self.restarting or worker not in self.scheduler.workers:
            return
        self.restarting.add(worker)
        self.history.append({"worker": worker, "reason": reason, "time": time.time()})
        logger.warning("dask_kaas: restarting worker %s: %s", worker, reason)
        self._later(0, self._restart, worker)

    async def _restart(self, worker: str) -> None:
        try:
            await self.scheduler.restart_workers(
                [worker], wait_for_workers=False, on_error="return",
                stimulus_id=f"kaas-restart-{time.time()}")
        except Exception:  # noqa: BLE001 - logged; the worker may be gone already
            logger.exception("dask_kaas: restarting %s failed", worker)

    def forget(self, worker: str) -> None:
        """The worker left (restarted or not)."""
        self.overdue.pop(worker, None)
        self.restarting.discard(worker)

    def _later(self, delay: float, fn: Any, *args: Any) -> None:
        loop = asyncio.get_running_loop()

        def fire() -> None:
            self._pending.discard(handle)
            result = fn(*args)
            if asyncio.iscoroutine(result):
                task = asyncio.ensure_future(result)
                self._pending.add(task)
                task.add_done_callback(self._pending.discard)

        handle = loop.call_later(delay, fire)
        self._pending.add(handle)

    def close(self) -> None:
        for pending in list(self._pending):
            pending.cancel()
        self._pending.clear()
