"""The functions Dask runs on workers for kernel graphs.

They are plain task functions, so every Dask mechanism (dependencies,
retries, recomputation after a lost worker, the task stream) applies to
kernel graphs unchanged.  Whatever a request does, only a KaasError leaves
here: the worker survives any kernel.
"""

from __future__ import annotations

from typing import Any

from ..device.user_errors import user_failure
from ..graph.errors import KaasError, KernelExecutionError
from ..graph.graph import KernelGraph
from ..limits import request_timeout
from ..request import GraphRequest
from .identity import running_identities
from .push import attach_result
from .worker import RescheduledError, worker_runtime


def run_kernel_graph(graph: KernelGraph, request: GraphRequest, *values: Any) -> dict[str, Any]:
    """Run ``graph`` on this worker's device with input ``values`` (in the
    order of ``request.inputs``); returns {output name: array or DeviceArray}."""
    runtime, plugin = worker_runtime()
    name = getattr(graph, "name", None)
    try:
        if not isinstance(graph, KernelGraph) or not isinstance(request, GraphRequest):
            raise KaasError(f"not a kernel graph request: {type(graph).__name__}, "
                            f"{type(request).__name__}")
        if runtime.broken is not None:
            plugin.await_restart(runtime.broken)
        ids = running_identities(plugin.worker, request.keep, len(values))
        timeout = request_timeout(request.timeout, graph.name)
        outputs, report = runtime.run(graph, request, values, ids, timeout)
    except RescheduledError:
        raise  # placed again by Dask: not an outcome of this request, nothing to report
    except KaasError as e:
        failure: KaasError = e
    except BaseException as e:  # noqa: BLE001 - the worker lives on, whatever happened
        failure = user_failure(KernelExecutionError, "request failed", e, graph=name)
    else:
        attach_result(report, outputs, request.push)
        plugin.report(report)
        return outputs
    plugin.report(getattr(failure, "report", None) or {
        "key": getattr(request, "key", None), "graph": name,
        "tenant": getattr(request, "tenant", None), "error": type(failure).__name__})
    raise failure


def select_output(outputs: dict[str, Any], name: str) -> Any:
    """One kept output of a graph as its own Dask key (a DeviceArray)."""
    return outputs[name]
