"""Whole-graph validation: data flow, inputs, and device capacity."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from .buffers import BufferKind
from .errors import (
    GraphError,
    GraphTooLargeError,
    InputMismatchError,
    LaunchConfigError,
    MissingInputError,
    UnexpectedInputError,
    UninitializedReadError,
    UnwrittenOutputError,
)

if TYPE_CHECKING:
    from .graph import KernelGraph


def check_dataflow(graph: KernelGraph) -> None:
    """Walk the launches in program order: a temp or output must be written
    before it is read, and every output must be written at least once."""
    if not graph.launches:
        raise GraphError("the graph has no launches", graph=graph.name)
    initialized = {b.name for b in graph.inputs}
    for index, launch in enumerate(graph.launches):
        for arg in launch.buffer_args():
            if arg.reads and arg.buffer.name not in initialized:
                raise UninitializedReadError(
                    f"{arg.buffer.kind.value} buffer is read before any launch writes it",
                    graph=graph.name, launch=index, kernel=launch.kernel.name,
                    buffer=arg.buffer.name)
        initialized.update(a.buffer.name for a in launch.buffer_args() if a.writes)
    for buf in graph.outputs:
        if buf.name not in initialized:
            raise UnwrittenOutputError("output buffer is never written by any launch",
                                       graph=graph.name, buffer=buf.name)


def value_signature(value: Any) -> tuple[tuple[int, ...], np.dtype] | None:
    """Shape and dtype of an input value when known locally (arrays and
    device-array handles); None for values only the cluster knows (futures)."""
    shape = getattr(value, "shape", None)
    dtype = getattr(value, "dtype", None)
    if shape is None or dtype is None:
        return None
    try:
        return tuple(int(d) for d in shape), np.dtype(dtype)
    except TypeError:
        return None


def check_inputs(graph: KernelGraph, inputs: Mapping[str, Any]) -> None:
    if not isinstance(inputs, Mapping):
        raise MissingInputError(f"inputs must be a mapping of input names to values, "
                                f"got {type(inputs).__name__}", graph=graph.name)
    expected = {b.name: b for b in graph.inputs}
    for name in inputs:
        if name not in expected:
            known = graph.buffers.get(name)
            why = (f"it is a {known.kind.value} buffer, not an input" if known is not None
                   else "the graph has no buffer of this name")
            raise UnexpectedInputError(f"a value was given but {why}; inputs are "
                                       f"{sorted(expected)}", graph=graph.name, buffer=name)
    for name, buf in expected.items():
        if name not in inputs:
            raise MissingInputError(f"{buf.kind.value} buffer {buf.shape} {buf.dtype} "
                                    "was given no value", graph=graph.name, buffer=name)
        value = inputs[name]
        if isinstance(value, (list, tuple, int, float, complex, bool)):
            raise InputMismatchError(
                f"inputs must be NumPy arrays (or Dask futures of them), got "
                f"{type(value).__name__}", graph=graph.name, buffer=name)
        sig = value_signature(value)
        if sig is None:
            continue
        shape, dtype = sig
        if shape != buf.shape or dtype != buf.dtype:
            raise InputMismatchError(
                f"expects shape {buf.shape} dtype {buf.dtype}, got shape {shape} dtype {dtype}",
                graph=graph.name, buffer=name)


def check_capacity(graph: KernelGraph, capacity: int) -> None:
    need = graph.nbytes
    if need > capacity:
        largest = max(graph.buffers.values(), key=lambda b: b.nbytes)
        raise GraphTooLargeError(
            f"the graph needs {need} bytes of device memory at once but the largest "
            f"worker device holds {capacity} bytes (largest buffer: {largest.name!r}, "
            f"{largest.nbytes} bytes)", graph=graph.name)


def check_shared_memory(graph: KernelGraph, limit: int) -> None:
    """Every launch's dynamic shared memory within a device's per-block
    limit (its opt-in maximum: 227 KiB on Hopper, 99 KiB on sm_86/89)."""
    for index, launch in enumerate(graph.launches):
        if launch.shared_mem > limit:
            raise LaunchConfigError(
                f"asks for {launch.shared_mem} bytes of dynamic shared memory per block but "
                f"the device allows at most {limit}", graph=graph.name, launch=index,
                kernel=launch.kernel.name)


def validate_graph(graph: KernelGraph, inputs: Mapping[str, Any] | None,
                   device_capacity: int | None) -> None:
    check_dataflow(graph)
    if inputs is not None:
        check_inputs(graph, inputs)
    if device_capacity is not None:
        check_capacity(graph, device_capacity)


__all__ = ["validate_graph", "check_dataflow", "check_inputs", "check_capacity",
           "check_shared_memory",
           "BufferKind"]
