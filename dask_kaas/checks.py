"""Checks of what a caller passes with a submission, before anything leaves
the client.

A bad value must fail here, as a specific KaasError naming the graph and the
buffer, and not on a worker (an input of the wrong type) or in the
scheduler (a priority Dask cannot pack kills every worker's connection).
The scheduler repeats the checks that protect its own state (``access``),
since a request can be forged on the way.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from .device.handles import DeviceArray
from .graph.buffers import BufferKind
from .graph.errors import (
    BufferRoleError,
    InputMismatchError,
    KaasError,
    RequestParameterError,
    TenantError,
    UnknownBufferError,
)
from .graph.graph import KernelGraph
from .graph.names import name_problem, show

#: Dask priorities travel as 32-bit ints to the workers.
PRIORITY_RANGE = (-(2**31), 2**31 - 1)
#: Fair-share weights: beyond this range virtual time loses precision (a
#: weight of 1e-320 makes it infinite).
WEIGHT_RANGE = (1e-6, 1e6)


def check_tenant(tenant: Any, graph: str | None = None) -> str:
    problem = name_problem(tenant)
    if problem:
        raise TenantError(f"tenant {problem}", graph=graph)
    return tenant


def check_priority(priority: Any, graph: str | None = None) -> int:
    if isinstance(priority, (bool, np.bool_)) or not isinstance(priority, (int, np.integer)):
        raise RequestParameterError(f"priority must be an int, got {type(priority).__name__} "
                                    f"{show(priority)}", graph=graph)
    lo, hi = PRIORITY_RANGE
    if not lo <= priority <= hi:
        raise RequestParameterError(f"priority {show(priority)} is outside the 32-bit range "
                                    f"{lo}..{hi}", graph=graph)
    return int(priority)


def check_weight(weight: Any, graph: str | None = None, *, optional: bool = True
                 ) -> float | None:
    if weight is None and optional:
        return None
    if isinstance(weight, (bool, np.bool_)) or not isinstance(
            weight, (int, float, np.integer, np.floating)):
        raise RequestParameterError(f"weight must be a number, got {type(weight).__name__} "
                                    f"{show(weight)}", graph=graph)
    w = float(weight)
    lo, hi = WEIGHT_RANGE
    if not math.isfinite(w) or not lo <= w <= hi:
        raise RequestParameterError(f"weight must be finite and within {lo:g}..{hi:g}, "
                                    f"got {show(weight)}", graph=graph)
    return w


def _allowed_input(value: Any) -> bool:
    from distributed import Future

    if isinstance(value, np.ma.MaskedArray):  # the mask would be dropped silently
        return False
    return isinstance(value, (np.ndarray, Future, DeviceArray))


def check_input_values(graph: KernelGraph, inputs: Any) -> None:
    """Inputs are NumPy arrays (``np.array(2.0)`` for a 0-d buffer), Dask
    futures or kept device arrays: nothing else is converted behind the caller's back
    (a list, a masked array, a string, None).  Shapes and dtypes are checked by
    ``graph.validate``."""
    if not isinstance(inputs, Mapping):
        return  # graph.validate says what is wrong
    for name, value in inputs.items():
        if not _allowed_input(value):
            raise InputMismatchError(
                f"inputs must be NumPy arrays, Dask futures or kept device arrays, got "
                f"{type(value).__name__} {show(value)} (convert it with np.asarray first)",
                graph=graph.name, buffer=name if isinstance(name, str) else show(name))


def check_keep(graph: KernelGraph, keep_on_device: Iterable[str]) -> list[str]:
    if isinstance(keep_on_device, str):
        keep_on_device = [keep_on_device]
    try:
        names = list(keep_on_device)
    except TypeError:
        raise RequestParameterError(f"keep_on_device must be a list of output names, got "
                                    f"{show(keep_on_device)}", graph=graph.name) from None
    for name in names:
        buf = graph.buffers.get(name) if isinstance(name, str) else None
        if buf is None:
            raise UnknownBufferError("keep_on_device names a buffer the graph does not have",
                                     graph=graph.name, buffer=show(name))
        if buf.kind != BufferKind.OUTPUT:
            raise BufferRoleError(f"only outputs can be kept on the device; this is a "
                                  f"{buf.kind.value} buffer", graph=graph.name, buffer=name)
    return names


def check_submission(graph: Any, tenant: Any, priority: Any, weight: Any
                     ) -> tuple[str, int, float | None]:
    """The per-call parameters of ``submit_kernel_graph`` / ``map_kernel_graph``."""
    if not isinstance(graph, KernelGraph):
        raise KaasError(f"submit_kernel_graph needs a KernelGraph, got {type(graph).__name__}")
    return (check_tenant(tenant, graph.name), check_priority(priority, graph.name),
            check_weight(weight, graph.name))
