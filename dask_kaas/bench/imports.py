"""``dask-kaas bench-import``: what loading dask_kaas costs a Dask process.

Every scheduler, worker and client that runs ``--preload dask_kaas.preload``
(or imports dask_kaas) pays this once at start-up.  Each figure is the median
wall time of fresh interpreters, so nothing is cached in the process; the
cost of dask_kaas is the difference to ``import distributed`` alone.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

STATEMENTS = {
    "python": "pass",
    "distributed": "import distributed",
    "dask_kaas": "import distributed, dask_kaas",
    "dask_kaas.preload": "import distributed, dask_kaas.preload",
}


def time_import(statement: str, runs: int) -> float:
    """Median seconds for a fresh interpreter to run ``statement``."""
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", statement], check=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runs", type=int, default=5, help="fresh processes per statement")
    p.add_argument("--json", default=None, help="write the figures to this file")


def run(args: argparse.Namespace) -> int:
    medians = {name: time_import(stmt, args.runs) for name, stmt in STATEMENTS.items()}
    base = medians["distributed"]
    result = {"runs": args.runs, "median_s": medians,
              "added_to_distributed_s": {k: medians[k] - base
                                         for k in ("dask_kaas", "dask_kaas.preload")}}
    for name, seconds in medians.items():
        extra = f"  (+{seconds - base:.3f} s over distributed)" if name.startswith("dask_") else ""
        print(f"{name:<20} {seconds:.3f} s{extra}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0
