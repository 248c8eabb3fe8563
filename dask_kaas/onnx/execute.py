"""Run a kernel graph's array-function launches in this process, on NumPy.

No cache, no cluster: temps live in the graph's planned arena (zeroed
where the plan says so, as on a worker), outputs are fresh zeroed arrays.
It is the host reference of the ONNX benchmark workloads (the naive and
static baselines compute exactly what the cluster does) and a way to check
an imported model without a cluster.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ..graph.buffers import BufferKind
from ..graph.errors import InputMismatchError, KernelDefinitionError, MissingInputError
from ..graph.graph import KernelGraph
from ..graph.kernels import Kernel
from ..graph.launch import ArgRef
from ..graph.library import BUILTINS
from ..graph.memplan import plan_temps


def run_graph(graph: KernelGraph, inputs: Mapping[str, Any], xp: Any = np
              ) -> dict[str, np.ndarray]:
    """The outputs of ``graph`` for ``inputs`` (every input and const);
    ``xp`` is the array module the kernels get (NumPy, or a stand-in)."""
    arrays: dict[str, Any] = {}
    plan = plan_temps(graph)  # temps in one planned arena, as on a worker
    arena = np.zeros(plan.arena_bytes, np.uint8)
    for b in graph.buffers.values():
        if b.kind in (BufferKind.INPUT, BufferKind.CONST):
            if b.name not in inputs:
                raise MissingInputError("was given no value", graph=graph.name, buffer=b.name)
            v = np.asarray(inputs[b.name])
            if v.shape != b.shape or v.dtype != b.dtype:
                raise InputMismatchError(f"expects {b.shape} {b.dtype}, got {v.shape} "
                                         f"{v.dtype}", graph=graph.name, buffer=b.name)
            arrays[b.name] = v
        elif b.kind == BufferKind.TEMP:
            off = plan.offsets[b.name]
            arrays[b.name] = arena[off:off + b.nbytes].view(b.dtype).reshape(b.shape)
        else:
            arrays[b.name] = np.zeros(b.shape, b.dtype)
    for _ in range(graph.n_iter):
        for index, launch in enumerate(graph.launches):
            for name in plan.zero_before.get(index, ()):
                arrays[name][...] = 0
            k = launch.kernel
            if k.kind == Kernel.ARRAY:
                fn = k.fn
            elif k.kind == Kernel.LIBRARY:
                fn = BUILTINS[k.name].fn
            elif k.cpu is not None:
                fn = k.cpu
            else:
                raise KernelDefinitionError("no CPU implementation", kernel=k.name)
            assert fn is not None
            fn(xp, *[arrays[a.buffer.name] if isinstance(a, ArgRef) else a
                     for a in launch.args])
    return {b.name: arrays[b.name] for b in graph.outputs}


class GraphOnHost:
    """A picklable ``fn(**arrays) -> outputs`` running one graph on NumPy
    (what the benchmark's baselines submit as a plain Dask task)."""

    def __init__(self, graph: KernelGraph) -> None:
        self.graph = graph

    def __call__(self, **arrays: Any) -> dict[str, np.ndarray]:
        return run_graph(self.graph, arrays)
