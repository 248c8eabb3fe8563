"""ONNX models served by the gateway, as Triton serves them.

A tenant ``PUT``s the bytes of a ``.onnx`` file (``Content-Type:
application/onnx``, or any body whose first byte is the protobuf tag of
``ModelProto.ir_version``, which every ONNX writer puts first).  The model is
imported once at upload with :func:`dask_kaas.onnx.importer.import_model` so a
model the operator table refuses is a 400 naming the node and operator then,
not at the first request.  Its initializers are the model's consts: each is
given its content token once (in a pool thread) and is sent through the
client's const registry by the first request that needs it, exactly like a
const uploaded to a graph model (see :mod:`dask_kaas.gateway.dispatch`).

Shapes: a dimension the model leaves symbolic is given by the caller's
tensor; the first one is the batch (``1..max_batch_size``), any other is
bounded by :data:`MAX_FREE_DIM`, and dimensions sharing a ``dim_param`` name
must agree.  A kernel graph has static shapes, so one graph is imported per
distinct set of input shapes and kept (``max_graphs``, least recently used
out); the folded constants are shared between them through the importer's
memo, so the cluster holds one copy of the weights whatever the batch.
Everything a request claims is checked against the limits before an import
runs: a declared shape of 10**12 rows is a 400, never an allocation.
"""

from __future__ import annotations

import threading
from collections import Counter, OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..const_identity import content_token
from ..graph.errors import KaasError
from ..graph.graph import KernelGraph
from .errors import BadRequestError, GatewayError
from .kserve import loads_json, parse_header_length
from .tensors import kserve_datatype

#: Content types that say "this body is an ONNX model".
ONNX_CONTENT_TYPES = ("application/onnx", "application/x-onnx", "application/octet-stream")
#: Largest size a symbolic dimension other than the batch may be given.
MAX_FREE_DIM = 1 << 16
#: Distinct input shapes (graphs) a model keeps by default.
MAX_GRAPHS = 8
#: Most graphs a batched model keeps (one per batch size the batcher forms).
MAX_BATCHED_GRAPHS = 128


def looks_like_onnx(body: bytes, content_type: str | None) -> bool:
    """Whether a model upload is an ONNX file rather than a graph document."""
    ct = (content_type or "").split(";")[0].strip().lower()
    if ct in ONNX_CONTENT_TYPES:
        return True
    if ct == "application/json":
        return False
    # ModelProto field 1 (ir_version, varint) is written first: tag byte 0x08.
    return body[:1] == b"\x08"


@dataclass(frozen=True)
class TensorSpec:
    """One ONNX graph input or output as the caller sees it."""

    name: str
    #: None where the model leaves the dimension symbolic (or unknown)
    dims: tuple[int | None, ...]
    #: the ``dim_param`` name of each symbolic dimension ("" if unnamed)
    params: tuple[str, ...]
    dtype: np.dtype

    def metadata(self) -> dict[str, Any]:
        shape = [-1 if d is None else d for d in self.dims] if self.dims else [-1]
        return {"name": self.name, "datatype": kserve_datatype(self.dtype), "shape": shape}


@dataclass
class BatchingConfig:
    """How requests of one tenant's model are batched (Triton's
    ``max_batch_size`` and ``dynamic_batching``)."""

    #: largest batch a request or a formed batch may have (0: the model has no
    #: batch dimension; requests keep the model's own first dimension)
    max_batch_size: int = 0
    #: whether requests are stacked into batches at all
    dynamic: bool = False
    #: longest a request is held waiting for others while a run slot is free
    max_queue_delay_s: float = 0.002
    #: batch sizes (rows) at which a batch leaves without waiting out the delay
    preferred: tuple[int, ...] = ()
    #: batched runs of this model in flight at once (Triton's instance count)
    instances: int = 2

    def describe(self) -> dict[str, Any]:
        return {"max_batch_size": self.max_batch_size, "dynamic_batching": self.dynamic,
                "max_queue_delay_us": round(self.max_queue_delay_s * 1e6),
                "preferred_batch_size": list(self.preferred), "instances": self.instances}


def _int_arg(text: str, key: str, low: int, high: int) -> int:
    t = text.strip()
    if not t.isascii() or not t.isdigit() or len(t) > 9 or not low <= int(t) <= high:
        raise BadRequestError(f"query parameter {key!r} must be an integer in {low}..{high}, "
                              f"got {text[:40]!r}")
    return int(t)


def parse_batching(query: Mapping[str, str], batch_dim: bool,
                   default_max_batch: int) -> BatchingConfig:
    """The upload's query parameters (``max_batch_size``, ``dynamic_batching``,
    ``max_queue_delay_us``, ``preferred_batch_size`` as ``4,8``, ``instances``)
    as a BatchingConfig.  ``batch_dim``: whether every input and output of the
    model has a symbolic first dimension (the only models that can batch)."""
    known = {"max_batch_size", "dynamic_batching", "max_queue_delay_us",
             "preferred_batch_size", "instances"}
    unknown = sorted(set(query) - known)
    if unknown:
        raise BadRequestError(f"unknown query parameter {unknown[0][:40]!r}; known: "
                              f"{sorted(known)}")
    cfg = BatchingConfig(max_batch_size=default_max_batch if batch_dim else 0)
    if "max_batch_size" in query:
        cfg.max_batch_size = _int_arg(query["max_batch_size"], "max_batch_size", 0, 1 << 16)
    if cfg.max_batch_size and not batch_dim:
        raise BadRequestError("max_batch_size needs a model whose inputs and outputs all "
                              "have a symbolic first dimension (the batch)")
    flag = query.get("dynamic_batching", "false").strip().lower()
    if flag not in ("true", "false", "1", "0"):
        raise BadRequestError(f"query parameter 'dynamic_batching' must be true or false, "
                              f"got {flag[:20]!r}")
    cfg.dynamic = flag in ("true", "1")
    if cfg.dynamic and cfg.max_batch_size < 1:
        raise BadRequestError("dynamic_batching needs a model with a symbolic first "
                              "dimension on every input and output, and max_batch_size >= 1")
    if "max_queue_delay_us" in query:
        cfg.max_queue_delay_s = _int_arg(query["max_queue_delay_us"], "max_queue_delay_us",
                                         0, 10_000_000) / 1e6
    if "preferred_batch_size" in query:
        text = query["preferred_batch_size"]
        sizes = tuple(sorted({_int_arg(p, "preferred_batch_size", 1, 1 << 16)
                              for p in text.split(",")[:64]}))
        if sizes and sizes[-1] > cfg.max_batch_size:
            raise BadRequestError(f"preferred_batch_size {sizes[-1]} is above "
                                  f"max_batch_size {cfg.max_batch_size}")
        cfg.preferred = sizes
    if "instances" in query:
        cfg.instances = _int_arg(query["instances"], "instances", 1, 64)
    return cfg


def _spec(vi: Any, where: str) -> TensorSpec:
    """An input needs its rank; an output without a declared shape is shown
    as ``[-1]`` (its real shape comes with each answer) and cannot batch."""
    from ..onnx.load import dtype_of

    tt = vi.type.tensor_type
    dims = list(tt.shape.dim) if tt.HasField("shape") else None
    if dims is None:
        if where == "graph input":
            raise BadRequestError(f"{where} {vi.name[:80]!r} has no declared shape; the "
                                  "gateway needs every input's rank")
        dims = []
    try:
        dtype = dtype_of(tt.elem_type, f"{where} {vi.name[:80]!r}")
    except KaasError as e:
        raise BadRequestError(str(e)) from None
    if kserve_datatype(dtype) is None:
        raise BadRequestError(f"{where} {vi.name[:80]!r}: dtype {dtype} has no KServe datatype")
    fixed = tuple(int(d.dim_value) if d.HasField("dim_value") else None for d in dims)
    params = tuple(d.dim_param if d.HasField("dim_param") else "" for d in dims)
    return TensorSpec(vi.name, fixed, params, dtype)


@dataclass
class OnnxServed:
    """A tenant's ONNX model in the registry (beside graph-document models)."""

    tenant: str
    name: str
    proto: Any
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    initializers: dict[str, np.ndarray]
    config: BatchingConfig
    max_graphs: int = MAX_GRAPHS
    #: imports done (a second call at a shape adds none)
    imports: int = 0
    #: rows per batched run -> runs (and requests per run -> runs)
    batch_rows: Counter = field(default_factory=Counter)
    batch_requests: Counter = field(default_factory=Counter)
    batcher: Any = None
    _graphs: OrderedDict = field(default_factory=OrderedDict)
    _memo: dict = field(default_factory=dict)
    #: id(array) -> (array, content token): the token is taken once per array
    _tokens: dict = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _import_lock: threading.Lock = field(default_factory=threading.Lock)

    kind = "onnx"

    # -- the registry's view (as registry.Model) ----------------------------------
    @property
    def graph_name(self) -> str:
        return f"{self.tenant}/{self.name}"

    @property
    def const_names(self) -> list[str]:
        return list(self.initializers)

    def missing_consts(self) -> list[str]:
        return []

    @property
    def ready(self) -> bool:
        return True

    @property
    def const_bytes(self) -> int:
        return sum(a.nbytes for a in self.initializers.values())

    @property
    def consts(self) -> dict[str, np.ndarray]:
        return self.initializers

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "platform": "onnx", "ready": True,
                "consts": self.const_names, "missing_consts": [],
                "inputs": [s.name for s in self.inputs],
                "outputs": [s.name for s in self.outputs],
                "batching": {**self.config.describe(),
                             "batch_rows": {str(k): v for k, v in
                                            sorted(self.batch_rows.items())},
                             "batch_requests": {str(k): v for k, v in
                                                sorted(self.batch_requests.items())}},
                "graphs_cached": len(self._graphs), "imports": self.imports}

    def metadata(self, name: str, version: str) -> dict[str, Any]:
        """``GET /v2/models/{name}``: the ONNX names, datatypes and shapes
        (``-1`` where the caller chooses the size)."""
        return {"name": name, "versions": [version], "platform": "onnx",
                "inputs": [s.metadata() for s in self.inputs],
                "outputs": [s.metadata() for s in self.outputs],
                "parameters": {"max_batch_size": self.config.max_batch_size,
                               "dynamic_batching": self.config.dynamic}}

    # -- shapes ---------------------------------------------------------------------
    def shapes_of(self, body: bytes, header_length: str | None,
                  max_bytes: int) -> dict[str, tuple[int, ...]]:
        """The input shapes an ``infer`` body declares, checked against the
        model before any graph is imported for them (the body itself is
        decoded afterwards against that graph, by the ordinary KServe code)."""
        n = parse_header_length(header_length, len(body))
        doc = loads_json(memoryview(body)[:n] if n is not None else body,
                         "the inference request", non_finite=True)
        if not isinstance(doc, Mapping) or not isinstance(doc.get("inputs"), list):
            raise BadRequestError("the inference request must be a JSON object with an "
                                  "'inputs' array", graph=self.graph_name)
        specs = {s.name: s for s in self.inputs}
        shapes: dict[str, tuple[int, ...]] = {}
        bound: dict[str, int] = {}
        total = 0
        for i, item in enumerate(doc["inputs"]):
            name = item.get("name") if isinstance(item, Mapping) else None
            if not isinstance(name, str):
                raise BadRequestError(f"inputs[{i}] must be an object with a string 'name'",
                                      graph=self.graph_name)
            spec = specs.get(name)
            if spec is None:
                raise BadRequestError(f"not an input tensor: the model's inputs are "
                                      f"{sorted(specs)}", graph=self.graph_name,
                                      buffer=name[:80])
            shape = item.get("shape")
            if not isinstance(shape, list) or len(shape) != len(spec.dims) or not all(
                    isinstance(d, int) and not isinstance(d, bool) for d in shape):
                raise BadRequestError(f"shape must be a list of {len(spec.dims)} integers "
                                      f"matching {spec.metadata()['shape']}",
                                      graph=self.graph_name, buffer=name)
            for axis, (got, want) in enumerate(zip(shape, spec.dims)):
                if want is not None:
                    if got != want:
                        raise BadRequestError(f"dimension {axis} is {str(got)[:20]}, the "
                                              f"model's is {want}", graph=self.graph_name,
                                              buffer=name)
                    continue
                limit = (self.config.max_batch_size or MAX_FREE_DIM) if axis == 0 \
                    else MAX_FREE_DIM
                if not 1 <= got <= limit:
                    what = "the batch (dimension 0)" if axis == 0 else f"dimension {axis}"
                    raise BadRequestError(f"{what} is {str(got)[:20]}; it must be in "
                                          f"1..{limit}", graph=self.graph_name, buffer=name)
                param = spec.params[axis]
                if param:
                    if bound.setdefault(param, got) != got:
                        raise BadRequestError(f"dimension {param!r} is {bound[param]} in "
                                              f"another input and {got} here",
                                              graph=self.graph_name, buffer=name)
            nbytes = int(np.prod(shape, dtype=np.float64)) * spec.dtype.itemsize
            total += nbytes
            if total > max_bytes:
                raise BadRequestError(f"the inputs' declared shapes need more than the "
                                      f"{max_bytes} bytes a request body may hold",
                                      graph=self.graph_name, buffer=name)
            shapes[name] = tuple(shape)
        missing = [s.name for s in self.inputs if s.name not in shapes]
        if missing:
            raise BadRequestError(f"missing input tensor(s) {missing}", graph=self.graph_name)
        return shapes

    # -- graphs ---------------------------------------------------------------------
    def cached(self, shapes: Mapping[str, tuple[int, ...]]
               ) -> tuple[KernelGraph, dict[str, tuple[np.ndarray, str]]] | None:
        """The graph for ``shapes`` if it was built already (no blocking work)."""
        key = tuple(sorted(shapes.items()))
        with self._lock:
            hit = self._graphs.get(key)
            if hit is not None:
                self._graphs.move_to_end(key)
            return hit

    def build(self, shapes: Mapping[str, tuple[int, ...]]
              ) -> tuple[KernelGraph, dict[str, tuple[np.ndarray, str]]]:
        """The graph for inputs of ``shapes`` and its consts as ``name:
        (value, token)``; imported once per distinct shapes.  Blocking (a
        pool thread): an import and first-time content tokens take time."""
        from ..onnx.importer import import_model

        key = tuple(sorted(shapes.items()))
        hit = self.cached(shapes)
        if hit is not None:
            return hit
        # Imports are serialised by their own lock; the dict's lock is held
        # only for lookups and inserts, so the event loop's cached() never
        # waits for an import.
        with self._import_lock:
            hit = self.cached(shapes)
            if hit is not None:
                return hit
            try:
                graph, arrays = import_model(self.proto, shapes=dict(shapes),
                                             name=self.graph_name,
                                             initializers=self.initializers, memo=self._memo)
            except KaasError as e:
                raise BadRequestError(str(e)) from None
            self.imports += 1
            consts = {}
            for buf, arr in arrays.items():
                entry = self._tokens.get(id(arr))
                if entry is None or entry[0] is not arr:
                    arr.setflags(write=False)  # a const is promised never to change
                    entry = (arr, content_token(arr))
                    self._tokens[id(arr)] = entry
                consts[buf] = entry
            built = (graph, consts)
            with self._lock:
                self._graphs[key] = built
                evicted = False
                while len(self._graphs) > self.max_graphs:
                    self._graphs.popitem(last=False)
                    evicted = True
                live = ({id(v) for _, cs in self._graphs.values() for v, _ in cs.values()}
                        if evicted else set())
            if evicted:
                live |= {id(a) for a in self.initializers.values()}
                for k in [k for k in self._tokens if k not in live]:
                    del self._tokens[k]
            return built


def load_onnx(body: bytes, tenant: str, name: str, query: Mapping[str, str],
              default_max_batch: int, max_graphs: int = MAX_GRAPHS) -> OnnxServed:
    """An uploaded ONNX file as an :class:`OnnxServed`, imported once at its
    declared shapes (batch 1 where the batch is symbolic) so that a model
    the table refuses is refused now.  Blocking: a pool thread."""
    from ..onnx.load import load_model, tensor_array

    try:
        proto = load_model(bytes(body))
        inits = {t.name: tensor_array(t, f"initializer {t.name!r}")
                 for t in proto.graph.initializer}
    except KaasError as e:
        raise BadRequestError(str(e)) from None
    except Exception as e:  # noqa: BLE001 - a hostile proto must be a 400
        raise BadRequestError(f"not a usable ONNX model: {type(e).__name__}") from None
    inputs = [_spec(vi, "graph input") for vi in proto.graph.input if vi.name not in inits]
    outputs = [_spec(vi, "graph output") for vi in proto.graph.output]
    if not inputs or not outputs:
        raise BadRequestError("an ONNX model needs at least one graph input and output")
    names = [s.name for s in inputs + outputs]
    for n in names:
        if not n or len(n) > 256:
            raise BadRequestError(f"tensor name {n[:80]!r} must be 1..256 characters")
    if len(set(names)) != len(names):
        raise BadRequestError("an ONNX model's inputs and outputs need distinct names")
    batch_dim = all(s.dims and s.dims[0] is None for s in inputs + outputs)
    config = parse_batching(query, batch_dim, default_max_batch)
    for a in inits.values():
        a.setflags(write=False)
    if config.dynamic:  # every batch size may be formed: keep a graph for each
        max_graphs = max(max_graphs, min(config.max_batch_size + 1, MAX_BATCHED_GRAPHS))
    served = OnnxServed(tenant, name, proto, inputs, outputs, inits, config, max_graphs)
    # the shapes of a first request: batch 1, other open dimensions 1
    first: dict[str, tuple[int, ...]] = {}
    for s in inputs:
        first[s.name] = tuple(1 if d is None else d for d in s.dims)
    try:
        served.build(first)
    except GatewayError:
        raise
    return served
