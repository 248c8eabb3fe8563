"""The ``kaas_*`` scheduler handlers: what clients, the gateway and the
dashboard ask the scheduler plugin (statistics, cluster facts, weights,
policy, cache clearing).  A mixin of ``KaasSchedulerPlugin``, apart from
the placement and bookkeeping it reads, so each has a module of its own.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from . import access
from .placement import make_policy

if TYPE_CHECKING:
    from .scheduler import KaasSchedulerPlugin

    _Base = KaasSchedulerPlugin
else:
    _Base = object


class HandlersMixin(_Base):
    def _handlers(self) -> dict[str, Any]:
        return {
            "kaas_stats": self.handle_stats,
            "kaas_info": self.handle_info,
            "kaas_set_weight": self.handle_set_weight,
            "kaas_state": self.handle_state,
            "kaas_set_policy": self.handle_set_policy,
            "kaas_clear_caches": self.handle_clear_caches,
        }

    def stats(self) -> dict[str, Any]:
        now = time.time()
        s = self.scheduler
        live = set(s.workers) if s is not None else set()
        workers = {}
        for addr, st in self.worker_stats.items():
            if addr not in live:
                continue
            w = dict(st)
            w["queued"] = len(self.queues.get(addr, {}))
            workers[addr] = w
        return {
            "policy": self.policy.name,
            "workers": workers,
            "tenants": {name: t.to_dict(now) for name, t in sorted(self.tenants.items(),
                                                                   key=lambda kv: str(kv[0]))},
            "weights": dict(self.dispatch.queue.share.weights),
            "dispatch": self.dispatch.snapshot(),
            "pushed_results": self.pushed,
        }

    async def refresh_worker_stats(self) -> None:
        """Exact figures, straight from every worker's cache."""
        s = self.scheduler
        assert s is not None
        workers = [a for a in self.worker_stats if a in s.workers]
        if not workers:
            return
        replies = await s.broadcast(msg={"op": "kaas_worker_stats"}, workers=workers,
                                    on_error="return")
        for addr, reply in replies.items():
            if isinstance(reply, dict) and reply.get("stats"):
                self.worker_stats[addr] = reply["stats"]

    async def handle_stats(self, comm: Any = None) -> dict[str, Any]:
        """Statistics; under TLS a tenant sees only its own tenant's figures
        (and the cluster's), an operator everyone's."""
        await self.refresh_worker_stats()
        caller = access.caller_of(comm)
        stats = self.stats()
        return stats if caller.operator else access.own_view(stats, caller.identity)

    def handle_info(self) -> dict[str, Any]:
        return {"policy": self.policy.name, "resource": self.resource,
                "workers": {a: {"capacity_bytes": st.get("capacity_bytes"),
                                "backend": st.get("backend"), "slots": st.get("slots")}
                            for a, st in self.stats()["workers"].items()},
                "candidates": [v.address for v in self._candidates(time.monotonic())]}

    def handle_set_weight(self, comm: Any = None, tenant: Any = None,
                          weight: Any = None) -> None:
        """A tenant's fair-share weight (another tenant's: operators only)."""
        tenant, weight = access.weight_args(comm, tenant, weight)
        self.dispatch.queue.set_weight(tenant, weight)
        self.book.pinned.add(tenant)  # kept while the tenant is idle
        self.dispatch.wake()

    def handle_set_policy(self, comm: Any = None, policy: Any = None) -> str:
        """Switch the placement policy (for experiments on one cluster);
        an operator action."""
        policy = access.policy_arg(comm, policy)
        self.policy = make_policy(policy)
        self.policy_name = policy
        return self.policy.name

    async def handle_clear_caches(self, comm: Any = None) -> dict[str, Any]:
        """Drop every unpinned buffer from every worker's device cache; an
        operator action."""
        access.require_operator(comm, "kaas_clear_caches")
        s = self.scheduler
        assert s is not None
        return await s.broadcast(msg={"op": "kaas_worker_clear"})

    async def handle_state(self, comm: Any = None) -> dict[str, Any]:
        """The dashboard's full state (every tenant's decisions); under TLS
        an operator action."""
        access.require_operator(comm, "kaas_state")
        await self.refresh_worker_stats()
        state = self.stats()
        state["resident"] = self.directory.snapshot()
        state["timeline"] = list(self.timeline)
        return state
