"""Prometheus metrics of one gateway, on its own ``/metrics``.

They live in a registry of their own, not prometheus_client's global one:
the scheduler's ``dask_kaas_*`` metrics use the global registry, and a
gateway started in the same process as a scheduler (tests, demos) must not
collide with them or export them twice.  Label values are bounded: tenants
come from the tenants file, and the model label is a model the tenant has
registered (``-`` for anything else, so hostile URLs cannot grow the series).

``dask_kaas_gateway_requests_total`` counts every HTTP request the gateway
received exactly once, by how it ended: the status it was answered with,
499 for a caller that went away first (nginx's convention), and 400 for a
message too malformed to reach a handler (Tornado answers those itself).
When a model is deleted (or a tenant leaves the tenants file) its series go,
but its counts move to the ``model="-"`` series of its tenant (``tenant="-"``
for a tenant that left): the totals never go down, so a sum over the series
is the number of requests served, whatever was deleted since.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from ..plugin.stats import LATENCY_BUCKETS

#: Status of a request whose caller went away before its answer.
CLIENT_CLOSED = 499
OTHER = "-"

Labels = tuple[str, str, str]  # tenant, model, status


class RequestCounts(Collector):
    """Requests by (tenant, model, status): exact counts that can be folded
    into another series when a model or tenant is forgotten."""

    def __init__(self) -> None:
        self.counts: dict[Labels, int] = {}

    def inc(self, tenant: str, model: str, status: int) -> None:
        key = (tenant, model, str(status))
        self.counts[key] = self.counts.get(key, 0) + 1

    def fold(self, tenant: str, model: str | None, into: tuple[str, str]) -> None:
        """Move the counts of ``tenant`` (its ``model`` only, if given) to
        the series ``into`` = (tenant, model), status by status."""
        for key in [k for k in self.counts
                    if k[0] == tenant and (model is None or k[1] == model)]:
            n = self.counts.pop(key)
            target = (*into, key[2])
            self.counts[target] = self.counts.get(target, 0) + n

    def total(self) -> int:
        return sum(self.counts.values())

    def collect(self) -> Iterator[CounterMetricFamily]:
        fam = CounterMetricFamily("dask_kaas_gateway_requests",
                                  "HTTP requests by tenant, model and status",
                                  labels=["tenant", "model", "status"])
        for labels, n in sorted(self.counts.items()):
            fam.add_metric(list(labels), n)
        yield fam


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = RequestCounts()
        self.registry.register(self.requests)
        self.latency = Histogram(
            "dask_kaas_gateway_latency_seconds", "Inference latency seen by the gateway",
            ["tenant", "model"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.in_flight = Gauge(
            "dask_kaas_gateway_in_flight", "Inference requests in flight by tenant",
            ["tenant"], registry=self.registry)
        #: (tenant, model) with a latency series: the label sets to drop with a model
        self._latency_series: set[tuple[str, str]] = set()

    def observe(self, tenant: str, model: str, status: int) -> None:
        self.requests.inc(tenant, model, status)

    def observe_latency(self, tenant: str, model: str, seconds: float) -> None:
        self.latency.labels(tenant, model).observe(seconds)
        self._latency_series.add((tenant, model))

    def forget_model(self, tenant: str, model: str) -> None:
        """Drop a deleted model's series, so that registering and deleting
        models under ever new names cannot grow the metrics without bound
        (its request counts move to the tenant's ``-`` series)."""
        self.requests.fold(tenant, model, (tenant, OTHER))
        if (tenant, model) in self._latency_series:
            self._latency_series.discard((tenant, model))
            self.latency.remove(tenant, model)

    def forget_tenant(self, tenant: str) -> None:
        for t, m in [k for k in self._latency_series if k[0] == tenant]:
            self.forget_model(t, m)
        self.requests.fold(tenant, None, (OTHER, OTHER))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MalformedMessages(logging.Filter):
    """Counts the HTTP messages Tornado answers 400 itself, before any
    handler sees them (a garbled request line or header, a broken chunked
    body), which it only logs: as ``tenant="-", model="-", status="400"``.

    A malformed body of a request a handler had already taken is counted
    by that handler (see ``BodyHandler.on_connection_close``), which asks
    :meth:`claim` while Tornado closes the connection, right after the log
    line; whatever is not claimed by the next turn of the loop is counted
    here.  Tornado's message and its first argument (the connection's
    context) are what identify the connection.
    """

    PREFIX = "Malformed HTTP message"

    LOGGER = "tornado.general"

    def __init__(self, metrics: GatewayMetrics) -> None:
        super().__init__()
        self.metrics = metrics
        self._pending: dict[int, object] = {}
        self._shown = logging.NOTSET
        self._level = logging.NOTSET

    def attach(self) -> None:
        """Hear Tornado's INFO records (the malformed-message one is INFO)
        without showing any record that was not shown before."""
        logger = logging.getLogger(self.LOGGER)
        self._level, self._shown = logger.level, logger.getEffectiveLevel()
        if self._shown > logging.INFO:
            logger.setLevel(logging.INFO)
        logger.addFilter(self)

    def detach(self) -> None:
        logger = logging.getLogger(self.LOGGER)
        logger.removeFilter(self)
        if logger.level == logging.INFO and self._shown > logging.INFO:
            logger.setLevel(self._level)

    def filter(self, record: logging.LogRecord) -> bool:
        shown = record.levelno >= self._shown
        if isinstance(record.msg, str) and record.msg.startswith(self.PREFIX) and record.args:
            context = record.args[0] if isinstance(record.args, tuple) else None
            key = id(context)
            self._pending[key] = context  # held: its id stays unique until counted
            try:
                asyncio.get_running_loop().call_soon(self._count, key)
            except RuntimeError:
                self._count(key)
        return shown

    def claim(self, context: object) -> bool:
        """True (once) if Tornado just refused a message on ``context``."""
        return self._pending.pop(id(context), None) is not None

    def _count(self, key: int) -> None:
        if self._pending.pop(key, None) is not None:
            self.metrics.observe(OTHER, OTHER, 400)
