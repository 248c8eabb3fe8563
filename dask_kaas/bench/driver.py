"""Load generation: closed loop (N outstanding per tenant) or open loop
(Poisson arrivals), for a set duration, with a progress bar."""

from __future__ import annotations

import queue
import threading
import time
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
    verify_every: int = 25  # check one result in this many against NumPy


@dataclass
class RunResult:
    mode: str
    tenants: int
    duration_s: float
    latencies: list[float] = field(default_factory=list)
    per_tenant: dict[str, int] = field(default_factory=dict)
    completion_order: list[int] = field(default_factory=list)
    errors: int = 0
    verified: int = 0
    mismatches: int = 0
    counters: dict[str, float] = field(default_factory=dict)

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
            "verified": self.verified,
            "per_tenant": self.per_tenant,
        }


def _delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before.get(k, 0.0) for k in after}


def run_load(mode: Mode, workload: Workload, tenants: list[Tenant], spec: LoadSpec,
             seed: int = 0, progress: bool = True) -> RunResult:
    """Drive ``mode`` with requests from every tenant; measure after warm-up."""
    rng = np.random.default_rng(seed)
    mode.prepare(tenants)
    # Warm-up: every tenant's first requests, not measured.
    warm = [mode.submit(t, workload.make_request(rng)) for t in range(len(tenants))
            for _ in range(spec.warmup)]
    for w in warm:
        w.result()
    before = mode.counters()
    done: queue.Queue[tuple[int, float, Any, dict]] = queue.Queue()
    result = RunResult(mode.name, len(tenants), spec.duration)
    stop_at = [float("inf")]
    in_flight = [0]
    lock = threading.Lock()

    def submit(t: int) -> None:
        req = workload.make_request(rng)
        t0 = time.perf_counter()
        fut = mode.submit(t, req)
        with lock:
            in_flight[0] += 1
        fut.add_done_callback(lambda f, t=t, t0=t0, req=req: done.put((t, t0, f, req)))

    start = time.perf_counter()
    stop_at[0] = start + spec.duration
    arrivals: threading.Thread | None = None
    if spec.kind == "closed":
        for t in range(len(tenants)):
            for _ in range(spec.outstanding):
                submit(t)
    else:
        def arrive() -> None:
            arr_rng = np.random.default_rng(seed + 1)
            next_t = time.perf_counter()
            while next_t < stop_at[0]:
                next_t += arr_rng.exponential(1.0 / spec.rate)
                delay = next_t - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                submit(int(arr_rng.integers(len(tenants))))

        arrivals = threading.Thread(target=arrive, daemon=True)
        arrivals.start()

    bar = tqdm(total=None, unit="req", desc=f"{mode.name} ({len(tenants)} tenants)",
               disable=not progress, leave=False)
    count = 0
    while True:
        now = time.perf_counter()
        with lock:
            pending = in_flight[0]
        if now >= stop_at[0] and pending == 0 and (arrivals is None or not arrivals.is_alive()):
            break
        try:
            t, t0, fut, req = done.get(timeout=0.5)
        except queue.Empty:
            if now > stop_at[0] + 120:
                break  # give up on stragglers; they count as not completed
            continue
        t1 = time.perf_counter()
        with lock:
            in_flight[0] -= 1
        try:
            out = fut.result()
        except Exception:  # noqa: BLE001
            result.errors += 1
            out = None
        if out is not None and t1 <= stop_at[0]:
            result.latencies.append(t1 - t0)
            name = tenants[t].name
            result.per_tenant[name] = result.per_tenant.get(name, 0) + 1
            result.completion_order.append(t)
            count += 1
            if count % spec.verify_every == 1:
                result.verified += 1
                expect = workload.reference(tenants[t], req)
                if not np.allclose(out, expect, rtol=1e-3, atol=1e-3):
                    result.mismatches += 1
        bar.update(1)
        if spec.kind == "closed" and t1 < stop_at[0]:
            submit(t)
    bar.close()
    result.duration_s = min(spec.duration, time.perf_counter() - start)
    result.counters = _delta(mode.counters(), before)
    return result
