"""Models: kernel graphs owned by the tenant that registered them.

Names are per tenant, and a lookup only ever searches the caller's own
namespace, so another tenant's model is *not found* (404), never forbidden:
its existence is not disclosed.  Every per-tenant structure is bounded (model
count, const bytes), and a tenant dropped from the tenants file loses its
models.  A const is read-only once uploaded; its content token is taken then,
once.  It is sent to the cluster through the client's const registry (see
:mod:`dask_kaas.gateway.dispatch`), which keeps the cluster copy while the
model holds the array here: replacing or deleting the model drops the array,
so the cluster forgets values no model uses any more (a tenant that uploads
new weights in a loop cannot fill the cluster).  The host copy stays here,
bounded per tenant, to send again if every worker holding it is lost.
Only the gateway's event-loop thread touches a registry.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..graph.buffers import BufferKind
from ..graph.graph import KernelGraph
from .errors import BadRequestError, ModelNotFoundError, PayloadTooLargeError
from .tenants import NAME_RE


def check_name(name: str, what: str = "model") -> str:
    """Model and buffer names in URLs: the tenant-name alphabet, so no
    ``..``, slashes, control characters or anything that needs escaping."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or name.strip(".") == "":
        raise BadRequestError(f"bad {what} name {str(name)[:80]!r}: use 1-64 letters, "
                              "digits, '_', '.' or '-', starting with a letter or digit")
    return name


@dataclass
class Model:
    tenant: str
    name: str
    graph: KernelGraph
    consts: dict[str, np.ndarray] = field(default_factory=dict)
    #: the content token of each const (see dask_kaas.const_identity.content_token)
    tokens: dict[str, str] = field(default_factory=dict)

    @property
    def const_names(self) -> list[str]:
        return [b.name for b in self.graph.buffers_of(BufferKind.CONST)]

    def missing_consts(self) -> list[str]:
        return [n for n in self.const_names if n not in self.consts]

    @property
    def ready(self) -> bool:
        return not self.missing_consts()

    @property
    def const_bytes(self) -> int:
        return sum(a.nbytes for a in self.consts.values())

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "ready": self.ready, "consts": self.const_names,
                "missing_consts": self.missing_consts(),
                "inputs": [b.name for b in self.graph.buffers_of(BufferKind.INPUT)],
                "outputs": [b.name for b in self.graph.outputs], "n_iter": self.graph.n_iter}


class ModelRegistry:
    def __init__(self, max_models: int = 64, max_const_bytes: int = 1 << 30) -> None:
        self.max_models = max_models
        self.max_const_bytes = max_const_bytes
        self._models: dict[str, dict[str, Model]] = {}

    def get(self, tenant: str, name: str) -> Model:
        model = self._models.get(tenant, {}).get(name)
        if model is None:
            raise ModelNotFoundError(f"no model {str(name)[:80]!r}")
        return model

    def put(self, tenant: str, name: str, graph: KernelGraph) -> bool:
        """Register (or replace, dropping its consts) ``name``; True if new."""
        check_name(name)
        own = self._models.setdefault(tenant, {})
        if name not in own and len(own) >= self.max_models:
            raise BadRequestError(f"tenant has {len(own)} models, the most this gateway "
                                  "keeps per tenant; delete one first")
        created = name not in own
        old = own.get(name)
        own[name] = Model(tenant, name, graph)
        if old is not None and getattr(old, "batcher", None) is not None:
            old.batcher.close()
        return created

    def put_served(self, tenant: str, name: str, model: Any) -> bool:
        """Register (or replace) a model that brings its own consts (an ONNX
        model: :class:`~dask_kaas.gateway.onnx_models.OnnxServed`), counted
        against the tenant's const bytes like uploaded consts; True if new."""
        check_name(name)
        own = self._models.setdefault(tenant, {})
        if name not in own and len(own) >= self.max_models:
            raise BadRequestError(f"tenant has {len(own)} models, the most this gateway "
                                  "keeps per tenant; delete one first")
        used = sum(m.const_bytes for n, m in own.items() if n != name)
        if used + model.const_bytes > self.max_const_bytes:
            raise PayloadTooLargeError(
                f"the tenant's consts would take {used + model.const_bytes} bytes, more "
                f"than the {self.max_const_bytes} this gateway keeps per tenant")
        created = name not in own
        old = own.get(name)
        own[name] = model
        if old is not None and getattr(old, "batcher", None) is not None:
            old.batcher.close()
        return created

    def delete(self, tenant: str, name: str) -> None:
        model = self.get(tenant, name)
        del self._models[tenant][name]
        if getattr(model, "batcher", None) is not None:
            model.batcher.close()

    def list(self, tenant: str) -> list[Model]:
        return [self._models[tenant][n] for n in sorted(self._models.get(tenant, {}))]

    def const_inputs(self, model: Model) -> dict[str, tuple[np.ndarray, str]]:
        """``name: (value, token)`` of the model's consts, as they are now."""
        return {n: (v, model.tokens[n]) for n, v in model.consts.items()}

    def set_const(self, tenant: str, name: str, buffer: str, value: np.ndarray,
                  token: str) -> None:
        """Keep ``value`` (content ``token``) as the model's const ``buffer``."""
        model = self.get(tenant, name)
        if buffer not in model.const_names:
            raise BadRequestError(f"not a const of the model; its consts are "
                                  f"{model.const_names}", graph=model.graph.name,
                                  buffer=str(buffer)[:80])
        used = sum(m.const_bytes for m in self.list(tenant))
        old = model.consts.get(buffer)
        used -= old.nbytes if old is not None else 0
        if used + value.nbytes > self.max_const_bytes:
            raise PayloadTooLargeError(
                f"the tenant's consts would take {used + value.nbytes} bytes, more than "
                f"the {self.max_const_bytes} this gateway keeps per tenant",
                graph=model.graph.name, buffer=buffer)
        value.setflags(write=False)  # a const is promised never to change
        model.consts[buffer] = value
        model.tokens[buffer] = token

    def retain_tenants(self, tenants: Iterable[str]) -> list[str]:
        """Forget the models of tenants no longer in the tenants file."""
        keep = set(tenants)
        gone = [t for t in self._models if t not in keep]
        for t in gone:
            for model in self._models.pop(t).values():
                if getattr(model, "batcher", None) is not None:
                    model.batcher.close()
        return gone
