"""GraphRequest: what travels with one submitted graph.

The client fills it in; the scheduler plugin reads it (as the ``kaas`` task
annotation) to place and prioritise the graph; the worker reads it to know
which inputs are cacheable under which identity and which outputs to keep.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class InputRef:
    """One input of a request, as the scheduler sees it."""

    name: str
    nbytes: int
    #: Cache identity (a Dask key or a content hash); None for data sent
    #: inline with the request, which is never cached.
    buffer_id: str | None
    #: Dask key the value comes from (for host-memory locality), if any.
    dask_key: str | None = None
    const: bool = False


@dataclass
class GraphRequest:
    key: str
    graph: str
    tenant: str
    inputs: list[InputRef]
    #: output name -> buffer id (= Dask key) of outputs kept on the device
    keep: dict[str, str] = field(default_factory=dict)
    nbytes: int = 0
    priority: int = 0
    weight: float | None = None
    role: str = "graph"
    #: Seconds the graph may run on its worker (None: the worker's
    #: ``kaas.request-timeout``); checked again by the worker.
    timeout: float | None = None
    #: Bytes of outputs the worker may send back with its report, pushed by
    #: the scheduler to the submitting client (0: the client gathers them).
    push: int = 0

    @classmethod
    def from_annotation(cls, d: GraphRequest | dict[str, Any]) -> GraphRequest:
        if isinstance(d, GraphRequest):
            return d
        d = dict(d)
        d["inputs"] = [InputRef(**i) for i in d["inputs"]]
        return cls(**d)

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self.inputs]


#: Annotation under which requests travel to the scheduler plugin.
ANNOTATION = "kaas"
#: Role of the small tasks that expose one kept output as its own key.
SELECT_ROLE = "select"


class RequestTable:
    """The ``kaas`` annotation of a batch: evaluated per task key on the
    scheduler (Dask calls callable annotations with the key)."""

    def __init__(self, requests: list[GraphRequest], keys: list[str] | None = None) -> None:
        if keys is None:
            self.table = {r.key: r for r in requests}
        else:  # select tasks: several keys may share a request
            per = len(keys) // max(len(requests), 1)
            self.table = {k: requests[i // per] for i, k in enumerate(keys)}

    def __call__(self, key: Any) -> GraphRequest | None:
        return self.table.get(key)
