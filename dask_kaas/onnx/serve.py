"""An ONNX model registered with a client and called by its input names.

:class:`OnnxModel` keeps the parsed model and its initializer arrays, and
builds the kernel graph of each distinct input shape once (least recently
used out past ``max_graphs``), so a model with a symbolic batch dimension
serves any batch size and the second call at a shape costs no import.  The
consts are the same NumPy arrays for every shape, so the cluster holds one
copy of the weights whatever the batch.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..graph.errors import InputMismatchError, MissingInputError, UnexpectedInputError
from ..graph.graph import KernelGraph
from ..graph.names import name_problem, show
from .errors import OnnxImportError
from .importer import import_model
from .load import dtype_of, load_model, tensor_array

#: Graphs (distinct input shapes) an OnnxModel keeps by default.
MAX_GRAPHS = 8


class OnnxModel:
    """An imported ONNX model bound to a client and tenant.

    ``model(x)`` (one input), ``model(input_ids=a, attention_mask=m)`` or
    ``model({"gpu_0/data_0": x})`` runs it on the cluster and returns the
    outputs by name; :meth:`submit` returns the future instead.
    """

    def __init__(self, model: Any, client: Any = None, *, tenant: str = "default",
                 name: str | None = None, batch: Any = None,
                 max_graphs: int = MAX_GRAPHS) -> None:
        if name is not None and name_problem(name):
            raise OnnxImportError(f"a model name {name_problem(name)}")
        self.proto = load_model(model)
        self.client = client
        self.tenant = tenant
        self.name = name
        self.batch = batch
        if isinstance(max_graphs, bool) or not isinstance(max_graphs, int) or max_graphs < 1:
            raise OnnxImportError(f"max_graphs must be a positive int, got {show(max_graphs)}")
        self.max_graphs = max_graphs
        g = self.proto.graph
        self._initializers = {t.name: tensor_array(t, f"initializer {t.name!r}")
                              for t in g.initializer}
        #: Input name -> (declared shape with None for an open dimension, dtype).
        self.inputs: dict[str, tuple[tuple[int | None, ...], np.dtype]] = {}
        for vi in g.input:
            if vi.name in self._initializers:
                continue
            tt = vi.type.tensor_type
            dims = list(tt.shape.dim) if tt.HasField("shape") else []
            self.inputs[vi.name] = (
                tuple(int(d.dim_value) if d.HasField("dim_value") else None for d in dims),
                dtype_of(tt.elem_type, f"graph input {vi.name!r}"))
        self.outputs = [o.name for o in g.output]
        self._graphs: OrderedDict[tuple[Any, ...], tuple[KernelGraph, dict[str, np.ndarray]]] \
            = OrderedDict()
        #: Folded constants shared by the graphs of every shape (import_model).
        self._memo: dict[Any, Any] = {}
        #: id(const array) -> (the array, its scattered future).
        self._scattered: dict[int, tuple[np.ndarray, Any]] = {}
        if all(None not in shape for shape, _ in self.inputs.values()) or batch is not None:
            self.graph_for(None)  # refused at registration, not at the first call

    # -- graphs -------------------------------------------------------------------------
    def graph_for(self, shapes: Mapping[str, tuple[int, ...]] | None
                  ) -> tuple[KernelGraph, dict[str, np.ndarray]]:
        """The graph and consts for inputs of these shapes (None: the
        declared shapes with ``batch``), built once per distinct shapes."""
        key = tuple(sorted((shapes or {}).items()))
        hit = self._graphs.get(key)
        if hit is not None:
            self._graphs.move_to_end(key)
            return hit
        built = import_model(self.proto, batch=self.batch, shapes=shapes, name=self.name,
                             initializers=self._initializers, memo=self._memo)
        self._graphs[key] = built
        while len(self._graphs) > self.max_graphs:
            self._graphs.popitem(last=False)
            live = {id(a) for _, consts in self._graphs.values() for a in consts.values()}
            for k in [k for k in self._scattered if k not in live]:
                del self._scattered[k]
        return built

    def _client(self) -> Any:
        if self.client is None:
            from distributed import get_client

            self.client = get_client()
        return self.client

    def const_futures(self, consts: Mapping[str, np.ndarray]) -> dict[str, Any]:
        """The consts as Dask futures, scattered once per array: a request
        then names its weights by key instead of sending or hashing them
        (the cluster caches them on the device like any const)."""
        client = self._client()
        out = {}
        for name, arr in consts.items():
            entry = self._scattered.get(id(arr))
            if entry is None or entry[0] is not arr or entry[1].status != "finished":
                entry = (arr, client.scatter(arr, hash=False))
                self._scattered[id(arr)] = entry
            out[name] = entry[1]
        return out

    # -- calls ---------------------------------------------------------------------------
    def _feed(self, inputs: Mapping[str, Any] | None, named: Mapping[str, Any],
              args: tuple[Any, ...]) -> dict[str, np.ndarray]:
        feed: dict[str, Any] = {}
        if args:
            if len(args) == 1 and isinstance(args[0], Mapping):
                feed.update(args[0])
            elif len(args) == len(self.inputs):
                feed.update(zip(self.inputs, args))
            else:
                raise MissingInputError(f"the model takes inputs {list(self.inputs)}: pass "
                                        "them by name, as a mapping or in that order")
        if inputs is not None:
            feed.update(inputs)
        feed.update(named)
        for n in feed:
            if n not in self.inputs:
                raise UnexpectedInputError(f"the model has no input {show(n)}; its inputs "
                                           f"are {list(self.inputs)}")
        missing = [n for n in self.inputs if n not in feed]
        if missing:
            raise MissingInputError(f"the model's input {missing[0]!r} was given no value")
        out = {}
        for n, v in feed.items():
            if not isinstance(v, np.ndarray):
                raise InputMismatchError(f"input {n!r} must be a NumPy array, got "
                                         f"{type(v).__name__}")
            out[n] = v
        return out

    def submit(self, *args: Any, **named: Any) -> Any:
        """Submit one request; returns the KernelGraphFuture."""
        from ..client import submit_kernel_graph

        feed = self._feed(None, named, args)
        graph, consts = self.graph_for({n: tuple(v.shape) for n, v in feed.items()})
        return submit_kernel_graph(graph, {**self.const_futures(consts), **feed},
                                   self._client(), tenant=self.tenant)

    def __call__(self, *args: Any, **named: Any) -> dict[str, np.ndarray]:
        return self.submit(*args, **named).result()

    def __repr__(self) -> str:
        return (f"OnnxModel({self.proto.graph.name!r}, inputs={list(self.inputs)}, "
                f"outputs={self.outputs}, tenant={self.tenant!r})")


def register_onnx_model(client: Any, model: Any, *, tenant: str = "default",
                        name: str | None = None, batch: Any = None,
                        max_graphs: int = MAX_GRAPHS) -> OnnxModel:
    """Import ``model`` (ModelProto, path or bytes) for ``client`` and
    ``tenant``; the returned :class:`OnnxModel` is called with the model's
    inputs by name and returns its outputs by name.  A model the table
    cannot run is refused here (UnsupportedOperatorError)."""
    from ..graph.errors import TenantError

    problem = name_problem(tenant)
    if problem:
        raise TenantError(f"a tenant name {problem}")
    return OnnxModel(model, client, tenant=tenant, name=name, batch=batch,
                     max_graphs=max_graphs)
