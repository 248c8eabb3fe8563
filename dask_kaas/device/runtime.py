"""WorkerRuntime: runs kernel graphs on one worker's device.

It owns the backend, the DeviceCache, the KernelCache and the concurrency
slots (one stream each).  A graph runs in three steps: reserve every byte it
needs in the cache (loading cacheable inputs on a miss), launch its kernels
in program order ``n_iter`` times on the slot's stream, and hand back host
copies of its outputs (or DeviceArray handles for outputs kept on the device).
Whatever happens, the reservation is released, so a failing kernel fails its
own request and leaves the cache consistent for the next one.

What a request says about itself is not trusted: cache identities come from
the Dask keys the worker really received (:class:`Identities`), outputs and
temps start zeroed, and anything a kernel raises (``SystemExit`` included)
becomes that request's KernelExecutionError.  Only a failure of the worker's
own allocator is out-of-memory (evict and retry): a kernel raising
``MemoryError`` fails its request once and evicts nothing.

Between two launches the runtime asks whether the request is still wanted
(its time limit not passed, not cancelled) and stops cleanly if not, so a
long ``n_iter`` graph that timed out returns its slot instead of costing a
worker restart; at most :data:`MAX_ITERATIONS_IN_FLIGHT` iterations are
queued on the device ahead of the host, so stopping takes effect promptly.

A sticky device fault marks the worker broken.  The request that met it
first is blamed; a request that meets it after (on another slot, or
waiting for memory) did nothing wrong and is handed back to be placed on
another worker (``reschedule``).
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..graph.buffers import Buffer, BufferKind
from ..graph.errors import (
    DeviceFaultError,
    DeviceOutOfMemoryError,
    InputMismatchError,
    KaasError,
    KernelExecutionError,
    LiteralTypeError,
    RequestTimeoutError,
)
from ..graph.graph import KernelGraph
from ..graph.launch import ArgRef, literal_problem
from ..graph.library import graph_temp_bytes
from ..graph.memplan import plan_temps
from ..graph.validate import check_shared_memory
from ..limits import check_n_iter
from ..request import GraphRequest
from . import deadline, oom
from .backend import Backend
from .cache import DeviceCache, Load
from .handles import DeviceArray
from .kernel_cache import KernelCache
from .user_errors import user_failure

#: Iterations of an ``n_iter`` graph queued on the device ahead of the host.
MAX_ITERATIONS_IN_FLIGHT = 2


def host_source(graph: KernelGraph, buf: Buffer, value: Any) -> Callable[[], np.ndarray]:
    """A thunk giving the host bytes of an input value, checked against its
    buffer (values of futures are only seen here, on the worker)."""
    shape = tuple(getattr(value, "shape", ()) or ())
    dtype = getattr(value, "dtype", None)
    if not isinstance(value, (np.ndarray, DeviceArray)) and not hasattr(value, "__array__"):
        raise InputMismatchError(f"expects an array, got {type(value).__name__}",
                                 graph=graph.name, buffer=buf.name)
    if dtype is None or shape != buf.shape or np.dtype(dtype) != buf.dtype:
        raise InputMismatchError(
            f"expects shape {buf.shape} dtype {buf.dtype}, got shape {shape} dtype {dtype}",
            graph=graph.name, buffer=buf.name)
    if isinstance(value, DeviceArray):
        return value.get
    return lambda: np.asarray(value, order="C")  # keeps 0-d shapes


@dataclass
class Identities:
    """Cache identities of one request, derived from what the worker really
    received (never from fields of the request, which a client can forge)."""

    #: Per input (in ``request.inputs`` order): the Dask key its value came
    #: from, or None for a value sent inline (private to the request).
    inputs: list[str | None] = field(default_factory=list)
    #: Output name -> buffer id of each output kept on the device.
    keep: dict[str, str] = field(default_factory=dict)


class WorkerRuntime:
    def __init__(self, backend: Backend, capacity_bytes: int, slots: int = 1,
                 needed_soon: Callable[[], set[str]] | None = None,
                 on_state_change: Callable[[], None] | None = None,
                 reschedule: Callable[[str], None] | None = None) -> None:
        self.backend = backend
        self.cache = DeviceCache(backend, capacity_bytes, needed_soon=needed_soon,
                                 on_fault=self._mark_broken)
        self.kernels = KernelCache(backend)
        self.slots = max(1, int(slots))
        self._free_streams: queue.Queue[Any] = queue.Queue()
        for s in backend.make_streams(self.slots):
            self._free_streams.put(s)
        self._lock = threading.Lock()
        self.graphs_run = 0
        self.errors = 0
        self.running = 0
        #: Request key -> when its time limit passed, for requests whose
        #: kernel still holds a slot: no new work for those slots.
        self.overdue: dict[str, float] = {}
        #: Why this worker's device can run nothing more (a sticky fault),
        #: or None: a broken worker is restarted.
        self.broken: str | None = None
        #: Called (from any thread) when ``overdue`` or ``broken`` changes.
        self.on_state_change = on_state_change
        #: Called with the reason for a request that met a device fault it did
        #: not cause; it raises (the worker plugin hands the request back to
        #: the scheduler to be placed elsewhere).
        self.reschedule = reschedule

    @contextlib.contextmanager
    def _slot(self) -> Iterator[Any]:
        stream = self._free_streams.get()
        with self._lock:
            self.running += 1
        try:
            yield stream
        finally:
            with self._lock:
                self.running -= 1
            self._free_streams.put(stream)

    def stats(self) -> dict[str, Any]:
        snap = self.cache.snapshot()
        snap.update(graphs_run=self.graphs_run, errors=self.errors, running=self.running,
                    slots=self.slots, kernels_compiled=self.kernels.compiles,
                    overdue=sorted(self.overdue), broken=self.broken,
                    **self.backend.describe())
        return snap

    # -- running a graph -------------------------------------------------
    def run(self, graph: KernelGraph, request: GraphRequest, values: Sequence[Any],
            ids: Identities | None = None, timeout: float | None = None
            ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Run one graph; return (outputs, report for the scheduler).

        ``ids`` says which inputs are cacheable under which identity (None:
        every input is private).  With a ``timeout`` the graph runs in a
        thread of its own and RequestTimeoutError is raised once it has run
        that long; its slot stays taken (see ``overdue``) until it returns.
        """
        t0 = time.perf_counter()
        report: dict[str, Any] = {"key": request.key, "graph": graph.name,
                                  "tenant": request.tenant, "error": None,
                                  "started_at": time.time()}
        ids = ids or Identities([None] * len(values))
        try:
            outputs = self._run_guarded(graph, request, values, ids, timeout, report)
        except KaasError as e:
            if getattr(e, "innocent", False) and self.reschedule is not None:
                self.reschedule(self.broken or e.detail)  # raises: placed elsewhere
            self._count(error=True)
            report["error"] = type(e).__name__
            report["total_s"] = time.perf_counter() - t0
            e.report = report  # type: ignore[attr-defined]
            raise
        self._count(error=False)
        report["total_s"] = time.perf_counter() - t0
        return outputs, report

    def _run_guarded(self, graph: KernelGraph, request: GraphRequest, values: Sequence[Any],
                     ids: Identities, timeout: float | None, report: dict[str, Any]
                     ) -> dict[str, Any]:
        """Only a KaasError comes out of here, whatever the request does."""
        try:
            check_n_iter(graph)
            check_literals(graph)
            return deadline.run_within(
                lambda: self._run_retrying_oom(graph, request, values, ids, report),
                timeout, on_overdue=lambda: self.set_overdue(str(request.key), True),
                on_late_return=lambda: self.set_overdue(str(request.key), False),
                graph=graph.name)
        except KaasError:
            raise
        except BaseException as e:  # noqa: BLE001 - one request fails, never the worker
            failure = user_failure(KernelExecutionError, "request failed", e, graph=graph.name)
        raise failure

    def set_overdue(self, key: str, overdue: bool) -> None:
        """Mark a request whose kernel holds a slot although nobody waits for
        it any more (past its time limit, or cancelled while running)."""
        with self._lock:
            if overdue:
                self.overdue[key] = time.monotonic()
            else:
                self.overdue.pop(key, None)
        if self.on_state_change is not None:
            self.on_state_change()

    def _run_retrying_oom(self, graph: KernelGraph, request: GraphRequest,
                          values: Sequence[Any], ids: Identities,
                          report: dict[str, Any]) -> dict[str, Any]:
        """A real out-of-memory despite the accounting (fragmentation): empty
        the cache and try once more, then give up with a KaasError."""
        for attempt in (1, 2):
            try:
                return self._run(graph, request, values, ids, report)
            except KaasError:
                raise
            except Exception as e:  # noqa: BLE001 - only a real out-of-memory is retried
                if self.backend.is_fatal(e):
                    raise self._device_fault(e, graph.name) from None
                if not self.backend.is_out_of_memory(e):
                    raise
                if attempt == 2:
                    raise DeviceOutOfMemoryError(
                        f"device out of memory even after emptying the cache: {e}",
                        graph=graph.name) from None
                self.cache.clear()
        raise AssertionError("unreachable")  # pragma: no cover

    def _count(self, error: bool) -> None:
        with self._lock:
            self.graphs_run += 1
            self.errors += error

    def _run(self, graph: KernelGraph, request: GraphRequest, values: Sequence[Any],
             ids: Identities, report: dict[str, Any]) -> dict[str, Any]:
        names = [b.name for b in graph.inputs]
        if request.input_names != names or len(values) != len(names) \
                or len(ids.inputs) != len(names):
            raise InputMismatchError(
                f"the request carries inputs {request.input_names[:20]!r} "
                f"({len(values)} values) but the graph's are {names!r}", graph=graph.name)
        written = graph.written_buffers()
        alloc = self.backend.alloc_size
        loads: list[Load] = []
        cached_names: dict[str, str] = {}
        private_inputs: list[tuple[Buffer, Callable[[], np.ndarray]]] = []
        for ref, value, bid in zip(request.inputs, values, ids.inputs):
            buf = graph.buffers[ref.name]
            source = host_source(graph, buf, value)
            if bid is not None and buf.name not in written:
                loads.append(Load(bid, buf.nbytes, source, const=buf.kind == BufferKind.CONST))
                cached_names[buf.name] = bid
            else:
                # Per-request data, or an input the graph updates in place:
                # the graph gets its own copy and the cached one stays intact.
                private_inputs.append((buf, source))
        own = graph.outputs
        plan = plan_temps(graph)  # temps never live together share one arena
        private_bytes = sum(alloc(b.nbytes) for b, _ in private_inputs) + sum(
            alloc(b.nbytes) for b in own) + alloc(plan.arena_bytes) + graph_temp_bytes(
            graph, alloc)

        with self._slot() as stream:
            t_wait = time.perf_counter()
            res = self.cache.reserve(loads, private_bytes, stream, graph.name)
            report["memory_wait_s"] = time.perf_counter() - t_wait
            deadline.started()  # the request's time limit counts from here
            keep: dict[str, tuple[Any, int, Any]] = {}
            arrays: dict[str, Any] = {}
            kept: dict[str, tuple[Any, int, Any]] | None = None
            # The launchers (and so their modules) live until the stream is
            # synchronized: an evicted module is never unloaded under a
            # kernel still in flight.
            held: list[Any] = []
            synchronized = False
            try:
                for name, bid in cached_names.items():
                    arrays[name] = res.arrays[bid]
                with self.backend.on_stream(stream):
                    try:  # the runtime's own allocations: a MemoryError is the device's
                        for buf, source in private_inputs:
                            t1 = time.perf_counter()
                            host = source()
                            arrays[buf.name] = self.backend.to_device(host, stream)
                            self.cache.count_private_load(res, host.nbytes,
                                                          time.perf_counter() - t1)
                        for buf in own:
                            # Zeroed: a kernel that skips an element must not hand
                            # out what an earlier request left in that memory.
                            arrays[buf.name] = self.backend.zeros(buf.shape, buf.dtype,
                                                                  stream)
                        arena = self.backend.zeros((plan.arena_bytes,), np.uint8, stream)
                    except MemoryError as e:
                        oom.mark(e)
                        raise
                    for name, off in plan.offsets.items():
                        buf = graph.buffers[name]
                        arrays[name] = arena[off:off + buf.nbytes].view(buf.dtype).reshape(
                            buf.shape)
                    t_exec = time.perf_counter()
                    self._launch_all(graph, arrays, stream, str(request.key), held)
                    self.backend.synchronize(stream)
                    synchronized = True
                    report["exec_s"] = time.perf_counter() - t_exec
                    outputs: dict[str, Any] = {}
                    for buf in graph.outputs:
                        ref_id = ids.keep.get(buf.name)
                        if ref_id is None:
                            outputs[buf.name] = self.backend.to_host(arrays[buf.name], stream)
                            continue
                        handle = DeviceArray(ref_id, buf.shape, buf.dtype, cache=self.cache)
                        weakref.finalize(handle, self.cache.discard, ref_id)
                        keep[ref_id] = (arrays[buf.name], buf.nbytes, handle)
                        outputs[buf.name] = handle
                kept = keep
            finally:
                if not synchronized:
                    # Failed or stopped with work queued: nothing it uses is
                    # freed, evicted or unloaded before that work is done.
                    self._drain(stream)
                arrays.clear()
                self.cache.release(res, kept)
                held.clear()
            report.update(hits=res.hits, misses=res.misses,
                          bytes_to_device=res.bytes_to_device,
                          seconds_to_device=res.seconds_to_device)
            return outputs

    def _launch_all(self, graph: KernelGraph, arrays: dict[str, Any], stream: Any,
                    key: str, held: list[Any]) -> None:
        shared_limit = self.backend.shared_mem_limit()
        if shared_limit is not None:
            check_shared_memory(graph, shared_limit)
        compiled = held
        for index, launch in enumerate(graph.launches):
            try:
                compiled.append(self.kernels.get(launch.kernel))
            except KaasError as e:
                raise type(e)(e.detail, graph=graph.name, launch=index,
                              kernel=launch.kernel.name) from None
        steps = list(zip(graph.launches, compiled))
        zero_before = plan_temps(graph).zero_before  # temps reusing an earlier temp's memory
        in_flight: list[Any] = []
        overdue = self.overdue
        for it in range(graph.n_iter):
            if len(in_flight) >= MAX_ITERATIONS_IN_FLIGHT:
                # Bounded look-ahead: the host waits for the oldest iteration
                # still queued, so a stop below takes effect soon.
                self.backend.wait_ready(in_flight.pop(0), None)
            for index, (launch, fn) in enumerate(steps):
                if deadline.expired() or key in overdue:
                    raise self._stopped(graph, it, index, key)
                for name in zero_before.get(index, ()):
                    arrays[name][...] = 0  # starts zeroed, as a temp of its own would
                args = [arrays[a.buffer.name] if isinstance(a, ArgRef) else a
                        for a in launch.args]
                # The failure is raised after the except block, so that the
                # original rides along only as the (checked) __cause__.
                try:
                    fn(launch, args, stream)
                    continue
                except KaasError as e:
                    if e.graph is None:  # raised by the backend's launcher: say where
                        raise type(e)(e.detail, graph=graph.name, launch=index,
                                      kernel=launch.kernel.name) from None
                    raise
                except BaseException as e:  # noqa: BLE001 - user code, SystemExit included
                    if self.backend.is_fatal(e):
                        raise self._device_fault(e, graph.name, index,
                                                 launch.kernel.name) from None
                    if self.backend.is_out_of_memory(e):
                        raise  # the allocator's: evict and retry (_run_retrying_oom)
                    it_note = f" (iteration {it})" if graph.n_iter > 1 else ""
                    # Chained, so the client's traceback shows the kernel's frames;
                    # a kernel's own MemoryError lands here too (run once, no eviction).
                    failure = user_failure(KernelExecutionError, f"kernel raised{it_note}", e,
                                           graph=graph.name, launch=index,
                                           kernel=launch.kernel.name)
                raise failure
            if graph.n_iter > 1:
                in_flight.append(self.backend.record_ready(stream))  # end of iteration it

    def _stopped(self, graph: KernelGraph, it: int, index: int, key: str) -> KaasError:
        where = f"before launch {index} of iteration {it} of {graph.n_iter}"
        if key in self.overdue and not deadline.expired():
            return KaasError(f"stopped {where}: the request was cancelled", graph=graph.name)
        return RequestTimeoutError(f"stopped {where}: past its time limit", graph=graph.name)

    def _drain(self, stream: Any) -> None:
        """Wait for what is queued on ``stream`` (after a failure): a sticky
        fault surfacing here marks the worker broken."""
        try:
            self.backend.synchronize(stream)
        except Exception as e:  # noqa: BLE001 - the request already failed
            if self.backend.is_fatal(e):
                self._mark_broken(f"{type(e).__name__}: {e}")

    def _mark_broken(self, reason: str) -> bool:
        """Mark the worker broken (the first reason wins); whether this call
        did (False: it was broken already, by another request)."""
        with self._lock:
            first = self.broken is None
            if first:
                self.broken = reason
        if first and self.on_state_change is not None:
            self.on_state_change()
        return first

    def _device_fault(self, exc: BaseException, graph: str, launch: int | None = None,
                      kernel: str | None = None) -> DeviceFaultError:
        """Mark the worker broken (the first reason wins) and say so to the
        request that met the fault."""
        reason = f"{type(exc).__name__}: {exc}"
        first = self._mark_broken(reason)
        err = DeviceFaultError(f"the device faulted ({reason}); its worker is restarted",
                               graph=graph, launch=launch, kernel=kernel)
        # Met after another request broke the device: not this one's doing.
        err.innocent = not first  # type: ignore[attr-defined]
        return err

    def close(self) -> None:
        self.kernels.clear()
        self.cache.close()
        self.backend.close()


def check_literals(graph: KernelGraph) -> None:
    """Refuse literals no kernel can receive as declared (``np.longdouble``:
    CuPy would pass its 16 bytes as a complex128).  Checked here too because
    a graph that arrives pickled was never built through ``graph.launch``."""
    for index, launch in enumerate(graph.launches):
        for a in launch.args:
            if not isinstance(a, ArgRef):
                problem = literal_problem(a)
                if problem:
                    raise LiteralTypeError(problem, graph=graph.name, launch=index,
                                           kernel=launch.kernel.name)
