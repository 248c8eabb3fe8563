"""When a worker may tell the scheduler that its device is broken.

A broken device (a sticky fault) gets its worker restarted, and a restart
makes Dask run again every task that was executing there.  The task whose
kernel caused the fault must not be among them (it would break the next
worker too), nor any task that finished alongside it: so the worker reports
``broken`` only once every task still executing is one parked on purpose
(it reached the broken device and waits to be moved elsewhere by the
restart).  Transitions and the task-finished messages happen in one step on
the worker's event loop, so a report sent after the last such transition
reaches the scheduler after those tasks' results.
"""

from __future__ import annotations

import threading
from typing import Any


class Health:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._executing: set[Any] = set()
        self._parked: set[Any] = set()

    def transition(self, key: Any, start: str, state: str) -> bool:
        """Follow one task transition (``state``: where the task really is
        now); True when a task stopped executing.  A task cancelled while
        executing keeps running until its function returns."""
        with self._lock:
            if state == "executing":
                self._executing.add(key)
            elif state != "cancelled" and key in self._executing:
                self._executing.discard(key)
                self._parked.discard(key)
                return True
        return False

    def park(self, key: Any) -> None:
        """``key`` waits for the restart rather than run on a broken device."""
        with self._lock:
            self._parked.add(key)

    def reportable(self, broken: str | None) -> str | None:
        """``broken`` once nothing but parked tasks is executing, else None."""
        if broken is None:
            return None
        with self._lock:
            return broken if self._executing <= self._parked else None
