"""An ``onnx.backend.base.Backend`` that runs models on a dask_kaas cluster,
so ONNX's own backend tooling (``run_model``, ``prepare(...).run``) drives
the importer and the cluster like any other runtime.

``prepare`` reads the model and imports it when its input shapes are fixed;
``run`` takes the inputs (a list in graph-input order, or a mapping), builds
the graph of their shapes (once per shapes, :class:`~.serve.OnnxModel`)
and returns the outputs in graph-output order.  Inputs that the table needs
as constants (a Reshape's shape fed at run time) are made initializers of
the values given, one graph per distinct value.
"""

from __future__ import annotations

from collections import namedtuple
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..graph.errors import KaasError
from .importer import param_inputs, with_constants
from .load import load_model
from .serve import OnnxModel

try:
    from onnx.backend.base import Backend, BackendRep
except ImportError:  # pragma: no cover - onnx is needed for this module only
    Backend = BackendRep = object  # type: ignore[misc,assignment]


class KaasBackendRep(BackendRep):  # type: ignore[misc]
    def __init__(self, model: Any, client: Any, tenant: str) -> None:
        self.model = load_model(model)
        self.client = client
        self.tenant = tenant
        self.params = param_inputs(self.model)
        self._models: dict[bytes, OnnxModel] = {}
        names = [vi.name for vi in self.model.graph.input]
        inits = {t.name for t in self.model.graph.initializer}
        self.input_names = [n for n in names if n not in inits]
        self.output_names = [o.name for o in self.model.graph.output]
        self._plain: OnnxModel | None = None
        self._plain_refused = False

    def _model_for(self, feed: dict[str, np.ndarray]) -> tuple[OnnxModel, dict[str, Any]]:
        shapes = {n: tuple(v.shape) for n, v in feed.items()}
        if not self._plain_refused:
            try:
                if self._plain is None:
                    self._plain = OnnxModel(self.model, self.client, tenant=self.tenant)
                self._plain.graph_for(shapes)
                return self._plain, feed
            except KaasError:
                if not self.params:
                    raise
                self._plain_refused = True
        fixed = {n: feed[n] for n in self.params if n in feed}
        key = b"".join(n.encode() + str(v.dtype).encode() + repr(v.shape).encode() +
                       v.tobytes() for n, v in sorted(fixed.items()))
        m = self._models.get(key)
        if m is None:
            m = self._models[key] = OnnxModel(with_constants(self.model, fixed), self.client,
                                              tenant=self.tenant)
        return m, {n: v for n, v in feed.items() if n not in fixed}

    def run(self, inputs: Any, **kwargs: Any) -> tuple[Any, ...]:
        if isinstance(inputs, Mapping):
            feed = {n: np.asarray(v) for n, v in inputs.items()}
        else:
            if isinstance(inputs, np.ndarray):
                inputs = [inputs]
            feed = {n: np.asarray(v) for n, v in zip(self.input_names, inputs)}
        model, feed = self._model_for(feed)
        out = model(feed)
        names = [n.replace("/", "_").replace(":", "_").replace(".", "_") for n in
                 self.output_names]
        try:
            row = namedtuple("Outputs", names, rename=True)  # type: ignore[misc]
            return tuple(row(*(out[n] for n in self.output_names)))
        except (ValueError, TypeError):
            return tuple(out[n] for n in self.output_names)


class KaasBackend(Backend):  # type: ignore[misc]
    """``KaasBackend.prepare(model, client=..., tenant=...)``; without a
    client, the current Dask client (``distributed.get_client()``)."""

    @classmethod
    def prepare(cls, model: Any, device: str = "CPU", **kwargs: Any) -> KaasBackendRep:
        client = kwargs.get("client")
        if client is None:
            from distributed import get_client

            client = get_client()
        return KaasBackendRep(model, client, kwargs.get("tenant", "onnx-backend"))

    @classmethod
    def run_model(cls, model: Any, inputs: Any, device: str = "CPU", **kwargs: Any
                  ) -> tuple[Any, ...]:
        return cls.prepare(model, device, **kwargs).run(inputs)

    @classmethod
    def is_compatible(cls, model: Any, device: str = "CPU", **kwargs: Any) -> bool:
        from .importer import from_onnx

        try:
            from_onnx(model, batch=1)
        except KaasError:
            return False
        return True

    @classmethod
    def supports_device(cls, device: str) -> bool:
        return str(device).upper() in ("CPU", "CUDA")


prepare = KaasBackend.prepare
run_model = KaasBackend.run_model
supports_device = KaasBackend.supports_device
