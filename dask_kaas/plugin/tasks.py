"""The functions Dask runs on workers for kernel graphs.

They are plain task functions, so every Dask mechanism (dependencies,
retries, recomputation after a lost worker, the task stream) applies to
kernel graphs unchanged.
"""

from __future__ import annotations

from typing import Any

from ..graph.graph import KernelGraph
from ..request import GraphRequest
from .worker import worker_runtime


def run_kernel_graph(graph: KernelGraph, request: GraphRequest, *values: Any) -> dict[str, Any]:
    """Run ``graph`` on this worker's device with input ``values`` (in the
    order of ``request.inputs``); returns {output name: array or DeviceArray}."""
    runtime, plugin = worker_runtime()
    try:
        outputs, report = runtime.run(graph, request, values)
    except Exception as e:
        plugin.report(getattr(e, "report", None) or {
            "key": request.key, "graph": request.graph, "tenant": request.tenant,
            "error": type(e).__name__})
        raise
    plugin.report(report)
    return outputs


def select_output(outputs: dict[str, Any], name: str) -> Any:
    """One kept output of a graph as its own Dask key (a DeviceArray)."""
    return outputs[name]
