"""KaasWorkerPlugin: gives a Dask worker its device, cache and kernel cache.

One plugin per worker owns one WorkerRuntime.  Graph tasks find it through
``get_worker()`` and run there; what the cache loads and drops goes to the
scheduler plugin over the worker's batched stream (the same stream, and so
the same order, as the worker's own task-finished messages), so the buffer
directory is up to date by the time a client sees a result.

A finished graph's report goes out with its task's own task-finished (or
task-erred) message (``kaas.report-with-result``): the task's thread leaves
it here, and this plugin's ``transition`` hook, which Dask calls on the
event loop just before it sends the task's message, puts it on the batched
stream first, so both leave in one write.  Sent on its own a tick earlier,
it opened the stream's batching interval (2 ms) and Dask's message waited
it out.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any

from distributed import Reschedule
from distributed.diagnostics.plugin import WorkerPlugin
from tornado.ioloop import PeriodicCallback

from .. import config
from ..device.backend import make_backend
from ..device.runtime import WorkerRuntime
from ..graph.errors import KaasError, NoKaasWorkersError
from ..request import GraphRequest
from .health import Health
from .identity import value_keys
from .push import SentResults
from .quiet_close import quiet_heartbeat_at_close

if TYPE_CHECKING:
    from distributed import Worker

logger = logging.getLogger(__name__)

PLUGIN_NAME = "dask-kaas"
UPDATE_OP = "kaas-worker-update"
#: How long past the grace period a request on a broken device waits for the
#: restart that moves it elsewhere.
RESTART_WAIT_S = 30.0
#: Worker task states a task leaves once its function has returned: a report
#: held for the task goes out on the transition out of one of them.
_RAN = frozenset({"executing", "long-running", "cancelled", "resumed"})


class RescheduledError(KaasError, Reschedule):
    """Hands a request back to the scheduler to be placed elsewhere.  A
    KaasError too, so that the task function passes it on as it is (it turns
    any other exception into a KernelExecutionError); Dask reschedules any
    ``Reschedule``."""


class KaasWorkerPlugin(WorkerPlugin):
    """Settings left as None come from the ``kaas.*`` Dask config on the worker."""

    name = PLUGIN_NAME
    idempotent = True

    def __init__(self, backend: str | None = None, device_memory_limit: Any = None,
                 rmm_pool_size: Any = None) -> None:
        self.backend = backend
        self.device_memory_limit = device_memory_limit
        self.rmm_pool_size = rmm_pool_size
        self.runtime: WorkerRuntime | None = None
        self.worker: Worker | None = None
        self._pending_reports: list[dict] = []
        #: Dask key -> report of a graph whose task's function has returned
        #: and whose task-finished message Dask has not sent yet.
        self._held: dict[Any, dict[str, Any]] = {}
        self._held_seen: set[Any] = set()
        self._held_lock = threading.Lock()
        #: ``kaas.report-with-result``: reports go with Dask's own message.
        self.report_with_result = True
        self._hello_sent = False
        self._last_stats: dict[str, Any] | None = None
        self._queued: dict[Any, tuple[str, ...]] = {}
        self._queued_lock = threading.Lock()
        self._callback: PeriodicCallback | None = None
        self.health = Health()
        self._closing = threading.Event()
        #: reports sent with a result in them (plugin/push.py)
        self.sent_results = SentResults()

    def __getstate__(self) -> dict[str, Any]:
        # Sent from the scheduler to every worker: settings only.
        return {"backend": self.backend, "device_memory_limit": self.device_memory_limit,
                "rmm_pool_size": self.rmm_pool_size}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)  # type: ignore[misc]

    def setup(self, worker: Worker) -> None:
        from dask.utils import parse_timedelta

        self.worker = worker
        quiet_heartbeat_at_close(worker)
        resource = config.get("resource", "GPU")
        slots = int(worker.state.total_resources.get(resource, 1) or 1)
        limit = self.device_memory_limit
        if limit is None:
            limit = config.get("device-memory-limit")
        pool = self.rmm_pool_size if self.rmm_pool_size is not None else config.get(
            "rmm-pool-size")
        backend = make_backend(self.backend or config.get("backend"),
                               device_memory_limit=limit, rmm_pool_size=pool)
        # The CUDA backend sizes its RMM pool and keeps headroom for what the
        # cache cannot account (device/sizing.py).
        capacity = backend.cache_capacity(limit)
        self.runtime = WorkerRuntime(backend, capacity, slots, needed_soon=self.needed_soon,
                                     on_state_change=self.state_changed,
                                     reschedule=self.await_restart)
        worker.handlers["kaas_worker_stats"] = self.handle_stats
        worker.handlers["kaas_worker_clear"] = self.handle_clear
        self.report_with_result = bool(config.get("report-with-result", True))
        interval = parse_timedelta(config.get("report-interval", "200ms")) * 1000
        self._callback = PeriodicCallback(self._periodic_flush, interval)
        self._callback.start()
        logger.info("dask_kaas: %s backend, %d bytes of device memory, %d slot(s)",
                    backend.name, capacity, slots)

    def teardown(self, worker: Worker) -> None:
        self._closing.set()  # wakes requests parked on a broken device
        if self._callback is not None:
            self._callback.stop()
        worker.handlers.pop("kaas_worker_stats", None)
        worker.handlers.pop("kaas_worker_clear", None)
        if self.runtime is not None:
            self.runtime.close()
            self.runtime = None

    # -- look-ahead for eviction ------------------------------------------
    def transition(self, key: Any, start: str, finish: str, **kwargs: Any) -> None:
        """Track the cacheable inputs of graphs waiting on this worker, and
        the tasks executing here (see :mod:`.health`)."""
        if self._held and start in _RAN:
            with self._held_lock:
                report = self._held.pop(key, None)
            if report is not None:
                # On the event loop, inside Dask's handling of the task's
                # end: Dask's own message for it is next on the stream.
                self.flush(report)
        rt, worker = self.runtime, self.worker
        ts = worker.state.tasks.get(key) if worker is not None else None
        state = ts.state if ts is not None else finish  # "released" may mean cancelled
        if self.health.transition(key, start, state) and rt is not None \
                and rt.broken is not None and worker is not None:
            worker.loop.add_callback(self.flush, None, True)
        if rt is not None and ts is not None and _request_of(ts.run_spec) is not None:
            if state == "cancelled" and start in ("executing", "long-running"):
                # Nobody wants its result, but its kernel keeps the slot: the
                # same as a request past its time limit (see restart.py).
                rt.set_overdue(str(key), True)
            elif start == "cancelled":
                rt.set_overdue(str(key), False)
        if finish in ("ready", "constrained", "waiting"):
            request = _request_of(ts.run_spec) if ts is not None else None
            if request is not None:
                # By Dask key, as the runtime identifies them (never the
                # request's own buffer_id fields).
                ids = tuple(k for k in value_keys(ts.run_spec) if k is not None)
                with self._queued_lock:
                    self._queued[key] = ids
        elif key in self._queued:
            with self._queued_lock:
                self._queued.pop(key, None)

    def needed_soon(self) -> set[str]:
        with self._queued_lock:
            return {b for ids in self._queued.values() for b in ids}

    def handle_stats(self) -> dict[str, Any]:
        rt = self.runtime
        if rt is None:
            return {}
        return {"stats": rt.stats(), "resident": rt.cache.resident()}

    async def handle_clear(self) -> int:
        """Empty the device cache.  In a thread: write-backs of kept outputs
        copy device memory to the host, which must not stall the event loop."""
        import asyncio

        rt = self.runtime
        if rt is None:
            return 0
        await asyncio.get_running_loop().run_in_executor(None, rt.cache.clear)
        self.flush()
        return rt.cache.used_bytes

    # -- reports to the scheduler -----------------------------------------
    def report(self, report: dict[str, Any]) -> None:
        """Called from the task's thread once a graph is done.  The report is
        held until Dask sends the task's own message (see ``transition``);
        while a slot is overdue it goes at once, with statistics: the
        scheduler must know before it places the next graph."""
        worker, rt = self.worker, self.runtime
        if worker is None:
            return
        urgent = rt is not None and bool(rt.overdue)
        key = _current_key(worker)
        if "result" in report and (key is None or report.get("key") != key):
            # The request names another key than the task that ran it (a
            # forged request): its outputs go to nobody but its own client.
            del report["result"]
        if self.report_with_result and not urgent:
            if key is not None:
                with self._held_lock:
                    self._held[key] = report
                return
        worker.loop.add_callback(self.flush, report, urgent)

    def state_changed(self) -> None:
        """The runtime's overdue slots or health changed (any thread)."""
        worker = self.worker
        if worker is not None:
            worker.loop.add_callback(self.flush, None, True)

    def await_restart(self, reason: str) -> None:
        """Hold a request that reached a broken device until the scheduler
        restarts this worker, then hand it back to be run elsewhere
        (``Reschedule``); fail it only if no restart comes."""
        from ..limits import timeout_grace

        worker = self.worker
        if worker is not None:
            self.health.park(worker.get_current_task())
        self.state_changed()
        if self._closing.wait(timeout_grace() + RESTART_WAIT_S):
            raise RescheduledError(  # the worker is going away: not this request's fault
                f"handed back to be placed elsewhere ({reason})")
        raise KaasError(f"worker {getattr(self.worker, 'address', '?')} cannot run kernels "
                        f"({reason}) and was not restarted")

    def _periodic_flush(self) -> None:
        # A report held since the previous tick lost its task's transition
        # (none should): it goes now, on its own.
        with self._held_lock:
            stale = [self._held.pop(k) for k in self._held_seen if k in self._held]
            self._held_seen = set(self._held)
        self._pending_reports.extend(stale)
        self.flush(with_stats=True)
        self.sent_results.tick()

    def flush(self, report: dict[str, Any] | None = None, with_stats: bool = False) -> None:
        """Send cache changes (and a finished graph's report) to the scheduler;
        keep them if the worker is not connected right now.

        Statistics ride along only periodically (and when they changed): the
        per-request message stays small, and ``kaas_stats()`` asks the workers
        directly when it needs exact figures.
        """
        rt, worker = self.runtime, self.worker
        if rt is None or worker is None:
            return
        if report is not None:
            self._pending_reports.append(report)
        stream = getattr(worker, "batched_stream", None)
        connected = stream is not None and stream.comm is not None and not stream.comm.closed()
        if not connected:
            self._hello_sent = False
            return
        events = rt.cache.drain_events()
        stats = None
        if with_stats or not self._hello_sent:
            stats = rt.stats()
            stats["broken"] = self.health.reportable(rt.broken)
            if stats == self._last_stats and self._hello_sent:
                stats = None
        if not events and not self._pending_reports and stats is None:
            return
        msg: dict[str, Any] = {"op": UPDATE_OP, "events": events,
                               "reports": self._pending_reports}
        if stats is not None:
            msg["stats"] = self._last_stats = stats
        if not self._hello_sent:
            msg["resident"] = rt.cache.resident()
            self._hello_sent = True
        for report in self._pending_reports:
            if "result" in report:
                self.sent_results.sent(report)
        self._pending_reports = []
        worker.batched_send(msg)


def _current_key(worker: Worker) -> Any:
    """The Dask key of the task running in this thread, or None."""
    try:
        return worker.get_current_task()
    except (AttributeError, KeyError, ValueError):
        return None


def _request_of(run_spec: Any) -> GraphRequest | None:
    """The GraphRequest among a graph task's arguments, if it is one."""
    for arg in getattr(run_spec, "args", ()) or ():
        if isinstance(arg, GraphRequest):
            return arg
    return None


def worker_runtime() -> tuple[WorkerRuntime, KaasWorkerPlugin]:
    """The runtime of the worker this task runs on."""
    from distributed import get_worker

    worker = get_worker()
    plugin = worker.plugins.get(PLUGIN_NAME)
    runtime = getattr(plugin, "runtime", None)
    if runtime is None:
        raise NoKaasWorkersError(
            f"worker {worker.address} has no dask_kaas plugin; start the cluster with "
            "LocalKaasCluster, or the scheduler with --preload dask_kaas.preload")
    return runtime, plugin  # type: ignore[return-value]
