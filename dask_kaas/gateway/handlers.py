"""The gateway's base handlers: authentication, errors, bodies, open routes.

Every error leaves in the KServe shape ``{"error": "..."}`` with the status
of its :class:`~dask_kaas.gateway.errors.GatewayError` (Tornado's own errors,
such as bad percent-encoding in a path, too).  Bodies are streamed in and
counted (``stream_request_body``) so that a body over the limit is answered
413 with a message, from its ``Content-Length`` before any of it is read.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

from tornado.web import HTTPError, RequestHandler, stream_request_body

from .. import __version__
from .errors import (
    BadRequestError,
    ForbiddenError,
    GatewayError,
    ModelNotFoundError,
    PayloadTooLargeError,
    TooManyRequestsError,
    UnauthorizedError,
)
from .kserve import loads_json
from .metrics import CLIENT_CLOSED
from .tenants import Principal

if TYPE_CHECKING:
    from .app import Gateway

logger = logging.getLogger(__name__)

OPEN, TENANT, OPERATOR = "open", "tenant", "operator"
#: The one version every model has.
VERSION = "1"


class BaseHandler(RequestHandler):
    role = TENANT

    def initialize(self, gateway: Gateway) -> None:
        self.gw = gateway
        self.principal: Principal | None = None
        self.model_label = "-"
        self._counted = False

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
        self.count(self.get_status())

    def count(self, status: int) -> None:
        """Count this request in the metrics, once, by how it ended."""
        if self._counted:
            return
        self._counted = True
        tenant = self.principal.name if self.principal else "-"
        self.gw.metrics.observe(tenant, self.model_label, status)

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

    def body_limit(self) -> int:
        """The largest body this route keeps (model uploads take more)."""
        return self.gw.max_body_size

    def data_received(self, chunk: bytes) -> None:
        self._size += len(chunk)
        if self._size <= self.body_limit():
            self._chunks.append(chunk)
        else:
            self._chunks = []  # chunked and too large: keep counting, keep nothing

    def body(self) -> bytes:
        if self._size > self.body_limit():
            raise self._too_large(self._size)
        return b"".join(self._chunks)

    def _too_large(self, size: int) -> PayloadTooLargeError:
        return PayloadTooLargeError(f"body of {size} bytes is larger than this gateway's "
                                    f"limit of {self.body_limit()} bytes")

    def on_connection_close(self) -> None:
        """The connection closed before the body was whole: the handler's
        method never runs and nothing is answered (Tornado returns from the
        request), so the request is counted here: 400 if Tornado refused a
        malformed body (it answered that itself), else 499, the caller gone."""
        body_whole = self.request._body_future.done()
        super().on_connection_close()
        # claimed even when this request was answered already (a 413 from
        # prepare, then Tornado refusing the rest): it is counted once
        malformed = self.gw.malformed.claim(self.request.connection.context)
        if not body_whole and not self._finished:
            self.count(400 if malformed else CLIENT_CLOSED)

    def json_body(self, what: str) -> Any:
        return loads_json(self.body(), what)


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
