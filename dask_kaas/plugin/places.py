"""WorkerPlaces: which workers can take a graph now, and how soon the busy
ones can.

A worker takes ``slots x (1 + prefetch)`` graphs in flight: its slots run
graphs, its prefetch places hold the next ones so it never idles for a
scheduler round trip.  The dispatcher releases into these places; this
keeps their count exact for the workers a release or a finished graph
touches (O(1) each), rebuilding over all workers only when told the counts
may be stale (the periodic pass, a worker joining), and it estimates a busy
worker's wait from what the scheduler can observe.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from .. import config
from ..graph.errors import KaasError
from .candidates import LoadIndex

if TYPE_CHECKING:
    from distributed.scheduler import WorkerState

    from .scheduler import KaasSchedulerPlugin


#: Largest ``kaas.prefetch`` (graphs per slot beyond the running ones).
MAX_PREFETCH = 64
def prefetch_setting() -> int:
    """``kaas.prefetch``: an integer from 0 to MAX_PREFETCH."""
    value = config.get("prefetch", 1)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_PREFETCH:
        raise KaasError(f"kaas.prefetch must be an integer from 0 to {MAX_PREFETCH}, "
                        f"got {value!r}")
    return value


class WorkerPlaces:
    def __init__(self, plugin: KaasSchedulerPlugin, prefetch: int) -> None:
        self.plugin = plugin
        self.prefetch = prefetch
        #: Workers with room, by expected free time (the candidate set).
        self.index = LoadIndex()
        #: worker -> graphs in flight there
        self.in_flight: dict[str, int] = {}
        #: worker -> when its latest graph started, as far as the scheduler
        #: can tell (a graph starts when the one before it ends)
        self.started_at: dict[str, float] = {}
        #: running worker -> graphs it may still take
        self.room: dict[str, int] = {}
        #: The workers in ``room`` with a slot free (the rest are running
        #: all they can and have only prefetch places open).
        self.idle: set[str] = set()
        self.stale = True

    @property
    def _scheduler(self) -> Any:
        return self.plugin.scheduler

    # -- limits ----------------------------------------------------------------
    def limit(self, ws: WorkerState) -> int:
        """Graphs ``ws`` may have in flight.  Slots held by kernels past their
        time limit take no new work; a broken device takes none at all (it
        is being restarted)."""
        st = self.plugin.worker_stats.get(ws.address, {})
        if st.get("broken"):
            return 0
        slots = int(ws.resources.get(self.plugin.resource, 0) or 0) - len(st.get("overdue") or ())
        return max(slots, 0) * (1 + self.prefetch)

    def open_workers(self) -> dict[str, int]:
        """Running KaaS workers with room, and how much (O(workers))."""
        room = {}
        for ws in self._scheduler.running:
            free = self.limit(ws) - self.in_flight.get(ws.address, 0)
            if free > 0:
                room[ws.address] = free
        return room

    # -- changes -----------------------------------------------------------------
    def took(self, worker: str, now: float) -> None:
        """A graph was released to ``worker``."""
        if not self.in_flight.get(worker):
            self.started_at[worker] = now
        self.in_flight[worker] = self.in_flight.get(worker, 0) + 1
        self.touch(worker)

    def freed(self, worker: str) -> None:
        """A graph released to ``worker`` left it (done, failed, cancelled)."""
        n = self.in_flight.get(worker, 0) - 1
        if n > 0:
            self.in_flight[worker] = n
            self.started_at[worker] = time.monotonic()
        else:
            self.in_flight.pop(worker, None)
            self.started_at.pop(worker, None)
        self.touch(worker)

    def removed(self, worker: str) -> None:
        for table in (self.in_flight, self.started_at, self.room):
            table.pop(worker, None)
        self.idle.discard(worker)
        self.index.discard(worker)

    def touch(self, worker: str) -> None:
        """Bring ``worker``'s room and its place in the load index up to date."""
        s = self._scheduler
        ws = s.workers.get(worker)
        free = 0
        if ws is not None and ws in s.running:
            free = self.limit(ws) - self.in_flight.get(worker, 0)
        if free > 0:
            self.room[worker] = free
            self.index.update(worker, self.plugin.free_at.get(worker, 0.0))
            self._note_idle(worker, free)
        else:
            self.room.pop(worker, None)
            self.idle.discard(worker)
            self.index.discard(worker)

    def rebuild(self) -> None:
        """Recount every worker's room (O(workers))."""
        self.room = self.open_workers()
        self.idle = set()
        for addr, free in self.room.items():
            self._note_idle(addr, free)
        for addr in self.index.members():
            if addr not in self.room:
                self.index.discard(addr)
        for addr in self.room:
            self.index.update(addr, self.plugin.free_at.get(addr, 0.0))
        self.stale = False

    def _note_idle(self, worker: str, free: int) -> None:
        """``worker`` has a free slot, not just prefetch places, when more
        than its prefetch places are open."""
        ws = self._scheduler.workers.get(worker)
        prefetch_places = 0 if ws is None else self.limit(ws) // (1 + self.prefetch) * self.prefetch
        if free > prefetch_places:
            self.idle.add(worker)
        else:
            self.idle.discard(worker)

    # -- waits -------------------------------------------------------------------
    def busy_for(self, addr: str, slots: int, now: float) -> float:
        """Seconds until ``addr`` can start one more graph.  With a slot free,
        none.  Otherwise the rest of its running graph (the scheduler knows
        when it started: when the one before it ended) and the graphs behind
        it, a slot at a time.  Not the bookings made at release: they keep
        the estimate of every graph ahead, so they run late or early with
        every graph that does, and a worker that looked free by them while
        it had graphs waiting drew requests to wait for it."""
        queued = self.in_flight.get(addr, 0)
        if queued < slots:
            return 0.0
        started = self.started_at.get(addr)
        booked = self.plugin.book.queues.get(addr)
        if started is None or not booked:
            return max(0.0, self.plugin.free_at.get(addr, now) - now)
        mean = sum(booked.values()) / len(booked)
        return max(0.0, started + mean - now) + (queued - slots) * mean / slots
