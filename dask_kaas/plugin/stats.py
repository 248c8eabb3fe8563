"""Per-tenant request statistics kept by the scheduler plugin."""

from __future__ import annotations

from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: Latency samples kept per tenant for percentiles.
WINDOW = 20_000
#: Upper bounds (seconds) of the Prometheus latency histogram's buckets.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Window:
    """The last ``size`` samples, as packed doubles.

    A ``deque`` of floats costs ~32 bytes a sample and a preallocated array
    costs the whole window up front; with a thousand tenants both add up to
    gigabytes.  This grows with use (8 bytes a sample) and then wraps.
    """

    __slots__ = ("size", "_data", "_next")

    def __init__(self, size: int = WINDOW) -> None:
        self.size = size
        self._data = array("d")
        self._next = 0

    def append(self, x: float) -> None:
        if len(self._data) < self.size:
            self._data.append(x)
        else:
            self._data[self._next] = x
            self._next = (self._next + 1) % self.size

    def __len__(self) -> int:
        return len(self._data)

    def __iter__(self) -> Iterator[float]:
        return iter(self._data)

    def values(self) -> np.ndarray:
        return np.frombuffer(self._data, dtype=np.float64) if self._data else np.empty(0)


def percentile_ms(samples: Window, q: float) -> float | None:
    if not len(samples):
        return None
    return float(np.percentile(samples.values(), q) * 1000.0)


@dataclass
class TenantStats:
    """Counters of one tenant's requests.

    Every admitted request ends exactly once as run, error or cancelled, so
    ``in_flight`` (submitted minus those) is exact; a request that Dask runs
    again after a worker lost its result counts under ``recomputed`` only,
    and one its client sent again after it was cancelled (a lost const)
    under ``resent`` only: its first end is taken back, so it is counted
    once, by how it finally ended.
    """

    submitted: int = 0
    graphs_run: int = 0
    errors: int = 0
    cancelled: int = 0
    recomputed: int = 0
    resent: int = 0
    bytes_to_device: int = 0
    hits: int = 0
    misses: int = 0
    latencies: Window = field(default_factory=Window)
    queue_waits: Window = field(default_factory=Window)
    #: Completion times (wall clock) for a requests-per-second rate.
    completions: Window = field(default_factory=Window)
    bucket_counts: list[int] = field(default_factory=lambda: [0] * len(LATENCY_BUCKETS))
    latency_sum: float = 0.0
    #: Monotonic time of the tenant's last submission or completion (expiry).
    last_active: float = 0.0

    @property
    def in_flight(self) -> int:
        return self.submitted - self.graphs_run - self.errors - self.cancelled

    def record_latency(self, seconds: float) -> None:
        self.latencies.append(seconds)
        self.latency_sum += seconds
        for i, bound in enumerate(LATENCY_BUCKETS):
            if seconds <= bound:
                self.bucket_counts[i] += 1
                break

    def to_dict(self, now: float, rate_window_s: float = 10.0) -> dict[str, Any]:
        recent = sum(1 for t in self.completions if now - t <= rate_window_s)
        return {
            "submitted": self.submitted,
            "graphs_run": self.graphs_run,
            "errors": self.errors,
            "cancelled": self.cancelled,
            "recomputed": self.recomputed,
            "resent": self.resent,
            "in_flight": self.in_flight,
            "bytes_to_device": self.bytes_to_device,
            "hits": self.hits,
            "misses": self.misses,
            "p50_ms": percentile_ms(self.latencies, 50),
            "p99_ms": percentile_ms(self.latencies, 99),
            "queue_wait_p50_ms": percentile_ms(self.queue_waits, 50),
            "queue_wait_p99_ms": percentile_ms(self.queue_waits, 99),
            "requests_per_s": recent / rate_window_s,
        }
