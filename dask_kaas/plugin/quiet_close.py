"""A closing worker's own heartbeat, aborted, is not an error.

``Worker.close`` stops its periodic callbacks and then closes its connection
pool; a heartbeat already waiting for the scheduler's answer (slow on a
loaded machine) has its connection closed under it, and Dask logs
"Failed to communicate with scheduler during heartbeat." at ERROR with a
traceback (dask/distributed#9032 and others: noisy shutdown).  Seen at the
end of ``dask-kaas demo`` under load in 1 of 10 runs.  Nothing failed: the
worker was closing.

Waiting for the heartbeat in the plugin's teardown instead would deadlock
for as long as its bound when the answer is "missing" (the heartbeat then
awaits the close that waits for it), so the record is demoted to DEBUG, and
only while every KaaS worker of this process is closing: the same message
from a running worker stays an error.
"""

from __future__ import annotations

import logging
import weakref
from typing import Any

logger = logging.getLogger(__name__)

#: Dask's message (distributed/worker.py, Worker.heartbeat).
HEARTBEAT_FAILED = "Failed to communicate with scheduler during heartbeat."
#: Worker statuses in which its connections are being closed on purpose.
CLOSING = frozenset({"closing", "closed", "closing_gracefully", "failed"})


class ClosingHeartbeatFilter(logging.Filter):
    """Demotes Dask's heartbeat error while this process's workers close."""

    def __init__(self) -> None:
        super().__init__()
        self.workers: weakref.WeakSet[Any] = weakref.WeakSet()

    def closing(self) -> bool:
        workers = list(self.workers)
        return bool(workers) and all(
            getattr(getattr(w, "status", None), "name", "running") in CLOSING for w in workers)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage() != HEARTBEAT_FAILED or not self.closing():
            return True
        error = record.exc_info[1] if record.exc_info else None
        if error is not None and not isinstance(error, OSError):
            return True
        logger.debug("heartbeat aborted by the worker's own close: %r", error)
        return False


FILTER = ClosingHeartbeatFilter()


def quiet_heartbeat_at_close(worker: Any) -> None:
    """Install :data:`FILTER` on Dask's worker logger for ``worker``."""
    FILTER.workers.add(worker)
    log = logging.getLogger("distributed.worker")
    if FILTER not in log.filters:
        log.addFilter(FILTER)
