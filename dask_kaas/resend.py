"""Resender: a request whose const the cluster lost is sent again by its client.

A scattered const has no recipe on the cluster: when the last worker holding
it dies, Dask forgets it and every task that needs it (our requests, and the
tasks exposing their kept outputs), and tells the client those keys are
cancelled.  The client still has what it sent, though (the const registry
holds the arrays of consts that live requests use), so instead of passing the
cancellation on to the program's futures, it scatters the const again and
submits the same requests under the same keys: the futures the program holds
simply complete later.  Only requests whose future the program still holds
are sent again, and only when each of their inputs can be: a cancellation the
program asked for, or one of an input that is not ours, goes through.

A request may take a kept output of another (a chain of graphs on the
device): the producer is then sent again with it, before it, whether or not
its own cancellation has arrived yet (Dask ignores a key it still has), so
the consumer never names a dependency the scheduler already forgot.
"""

from __future__ import annotations

import itertools
import logging
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from distributed import Client, Future

from .consts import GONE, ConstRegistry
from .graph.graph import KernelGraph
from .request import GraphRequest

logger = logging.getLogger(__name__)

#: (client, graph, requests, columns, keep, priority, resource) -> futures
Submit = Callable[[Client, KernelGraph, list[GraphRequest], list[list[Any]], list[str], int, str],
                  list[Future]]


@dataclass(eq=False)
class Recipe:
    """Everything needed to submit one request again."""

    graph: KernelGraph
    request: GraphRequest
    #: The value sent for each input (None where a const goes: see consts).
    values: list[Any]
    #: input position -> const token
    consts: dict[int, str]
    keep: list[str]
    priority: int
    resource: str
    #: Submission order: a producer always comes before its consumers.
    seq: int = 0


class Resender:
    def __init__(self, client: Client, registry: ConstRegistry, submit: Submit) -> None:
        self.client = client
        self.registry = registry
        self.submit = submit
        #: request or kept-output key -> the request's future (weak: a future
        #: the program dropped is not sent again)
        self.owners: weakref.WeakValueDictionary[str, Any] = weakref.WeakValueDictionary()
        self.resending: set[str] = set()
        self._seq = itertools.count()
        #: Requests sent again so far.
        self.resent = 0
        self._cancel = client._stream_handlers["cancelled-keys"]
        client._stream_handlers["cancelled-keys"] = self._on_cancelled

    def track(self, future: Any, recipe: Recipe) -> None:
        recipe.seq = next(self._seq)
        future._kaas_recipe = recipe
        self.owners[str(future.key)] = future
        for key in recipe.request.keep.values():
            self.owners[key] = future

    def _resendable(self, owner: Any, seen: frozenset[int] = frozenset()) -> bool:
        recipe: Recipe | None = getattr(owner, "_kaas_recipe", None)
        if recipe is None or id(owner) in seen:
            return False
        seen = seen | {id(owner)}
        for pos, value in enumerate(recipe.values):
            if pos in recipe.consts:
                if not self.registry.has_array(recipe.consts[pos]):
                    return False
            elif isinstance(value, Future) and not self._input_ok(value, seen):
                return False
        return True

    def _input_ok(self, value: Future, seen: frozenset[int]) -> bool:
        """An input future can be had again: alive, or the output of a
        request of ours that can itself be sent again."""
        producer = self.owners.get(str(value.key))
        if producer is not None:
            return self._resendable(producer, seen)
        return value.status not in GONE

    def _with_producers(self, owners: list[Any]) -> list[Any]:
        """``owners`` and every request of ours whose output they take,
        producers first."""
        found: dict[int, Any] = {}
        todo = list(owners)
        while todo:
            owner = todo.pop()
            if id(owner) in found:
                continue
            found[id(owner)] = owner
            for value in owner._kaas_recipe.values:
                if isinstance(value, Future):
                    producer = self.owners.get(str(value.key))
                    if producer is not None and producer is not owner:
                        todo.append(producer)
        return sorted(found.values(), key=lambda o: o._kaas_recipe.seq)

    def _on_cancelled(self, keys: Any = (), reason: Any = None, msg: Any = None) -> None:
        """Dask's handler for ``cancelled-keys``, on the client's event loop."""
        through, again = [], {}
        for key in keys:
            owner = self.owners.get(key)
            if owner is None or key not in self.client.futures or not self._resendable(owner):
                through.append(key)
            elif owner.key not in self.resending:
                again[owner.key] = owner
        if through:
            self._cancel(keys=through, reason=reason, msg=msg)
        if again:
            self.resending.update(again)
            threading.Thread(target=self._resend, args=(list(again.values()),), daemon=True,
                             name="kaas-resend").start()

    def _resend(self, owners: list[Any]) -> None:
        owners = self._with_producers(owners)
        self.resending.update(str(o.key) for o in owners)
        # Consecutive requests of one kind go in one message, in order; one
        # that takes a kept output of the current message starts the next
        # (kept outputs are their own tasks, sent after their graphs').
        groups: list[list[Recipe]] = []
        last: tuple | None = None
        kept: set[str] = set()
        for owner in owners:
            r: Recipe = owner._kaas_recipe
            kind = (id(r.graph), tuple(r.keep), r.priority, r.resource)
            takes = {str(v.key) for v in r.values if isinstance(v, Future)}
            if kind != last or takes & kept:
                groups.append([])
                last, kept = kind, set()
            groups[-1].append(r)
            kept.update(r.request.keep.values())
        for recipes in groups:
            keys = [r.request.key for r in recipes]
            try:
                columns: list[list[Any]] = [[] for _ in recipes[0].values]
                for r in recipes:
                    for pos, value in enumerate(r.values):
                        if pos in r.consts:
                            value = self.registry.resend(r.consts[pos])
                            if value is None:
                                raise LookupError(f"const {r.consts[pos]} no longer held")
                        columns[pos].append(value)
                first = recipes[0]
                self.submit(self.client, first.graph, [r.request for r in recipes], columns,
                            first.keep, first.priority, first.resource)
                self.resent += len(recipes)
                logger.info("sent %d request(s) of graph %r again: the cluster lost a const",
                            len(recipes), first.graph.name)
            except Exception:  # noqa: BLE001 - the futures must not wait forever
                logger.exception("could not send requests again; cancelling them")
                kept = [k for r in recipes for k in r.request.keep.values()]
                self.client.loop.add_callback(self._cancel, keys=keys + kept,
                                              reason="kaas: lost input could not be sent again")
            finally:
                self.resending.difference_update(keys)
