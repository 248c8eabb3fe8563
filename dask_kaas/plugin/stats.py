"""Per-tenant request statistics kept by the scheduler plugin."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: Latency samples kept per tenant for percentiles.
WINDOW = 20_000
#: Upper bounds (seconds) of the Prometheus latency histogram's buckets.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def percentile_ms(samples: deque[float], q: float) -> float | None:
    if not samples:
        return None
    return float(np.percentile(np.fromiter(samples, float), q) * 1000.0)


@dataclass
class TenantStats:
    submitted: int = 0
    graphs_run: int = 0
    errors: int = 0
    bytes_to_device: int = 0
    hits: int = 0
    misses: int = 0
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=WINDOW))
    queue_waits: deque[float] = field(default_factory=lambda: deque(maxlen=WINDOW))
    #: (completion time, 1) samples for a requests-per-second rate.
    completions: deque[float] = field(default_factory=lambda: deque(maxlen=WINDOW))
    bucket_counts: list[int] = field(default_factory=lambda: [0] * len(LATENCY_BUCKETS))
    latency_sum: float = 0.0

    def record_latency(self, seconds: float) -> None:
        self.latencies.append(seconds)
        self.latency_sum += seconds
        for i, bound in enumerate(LATENCY_BUCKETS):
            if seconds <= bound:
                self.bucket_counts[i] += 1
                break

    def histogram(self) -> tuple[list[tuple[str, float]], float]:
        """Cumulative (le, count) buckets over every request, and their sum."""
        out, running = [], 0
        for bound, n in zip(LATENCY_BUCKETS, self.bucket_counts):
            running += n
            out.append((repr(bound), float(running)))
        out.append(("+Inf", float(self.graphs_run)))
        return out, self.latency_sum

    def to_dict(self, now: float, rate_window_s: float = 10.0) -> dict[str, Any]:
        recent = sum(1 for t in self.completions if now - t <= rate_window_s)
        return {
            "submitted": self.submitted,
            "graphs_run": self.graphs_run,
            "errors": self.errors,
            "in_flight": self.submitted - self.graphs_run - self.errors,
            "bytes_to_device": self.bytes_to_device,
            "hits": self.hits,
            "misses": self.misses,
            "p50_ms": percentile_ms(self.latencies, 50),
            "p99_ms": percentile_ms(self.latencies, 99),
            "queue_wait_p50_ms": percentile_ms(self.queue_waits, 50),
            "queue_wait_p99_ms": percentile_ms(self.queue_waits, 99),
            "requests_per_s": recent / rate_window_s,
        }
