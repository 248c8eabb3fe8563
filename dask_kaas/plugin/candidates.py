"""Which workers a placement decision scores.

Scoring every worker costs O(workers) per decision, which at a thousand
workers is most of the scheduler's time.  Only two kinds of worker can win
under the cost model: one that already holds (or is about to hold) the
request's buffers — no load — and one that will be free soonest — no wait.
So a decision scores the holders of the request's cacheable inputs and host
inputs, plus the ``k`` workers with the earliest expected free time, taken
from a heap that the dispatcher updates whenever a worker's load changes.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable

from ..request import GraphRequest
from .directory import BufferDirectory

#: Least-loaded workers scored besides the holders of a request's buffers.
DEFAULT_LEAST_LOADED = 4
#: At most this many holders are scored: a buffer every worker holds (one
#: tenant's model spread over the whole pool) would otherwise make a decision
#: O(workers) again, and among that many holders the least-loaded ones,
#: which are scored anyway, hold it too.
MAX_HOLDERS = 8


class LoadIndex:
    """Workers open for work, by expected free time (lazy heap: an update
    pushes a new entry; stale ones are dropped when they reach the top)."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, str]] = []
        self._at: dict[str, float] = {}

    def update(self, worker: str, free_at: float) -> None:
        if self._at.get(worker) == free_at:
            return
        self._at[worker] = free_at
        heapq.heappush(self._heap, (free_at, worker))
        if len(self._heap) > 4 * len(self._at) + 64:
            self._heap = [(t, w) for w, t in self._at.items()]
            heapq.heapify(self._heap)

    def discard(self, worker: str) -> None:
        """No longer a candidate (left, or no free slot)."""
        self._at.pop(worker, None)

    def members(self) -> list[str]:
        return list(self._at)

    def __contains__(self, worker: str) -> bool:
        return worker in self._at

    def __len__(self) -> int:
        return len(self._at)

    def least(self, k: int) -> list[str]:
        """The ``k`` open workers expected free first, O(k log n) amortized."""
        out: list[tuple[float, str]] = []
        heap = self._heap
        while heap and len(out) < k:
            t, w = heapq.heappop(heap)
            if self._at.get(w) == t and (not out or out[-1][1] != w):
                out.append((t, w))
        for item in out:
            heapq.heappush(heap, item)
        return [w for _, w in out]


def candidate_workers(request: GraphRequest, directory: BufferDirectory, index: LoadIndex,
                      who_has: Callable[[str], Iterable[str]],
                      k: int = DEFAULT_LEAST_LOADED) -> list[str]:
    """Open workers worth scoring for ``request``: those holding any of its
    buffers (device cache or host memory) and the ``k`` least loaded."""
    seen: dict[str, None] = {}
    for i in request.inputs:
        for holders in (directory.holders_view(i.buffer_id) if i.buffer_id else (),
                        who_has(i.dask_key) if i.dask_key else ()):
            for w in holders:
                if len(seen) >= MAX_HOLDERS:
                    break
                if w in index:
                    seen[w] = None
    for w in index.least(k):
        seen[w] = None
    return list(seen)
