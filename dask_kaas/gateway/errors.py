"""Errors of the gateway, each with the HTTP status it answers with.

They are ``KaasError`` subclasses like every other failure of dask_kaas, so
code that drives the gateway in-process (tests, the benchmark) catches one
base class; the handlers turn them into the KServe error shape
``{"error": "..."}`` with :attr:`GatewayError.status`.
"""

from __future__ import annotations

from ..graph.errors import KaasError


class GatewayError(KaasError):
    """A request the gateway refuses; ``status`` is its HTTP status."""

    status = 400


class BadRequestError(GatewayError):
    """Malformed request: bad JSON, wrong tensor, bad name, bad header."""

    status = 400


class UnauthorizedError(GatewayError):
    """No bearer token, or one that matches no tenant or operator."""

    status = 401


class ForbiddenError(GatewayError):
    """A valid token used on a route its holder may not use."""

    status = 403


class NotFoundError(GatewayError):
    """No such thing (route, tenant)."""

    status = 404


class ModelNotFoundError(NotFoundError):
    """No model of that name *for this tenant* (another tenant's model is
    not found either: its existence is not disclosed)."""


class PayloadTooLargeError(GatewayError):
    """The body is larger than the gateway accepts."""

    status = 413


class TooManyRequestsError(GatewayError):
    """The tenant has ``max_in_flight`` requests running already."""

    status = 429

    def __init__(self, message: str, retry_after_s: int = 1, **kw: object) -> None:
        super().__init__(message, **kw)  # type: ignore[arg-type]
        self.retry_after_s = retry_after_s


class GatewayTimeoutError(GatewayError):
    """The request did not finish within the gateway's request timeout."""

    status = 504


class TenantsFileError(KaasError):
    """The tenants file cannot be read or is malformed."""
