"""KaasSchedulerPlugin: placement, fair share and the buffer directory.

It follows the pattern of distributed's own extensions: scheduler handlers
(``kaas_*``) that a thin client wrapper calls, plus a stream handler for the
workers' cache reports.  Its ``update_graph`` hook runs after annotations are
applied and before the first transitions, which is where a graph task is
*held* (see ``dispatcher``): it waits in the scheduler, in fair order, and
goes to a worker only when one has a free slot.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from dask.utils import parse_timedelta
from distributed.diagnostics.plugin import SchedulerPlugin
from distributed.protocol.pickle import dumps
from tornado.ioloop import PeriodicCallback

from .. import config, dashboard
from ..graph.errors import KaasError
from ..request import ANNOTATION, SELECT_ROLE
from . import access, amm
from .directory import BufferDirectory
from .dispatcher import Dispatcher
from .handlers import HandlersMixin
from .placement import (
    CostModel,
    PlacementContext,
    WorkerView,
    make_policy,
)
from .push import SentResults, forward_result
from .requests import RequestBook, RequestRecord
from .restart import RestartGuard
from .stats import TenantStats
from .worker import PLUGIN_NAME, UPDATE_OP, KaasWorkerPlugin

if TYPE_CHECKING:
    from distributed import Scheduler
    from distributed.scheduler import TaskState

logger = logging.getLogger(__name__)

#: Graph runs kept for the dashboard's timeline.
TIMELINE = 5000
#: Default of ``kaas.worker-stream-interval`` (see _tune_stream).
STREAM_INTERVAL = "1ms"


class KaasSchedulerPlugin(HandlersMixin, SchedulerPlugin):
    name = PLUGIN_NAME
    idempotent = True

    def __init__(self, policy: str | None = None,
                 worker_plugin: KaasWorkerPlugin | None = None) -> None:
        self.policy_name = policy or config.get("policy", "affinity")
        self.policy = make_policy(self.policy_name)
        self.worker_plugin = worker_plugin or KaasWorkerPlugin()
        self.resource = config.get("resource", "GPU")
        self.scheduler: Scheduler | None = None
        self.restarts: RestartGuard | None = None
        self._periodic: PeriodicCallback | None = None
        self._expiry: PeriodicCallback | None = None
        self._init_state()

    def _init_state(self) -> None:
        self.directory = BufferDirectory()
        self.costs = CostModel()
        self.dispatch = Dispatcher(self)
        self.book = RequestBook(self.directory, self.costs, self.dispatch.queue)
        # The book's tables, under the names placement reads them by.
        self.requests = self.book.requests
        self.selects = self.book.selects
        self.queues = self.book.queues  # worker -> request key -> estimate
        self.worker_stats: dict[str, dict[str, Any]] = {}
        #: worker -> (end of its last graph, on its clock; was another waiting)
        self.last_completion: dict[str, tuple[float, bool]] = {}
        #: worker -> when the work placed on it is expected to be done
        self.free_at = self.book.free_at
        self.tenants = self.book.tenants
        self.timeline: deque[dict[str, Any]] = deque(maxlen=TIMELINE)
        #: Recent placement decisions with every candidate's expected
        #: completion time, for "why did it go there?".
        self.decisions: deque[dict[str, Any]] = deque(maxlen=1000)
        #: results forwarded to their clients with the report (plugin/push.py)
        self.pushed = 0
        self.sent_results = SentResults()

    def __getstate__(self) -> dict[str, Any]:
        # Sent to the scheduler when registered from a client: settings only.
        return {"policy_name": self.policy_name, "worker_plugin": self.worker_plugin}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["policy_name"], state["worker_plugin"])  # type: ignore[misc]

    # -- lifecycle -------------------------------------------------------
    async def start(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self.restarts = RestartGuard(scheduler)
        scheduler.handlers.update(self._handlers())
        scheduler.stream_handlers[UPDATE_OP] = self.handle_worker_update
        scheduler.extensions["kaas"] = self
        for worker in list(scheduler.stream_comms):
            self._tune_stream(worker)
        amm.install(scheduler, self.directory)
        dashboard.install(scheduler, self)
        await scheduler.register_worker_plugin(
            None, dumps(self.worker_plugin), name=PLUGIN_NAME, idempotent=True)
        self._periodic = PeriodicCallback(self._tick, self.dispatch.interval_s * 1000)
        self._periodic.start()
        interval = parse_timedelta(config.get("expiry-interval", "10s"))
        self._expiry = PeriodicCallback(self.expire, interval * 1000)
        self._expiry.start()

    def _tick(self) -> None:
        self.dispatch.periodic()
        self.sent_results.tick()

    async def close(self) -> None:
        dashboard.uninstall(self)
        if self.restarts is not None:
            self.restarts.close()
        for periodic in (self._periodic, self._expiry):
            if periodic is not None:
                periodic.stop()
        self._periodic = self._expiry = None
        self.dispatch.close()
        if self.scheduler is not None:
            amm.uninstall(self.scheduler)
            for h in self._handlers():
                self.scheduler.handlers.pop(h, None)
            self.scheduler.stream_handlers.pop(UPDATE_OP, None)
            self.scheduler.extensions.pop("kaas", None)

    # -- candidates ------------------------------------------------------
    def _candidates(self, now: float) -> list[WorkerView]:
        s = self.scheduler
        assert s is not None
        views = []
        for ws in s.running:
            st = self.worker_stats.get(ws.address, {})
            # Slots held by kernels past their time limit take no new work;
            # a broken device takes none at all (it is being restarted).
            slots = int(ws.resources.get(self.resource, 0) or 0) - len(st.get("overdue") or ())
            if slots <= 0 or st.get("broken"):
                continue
            queue = self.queues.get(ws.address, {})
            wait = max(0.0, self.free_at.get(ws.address, now) - now) if queue else 0.0
            used = max(st.get("used_bytes", 0), self.directory.expected_bytes(ws.address))
            views.append(WorkerView(ws.address, slots, st.get("capacity_bytes"), used, wait,
                                    len(queue)))
        return views

    def _context(self, now: float) -> PlacementContext:
        """Placement inputs as of ``now`` (one clock for a whole decision)."""
        s = self.scheduler
        assert s is not None

        def who_has(key: str) -> set[str]:
            ts = s.tasks.get(key)
            if ts is not None and ts.who_has:
                return {ws.address for ws in ts.who_has}
            # An output of a graph still to run will be where that graph runs.
            rec = self.requests.get(self.selects.get(key, key))
            return {rec.worker} if rec is not None and rec.worker else set()

        def pending_s(key: str) -> float | None:
            rec = self.requests.get(self.selects.get(key, key))
            if rec is None or rec.done or rec.worker is None:
                return None
            return max(0.0, rec.expected_finish - now)

        return PlacementContext(self.directory, self.costs, who_has,
                                network_bytes_per_s=float(s.bandwidth), pending_s=pending_s)

    # -- new graphs ------------------------------------------------------
    def update_graph(self, scheduler: Scheduler, *, keys: Any = None, tasks: Any = None,
                     annotations: dict[str, dict[Any, Any]] | None = None,
                     stimulus_id: str | None = None, **kwargs: Any) -> None:
        metas = (annotations or {}).get(ANNOTATION)
        if not metas:
            return
        selects = []
        now = time.monotonic()
        made: list[PlacementContext] = []

        def ctx() -> PlacementContext:
            if not made:
                made.append(self._context(now))
            return made[0]

        for key, meta in metas.items():
            ts = scheduler.tasks.get(key)
            if ts is not None and ts.annotations:
                # Read here, kept in self.requests: carried on, it would go
                # with every compute-task message, where a request object is
                # not msgpack data and makes Dask pickle the whole batch.
                ts.annotations.pop(ANNOTATION, None)
            if meta is None:
                continue
            if ts is None or ts.state not in ("released", "waiting", "no-worker"):
                continue
            try:
                request = access.admit(scheduler, kwargs.get("client"), meta)
            except KaasError as e:
                access.refuse(ts, e)
                continue
            if request.role == SELECT_ROLE:
                selects.append((ts, request))
                continue
            if key in self.requests:
                continue
            rec = self.book.admit(key, request, now)
            if request.push:
                rec.push_to = kwargs.get("client")
            if request.weight is not None:
                try:
                    self.dispatch.queue.set_weight(request.tenant, request.weight)
                except KaasError as e:
                    logger.warning("graph %r: %s; weight ignored", request.graph, e)
            if not ts.resource_restrictions:
                ts.resource_restrictions = {self.resource: 1}
            self.dispatch.admit(ts, rec, ctx, now)
        for ts, request in selects:
            self._pin_select(ts, request.key)

    def _assign(self, ts: TaskState, rec: RequestRecord, view: WorkerView,
                ctx: PlacementContext, now: float) -> None:
        """Pin a graph task to a worker and book its expected work there."""
        worker = view.address
        rec.estimate_s = self.costs.slot_time_s(rec.request.graph, worker)
        start_in = max(view.wait_s, ctx.ready_in_s(rec.request))
        rec.expected_finish = now + start_in + rec.estimate_s
        # With several slots, a busy worker frees one every estimate/slots.
        booked = now + start_in + rec.estimate_s / max(view.slots, 1)
        self.book.book(ts.key, rec, worker, booked)
        ts.worker_restrictions = {worker}
        ts.loose_restrictions = False
        for i in rec.request.inputs:
            if i.buffer_id is not None:
                self.directory.plan(worker, i.buffer_id, i.nbytes)
                rec.planned.append(i.buffer_id)
        for ref_id in rec.request.keep.values():
            self.directory.plan(worker, ref_id, 0)
            rec.planned.append(ref_id)
        # Keep the views current within one burst of submissions.
        view.wait_s = booked - now
        view.queued_n += 1
        view.used_bytes = max(view.used_bytes, self.directory.expected_bytes(worker))

    def _unbook(self, rec: RequestRecord) -> None:
        self.book.unbook(rec)

    def _pin_select(self, ts: TaskState, graph_key: str) -> None:
        self.selects[ts.key] = graph_key
        rec = self.requests.get(graph_key)
        if rec is not None and rec.worker is not None:
            ts.worker_restrictions = {rec.worker}
            ts.loose_restrictions = False

    # -- progress --------------------------------------------------------
    def transition(self, key: Any, start: str, finish: str, *args: Any,
                   stimulus_id: str | None = None, **kwargs: Any) -> None:
        for ss in kwargs.get("startstops") or ():
            if ss.get("action") == "transfer":
                self._observe_transfer(key, ss)
        rec = self.requests.get(key)
        self.book.transition(key, start, finish)
        if rec is not None:
            request = rec.request
            self.dispatch.transition(key, start, finish, request.tenant, request.priority,
                                     lambda: (rec.report or {}).get("total_s"))

    def _observe_transfer(self, key: Any, ss: dict[str, Any]) -> None:
        s = self.scheduler
        ts = s.tasks.get(key) if s is not None else None
        nbytes = sum(max(d.nbytes, 0) for d in ts.dependencies) if ts is not None else 0
        self.costs.observe_transfer(ss["stop"] - ss["start"], nbytes, float(s.bandwidth))

    def _observe_dispatch(self, worker: str, report: dict[str, Any]) -> None:
        """The gap between one graph's end and the next one's start on a
        worker that had the next one waiting already is Dask's own
        per-request dispatch time (both ends are the worker's clock)."""
        start = report.get("started_at")
        if start is None:
            return
        last_end, backlogged = self.last_completion.get(worker, (None, False))
        slots = int(self.worker_stats.get(worker, {}).get("slots", 1) or 1)
        if backlogged and last_end is not None and slots == 1 and 0 <= start - last_end < 1.0:
            self.costs.dispatch.add(start - last_end)
        # This report precedes its own task-finished message: the request is
        # still in the queue, so more than one entry means one is waiting.
        waiting = len(self.queues.get(worker, {})) > 1
        self.last_completion[worker] = (start + report.get("total_s", 0.0), waiting)

    def tenant(self, name: str) -> TenantStats:
        return self.book.tenant(access.safe_tenant(name))

    def expire(self, now: float | None = None) -> dict[str, int]:
        """Drop what idle tenants and unused graphs left behind (runs every
        ``kaas.expiry-interval``; ``now`` is monotonic time, for tests)."""
        return self.book.expire(
            time.monotonic() if now is None else now,
            parse_timedelta(config.get("tenant-idle-expiry", "10 minutes")),
            parse_timedelta(config.get("graph-cost-expiry", "1 hour")))

    # -- workers -----------------------------------------------------------
    def handle_worker_update(self, worker: str, events: list,
                             reports: list[dict[str, Any]] | None = None,
                             stats: dict[str, Any] | None = None,
                             resident: dict[str, int] | None = None, **kwargs: Any) -> None:
        s = self.scheduler
        if s is None or worker not in s.workers:
            return
        if stats is not None:
            self.worker_stats[worker] = stats
            if self.restarts is not None:
                self.restarts.observe(worker, stats)
        if resident is not None:
            self.directory.reset_worker(worker, resident)
        for op, bid, nbytes in events:
            if op == "add":
                self.directory.added(worker, bid, nbytes)
            else:
                self.directory.removed(worker, bid)
        for report in reports or ():
            result = report.pop("result", None)
            rec = self.requests.get(report.get("key"))
            if result is not None and rec is not None and rec.push_to is not None:
                self.pushed += forward_result(s, worker, report.get("key"), result,
                                              rec.push_to, self.sent_results)
            self.costs.observe(report, worker)
            self._observe_dispatch(worker, report)
            if rec is not None:
                rec.report = report
            # The tenant the scheduler admitted, not the one the report carries.
            t = self.tenant(rec.request.tenant if rec is not None else report.get("tenant"))
            t.bytes_to_device += int(report.get("bytes_to_device", 0))
            t.hits += int(report.get("hits", 0))
            t.misses += int(report.get("misses", 0))
            if "started_at" in report:
                self.timeline.append({
                    "worker": worker, "tenant": report.get("tenant"),
                    "graph": report.get("graph"), "start": report["started_at"],
                    "end": report["started_at"] + report.get("total_s", 0.0),
                    "error": bool(report.get("error"))})

    def add_worker(self, scheduler: Scheduler, worker: str) -> None:
        self._tune_stream(worker)
        self.dispatch.worker_added(worker)

    def _tune_stream(self, worker: str) -> None:
        """Shorten the batching interval of the scheduler's stream to
        ``worker`` (Dask's is 5 ms) to ``kaas.worker-stream-interval``.

        A stream that sent anything in the last interval holds the next
        message until it is over: a ``free-keys`` for the previous result
        (its client let it go just before submitting the next request) held
        the next ``compute-task`` for up to 5 ms, the largest stage of a
        request's life after the client's own (see the latency profile)."""
        s = self.scheduler
        comm = s.stream_comms.get(worker) if s is not None else None
        interval = parse_timedelta(config.get("worker-stream-interval", STREAM_INTERVAL))
        if comm is not None and interval is not None and getattr(comm, "interval", 0) > interval:
            comm.interval = interval

    def remove_worker(self, scheduler: Scheduler, worker: str, *,
                      stimulus_id: str | None = None, **kwargs: Any) -> None:
        self.directory.forget_worker(worker)
        self.worker_stats.pop(worker, None)
        if self.restarts is not None:
            self.restarts.forget(worker)
        self.last_completion.pop(worker, None)
        self.book.forget_worker(worker)
        self.costs.forget_worker(worker)
        self.dispatch.worker_removed(worker)
