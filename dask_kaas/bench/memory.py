"""Scheduler memory under many tenants: does it come back once they are idle?

``python -m dask_kaas.bench.memory`` sends ``--requests`` requests from
``--tenants`` tenants (spread over ``--graphs`` graph names) through a local
CPU-backend cluster, lets every tenant go idle past a short
``kaas.tenant-idle-expiry``, and prints the scheduler process's memory at the
start, after the load and after the expiry: Python allocations traced since
the start (tracemalloc) and the resident set size, and the plugin's table
sizes.  The scheduler runs in this process (LocalCluster), the workers in
their own.

Python memory is reported twice: allocated by dask_kaas's scheduler-side code
(the plugin and the dashboard) and by the whole process.  The second includes
Dask's own message logs: every comm keeps its last
``distributed.admin.low-level-log-length`` (1000) batches of messages, request
payloads included, on the client and on the scheduler (``--log-length``
changes it for the run).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import time
import tracemalloc
from typing import Any

import dask
import numpy as np
import psutil

MiB = 2**20


def _trim() -> None:
    """Return freed heap to the OS where glibc allows, so RSS means something."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _graph(name: str) -> Any:
    from .. import Kernel, KernelGraph, Out

    g = KernelGraph(name)
    x = g.input("x", (8,), np.float32)
    y = g.output("y", (8,), np.float32)
    g.launch(Kernel.library("copy"), [x, Out(y)])
    return g


def _plugin_sizes(client: Any) -> dict[str, int]:
    return client.run_on_scheduler(
        lambda dask_scheduler: dask_scheduler.extensions["kaas"].book.sizes())


def measure(requests: int = 20_000, tenants: int = 1_000, graphs: int = 100,
            expiry_s: float = 3.0, batch: int = 20, trace: bool = True, top: int = 0,
            log_length: int | None = None) -> dict[str, Any]:
    from ..client import KaasClient
    from ..cluster import LocalKaasCluster

    proc = psutil.Process()
    # Nothing expires during the load (it is measured whole); afterwards
    # (the plugin reads the keys at every sweep) everything idle may.
    during = {"kaas.tenant-idle-expiry": "1 hour", "kaas.graph-cost-expiry": "1 hour",
              "kaas.expiry-interval": f"{max(expiry_s / 4, 0.25)}s"}
    after = {"kaas.tenant-idle-expiry": f"{expiry_s}s", "kaas.graph-cost-expiry": f"{expiry_s}s"}
    if log_length is not None:
        during["distributed.admin.low-level-log-length"] = log_length
    with dask.config.set(during), \
            LocalKaasCluster(2, backend="cpu", dashboard_address=None) as cluster, \
            KaasClient(cluster) as client:
        x = np.arange(8, dtype=np.float32)
        # Warm up: every code path once, so imports and caches are in the baseline.
        client.submit_kernel_graph(_graph("warm"), {"x": x}, tenant="warm").result()
        time.sleep(expiry_s * 1.5)
        _trim()
        if trace:
            tracemalloc.start()
            base = tracemalloc.take_snapshot()
        rss0 = proc.memory_info().rss
        sizes0 = _plugin_sizes(client)
        t0 = time.perf_counter()
        done = 0
        outstanding: list[Any] = []
        for i in range(requests // batch):
            tenant = f"tenant-{i % tenants:05d}"
            outstanding += client.map_kernel_graph(_graph(f"graph-{i % graphs:04d}"),
                                                   [{"x": x}] * batch, tenant=tenant)
            if len(outstanding) >= 2000:
                for out in client.gather(outstanding):
                    assert np.array_equal(out["y"], x)
                done += len(outstanding)
                outstanding = []
        for out in client.gather(outstanding):
            assert np.array_equal(out["y"], x)
        done += len(outstanding)
        del outstanding
        elapsed = time.perf_counter() - t0
        stats = client.kaas_stats()["tenants"]
        seen = len(stats)
        run = sum(t["graphs_run"] for t in stats.values())
        del stats
        _trim()
        loaded = (tracemalloc.get_traced_memory()[0] if trace else 0, proc.memory_info().rss)
        sizes_loaded = _plugin_sizes(client)
        with dask.config.set(after):
            time.sleep(expiry_s * 2 + 1)
            _trim()
            idle = (tracemalloc.get_traced_memory()[0] if trace else 0, proc.memory_info().rss)
            sizes_idle = _plugin_sizes(client)
        sites = []
        plugin_mib = None
        if trace:
            snap = tracemalloc.take_snapshot()
            tracemalloc.stop()
            sites = [f"{st.size / MiB:8.2f} MiB {st.traceback}"
                     for st in snap.statistics("lineno")[:top]]
            ours = [tracemalloc.Filter(True, "*/dask_kaas/plugin/*"),
                    tracemalloc.Filter(True, "*/dask_kaas/dashboard/*")]
            plugin_mib = round(sum(d.size_diff for d in snap.filter_traces(ours).compare_to(
                base.filter_traces(ours), "filename")) / MiB, 3)
    return {
        "requests": done, "graphs_run": run, "tenants": tenants, "tenants_seen": seen,
        "graph_names": graphs, "seconds": round(elapsed, 1),
        "traced_mib": {"start": 0.0, "loaded": round(loaded[0] / MiB, 2),
                       "idle": round(idle[0] / MiB, 2)} if trace else None,
        "plugin_code_mib_idle": plugin_mib,
        "rss_mib": {"start": round(rss0 / MiB, 1), "loaded": round(loaded[1] / MiB, 1),
                    "idle": round(idle[1] / MiB, 1)},
        "plugin_tables": {"start": sizes0, "loaded": sizes_loaded, "idle": sizes_idle},
        "top_sites": sites,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=20_000)
    p.add_argument("--tenants", type=int, default=1_000)
    p.add_argument("--graphs", type=int, default=100, help="distinct graph names")
    p.add_argument("--expiry", type=float, default=3.0, help="kaas.tenant-idle-expiry, s")
    p.add_argument("--no-trace", action="store_true", help="RSS only (faster)")
    p.add_argument("--top", type=int, default=0, help="print the N largest allocation sites")
    p.add_argument("--log-length", type=int, default=None,
                   help="distributed.admin.low-level-log-length for the run")
    p.add_argument("--json", default=None, help="write the figures here")
    args = p.parse_args(argv)
    res = measure(args.requests, args.tenants, args.graphs, args.expiry,
                  trace=not args.no_trace, top=args.top, log_length=args.log_length)
    print(f"{res['requests']} requests ({res['graphs_run']} run) from {res['tenants']} "
          f"tenants over {res['graph_names']} graph names in {res['seconds']} s")
    if res["traced_mib"]:
        t = res["traced_mib"]
        print(f"Python memory allocated since start and still held (tracemalloc): "
              f"after load {t['loaded']:.2f} MiB, after expiry {t['idle']:.2f} MiB; of it "
              f"allocated by dask_kaas scheduler-side code: {res['plugin_code_mib_idle']} MiB")
    r = res["rss_mib"]
    print(f"scheduler+client process RSS: start {r['start']:.1f} MiB, after load "
          f"{r['loaded']:.1f} MiB, after expiry {r['idle']:.1f} MiB "
          f"({r['idle'] - r['start']:+.1f} MiB)")
    for when in ("loaded", "idle"):
        print(f"plugin tables {when}: {res['plugin_tables'][when]}")
    for line in res["top_sites"]:
        print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
