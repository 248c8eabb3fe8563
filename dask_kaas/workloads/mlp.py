"""The multi-tenant MLP workload: each tenant has its own weights as `const`.

Every request is a two-layer perceptron (gemm + bias + relu, gemm + bias) on
a fresh batch.  The weights are consts, so they are sent to the cluster once
and cached on a worker's device; later requests of the same tenant are placed
on the worker that holds them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from ..graph import In, Kernel, KernelGraph, Out

gemm = Kernel.library("gemm")
add = Kernel.library("add")
relu = Kernel.library("relu")


@dataclass
class Model:
    """One tenant's weights."""

    tenant: str
    w1: np.ndarray
    b1: np.ndarray
    w2: np.ndarray
    b2: np.ndarray

    @property
    def nbytes(self) -> int:
        return self.w1.nbytes + self.b1.nbytes + self.w2.nbytes + self.b2.nbytes

    def reference(self, x: np.ndarray) -> np.ndarray:
        h = np.maximum(x @ self.w1 + self.b1, 0)
        return h @ self.w2 + self.b2


def make_model(tenant: str, d_in: int, hidden: int, d_out: int, seed: int) -> Model:
    rng = np.random.default_rng(seed)
    scale = 1.0 / np.sqrt(d_in)
    return Model(tenant,
                 (rng.standard_normal((d_in, hidden)) * scale).astype(np.float32),
                 rng.standard_normal(hidden).astype(np.float32) * 0.1,
                 (rng.standard_normal((hidden, d_out)) / np.sqrt(hidden)).astype(np.float32),
                 rng.standard_normal(d_out).astype(np.float32) * 0.1)


def mlp_graph(batch: int, d_in: int, hidden: int, d_out: int) -> KernelGraph:
    g = KernelGraph(f"mlp-{batch}x{d_in}x{hidden}x{d_out}")
    x = g.input("x", (batch, d_in), np.float32)
    w1 = g.const("w1", (d_in, hidden), np.float32)
    b1 = g.const("b1", (hidden,), np.float32)
    w2 = g.const("w2", (hidden, d_out), np.float32)
    b2 = g.const("b2", (d_out,), np.float32)
    h = g.temp("h", (batch, hidden), np.float32)
    a = g.temp("a", (batch, hidden), np.float32)
    z = g.temp("z", (batch, d_out), np.float32)
    y = g.output("y", (batch, d_out), np.float32)
    g.launch(gemm, [In(x), In(w1), Out(h)])
    g.launch(add, [In(h), In(b1), Out(a)])
    g.launch(relu, [In(a), Out(h)])
    g.launch(gemm, [In(h), In(w2), Out(z)])
    g.launch(add, [In(z), In(b2), Out(y)])
    return g


def inputs_for(model: Model, x: np.ndarray) -> dict[str, np.ndarray]:
    return {"x": x, "w1": model.w1, "b1": model.b1, "w2": model.w2, "b2": model.b2}


def requests(models: list[Model], n: int, batch: int, d_in: int, seed: int = 0
             ) -> Iterator[tuple[Model, np.ndarray]]:
    """``n`` requests, tenants taking turns, each with a fresh batch."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        yield models[i % len(models)], rng.standard_normal((batch, d_in)).astype(np.float32)
