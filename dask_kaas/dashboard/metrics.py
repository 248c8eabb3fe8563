"""Prometheus metrics on the scheduler's ``/metrics``, named ``dask_kaas_*``.

One collector is registered with prometheus_client's registry while any
KaaS scheduler plugin lives in the process, and removed with the last one.
Like distributed's own collectors it reports on the scheduler whose
``/metrics`` is being served, so several schedulers in one process (tests,
notebooks) do not clash.

Tenant names come from clients, so the per-tenant series are bounded: the
``kaas.metrics-max-tenants`` tenants with the most requests are reported by
name and the rest summed under ``other``; a name is cut to
``kaas.metrics-label-length`` characters (plus a hash, so long names that share
a prefix stay apart) and made valid UTF-8.
"""

from __future__ import annotations

import hashlib
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from prometheus_client.core import (
    REGISTRY,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)

from .. import config
from ..plugin.stats import LATENCY_BUCKETS, TenantStats

if TYPE_CHECKING:
    from ..plugin.scheduler import KaasSchedulerPlugin

_plugins: weakref.WeakSet[KaasSchedulerPlugin] = weakref.WeakSet()
_collector: KaasCollector | None = None


def _served_plugin() -> KaasSchedulerPlugin | None:
    """The plugin of the scheduler whose /metrics is being answered."""
    try:
        from distributed.http.scheduler.prometheus.core import PrometheusHandler

        collectors = PrometheusHandler._collectors or ()
        server = collectors[0].server if collectors else None
    except Exception:  # noqa: BLE001 - distributed's internals moved: fall back
        server = None
    plugin = server.extensions.get("kaas") if server is not None else None
    if plugin is not None and plugin in _plugins:
        return plugin
    live = list(_plugins)
    return live[-1] if live else None


#: Label of the tenants summed together beyond the cap.
OTHER = "other"


def label_value(name: Any, length: int) -> str:
    """A bounded, UTF-8-safe Prometheus label value for a tenant name."""
    text = name if isinstance(name, str) else repr(name)
    raw = text.encode("utf-8", "surrogatepass")
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    if len(text) <= length:
        return text
    digest = hashlib.blake2b(raw, digest_size=4).hexdigest()
    return text[:max(length - len(digest) - 1, 1)] + "~" + digest


@dataclass
class TenantSeries:
    """One tenant's (or the summed rest's) figures as /metrics reports them."""

    graphs_run: float = 0.0
    errors: float = 0.0
    bytes_to_device: float = 0.0
    bucket_counts: list[int] = field(default_factory=lambda: [0] * len(LATENCY_BUCKETS))
    latency_sum: float = 0.0

    def add(self, t: TenantStats) -> None:
        self.graphs_run += t.graphs_run
        self.errors += t.errors
        self.bytes_to_device += t.bytes_to_device
        self.bucket_counts = [a + b for a, b in zip(self.bucket_counts, t.bucket_counts)]
        self.latency_sum += t.latency_sum

    def histogram(self) -> list[tuple[str, float]]:
        out, running = [], 0
        for bound, n in zip(LATENCY_BUCKETS, self.bucket_counts):
            running += n
            out.append((repr(bound), float(running)))
        out.append(("+Inf", float(self.graphs_run)))
        return out


def tenant_series(tenants: Mapping[Any, TenantStats], limit: int, length: int
                  ) -> dict[str, TenantSeries]:
    """The busiest ``limit`` tenants by label, the rest under :data:`OTHER`."""
    ranked = sorted(tenants.items(), key=lambda kv: (-kv[1].submitted, label_value(kv[0], 10**6)))
    out: dict[str, TenantSeries] = {}
    named = 0
    for name, t in ranked:
        label = label_value(name, length)
        if label != OTHER and named < limit:
            named += 1
        else:  # (a tenant really called "other" is summed with the rest)
            label = OTHER
        out.setdefault(label, TenantSeries()).add(t)
    return out


class KaasCollector:
    def collect(self) -> Iterator[Any]:
        plugin = _served_plugin()
        if plugin is None:
            return
        stats = plugin.stats()
        gauges = {
            "device_used_bytes": ("used_bytes", "Device memory held by the KaaS cache"),
            "device_capacity_bytes": ("capacity_bytes", "Device memory the cache may use"),
            "device_const_bytes": ("const_bytes", "Device memory holding const buffers"),
            "graphs_running": ("running", "Graphs running on the worker now"),
        }
        counters = {
            "cache_hits": ("hits", "Cacheable buffers found on the device"),
            "cache_misses": ("misses", "Cacheable buffers copied to the device"),
            "cache_evictions": ("evictions", "Buffers evicted from the device"),
            "bytes_to_device": ("bytes_to_device", "Bytes copied host to device"),
            "worker_graphs": ("graphs_run", "Graphs run by the worker"),
        }
        for name, (key, doc) in gauges.items():
            g = GaugeMetricFamily(f"dask_kaas_{name}", doc, labels=["worker"])
            for addr, ws in stats["workers"].items():
                g.add_metric([addr], float(ws.get(key, 0) or 0))
            yield g
        for name, (key, doc) in counters.items():
            c = CounterMetricFamily(f"dask_kaas_{name}", doc, labels=["worker"])
            for addr, ws in stats["workers"].items():
                c.add_metric([addr], float(ws.get(key, 0) or 0))
            yield c
        reqs = CounterMetricFamily("dask_kaas_requests", "Graphs run, per tenant",
                                   labels=["tenant"])
        errs = CounterMetricFamily("dask_kaas_request_errors", "Graphs failed, per tenant",
                                   labels=["tenant"])
        tbytes = CounterMetricFamily("dask_kaas_tenant_bytes_to_device",
                                     "Bytes copied to devices for the tenant",
                                     labels=["tenant"])
        hist = HistogramMetricFamily("dask_kaas_request_latency_seconds",
                                     "Submission to completion, per tenant",
                                     labels=["tenant"])
        series = tenant_series(plugin.tenants, int(config.get("metrics-max-tenants", 100)),
                               int(config.get("metrics-label-length", 64)))
        for label, t in series.items():
            reqs.add_metric([label], t.graphs_run)
            errs.add_metric([label], t.errors)
            tbytes.add_metric([label], t.bytes_to_device)
            hist.add_metric([label], buckets=t.histogram(), sum_value=t.latency_sum)
        yield reqs
        yield errs
        yield tbytes
        yield hist


def register(plugin: KaasSchedulerPlugin) -> None:
    global _collector
    _plugins.add(plugin)
    if _collector is None:
        _collector = KaasCollector()
        REGISTRY.register(_collector)


def unregister(plugin: KaasSchedulerPlugin) -> None:
    global _collector
    _plugins.discard(plugin)
    if not _plugins and _collector is not None:
        REGISTRY.unregister(_collector)
        _collector = None
