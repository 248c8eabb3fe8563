"""What the worker's guards cost per request.

Runs one graph (copy an input into an output) on a WorkerRuntime directly and
prints median times per request:

- zero-fill: with the backend's ``zeros`` for outputs and temps (what the
  runtime does) and with ``empty`` in its place (what it did before), for
  several output sizes;
- time limit: with ``timeout`` (the graph runs in a thread of its own while
  the caller waits with a deadline) and without::

    python -m dask_kaas.bench.guards [--backend cpu|cuda] [--repeat 50]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import numpy as np

SIZES = (4 << 10, 1 << 20, 16 << 20, 64 << 20)


def _graph(nbytes: int) -> Any:
    from ..graph import Kernel, KernelGraph, Out

    n = nbytes // 4
    g = KernelGraph(f"zerofill-{nbytes}")
    x = g.input("x", (n,), np.float32)
    y = g.output("y", (n,), np.float32)
    g.launch(Kernel.library("copy"), [x, Out(y)])
    return g


def _median_request_s(backend: Any, nbytes: int, repeat: int, zero: bool,
                      timeout: float | None = None) -> float:
    from ..device.runtime import WorkerRuntime
    from ..request import GraphRequest, InputRef

    if not zero:
        backend.zeros = backend.empty  # the old behaviour, for comparison
    rt = WorkerRuntime(backend, 4 * nbytes + (16 << 20))
    g = _graph(nbytes)
    x = np.ones(nbytes // 4, np.float32)
    times = []
    for i in range(repeat + 2):
        req = GraphRequest(f"r{i}", g.name, "bench", [InputRef("x", nbytes, None)])
        t0 = time.perf_counter()
        rt.run(g, req, [x], timeout=timeout)
        if i >= 2:  # warm-up: kernel compile, first allocations
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(backend_name: str = "cpu", repeat: int = 50) -> list[dict[str, float]]:
    from ..device.backend import make_backend

    rows = []
    for nbytes in SIZES:
        zeroed = _median_request_s(make_backend(backend_name), nbytes, repeat, True)
        plain = _median_request_s(make_backend(backend_name), nbytes, repeat, False)
        rows.append({"bytes": nbytes, "empty_us": plain * 1e6, "zeros_us": zeroed * 1e6,
                     "cost_us": (zeroed - plain) * 1e6,
                     "cost_pct": 100 * (zeroed - plain) / plain})
    return rows


def measure_timeout(backend_name: str = "cpu", repeat: int = 200) -> dict[str, float]:
    """Per-request cost of a time limit, on a 4 KiB graph."""
    from ..device.backend import make_backend

    plain = _median_request_s(make_backend(backend_name), 4 << 10, repeat, True)
    limited = _median_request_s(make_backend(backend_name), 4 << 10, repeat, True, 60.0)
    return {"plain_us": plain * 1e6, "timeout_us": limited * 1e6,
            "cost_us": (limited - plain) * 1e6}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", default="cpu")
    ap.add_argument("--repeat", type=int, default=50)
    args = ap.parse_args(argv)
    print(f"{'output':>10} {'empty (us)':>12} {'zeros (us)':>12} {'cost (us)':>10} {'cost':>7}")
    for r in measure(args.backend, args.repeat):
        print(f"{r['bytes'] >> 10:>8}Ki {r['empty_us']:>12.1f} {r['zeros_us']:>12.1f} "
              f"{r['cost_us']:>10.1f} {r['cost_pct']:>6.1f}%")
    t = measure_timeout(args.backend, 4 * args.repeat)
    print(f"time limit (4 KiB graph): {t['plain_us']:.1f} us without, "
          f"{t['timeout_us']:.1f} us with timeout=60: +{t['cost_us']:.1f} us per request")


if __name__ == "__main__":
    main()
