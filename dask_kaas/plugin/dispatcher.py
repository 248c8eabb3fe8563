"""Dispatcher: late binding of kernel graphs to workers.

A graph task is *held* from submission: a strict restriction to a reserved
address that no worker has, so Dask parks it in ``no-worker`` once its
inputs are in memory (work stealing and Dask's own placement leave it
alone).  The dispatcher queues it per tenant (``DispatchQueue``) and
*releases* it when some worker has fewer than ``slots x (1 + prefetch)``
KaaS graphs in flight: the next request in fair order, placed *now* with the
current cache directory and queue state, gets that worker as its restriction
and goes to ``processing``.  The prefetch keeps a worker from idling for a
scheduler round trip between two graphs.

Releases never happen inside a plugin hook: a nested ``transitions`` call
would send a ``compute-task`` ahead of the outer stimulus' messages.  Hooks
only note that a pass is due; one release pass runs from the event loop
(the pattern of Dask's ``stimulus_queue_slots_maybe_opened``), and a
periodic pass catches what no hook reports (a paused worker resuming).

When every open place is a prefetch place (its worker is busy), the next
request in fair order goes there only if no tenant ahead of it in fair order
is expected to send one before the worker frees (``DispatchQueue``'s
anticipation; ``kaas.anticipation``): a tenant whose clients wait for each
result has, for a moment after each, nothing queued, and would otherwise
lose its weight to tenants with more requests outstanding.  A worker with a
free slot is never kept waiting.

Release at submission: when nothing is held and a worker has a free slot,
a new graph needs no pass at all.  ``update_graph`` runs before Dask's first
transitions of the new task, so the dispatcher places it there and then
(the same choice, booking and fair-share charge as a release) and leaves
the restriction to that worker in place: Dask's own transitions of the
submission take it straight to ``processing`` there, with no detour through
``no-worker`` and no second stimulus.  If Dask cannot put it there after
all (an input not in memory yet, the worker gone), the booking is undone
and the graph is held like any other.

A released graph whose worker leaves (or that is cancelled, retried or
recomputed) goes back through ``released``/``waiting``, where its restriction
is reset to the hold address, so it returns to the queue.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .. import config
from ..graph.errors import KaasError
from .anticipation import PlaceTimer, anticipation_s
from .candidates import candidate_workers
from .dispatch import DispatchQueue
from .placement import PlacementContext, RequestCosts, WorkerView, worth_waiting
from .places import WorkerPlaces, prefetch_setting

if TYPE_CHECKING:
    from distributed import Scheduler
    from distributed.scheduler import TaskState, WorkerState

    from .scheduler import KaasSchedulerPlugin

logger = logging.getLogger(__name__)

#: The reserved worker address of held graphs: no worker ever has it.
HOLD = "kaas-hold://held"
#: A release pass stops after this many graphs Dask would not take.
MAX_FAILED_PER_PASS = 8
#: Bounds of ``kaas.dispatch-interval`` in seconds.
INTERVAL_RANGE = (0.001, 60.0)


def dispatch_interval_s() -> float:
    """``kaas.dispatch-interval`` in seconds (null: 200 ms)."""
    from ..limits import _config_seconds

    seconds = _config_seconds("dispatch-interval")
    if seconds is None:
        return 0.2
    lo, hi = INTERVAL_RANGE
    if not lo <= seconds <= hi:
        raise KaasError(f"kaas.dispatch-interval must be between {lo * 1000:g} ms and "
                        f"{hi:g} s, got {seconds!r} s")
    return seconds


class Dispatcher:
    def __init__(self, plugin: KaasSchedulerPlugin) -> None:
        self.plugin = plugin
        self.queue = DispatchQueue(anticipate_s=anticipation_s())
        self.interval_s = dispatch_interval_s()
        #: released key -> worker it went to (until it leaves processing)
        self.released: dict[Any, str] = {}
        #: Room on every worker, in-flight counts, expected waits.
        self.places = WorkerPlaces(plugin, prefetch_setting())
        self.keep_timer = PlaceTimer(lambda: getattr(self.plugin.scheduler, "loop", None),
                                     self.wake)
        self._seq = itertools.count()
        self._pass_due = False
        #: Release a new graph in ``update_graph`` when nothing is held and
        #: a worker has a free slot (``kaas.release-at-submit``).
        self.release_at_submit = bool(config.get("release-at-submit", True))
        #: keys released at submission, until Dask confirms ``processing``
        self.at_submit: set[Any] = set()
        self.releases = 0
        self.releases_at_submit = 0
        self.failed_releases = 0
        self.waits_for_holder = 0
        self.anticipation_waits = 0

    @property
    def scheduler(self) -> Scheduler:
        s = self.plugin.scheduler
        assert s is not None
        return s

    # -- hold ----------------------------------------------------------------
    def hold(self, ts: TaskState, tenant: str, priority: int) -> None:
        """Park a new graph task (called from ``update_graph``)."""
        _hold(ts)
        ts.priority = (-priority, 0, next(self._seq))
        if ts.state == "no-worker":  # already parked: no transition will say so
            self.queue.push(ts.key, tenant, priority, now=time.monotonic())
            self.wake()

    def admit(self, ts: TaskState, rec: Any, ctx: Callable[[], PlacementContext],
              now: float) -> None:
        """Place a new graph task now if nothing is held and a worker has a
        free slot (see "Release at submission" above), else hold it.  Called
        from ``update_graph``; ``ctx`` makes the placement context once per
        submission message."""
        request = rec.request
        if not (self.release_at_submit and ts.state == "released" and not self.queue
                and self.plugin.policy.pins and self._inputs_ready(ts)):
            self.hold(ts, request.tenant, request.priority)
            return
        if self.places.stale:
            self.places.rebuild()
        room = self.places.room
        view = self._choose(request, room, ctx(), now) if self.places.idle else None
        if view is None or view.address not in room:
            self.hold(ts, request.tenant, request.priority)
            return
        self.queue.returns.returned(request.tenant, now)
        self._book_release(ts, rec, view, ctx(), now)
        self.at_submit.add(ts.key)
        self.releases_at_submit += 1

    @staticmethod
    def _inputs_ready(ts: TaskState) -> bool:
        for dep in ts.dependencies:
            if dep.state != "memory":
                return False
        return True

    def _undo_at_submit(self, key: Any) -> None:
        """A graph released at submission did not reach ``processing``:
        its place, booking and charge go back (it is held from here on)."""
        self.at_submit.discard(key)
        worker = self.released.pop(key, None)
        if worker is not None:
            self.places.freed(worker)
        self.queue.finished(key, None)
        self.releases -= 1
        self.releases_at_submit -= 1
        rec = self.plugin.requests.get(key)
        if rec is not None:
            self.plugin._unbook(rec)
        ts = self.scheduler.tasks.get(key)
        if ts is not None:
            _hold(ts)
        self.wake()

    # -- hooks -----------------------------------------------------------------
    def transition(self, key: Any, start: str, finish: str, tenant: str | None,
                   priority: int, measured_s: Callable[[], float | None]) -> None:
        """Follow a graph task's state change (``tenant`` None: not a graph)."""
        if start == finish:
            return
        if self.at_submit and key in self.at_submit:
            if finish == "processing":
                self.at_submit.discard(key)
                return
            if finish == "waiting":
                return  # on its way to processing: keep its placement
            self._undo_at_submit(key)
        if start == "processing":
            worker = self.released.pop(key, None)
            if worker is not None:
                self.places.freed(worker)
                self.wake()
                ok = finish in ("memory", "erred")
                self.queue.finished(key, measured_s() if ok else None, now=time.monotonic())
        if start == "no-worker":
            self.queue.remove(key)
        if finish in ("released", "waiting"):
            ts = self.scheduler.tasks.get(key)
            if ts is not None:
                _hold(ts)
        elif finish == "no-worker" and tenant is not None:
            ts = self.scheduler.tasks.get(key)
            if ts is not None and ts.worker_restrictions == {HOLD}:
                self.queue.push(key, tenant, priority, now=time.monotonic())
                self.wake()
        elif finish == "forgotten":
            self.queue.remove(key)

    def worker_added(self, address: str) -> None:
        self.places.stale = True
        self.wake()

    def worker_removed(self, address: str) -> None:
        self.places.removed(address)
        for key in [k for k, w in self.released.items() if w == address]:
            # Dask released them before this hook; this is a safety net.
            del self.released[key]
            self.at_submit.discard(key)
            self.queue.finished(key, None)
        self.wake()

    # -- release pass ------------------------------------------------------------
    def wake(self) -> None:
        """A slot may have opened or work arrived: run one pass soon."""
        if self._pass_due or not self.queue:
            return
        s = self.plugin.scheduler
        if s is None:
            return
        self._pass_due = True
        s.loop.add_callback(self.release_pass)

    def limit(self, ws: WorkerState) -> int:
        """Graphs ``ws`` may have in flight (see WorkerPlaces.limit)."""
        return self.places.limit(ws)

    @property
    def prefetch(self) -> int:
        return self.places.prefetch

    def release_pass(self, stimulus_id: str | None = None) -> int:
        """Release queued graphs while workers have room; returns how many."""
        self._pass_due = False
        if not self.queue:
            return 0
        self.keep_held_alive()
        if self.places.stale:
            self.places.rebuild()
        room = self.places.room
        if not room:
            return 0
        stimulus_id = stimulus_id or f"kaas-release-{time.time()}"
        now = time.monotonic()
        ctx = self.plugin._context(now)
        excluded: set[str] = set()
        failed: list[tuple[Any, str, int]] = []
        try:
            released = self._release_loop(room, excluded, failed, ctx, now, stimulus_id)
        finally:
            for key, tenant, priority in failed:
                self.queue.push(key, tenant, priority)
        return released

    def _release_loop(self, room: dict[str, int], excluded: set[str],
                      failed: list[tuple[Any, str, int]], ctx: PlacementContext, now: float,
                      stimulus_id: str) -> int:
        s = self.scheduler
        plugin = self.plugin
        released = 0
        while room:
            nxt = self.queue.peek(excluded)
            if nxt is None:
                break
            key, tenant = nxt
            ts = s.tasks.get(key)
            rec = plugin.requests.get(key)
            if ts is None or rec is None or ts.state != "no-worker":
                self.queue.remove(key)
                continue
            if not self.places.idle and self._keep_places(tenant, room, now):
                break
            view = self._choose(rec.request, room, ctx, now)
            if view is not None and view.address not in room:
                # Waiting for a busy worker that holds its buffers is
                # cheaper: this tenant sits out this pass.
                self.waits_for_holder += 1
                excluded.add(tenant)
                continue
            self.queue.remove(key)
            worker = self._release(ts, rec, view, ctx, now, stimulus_id, room)
            if worker is None:
                # Dask would not take it there (a restriction no worker
                # meets, a worker on its way out): it waits for the next
                # pass, set aside so that it cannot block the ones behind it.
                self.failed_releases += 1
                failed.append((key, tenant, rec.request.priority))
                if len(failed) >= MAX_FAILED_PER_PASS:
                    break
                continue
            released += 1
        return released

    def _keep_places(self, tenant: str, room: dict[str, int], now: float) -> bool:
        """Whether the open places, all on busy workers, are kept for
        tenants ahead of ``tenant`` whose next request is expected before a
        worker frees (then a pass is due when the wait ends)."""
        if not self.queue.returns:  # off, or nobody's request is expected
            return False
        first = self.places.index.least(1)
        view = self._view(first[0], now) if first else None
        busy_until = now + view.wait_s if view is not None else None
        reserved, until = self.queue.anticipation(tenant, now, busy_until)
        if not reserved:
            return False
        spare = 0
        for free in room.values():
            spare += free
            if spare > reserved:
                return False
        self.anticipation_waits += 1
        self.keep_timer.at(until if until is not None else now, now)
        return True

    def close(self) -> None:
        self.keep_timer.cancel()

    def _view(self, addr: str, now: float) -> WorkerView | None:
        s = self.scheduler
        ws = s.workers.get(addr)
        if ws is None:
            return None
        plugin = self.plugin
        slots = int(ws.resources.get(plugin.resource, 0) or 0)
        st = plugin.worker_stats.get(addr, {})
        queued = self.places.in_flight.get(addr, 0)
        wait = self.places.busy_for(addr, max(slots, 1), now) if queued else 0.0
        used = max(st.get("used_bytes", 0), plugin.directory.expected_bytes(addr))
        return WorkerView(addr, max(slots, 1), st.get("capacity_bytes"), used, wait, queued)

    def _choose(self, request: Any, room: dict[str, int], ctx: PlacementContext,
                now: float) -> WorkerView | None:
        """The worker for ``request`` now (None: let Dask choose), possibly
        a busy one (the caller then holds the request back)."""
        policy = self.plugin.policy
        if not policy.pins:
            return None
        if policy.name == "affinity":
            addrs = candidate_workers(request, self.plugin.directory, self.places.index,
                                      ctx.who_has)
            # Busy holders of its buffers compete too, with their wait.
            for i in request.inputs:
                if i.buffer_id is not None:
                    for w in self.plugin.directory.holders_view(i.buffer_id):
                        if w not in room and w not in addrs and len(addrs) < 24:
                            addrs.append(w)
        elif policy.name == "static":
            addrs = [ws.address for ws in self.scheduler.running if self.limit(ws) > 0]
        else:
            addrs = list(room)
        views = [v for v in (self._view(a, now) for a in addrs) if v is not None]
        if not views:
            return None
        best = policy.choose(request, views, ctx)
        if best.address in room or policy.name != "affinity":
            return best
        open_views = [v for v in views if v.address in room]
        if not open_views:
            return best
        terms = dict(policy.last_terms)
        alt = policy.choose(request, open_views, ctx)
        if worth_waiting(RequestCosts(request, ctx), best, alt):
            policy.last_terms = terms
            return best
        return alt

    def _release(self, ts: TaskState, rec: Any, view: WorkerView | None,
                 ctx: PlacementContext, now: float, stimulus_id: str,
                 room: dict[str, int]) -> str | None:
        """Send one held graph to ``view`` (None: wherever Dask puts it among
        the workers with ``room``, so the in-flight bound holds for Dask's
        own placement too); returns the worker, or None with the task held
        again."""
        s = self.scheduler
        plugin = self.plugin
        request = rec.request
        if view is not None:
            plugin._assign(ts, rec, view, ctx, now)
        else:
            ts.worker_restrictions = set(room)
        ts.priority = (-request.priority, 0, next(self._seq))
        s.transitions({ts.key: "processing"}, stimulus_id)
        if ts.state != "processing" or ts.processing_on is None:
            plugin._unbook(rec)
            _hold(ts)
            return None
        worker = ts.processing_on.address
        if view is None:
            actual = self._view(worker, now)
            if actual is not None:
                plugin._assign(ts, rec, actual, ctx, now)
            ts.worker_restrictions = None  # Dask's choice, not a pin
        self._note_release(ts, rec, worker, now, pinned=view is not None)
        return worker

    def _book_release(self, ts: TaskState, rec: Any, view: WorkerView,
                      ctx: PlacementContext, now: float) -> None:
        """Pin ``ts`` to ``view`` before Dask's first transitions of it
        (release at submission): Dask then sends it there itself."""
        self.plugin._assign(ts, rec, view, ctx, now)
        ts.priority = (-rec.request.priority, 0, next(self._seq))
        self._note_release(ts, rec, view.address, now, pinned=True)

    def _note_release(self, ts: TaskState, rec: Any, worker: str, now: float,
                      pinned: bool) -> None:
        """What every release books: the place, the fair-share charge, the
        decision, the kept outputs' worker."""
        plugin = self.plugin
        request = rec.request
        self.released[ts.key] = worker
        self.places.took(worker, now)
        self.queue.started(ts.key, request.tenant, rec.estimate_s)
        self.releases += 1
        plugin.decisions.append({
            "key": ts.key, "tenant": request.tenant, "graph": request.graph,
            "worker": worker, "policy": plugin.policy.name,
            "terms": dict(plugin.policy.last_terms) if pinned else {}})
        # Kept outputs live on the device of the worker that ran the graph.
        tasks = self.scheduler.tasks
        for sel in request.keep.values():
            sts = tasks.get(sel)
            if sts is not None and sts.state in ("released", "waiting"):
                sts.worker_restrictions = {worker}
                sts.loose_restrictions = False

    # -- upkeep ------------------------------------------------------------------
    def periodic(self) -> None:
        """Catch what no hook reports, and keep Dask's no-workers-timeout
        from failing held graphs while KaaS workers are there to run them."""
        if self.plugin.scheduler is None:
            return
        self.keep_held_alive()
        self.places.stale = True  # paused, resumed, overdue: no hook says so
        if self.queue:
            self.release_pass("kaas-release-periodic")

    def keep_held_alive(self) -> None:
        """Dask fails a task that stays in ``no-worker`` past
        ``distributed.scheduler.no-workers-timeout``; a held graph is there
        on purpose, so while a KaaS worker is running its time there starts
        over (oldest first: ``unrunnable`` is ordered by that time).  With no
        KaaS worker at all, Dask's timeout applies as usual."""
        s = self.scheduler
        timeout = s.no_workers_timeout
        if not timeout or not self.queue or not any(self.limit(ws) for ws in s.running):
            return
        now = time.monotonic()
        cut = now - timeout / 4
        refresh = []
        for ts, since in s.unrunnable.items():
            if since >= cut:
                break
            if ts.key in self.queue:
                refresh.append(ts)
        for ts in refresh:
            del s.unrunnable[ts]
            s.unrunnable[ts] = now

    def snapshot(self) -> dict[str, Any]:
        state = self.queue.snapshot()
        state.update({"in_flight": dict(self.places.in_flight), "room": dict(self.places.room),
                      "prefetch": self.prefetch,
                      "releases": self.releases, "failed_releases": self.failed_releases,
                      "releases_at_submit": self.releases_at_submit,
                      "waits_for_holder": self.waits_for_holder,
                      "anticipation_waits": self.anticipation_waits,
                      "anticipation_s": self.queue.anticipate_s})
        return state


def _hold(ts: TaskState) -> None:
    ts.worker_restrictions = {HOLD}
    ts.loose_restrictions = False
