"""``dask-kaas demo``: several tenants share a small pool through dask_kaas.

It starts a LocalKaasCluster (the CPU backend where there is no GPU), runs a
multi-tenant MLP inference workload with a progress bar, checks every result
against NumPy, and prints what each worker's device cache did.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--workers", type=int, default=None, help="default: one per GPU, or 2")
    p.add_argument("--tenants", type=int, default=4)
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--hidden", type=int, default=1024, help="hidden width of each tenant's MLP")
    p.add_argument("--device-memory-limit", default=None,
                   help="device memory per worker, e.g. 64MB (default: backend's)")
    p.add_argument("--dashboard-address", default="127.0.0.1:8787")
    p.add_argument("--serve", action="store_true",
                   help="keep the cluster and dashboard up after the demo until Ctrl-C")


def format_bytes(n: float) -> str:
    from dask.utils import format_bytes as fb

    return fb(int(n))


def print_stats(stats: dict[str, Any]) -> None:
    print(f"\nPer-worker device caches (policy: {stats['policy']})")
    print(f"{'worker':28} {'graphs':>7} {'hits':>6} {'misses':>6} {'evict':>6} "
          f"{'to device':>10} {'used / capacity':>22}")
    for addr, w in sorted(stats["workers"].items()):
        print(f"{addr:28} {w['graphs_run']:>7} {w['hits']:>6} {w['misses']:>6} "
              f"{w['evictions']:>6} {format_bytes(w['bytes_to_device']):>10} "
              f"{format_bytes(w['used_bytes']) + ' / ' + format_bytes(w['capacity_bytes']):>22}")
    print(f"\n{'tenant':12} {'graphs':>7} {'p50 ms':>8} {'p99 ms':>8} {'to device':>10}")
    for name, t in stats["tenants"].items():
        p50 = f"{t['p50_ms']:.1f}" if t["p50_ms"] is not None else "-"
        p99 = f"{t['p99_ms']:.1f}" if t["p99_ms"] is not None else "-"
        print(f"{name:12} {t['graphs_run']:>7} {p50:>8} {p99:>8} "
              f"{format_bytes(t['bytes_to_device']):>10}")


def run(args: argparse.Namespace) -> int:
    from distributed import as_completed
    from tqdm import tqdm

    from . import KaasClient, LocalKaasCluster
    from .workloads import mlp

    dims = dict(batch=32, d_in=512, hidden=args.hidden, d_out=128)
    models = [mlp.make_model(f"tenant-{t}", dims["d_in"], dims["hidden"], dims["d_out"], seed=t)
              for t in range(args.tenants)]
    graph = mlp.mlp_graph(**dims)
    print(f"Starting a LocalKaasCluster ({args.backend} backend)...")
    with LocalKaasCluster(args.workers, backend=args.backend,
                          device_memory_limit=args.device_memory_limit,
                          dashboard_address=args.dashboard_address) as cluster, \
            KaasClient(cluster) as client:
        print(f"Dashboard: {cluster.dashboard_link}")
        backend = cluster.kaas_backend
        print(f"{len(cluster.workers)} workers, {backend} backend; {args.tenants} tenants with "
              f"{format_bytes(models[0].nbytes)} of weights each; {args.requests} requests")
        rng = np.random.default_rng(0)
        t0 = time.perf_counter()
        futures = {}
        for i in range(args.requests):
            model = models[i % len(models)]
            x = rng.standard_normal((dims["batch"], dims["d_in"])).astype(np.float32)
            fut = client.submit_kernel_graph(graph, mlp.inputs_for(model, x), tenant=model.tenant)
            futures[fut] = (model, x)
        bad = 0
        for fut in tqdm(as_completed(list(futures)), total=len(futures), unit="req",
                        desc="requests"):
            model, x = futures[fut]
            if not np.allclose(fut.result()["y"], model.reference(x), rtol=1e-3, atol=1e-3):
                bad += 1
        elapsed = time.perf_counter() - t0
        print(f"\n{args.requests} requests in {elapsed:.2f}s ({args.requests / elapsed:.0f}/s); "
              f"{args.requests - bad} results match NumPy, {bad} do not")
        print_stats(client.kaas_stats())
        print(f"\nDashboard: {cluster.dashboard_link}")
        if args.serve:
            kaas_page = cluster.dashboard_link.replace("/status", "/kaas")
            print(f"KaaS page: {kaas_page}\nServing until interrupted (Ctrl-C)...")
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                print("stopping")
        return 1 if bad else 0
