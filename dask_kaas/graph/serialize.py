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

from . import reader
from .buffers import MAX_DIM, BufferKind, dtype_name
from .errors import KaasError, SerializationError
from .kernels import Kernel
from .launch import MAX_SHARED_MEM, ArgRef
from .names import show
from .reader import Where

if TYPE_CHECKING:
    from .graph import KernelGraph

FORMAT = "dask-kaas-graph/1"


def _float_to_json(x: float) -> Any:
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return x


def _float_from_json(x: Any, at: Where, dt: np.dtype) -> float:
    """A finite JSON number, or one of the strings for non-finite values,
    that fits the float dtype (no silent overflow to inf)."""
    if isinstance(x, str):
        if x not in ("nan", "inf", "-inf"):
            raise at.fail(f"bad float literal {show(x)} (numbers, or 'nan', 'inf', '-inf')")
        return float(x)
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise at.fail(f"must be a number, got {type(x).__name__} {show(x)}")
    try:
        v = float(x)
    except OverflowError:
        v = math.inf
    if not math.isfinite(v) or abs(v) > float(np.finfo(dt).max):
        raise at.fail(f"{show(x)} does not fit {dt.name}")
    return v


def _literal_dtype_check(dt: np.dtype) -> str | None:
    if dt.kind in "fc" and dt.itemsize > (8 if dt.kind == "f" else 16):
        return f"{dt.name} literals have no exact JSON form (and no CUDA type)"
    return None


def literal_to_json(value: np.generic) -> dict[str, Any]:
    dt = np.dtype(value.dtype)
    problem = _literal_dtype_check(dt)
    if problem:
        raise SerializationError(problem)
    v = value.item()
    if dt.kind == "c":
        out: Any = [_float_to_json(v.real), _float_to_json(v.imag)]
    elif dt.kind == "f":
        out = _float_to_json(v)
    else:
        out = v
    return {"literal": out, "dtype": dtype_name(dt)}


def literal_from_json(d: Any, at: Where) -> np.generic:
    """A literal argument, exactly: an int dtype takes an int in its range, a
    bool dtype true or false, a float dtype a number that fits it."""
    d = reader.record(d, at, ("literal", "dtype"))
    dt = reader.dtype(d["dtype"], at.at("dtype"))
    problem = _literal_dtype_check(dt)
    if problem:
        raise at.at("dtype").fail(problem)
    v, vat = d["literal"], at.at("literal")
    if dt.kind == "b":
        if not isinstance(v, bool):
            raise vat.fail(f"a bool literal must be true or false, got {show(v)}")
        return dt.type(v)
    if dt.kind in "iu":
        info = np.iinfo(dt)
        return dt.type(reader.integer(v, vat, int(info.min), int(info.max)))
    part = np.dtype(f"f{dt.itemsize // 2}") if dt.kind == "c" else dt
    if dt.kind == "c":
        pair = reader.array(v, vat)
        if len(pair) != 2:
            raise vat.fail(f"a complex literal is [real, imag], got {show(v)}")
        re, im = (_float_from_json(x, vat.at(i), part) for i, x in enumerate(pair))
        return dt.type(complex(re, im))
    return dt.type(_float_from_json(v, vat, part))


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


def graph_from_json(text: Any) -> KernelGraph:
    return graph_from_dict(reader.parse_document(text))


def graph_from_dict(d: Any) -> KernelGraph:
    """Build a graph from its dict form, checking every field first (see
    :mod:`.reader`); the graph's own builders then check the rest, and what
    they refuse is re-raised as a SerializationError (the builder's error is
    its cause), so a reader has one exception to catch."""
    try:
        return _build(d)
    except SerializationError:
        raise
    except KaasError as e:
        raise SerializationError(f"{type(e).__name__}: {e.detail}", graph=e.graph,
                                 launch=e.launch, kernel=e.kernel, buffer=e.buffer) from e


def _build(d: Any) -> KernelGraph:
    from .graph import KernelGraph

    top = Where()
    d = reader.record(d, top, ("name", "buffers", "kernels", "launches"),
                      ("format", "n_iter"))
    if d.get("format", FORMAT) != FORMAT:
        raise top.at("format").fail(f"unsupported graph format {show(d['format'])} "
                                    f"(expected {FORMAT!r})")
    name = reader.name(d["name"], top.at("name"))
    top = Where(graph=name)
    n_iter = reader.integer(d.get("n_iter", 1), top.at("n_iter"), 1, reader.max_n_iter(),
                            bound="kaas.max-n-iter")
    g = KernelGraph(name, n_iter=n_iter)
    builders = {BufferKind.INPUT: g.input, BufferKind.CONST: g.const,
                BufferKind.TEMP: g.temp, BufferKind.OUTPUT: g.output}
    kinds = [k.value for k in BufferKind]
    for i, b in enumerate(reader.array(d["buffers"], top.at("buffers"))):
        at = top.at("buffers").at(i)
        b = reader.record(b, at, ("name", "shape", "dtype", "kind"))
        bname = reader.name(b["name"], at.at("name"))
        at = at.about(bname)
        kind = BufferKind(reader.one_of(b["kind"], at.at("kind"), kinds))
        shape = [reader.integer(x, at.at("shape").at(j), 0, MAX_DIM)
                 for j, x in enumerate(reader.array(b["shape"], at.at("shape")))]
        builders[kind](bname, tuple(shape),
                       reader.dtype(b["dtype"], at.at("dtype")))
    kernels = [Kernel.from_dict(k, top.at("kernels").at(i))
               for i, k in enumerate(reader.array(d["kernels"], top.at("kernels")))]
    for i, ld in enumerate(reader.array(d["launches"], top.at("launches"))):
        _read_launch(g, kernels, ld, top.at("launches").at(i))
    return g


def _read_launch(g: KernelGraph, kernels: list[Kernel], ld: Any, at: Where) -> None:
    from .launch import In, InOut, Out

    wrap = {"in": In, "out": Out, "inout": InOut}
    ld = reader.record(ld, at, ("kernel", "args"), ("grid", "block", "shared_mem"))
    if not kernels:
        raise at.at("kernel").fail("the document has no kernels")
    kernel = kernels[reader.integer(ld["kernel"], at.at("kernel"), 0, len(kernels) - 1)]
    args: list[Any] = []
    for j, a in enumerate(reader.array(ld["args"], at.at("args"))):
        aat = at.at("args").at(j)
        if isinstance(a, Mapping) and "buffer" in a:
            a = reader.record(a, aat, ("buffer",), ("mode",))
            bname = reader.string(a["buffer"], aat.at("buffer"))
            buf = g.buffers.get(bname)
            if buf is None:
                raise aat.fail(f"names unknown buffer {show(bname)}")
            aat = aat.about(bname)
            args.append(wrap[reader.one_of(a.get("mode", "in"), aat.at("mode"), list(wrap))](buf))
        else:
            args.append(literal_from_json(a, aat))
    dims = {}
    for key in ("grid", "block"):
        v = ld.get(key)
        if v is not None:
            dims[key] = [reader.integer(x, at.at(key).at(k), 1, 2**31 - 1)
                         for k, x in enumerate(reader.array(v, at.at(key)))]
    shared = reader.integer(ld.get("shared_mem", 0), at.at("shared_mem"), 0, MAX_SHARED_MEM)
    g.launch(kernel, args, grid=dims.get("grid"), block=dims.get("block"), shared_mem=shared)
