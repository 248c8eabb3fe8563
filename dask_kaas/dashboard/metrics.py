"""Prometheus metrics on the scheduler's ``/metrics``, named ``dask_kaas_*``.

One collector is registered with prometheus_client's registry while any
KaaS scheduler plugin lives in the process, and removed with the last one.
Like distributed's own collectors it reports on the scheduler whose
``/metrics`` is being served, so several schedulers in one process (tests,
notebooks) do not clash.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client.core import (
    REGISTRY,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)

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
        for name, t in plugin.tenants.items():
            reqs.add_metric([name], float(t.graphs_run))
            errs.add_metric([name], float(t.errors))
            tbytes.add_metric([name], float(t.bytes_to_device))
            buckets, total = t.histogram()
            hist.add_metric([name], buckets=buckets, sum_value=total)
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
