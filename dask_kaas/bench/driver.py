"""Load generation: closed loop (N outstanding per tenant) or open loop
(Poisson arrivals), for a set duration, with a progress bar."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm import tqdm

from .modes import Mode
from .workloads import Tenant, Workload


@dataclass
class LoadSpec:
    kind: str = "closed"  # or "open"
    outstanding: int = 2  # closed loop: requests in flight per tenant
    rate: float = 50.0  # open loop: requests per second, all tenants together
    duration: float = 10.0
    warmup: int = 1  # requests per tenant before measuring
    verify_every: int = 100  # check one result in this many against NumPy
    request_pool: int = 64  # distinct request inputs, generated up front


@dataclass
class RunResult:
    mode: str
    tenants: int
    duration_s: float
    latencies: list[float] = field(default_factory=list)
    per_tenant: dict[str, int] = field(default_factory=dict)
    errors: int = 0
    verified: int = 0
    mismatches: int = 0
    counters: dict[str, float] = field(default_factory=dict)
    #: Scheduler-side latencies (seconds), where measured (several processes).
    scheduler_latencies: list[float] | None = None

    def summary(self) -> dict[str, Any]:
        lat = np.array(self.latencies) * 1000 if self.latencies else np.array([np.nan])
        hits = self.counters.get("hits")
        misses = self.counters.get("misses")
        hit_rate = (hits / (hits + misses)) if hits is not None and (hits + misses) else None
        return {
            "mode": self.mode,
            "tenants": self.tenants,
            "requests": len(self.latencies),
            "errors": self.errors + self.mismatches,
            "duration_s": round(self.duration_s, 3),
            "throughput_rps": len(self.latencies) / self.duration_s if self.duration_s else 0.0,
            "p50_ms": float(np.percentile(lat, 50)),
            "p99_ms": float(np.percentile(lat, 99)),
            "hit_rate": hit_rate,
            "bytes_to_device": int(self.counters.get("bytes_to_device", 0)),
            "cold_starts": int(self.counters.get("cold_starts", 0)),
            "evictions": int(self.counters.get("evictions", 0)),
            "verified": self.verified,
            "per_tenant": self.per_tenant,
            **self._scheduler_summary(),
        }

    def _scheduler_summary(self) -> dict[str, Any]:
        if self.scheduler_latencies is None:
            return {}
        from .multiproc import scheduler_summary

        return scheduler_summary(self.scheduler_latencies)


def run_load(mode: Mode, workload: Workload, tenants: list[Tenant], spec: LoadSpec,
             seed: int = 0, progress: bool = True,
             ready: Callable[[], None] | None = None) -> RunResult:
    """Drive ``mode`` with requests from every tenant; measure after warm-up.

    A request counts when it finished within the measured window; one result
    in ``verify_every`` is fetched and checked against NumPy.  ``ready`` is
    called between the warm-up and the measured window (several load
    processes start measuring together).
    """
    rng = np.random.default_rng(seed)
    # Inputs are made up front: generating them must not slow the load down.
    pool = [workload.make_request(rng) for _ in range(spec.request_pool)]
    mode.prepare(tenants)
    warm = [mode.submit(t, pool[t % len(pool)]) for t in range(len(tenants))
            for _ in range(spec.warmup)]
    for w in warm:
        w.result()
    if ready is not None:
        ready()
    before = mode.counters()
    result = RunResult(mode.name, len(tenants), spec.duration)
    meta: dict[Any, tuple[int, float, dict]] = {}
    lock = threading.Lock()
    stream = mode.completions()

    picks = iter(np.random.default_rng(seed + 2).integers(len(pool), size=10**7))

    def submit(t: int) -> None:
        submit_batch(t, 1)

    def submit_batch(t: int, n: int) -> None:
        reqs = [pool[next(picks)] for _ in range(n)]
        with lock:
            t0 = time.perf_counter()
            futs = mode.submit_many(t, reqs) if n > 1 else [mode.submit(t, reqs[0])]
            for fut, req in zip(futs, reqs):
                meta[fut] = (t, t0, req)
        for fut in futs:
            stream.add(fut)

    start = time.perf_counter()
    stop_at = start + spec.duration
    arrivals: threading.Thread | None = None
    if spec.kind == "closed":
        for t in range(len(tenants)):
            submit_batch(t, spec.outstanding)
    else:
        def arrive() -> None:
            arr_rng = np.random.default_rng(seed + 1)
            next_t = time.perf_counter()
            while next_t < stop_at:
                next_t += arr_rng.exponential(1.0 / spec.rate)
                delay = next_t - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                submit(int(arr_rng.integers(len(tenants))))

        arrivals = threading.Thread(target=arrive, daemon=True)
        arrivals.start()
        time.sleep(0.05)  # let the first arrival in before the stream can run dry

    bar = tqdm(total=None, unit="req", desc=f"{mode.name} ({len(tenants)} tenants)",
               disable=not progress, leave=False, mininterval=0.5)
    count = 0
    while True:
        if stream.count() == 0:
            if arrivals is None or not arrivals.is_alive():
                break
            time.sleep(0.005)  # open loop: more arrivals are coming
            continue
        again: dict[int, int] = {}
        for fut in stream.next_batch(block=True):
            t1 = time.perf_counter()
            with lock:
                t, t0, req = meta.pop(fut)
            bar.update(1)
            if getattr(fut, "status", None) == "error" or (
                    not hasattr(fut, "status") and fut.exception() is not None):
                result.errors += 1
            elif t1 <= stop_at:
                result.latencies.append(t1 - t0)
                name = tenants[t].name
                result.per_tenant[name] = result.per_tenant.get(name, 0) + 1
                count += 1
                if count % spec.verify_every == 1:
                    result.verified += 1
                    out = mode.output(fut.result())
                    if not np.allclose(out, workload.reference(tenants[t], req), rtol=1e-3,
                                       atol=1e-3):
                        result.mismatches += 1
            if spec.kind == "closed" and t1 < stop_at:
                again[t] = again.get(t, 0) + 1
        # Closed loop: each finished request is replaced, a tenant's in one batch.
        for t, n in again.items():
            submit_batch(t, n)
    if arrivals is not None:
        arrivals.join()
    bar.close()
    result.duration_s = min(spec.duration, time.perf_counter() - start)
    after = mode.counters()
    result.counters = {k: after[k] - before.get(k, 0.0) for k in after}
    return result
