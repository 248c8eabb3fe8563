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
    def __init__(self) -> None:
        self._resident: dict[str, dict[str, int]] = defaultdict(dict)  # worker -> id -> bytes
        self._planned: dict[str, dict[str, int]] = defaultdict(dict)  # worker -> id -> count
        self._sizes: dict[str, int] = {}

    # -- worker reports --------------------------------------------------
    def added(self, worker: str, buffer_id: str, nbytes: int) -> None:
        self._resident[worker][buffer_id] = nbytes
        self._sizes[buffer_id] = nbytes

    def removed(self, worker: str, buffer_id: str) -> None:
        self._resident[worker].pop(buffer_id, None)

    def reset_worker(self, worker: str, resident: dict[str, int]) -> None:
        self._resident[worker] = dict(resident)
        self._sizes.update(resident)

    def forget_worker(self, worker: str) -> None:
        self._resident.pop(worker, None)
        self._planned.pop(worker, None)

    def forget_buffer(self, buffer_id: str) -> None:
        for table in (self._resident, self._planned):
            for held in table.values():
                held.pop(buffer_id, None)
        self._sizes.pop(buffer_id, None)

    # -- plans -------------------------------------------------------------
    def plan(self, worker: str, buffer_id: str, nbytes: int) -> None:
        held = self._planned[worker]
        held[buffer_id] = held.get(buffer_id, 0) + 1
        self._sizes.setdefault(buffer_id, nbytes)

    def unplan(self, worker: str, buffer_id: str) -> None:
        held = self._planned.get(worker)
        if held is None or buffer_id not in held:
            return
        held[buffer_id] -= 1
        if held[buffer_id] <= 0:
            del held[buffer_id]

    # -- queries -----------------------------------------------------------
    def holds(self, worker: str, buffer_id: str) -> bool:
        return (buffer_id in self._resident.get(worker, ())
                or buffer_id in self._planned.get(worker, ()))

    def known(self, buffer_id: str) -> bool:
        """Whether any device has held or planned this buffer (cheap)."""
        return buffer_id in self._sizes

    def holders(self, buffer_id: str) -> set[str]:
        return ({w for w, held in self._resident.items() if buffer_id in held}
                | {w for w, held in self._planned.items() if buffer_id in held})

    def resident_on(self, worker: str) -> dict[str, int]:
        return dict(self._resident.get(worker, {}))

    def busy_bytes(self, worker: str) -> int:
        """Bytes resident on the worker that requests queued there will use:
        evicting any of them means a certain reload."""
        resident = self._resident.get(worker, {})
        planned = self._planned.get(worker, {})
        return sum(n for b, n in resident.items() if b in planned)

    def expected_bytes(self, worker: str) -> int:
        """Bytes the worker's cache will hold once planned loads happen."""
        resident = self._resident.get(worker, {})
        planned = sum(self._sizes.get(b, 0) for b in self._planned.get(worker, {})
                      if b not in resident)
        return sum(resident.values()) + planned

    def snapshot(self) -> dict[str, dict[str, int]]:
        """worker -> {buffer id: bytes} of everything reported resident."""
        return {w: dict(held) for w, held in self._resident.items() if held}
