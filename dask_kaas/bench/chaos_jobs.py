"""The kinds of request a chaos run mixes, each with its NumPy reference.

- ``plain``: the workload's graph with the tenant's (long-lived) consts.
- ``chain``: two graphs; the first keeps its output on the device
  (``keep_on_device``) and the second consumes that kept output as a future,
  so a worker killed between them loses a device-resident dependency.
- ``fresh``: the workload's graph with consts the cluster has never seen
  (new weights arriving while workers die: a new scatter, possibly to a
  worker that is about to be killed).

Every job submits one or more graphs and returns the *final* future plus
whatever must stay referenced until it finishes (the chain's first future).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..graph import In, Kernel, KernelGraph, Out
from .workloads import Tenant, Workload

CHAIN_N = 64
CHAIN_BATCH = 8


def chain_graphs() -> tuple[KernelGraph, KernelGraph]:
    """``h = x @ w`` (h kept on the device), then ``y = relu(h @ w)``."""
    g1 = KernelGraph("chaos-chain-1")
    x = g1.input("x", (CHAIN_BATCH, CHAIN_N), np.float32)
    w = g1.const("w", (CHAIN_N, CHAIN_N), np.float32)
    h = g1.output("h", (CHAIN_BATCH, CHAIN_N), np.float32)
    g1.launch(Kernel.library("gemm"), [In(x), In(w), Out(h)])
    g2 = KernelGraph("chaos-chain-2")
    h2 = g2.input("h", (CHAIN_BATCH, CHAIN_N), np.float32)
    w2 = g2.const("w", (CHAIN_N, CHAIN_N), np.float32)
    t = g2.temp("t", (CHAIN_BATCH, CHAIN_N), np.float32)
    y = g2.output("y", (CHAIN_BATCH, CHAIN_N), np.float32)
    g2.launch(Kernel.library("gemm"), [In(h2), In(w2), Out(t)])
    g2.launch(Kernel.library("relu"), [In(t), Out(y)])
    return g1, g2


def chain_weights(seed: int) -> np.ndarray:
    rng = np.random.default_rng(5000 + seed)
    return (rng.standard_normal((CHAIN_N, CHAIN_N)) / np.sqrt(CHAIN_N)).astype(np.float32)


@dataclass
class Submitted:
    """One job in flight: the future whose result is checked, its expected
    output, and the futures it depends on (kept referenced until it ends)."""

    kind: str
    future: Any
    output: str
    expected: np.ndarray
    keep: list[Any] = field(default_factory=list)


class JobMaker:
    """Builds and submits the jobs of a chaos run, deterministically from a seed."""

    def __init__(self, workload: Workload, requests: list[dict[str, np.ndarray]],
                 seed: int = 0) -> None:
        self.workload = workload
        self.requests = requests
        self.rng = np.random.default_rng(seed + 17)
        self.chain = chain_graphs()
        self.fresh_count = 0

    def submit(self, client: Any, kind: str, tenant: Tenant, i: int) -> Submitted:
        wl = self.workload
        req = self.requests[i % len(self.requests)]
        if kind == "plain":
            fut = client.submit_kernel_graph(wl.graph, {**tenant.consts, **req},
                                             tenant=tenant.name)
            return Submitted(kind, fut, wl.output, wl.reference(tenant, req))
        if kind == "fresh":
            self.fresh_count += 1
            fresh = Tenant(tenant.name, {k: (v + np.float32(1e-3 * self.fresh_count)
                                             ).astype(v.dtype)
                                         for k, v in tenant.consts.items()})
            fut = client.submit_kernel_graph(wl.graph, {**fresh.consts, **req},
                                             tenant=tenant.name)
            return Submitted(kind, fut, wl.output, wl.reference(fresh, req))
        if kind == "chain":
            g1, g2 = self.chain
            w = chain_weights(int(tenant.name.rsplit("-", 1)[-1]) if
                              tenant.name.rsplit("-", 1)[-1].isdigit() else 0)
            x = self.rng.standard_normal((CHAIN_BATCH, CHAIN_N)).astype(np.float32)
            first = client.submit_kernel_graph(g1, {"x": x, "w": w}, tenant=tenant.name,
                                               keep_on_device=["h"])
            second = client.submit_kernel_graph(g2, {"h": first["h"], "w": w},
                                                tenant=tenant.name)
            return Submitted(kind, second, "y", np.maximum((x @ w) @ w, 0), keep=[first])
        raise ValueError(f"unknown chaos job kind {kind!r}")
