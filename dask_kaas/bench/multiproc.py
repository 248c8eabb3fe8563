"""A load generator of several client processes (``dask-kaas bench --clients N``).

One Python process submitting for every tenant is the ceiling of every mode
it measures: past a few hundred requests a second the benchmark measures the
client, not the system.  Here each of N processes has its own Dask client and
drives its share of the tenants (round robin), as separate tenants really
arrive; they start measuring together and their figures are merged.

Two latencies are reported: client-side (submit to result, as the tenant
sees it) and, for KaaS modes, scheduler-side (the scheduler plugin's own
figure: the graph's arrival at the scheduler to its completion), so the
difference shows what the client and the network add.
"""

from __future__ import annotations

import multiprocessing as mp
import queue as queue_mod
from typing import Any

import numpy as np

from .driver import LoadSpec, RunResult, run_load

#: Seconds a client process may take to connect and warm up.
START_TIMEOUT_S = 120.0


def _child(address: str, mode_name: str, workload_args: tuple, tenant_ids: list[int],
           spec: LoadSpec, seed: int, ready: Any, go: Any, out: Any) -> None:
    from ..client import KaasClient
    from .modes import KaasMode, NaiveMode
    from .workloads import make_workload

    try:
        workload = make_workload(*workload_args)
        tenants = [workload.make_tenant(i) for i in tenant_ids]
        with KaasClient(address) as client:
            if mode_name == "naive":
                from .. import config

                mode: Any = NaiveMode(client, workload, config.get("resource", "GPU"))
            else:
                policy = "affinity" if mode_name == "kaas" else mode_name.split("-", 1)[1]
                mode = KaasMode(client, workload, policy, name=mode_name, manage=False)

            def barrier() -> None:
                ready.put(True)
                if not go.wait(START_TIMEOUT_S):
                    raise RuntimeError("the benchmark did not start")

            res = run_load(mode, workload, tenants, spec, seed=seed, progress=False,
                           ready=barrier)
            mode.close()
        out.put({"latencies": res.latencies, "per_tenant": res.per_tenant,
                 "errors": res.errors, "verified": res.verified,
                 "mismatches": res.mismatches, "counters": res.counters,
                 "duration_s": res.duration_s})
    except BaseException as e:  # reported to the parent, which fails the run
        ready.put(False)
        out.put({"error": f"{type(e).__name__}: {e}"})


def scheduler_latencies(client: Any, names: list[str], since: dict[str, int] | None
                        ) -> tuple[dict[str, int], list[float]]:
    """Per-tenant completed counts now, and the scheduler-side latencies
    (seconds) of the requests completed since the counts in ``since``."""
    def grab(dask_scheduler: Any, names: list[str] = names) -> dict[str, Any]:
        kaas = dask_scheduler.extensions.get("kaas")
        out = {}
        for name in names:
            t = kaas.tenants.get(name) if kaas is not None else None
            if t is not None:
                out[name] = (t.graphs_run, [float(x) for x in getattr(t, "latencies", ())])
        return out

    now = client.run_on_scheduler(grab)
    counts = {n: v[0] for n, v in now.items()}
    lat: list[float] = []
    if since is not None:
        for name, (count, samples) in now.items():
            new = count - since.get(name, 0)
            if new > 0:
                lat.extend(samples[-new:])
    return counts, lat


def run_load_processes(client: Any, mode: Any, mode_name: str, workload_args: tuple,
                       tenants: list[Any], spec: LoadSpec, processes: int,
                       seed: int = 0) -> RunResult:
    """Drive ``mode_name`` from ``processes`` client processes; ``mode`` (in
    this process) prepares the cluster and reads its counters."""
    ctx = mp.get_context("spawn")
    ready, out, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    groups = [list(range(len(tenants)))[i::processes] for i in range(processes)]
    groups = [g for g in groups if g]
    mode.prepare(tenants)
    address = client.scheduler.address
    procs = [ctx.Process(target=_child, args=(address, mode_name, workload_args, g, spec,
                                              seed + i, ready, go, out), daemon=True)
             for i, g in enumerate(groups)]
    for p in procs:
        p.start()
    result = RunResult(mode_name, len(tenants), spec.duration)
    try:
        oks = [ready.get(timeout=START_TIMEOUT_S) for _ in procs]
        if not all(oks):
            raise RuntimeError("a load generator process failed to start")
        names = [t.name for t in tenants]
        before = mode.counters()
        counts, _ = scheduler_latencies(client, names, None)
        go.set()
        parts = [out.get(timeout=spec.duration + START_TIMEOUT_S) for _ in procs]
    except queue_mod.Empty:
        raise RuntimeError("a load generator process did not answer") from None
    finally:
        go.set()
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    failed = [p["error"] for p in parts if "error" in p]
    if failed:
        raise RuntimeError(f"load generator process failed: {failed[0]}")
    after = mode.counters()
    _, sched = scheduler_latencies(client, names, counts)
    for part in parts:
        result.latencies.extend(part["latencies"])
        for name, n in part["per_tenant"].items():
            result.per_tenant[name] = result.per_tenant.get(name, 0) + n
        result.errors += part["errors"]
        result.verified += part["verified"]
        result.mismatches += part["mismatches"]
    result.duration_s = max(p["duration_s"] for p in parts)
    if mode_name == "naive":  # its counters live in the processes that submit
        for part in parts:
            for k, v in part["counters"].items():
                result.counters[k] = result.counters.get(k, 0.0) + v
    else:
        result.counters = {k: after[k] - before.get(k, 0.0) for k in after}
    result.scheduler_latencies = sched
    return result


def scheduler_summary(latencies: list[float]) -> dict[str, float | None]:
    if not latencies:
        return {"scheduler_p50_ms": None, "scheduler_p99_ms": None}
    lat = np.array(latencies) * 1000
    return {"scheduler_p50_ms": float(np.percentile(lat, 50)),
            "scheduler_p99_ms": float(np.percentile(lat, 99))}
