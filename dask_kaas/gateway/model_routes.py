"""Tenant routes: registering models and consts, and the KServe v2 model routes."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Any

from tornado.web import HTTPError

from ..const_identity import content_token
from ..graph import errors as graph_errors
from ..graph.errors import KaasError, NoKaasWorkersError
from .admission import admit_graph
from .batching import Batcher
from .errors import BadRequestError, GatewayError, GatewayTimeoutError, PayloadTooLargeError
from .handlers import VERSION, BaseHandler, BodyHandler
from .kserve import HEADER_LENGTH, decode_infer_request, encode_infer_response, model_metadata
from .metrics import CLIENT_CLOSED
from .onnx_models import OnnxServed, load_onnx, looks_like_onnx
from .registry import check_name
from .tensors import const_from_body

logger = logging.getLogger(__name__)

#: the worker-side time limit's error, where this version of dask_kaas has one
REQUEST_TIMEOUT: Any = getattr(graph_errors, "RequestTimeoutError", ())


def _batch_runner(gw: Any, model: OnnxServed) -> Any:
    """What a model's batcher calls to run stacked inputs: the graph of
    their shapes, under the model's tenant and that tenant's weight now."""
    async def run(inputs: dict[str, Any]) -> dict[str, Any]:
        shapes = {n: tuple(a.shape) for n, a in inputs.items()}
        hit = model.cached(shapes)
        if hit is None:
            hit = await gw.dispatcher.import_call(model.build, shapes)
        graph, consts = hit
        principal = gw.tenants.tenants.get(model.tenant)
        weight = gw.weight_of(principal) if principal is not None else 1.0
        return await gw.dispatcher.run(graph, inputs, model.tenant, weight,
                                       gw.request_timeout, consts)
    return run


class ModelListHandler(BaseHandler):
    def get(self) -> None:
        assert self.principal is not None
        self.reply({"models": [m.describe() for m in self.gw.registry.list(self.principal.name)]})


class ModelHandler(BodyHandler):
    """``PUT /v1/models/{name}``: a kernel-graph document (JSON) or an ONNX
    file (``Content-Type: application/onnx`` or recognised by its first
    byte; batching set by query parameters, see docs/batching.md)."""

    def body_limit(self) -> int:
        return max(self.gw.max_body_size, self.gw.max_model_size)

    async def put(self, name: str) -> None:
        assert self.principal is not None
        check_name(name)
        body = self.body()
        content_type = self.request.headers.get("Content-Type")
        if looks_like_onnx(body, content_type):
            if len(body) > self.gw.max_model_size:
                raise PayloadTooLargeError(f"model of {len(body)} bytes is larger than this "
                                           f"gateway's --max-model-size of "
                                           f"{self.gw.max_model_size} bytes")
            repeated = [k for k, v in self.request.query_arguments.items() if len(v) > 1]
            if repeated:
                raise BadRequestError(f"query parameter {repeated[0][:40]!r} given twice")
            query = {k: self.get_query_argument(k) for k in self.request.query_arguments}
            tenant = self.principal.name
            served = await self.gw.dispatcher.import_call(
                load_onnx, body, tenant, name, query, self.gw.max_batch_size,
                self.gw.max_graphs)
            created = self.gw.registry.put_served(tenant, name, served)
        else:
            if len(body) > self.gw.max_body_size:
                raise PayloadTooLargeError(f"body of {len(body)} bytes is larger than this "
                                           f"gateway's limit of {self.gw.max_body_size} bytes")
            graph = admit_graph(body, self.principal.name, name)
            created = self.gw.registry.put(self.principal.name, name, graph)
        self.model_label = name
        self.reply(self.gw.registry.get(self.principal.name, name).describe(),
                   201 if created else 200)

    def delete(self, name: str) -> None:
        assert self.principal is not None
        self.gw.registry.delete(self.principal.name, name)
        self.gw.metrics.forget_model(self.principal.name, name)
        self.set_status(204)
        self.finish()


class ConstHandler(BodyHandler):
    async def put(self, name: str, buffer: str) -> None:
        model = self.model(name)
        check_name(buffer, "buffer")
        if isinstance(model, OnnxServed):
            raise BadRequestError("an ONNX model's consts are its initializers, uploaded "
                                  "with the model; upload the model again to change them",
                                  graph=model.graph_name, buffer=buffer)
        if buffer not in model.const_names:
            raise BadRequestError(f"not a const of the model; its consts are "
                                  f"{model.const_names}", graph=model.graph.name,
                                  buffer=buffer)
        value = const_from_body(self.body(), self.request.headers.get("Content-Type"),
                                model.graph.buffers[buffer], model.graph.name)
        self.gw.dispatcher.admit(self.principal)  # uploads share the tenant's max_in_flight
        try:
            value.setflags(write=False)  # a const is promised never to change
            token = await self.gw.dispatcher.call(content_token, value)
            self.gw.registry.set_const(self.principal.name, name, buffer, value, token)
            try:
                await self.gw.dispatcher.send_const(value, token)  # ahead of the first request
            except Exception as e:  # noqa: BLE001 - kept; sent again with the next request
                logger.warning("const %s of %s/%s not sent yet: %r", buffer,
                               self.principal.name, name, e)
        finally:
            self.gw.dispatcher.release(self.principal)
        self.set_status(204)
        self.finish()


# -- KServe v2 ---------------------------------------------------------------------
class MetadataHandler(BaseHandler):
    def get(self, name: str, version: str | None = None) -> None:
        model = self.model(name, version)
        if isinstance(model, OnnxServed):
            self.reply(model.metadata(name, VERSION))
            return
        doc = model_metadata(model.graph, VERSION)
        doc["name"] = name
        self.reply(doc)


class ModelReadyHandler(BaseHandler):
    def get(self, name: str, version: str | None = None) -> None:
        model = self.model(name, version)
        if not model.ready:
            raise BadRequestError(f"model is not ready: const(s) {model.missing_consts()} "
                                  "not uploaded yet", graph=model.graph.name)
        self.reply({"name": name, "ready": True})


class InferHandler(BodyHandler):
    _task: asyncio.Task | None = None
    _gone = False

    async def post(self, name: str, version: str | None = None) -> None:
        assert self.principal is not None
        model = self.model(name, version)
        body = self.body()
        header = self.request.headers.get(HEADER_LENGTH)
        if isinstance(model, OnnxServed):
            graph, consts = await self._onnx_graph(model, body, header)
        else:
            if not model.ready:
                raise BadRequestError(f"const(s) {model.missing_consts()} not uploaded yet "
                                      f"(PUT /v1/models/{name}/consts/NAME)",
                                      graph=model.graph.name)
            graph, consts = model.graph, None
        request = decode_infer_request(body, header, graph)
        self.gw.dispatcher.admit(self.principal)
        self.gw.metrics.in_flight.labels(self.principal.name).inc()
        start = time.perf_counter()
        try:
            self._task = asyncio.ensure_future(self._infer(model, graph, consts, request))
            try:
                results = await self._task
            except asyncio.CancelledError:
                if self._gone:  # nobody to answer; recorded as 499
                    self.set_status(CLIENT_CLOSED, reason="Client Closed Request")
                    return
                raise
            except GatewayError:
                raise
            except NoKaasWorkersError as e:
                raise HTTPError(503, str(e)) from None
            except REQUEST_TIMEOUT as e:  # the worker's own time limit
                raise GatewayTimeoutError(str(e)) from None
            except KaasError as e:
                raise BadRequestError(str(e)) from None
            except Exception as e:  # noqa: BLE001 - the cluster failed the request
                logger.warning("request for %s/%s failed: %r", self.principal.name, name, e)
                raise HTTPError(503, f"the cluster failed the request: "
                                     f"{type(e).__name__}") from None
        finally:
            self.gw.dispatcher.release(self.principal)
            self.gw.metrics.in_flight.labels(self.principal.name).dec()
        payload, header_length = encode_infer_response(graph, request, results, VERSION,
                                                       model_name=name)
        if header_length is not None:
            self.set_header(HEADER_LENGTH, str(header_length))
            self.set_header("Content-Type", "application/octet-stream")
        self.gw.metrics.observe_latency(self.principal.name, name, time.perf_counter() - start)
        self.finish(payload)

    async def _onnx_graph(self, model: OnnxServed, body: bytes, header: str | None
                          ) -> tuple[Any, dict[str, Any]]:
        """The graph and consts of an ONNX model at the request's shapes
        (imported in a pool thread the first time a shape is seen)."""
        shapes = model.shapes_of(body, header, self.gw.max_body_size)
        hit = model.cached(shapes)
        if hit is None:
            hit = await self.gw.dispatcher.import_call(model.build, shapes)
        return hit

    async def _infer(self, model: Any, graph: Any, consts: Any,
                     request: Any) -> dict[str, Any]:
        assert self.principal is not None
        timeout = min(self.gw.request_timeout, request.timeout_s or math.inf)
        if isinstance(model, OnnxServed):
            if model.config.dynamic:
                return await self._batched(model, request.inputs, timeout)
            return await self.gw.dispatcher.run(graph, request.inputs, self.principal.name,
                                                self.gw.weight_of(self.principal), timeout,
                                                consts)
        return await self.gw.dispatcher.run(graph, request.inputs, self.principal.name,
                                            self.gw.weight_of(self.principal), timeout,
                                            self.gw.registry.const_inputs(model))

    async def _batched(self, model: OnnxServed, inputs: dict[str, Any],
                       timeout: float) -> dict[str, Any]:
        """Through the model's batcher (made on first use, on this loop);
        the caller's own time limit still holds while it waits."""
        if model.batcher is None:
            model.batcher = Batcher(model.config, _batch_runner(self.gw, model),
                                    model.batch_rows, model.batch_requests)
        waiting = asyncio.ensure_future(model.batcher.submit(inputs))
        try:
            await asyncio.wait({waiting}, timeout=timeout)
        except asyncio.CancelledError:
            waiting.cancel()
            raise
        if not waiting.done():
            waiting.cancel()
            raise GatewayTimeoutError(f"request did not finish within {timeout:g} s",
                                      graph=model.graph_name)
        return waiting.result()

    def on_connection_close(self) -> None:
        """The caller went away: cancel its request (and the Dask future)."""
        self._gone = True
        if self._task is not None and not self._task.done():
            self._task.cancel()
        super().on_connection_close()
