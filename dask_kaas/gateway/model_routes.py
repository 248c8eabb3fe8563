"""Tenant routes: registering models and consts, and the KServe v2 model routes."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Any

from tornado.web import HTTPError

from ..consts import content_token
from ..graph import errors as graph_errors
from ..graph.errors import KaasError, NoKaasWorkersError
from .admission import admit_graph
from .errors import BadRequestError, GatewayError, GatewayTimeoutError
from .handlers import VERSION, BaseHandler, BodyHandler
from .kserve import HEADER_LENGTH, decode_infer_request, encode_infer_response, model_metadata
from .metrics import CLIENT_CLOSED
from .registry import check_name
from .tensors import const_from_body

logger = logging.getLogger(__name__)

#: the worker-side time limit's error, where this version of dask_kaas has one
REQUEST_TIMEOUT: Any = getattr(graph_errors, "RequestTimeoutError", ())


class ModelListHandler(BaseHandler):
    def get(self) -> None:
        assert self.principal is not None
        self.reply({"models": [m.describe() for m in self.gw.registry.list(self.principal.name)]})


class ModelHandler(BodyHandler):
    def put(self, name: str) -> None:
        assert self.principal is not None
        check_name(name)
        graph = admit_graph(self.body(), self.principal.name, name)
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
        if not model.ready:
            raise BadRequestError(f"const(s) {model.missing_consts()} not uploaded yet "
                                  f"(PUT /v1/models/{name}/consts/NAME)", graph=model.graph.name)
        request = decode_infer_request(self.body(), self.request.headers.get(HEADER_LENGTH),
                                       model.graph)
        self.gw.dispatcher.admit(self.principal)
        self.gw.metrics.in_flight.labels(self.principal.name).inc()
        start = time.perf_counter()
        try:
            self._task = asyncio.ensure_future(self._infer(model, request))
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
        payload, header_length = encode_infer_response(model.graph, request, results, VERSION,
                                                       model_name=name)
        if header_length is not None:
            self.set_header(HEADER_LENGTH, str(header_length))
            self.set_header("Content-Type", "application/octet-stream")
        self.gw.metrics.observe_latency(self.principal.name, name, time.perf_counter() - start)
        self.finish(payload)

    async def _infer(self, model: Any, request: Any) -> dict[str, Any]:
        assert self.principal is not None
        timeout = min(self.gw.request_timeout, request.timeout_s or math.inf)
        return await self.gw.dispatcher.run(model.graph, request.inputs, self.principal.name,
                                            self.gw.weight_of(self.principal), timeout,
                                            self.gw.registry.const_inputs(model))

    def on_connection_close(self) -> None:
        """The caller went away: cancel its request (and the Dask future)."""
        self._gone = True
        if self._task is not None and not self._task.done():
            self._task.cancel()
        super().on_connection_close()
