"""ONNX model -> KernelGraph plus its consts.

All shape and constant work happens here, once, not per request: graph
inputs get fixed shapes (symbolic dimensions from ``batch=``), each node's
output types come from ONNX's own shape inference (node by node, with the
constant inputs it needs), nodes whose inputs are all constants are folded
with the same NumPy code that runs them on a worker, and every remaining
node becomes one launch of the operator's array-function kernel with its
attributes as literals.

Buffers: graph inputs are ``input`` buffers, initializers (and folded
constants a launch reads) ``const`` buffers, graph outputs ``output``
buffers and everything in between ``temp`` buffers (whose memory the worker
shares between temps that are never live together).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..graph.errors import InputMismatchError, KaasError
from ..graph.graph import KernelGraph
from ..graph.kernels import Kernel
from ..graph.launch import In, Out
from ..graph.names import name_problem, show
from .attrs import Attrs, Encoder
from .errors import OnnxImportError, UnknownDimensionError, UnsupportedOperatorError
from .kernels import KERNELS
from .load import CODES, dtype_of, load_model, tensor_array
from .ops import DOMAINS, FOLD_ONLY, OPS, NodeCtx, Value

#: Oldest default-domain opset accepted (the light model zoo is opset 9).
MIN_OPSET = 9
#: Largest constant the importer computes (ConstantOfShape, Range, folds).
MAX_FOLD_BYTES = 2**31
#: Integer constants up to this many elements are shown to shape inference.
MAX_SHAPE_DATA = 1 << 16
#: Most nodes a model may have.
MAX_NODES = 200_000


def _short(text: str, limit: int = 300) -> str:
    """A message from ONNX, bounded and on one line."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."


@dataclass
class _Step:
    """One launch to emit."""

    op: str
    node: str
    ins: list[str]
    outs: list[str]
    lits: list[np.generic]


def _fixed_dims(batch: Any) -> tuple[int | None, dict[str, int]]:
    if batch is None:
        return None, {}
    if isinstance(batch, (int, np.integer)) and not isinstance(batch, bool):
        if not 1 <= int(batch) <= 2**31 - 1:
            raise OnnxImportError(f"batch={int(batch)} is outside 1..2**31-1")
        return int(batch), {}
    if isinstance(batch, Mapping):
        dims: dict[str, int] = {}
        for k, v in batch.items():
            if not isinstance(k, str) or isinstance(v, bool) or \
                    not isinstance(v, (int, np.integer)) or not 0 <= int(v) <= 2**31 - 1:
                raise OnnxImportError(f"batch= maps dimension names to sizes 0..2**31-1, got "
                                      f"{show(k)}: {show(v)}")
            dims[k] = int(v)
        return None, dims
    raise OnnxImportError(f"batch= is an int or a mapping of dimension names to sizes, got "
                          f"{type(batch).__name__}")


class _Importer:
    def __init__(self, model: Any, batch: Any, name: str | None,
                 shapes: Mapping[str, tuple[int, ...]] | None = None,
                 initializers: Mapping[str, np.ndarray] | None = None,
                 memo: dict[Any, Any] | None = None) -> None:
        import onnx

        self.onnx = onnx
        self.model = model
        self.batch, self.dims = _fixed_dims(batch)
        self.shapes = dict(shapes or {})
        self.initializers = initializers
        #: Folded constants of earlier imports of the same model: a node whose
        #: constant inputs are the very same arrays gives the same arrays, so
        #: graphs of one model at several shapes share their weights.
        self.memo = memo
        self._index = -1
        self.fuse = True
        g = model.graph
        gname = name if name is not None else (g.name or "onnx_model")
        if name is None and name_problem(gname):
            gname = "onnx_model"
        self.name = gname
        self.values: dict[str, Value] = {}
        self.steps: list[_Step] = []
        self.inputs: list[str] = []
        self.opset = self._opset()

    def fail(self, msg: str) -> OnnxImportError:
        return OnnxImportError(msg, graph=self.name)

    def _opset(self) -> int | None:
        version = None
        for imp in self.model.opset_import:
            if imp.domain in ("", "ai.onnx"):
                version = int(imp.version)
        if version is None:
            return None  # a model of other domains only; a default-domain node is refused
        newest = self.onnx.defs.onnx_opset_version()
        if not MIN_OPSET <= version <= newest:
            raise UnsupportedOperatorError(f"opset {version} is outside the supported "
                                           f"{MIN_OPSET}..{newest}", graph=self.name)
        return version

    # -- inputs -----------------------------------------------------------------------
    def _input_shape(self, vi: Any) -> tuple[tuple[int, ...], np.dtype]:
        t = vi.type
        if t.WhichOneof("value") != "tensor_type":
            raise UnsupportedOperatorError(f"graph input {vi.name!r} is not a tensor",
                                           graph=self.name)
        dt = dtype_of(t.tensor_type.elem_type, f"graph input {vi.name!r}")
        if not t.tensor_type.HasField("shape"):
            raise UnknownDimensionError(f"graph input {vi.name!r} has no declared shape: "
                                        "a kernel graph needs static shapes",
                                        graph=self.name)
        shape = []
        given = self.shapes.get(vi.name)
        dims = list(t.tensor_type.shape.dim)
        if given is not None and len(given) != len(dims):
            raise InputMismatchError(f"input {vi.name!r} has {len(given)} dimensions, the "
                                     f"model declares {len(dims)}", graph=self.name)
        for i, d in enumerate(dims):
            if given is not None:
                if d.HasField("dim_value") and d.dim_value != given[i]:
                    raise InputMismatchError(
                        f"input {vi.name!r} dimension {i} is {given[i]}, the model fixes it "
                        f"at {d.dim_value}", graph=self.name)
                shape.append(int(given[i]))
            elif d.HasField("dim_value"):
                if d.dim_value < 0:
                    raise self.fail(f"graph input {vi.name!r} dimension {i} is "
                                    f"{d.dim_value}")
                shape.append(int(d.dim_value))
            elif d.HasField("dim_param") and d.dim_param in self.dims:
                shape.append(self.dims[d.dim_param])
            elif i == 0 and self.batch is not None:
                shape.append(self.batch)
            else:
                label = f" ({d.dim_param!r})" if d.HasField("dim_param") else ""
                raise UnknownDimensionError(
                    f"graph input {vi.name!r} dimension {i}{label} is not fixed: pass "
                    f"batch=<int> for the first dimension or batch={{name: size}}",
                    graph=self.name)
        return tuple(shape), dt

    def _read_graph_io(self) -> None:
        g = self.model.graph
        if g.sparse_initializer:
            raise UnsupportedOperatorError("sparse initializers are not supported",
                                           graph=self.name)
        for t in g.initializer:
            if t.name in self.values:
                raise self.fail(f"initializer {t.name!r} is defined twice")
            arr = self.initializers.get(t.name) if self.initializers is not None else None
            if arr is None:
                arr = tensor_array(t, f"initializer {t.name!r}")
            self.values[t.name] = Value(arr.shape, arr.dtype, arr)
        for vi in g.input:
            if vi.name in self.values:
                continue  # an initializer listed as an input (IR < 4): a const
            shape, dt = self._input_shape(vi)
            self.values[vi.name] = Value(shape, dt)
            self.inputs.append(vi.name)

    # -- nodes ---------------------------------------------------------------------------
    def _node_name(self, index: int, node: Any) -> str:
        return node.name if node.name else f"#{index} {node.op_type}"

    def _attrs(self, node: Any, label: str) -> dict[str, Any]:
        from onnx import helper

        out: dict[str, Any] = {}
        for a in node.attribute:
            if a.ref_attr_name:
                raise UnsupportedOperatorError("a reference attribute", node=label,
                                               op=node.op_type, graph=self.name)
            if a.type in (5, 10, 11, 12, 13, 14):  # GRAPH(S), SPARSE_TENSOR(S), TYPE_PROTO(S)
                raise UnsupportedOperatorError(f"attribute {a.name!r} of type "
                                               f"{a.type}", node=label, op=node.op_type,
                                               graph=self.name)
            try:
                v = helper.get_attribute_value(a)
            except Exception as e:  # noqa: BLE001 - a malformed attribute
                raise self.fail(f"node {label!r}: attribute {a.name!r} cannot be read: "
                                f"{show(str(e))}") from None
            if isinstance(v, bytes):
                v = v.decode("utf-8", "replace")
            elif isinstance(v, list):
                v = [x.decode("utf-8", "replace") if isinstance(x, bytes) else x for x in v]
            out[a.name] = v
        return out

    def _infer(self, schema: Any, node: Any, ins: list[Value | None], label: str
               ) -> list[Value]:
        from onnx import helper, shape_inference

        types = {}
        data = {}
        for name, v in zip(node.input, ins):
            if v is None:
                continue
            types[name] = helper.make_tensor_type_proto(CODES[v.dtype], list(v.shape))
            if v.const is not None and v.const.dtype.kind in "iu" and \
                    v.const.size <= MAX_SHAPE_DATA:
                from onnx import numpy_helper

                data[name] = numpy_helper.from_array(v.const, name)
        try:
            res = shape_inference.infer_node_outputs(
                schema, node, types, data, opset_imports=list(self.model.opset_import))
        except Exception as e:  # noqa: BLE001 - InferenceError, ValidationError, ...
            raise UnsupportedOperatorError(
                f"shape inference refuses the node: {_short(str(e))}", node=label,
                op=node.op_type, graph=self.name) from None
        outs = []
        for name in node.output:
            if not name:
                continue
            t = res.get(name)
            tt = t.tensor_type if t is not None and t.HasField("tensor_type") else None
            if tt is None or not tt.HasField("shape") or any(
                    not d.HasField("dim_value") for d in tt.shape.dim):
                raise UnsupportedOperatorError(
                    f"the shape of output {name!r} depends on runtime values (give "
                    "shape-like inputs as initializers)", node=label, op=node.op_type,
                    graph=self.name)
            dt = dtype_of(tt.elem_type, f"node {label!r} output {name!r}")
            outs.append(Value(tuple(int(d.dim_value) for d in tt.shape.dim), dt))
        return outs

    def _fold_only(self, op: str, node: Any, ctx: NodeCtx, label: str) -> list[np.ndarray]:
        def need(i: int, what: str) -> np.ndarray:
            v = ctx.const(i, what)
            if v is None:
                raise ctx.fail(f"input {i} ({what}) is missing")
            return v

        if op == "Shape":
            x = ctx.ins[0]
            assert x is not None
            dims = list(x.shape)
            start = ctx.attr("start", 0)
            end = ctx.attr("end", len(dims))
            return [np.array(dims[slice(start, end)], dtype=np.int64)]
        if op == "Size":
            x = ctx.ins[0]
            assert x is not None
            return [np.array(int(np.prod(x.shape, dtype=object)), dtype=np.int64)]
        if op == "Constant":
            if len(ctx.attrs) != 1:
                raise ctx.fail(f"Constant needs exactly one value attribute, got "
                               f"{sorted(ctx.attrs)}")
            (key, v), = ctx.attrs.items()
            if key == "value":
                return [tensor_array(v, f"node {label!r} value")]
            kinds = {"value_float": np.float32, "value_floats": np.float32,
                     "value_int": np.int64, "value_ints": np.int64}
            if key not in kinds:
                raise ctx.fail(f"Constant attribute {key!r}")
            return [np.array(v, dtype=kinds[key])]
        if op == "ConstantOfShape":
            shape = [int(d) for d in need(0, "shape").reshape(-1)]
            value = ctx.attr("value")
            fill = np.zeros(1, np.float32) if value is None else \
                tensor_array(value, f"node {label!r} value").reshape(-1)
            if fill.size != 1 or any(d < 0 for d in shape):
                raise ctx.fail(f"shape {shape} / value of {fill.size} elements")
            self._fold_room(int(np.prod(shape, dtype=object)) * fill.dtype.itemsize, ctx)
            return [np.full(shape, fill[0], dtype=fill.dtype)]
        start, limit, delta = (need(i, w).reshape(()) for i, w in
                               enumerate(("start", "limit", "delta")))
        if float(delta) == 0:
            raise ctx.fail("a delta of 0")
        n = max(int(np.ceil((float(limit) - float(start)) / float(delta))), 0)
        self._fold_room(n * start.dtype.itemsize, ctx)
        return [(start + np.arange(n, dtype=start.dtype) * delta).astype(start.dtype)]

    def _fold_room(self, nbytes: int, ctx: NodeCtx) -> None:
        if nbytes > MAX_FOLD_BYTES:
            raise ctx.fail(f"a constant of {nbytes} bytes (more than {MAX_FOLD_BYTES})")

    def _node(self, index: int, node: Any) -> None:
        from onnx import defs

        label = self._node_name(index, node)
        op = node.op_type
        domain = "" if node.domain in ("", "ai.onnx") else node.domain
        spec = OPS.get(op)
        if domain and (spec is None or DOMAINS.get(op) != domain):
            raise UnsupportedOperatorError(
                f"operator domain {node.domain!r}: the table has the default ai.onnx "
                f"domain's operators and {sorted(DOMAINS)} of ai.onnx.ml", node=label, op=op,
                graph=self.name)
        if spec is None or DOMAINS.get(op, "") != domain:
            raise UnsupportedOperatorError("the operator is not in the table", node=label,
                                           op=op, graph=self.name)
        if not domain and self.opset is None:
            raise self.fail(f"node {label!r} ({op}) is of the default domain, which the "
                            "model imports no opset of")
        version = self.opset if not domain else max(
            (int(o.version) for o in self.model.opset_import if o.domain == domain), default=1)
        try:
            schema = defs.get_schema(op, version, domain)
        except Exception:  # noqa: BLE001 - not defined at this opset
            raise UnsupportedOperatorError(f"the operator does not exist at opset "
                                           f"{self.opset}", node=label, op=op,
                                           graph=self.name) from None
        attrs = self._attrs(node, label)
        ins: list[Value | None] = []
        for name in node.input:
            if not name:
                ins.append(None)
                continue
            v = self.values.get(name)
            if v is None:
                raise self.fail(f"node {label!r} ({op}) reads {show(name)}, which no graph "
                                "input, initializer or earlier node defines")
            ins.append(v)
        ctx = NodeCtx(label, op, int(schema.since_version), attrs, ins)
        outs = [o for o in node.output if o]
        if len(outs) != len(node.output) and node.output[-1] == "" and \
                any(o == "" for o in node.output[:len(outs)]):
            raise ctx.fail("an optional output left out before a given one")
        for o in outs:
            if o in self.values:
                raise self.fail(f"node {label!r} ({op}) writes {show(o)}, which is "
                                "already defined")
        if op in FOLD_ONLY:
            if op not in ("Shape", "Size"):
                for i, v in enumerate(ins):
                    if v is not None and v.const is None:
                        ctx.const(i, "a value the importer must compute")
            results = self._memo(("node", index, tuple(v.shape for v in ins if v)),
                                 [v.const for v in ins if v is not None and v.const is not None],
                                 lambda: self._fold_only(op, node, ctx, label))
            if len(results) != len(outs):
                raise ctx.fail(f"{len(outs)} outputs")
            for name, r in zip(outs, results):
                r = np.array(r, order="C", copy=None)
                dtype_of(CODES.get(r.dtype, 0), f"node {label!r} output")
                self.values[name] = Value(r.shape, r.dtype, r)
            return
        if len(outs) > spec.max_outputs:
            raise ctx.fail(f"{len(outs)} outputs (training outputs or indices are not "
                           "supported)")
        if spec.infer is not None:
            out_values = spec.infer(ctx)
        elif op in ("Dropout", "Identity") and ins and ins[0] is not None:
            x = ins[0]  # the data passes through; Dropout's mask is all true
            out_values = [Value(x.shape, x.dtype), Value(x.shape, np.dtype(np.bool_))
                          ][:len(outs)]
        else:
            out_values = self._infer(schema, node, ins, label)
        ctx.outs = out_values
        enc = Encoder()
        spec.encode(ctx, enc)
        params = set(spec.params(ctx))
        buf_idx = [i for i in range(len(ins)) if i not in params]
        while buf_idx and ins[buf_idx[-1]] is None:
            buf_idx.pop()
        if any(ins[i] is None for i in buf_idx):
            raise ctx.fail("an optional input left out before a given one")
        buf_ins = [ins[i] for i in buf_idx]
        if all(v is not None and v.const is not None for v in buf_ins):
            self._fold(spec, ctx, [v.const for v in buf_ins], outs, out_values,
                       enc.items)  # type: ignore[union-attr]
            return
        for name, v in zip(outs, out_values):
            self.values[name] = v
        if op == "Conv":
            outs = outs + self._conv_scratch(label, buf_ins, out_values[0], enc.items)
        self.steps.append(_Step(op, label, [node.input[i] for i in buf_idx], outs,
                                enc.items))

    def _memo(self, key: Any, inputs: list[np.ndarray],
              compute: Any) -> list[np.ndarray]:
        if self.memo is None:
            return compute()
        hit = self.memo.get(key)
        if hit is not None and len(hit[0]) == len(inputs) and all(
                a is b for a, b in zip(hit[0], inputs)):
            return hit[1]
        results = compute()
        self.memo[key] = (list(inputs), results)
        return results

    def _fold(self, spec: Any, ctx: NodeCtx, arrays: list[np.ndarray], outs: list[str],
              values: list[Value], lits: list[np.generic]) -> None:
        for v in values:
            self._fold_room(int(np.prod(v.shape, dtype=object)) * v.dtype.itemsize, ctx)

        def compute() -> list[np.ndarray]:
            results = [np.empty(v.shape, v.dtype) for v in values]
            try:
                with np.errstate(all="ignore"):
                    spec.compute(np, arrays, results, Attrs(lits))
            except Exception as e:  # noqa: BLE001 - the constants do not fit the operator
                raise OnnxImportError(f"node {ctx.name!r} ({ctx.op}): folding its constant "
                                      f"inputs failed: {type(e).__name__}: {show(str(e))}",
                                      graph=self.name) from None
            return results

        results = self._memo(("node", self._index, tuple(v.shape for v in values)), arrays,
                             compute)
        for name, r, v in zip(outs, results, values):
            self.values[name] = Value(v.shape, v.dtype, r)

    def _conv_scratch(self, label: str, ins: list[Any], out: Value,
                      lits: list[np.generic]) -> list[str]:
        """A temp for a Conv's im2col columns (none for a 1x1, stride-1,
        unpadded Conv, which multiplies its input directly): planned with the
        other temps, so a worker allocates nothing while the Conv runs."""
        a = Attrs(lits)
        a.int()
        pads, strides = a.ints(), a.ints()
        x, w = ins[0], ins[1]
        k = int(np.prod(w.shape[2:]))
        if k == 1 and all(s == 1 for s in strides) and not any(pads):
            return []
        name = self._fresh(f"{label}/im2col")
        self.values[name] = Value((x.shape[0], x.shape[1], k) + tuple(out.shape[2:]), x.dtype)
        return [name]

    # -- fusion ---------------------------------------------------------------------------
    def _fresh(self, base: str) -> str:
        name = base
        while name in self.values:
            name += "_"
        return name

    def _fuse(self) -> None:
        """Inference-time fusions, exact up to float rounding: a
        BatchNormalization right after a Conv with constant weights is folded
        into those weights, and a Relu right after a Conv runs inside it.
        Only when the Conv's output has no other reader (nor is an output)."""
        outputs = {o.name for o in self.model.graph.output}
        readers: dict[str, list[int]] = {}
        for i, s in enumerate(self.steps):
            for n in s.ins:
                readers.setdefault(n, []).append(i)
        dropped: set[int] = set()
        for s in self.steps:
            if s.op != "Conv":
                continue
            while True:
                o = s.outs[0]
                use = readers.get(o, [])
                if len(use) != 1 or o in outputs:
                    break
                j = use[0]
                t = self.steps[j]
                if t.op == "BatchNormalization" and t.ins[0] == o and int(s.lits[-1]) == 0 \
                        and self._fold_bn(s, t):
                    pass
                elif t.op == "Relu" and int(s.lits[-1]) == 0:
                    s.lits[-1] = np.int64(1)
                else:
                    break
                s.outs = list(t.outs) + s.outs[1:]  # the im2col scratch stays
                dropped.add(j)
                for n in t.ins[1:]:
                    if j in readers.get(n, []):
                        readers[n].remove(j)
                del readers[o]
        self.steps = [s for i, s in enumerate(self.steps) if i not in dropped]

    def _fold_bn(self, conv: _Step, bn: _Step) -> bool:
        vals = [self.values[n] for n in conv.ins[1:] + bn.ins[1:]]
        w = self.values[conv.ins[1]]
        if any(v.const is None for v in vals) or w.dtype.kind != "f" or len(bn.ins) != 5:
            return False

        def fold() -> list[np.ndarray]:
            scale, bias, mean, var = (self.values[n].const.astype(np.float64)  # type: ignore
                                      for n in bn.ins[1:])
            a = scale / np.sqrt(var + float(bn.lits[0]))
            wc = w.const.astype(np.float64)  # type: ignore[union-attr]
            w_new = (wc * a.reshape((-1,) + (1,) * (wc.ndim - 1))).astype(w.dtype)
            b_old = self.values[conv.ins[2]].const.astype(np.float64) if len(conv.ins) > 2 \
                else np.zeros_like(a)  # type: ignore[union-attr]
            return [w_new, ((b_old - mean) * a + bias).astype(w.dtype)]

        key = ("bn", conv.node, bn.node, float(bn.lits[0]))
        w_new, b_new = self._memo(key, [v.const for v in vals], fold)  # type: ignore[misc]
        names = []
        for suffix, arr in (("W", w_new), ("B", b_new)):
            name = self._fresh(f"{conv.node}/{suffix}+{bn.node}")
            self.values[name] = Value(arr.shape, arr.dtype, arr)
            names.append(name)
        conv.ins = [conv.ins[0]] + names
        return True

    # -- the kernel graph ------------------------------------------------------------------
    def _build(self) -> tuple[KernelGraph, dict[str, np.ndarray]]:
        g = KernelGraph(self.name)
        out_names = [o.name for o in self.model.graph.output]
        if not out_names:
            raise self.fail("the model has no outputs")
        if len(set(out_names)) != len(out_names):
            raise self.fail("an output is listed twice")
        for o in out_names:
            if o not in self.values:
                raise self.fail(f"output {show(o)} is not computed by the graph")
            if o in self.inputs:
                raise UnsupportedOperatorError(f"output {show(o)} is also a graph input",
                                               graph=self.name)
        for n in self.inputs + out_names:
            problem = name_problem(n)
            if problem:
                raise self.fail(f"a graph input or output name {problem}")
        names: dict[str, str] = {}
        taken = set(self.inputs) | set(out_names)

        def buffer_name(onnx_name: str) -> str:
            got = names.get(onnx_name)
            if got is not None:
                return got
            candidate = onnx_name
            if onnx_name not in taken and (name_problem(onnx_name) or onnx_name in
                                           names.values()):
                candidate = f"t{len(names)}"
                while candidate in taken or candidate in names.values():
                    candidate += "_"
            names[onnx_name] = candidate
            return candidate

        consts: dict[str, np.ndarray] = {}
        for n in self.inputs:
            v = self.values[n]
            g.input(buffer_name(n), v.shape, v.dtype)
        produced = {o for s in self.steps for o in s.outs}
        outputs = set(out_names)
        steps = list(self.steps)
        for o in out_names:
            if o not in produced:  # a constant or an input: copied to the output
                steps.append(_Step("Identity", f"output {o}", [o], [o], []))

        def source(n: str) -> Any:
            v = self.values[n]
            if n in outputs and n not in produced and v.const is not None:
                bn = buffer_name(n + "#value")  # the output itself has the name
            else:
                bn = buffer_name(n)
            if bn in g.buffers:
                return g.buffers[bn]
            if v.const is not None and n not in produced:
                consts[bn] = v.const
                return g.const(bn, v.shape, v.dtype)
            raise self.fail(f"{show(n)} is read before it is computed")

        kernels: dict[str, Kernel] = {}
        for s in steps:
            args: list[Any] = [In(source(n)) for n in s.ins]
            for o in s.outs:
                v = self.values[o]
                bn = buffer_name(o)
                maker = g.output if o in outputs else g.temp
                args.append(Out(maker(bn, v.shape, v.dtype)))
            args.append(np.int64(len(s.outs)))
            args.extend(s.lits)
            k = kernels.get(s.op)
            if k is None:
                k = kernels[s.op] = Kernel.array(KERNELS[s.op], name=s.op)
            g.launch(k, args)
        g.validate()
        return g, consts

    def run(self) -> tuple[KernelGraph, dict[str, np.ndarray]]:
        g = self.model.graph
        if len(g.node) > MAX_NODES:
            raise self.fail(f"{len(g.node)} nodes, more than {MAX_NODES}")
        self._read_graph_io()
        for i, node in enumerate(g.node):
            self._index = i
            self._node(i, node)
        if self.fuse:
            self._fuse()
        return self._build()


def from_onnx(model: Any, *, batch: int | Mapping[str, int] | None = None,
              name: str | None = None) -> tuple[KernelGraph, dict[str, np.ndarray]]:
    """Import an ONNX model (a ModelProto, a path or the bytes of a .onnx
    file) as ``(graph, consts)``.

    ``consts`` maps const buffer names to NumPy arrays (the initializers and
    constants folded at import), so ``submit_kernel_graph(graph, {**consts,
    input_name: x})`` runs the model.  ``batch`` fixes symbolic dimensions:
    an int fixes every graph input's first dimension when it is symbolic, a
    mapping fixes dimensions by their ``dim_param`` name.  Only KaasErrors
    come out: UnsupportedOperatorError for what the operator table does not
    implement, UnknownDimensionError for a dimension left open,
    OnnxImportError for anything else that is not a usable model.
    """
    return import_model(model, batch=batch, name=name)


def import_model(model: Any, *, batch: Any = None, name: str | None = None,
                 shapes: Mapping[str, tuple[int, ...]] | None = None,
                 initializers: Mapping[str, np.ndarray] | None = None,
                 memo: dict[Any, Any] | None = None
                 ) -> tuple[KernelGraph, dict[str, np.ndarray]]:
    """:func:`from_onnx` for callers that build one model at several shapes:
    ``shapes`` gives graph inputs' whole shapes (they must agree with the
    dimensions the model fixes), ``initializers`` the arrays already read
    from the model's initializers (read once, shared by every graph),
    ``memo`` a dict kept between calls so that folded constants (BatchNorm
    folded into Conv weights, ...) are computed once and shared too."""
    m = load_model(model)
    try:
        return _Importer(m, batch, name, shapes, initializers, memo).run()
    except KaasError:
        raise
    except RecursionError:
        raise OnnxImportError("the model is nested too deeply") from None
    except Exception as e:  # noqa: BLE001 - a malformed proto can break anything
        raise OnnxImportError(f"the model cannot be imported: {type(e).__name__}: "
                              f"{show(str(e))}") from None


def param_inputs(model: Any) -> list[str]:
    """Names of the graph inputs that the table needs as constants at import
    (a Reshape's shape, Slice's starts, Clip's bounds, every input of an
    operator computed only at import such as Range): a caller that knows
    their values can make them initializers (:func:`with_constants`)."""
    from onnx import defs

    m = load_model(model)
    opset = max((int(o.version) for o in m.opset_import if o.domain in ("", "ai.onnx")),
                default=0)
    inputs = {vi.name for vi in m.graph.input}
    names: list[str] = []
    for node in m.graph.node:
        spec = OPS.get(node.op_type)
        if spec is None:
            continue
        try:
            since = int(defs.get_schema(node.op_type, opset, "").since_version)
        except Exception:  # noqa: BLE001 - not at this opset: the import refuses it
            continue
        ctx = NodeCtx("", node.op_type, since, {}, [])
        pos = range(len(node.input)) if node.op_type in FOLD_ONLY else spec.params(ctx)
        for i in pos:
            if i < len(node.input) and node.input[i] in inputs and node.input[i] not in names:
                names.append(node.input[i])
    return names


def with_constants(model: Any, values: Mapping[str, Any]) -> Any:
    """A copy of ``model`` whose graph inputs named in ``values`` are
    initializers of those values (so the importer may read them)."""
    from onnx import numpy_helper

    m = type(load_model(model))()
    m.CopyFrom(load_model(model))
    keep = [vi for vi in m.graph.input if vi.name not in values]
    for name, v in values.items():
        m.graph.initializer.append(numpy_helper.from_array(np.asarray(v), name))
    del m.graph.input[:]
    m.graph.input.extend(keep)
    return m
