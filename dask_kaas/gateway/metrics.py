"""Prometheus metrics of one gateway, on its own ``/metrics``.

They live in a registry of their own, not prometheus_client's global one:
the scheduler's ``dask_kaas_*`` metrics use the global registry, and a
gateway started in the same process as a scheduler (tests, demos) must not
collide with them or export them twice.  Label values are bounded: tenants
come from the tenants file, and the model label is a model the tenant has
registered (``-`` for anything else, so hostile URLs cannot grow the series),
and a model's series go when the model is deleted.
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
        #: (tenant, model) -> statuses seen: the label sets to drop with a model
        self._series: dict[tuple[str, str], set[str]] = {}

    def observe(self, tenant: str, model: str, status: int) -> None:
        self.requests.labels(tenant, model, str(status)).inc()
        self._series.setdefault((tenant, model), set()).add(str(status))

    def observe_latency(self, tenant: str, model: str, seconds: float) -> None:
        self.latency.labels(tenant, model).observe(seconds)
        self._series.setdefault((tenant, model), set())

    def forget_model(self, tenant: str, model: str) -> None:
        """Drop a deleted model's series, so that registering and deleting
        models under ever new names cannot grow the metrics without bound."""
        for status in self._series.pop((tenant, model), ()):
            self.requests.remove(tenant, model, status)
        try:
            self.latency.remove(tenant, model)
        except KeyError:
            pass

    def forget_tenant(self, tenant: str) -> None:
        for t, m in [k for k in self._series if k[0] == tenant]:
            self.forget_model(t, m)

    def render(self) -> bytes:
        return generate_latest(self.registry)
