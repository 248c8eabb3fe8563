"""DispatchQueue: the backlog of held graph requests, in fair order.

Graphs wait here, in the scheduler, until a worker has room; only then is
the next one chosen, so the order of everything not yet started can still
change (a new tenant, a new weight, a higher priority) and a fast worker is
never left idle while a slow one drains a queue pinned to it.

Order: the backlogged tenant with the least virtual runtime (``FairShare``)
goes first, ties to the tenant backlogged longest; within a tenant, higher
request priority first, then FIFO.  Every operation is O(log n) (lazy heaps,
compacted when stale entries dominate), and any key can be removed at any
time (a cancelled or lost request).

Released requests stay known here until they finish, so the estimate charged
at release can be corrected by the device time the worker measured.

A tenant that has nothing queued but whose next request is expected soon
can have places kept for it (``anticipation``; see ``anticipation.py``).
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Container, Iterator
from dataclasses import dataclass, field
from typing import Any

from .anticipation import ExpectedReturns
from .fairshare import FairShare


@dataclass
class _Backlog:
    #: (-priority, seq, key); stale when the key is gone or re-queued.
    heap: list[tuple[int, int, Any]] = field(default_factory=list)
    n: int = 0


@dataclass
class _Entry:
    tenant: str
    priority: int
    seq: int


class DispatchQueue:
    def __init__(self, share: FairShare | None = None, anticipate_s: float = 0.0) -> None:
        self.share = share or FairShare()
        self.returns = ExpectedReturns(anticipate_s)
        self._entries: dict[Any, _Entry] = {}
        self._backlogs: dict[str, _Backlog] = {}
        #: (virtual runtime, seq, tenant), stale unless equal to _position[tenant]
        self._tenants: list[tuple[float, int, str]] = []
        self._position: dict[str, tuple[float, int]] = {}
        #: released key -> (tenant, estimate charged at release)
        self._running: dict[Any, tuple[str, float]] = {}
        #: tenant -> its released requests not finished yet
        self._running_n: dict[str, int] = {}
        self._seq = itertools.count()
        #: Least virtual runtime among backlogged tenants when last seen.
        self._floor = 0.0
        #: Virtual runtime of the last released request's tenant before its
        #: charge, and that charge.
        self._start_tag: float | None = None
        self._step = 0.0

    # -- queue -------------------------------------------------------------
    def push(self, key: Any, tenant: str, priority: int = 0,
             now: float | None = None) -> bool:
        """Queue ``key``; False (and no change) if it is already queued.
        ``now`` (monotonic seconds) lets a new request count as the return
        of one of the tenant's finished ones."""
        if key in self._entries:
            return False
        if now is not None:
            self.returns.returned(tenant, now)
        seq = next(self._seq)
        self._entries[key] = _Entry(tenant, priority, seq)
        backlog = self._backlogs.get(tenant)
        if backlog is None:
            backlog = self._backlogs[tenant] = _Backlog()
        heapq.heappush(backlog.heap, (-priority, seq, key))
        backlog.n += 1
        if tenant not in self._position:
            self.share.rejoin(tenant, self.virtual_time())
            self._place(tenant)
        return True

    def remove(self, key: Any) -> bool:
        """Forget a queued ``key`` (cancelled, lost, failed); False if absent."""
        entry = self._entries.pop(key, None)
        if entry is None:
            return False
        backlog = self._backlogs[entry.tenant]
        backlog.n -= 1
        if backlog.n == 0:
            self._drop_tenant(entry.tenant)
        elif len(backlog.heap) > 2 * backlog.n + 16:
            backlog.heap = [e for e in backlog.heap if self._live(e)]
            heapq.heapify(backlog.heap)
        return True

    def peek(self, exclude: Container[str] = ()) -> tuple[Any, str] | None:
        """The next (key, tenant) without taking it, skipping the tenants in
        ``exclude`` (those whose next request waits for a busy worker)."""
        tenant = self._next_tenant()
        if tenant is not None and tenant in exclude:
            stash = []
            while tenant is not None and tenant in exclude:
                stash.append(heapq.heappop(self._tenants))
                tenant = self._next_tenant()
            for item in stash:
                heapq.heappush(self._tenants, item)
        if tenant is None:
            return None
        heap = self._backlogs[tenant].heap
        while not self._live(heap[0]):
            heapq.heappop(heap)
        return heap[0][2], tenant

    def pop(self) -> tuple[Any, str] | None:
        """Take the next (key, tenant) off the queue."""
        nxt = self.peek()
        if nxt is not None:
            self.remove(nxt[0])
        return nxt

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Any) -> bool:
        return key in self._entries

    def __iter__(self) -> Iterator[Any]:
        return iter(self._entries)

    def tenant_of(self, key: Any) -> str | None:
        entry = self._entries.get(key)
        return entry.tenant if entry is not None else None

    def backlog(self) -> dict[str, int]:
        """Queued requests per backlogged tenant."""
        return {t: b.n for t, b in self._backlogs.items() if b.n}

    # -- service -----------------------------------------------------------
    def started(self, key: Any, tenant: str, estimate_s: float) -> None:
        """``key`` was released to a worker: charge its expected device time
        now, so the next release already sees it."""
        self.finished(key, None)
        self._running[key] = (tenant, max(estimate_s, 0.0))
        self._running_n[tenant] = self._running_n.get(tenant, 0) + 1
        before = self.share.of(tenant)
        self._charge(tenant, max(estimate_s, 0.0))
        self._start_tag, self._step = before, self.share.of(tenant) - before

    def finished(self, key: Any, measured_s: float | None,
                 now: float | None = None) -> None:
        """A released ``key`` ended: replace its estimate by the device time
        the worker measured (None: it did not run to the end; refund).
        ``now``: its tenant's next request is expected from now on."""
        run = self._running.pop(key, None)
        if run is None:
            return
        tenant, estimate = run
        left = self._running_n.get(tenant, 1) - 1
        if left > 0:
            self._running_n[tenant] = left
        else:
            self._running_n.pop(tenant, None)
        if now is not None and measured_s is not None:
            self.returns.finished(tenant, now, left)
        used = 0.0 if measured_s is None else max(float(measured_s), 0.0)
        if used != estimate:
            self._charge(tenant, used - estimate)

    def running(self) -> int:
        return len(self._running)

    def running_tenants(self) -> set[str]:
        """Tenants with released requests not finished yet."""
        return set(self._running_n)

    def charge(self, tenant: str, seconds: float) -> None:
        """Charge device time not tied to a released key."""
        self._charge(tenant, seconds)

    # -- anticipation --------------------------------------------------------
    @property
    def anticipate_s(self) -> float:
        return self.returns.window_s

    def anticipation(self, tenant: str, now: float,
                     busy_until: float | None = None) -> tuple[int, float | None]:
        """Places to keep, and until when, for tenants ahead of ``tenant`` in
        fair order whose next request is expected soon, if ``tenant`` is next
        and every open place is on a busy worker (the first of them expected
        free at ``busy_until``).  The caller releases ``tenant``'s request
        only into a place beyond those; (0, None) when nothing is expected."""
        if not self.returns:
            return 0, None
        floor = self.virtual_time()
        ahead_of = self.share.of(tenant)
        reserved, until = 0, None
        for other, exp in self.returns.waiting(now):
            if other == tenant or other in self._position:
                continue  # queued tenants are ordered by peek already
            if self.share.rejoin_at(other, floor) >= ahead_of:
                continue
            if busy_until is not None and exp.due > busy_until:
                continue  # a worker would idle before it comes: no use waiting
            reserved += exp.owed
            until = exp.until if until is None else min(until, exp.until)
        return reserved, until

    def forget(self, tenant: str) -> None:
        """Drop an idle tenant's fair-share and return-time state."""
        self.share.forget(tenant)
        self.returns.forget(tenant)

    def set_weight(self, tenant: str, weight: float) -> None:
        self.share.set_weight(tenant, weight)

    def floor(self) -> float:
        """Least virtual runtime among backlogged tenants (the last one seen
        when none is backlogged now)."""
        tenant = self._next_tenant()
        if tenant is not None:
            self._floor = self._position[tenant][0]
        return self._floor

    def virtual_time(self) -> float:
        """Where a tenant becoming backlogged starts (at the least): the
        floor, or the last release's start tag if lower (see FairShare), but
        never more than that release's charge below the floor."""
        floor = self.floor()
        if self._start_tag is None:
            return floor
        return min(floor, max(self._start_tag, floor - self._step))

    # -- internals ---------------------------------------------------------
    def _live(self, item: tuple[int, int, Any]) -> bool:
        entry = self._entries.get(item[2])
        return entry is not None and entry.seq == item[1]

    def _charge(self, tenant: str, seconds: float) -> None:
        self.share.charge(tenant, seconds)
        if tenant in self._position:
            self._place(tenant)

    def _place(self, tenant: str) -> None:
        """(Re)enter ``tenant`` in the tenant heap at its virtual runtime,
        keeping its place among equals (the order it became backlogged)."""
        old = self._position.get(tenant)
        pos = (self.share.of(tenant), old[1] if old else next(self._seq))
        self._position[tenant] = pos
        heapq.heappush(self._tenants, (pos[0], pos[1], tenant))
        if len(self._tenants) > 2 * len(self._position) + 16:
            self._tenants = [(p[0], p[1], t) for t, p in self._position.items()]
            heapq.heapify(self._tenants)

    def _drop_tenant(self, tenant: str) -> None:
        pos = self._position.pop(tenant, None)
        if pos is not None and not self._position:
            self._floor = pos[0]
        self._backlogs.pop(tenant, None)

    def _next_tenant(self) -> str | None:
        heap = self._tenants
        while heap:
            vr, seq, tenant = heap[0]
            if self._position.get(tenant) == (vr, seq):
                return tenant
            heapq.heappop(heap)
        return None

    def snapshot(self) -> dict[str, Any]:
        """For the dashboard and tests: backlog and virtual runtime per tenant."""
        return {"backlog": self.backlog(), "running": len(self._running),
                "vruntime": dict(self.share.vruntime),
                "weights": dict(self.share.weights)}
