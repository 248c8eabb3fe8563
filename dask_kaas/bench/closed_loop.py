"""``dask-kaas bench --scenario closed-loop``: the control plane under load.

N closed-loop clients (threads sharing one KaasClient, each submitting its
next request when the last one's result is back and checked) at 1, 8 and 32
clients x batch 1 and 32 of the MLP workload (``--tenants`` tenants with
``--weights-mib`` of weights each, client i on tenant i mod tenants), three
ways in alternating windows of one run, so that a noisy machine hits each
alike:

- ``old``: the control plane as it was before issue 20 -- Dask's own
  stream intervals (client 10 ms, scheduler->worker 5 ms), every graph held
  and released by a pass, the worker's report sent on its own;
- ``new``: the code's defaults (see ``control_settings.VARIANTS``);
- ``plain``: ``client.submit`` of the same NumPy work, weights scattered once
  (the Dask floor, on the same cluster and client, with the new settings);
- ``frozen`` (on request, ``--loop-modes``): ``new`` with the weights passed
  as :func:`~dask_kaas.freeze_const` copies, whose content token is taken
  once instead of at every submission.

The settings are switched live between windows (``apply_variant``); each
window's clients are joined before the next one starts, so no request of
one window runs in another.  Per window: requests completed, throughput,
latencies, and CPU seconds of each process over the window divided by the
requests -- the load generator (client), the scheduler and the workers (all
worker processes together).  The load generator runs in a process of its
own, so the scheduler's process (this one, which holds the cluster) is
measured apart from it.  Every answer is checked against NumPy.
"""

from __future__ import annotations

import multiprocessing as mp
import queue as queue_mod
import statistics
import sys
import threading
import time
from typing import Any

import numpy as np

from .control_settings import DEFAULT_VARIANT

MODES = ("old", "new", "plain")
#: The settings (``control_settings.VARIANTS``) each mode runs with; any other
#: mode named after a variant runs the kaas path with that variant.
MODE_VARIANT = {"old": "dask", "new": DEFAULT_VARIANT, "plain": DEFAULT_VARIANT,
                "frozen": DEFAULT_VARIANT}
#: Seconds the load generator process may take to start and warm up.
START_TIMEOUT_S = 180.0


# -- the load generator ----------------------------------------------------------
class _Cell:
    """One (batch) setting's tenants, inputs, references and submitters."""

    def __init__(self, client: Any, batch: int, tenants: int, weights_mib: float) -> None:
        from ..const_identity import freeze_const
        from .modes import scatter_named
        from .workloads import make_workload, mlp_host, run_host

        self.client = client
        self.wl = make_workload("mlp", weights_mib, batch=batch)
        self.tenants = [self.wl.make_tenant(i) for i in range(tenants)]
        rng = np.random.default_rng(20 + batch)
        self.xs = [self.wl.make_request(rng)["x"] for _ in range(4)]
        self.refs = [[mlp_host(**t.consts, x=x)["y"] for x in self.xs] for t in self.tenants]
        self.weights = [scatter_named(client, t.consts, broadcast=True) for t in self.tenants]
        #: the same weights as ``freeze_const`` copies (mode ``frozen``: their
        #: content token is taken once, not at every submission)
        self.frozen = [{k: freeze_const(v) for k, v in t.consts.items()} for t in self.tenants]
        self._run_host, self._mlp_host = run_host, mlp_host

    def submit(self, mode: str, t: int, i: int) -> Any:
        x = self.xs[i % len(self.xs)]
        if mode == "plain":
            return self.client.submit(self._run_host, self._mlp_host, False, **self.weights[t],
                                      x=x, pure=False)
        tenant = self.tenants[t]
        consts = self.frozen[t] if mode == "frozen" else tenant.consts
        return self.client.submit_kernel_graph(self.wl.graph, {**consts, "x": x},
                                               tenant=tenant.name)

    def check(self, result: Any, t: int, i: int) -> bool:
        return bool(np.allclose(result["y"], self.refs[t][i % len(self.xs)],
                                rtol=1e-3, atol=1e-3))


def _window(cell: _Cell, mode: str, clients: int, seconds: float) -> dict[str, Any]:
    """``clients`` closed loops for ``seconds``, then joined."""
    lat: list[list[float]] = [[] for _ in range(clients)]
    bad = [0] * clients
    errors: list[str] = []
    stop = time.perf_counter() + seconds
    n_tenants = len(cell.tenants)

    def loop(c: int) -> None:
        i = c
        try:
            while time.perf_counter() < stop:
                t0 = time.perf_counter()
                fut = cell.submit(mode, c % n_tenants, i)
                res = fut.result()
                lat[c].append(time.perf_counter() - t0)
                if not cell.check(res, c % n_tenants, i):
                    bad[c] += 1
                del fut, res
                i += 1
        except Exception as e:  # noqa: BLE001 - counted and reported
            errors.append(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=loop, args=(c,), daemon=True) for c in range(clients)]
    from ..client import _state
    from .control_settings import process_cpu

    co = _state(cell.client).coalescer
    m0, r0 = co.messages, co.requests
    c0 = process_cpu(cell.client)
    w0 = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - w0
    c1 = process_cpu(cell.client)
    samples = [v for part in lat for v in part]
    n = len(samples)
    per = {k: (c1[j] - c0[j]) / max(n, 1) * 1000
           for j, k in enumerate(("client", "scheduler", "workers"))}
    per["all"] = sum(per.values())
    sent = co.requests - r0  # through the coalescer: requests per message
    return {"mode": mode, "n": n, "wall_s": wall,
            "per_message": sent / (co.messages - m0) if sent else None,
            "throughput": n / wall if wall else 0.0,
            "latencies": samples, "wrong": sum(bad), "errors": errors, "cpu_ms": per}


def _warm(cell: _Cell, modes: list[str]) -> None:
    """Each tenant's weights onto every worker that may run it, every path
    compiled and checked once (not measured)."""
    from .control_settings import DEFAULT_VARIANT, VARIANTS, apply_variant

    apply_variant(cell.client, VARIANTS[DEFAULT_VARIANT])
    for mode in modes:
        for _ in range(2):
            futs = [(cell.submit(mode, t, t), t) for t in range(len(cell.tenants))]
            for f, t in futs:
                if not cell.check(f.result(), t, t):
                    raise AssertionError(f"warm-up: {mode} answered wrong for tenant {t}")


def measure(client: Any, clients: tuple[int, ...] = (1, 8, 32), batches: tuple[int, ...] = (1, 32),
            modes: tuple[str, ...] = MODES, rounds: int = 4, window_s: float = 3.0,
            tenants: int = 8, weights_mib: float = 8.0) -> dict[str, Any]:
    """Every (batch, clients) cell, its modes in alternating windows."""
    from .control_settings import DEFAULT_VARIANT, VARIANTS, apply_variant

    unknown = [m for m in modes if MODE_VARIANT.get(m, m) not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown modes {unknown}: use old, new, plain or one of "
                         f"{', '.join(VARIANTS)}")
    settings = {m: VARIANTS[MODE_VARIANT.get(m, m)] for m in modes}
    cells = []
    try:
        for b in batches:
            cell = _Cell(client, b, tenants, weights_mib)
            _warm(cell, list(modes))
            for n in clients:
                windows: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
                for r in range(rounds):
                    for m in (modes if r % 2 == 0 else tuple(reversed(modes))):
                        apply_variant(client, settings[m])
                        windows[m].append(_window(cell, m, n, window_s))
                cells.append(summarise(b, n, windows))
            del cell
    finally:
        apply_variant(client, VARIANTS[DEFAULT_VARIANT])
    return {"cells": cells, "config": {
        "clients": list(clients), "batches": list(batches), "modes": list(modes),
        "rounds": rounds, "window_s": window_s, "tenants": tenants, "weights_mib": weights_mib,
        "settings": {m: list(settings[m]) for m in modes}}}


def summarise(batch: int, clients: int, windows: dict[str, list[dict[str, Any]]]
              ) -> dict[str, Any]:
    """Medians over windows (throughput, CPU per request), latency
    percentiles over every request of a mode, and the new/old ratios both as
    ratios of medians and as the median of each round's paired ratio."""
    out: dict[str, Any] = {"batch": batch, "clients": clients, "modes": {}}
    for m, ws in windows.items():
        lat = np.array([v for w in ws for v in w["latencies"]]) * 1000
        out["modes"][m] = {
            "windows": len(ws), "requests": sum(w["n"] for w in ws),
            "wrong": sum(w["wrong"] for w in ws),
            "errors": [e for w in ws for e in w["errors"]][:5],
            "error_count": sum(len(w["errors"]) for w in ws),
            "throughput": statistics.median(w["throughput"] for w in ws),
            "throughput_windows": [round(w["throughput"], 1) for w in ws],
            "p50_ms": float(np.percentile(lat, 50)) if lat.size else None,
            "p99_ms": float(np.percentile(lat, 99)) if lat.size else None,
            "per_message": _median([w["per_message"] for w in ws
                                    if w.get("per_message") is not None]),
            "cpu_ms": {k: statistics.median(w["cpu_ms"][k] for w in ws)
                       for k in ("client", "scheduler", "workers", "all")},
        }
    md = out["modes"]
    for mode in ("new", "frozen"):
        if "old" in windows and mode in windows:
            out[f"{mode}_over_old"] = _over(windows["old"], windows[mode], md["old"], md[mode])
    if "new" in windows and "plain" in windows:
        out["kaas_over_plain_p50"] = _div(md["new"]["p50_ms"], md["plain"]["p50_ms"])
    return out


def _over(old_ws: list[dict[str, Any]], new_ws: list[dict[str, Any]], old: dict[str, Any],
          new: dict[str, Any]) -> dict[str, Any]:
    """A mode against ``old``: ratios of medians and each round's pair."""
    pairs = list(zip(old_ws, new_ws))
    return {
        "throughput": new["throughput"] / old["throughput"],
        "cpu_all": new["cpu_ms"]["all"] / old["cpu_ms"]["all"],
        "p50": _div(new["p50_ms"], old["p50_ms"]),
        "throughput_paired": [round(n["throughput"] / o["throughput"], 3)
                              for o, n in pairs if o["throughput"]],
        "cpu_all_paired": [round(n["cpu_ms"]["all"] / o["cpu_ms"]["all"], 3)
                           for o, n in pairs if o["cpu_ms"]["all"]],
    }


def _median(vs: list[float]) -> float | None:
    return statistics.median(vs) if vs else None


def _div(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def targets(doc: dict[str, Any]) -> dict[str, Any]:
    """The issue's three figures, where the run has their cells."""
    by = {(c["batch"], c["clients"]): c for c in doc["cells"]}
    out: dict[str, Any] = {}
    one = by.get((1, 1))
    if one is not None and one.get("kaas_over_plain_p50") is not None:
        r = one["kaas_over_plain_p50"]
        out["single_kaas_over_plain"] = {"value": r, "target": "<= 1.05", "met": r <= 1.05}
    eight = by.get((1, 8))
    if eight is not None and "new_over_old" in eight:
        cpu = 1 - eight["new_over_old"]["cpu_all"]
        thr = eight["new_over_old"]["throughput"]
        out["cpu_per_request_8_clients_cut"] = {"value": cpu, "target": ">= 0.30",
                                                "met": cpu >= 0.30}
        out["throughput_8_clients_gain"] = {"value": thr, "target": ">= 1.4", "met": thr >= 1.4}
    return out


def format_doc(doc: dict[str, Any]) -> str:
    lines = [f"closed loop: MLP, {doc['config']['tenants']} tenants x "
             f"{doc['config']['weights_mib']:g} MiB, {doc['config']['rounds']} alternating "
             f"windows of {doc['config']['window_s']:g} s per mode; throughput and CPU are "
             "medians over windows, p50/p99 over all requests"]
    lines.append(f"  {'batch':>5}{'clients':>8}{'mode':>7}{'req/s':>9}{'p50 ms':>9}"
                 f"{'p99 ms':>9}{'CPU ms/req: client':>20}{'sched':>8}{'workers':>9}"
                 f"{'all':>8}{'reqs':>7}{'wrong':>6}{'req/msg':>8}")
    for c in doc["cells"]:
        for m, d in c["modes"].items():
            cpu = d["cpu_ms"]
            lines.append(f"  {c['batch']:>5}{c['clients']:>8}{m:>7}{d['throughput']:>9.1f}"
                         f"{_f(d['p50_ms'])}{_f(d['p99_ms'])}{cpu['client']:>20.2f}"
                         f"{cpu['scheduler']:>8.2f}{cpu['workers']:>9.2f}{cpu['all']:>8.2f}"
                         f"{d['requests']:>7}{d['wrong'] + d['error_count']:>6}"
                         f"{_f(d.get('per_message'), '.2f', 8)}")
        for mode in ("new", "frozen"):
            r = c.get(f"{mode}_over_old")
            if r:
                lines.append(f"  {'':>13}{mode}/old: throughput {r['throughput']:.2f}x "
                             f"(paired {_range(r['throughput_paired'])}), CPU/req "
                             f"{r['cpu_all']:.2f}x (paired {_range(r['cpu_all_paired'])}), "
                             f"p50 {_f(r['p50'], '.2f', 0).strip()}x"
                             + (f"; kaas/plain p50 {c['kaas_over_plain_p50']:.3f}x"
                                if mode == "new" and c.get("kaas_over_plain_p50") else ""))
    for name, t in targets(doc).items():
        lines.append(f"  target {name}: {t['value']:.3f} (want {t['target']}): "
                     f"{'met' if t['met'] else 'missed'}")
    return "\n".join(lines)


def _f(v: float | None, spec: str = ".2f", width: int = 9) -> str:
    return f"{'-':>{width}}" if v is None else f"{v:>{width}{spec}}"


def _range(vs: list[float]) -> str:
    return f"{min(vs):.2f}-{max(vs):.2f}" if vs else "-"


# -- processes ---------------------------------------------------------------------
def _child(address: str, kwargs: dict[str, Any], out: Any) -> None:
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        threadpool_limits = None
    from ..client import KaasClient

    try:
        with KaasClient(address) as client:
            if threadpool_limits is not None:  # the references, on one BLAS thread
                with threadpool_limits(1):
                    doc = measure(client, **kwargs)
            else:
                doc = measure(client, **kwargs)
        out.put(doc)
    except BaseException as e:  # reported to the parent, which fails the run
        import traceback

        out.put({"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()})


def run_closed_loop(workers: int = 2, timeout_s: float | None = None, **kwargs: Any
                    ) -> dict[str, Any]:
    """The scenario on a fresh local cluster (CPU backend, one BLAS thread
    per worker), the load generator in a process of its own."""
    from ..cluster import LocalKaasCluster

    cells = len(kwargs.get("clients", (1, 8, 32))) * len(kwargs.get("batches", (1, 32)))
    budget = timeout_s or START_TIMEOUT_S + cells * len(kwargs.get("modes", MODES)) * \
        kwargs.get("rounds", 4) * (kwargs.get("window_s", 3.0) + 5.0) * 2
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    with LocalKaasCluster(workers, backend="cpu", dashboard_address=None) as cluster:
        proc = ctx.Process(target=_child, args=(cluster.scheduler_address, kwargs, out),
                           daemon=True)
        proc.start()
        try:
            doc = out.get(timeout=budget)
        except queue_mod.Empty:
            raise RuntimeError(f"the load generator did not answer in {budget:.0f} s") from None
        finally:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
    if "error" in doc:
        raise RuntimeError(f"load generator failed: {doc['error']}\n{doc.get('traceback', '')}")
    doc["config"]["workers"] = workers
    doc["targets"] = targets(doc)
    return doc


def run_scenario(args: Any) -> int:
    """Entry point of ``dask-kaas bench --scenario closed-loop``."""
    import json

    def ints(s: str) -> tuple[int, ...]:
        return tuple(int(v) for v in str(s).split(","))

    doc = run_closed_loop(
        workers=args.workers, clients=ints(args.loop_clients), batches=ints(args.loop_batches),
        modes=tuple(str(args.loop_modes).split(",")), rounds=args.rounds,
        window_s=args.duration or 3.0, tenants=int(args.tenants or 8),
        weights_mib=args.weights_mib)
    print(format_doc(doc))
    bad = sum(d["wrong"] + d["error_count"] for c in doc["cells"] for d in c["modes"].values())
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(doc, fh, indent=1)
        print(f"JSON: {args.json}", file=sys.stderr)
    return 1 if bad else 0


__all__ = ["measure", "run_closed_loop", "summarise", "targets", "format_doc", "run_scenario",
           "MODES"]
