"""``dask-kaas bench --scenario latency-profile``: where one request's time goes.

One request at a time (no load) through a real cluster, three ways, in
alternating windows so that the noise of a shared machine hits each alike:

- ``kaas``: ``client.submit_kernel_graph`` of the MLP graph
  (dask_kaas/workloads/mlp.py), weights as consts;
- ``plain``: ``client.submit`` of the same NumPy work on the same cluster,
  weights scattered once (the Dask floor);
- ``direct``: the same NumPy function called in this process (the kernel's
  own floor).

Then a traced window of each cluster path gives the request's life stage by
stage.  Wall times come from timestamps that Dask keeps anyway (the
scheduler's ``transition_log``, the worker's state-machine ``log``) plus
stamps taken by thin wrappers around Dask's handlers, which this scenario
installs for the traced window only (on the scheduler through
``run_on_scheduler``, on the workers through ``client.run``) and removes
after.  CPU comes from ``time.thread_time`` inside those wrappers (the
event loop runs one handler at a time, so a handler's thread CPU is its
own) and from each process's ``time.process_time`` over the window; what no
wrapper covers (comms, (de)serialisation on the loop, the loop itself) is
reported as "other".  All processes share one host, so their wall clocks
agree.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from .control_settings import DEFAULT_VARIANT, VARIANTS, Variant, apply_variant, process_cpu
from .latency_probes import (
    _ClientProbe,
    _scheduler_collect,
    _scheduler_install,
    _worker_collect,
    _worker_install,
)


def _first(log: list[tuple[str, str, float]], finish: str, start: str | None = None
           ) -> float | None:
    for s0, s1, t in log:
        if s1 == finish and (start is None or s0 == start):
            return t
    return None


def _ms(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else (b - a) * 1000.0


#: Wall-time stages of a request's life, in order: (name, from, to).
STAGES = [
    ("client: submit call", "call", "submitted"),
    ("client -> scheduler (send, receive)", "submitted", "sched_recv"),
    ("scheduler: update_graph to first transition", "sched_recv", "waiting"),
    ("scheduler: hold until release", "waiting", "processing"),
    ("scheduler -> worker (compute-task)", "processing", "worker_recv"),
    ("worker: queue until executing", "worker_recv", "executing"),
    ("worker: execute", "executing", "executed"),
    ("worker -> scheduler (task-finished)", "executed", "sched_memory"),
    ("scheduler -> client (key-in-memory)", "sched_memory", "client_memory"),
    ("client: gather (result)", "client_memory", "done"),
]


def _timeline(key: str, client_t: dict[str, float], sched: dict[str, Any],
              workers: list[dict[str, Any]], probe: _ClientProbe) -> dict[str, float | None]:
    slog = sched["log"].get(key, [])
    ug = sched["stamps"].get("update_graph", {})
    t: dict[str, float | None] = dict(client_t)
    t["sched_recv"] = ug.get(key)
    t["waiting"] = _first(slog, "waiting")
    t["processing"] = _first(slog, "processing")
    t["sched_memory"] = _first(slog, "memory", "processing")
    t["client_memory"] = probe.in_memory.get(key)
    for w in workers:
        wlog = w["log"].get(key)
        if wlog:
            recv = w["stamps"].get("compute-task", {}).get(key)
            t["worker_recv"] = recv if recv is not None else _first(wlog, "waiting")
            t["executing"] = _first(wlog, "executing")
            t["executed"] = _first(wlog, "memory", "executing")
    return t


def _traced(client: Any, submit: Callable[[], Any], n: int, get: Callable[[Any], Any]
            ) -> dict[str, Any]:
    """``n`` requests one at a time with every probe in place."""
    probe = _ClientProbe(client)
    client.run_on_scheduler(_scheduler_install)
    client.run(_worker_install)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    times: list[tuple[str, dict[str, float]]] = []
    client_cpu = {"submit": 0.0, "result": 0.0}
    try:
        for _ in range(n):
            t_call = time.time()
            c0 = time.thread_time()
            fut = submit()
            c1 = time.thread_time()
            t_sub = time.time()
            get(fut.result())
            client_cpu["submit"] += c1 - c0
            client_cpu["result"] += time.thread_time() - c1
            times.append((fut.key, {"call": t_call, "submitted": t_sub, "done": time.time()}))
            del fut
    finally:
        probe.close()
    wall = time.perf_counter() - wall0
    client_proc_cpu = time.process_time() - cpu0
    keys = [k for k, _ in times]
    sched = client.run_on_scheduler(_scheduler_collect, keys=keys)
    workers = list(client.run(_worker_collect, keys=keys).values())
    lines = [_timeline(k, ct, sched, workers, probe) for k, ct in times]
    stages = {}
    for name, a, b in STAGES:
        vals = [v for v in (_ms(ln.get(a), ln.get(b)) for ln in lines) if v is not None]
        stages[name] = statistics.median(vals) if vals else None
    total = statistics.median([(ln["done"] - ln["call"]) * 1000 for ln in lines])
    if _shared_process(client):  # LocalCluster: the scheduler runs in this process
        cpu = {"client + scheduler (one process)": client_proc_cpu / n * 1000}
    else:
        cpu = {"client (process)": client_proc_cpu / n * 1000,
               "scheduler (process)": sched["cpu"] / n * 1000}
    cpu.update({"client: submit call (thread)": client_cpu["submit"] / n * 1000,
                "client: result() (thread)": client_cpu["result"] / n * 1000,
                "workers (processes)": sum(w["cpu"] for w in workers) / n * 1000})
    handlers: dict[str, dict[str, float]] = {}
    for where, accs in (("scheduler", [sched["acc"]]), ("worker", [w["acc"] for w in workers])):
        for acc in accs:
            for name, (calls, w_s, c_s) in acc.items():
                h = handlers.setdefault(f"{where}: {name}", {"calls": 0, "wall_ms": 0.0,
                                                             "cpu_ms": 0.0})
                h["calls"] += calls / n
                h["wall_ms"] += w_s / n * 1000
                h["cpu_ms"] += c_s / n * 1000
    return {"n": n, "total_p50_ms": total, "stages_p50_ms": stages, "cpu_ms": cpu,
            "handlers": handlers, "wall_s": wall}


def _shared_process(client: Any) -> bool:
    import os

    return client.run_on_scheduler(os.getpid) == os.getpid()


# -- the run -------------------------------------------------------------------------
def _paths(client: Any, batch: int, weights_mib: float) -> tuple[dict[str, Any], Any]:
    from .modes import scatter_named
    from .workloads import make_workload, mlp_host, run_host

    wl = make_workload("mlp", weights_mib, batch=batch)
    tenant = wl.make_tenant(0)
    rng = np.random.default_rng(11)
    xs = [wl.make_request(rng)["x"] for _ in range(8)]
    weights = scatter_named(client, tenant.consts, broadcast=True)
    state = {"i": 0}

    def x() -> np.ndarray:
        state["i"] += 1
        return xs[state["i"] % len(xs)]

    def kaas() -> Any:
        return client.submit_kernel_graph(wl.graph, {**tenant.consts, "x": x()},
                                          tenant="profile")

    def plain() -> Any:
        return client.submit(run_host, mlp_host, False, **weights, x=x(), pure=False)

    def direct() -> Any:
        return _Done(mlp_host(**tenant.consts, x=x()))

    ref = mlp_host(**tenant.consts, x=xs[0])["y"]
    return {"kaas": kaas, "plain": plain, "direct": direct}, (wl, tenant, xs, ref, weights)


class _Done:
    """A finished "future" for the in-process path."""

    key = None

    def __init__(self, value: Any) -> None:
        self.value = value

    def result(self) -> Any:
        return self.value


def _out(result: Any) -> np.ndarray:
    return result["y"]


def measure_batch(client: Any, batch: int, weights_mib: float = 8.0, rounds: int = 6,
                  per_window: int = 15, traced: int = 40) -> dict[str, Any]:
    """Alternating windows of the three paths (medians and ratios), then
    ``traced`` requests of each cluster path with the probes in place.

    The in-process path runs on one BLAS thread, like a worker (Dask's
    nanny starts them with ``OMP_NUM_THREADS=1``): on a loaded machine a
    multi-threaded BLAS here waits for its threads, 100x slower at batch 1."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # the direct path then uses the process's BLAS threads
        return _measure_batch(client, batch, weights_mib, rounds, per_window, traced)
    with threadpool_limits(1):
        return _measure_batch(client, batch, weights_mib, rounds, per_window, traced)


def _measure_batch(client: Any, batch: int, weights_mib: float, rounds: int,
                   per_window: int, traced: int) -> dict[str, Any]:
    from .workloads import mlp_host, run_host

    paths, (wl, tenant, xs, ref, weights) = _paths(client, batch, weights_mib)
    # Warm every path and check each against the reference.
    for submit in paths.values():
        for _ in range(3):
            submit().result()
    got = {"kaas": client.submit_kernel_graph(wl.graph, {**tenant.consts, "x": xs[0]},
                                              tenant="profile").result()["y"],
           "plain": client.submit(run_host, mlp_host, False, **weights, x=xs[0],
                                  pure=False).result()["y"]}
    for name, y in got.items():
        np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4, err_msg=name)
    samples: dict[str, list[float]] = {n: [] for n in paths}
    cpu: dict[str, float] = {n: 0.0 for n in paths}
    for r in range(rounds):
        order = list(paths) if r % 2 == 0 else list(reversed(paths))
        for name in order:
            c0 = time.process_time()
            for _ in range(per_window):
                t0 = time.perf_counter()
                _out(paths[name]().result())
                samples[name].append(time.perf_counter() - t0)
            cpu[name] += time.process_time() - c0
    p50 = {n: statistics.median(v) * 1000 for n, v in samples.items()}
    out: dict[str, Any] = {
        "batch": batch, "graph": wl.graph.name, "samples_per_path": len(samples["kaas"]),
        "p50_ms": p50,
        "p90_ms": {n: float(np.percentile(v, 90) * 1000) for n, v in samples.items()},
        "client_cpu_ms": {n: c / len(samples[n]) * 1000 for n, c in cpu.items()},
        "ratio_kaas_plain": p50["kaas"] / p50["plain"],
        "ratio_kaas_direct": p50["kaas"] / p50["direct"],
        "ratio_plain_direct": p50["plain"] / p50["direct"],
    }
    if traced:
        out["traced"] = {n: _traced(client, paths[n], traced, _out) for n in ("kaas", "plain")}
    return out


def run_profile(batches: tuple[int, ...] = (1, 32), workers: int = 2, weights_mib: float = 8.0,
                rounds: int = 6, per_window: int = 15, traced: int = 40,
                client: Any = None, ab_rounds: int = 4) -> dict[str, Any]:
    """The whole scenario (on ``client``'s cluster, or a fresh local one
    with ``workers`` CPU-backend workers of one BLAS thread each)."""
    if client is not None:
        doc: dict[str, Any] = {"batches": [], "ab": []}
        for b in batches:
            doc["batches"].append(measure_batch(client, b, weights_mib, rounds, per_window,
                                                traced))
            if ab_rounds:
                doc["ab"].append(ab(client, b, rounds=ab_rounds, per_window=per_window,
                                    weights_mib=weights_mib))
        return doc
    from ..client import KaasClient
    from ..cluster import LocalKaasCluster

    with LocalKaasCluster(workers, dashboard_address=None) as cluster, \
            KaasClient(cluster) as c:
        return run_profile(batches, workers, weights_mib, rounds, per_window, traced, c,
                           ab_rounds)


# -- A/B of the control-plane settings ------------------------------------------------
def ab(client: Any, batch: int, variants: dict[str, Variant] | None = None,
       rounds: int = 6, per_window: int = 15, weights_mib: float = 8.0) -> dict[str, Any]:
    """Each variant's kaas and plain p50 and CPU per request per process,
    variants in alternating windows of one run (settings switched live)."""
    variants = variants or VARIANTS
    paths, _ = _paths(client, batch, weights_mib)
    shared = _shared_process(client)
    for _ in range(3):
        paths["kaas"]().result()
        paths["plain"]().result()
    lat: dict[str, dict[str, list[float]]] = {v: {"kaas": [], "plain": []} for v in variants}
    cpu: dict[str, dict[str, list[float]]] = {
        v: {p: [0.0, 0.0, 0.0] for p in ("kaas", "plain")} for v in variants}
    try:
        for r in range(rounds):
            names = list(variants) if r % 2 == 0 else list(reversed(variants))
            for v in names:
                apply_variant(client, variants[v])
                for p in ("kaas", "plain") if r % 2 == 0 else ("plain", "kaas"):
                    c0 = process_cpu(client, shared)
                    for _ in range(per_window):
                        t0 = time.perf_counter()
                        _out(paths[p]().result())
                        lat[v][p].append(time.perf_counter() - t0)
                    c1 = process_cpu(client, shared)
                    for i in range(3):
                        cpu[v][p][i] += c1[i] - c0[i]
    finally:
        apply_variant(client, VARIANTS[DEFAULT_VARIANT])
    out: dict[str, Any] = {"batch": batch, "per_variant": rounds * per_window,
                           "scheduler_in_client_process": shared, "variants": {}}
    for v in variants:
        k, pl = (statistics.median(lat[v][p]) * 1000 for p in ("kaas", "plain"))
        n = len(lat[v]["kaas"])
        out["variants"][v] = {
            "kaas_p50_ms": k, "plain_p50_ms": pl, "kaas_over_plain": k / pl,
            "cpu_ms": {p: {"client": c[0] / n * 1000, "scheduler": c[1] / n * 1000,
                           "workers": c[2] / n * 1000, "all": sum(c) / n * 1000}
                       for p, c in cpu[v].items()}}
    return out


def format_ab(doc: dict[str, Any]) -> str:
    lines = [f"\nbatch {doc['batch']}: {doc['per_variant']} requests per variant and path, "
             "alternating windows"]
    who = "client&sched" if doc.get("scheduler_in_client_process") else "client+sched"
    lines.append(f"  {'variant':<20}{'kaas p50':>10}{'plain p50':>11}{'kaas/plain':>12}"
                 f"{'kaas CPU ms/req (' + who + '+workers)':>40}{'plain CPU':>11}")
    for v, d in doc["variants"].items():
        c = d["cpu_ms"]["kaas"]
        lines.append(f"  {v:<20}{d['kaas_p50_ms']:>10.2f}{d['plain_p50_ms']:>11.2f}"
                     f"{d['kaas_over_plain']:>11.3f}x"
                     f"{c['all']:>12.2f} ({c['client']:.2f}+{c['scheduler']:.2f}+"
                     f"{c['workers']:.2f}){d['cpu_ms']['plain']['all']:>11.2f}")
    return "\n".join(lines)


def format_profile(doc: dict[str, Any]) -> str:
    """The profile as text tables (one per batch)."""
    lines: list[str] = []

    def f(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}"

    for b in doc["batches"]:
        p = b["p50_ms"]
        lines.append(f"\nbatch {b['batch']} ({b['graph']}), {b['samples_per_path']} requests "
                     f"per path in alternating windows:")
        lines.append(f"  p50 ms: kaas {p['kaas']:.2f}  plain client.submit {p['plain']:.2f}  "
                     f"direct {p['direct']:.3f}")
        lines.append(f"  ratios: kaas/plain {b['ratio_kaas_plain']:.3f}x  "
                     f"kaas/direct {b['ratio_kaas_direct']:.1f}x  "
                     f"plain/direct {b['ratio_plain_direct']:.1f}x")
        tr = b.get("traced")
        if not tr:
            continue
        k, pl = tr["kaas"], tr["plain"]
        lines.append(f"  traced ({k['n']} each, probes on: kaas p50 {k['total_p50_ms']:.2f} ms, "
                     f"plain {pl['total_p50_ms']:.2f} ms)")
        lines.append(f"  {'stage (wall, p50 ms)':<48}{'kaas':>9}{'plain':>9}")
        for name, _, _ in STAGES:
            lines.append(f"  {name:<48}{f(k['stages_p50_ms'][name]):>9}"
                         f"{f(pl['stages_p50_ms'][name]):>9}")
        lines.append(f"  {'CPU per request (ms)':<48}{'kaas':>9}{'plain':>9}")
        for name in k["cpu_ms"]:
            lines.append(f"  {name:<48}{f(k['cpu_ms'][name]):>9}{f(pl['cpu_ms'][name]):>9}")
        lines.append(f"  {'handler (per request: calls, wall, CPU ms)':<48}{'kaas':>22}"
                     f"{'plain':>22}")
        names = list(k["handlers"]) + [n for n in pl["handlers"] if n not in k["handlers"]]
        for name in names:
            cells = []
            for side in (k, pl):
                h = side["handlers"].get(name)
                cells.append("-" if h is None else
                             f"{h['calls']:.1f} {h['wall_ms']:.2f} {h['cpu_ms']:.2f}")
            lines.append(f"  {name:<48}{cells[0]:>22}{cells[1]:>22}")
    return "\n".join(lines)


def run_scenario(args: Any) -> int:
    """Entry point of ``dask-kaas bench --scenario latency-profile``."""
    import json

    batches = tuple(int(b) for b in str(getattr(args, "profile_batches", "1,32")).split(","))
    requests = int(getattr(args, "requests", 20) or 20)
    doc = run_profile(batches=batches, workers=args.workers,
                      weights_mib=args.weights_mib,
                      rounds=6, per_window=max(5, requests // 2), traced=max(10, requests))
    print(format_profile(doc))
    for d in doc.get("ab", ()):
        print(format_ab(d))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(doc, fh, indent=1)
        print(f"JSON: {args.json}", file=sys.stderr)
    return 0


__all__ = ["run_profile", "measure_batch", "format_profile", "run_scenario", "STAGES",
           "ab", "format_ab", "VARIANTS", "DEFAULT_VARIANT", "apply_variant", "process_cpu"]
