"""The client side: submit kernel graphs, read statistics.

``KaasClient`` is a ``distributed.Client`` with a few more methods; the same
functions work on any client (``dask_kaas.submit_kernel_graph(graph, inputs,
client=c)``).  The plugins are installed on first use, idempotently, so this
works against any Dask cluster whose workers advertise the GPU resource.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

import dask
import numpy as np
from dask.utils import parse_timedelta
from distributed import Client, Future, default_client

from . import checks, config
from .coalesce import SubmitCoalescer, coalesce_setting, may_coalesce
from .const_identity import content_token
from .consts import ConstRegistry
from .device.handles import DeviceArray
from .futures import DeviceArrayFuture, KernelGraphFuture
from .graph.buffers import BufferKind
from .graph.errors import (
    GraphTooLargeError,
    KernelDefinitionError,
    NoKaasWorkersError,
)
from .graph.graph import KernelGraph
from .limits import check_n_iter, request_timeout
from .plugin.identity import kept_id
from .plugin.push import PushedResults, push_limit
from .plugin.scheduler import KaasSchedulerPlugin
from .plugin.tasks import run_kernel_graph, select_output
from .request import ANNOTATION, SELECT_ROLE, GraphRequest, InputRef, RequestTable
from .resend import Recipe, Resender

#: How long cluster facts (worker capacities) are trusted before asking again.
INFO_TTL_S = 2.0
#: How long to wait for workers to report their devices on first use.
WORKER_WAIT_S = 10.0
#: Requests sent to the scheduler in one message (see map_kernel_graph).
SUBMIT_SLICE = 500
#: Default of ``kaas.client-stream-interval`` (see _ClientState.tune_stream).
STREAM_INTERVAL = "1ms"


class _ClientState:
    """What one client remembers about the KaaS side of its cluster."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.ensured = False
        self.info: dict[str, Any] = {}
        self.info_at = 0.0
        self.lock = threading.Lock()
        self.consts = ConstRegistry(client, self.candidates)
        self.resender = Resender(client, self.consts, _submit_requests)
        self._tuned: Any = None
        #: results pushed with their workers' reports (plugin/push.py), and
        #: how large a result this client asks to have pushed
        self.pushed = PushedResults(client)
        self.pushed.install()
        self.push_bytes = push_limit()
        #: concurrent submissions from several threads go in one message
        self.coalescer = SubmitCoalescer(_submit_requests, SUBMIT_SLICE)
        self.coalesce = coalesce_setting()

    def tune_stream(self) -> None:
        """Shorten the batching interval of the client's stream to the
        scheduler (Dask's is 10 ms) to ``kaas.client-stream-interval``.

        A stream that sent anything in the last interval holds the next
        message until the interval is over.  A kaas submission does about a
        millisecond of work here (content tokens, validation, the request)
        before its ``update-graph`` goes; the release of the previous
        result's future, sent from the event loop meanwhile, then goes
        first, and the submission waited up to 10 ms behind it (the
        latency profile showed it as 9 of a 20 ms request).  Checked at
        each submission: a reconnection makes a new stream."""
        comm = getattr(self.client, "scheduler_comm", None)
        if comm is None or comm is self._tuned:
            return
        interval = parse_timedelta(config.get("client-stream-interval", STREAM_INTERVAL))
        if interval is not None and getattr(comm, "interval", 0) > interval:
            comm.interval = interval
        self._tuned = comm

    def ensure(self) -> None:
        """Install the plugins (once) and wait until workers report."""
        if self.ensured:
            return
        with self.lock:
            if self.ensured:
                return
            self.client.register_plugin(KaasSchedulerPlugin())
            self._wait_for_workers()
            self.ensured = True

    def _wait_for_workers(self) -> None:
        info = self.refresh()
        deadline = time.monotonic() + WORKER_WAIT_S
        while (not info["candidates"] or set(info["candidates"]) - set(info["workers"])) \
                and time.monotonic() < deadline:
            time.sleep(0.05)
            info = self.refresh()
        if not info["candidates"]:
            raise NoKaasWorkersError(
                f"no worker of this cluster advertises the {info['resource']!r} resource; "
                f"start workers with --resources {info['resource']}=1 (LocalKaasCluster "
                "does this)")

    def refresh(self) -> dict[str, Any]:
        self.info = self.client.sync(self.client.scheduler.kaas_info)
        self.info_at = time.monotonic()
        return self.info

    def current_info(self) -> dict[str, Any]:
        if time.monotonic() - self.info_at > INFO_TTL_S:
            self.refresh()
        return self.info

    def candidates(self, refresh: bool = False) -> list[str]:
        """Addresses of the workers that run graphs (asked again if ``refresh``)."""
        info = self.refresh() if refresh else self.current_info()
        return list(info["candidates"])

    def max_capacity(self, need: int) -> int | None:
        caps = [w["capacity_bytes"] for w in self.current_info()["workers"].values()
                if w.get("capacity_bytes")]
        if caps and max(caps) < need:
            caps = [w["capacity_bytes"] for w in self.refresh()["workers"].values()
                    if w.get("capacity_bytes")]
        return max(caps) if caps else None

    def const_future(self, arr: np.ndarray) -> Future:
        """The cluster copy of a const array, scattered once and found again by
        content, replicated on two workers so losing one does not lose it
        (and sent again by this client if both go: see dask_kaas.consts)."""
        return self.consts.future(content_token(arr), arr)

    def track(self, futures: list[KernelGraphFuture], graph: KernelGraph,
              requests: list[GraphRequest], columns: list[list[Any]], keep: list[str],
              priority: int, resource: str) -> None:
        """Remember what each request needs to be sent again while its future lives."""
        for i, (fut, request) in enumerate(zip(futures, requests)):
            tokens = {pos: self.consts.token_of(ref.dask_key) if ref.const and ref.dask_key
                      else None for pos, ref in enumerate(request.inputs)}
            consts = {pos: tok for pos, tok in tokens.items() if tok is not None}
            values = [None if pos in consts else col[i] for pos, col in enumerate(columns)]
            self.consts.hold(fut, consts.values())
            self.resender.track(fut, Recipe(graph, request, values, consts, keep, priority,
                                            resource))


def _state(client: Client) -> _ClientState:
    st = getattr(client, "_kaas_state", None)
    if st is None:
        st = _ClientState(client)
        client._kaas_state = st  # type: ignore[attr-defined]
    return st


def submit_kernel_graph(graph: KernelGraph, inputs: Mapping[str, Any],
                        client: Client | None = None, *, tenant: str = "default",
                        keep_on_device: Iterable[str] = (), priority: int = 0,
                        weight: float | None = None, timeout: float | None = None
                        ) -> KernelGraphFuture:
    """Validate ``graph`` with ``inputs`` here, then run it on the cluster.

    ``inputs`` maps each input/const buffer to a NumPy array or a Dask future
    (a scattered array, the result of a host task, or a kept output of an
    earlier graph).  Const arrays are identified by content and sent to the
    cluster once.  ``timeout``: seconds the graph may run on its worker
    (default ``kaas.request-timeout``); past it the request fails with
    RequestTimeoutError.  Returns a :class:`KernelGraphFuture`.
    """
    (fut,) = map_kernel_graph(graph, [inputs], client, tenant=tenant,
                              keep_on_device=keep_on_device, priority=priority, weight=weight,
                              timeout=timeout)
    return fut


def map_kernel_graph(graph: KernelGraph, inputs: Iterable[Mapping[str, Any]],
                     client: Client | None = None, *, tenant: str = "default",
                     keep_on_device: Iterable[str] = (), priority: int = 0,
                     weight: float | None = None, timeout: float | None = None
                     ) -> list[KernelGraphFuture]:
    """Submit one request of ``graph`` per mapping in ``inputs``, all at once.

    The whole batch reaches the scheduler in one message, so a burst of
    requests is placed and prioritised together (and much faster than as
    many ``submit_kernel_graph`` calls).
    """
    tenant, priority, weight = checks.check_submission(graph, tenant, priority, weight)
    client = client or default_client()
    timeout = request_timeout(timeout, graph.name)
    check_n_iter(graph)
    state = _state(client)
    state.ensure()
    state.tune_stream()
    keep = checks.check_keep(graph, keep_on_device)
    capacity = state.max_capacity(graph.nbytes)
    _check_backends(graph, state.current_info())
    requests: list[GraphRequest] = []
    columns: list[list[Any]] = [[] for _ in graph.inputs]
    for one in inputs:
        checks.check_input_values(graph, one)
        graph.validate(one, device_capacity=capacity)
        key = f"kaas-{graph.name}-{uuid.uuid4().hex}"
        refs = []
        for column, buf in zip(columns, graph.inputs):
            ref, value = _input_ref(state, buf, one[buf.name])
            refs.append(ref)
            column.append(value)
        requests.append(GraphRequest(
            key=key, graph=graph.name, tenant=tenant, inputs=refs,
            keep={name: kept_id(key, name) for name in keep}, nbytes=graph.nbytes,
            priority=priority, weight=weight, timeout=timeout,
            push=0 if keep else state.push_bytes))
    if not requests:
        return []
    resource = state.info.get("resource", config.get("resource", "GPU"))
    futs: list[KernelGraphFuture] = []
    # One message per slice: the scheduler ingests a huge burst a slice at a
    # time, and other tenants' requests are admitted and released between.
    for lo in range(0, len(requests), SUBMIT_SLICE):
        hi = lo + SUBMIT_SLICE
        part = [col[lo:hi] for col in columns]
        send = state.coalescer.submit if state.coalesce and may_coalesce() else \
            _submit_requests
        sliced = send(client, graph, requests[lo:hi], part, keep, priority, resource)
        state.track(sliced, graph, requests[lo:hi], part, keep, priority, resource)
        futs += sliced
    return futs


def _submit_requests(client: Client, graph: KernelGraph, requests: list[GraphRequest],
                     columns: list[list[Any]], keep: list[str], priority: int,
                     resource: str) -> list[KernelGraphFuture]:
    """Send validated requests (``columns``: the values of each input) as one batch."""
    keys = [r.key for r in requests]
    with dask.annotate(**{ANNOTATION: RequestTable(requests)}):
        # client.map's batching costs more for one task (but submit would not
        # send again a key this client already has a future of).
        if len(requests) == 1 and keys[0] not in client.futures:
            futs = [client.submit(run_kernel_graph, graph, requests[0],
                                  *(col[0] for col in columns), key=keys[0],
                                  resources={resource: 1}, pure=False, priority=priority)]
        else:
            futs = client.map(run_kernel_graph, [graph] * len(requests), requests, *columns,
                              key=keys, resources={resource: 1}, pure=False,
                              priority=priority)
    kept: list[dict[str, DeviceArrayFuture]] = [{} for _ in requests]
    if keep:
        selects = [GraphRequest(key=r.key, graph=graph.name, tenant=r.tenant, inputs=[],
                                role=SELECT_ROLE) for r in requests]
        table = RequestTable(selects, keys=[r.keep[name] for r in requests for name in keep])
        with dask.annotate(**{ANNOTATION: table}):
            sel = client.map(select_output, [f for f in futs for _ in keep],
                             [name for _ in futs for name in keep],
                             key=[r.keep[name] for r in requests for name in keep],
                             pure=False, priority=priority)
        for i, f in enumerate(sel):
            kept[i // len(keep)][keep[i % len(keep)]] = DeviceArrayFuture(f.key, client)
    return [KernelGraphFuture(f.key, client, graph.name, k) for f, k in zip(futs, kept)]


def _input_ref(state: _ClientState, buf: Any, value: Any) -> tuple[InputRef, Any]:
    """How one input travels: by Dask key (futures, consts) or inline."""
    const = buf.kind == BufferKind.CONST
    if isinstance(value, Future):
        return InputRef(buf.name, buf.nbytes, str(value.key), str(value.key), const), value
    if isinstance(value, DeviceArray):
        return InputRef(buf.name, buf.nbytes, value.buffer_id, None, const), value
    if const:
        fut = state.const_future(np.asarray(value))
        return InputRef(buf.name, buf.nbytes, str(fut.key), str(fut.key), True), fut
    return InputRef(buf.name, buf.nbytes, None, None, False), np.asarray(value, order="C")


def _check_backends(graph: KernelGraph, info: Mapping[str, Any]) -> None:
    """A CUDA kernel without a CPU implementation cannot run on a cluster of
    CPU-backend workers: say so now rather than from a worker."""
    backends = {w.get("backend") for w in info.get("workers", {}).values()}
    if backends != {"cpu"}:
        return
    for index, launch in enumerate(graph.launches):
        if not launch.kernel.has_cpu_implementation():
            raise KernelDefinitionError(
                "CUDA kernel has no CPU implementation and every worker of this cluster "
                "runs the CPU backend: pass cpu=<array function> to Kernel.cuda",
                graph=graph.name, launch=index, kernel=launch.kernel.name)


def kaas_stats(client: Client | None = None) -> dict[str, Any]:
    """Per-worker device-cache statistics and per-tenant request statistics."""
    client = client or default_client()
    _state(client).ensure()
    return client.sync(client.scheduler.kaas_stats)


def kaas_set_weight(tenant: str, weight: float, client: Client | None = None) -> None:
    """Give ``tenant`` a fair-share weight (2.0 gets twice the device time of 1.0)."""
    tenant = checks.check_tenant(tenant)
    weight = checks.check_weight(weight, optional=False)
    client = client or default_client()
    _state(client).ensure()
    client.sync(client.scheduler.kaas_set_weight, tenant=tenant, weight=weight)


def kaas_set_policy(policy: str, client: Client | None = None) -> str:
    """Switch the cluster's placement policy."""
    client = client or default_client()
    _state(client).ensure()
    return client.sync(client.scheduler.kaas_set_policy, policy=policy)


def kaas_clear_caches(client: Client | None = None) -> None:
    """Empty every worker's device cache (buffers in use stay)."""
    client = client or default_client()
    _state(client).ensure()
    client.sync(client.scheduler.kaas_clear_caches)


class KaasClient(Client):
    """A Dask client that also submits kernel graphs."""

    def map_kernel_graph(self, graph: KernelGraph, inputs: Iterable[Mapping[str, Any]], *,
                         tenant: str = "default", keep_on_device: Iterable[str] = (),
                         priority: int = 0, weight: float | None = None,
                         timeout: float | None = None) -> list[KernelGraphFuture]:
        return map_kernel_graph(graph, inputs, self, tenant=tenant,
                                keep_on_device=keep_on_device, priority=priority,
                                weight=weight, timeout=timeout)

    def submit_kernel_graph(self, graph: KernelGraph, inputs: Mapping[str, Any], *,
                            tenant: str = "default", keep_on_device: Iterable[str] = (),
                            priority: int = 0, weight: float | None = None,
                            timeout: float | None = None) -> KernelGraphFuture:
        return submit_kernel_graph(graph, inputs, self, tenant=tenant,
                                   keep_on_device=keep_on_device, priority=priority,
                                   weight=weight, timeout=timeout)

    def register_onnx_model(self, model: Any, *, tenant: str = "default",
                            name: str | None = None, batch: Any = None,
                            max_graphs: int = 8) -> Any:
        """Import an ONNX model (``ModelProto``, path or bytes) once and get a
        callable that runs it by input names: ``m(input=x)["output"]``.

        Its initializers become this tenant's consts (sent once, cached on the
        workers), and a graph is kept per distinct input shape (``max_graphs``,
        least recently used out), so a symbolic batch dimension takes any
        batch.  A model the operator table cannot run is refused here with
        ``UnsupportedOperatorError``.  Needs ``pip install "dask-kaas[onnx]"``.
        """
        from .onnx import register_onnx_model

        return register_onnx_model(self, model, tenant=tenant, name=name, batch=batch,
                                   max_graphs=max_graphs)

    def kaas_stats(self) -> dict[str, Any]:
        return kaas_stats(self)

    def kaas_set_weight(self, tenant: str, weight: float) -> None:
        kaas_set_weight(tenant, weight, self)

    def kaas_set_policy(self, policy: str) -> str:
        return kaas_set_policy(policy, self)

    def kaas_clear_caches(self) -> None:
        kaas_clear_caches(self)

    def kaas_state(self) -> dict[str, Any]:
        """Everything the dashboard shows: stats, resident buffers, timeline."""
        _state(self).ensure()
        return self.sync(self.scheduler.kaas_state)


__all__ = ["KaasClient", "KernelGraphFuture", "DeviceArrayFuture", "submit_kernel_graph",
           "map_kernel_graph",
           "kaas_stats", "kaas_set_weight", "GraphTooLargeError"]
