"""The gateway: tenants, models, dispatcher and metrics behind one Tornado app."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import ssl
from typing import Any

import tornado.web
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets

from ..client import KaasClient
from .dispatch import Dispatcher
from .errors import TenantsFileError
from .handlers import (
    LiveHandler,
    NotFoundHandler,
    ReadyHandler,
    ServerMetadataHandler,
)
from .metrics import GatewayMetrics, MalformedMessages
from .model_routes import (
    ConstHandler,
    InferHandler,
    MetadataHandler,
    ModelHandler,
    ModelListHandler,
    ModelReadyHandler,
)
from .operator_routes import ClearCachesHandler, MetricsHandler, PolicyHandler, WeightHandler
from .registry import ModelRegistry
from .tenants import Principal, TenantBook
from .timeouts import default_request_timeout

logger = logging.getLogger(__name__)


def routes(gateway: Gateway) -> list[tuple[str, type, dict[str, Any]]]:
    """The URL table (anything else is a JSON 404)."""
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


class Gateway:
    """Everything one gateway process holds.

    ``client`` is a synchronous :class:`KaasClient` (see
    :mod:`dask_kaas.gateway.dispatch` for why); the HTTP side runs on the
    event loop that calls :meth:`serve`.
    """

    def __init__(self, client: KaasClient, tenants_path: str | os.PathLike[str], *,
                 max_body_size: int = 64 << 20, request_timeout: float | None = None,
                 max_models: int = 64, max_const_bytes: int = 1 << 30,
                 submit_threads: int = 4, max_model_size: int = 512 << 20,
                 max_batch_size: int = 64, max_graphs: int = 8) -> None:
        if request_timeout is None:  # above Dask's own timeouts: see gateway.timeouts
            request_timeout = default_request_timeout()
        if max_body_size < 1 or not request_timeout > 0 or max_model_size < 1 \
                or max_batch_size < 0 or max_graphs < 1:
            raise ValueError("max_body_size, max_model_size, max_graphs and request_timeout "
                             "must be positive, max_batch_size not negative")
        self.client = client
        self.tenants_path = os.fspath(tenants_path)
        self.tenants = TenantBook.load(self.tenants_path)
        self.max_body_size = int(max_body_size)
        #: largest ONNX file a tenant may upload as a model
        self.max_model_size = int(max_model_size)
        #: default max_batch_size of an ONNX model with a symbolic batch dimension
        self.max_batch_size = int(max_batch_size)
        #: graphs (distinct input shapes) kept per ONNX model
        self.max_graphs = int(max_graphs)
        #: bodies up to this size are read and dropped after a 413 so the caller
        #: gets its answer; larger ones are answered at once and the connection closed
        self.drain_limit = 2 * max(self.max_body_size, self.max_model_size) + (1 << 20)
        self.request_timeout = float(request_timeout)
        self.registry = ModelRegistry(max_models, max_const_bytes)
        self.dispatcher = Dispatcher(client, submit_threads)
        self.metrics = GatewayMetrics()
        #: counts the messages Tornado refuses before any handler (see metrics)
        self.malformed = MalformedMessages(self.metrics)
        #: weights set by an operator at run time (until the next reload)
        self.weights: dict[str, float] = {}
        self.server: HTTPServer | None = None

    def weight_of(self, tenant: Principal) -> float:
        return self.weights.get(tenant.name, tenant.weight)

    def reload(self) -> bool:
        """Re-read the tenants file (SIGHUP).  A bad file changes nothing."""
        try:
            book = TenantBook.load(self.tenants_path)
        except TenantsFileError as e:
            logger.error("tenants file not reloaded, the previous one stays: %s", e)
            return False
        self.tenants = book
        self.weights.clear()
        gone = self.registry.retain_tenants(book.tenants)
        for tenant in gone:
            self.metrics.forget_tenant(tenant)
        logger.info("tenants file reloaded: %d tenant(s), %d operator(s)%s",
                    len(book.tenants), len(book.operators),
                    f"; models of removed tenants {gone} dropped" if gone else "")
        return True

    def make_app(self) -> tornado.web.Application:
        return tornado.web.Application(
            routes(self), default_handler_class=NotFoundHandler,
            default_handler_args={"gateway": self}, compress_response=False)

    def listen(self, host: str, port: int,
               ssl_options: ssl.SSLContext | None = None) -> str:
        """Bind and start serving on the running loop; the bound address."""
        self.malformed.attach()
        sockets = bind_sockets(port, address=host)
        self.server = HTTPServer(self.make_app(), ssl_options=ssl_options,
                                 max_body_size=self.drain_limit,
                                 idle_connection_timeout=300, body_timeout=120,
                                 xheaders=False)
        self.server.add_sockets(sockets)
        bound_host, bound_port = sockets[0].getsockname()[:2]
        scheme = "https" if ssl_options is not None else "http"
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        return f"{scheme}://{shown}:{bound_port}"

    async def serve(self, host: str, port: int, ssl_options: ssl.SSLContext | None = None,
                    on_listen: Any = None) -> None:
        """Serve until SIGTERM/SIGINT; SIGHUP re-reads the tenants file."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        address = self.listen(host, port, ssl_options)
        for sig, handler in ((signal.SIGHUP, self.reload), (signal.SIGTERM, stop.set),
                             (signal.SIGINT, stop.set)):
            try:
                loop.add_signal_handler(sig, handler)
            except (NotImplementedError, RuntimeError, ValueError):  # not the main thread
                pass
        if on_listen is not None:
            on_listen(address)
        await stop.wait()
        await self.close()

    async def close(self) -> None:
        self.malformed.detach()
        if self.server is not None:
            self.server.stop()
            await self.server.close_all_connections()
        self.dispatcher.close()
