"""Tornado handlers: the HTTP routes of the gateway.

Every error leaves in the KServe shape ``{"error": "..."}`` with the status
of its :class:`~dask_kaas.gateway.errors.GatewayError` (Tornado's own errors,
such as bad percent-encoding in a path, too).  Bodies are streamed in and
counted (``stream_request_body``) so that a body over the limit is answered
413 with a message, from its ``Content-Length`` before any of it is read.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from typing import TYPE_CHECKING, Any

from tornado.web import HTTPError, RequestHandler, stream_request_body

from .. import __version__
from ..graph import errors as graph_errors
from ..graph.errors import KaasError, NoKaasWorkersError
from .errors import (
    BadRequestError,
    ForbiddenError,
    GatewayError,
    GatewayTimeoutError,
    ModelNotFoundError,
    NotFoundError,
    PayloadTooLargeError,
    TooManyRequestsError,
    UnauthorizedError,
)
from .kserve import HEADER_LENGTH, decode_infer_request, encode_infer_response, model_metadata
from .kserve import loads_json as _loads
from .tenants import Principal

if TYPE_CHECKING:
    from .app import Gateway

logger = logging.getLogger(__name__)

OPEN, TENANT, OPERATOR = "open", "tenant", "operator"
#: Status recorded for a request whose caller went away (nginx's convention).
CLIENT_CLOSED = 499
VERSION = "1"
#: the worker-side time limit's error, where this version of dask_kaas has one
REQUEST_TIMEOUT: Any = getattr(graph_errors, "RequestTimeoutError", ())


class BaseHandler(RequestHandler):
    role = TENANT

    def initialize(self, gateway: Gateway) -> None:
        self.gw = gateway
        self.principal: Principal | None = None
        self.model_label = "-"

    def set_default_headers(self) -> None:
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")

    def prepare(self) -> None:
        if self.role == OPEN:
            return
        principal = self.gw.tenants.authenticate(self.request.headers.get("Authorization"))
        if principal is None:
            raise UnauthorizedError("a valid 'Authorization: Bearer <token>' is required")
        if (self.role == OPERATOR) != principal.is_operator:
            need = "an operator" if self.role == OPERATOR else "a tenant"
            raise ForbiddenError(f"this route needs {need} token")
        self.principal = principal

    # -- errors --------------------------------------------------------------
    def send_error(self, status_code: int = 500, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, GatewayError):
            status_code = exc.status
        super().send_error(status_code, **kwargs)

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, GatewayError):
            message = str(exc)
        elif isinstance(exc, HTTPError):
            message = exc.log_message or self._reason
        else:
            message = self._reason
        if isinstance(exc, TooManyRequestsError):
            self.set_header("Retry-After", str(exc.retry_after_s))
        if status_code == 401:
            self.set_header("WWW-Authenticate", 'Bearer realm="dask-kaas"')
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps({"error": message}))

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        if isinstance(value, GatewayError):
            logger.debug("%s %s: %s", self.request.method, self.request.path, value)
        else:
            super().log_exception(typ, value, tb)

    def on_finish(self) -> None:
        tenant = self.principal.name if self.principal else "-"
        self.gw.metrics.observe(tenant, self.model_label, self.get_status(), None)

    def reply(self, doc: Any, status: int = 200) -> None:
        self.set_status(status)
        self.finish(json.dumps(doc))

    def model(self, name: str, version: str | None = None) -> Any:
        assert self.principal is not None
        model = self.gw.registry.get(self.principal.name, name)
        if version is not None and version != VERSION:
            raise ModelNotFoundError(f"model {name!r} has only version {VERSION}")
        self.model_label = name
        return model


@stream_request_body
class BodyHandler(BaseHandler):
    """A handler that takes a body, counted against ``max_body_size``."""

    def prepare(self) -> None:
        self._chunks: list[bytes] = []
        self._size = 0
        super().prepare()
        encoding = self.request.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            raise BadRequestError(f"Content-Encoding {encoding[:20]!r} is not supported; "
                                  "send the body uncompressed")
        length = self.request.headers.get("Content-Length")
        if length is not None:
            if not length.strip().isdigit():
                raise BadRequestError("Content-Length must be a non-negative integer")
            # A body up to the drain limit is read (and dropped past max_body_size)
            # before the 413, so the caller is not cut off while it still sends.
            if int(length) > self.gw.drain_limit:
                raise self._too_large(int(length))

    def data_received(self, chunk: bytes) -> None:
        self._size += len(chunk)
        if self._size <= self.gw.max_body_size:
            self._chunks.append(chunk)
        else:
            self._chunks = []  # chunked and too large: keep counting, keep nothing

    def body(self) -> bytes:
        if self._size > self.gw.max_body_size:
            raise self._too_large(self._size)
        return b"".join(self._chunks)

    def _too_large(self, size: int) -> PayloadTooLargeError:
        return PayloadTooLargeError(f"body of {size} bytes is larger than this gateway's "
                                    f"limit of {self.gw.max_body_size} bytes")

    def json_body(self, what: str) -> Any:
        return _loads(self.body(), what)


# -- open routes ---------------------------------------------------------------
class LiveHandler(BaseHandler):
    role = OPEN

    def get(self) -> None:
        self.reply({"live": True})


class ReadyHandler(BaseHandler):
    role = OPEN

    def get(self) -> None:
        ready = self.gw.client.status == "running"
        self.reply({"ready": ready}, 200 if ready else 503)


class ServerMetadataHandler(BaseHandler):
    role = OPEN

    def get(self) -> None:
        self.reply({"name": "dask_kaas", "version": __version__,
                    "extensions": ["binary_tensor_data"]})


class NotFoundHandler(BaseHandler):
    role = OPEN

    def prepare(self) -> None:
        raise HTTPError(404, "no such route")


# -- tenant routes: models ------------------------------------------------------
class ModelListHandler(BaseHandler):
    def get(self) -> None:
        assert self.principal is not None
        self.reply({"models": [m.describe() for m in self.gw.registry.list(self.principal.name)]})


class ModelHandler(BodyHandler):
    def put(self, name: str) -> None:
        from .admission import admit_graph
        from .registry import check_name

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
        self.model_label = name
        self.set_status(204)
        self.finish()


class ConstHandler(BodyHandler):
    async def put(self, name: str, buffer: str) -> None:
        from .registry import check_name
        from .tensors import const_from_body

        model = self.model(name)
        check_name(buffer, "buffer")
        if buffer not in model.const_names:
            raise BadRequestError(f"not a const of the model; its consts are "
                                  f"{model.const_names}", graph=model.graph.name,
                                  buffer=buffer)
        value = const_from_body(self.body(), self.request.headers.get("Content-Type"),
                                model.graph.buffers[buffer], model.graph.name)
        self.gw.registry.set_const(self.principal.name, name, buffer, value)
        try:
            model.futures[buffer] = await self.gw.dispatcher.scatter(value)  # sent once, now
        except Exception as e:  # noqa: BLE001 - kept here; sent again with the next request
            logger.warning("const %s of %s/%s not sent yet: %r", buffer, self.principal.name,
                           name, e)
        self.set_status(204)
        self.finish()


# -- tenant routes: KServe v2 --------------------------------------------------
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
            timeout = min(self.gw.request_timeout, request.timeout_s or math.inf)
            consts = await self.gw.dispatcher.const_inputs(model)
            self._task = asyncio.ensure_future(self.gw.dispatcher.run(
                model.graph, {**request.inputs, **consts}, self.principal.name,
                self.gw.weight_of(self.principal), timeout))
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
        payload, header_length = encode_infer_response(model.graph, request, results, VERSION)
        if header_length is not None:
            self.set_header(HEADER_LENGTH, str(header_length))
            self.set_header("Content-Type", "application/octet-stream")
        self.gw.metrics.latency.labels(self.principal.name, name).observe(
            time.perf_counter() - start)
        self.finish(payload)

    def on_connection_close(self) -> None:
        """The caller went away: cancel its request (and the Dask future)."""
        self._gone = True
        if self._task is not None and not self._task.done():
            self._task.cancel()
        super().on_connection_close()


# -- operator routes -----------------------------------------------------------
class WeightHandler(BodyHandler):
    role = OPERATOR

    async def put(self, tenant: str) -> None:
        doc = self.json_body("the weight document")
        weight = doc.get("weight") if isinstance(doc, dict) else None
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not (
                math.isfinite(weight) and 0 < weight <= 1e6):
            raise BadRequestError("body must be {\"weight\": <number in (0, 1e6]>}")
        if tenant not in self.gw.tenants.tenants:
            raise NotFoundError(f"no tenant {tenant[:80]!r} in the tenants file")
        self.gw.weights[tenant] = float(weight)
        await self.gw.dispatcher.call(self.gw.client.kaas_set_weight, tenant, float(weight))
        self.reply({"tenant": tenant, "weight": float(weight)})


class PolicyHandler(BodyHandler):
    role = OPERATOR

    async def put(self) -> None:
        doc = self.json_body("the policy document")
        policy = doc.get("policy") if isinstance(doc, dict) else None
        if not isinstance(policy, str) or len(policy) > 64:
            raise BadRequestError("body must be {\"policy\": \"<name>\"}")
        try:
            name = await self.gw.dispatcher.call(self.gw.client.kaas_set_policy, policy)
        except (KaasError, ValueError, KeyError) as e:
            raise BadRequestError(f"cannot switch to policy {policy!r}: {e}") from None
        self.reply({"policy": name})


class ClearCachesHandler(BodyHandler):
    role = OPERATOR

    async def post(self) -> None:
        await self.gw.dispatcher.call(self.gw.client.kaas_clear_caches)
        self.set_status(204)
        self.finish()


class MetricsHandler(BaseHandler):
    role = OPERATOR

    def get(self) -> None:
        self.set_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        self.finish(self.gw.metrics.render())


def routes(gateway: Gateway) -> list[tuple[str, type, dict[str, Any]]]:
    name = r"([^/]+)"
    version = r"(?:/versions/([^/]+))?"
    kw = {"gateway": gateway}
    return [
        (r"/v2/health/live", LiveHandler, kw),
        (r"/v2/health/ready", ReadyHandler, kw),
        (r"/v2/?", ServerMetadataHandler, kw),
        (rf"/v2/models/{name}{version}/ready", ModelReadyHandler, kw),
        (rf"/v2/models/{name}{version}/infer", InferHandler, kw),
        (rf"/v2/models/{name}{version}", MetadataHandler, kw),
        (r"/v1/models/?", ModelListHandler, kw),
        (rf"/v1/models/{name}/consts/{name}", ConstHandler, kw),
        (rf"/v1/models/{name}", ModelHandler, kw),
        (rf"/v1/tenants/{name}/weight", WeightHandler, kw),
        (r"/v1/policy", PolicyHandler, kw),
        (r"/v1/caches/clear", ClearCachesHandler, kw),
        (r"/metrics", MetricsHandler, kw),
    ]
