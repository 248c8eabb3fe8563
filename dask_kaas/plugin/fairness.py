"""TenantQueue: weighted fair share between tenants, as task priorities.

Start-time fair queuing: each request gets a virtual start tag
``max(tenant's last finish tag, V)`` and its tenant's finish tag advances by
``expected cost / weight``.  Requests run in start-tag order (the tag becomes
the Dask priority, which workers honour for resource-constrained tasks).

``V`` is the *lowest tag still queued or running*, not the highest tag ever
finished: a global clock runs ahead of a lightly loaded worker's queue and
would let a flooding tenant's backlog there go first.  Taking the maximum with
``V`` also means an idle tenant banks no credit: when it comes back it starts
level with the work in progress, not in the past.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass


@dataclass
class TenantShare:
    weight: float = 1.0
    finish_tag: float = 0.0


class TenantQueue:
    def __init__(self) -> None:
        self.tenants: dict[str, TenantShare] = {}
        self._active: dict[str, float] = {}  # request key -> start tag
        self._heap: list[tuple[float, str]] = []
        self._floor = 0.0
        self._seq = itertools.count()

    def set_weight(self, tenant: str, weight: float) -> None:
        if not weight > 0:
            raise ValueError(f"tenant weight must be positive, got {weight!r}")
        self.tenants.setdefault(tenant, TenantShare()).weight = float(weight)

    def weight(self, tenant: str) -> float:
        share = self.tenants.get(tenant)
        return share.weight if share else 1.0

    def virtual_time(self) -> float:
        """The lowest start tag among requests still queued or running."""
        while self._heap and self._active.get(self._heap[0][1]) != self._heap[0][0]:
            heapq.heappop(self._heap)
        return self._heap[0][0] if self._heap else self._floor

    def admit(self, key: str, tenant: str, cost: float, weight: float | None = None
              ) -> tuple[float, int]:
        """Tag a new request; returns (start tag, sequence number)."""
        share = self.tenants.setdefault(tenant, TenantShare())
        if weight is not None:
            self.set_weight(tenant, weight)
        start = max(share.finish_tag, self.virtual_time())
        share.finish_tag = start + max(cost, 1e-9) / share.weight
        self._active[key] = start
        heapq.heappush(self._heap, (start, key))
        return start, next(self._seq)

    def done(self, key: str) -> None:
        start = self._active.pop(key, None)
        if start is not None and start > self._floor:
            self._floor = start

    def __len__(self) -> int:
        return len(self._active)
