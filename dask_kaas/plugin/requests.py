"""RequestBook: what the scheduler remembers about each kernel-graph request.

A request is booked in three places here while it is pending: its tenant's
counters, the queue of the worker it was released to (``queues`` and
``free_at``, which placement reads as that worker's wait) and the buffer
directory's plans (the dispatcher keeps the fair-share backlog).  A
Dask task can leave "pending" by many paths (memory; erred from processing or
straight from waiting when an input failed; released by a lost worker or a
cancellation; forgotten when its client lets go or leaves) and can come back
(Dask recomputes a result a dead worker held; ``client.retry``).  Every path
goes through :meth:`RequestBook.transition`, which the scheduler plugin calls
from its ``transition`` hook for every state change, so each booking is
released exactly once and each request is counted exactly once.

Tenants (their figures and fair-share state), graph cost entries and buffer
sizes that nothing uses any more are dropped by :meth:`RequestBook.expire`
(tenant names and graph names are chosen by clients, so nothing here may
grow with every name ever seen).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from ..request import GraphRequest
from .directory import BufferDirectory
from .dispatch import DispatchQueue
from .placement import CostModel
from .stats import TenantStats

#: Task states in which a request is waiting for, or holding, a worker slot.
PENDING = frozenset({"waiting", "processing", "no-worker", "queued"})
#: How a request ended (each is counted once per admission).
OK, ERROR, CANCELLED = "ok", "error", "cancelled"
#: Keys of forgotten requests, remembered so that the same request sent
#: again by its client (see dask_kaas.resend) is not counted as a second
#: submission: at most this many, for at most ENDED_KEPT_S seconds.
ENDED_KEPT = 10_000
ENDED_KEPT_S = 600.0


@dataclass
class RequestRecord:
    request: GraphRequest
    submitted: float
    worker: str | None = None
    estimate_s: float = 0.0
    planned: list[str] = field(default_factory=list)
    expected_finish: float = 0.0
    report: dict[str, Any] | None = None
    #: How the request ended (OK, ERROR, CANCELLED), None while in flight.
    outcome: str | None = None
    #: Queued or running now: in flight, or being recomputed after an OK end.
    running: bool = True
    #: The client (as the scheduler saw it submit) its result is pushed to.
    push_to: str | None = None

    @property
    def done(self) -> bool:
        return not self.running


class RequestBook:
    def __init__(self, directory: BufferDirectory, costs: CostModel,
                 queue: DispatchQueue) -> None:
        self.directory = directory
        self.costs = costs
        self.queue = queue
        #: Tenants whose weight an operator set (kept while they are idle).
        self.pinned: set[str] = set()
        self.requests: dict[str, RequestRecord] = {}
        self.selects: dict[str, str] = {}  # kept-output key -> graph key
        self.queues: dict[str, dict[str, float]] = {}  # worker -> request key -> estimate
        #: worker -> when the work placed on it is expected to be done
        self.free_at: dict[str, float] = {}
        self.tenants: dict[str, TenantStats] = {}
        #: Request key -> (tenant, outcome, when) of forgotten requests.
        self.ended_keys: OrderedDict[str, tuple[str, str | None, float]] = OrderedDict()

    # -- admission -----------------------------------------------------------
    def admit(self, key: str, request: GraphRequest, now: float) -> RequestRecord:
        """Record a new request, or the return of one that was cancelled
        (request keys are unique: the same key is the same request, sent
        again by its client after the cluster lost an input)."""
        rec = self.requests[key] = RequestRecord(request, now)
        t = self.tenant(request.tenant, now)
        tenant, outcome, _ = self.ended_keys.pop(key, (None, None, 0.0))
        if tenant != request.tenant or outcome not in (OK, CANCELLED) \
                or (outcome == CANCELLED and t.cancelled <= 0):
            t.submitted += 1
            return rec
        t.resent += 1
        if outcome == CANCELLED:  # its end is taken back: it is in flight again
            t.cancelled -= 1
        else:  # it had run (its result went with a worker): counted then
            rec.outcome = OK
        return rec

    def tenant(self, name: str, now: float | None = None) -> TenantStats:
        t = self.tenants.get(name)
        if t is None:
            t = self.tenants[name] = TenantStats()
        t.last_active = time.monotonic() if now is None else now
        return t

    # -- queue bookings ------------------------------------------------------
    def book(self, key: str, rec: RequestRecord, worker: str, booked_until: float) -> None:
        """Count ``rec`` in ``worker``'s queue (its plans are added by the caller)."""
        self.unbook(rec)
        rec.worker = worker
        self.free_at[worker] = booked_until
        self.queues.setdefault(worker, {})[key] = rec.estimate_s

    def unbook(self, rec: RequestRecord) -> None:
        if rec.worker is None:
            return
        queue = self.queues.get(rec.worker)
        if queue is not None:
            queue.pop(rec.request.key, None)
            if not queue:
                del self.queues[rec.worker]
        if not self.queues.get(rec.worker):
            self.free_at.pop(rec.worker, None)
        for bid in rec.planned:
            self.directory.unplan(rec.worker, bid)
        rec.planned = []

    def forget_worker(self, worker: str) -> None:
        """A worker left: its queue goes (its requests are placed again)."""
        for key in self.queues.pop(worker, {}):
            rec = self.requests.get(key)
            if rec is not None and rec.worker == worker:
                rec.planned = []  # the directory forgot the worker's plans
        self.free_at.pop(worker, None)

    # -- state changes -------------------------------------------------------
    def transition(self, key: Any, start: str, finish: str) -> None:
        """Follow one Dask state change of any task (non-requests are ignored
        but for kept-output selects)."""
        rec = self.requests.get(key)
        if rec is None:
            if finish == "forgotten" and key in self.selects:
                del self.selects[key]
                self.directory.forget_buffer(key)
            return
        if finish == "memory":
            self._end(rec, OK)
        elif finish == "erred":
            self._end(rec, ERROR)
        elif finish == "forgotten":
            self._end(rec, CANCELLED)
            del self.requests[key]
            self.ended_keys[key] = (rec.request.tenant, rec.outcome, time.monotonic())
            if len(self.ended_keys) > ENDED_KEPT:
                self.ended_keys.popitem(last=False)
        elif finish == "released":
            # A lost worker or a cancellation: the slot booking goes now (the
            # request is held again if it comes back).
            self.unbook(rec)
        elif finish in PENDING and not rec.running:
            self._reopen(key, rec)

    def _end(self, rec: RequestRecord, outcome: str) -> None:
        self.unbook(rec)
        rec.running = False
        if rec.outcome is not None:
            return  # a recomputation (or its loss): counted when it first ended
        rec.outcome = outcome
        now = time.monotonic()
        t = self.tenant(rec.request.tenant, now)
        if outcome == CANCELLED:
            t.cancelled += 1
        elif outcome == ERROR:
            t.errors += 1
        else:
            latency = now - rec.submitted
            t.graphs_run += 1
            t.record_latency(latency)
            t.completions.append(time.time())
            busy = (rec.report or {}).get("total_s")
            if isinstance(busy, (int, float)):
                t.queue_waits.append(max(0.0, latency - busy))

    def _reopen(self, key: str, rec: RequestRecord) -> None:
        """The task runs again after it had ended."""
        rec.running = True
        now = time.monotonic()
        t = self.tenant(rec.request.tenant, now)
        if rec.outcome == OK:
            # Dask recomputes a result a lost worker held: the same request,
            # not a new one.
            t.recomputed += 1
            return
        # A retry of a failed request is a new attempt.
        rec.outcome = None
        rec.submitted = now
        t.submitted += 1

    # -- bounds --------------------------------------------------------------
    def expire(self, now: float, tenant_idle_s: float, graph_idle_s: float) -> dict[str, int]:
        """Drop tenants idle for ``tenant_idle_s`` (no request in flight),
        graph cost entries unused for ``graph_idle_s`` and sizes of buffers
        nothing holds.  Returns how many of each went."""
        busy = set(self.queue.backlog()) | self.queue.running_tenants()
        gone = [name for name, t in self.tenants.items()
                if t.in_flight <= 0 and name not in busy
                and now - t.last_active > tenant_idle_s]
        for name in gone:
            del self.tenants[name]
        # Fair-share state of tenants with no figures left and nothing queued:
        # one back from idle starts level with the backlog anyway (rejoin).
        shares = [name for name in self._share_names()
                  if name not in self.tenants and name not in busy
                  and name not in self.pinned]
        for name in shares:
            self.queue.forget(name)
        while self.ended_keys and now - next(iter(self.ended_keys.values()))[2] > ENDED_KEPT_S:
            self.ended_keys.popitem(last=False)
        return {"tenants": len(gone), "shares": len(shares),
                "graphs": self.costs.expire(now - graph_idle_s),
                "buffer_sizes": self.directory.prune()}

    def _share_names(self) -> set[str]:
        share = self.queue.share
        return share.vruntime.keys() | share.weights.keys() | self.queue.returns.mean_s.keys()

    def sizes(self) -> dict[str, int]:
        """Entries held by every table (what the memory tests watch)."""
        return {"requests": len(self.requests), "selects": len(self.selects),
                "queued": sum(len(q) for q in self.queues.values()),
                "free_at": len(self.free_at), "tenants": len(self.tenants),
                "ended_keys": len(self.ended_keys),
                "shares": len(self._share_names()),
                "backlog": len(self.queue), "running": self.queue.running(),
                "graph_costs": len(self.costs.runtimes),
                "worker_costs": len(self.costs.worker_runtimes),
                "planned": self.directory.planned_count(),
                "buffer_sizes": self.directory.known_sizes()}

