"""Who may do what on the scheduler: tenant identity and operator actions.

Without TLS the cluster is one trust domain: any Dask client can run any
code on every worker, so a tenant name is a label, not a proof, and the
checks here only keep accidents and forged fields out of the scheduler's
state.  With Dask TLS and client certificates
(``Security(require_encryption=True, ...)``) the subject CN of a client's
certificate is its identity:

* a request's tenant is that identity; a request that declares another
  tenant is refused (``"default"``, the tenant of a call that names none,
  means the identity), unless the caller is an operator (a gateway
  submitting for its tenants);
* cluster-wide actions (``kaas_set_policy``, ``kaas_clear_caches``,
  ``kaas_state``) and setting another tenant's weight need an identity
  listed in ``kaas.operators``;
* ``kaas_stats`` shows a tenant its own figures and the cluster's, not
  other tenants' (``own_view``).

A refused request fails like any other task (its task is replaced by one
that raises the refusal), so the client receives the KaasError from
``result()`` and nothing of it enters the plugin's books.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .. import checks, config
from ..graph.errors import AccessDeniedError, KaasError, RequestParameterError
from ..graph.names import name_problem, show
from ..request import GraphRequest
from .placement import POLICIES

if TYPE_CHECKING:
    from distributed import Scheduler
    from distributed.scheduler import TaskState

#: The tenant of a submission that names none.
DEFAULT_TENANT = "default"
#: Where statistics go that arrive with an unusable tenant name (a forged
#: worker report): counted, never a key that breaks sorting or JSON.
INVALID_TENANT = "<invalid>"
#: Largest result a request may ask to have pushed through the scheduler
#: (below the 10 MiB from which Dask packs a message in another thread).
MAX_PUSH_BYTES = 8 << 20


@dataclass(frozen=True)
class Caller:
    """The other end of a comm: ``tls`` says whether it proved an identity."""

    tls: bool
    identity: str | None = None

    @property
    def operator(self) -> bool:
        return not self.tls or (self.identity is not None and self.identity in operators())

    def describe(self) -> str:
        return f"identity {self.identity!r}" if self.identity else "a certificate without CN"


def operators() -> frozenset[str]:
    """``kaas.operators``; a malformed setting is an error (never "anyone")."""
    value = config.get("operators", []) or []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise KaasError(f"config kaas.operators must be a list of certificate identities, "
                        f"got {show(value)}")
    return frozenset(value)


def caller_of(comm: Any) -> Caller:
    """The identity a comm proved: the subject commonName of the peer's TLS
    certificate; ``Caller(tls=False)`` for a plain TCP (or in-process) comm."""
    info = getattr(comm, "extra_info", None)
    if not isinstance(info, dict) or "peercert" not in info:
        return Caller(tls=False)
    cert = info.get("peercert") or {}
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName" and not name_problem(value):
                return Caller(tls=True, identity=value)
    return Caller(tls=True)


def client_caller(scheduler: Scheduler, client: Any) -> Caller:
    """The identity of a client, from the batched comm the scheduler keeps
    for it (``update_graph`` gets only the client's id)."""
    bcomm = scheduler.client_comms.get(client) if client is not None else None
    comm = getattr(bcomm, "comm", None)
    if comm is None and scheduler.security.require_encryption:
        return Caller(tls=True)  # unknown client on a TLS cluster: no identity
    return caller_of(comm)


def require_operator(comm: Any, action: str) -> None:
    caller = caller_of(comm)
    if not caller.operator:
        raise AccessDeniedError(f"{action} is an operator action and {caller.describe()} is "
                                f"not listed in kaas.operators")


def own_view(stats: dict[str, Any], tenant: str | None) -> dict[str, Any]:
    """``stats`` with every per-tenant table cut down to ``tenant``."""
    def mine(table: Any) -> Any:
        return {k: v for k, v in table.items() if k == tenant} if isinstance(table, dict) \
            else table

    view = dict(stats)
    view["tenants"] = mine(stats.get("tenants", {}))
    view["weights"] = mine(stats.get("weights", {}))
    dispatch = dict(stats.get("dispatch") or {})
    for name in ("backlog", "vruntime", "weights"):
        if name in dispatch:
            dispatch[name] = mine(dispatch[name])
    view["dispatch"] = dispatch
    return view


def tenant_for(caller: Caller, declared: Any, what: str) -> str:
    """The tenant a caller acts as when it names ``declared``."""
    tenant = checks.check_tenant(declared)
    if caller.operator or tenant == caller.identity:
        return tenant
    if tenant == DEFAULT_TENANT and caller.identity is not None:
        return caller.identity
    raise AccessDeniedError(f"{caller.describe()} may not {what} tenant {tenant!r}; its "
                            "tenant is its certificate's identity")


def weight_args(comm: Any, tenant: Any, weight: Any) -> tuple[str, float]:
    """Arguments of ``kaas_set_weight``: a valid name and weight, and the
    caller's own tenant unless it is an operator."""
    name = tenant_for(caller_of(comm), tenant, "set the weight of")
    return name, checks.check_weight(weight, optional=False)  # type: ignore[return-value]


def policy_arg(comm: Any, policy: Any) -> str:
    require_operator(comm, "kaas_set_policy")
    if not isinstance(policy, str) or policy not in POLICIES:
        raise RequestParameterError(f"unknown placement policy {show(policy)}; expected one "
                                    f"of {', '.join(POLICIES)}")
    return policy


def admit(scheduler: Scheduler, client: Any, meta: Any) -> GraphRequest:
    """The request an annotation carries, checked as the client checks it
    (it may have been forged on the way), with its tenant set to the one the
    client may act as."""
    try:
        request = GraphRequest.from_annotation(meta)
    except Exception as e:  # any shape of garbage
        raise RequestParameterError(f"malformed kaas request annotation: "
                                    f"{type(e).__name__}") from None
    problem = name_problem(request.graph)
    if problem:
        raise RequestParameterError(f"graph name {problem}")
    checks.check_priority(request.priority, request.graph)
    checks.check_weight(request.weight, request.graph)
    push = request.push
    if isinstance(push, bool) or not isinstance(push, int) or not 0 <= push <= MAX_PUSH_BYTES:
        raise RequestParameterError(f"push must be a byte count from 0 to {MAX_PUSH_BYTES}, "
                                    f"got {show(push)}", graph=request.graph)
    for ref in request.inputs:
        if (isinstance(ref.nbytes, bool) or not isinstance(ref.nbytes, int) or ref.nbytes < 0
                or not (ref.buffer_id is None or isinstance(ref.buffer_id, str))):
            raise RequestParameterError("malformed input reference in the request",
                                        graph=request.graph, buffer=show(ref.name))
    request.tenant = tenant_for(client_caller(scheduler, client), request.tenant,
                                "submit as")
    return request


def refuse(ts: TaskState, error: KaasError) -> None:
    """Make a graph task fail with ``error`` instead of running: the client
    receives it from ``result()`` as it would any task's exception."""
    from dask._task_spec import Task

    ts.run_spec = Task(ts.key, raise_refusal, error)


def raise_refusal(error: KaasError) -> None:
    raise error


def safe_tenant(name: Any) -> str:
    """A tenant name fit for the statistics (a forged report may carry
    anything): the name itself when valid, else INVALID_TENANT."""
    return name if not name_problem(name) else INVALID_TENANT
