"""BufferDirectory: which worker holds which buffer on its device.

Two sources feed it.  Workers report what their device caches load and drop
(``resident``).  The placement itself adds ``planned`` entries the moment a
graph is sent to a worker, because a burst of requests is placed long before
the first of them runs: without them, twenty graphs submitted at once would
all look like strangers to every cache.  A plan lasts until the request that
made it ends; what the worker reported by then is the truth.
"""

from __future__ import annotations

from collections import defaultdict


class BufferDirectory:
    """Besides the tables, it keeps per-worker byte totals and a reverse index
    {buffer id -> workers} up to date on every change, so placement asks
    "who holds it" and "how full will it be" in O(1), not by scanning every
    buffer of every worker (a 1,000-worker pool holds 100,000 buffers)."""

    def __init__(self) -> None:
        self._resident: dict[str, dict[str, int]] = defaultdict(dict)  # worker -> id -> bytes
        self._planned: dict[str, dict[str, int]] = defaultdict(dict)  # worker -> id -> count
        self._sizes: dict[str, int] = {}
        self._holders: dict[str, set[str]] = {}  # id -> workers holding or planning it
        self._resident_total: dict[str, int] = defaultdict(int)
        #: worker -> id -> bytes counted for a planned buffer not resident yet
        self._extra: dict[str, dict[str, int]] = defaultdict(dict)
        self._extra_total: dict[str, int] = defaultdict(int)

    # -- worker reports --------------------------------------------------
    def added(self, worker: str, buffer_id: str, nbytes: int) -> None:
        held = self._resident[worker]
        self._resident_total[worker] += nbytes - held.get(buffer_id, 0)
        held[buffer_id] = nbytes
        if self._sizes.get(buffer_id) != nbytes:
            self._sizes[buffer_id] = nbytes
            self._resize_extra(buffer_id, nbytes)
        self._holders.setdefault(buffer_id, set()).add(worker)
        counted = self._extra[worker].pop(buffer_id, None)
        if counted is not None:
            self._extra_total[worker] -= counted

    def removed(self, worker: str, buffer_id: str) -> None:
        nbytes = self._resident[worker].pop(buffer_id, None)
        if nbytes is None:
            return
        self._resident_total[worker] -= nbytes
        if buffer_id in self._planned.get(worker, ()):
            self._count_extra(worker, buffer_id)
        else:
            self._drop_holder(worker, buffer_id)

    def reset_worker(self, worker: str, resident: dict[str, int]) -> None:
        planned = dict(self._planned.get(worker, {}))
        self.forget_worker(worker)
        for bid, nbytes in resident.items():
            self.added(worker, bid, nbytes)
        for bid, count in planned.items():
            for _ in range(count):
                self.plan(worker, bid, self._sizes.get(bid, 0))

    def forget_worker(self, worker: str) -> None:
        for table in (self._resident, self._planned):
            for bid in table.pop(worker, {}):
                self._drop_holder(worker, bid)
        self._extra.pop(worker, None)
        self._extra_total.pop(worker, None)
        self._resident_total.pop(worker, None)

    def forget_buffer(self, buffer_id: str) -> None:
        for worker in self._holders.pop(buffer_id, ()):
            nbytes = self._resident.get(worker, {}).pop(buffer_id, None)
            if nbytes is not None:
                self._resident_total[worker] -= nbytes
            self._planned.get(worker, {}).pop(buffer_id, None)
            counted = self._extra.get(worker, {}).pop(buffer_id, None)
            if counted is not None:
                self._extra_total[worker] -= counted
        self._sizes.pop(buffer_id, None)

    def prune(self) -> int:
        """Forget the sizes of buffers no worker holds or plans (a size is
        kept per buffer id ever seen otherwise).  Returns how many went."""
        stale = [b for b in self._sizes if b not in self._holders]
        for b in stale:
            del self._sizes[b]
        return len(stale)

    def known_sizes(self) -> int:
        return len(self._sizes)

    def planned_count(self) -> int:
        """Plans outstanding on every worker (0 once no request is booked)."""
        return sum(sum(held.values()) for held in self._planned.values())

    # -- plans -------------------------------------------------------------
    def plan(self, worker: str, buffer_id: str, nbytes: int) -> None:
        held = self._planned[worker]
        held[buffer_id] = held.get(buffer_id, 0) + 1
        self._sizes.setdefault(buffer_id, nbytes)
        self._holders.setdefault(buffer_id, set()).add(worker)
        if held[buffer_id] == 1 and buffer_id not in self._resident.get(worker, ()):
            self._count_extra(worker, buffer_id)

    def unplan(self, worker: str, buffer_id: str) -> None:
        held = self._planned.get(worker)
        if held is None or buffer_id not in held:
            return
        held[buffer_id] -= 1
        if held[buffer_id] > 0:
            return
        del held[buffer_id]
        counted = self._extra.get(worker, {}).pop(buffer_id, None)
        if counted is not None:
            self._extra_total[worker] -= counted
        if buffer_id not in self._resident.get(worker, ()):
            self._drop_holder(worker, buffer_id)

    def _count_extra(self, worker: str, buffer_id: str) -> None:
        nbytes = self._sizes.get(buffer_id, 0)
        self._extra[worker][buffer_id] = nbytes
        self._extra_total[worker] += nbytes

    def _resize_extra(self, buffer_id: str, nbytes: int) -> None:
        for worker in self._holders.get(buffer_id, ()):
            counted = self._extra.get(worker, {}).get(buffer_id)
            if counted is not None:
                self._extra[worker][buffer_id] = nbytes
                self._extra_total[worker] += nbytes - counted

    def _drop_holder(self, worker: str, buffer_id: str) -> None:
        workers = self._holders.get(buffer_id)
        if workers is not None:
            workers.discard(worker)
            if not workers:
                del self._holders[buffer_id]

    # -- queries -----------------------------------------------------------
    def holds(self, worker: str, buffer_id: str) -> bool:
        return worker in self._holders.get(buffer_id, ())

    def known(self, buffer_id: str) -> bool:
        """Whether any device has held or planned this buffer (cheap)."""
        return buffer_id in self._sizes

    def holders(self, buffer_id: str) -> set[str]:
        return set(self._holders.get(buffer_id, ()))

    def holders_view(self, buffer_id: str) -> frozenset[str] | set[str]:
        """The holders without a copy (do not modify)."""
        return self._holders.get(buffer_id, frozenset())

    def resident_on(self, worker: str) -> dict[str, int]:
        return dict(self._resident.get(worker, {}))

    def busy_bytes(self, worker: str) -> int:
        """Bytes resident on the worker that requests queued there will use:
        evicting any of them means a certain reload."""
        resident = self._resident.get(worker, {})
        planned = self._planned.get(worker, {})
        return sum(n for b, n in resident.items() if b in planned)

    def expected_bytes(self, worker: str) -> int:
        """Bytes the worker's cache will hold once planned loads happen (O(1))."""
        return self._resident_total.get(worker, 0) + self._extra_total.get(worker, 0)

    def snapshot(self) -> dict[str, dict[str, int]]:
        """worker -> {buffer id: bytes} of everything reported resident."""
        return {w: dict(held) for w, held in self._resident.items() if held}
