"""Benchmark scenarios beyond raw throughput: fairness and overhead."""

from __future__ import annotations

import statistics
import time
from typing import Any

import numpy as np
from distributed import as_completed

from ..client import KaasClient
from ..graph import Kernel, KernelGraph, Out
from .modes import scatter_named
from .workloads import Workload, run_host


def fairness_order(client: KaasClient, workload: Workload, heavy_n: int = 160,
                   light_n: int = 8, delay_s: float = 0.05, mode: str = "kaas"
                   ) -> dict[str, Any]:
    """Tenant "heavy" submits ``heavy_n`` requests at once (one batch),
    "light" ``light_n`` shortly after, both with the same weights.  Returns
    the completion positions of light's requests (1-based).  ``mode="fifo"``
    runs the same work as plain Dask tasks, in Dask's FIFO order."""
    tenant = workload.make_tenant(0)
    rng = np.random.default_rng(7)
    reqs = [workload.make_request(rng) for _ in range(heavy_n + light_n)]
    if mode == "kaas":
        client.kaas_set_policy("affinity")
        warm = client.submit_kernel_graph(workload.graph, {**tenant.consts, **reqs[0]},
                                          tenant="heavy")
        warm.result()

        def submit(batch: list[dict], name: str) -> list[Any]:
            return client.map_kernel_graph(workload.graph,
                                           [{**tenant.consts, **req} for req in batch],
                                           tenant=name)
    else:  # plain Dask tasks: Dask's FIFO order
        weights = scatter_named(client, tenant.consts, broadcast=True)

        def submit(batch: list[dict], name: str) -> list[Any]:
            return [client.submit(run_host, workload.host_fn, True, **weights, **req,
                                  resources={"GPU": 1}, pure=False) for req in batch]

    owner: dict[str, str] = {}
    futures = []
    for name, batch in (("heavy", reqs[:heavy_n]), ("light", reqs[heavy_n:])):
        for f in submit(batch, name):
            owner[f.key] = name
            futures.append(f)
        time.sleep(delay_s)
    positions = []
    for i, f in enumerate(as_completed(futures), start=1):
        if owner[f.key] == "light":
            positions.append(i)
    return {"mode": mode, "light_positions": positions, "last_light": max(positions),
            "total": len(futures)}


def weighted_share(client: KaasClient, workload: Workload, weights: tuple[float, float] =
                   (2.0, 1.0), outstanding: int = 32, duration: float = 8.0
                   ) -> dict[str, Any]:
    """Two tenants saturating the pool with weights 2:1: completed work splits?"""
    from .driver import LoadSpec, run_load
    from .modes import KaasMode

    tenants = [workload.make_tenant(0), workload.make_tenant(0)]
    tenants[0].name, tenants[1].name = "gold", "silver"
    client.kaas_set_weight("gold", weights[0])
    client.kaas_set_weight("silver", weights[1])
    try:
        res = run_load(KaasMode(client, workload, name="kaas-weighted"), workload, tenants,
                       LoadSpec(outstanding=outstanding, duration=duration), progress=False)
    finally:
        client.kaas_set_weight("gold", 1.0)
        client.kaas_set_weight("silver", 1.0)
    gold, silver = res.per_tenant.get("gold", 0), res.per_tenant.get("silver", 0)
    return {"weights": list(weights), "completed": {"gold": gold, "silver": silver},
            "ratio": gold / silver if silver else None}


def tiny_graph() -> KernelGraph:
    g = KernelGraph("tiny")
    x = g.input("x", (16,), np.float32)
    y = g.output("y", (16,), np.float32)
    g.launch(Kernel.library("relu"), [x, Out(y)])
    return g


def relu_host(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0)


def overhead(client: KaasClient, rounds: int = 10, per_round: int = 20) -> dict[str, Any]:
    """One tenant, one request at a time, a tiny graph: kaas vs a plain
    ``client.submit`` of the same NumPy work on the same cluster, interleaved
    in rounds so drift hits both alike."""
    g = tiny_graph()
    x = np.linspace(-1, 1, 16, dtype=np.float32)
    kaas: list[float] = []
    plain: list[float] = []
    client.kaas_set_policy("affinity")
    for _ in range(3):  # warm both paths
        client.submit_kernel_graph(g, {"x": x}).result()
        client.submit(relu_host, x, pure=False).result()
    for _ in range(rounds):
        for _ in range(per_round):
            t0 = time.perf_counter()
            out = client.submit_kernel_graph(g, {"x": x}).result()["y"]
            kaas.append(time.perf_counter() - t0)
        for _ in range(per_round):
            t0 = time.perf_counter()
            out2 = client.submit(relu_host, x, pure=False).result()
            plain.append(time.perf_counter() - t0)
    assert np.array_equal(out, out2)
    k, p = statistics.median(kaas) * 1000, statistics.median(plain) * 1000
    return {"kaas_p50_ms": k, "plain_submit_p50_ms": p, "ratio": k / p,
            "samples": len(kaas)}
