"""Placement policies: which worker runs a graph.

The default, ``affinity``, picks the worker where the graph is expected to
*finish* first::

    max(queue wait (until the work placed there is expected done),
        time until the graphs producing its inputs are expected done)
  + bytes of the graph's cacheable inputs missing from that device / H2D bandwidth
  + bytes that loading them would evict / H2D bandwidth (they will be missed
    later), counted twice where requests queued on that worker need them (their
    reload is certain, and it evicts in turn)
  + that loading time again for every request already queued there (the
    copy occupies the device, so the worker's backlog drains later)
  + inputs whose host copy lives on another worker: fetch latency each, plus
    their bytes / network bandwidth
  + the graph's expected run time

Bandwidths, fetch latency, per-request dispatch overhead and run times are
measured online (CostModel), so there is no hand-tuned affinity penalty: a
cached model wins while its worker is not too busy, and once waiting there
costs more than loading the weights elsewhere, the graph goes elsewhere and
the weights get a second copy.
"""

from __future__ import annotations

import abc
import itertools
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ..request import GraphRequest
from .directory import BufferDirectory

POLICIES = ("affinity", "balance", "round_robin", "static", "dask")


@dataclass
class WorkerView:
    """What placement knows of one candidate worker."""

    address: str
    slots: int = 1
    capacity_bytes: int | None = None
    used_bytes: int = 0
    #: Seconds until the work already placed there is expected to be done.
    wait_s: float = 0.0
    queued_n: int = 0

    @property
    def free_bytes(self) -> int | None:
        if self.capacity_bytes is None:
            return None
        return max(0, self.capacity_bytes - self.used_bytes)


class Ewma:
    def __init__(self, initial: float, alpha: float = 0.2) -> None:
        self.value = initial
        self.alpha = alpha
        self.samples = 0

    def add(self, x: float) -> None:
        # The first sample replaces the prior outright.
        self.value = x if self.samples == 0 else (1 - self.alpha) * self.value + self.alpha * x
        self.samples += 1


@dataclass
class CostModel:
    """Run times per graph name and host-to-device bandwidth, learned from
    what the workers report."""

    default_runtime_s: float = 0.002
    default_h2d_bytes_per_s: float = 4e9
    default_fetch_latency_s: float = 0.003
    default_dispatch_s: float = 0.001
    runtimes: dict[str, Ewma] = field(default_factory=dict)
    #: (graph, worker) -> run time there: devices differ in speed, and late
    #: binding needs to know which worker frees a slot first.
    worker_runtimes: dict[tuple[str, str], Ewma] = field(default_factory=dict)
    #: graph name -> monotonic time it was last asked about or measured.
    last_used: dict[str, float] = field(default_factory=dict)
    h2d: Ewma = field(init=False)
    #: Time to fetch one dependency from another worker (Dask's transfer).
    fetch_latency: Ewma = field(init=False)
    #: Per-request time a worker slot spends outside the graph itself
    #: (Dask's dispatch and result handling), seen between back-to-back runs.
    dispatch: Ewma = field(init=False)
    #: Copies smaller than this measure latency, not bandwidth.
    min_bandwidth_sample: int = 256 * 1024

    def __post_init__(self) -> None:
        self.h2d = Ewma(self.default_h2d_bytes_per_s)
        self.fetch_latency = Ewma(self.default_fetch_latency_s)
        self.dispatch = Ewma(self.default_dispatch_s)

    def runtime_s(self, graph: str, worker: str | None = None) -> float:
        """Measured run time of ``graph`` (on ``worker`` if it ran there)."""
        if worker is not None:
            e = self.worker_runtimes.get((graph, worker))
            if e is not None:
                return e.value
        e = self.runtimes.get(graph)
        if e is None:
            return self.default_runtime_s
        self.last_used[graph] = time.monotonic()
        return e.value

    def expire(self, older_than: float) -> int:
        """Forget the run times of graphs not used since ``older_than``
        (monotonic): graph names are client-chosen, so the tables would
        otherwise grow with every name ever sent.  Returns how many went."""
        stale = {g for g, t in self.last_used.items() if t < older_than}
        for g in stale:
            del self.last_used[g]
            self.runtimes.pop(g, None)
        if stale:
            for key in [k for k in self.worker_runtimes if k[0] in stale]:
                del self.worker_runtimes[key]
        return len(stale)

    def slot_time_s(self, graph: str, worker: str | None = None) -> float:
        """How long a request of ``graph`` occupies a worker slot."""
        return self.runtime_s(graph, worker) + self.dispatch.value

    def forget_worker(self, worker: str) -> None:
        for key in [k for k in self.worker_runtimes if k[1] == worker]:
            del self.worker_runtimes[key]

    def observe_transfer(self, seconds: float, nbytes: int, bandwidth: float) -> None:
        self.fetch_latency.add(max(0.0, seconds - nbytes / max(bandwidth, 1.0)))

    def observe(self, report: dict, worker: str | None = None) -> None:
        if report.get("error"):
            return
        busy = float(report.get("total_s", 0.0)) - float(report.get("seconds_to_device", 0.0)) \
            - float(report.get("memory_wait_s", 0.0))
        graph = report.get("graph")
        if graph is not None and busy > 0:
            self.runtimes.setdefault(graph, Ewma(busy)).add(busy)
            self.last_used[graph] = time.monotonic()
            if worker is not None:
                self.worker_runtimes.setdefault((graph, worker), Ewma(busy)).add(busy)
        nbytes = int(report.get("bytes_to_device", 0))
        secs = float(report.get("seconds_to_device", 0.0))
        if nbytes >= self.min_bandwidth_sample and secs > 0:
            self.h2d.add(nbytes / secs)

    def h2d_s(self, nbytes: int) -> float:
        return nbytes / max(self.h2d.value, 1.0)


@dataclass
class PlacementContext:
    directory: BufferDirectory
    costs: CostModel
    #: Dask key -> addresses holding its value in host memory.
    who_has: Callable[[str], set[str]]
    network_bytes_per_s: float = 100e6
    #: Dask key -> seconds until the graph producing it is expected to be
    #: done (None when it is not a pending graph's output).
    pending_s: Callable[[str], float | None] = lambda key: None

    def ready_in_s(self, request: GraphRequest) -> float:
        """Earliest time the request can start anywhere: its inputs that
        other graphs still have to produce."""
        ready = 0.0
        for i in request.inputs:
            if i.dask_key is not None:
                t = self.pending_s(i.dask_key)
                if t is not None:
                    ready = max(ready, t)
        return ready


def missing_device_bytes(request: GraphRequest, worker: str, directory: BufferDirectory) -> int:
    return sum(i.nbytes for i in request.inputs
               if i.buffer_id is not None and not directory.holds(worker, i.buffer_id))


class RequestCosts:
    """The per-request parts of the cost model, computed once per decision.

    Scoring a candidate is then O(inputs) set lookups: nothing here is
    recomputed per worker (private bytes, who holds each host input, run
    time), which is what kept a decision O(workers x inputs) with a large
    constant before.
    """

    __slots__ = ("cacheable", "cacheable_bytes", "private", "ready_s", "remote", "run_s", "fetch_s",
                 "net_bps", "h2d_bps", "directory", "graph", "costs")

    def __init__(self, request: GraphRequest, ctx: PlacementContext,
                 ready_in_s: float | None = None) -> None:
        self.directory = ctx.directory
        self.cacheable = [(i.buffer_id, i.nbytes) for i in request.inputs
                          if i.buffer_id is not None]
        # The graph's own buffers (temps, outputs, inline inputs) need room too.
        self.cacheable_bytes = sum(n for _, n in self.cacheable)
        self.private = request.nbytes - self.cacheable_bytes
        self.ready_s = ctx.ready_in_s(request) if ready_in_s is None else ready_in_s
        self.remote = []
        for i in request.inputs:
            if i.dask_key is not None:
                holders = ctx.who_has(i.dask_key)
                if holders:
                    self.remote.append((i.nbytes, holders))
        self.graph = request.graph
        self.costs = ctx.costs
        self.run_s = ctx.costs.slot_time_s(request.graph)
        self.fetch_s = ctx.costs.fetch_latency.value
        self.net_bps = max(ctx.network_bytes_per_s, 1.0)
        self.h2d_bps = max(ctx.costs.h2d.value, 1.0)

    def held_bytes(self, worker: str) -> int:
        holds = self.directory.holds
        return sum(n for b, n in self.cacheable if holds(worker, b))

    def _parts(self, w: WorkerView, held: int) -> tuple[float, float, float]:
        """(start, load, fetch) on ``w`` given the bytes it holds already."""
        missing = self.cacheable_bytes - held
        free = w.free_bytes
        evicted = 0 if free is None else max(0, missing + self.private - free)
        remote = fetches = 0
        for nbytes, holders in self.remote:
            if w.address not in holders:
                remote += nbytes
                fetches += 1
        return (max(w.wait_s, self.ready_s), (missing + evicted) / self.h2d_bps,
                fetches * self.fetch_s + remote / self.net_bps)

    def score(self, w: WorkerView) -> tuple[float, int]:
        """(expected completion time on ``w``, bytes it holds already): the
        sum of :meth:`terms` without building them."""
        held = self.held_bytes(w.address)
        start, load, fetch = self._parts(w, held)
        return start + load * (1 + w.queued_n) + fetch + self.run_on(w.address), held

    def terms(self, w: WorkerView) -> dict[str, float]:
        """The parts of the expected completion time on ``w``, in seconds."""
        start, load, fetch = self._parts(w, self.held_bytes(w.address))
        return {"start": start, "load": load, "backlog_delay": load * w.queued_n,
                "fetch": fetch, "run": self.run_on(w.address)}

    def run_on(self, worker: str) -> float:
        """Slot time on ``worker``: its own measurement where there is one."""
        e = self.costs.worker_runtimes.get((self.graph, worker))
        return self.run_s if e is None else e.value + self.costs.dispatch.value


#: A request waits for a busy worker, with a place open elsewhere, only to
#: avoid a load there or to finish sooner by more than this share of its run
#: time: estimates a few percent apart are noise, and a tenant sitting out
#: for them hands the open place to tenants behind it in fair order.
WAIT_MARGIN = 0.25


def worth_waiting(costs: RequestCosts, busy: WorkerView, open_: WorkerView) -> bool:
    """Whether a request should wait for ``busy`` rather than take a place
    on ``open_`` now: it would load or fetch less there, or finish sooner by
    more than WAIT_MARGIN of its run time."""
    on_busy, on_open = costs.terms(busy), costs.terms(open_)
    if _movement(on_busy) < _movement(on_open):
        return True
    gain = sum(on_open.values()) - sum(on_busy.values())
    return gain > WAIT_MARGIN * costs.run_s


def _movement(terms: dict[str, float]) -> float:
    """Seconds of data movement in a placement's expected completion."""
    return terms["load"] + terms["backlog_delay"] + terms["fetch"]


def completion_terms(request: GraphRequest, w: WorkerView, ctx: PlacementContext,
                     ready_in_s: float | None = None) -> dict[str, float]:
    """The parts of the expected completion time on ``w``, in seconds."""
    return RequestCosts(request, ctx, ready_in_s).terms(w)


class Policy(abc.ABC):
    name = "?"
    #: Expected-completion terms of the chosen worker and the runner-up of
    #: the last choice, if the policy computes them (for the decision log).
    last_terms: dict[str, dict[str, float]] = {}
    #: False for a policy that leaves the choice to Dask (no restriction).
    pins = True

    @abc.abstractmethod
    def choose(self, request: GraphRequest, workers: Sequence[WorkerView],
               ctx: PlacementContext) -> WorkerView:
        """The worker to run ``request`` on."""


class AffinityPolicy(Policy):
    name = "affinity"

    def choose(self, request: GraphRequest, workers: Sequence[WorkerView],
               ctx: PlacementContext) -> WorkerView:
        costs = RequestCosts(request, ctx)
        best: tuple[tuple[float, int, int, str], WorkerView] | None = None
        second: tuple[tuple[float, int, int, str], WorkerView] | None = None
        for w in workers:
            total, held = costs.score(w)
            key = (total, -held, w.queued_n, w.address)
            if best is None or key < best[0]:
                best, second = (key, w), best
            elif second is None or key < second[0]:
                second = (key, w)
        if best is None:
            raise ValueError("no candidate workers")
        # Only the winner's and the runner-up's terms are kept: a log entry
        # per candidate costs O(workers) memory per decision.
        self.last_terms = {best[1].address: costs.terms(best[1])}
        if second is not None:
            self.last_terms[second[1].address] = costs.terms(second[1])
        return best[1]


class BalancePolicy(Policy):
    """Least expected wait; ignores caches (a baseline)."""

    name = "balance"

    def choose(self, request: GraphRequest, workers: Sequence[WorkerView],
               ctx: PlacementContext) -> WorkerView:
        return min(workers, key=lambda w: (w.wait_s, w.queued_n, w.address))


class RoundRobinPolicy(Policy):
    name = "round_robin"

    def __init__(self) -> None:
        self._counter = itertools.count()

    def choose(self, request: GraphRequest, workers: Sequence[WorkerView],
               ctx: PlacementContext) -> WorkerView:
        ordered = sorted(workers, key=lambda w: w.address)
        return ordered[next(self._counter) % len(ordered)]


class StaticPolicy(Policy):
    """Each tenant always goes to the same worker (by a stable hash of the
    tenant over the sorted worker list), as with dedicated allocation."""

    name = "static"

    def choose(self, request: GraphRequest, workers: Sequence[WorkerView],
               ctx: PlacementContext) -> WorkerView:
        ordered = sorted(workers, key=lambda w: w.address)
        return ordered[zlib.crc32(request.tenant.encode()) % len(ordered)]


class DaskPolicy(Policy):
    """Dask's own placement (dependencies, occupancy, stealing) with the
    device cache and fair-share priorities still in place: the baseline that
    shows what cache-aware placement adds."""

    name = "dask"
    pins = False

    def choose(self, request: GraphRequest, workers: Sequence[WorkerView],
               ctx: PlacementContext) -> WorkerView:  # pragma: no cover - never asked
        raise RuntimeError("the dask policy does not choose workers")


def make_policy(name: str) -> Policy:
    table = {"affinity": AffinityPolicy, "balance": BalancePolicy,
             "round_robin": RoundRobinPolicy, "static": StaticPolicy, "dask": DaskPolicy}
    try:
        return table[name]()
    except KeyError:
        from ..graph.errors import KaasError

        raise KaasError(f"unknown placement policy {name!r}; expected one of "
                        f"{', '.join(POLICIES)}") from None
