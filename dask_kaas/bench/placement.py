"""``dask-kaas bench-placement``: the cost of one dispatch decision at scale.

No cluster: a simulated buffer directory (``--buffers`` resident buffers of
1-64 MiB spread over ``--workers`` workers) and queue state (each worker
with an expected free time and graphs in flight) drive the same code the
scheduler plugin runs when it releases a request — the fair-share pop, the
candidate set, the affinity cost model, the decision log entry and the
booking of the chosen worker.  Each decision is timed on its own.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections import deque
from typing import Any

import numpy as np

from ..plugin.candidates import LoadIndex, candidate_workers
from ..plugin.directory import BufferDirectory
from ..plugin.dispatch import DispatchQueue
from ..plugin.placement import AffinityPolicy, CostModel, PlacementContext, WorkerView
from ..request import GraphRequest, InputRef

MIB = 2**20


def count_arg(low: int, high: int) -> Any:
    """An argparse type: an integer within [low, high]."""
    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if not low <= n <= high:
            raise argparse.ArgumentTypeError(f"{n} is outside [{low}, {high}]")
        return n
    return parse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers", type=count_arg(1, 100_000), default=100)
    p.add_argument("--buffers", type=count_arg(0, 10_000_000), default=10_000,
                   help="resident buffers in the pool")
    p.add_argument("--tenants", type=count_arg(1, 100_000), default=8)
    p.add_argument("--decisions", type=count_arg(1, 10_000_000), default=5000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the result here")


def simulate(workers: int, buffers: int, decisions: int = 5000, tenants: int = 8,
             seed: int = 0) -> dict[str, Any]:
    """Time ``decisions`` releases; returns the figures ``--json`` writes."""
    if workers < 1 or buffers < 0 or decisions < 1 or tenants < 1:
        raise ValueError("workers, decisions and tenants must be >= 1, buffers >= 0")
    rng = random.Random(seed)
    addrs = [f"tcp://10.0.{i // 250}.{i % 250}:4000" for i in range(workers)]
    directory = BufferDirectory()
    ids = [f"kaas-const-{i:08x}" for i in range(buffers)]
    sizes = {b: rng.randint(1, 64) * MIB for b in ids}
    for b in ids:
        for w in rng.sample(addrs, 1 if rng.random() < 0.8 else min(2, workers)):
            directory.added(w, b, sizes[b])
    capacity = {w: int(directory.expected_bytes(w) * 1.2) + 256 * MIB for w in addrs}
    costs = CostModel()
    for t in range(tenants):
        costs.observe({"graph": f"model-{t}", "total_s": 0.005 + 0.001 * t})
    now = 0.0
    free_at = {w: rng.uniform(0, 0.05) for w in addrs}
    queued = {w: rng.randint(0, 1) for w in addrs}
    index = LoadIndex()
    for w in addrs:
        index.update(w, free_at[w])
    ctx = PlacementContext(directory, costs, who_has=lambda key: (), network_bytes_per_s=1e9)
    policy = AffinityPolicy()
    queue = DispatchQueue()
    log: deque[dict[str, Any]] = deque(maxlen=1000)
    # Each tenant's requests use a few "model" buffers of its own.
    models = [rng.sample(ids, min(3, len(ids))) for _ in range(tenants)] if ids else [[]] * tenants
    inflight: deque[tuple[str, list[str]]] = deque()
    timings = np.empty(decisions)
    for n in range(decisions):
        t = n % tenants
        used = models[t][:rng.randint(1, 3)] if models[t] else []
        req = GraphRequest(
            key=f"kaas-model-{t}-{n}", graph=f"model-{t}", tenant=f"tenant-{t}",
            inputs=[InputRef(f"w{j}", sizes[b], b, None, True) for j, b in enumerate(used)]
            + [InputRef("x", 64 * 1024, None)],
            nbytes=sum(sizes[b] for b in used) + 256 * 1024)
        queue.push(req.key, req.tenant)
        start = time.perf_counter_ns()
        key, tenant = queue.pop()
        addrs_c = candidate_workers(req, directory, index, ctx.who_has)
        views = [WorkerView(a, 1, capacity[a], directory.expected_bytes(a),
                            max(0.0, free_at[a] - now), queued[a]) for a in addrs_c]
        chosen = policy.choose(req, views, ctx)
        log.append({"key": key, "tenant": tenant, "worker": chosen.address,
                    "terms": policy.last_terms})
        w = chosen.address
        for i in req.inputs:
            if i.buffer_id is not None:
                directory.plan(w, i.buffer_id, i.nbytes)
        run = costs.slot_time_s(req.graph)
        free_at[w] = max(free_at[w], now) + run
        queued[w] += 1
        index.update(w, free_at[w])
        queue.started(key, tenant, run)
        timings[n] = (time.perf_counter_ns() - start) / 1000.0
        inflight.append((w, [i.buffer_id for i in req.inputs if i.buffer_id is not None]))
        now += 0.0005
        if len(inflight) > 2 * workers:  # the oldest finishes: bookings go
            done_w, bids = inflight.popleft()
            for b in bids:
                directory.unplan(done_w, b)
            queued[done_w] -= 1
    return {"workers": workers, "buffers": buffers, "tenants": tenants,
            "decisions": decisions,
            "us_per_decision_p50": float(np.percentile(timings, 50)),
            "us_per_decision_p99": float(np.percentile(timings, 99)),
            "log_entries": len(log)}


def run(args: argparse.Namespace) -> int:
    result = simulate(args.workers, args.buffers, args.decisions, args.tenants, args.seed)
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    return 0
