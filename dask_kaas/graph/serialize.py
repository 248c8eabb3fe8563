"""The plain dict / JSON form of a kernel graph.

The form is meant for host code in any language, so it uses only JSON types:
dtypes by name, literals as {"literal": value, "dtype": name} (non-finite
floats as the strings "nan", "inf", "-inf"; complex as [re, im]), CUDA
images base64-encoded, and array functions by importable "module:function".
Reading goes back through the graph's own builders, so a hand-written
document gets the same validation as a graph built in Python.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from .buffers import BufferKind, dtype_name
from .errors import KaasError, SerializationError
from .kernels import Kernel
from .launch import ArgRef

if TYPE_CHECKING:
    from .graph import KernelGraph

FORMAT = "dask-kaas-graph/1"


def _float_to_json(x: float) -> Any:
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return x


def _float_from_json(x: Any) -> float:
    if isinstance(x, str):
        if x not in ("nan", "inf", "-inf"):
            raise SerializationError(f"bad float literal {x!r}")
        return float(x)
    return float(x)


def literal_to_json(value: np.generic) -> dict[str, Any]:
    dt = np.dtype(value.dtype)
    v = value.item()
    if dt.kind == "c":
        out: Any = [_float_to_json(v.real), _float_to_json(v.imag)]
    elif dt.kind == "f":
        out = _float_to_json(v)
    else:
        out = v
    return {"literal": out, "dtype": dtype_name(dt)}


def literal_from_json(d: Mapping[str, Any]) -> np.generic:
    dt = np.dtype(d["dtype"])
    v = d["literal"]
    if dt.kind == "c":
        re, im = v
        return dt.type(complex(_float_from_json(re), _float_from_json(im)))
    if dt.kind == "f":
        return dt.type(_float_from_json(v))
    return dt.type(v)


def graph_to_dict(graph: KernelGraph) -> dict[str, Any]:
    kernels: list[Kernel] = []
    index: dict[int, int] = {}
    launches = []
    for launch in graph.launches:
        k = launch.kernel
        if id(k) not in index:
            index[id(k)] = len(kernels)
            kernels.append(k)
        args = []
        for a in launch.args:
            if isinstance(a, ArgRef):
                args.append({"buffer": a.buffer.name, "mode": a.mode})
            else:
                args.append(literal_to_json(a))
        launches.append({
            "kernel": index[id(k)],
            "args": args,
            "grid": list(launch.grid) if launch.grid else None,
            "block": list(launch.block) if launch.block else None,
            "shared_mem": launch.shared_mem,
        })
    kernel_dicts = []
    for k in kernels:
        try:
            kernel_dicts.append(k.to_dict())
        except SerializationError as e:
            raise SerializationError(e.detail, graph=graph.name, kernel=k.name) from None
    return {
        "format": FORMAT,
        "name": graph.name,
        "n_iter": graph.n_iter,
        "buffers": [{"name": b.name, "shape": list(b.shape), "dtype": dtype_name(b.dtype),
                     "kind": b.kind.value} for b in graph.buffers.values()],
        "kernels": kernel_dicts,
        "launches": launches,
    }


def graph_from_dict(d: Mapping[str, Any]) -> KernelGraph:
    from .graph import KernelGraph
    from .launch import In, InOut, Out

    if not isinstance(d, Mapping):
        raise SerializationError(f"a graph document must be a mapping, got {type(d).__name__}")
    fmt = d.get("format", FORMAT)
    if fmt != FORMAT:
        raise SerializationError(f"unsupported graph format {fmt!r} (expected {FORMAT!r})")
    name = d.get("name", "?")
    try:
        g = KernelGraph(d["name"], n_iter=d.get("n_iter", 1))
        builders = {BufferKind.INPUT: g.input, BufferKind.CONST: g.const,
                    BufferKind.TEMP: g.temp, BufferKind.OUTPUT: g.output}
        for b in d["buffers"]:
            builders[BufferKind(b["kind"])](b["name"], tuple(b["shape"]), b["dtype"])
        kernels = [Kernel.from_dict(k) for k in d["kernels"]]
        wrap = {"in": In, "out": Out, "inout": InOut}
        for i, ld in enumerate(d["launches"]):
            args: list[Any] = []
            for a in ld["args"]:
                if "buffer" in a:
                    buf = g.buffers.get(a["buffer"])
                    if buf is None:
                        raise SerializationError(
                            f"launch {i} names unknown buffer {a['buffer']!r}", graph=name)
                    args.append(wrap[a.get("mode", "in")](buf))
                else:
                    args.append(literal_from_json(a))
            g.launch(kernels[ld["kernel"]], args, grid=ld.get("grid"), block=ld.get("block"),
                     shared_mem=ld.get("shared_mem", 0))
    except KaasError:
        raise
    except (KeyError, IndexError, TypeError, ValueError) as e:
        raise SerializationError(f"malformed graph document: {type(e).__name__}: {e}",
                                 graph=name) from None
    return g
