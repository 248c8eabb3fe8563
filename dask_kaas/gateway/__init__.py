"""The front door for tenants: an authenticated KServe v2 HTTP gateway.

Tenants that do not trust each other reach the pool only through a gateway:
a Dask client can run any code on every worker, a gateway caller can only
register data-only kernel graphs and call them.  ``dask-kaas gateway`` runs
one (see :mod:`dask_kaas.gateway.cli`); several may serve one cluster.
"""

from .app import Gateway
from .errors import GatewayError
from .tenants import TenantBook, token_digest

__all__ = ["Gateway", "GatewayError", "TenantBook", "token_digest"]
