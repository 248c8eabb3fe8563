"""Prometheus metrics of one gateway, on its own ``/metrics``.

They live in a registry of their own, not prometheus_client's global one:
the scheduler's ``dask_kaas_*`` metrics use the global registry, and a
gateway started in the same process as a scheduler (tests, demos) must not
collide with them or export them twice.  Label values are bounded: tenants
come from the tenants file, and the model label is a model the tenant has
registered (``-`` for anything else, so hostile URLs cannot grow the series).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from ..plugin.stats import LATENCY_BUCKETS


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "dask_kaas_gateway_requests", "HTTP requests by tenant, model and status",
            ["tenant", "model", "status"], registry=self.registry)
        self.latency = Histogram(
            "dask_kaas_gateway_latency_seconds", "Inference latency seen by the gateway",
            ["tenant", "model"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.in_flight = Gauge(
            "dask_kaas_gateway_in_flight", "Inference requests in flight by tenant",
            ["tenant"], registry=self.registry)

    def observe(self, tenant: str, model: str, status: int, seconds: float | None) -> None:
        self.requests.labels(tenant, model, str(status)).inc()
        if seconds is not None and status == 200:
            self.latency.labels(tenant, model).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
