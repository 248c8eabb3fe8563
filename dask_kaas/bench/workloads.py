"""Benchmark workloads: per-tenant constant data plus per-request inputs.

Each workload gives the kernel graph (for kaas) and a plain NumPy function of
the same work (for the naive and static baselines), so every mode computes
exactly the same thing and can be checked against the same reference.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..graph import KernelGraph
from ..workloads import jacobi, mlp, sgemm


@dataclass
class Tenant:
    name: str
    consts: dict[str, np.ndarray]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.consts.values())


@dataclass
class Workload:
    name: str
    graph: KernelGraph
    make_tenant: Callable[[int], Tenant]
    make_request: Callable[[np.random.Generator], dict[str, np.ndarray]]
    #: host_fn(**consts, **request) -> {output: array}: the same work in NumPy.
    host_fn: Callable[..., dict[str, np.ndarray]]
    output: str

    def reference(self, tenant: Tenant, request: dict[str, np.ndarray]) -> np.ndarray:
        return self.host_fn(**tenant.consts, **request)[self.output]


def mlp_host(x: np.ndarray, w1: np.ndarray, b1: np.ndarray, w2: np.ndarray, b2: np.ndarray
             ) -> dict[str, np.ndarray]:
    return {"y": np.maximum(x @ w1 + b1, 0) @ w2 + b2}


def sgemm_host(a: np.ndarray, b: np.ndarray) -> dict[str, np.ndarray]:
    return {"c": np.maximum(a @ b, 0)}


def make_jacobi_host(iterations: int) -> Callable[..., dict[str, np.ndarray]]:
    return _JacobiHost(iterations)


class _JacobiHost:
    """Picklable (for the baselines' tasks) NumPy Jacobi of fixed length."""

    def __init__(self, iterations: int) -> None:
        self.iterations = iterations

    def __call__(self, A: np.ndarray, b: np.ndarray, x0: np.ndarray) -> dict[str, np.ndarray]:
        return {"x": jacobi.reference(A, b, x0, self.iterations)}


def make_workload(name: str, weights_mib: float = 16.0, batch: int = 8) -> Workload:
    """``weights_mib`` of constant data per tenant (``onnx:<model>``: the
    model's own weights, ``batch`` rows where its batch dimension is open)."""
    if name.startswith("onnx:"):
        return onnx_workload(name[len("onnx:"):], batch)
    if name == "mlp":
        # Two square-ish layers: d x h and h x d float32, about weights_mib in all.
        d = 1024
        hidden = max(64, int(weights_mib * 2**20 / 4 / (2 * d)))
        graph = mlp.mlp_graph(batch, d, hidden, d)

        def make_tenant(i: int) -> Tenant:
            m = mlp.make_model(f"tenant-{i}", d, hidden, d, seed=1000 + i)
            return Tenant(m.tenant, {"w1": m.w1, "b1": m.b1, "w2": m.w2, "b2": m.b2})

        def make_request(rng: np.random.Generator) -> dict[str, np.ndarray]:
            return {"x": rng.standard_normal((batch, d)).astype(np.float32)}

        return Workload("mlp", graph, make_tenant, make_request, mlp_host, "y")
    if name == "sgemm":
        n = int(np.sqrt(weights_mib * 2**20 / 4))
        graph = sgemm.link_graph_rect(batch, n)

        def make_tenant(i: int) -> Tenant:
            rng = np.random.default_rng(2000 + i)
            return Tenant(f"tenant-{i}",
                          {"b": (rng.standard_normal((n, n)) / np.sqrt(n)).astype(np.float32)})

        def make_request(rng: np.random.Generator) -> dict[str, np.ndarray]:
            return {"a": rng.standard_normal((batch, n)).astype(np.float32)}

        return Workload("sgemm", graph, make_tenant, make_request, sgemm_host, "c")
    if name == "jacobi":
        n = int(np.sqrt(weights_mib * 2**20 / 4))
        iterations = 8
        graph = jacobi.jacobi_graph(n, iterations)

        def make_tenant(i: int) -> Tenant:
            A, _ = jacobi.problem(n, seed=3000 + i)
            return Tenant(f"tenant-{i}", {"A": A})

        def make_request(rng: np.random.Generator) -> dict[str, np.ndarray]:
            return {"b": rng.uniform(-1, 1, n).astype(np.float32),
                    "x0": np.zeros(n, np.float32)}

        return Workload("jacobi", graph, make_tenant, make_request,
                        make_jacobi_host(iterations), "x")
    raise ValueError(f"unknown workload {name!r}: expected mlp, sgemm, jacobi or "
                     "onnx:<light model name, bert or path to a .onnx file>")


def onnx_workload(target: str, batch: int) -> Workload:
    """An ONNX model as a workload: each tenant has its own weights for the
    same architecture (fine-tuned copies).  ``target`` is a light model of
    the onnx package (``resnet50``, ...; seeded random weights per tenant),
    ``bert`` (the BERT-style encoder) or a path (every tenant's float
    weights perturbed by 1% of seeded noise)."""
    from ..onnx import from_onnx
    from ..onnx.execute import GraphOnHost
    from ..onnx.zoo import LIGHT_MODELS, bert_encoder, light_model

    if target in LIGHT_MODELS:
        def consts_of(seed: int) -> dict[str, np.ndarray]:
            return from_onnx(light_model(target, seed=seed)[0], name=target)[1]

        graph = from_onnx(light_model(target, seed=1000)[0], name=target)[0]
    elif target == "bert":
        def consts_of(seed: int) -> dict[str, np.ndarray]:
            return from_onnx(bert_encoder(seed=seed), batch=batch, name="bert")[1]

        graph = from_onnx(bert_encoder(seed=1000), batch=batch, name="bert")[0]
    else:
        graph, base = from_onnx(target, batch=batch)

        def consts_of(seed: int) -> dict[str, np.ndarray]:
            rng = np.random.default_rng(seed)
            return {k: (v * (1 + 0.01 * rng.standard_normal(v.shape))).astype(v.dtype)
                    if v.dtype.kind == "f" else v for k, v in base.items()}

    def make_tenant(i: int) -> Tenant:
        return Tenant(f"tenant-{i}", consts_of(1000 + i))

    inputs = [b for b in graph.buffers.values() if b.kind.value == "input"]

    def make_request(rng: np.random.Generator) -> dict[str, np.ndarray]:
        out = {}
        for b in inputs:
            if b.dtype.kind == "f":
                out[b.name] = rng.standard_normal(b.shape).astype(b.dtype)
            elif b.dtype.kind == "b":
                out[b.name] = np.ones(b.shape, b.dtype)
            else:
                out[b.name] = rng.integers(0, 2, b.shape).astype(b.dtype)
        return out

    return Workload(f"onnx:{target}", graph, make_tenant, make_request, GraphOnHost(graph),
                    graph.outputs[0].name)


def run_host(fn: Callable[..., dict[str, np.ndarray]], copy_inputs: bool,
             **arrays: Any) -> dict[str, np.ndarray]:
    """The baselines' task.  ``copy_inputs`` models a device without a cache:
    every input is copied to the device (here: fresh memory) on every call."""
    if copy_inputs:
        arrays = {k: np.array(v, copy=True) for k, v in arrays.items()}
    return fn(**arrays)


def run_host_args(fn: Callable[..., dict[str, np.ndarray]], names: tuple[str, ...],
                  *arrays: Any) -> dict[str, np.ndarray]:
    """``run_host`` with positional arrays (for ``client.map``), copying inputs."""
    return run_host(fn, True, **dict(zip(names, arrays)))
