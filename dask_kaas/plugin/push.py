"""Small results pushed to the waiting client with the worker's report.

Why: a client waiting for a result otherwise asks the scheduler to gather
it and the scheduler asks the worker (Dask's default, ``direct=False``) --
a round trip through both, per request, after the result is already known,
and on a loaded machine about a millisecond of CPU.  A finished graph's
report already travels worker -> scheduler in the same write as Dask's
task-finished (``kaas.report-with-result``).  An output dict of host arrays
no larger than the request's ``push`` (the client's
``kaas.push-result-bytes``) goes in that report; the scheduler forwards it,
still serialized, to the client that submitted the request, on that
client's stream, ahead of Dask's own ``key-in-memory`` for the key (same
stream, same order).  ``KernelGraphFuture.result()`` takes it from there
instead of gathering.

Always a shortcut, never the only way: a result that is not pushed (too
large, kept on the device, the report went separately, the client
reconnected) is gathered as before, and the worker keeps its copy as Dask
does, for other tasks and for ``client.gather``.  Only the client that
submitted the request and still wants the key, as the scheduler saw it,
receives it, and only from the worker processing the key.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import numpy as np
from distributed.protocol import to_serialize

from .. import config

if TYPE_CHECKING:
    from distributed import Client, Scheduler

#: The client stream op that carries a pushed result.
PUSH_OP = "kaas-result"
#: Default of ``kaas.push-result-bytes``.
DEFAULT_PUSH_BYTES = 256 * 1024
#: A sent result stays in its message at least this long (see SentResults).
MIN_AGE_S = 0.1
#: Bytes and number of pushed results a client keeps for futures not read
#: yet (the oldest go first and are gathered when read).
STORE_BYTES = 64 << 20
STORE_RESULTS = 1024


def push_limit() -> int:
    """The client's ``kaas.push-result-bytes``, within 0 (no pushes: also
    for a value that is not a size) and what the scheduler accepts."""
    from dask.utils import parse_bytes

    from .access import MAX_PUSH_BYTES

    value = config.get("push-result-bytes", DEFAULT_PUSH_BYTES)
    try:
        if isinstance(value, bool):
            return 0
        n = int(parse_bytes(value)) if isinstance(value, str) else int(value or 0)
    except (TypeError, ValueError, OverflowError):
        return 0
    return min(max(n, 0), MAX_PUSH_BYTES)


class SentResults:
    """Drops the data of pushed results from messages already sent.

    Why: Dask keeps each batched stream's last 1,000 payloads (under 1 MB
    each) for debugging, and with them the results they carried: up to
    1,000 x ``push-result-bytes`` per stream, on the scheduler for every
    client and on every worker.  A message's result is removed from it one
    to two ticks (``tick``, at least MIN_AGE_S apart) after it was handed to
    the stream; one not written by then leaves without it, and its client
    gathers instead.
    """

    def __init__(self) -> None:
        self._recent: list[dict[str, Any]] = []
        self._older: list[dict[str, Any]] = []
        self._turned = time.monotonic()

    def sent(self, msg: dict[str, Any]) -> None:
        self._recent.append(msg)

    def tick(self, now: float | None = None) -> None:
        """Called periodically; results are kept at least MIN_AGE_S."""
        now = time.monotonic() if now is None else now
        if now - self._turned < MIN_AGE_S:
            return
        self._turned = now
        for msg in self._older:
            # None, not removed: a message being packed in another thread
            # (Dask offloads large ones) must not change size under it.
            msg["result"] = None
        self._older, self._recent = self._recent, []

    def __len__(self) -> int:
        return len(self._recent) + len(self._older)


# -- worker ------------------------------------------------------------------
def attach_result(report: dict[str, Any], outputs: dict[str, Any], limit: Any) -> None:
    """Put ``outputs`` in the report if they are host arrays within ``limit``
    bytes (a kept output is a device handle, never pushed)."""
    if not isinstance(limit, int) or limit <= 0:
        return
    total = 0
    for value in outputs.values():
        if type(value) is not np.ndarray:
            return
        total += value.nbytes
    if total <= limit:
        report["result"] = to_serialize(outputs)


# -- scheduler ---------------------------------------------------------------
def forward_result(scheduler: Scheduler, worker: str, key: Any, result: Any,
                   client: str | None, sent: SentResults) -> bool:
    """Send a pushed result on to ``client`` if the key is processing on
    ``worker`` and the client still wants it; False if it was not sent."""
    if client is None:
        return False
    ts = scheduler.tasks.get(key)
    if ts is None or ts.processing_on is None or ts.processing_on.address != worker:
        return False
    if not any(cs.client_key == client for cs in ts.who_wants or ()):
        return False
    bcomm = scheduler.client_comms.get(client)
    if bcomm is None:
        return False
    msg = {"op": PUSH_OP, "key": key, "result": result}
    bcomm.send(msg)
    sent.sent(msg)
    return True


# -- client ------------------------------------------------------------------
class PushedResults:
    """The results pushed to one client, until their futures read them."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.results: dict[Any, tuple[dict[str, Any], int]] = {}
        self.nbytes = 0
        #: results taken by a future instead of a gather (for tests, stats)
        self.taken = 0

    def install(self) -> None:
        """Take ``kaas-result`` messages on this client's stream (idempotent)."""
        self.client._stream_handlers[PUSH_OP] = self.receive

    def receive(self, key: Any = None, result: Any = None, **kwargs: Any) -> None:
        """On the client's event loop, before the key's ``key-in-memory``."""
        if key not in self.client.futures or not isinstance(result, dict):
            return
        size = sum(int(getattr(v, "nbytes", 0)) for v in result.values())
        self._drop(key)
        self.results[key] = (result, size)
        self.nbytes += size
        if self._over():
            self._trim()

    def take(self, key: Any) -> dict[str, Any] | None:
        """The pushed outputs of ``key`` (once), or None: gather them."""
        entry = self.results.pop(key, None)
        if entry is None:
            return None
        self.nbytes -= entry[1]
        self.taken += 1
        return entry[0]

    def _drop(self, key: Any) -> None:
        entry = self.results.pop(key, None)
        if entry is not None:
            self.nbytes -= entry[1]

    def _trim(self) -> None:
        """Forget results of released futures, then the oldest over the cap."""
        for key in [k for k in self.results if k not in self.client.futures]:
            self._drop(key)
        while self.results and self._over():
            self._drop(next(iter(self.results)))

    def _over(self) -> bool:
        return self.nbytes > STORE_BYTES or len(self.results) > STORE_RESULTS
