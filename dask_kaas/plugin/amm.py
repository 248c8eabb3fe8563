"""Keep a cached buffer's host copy where its device copy is.

A graph task depends on its inputs' Dask keys, so Dask fetches the host copy
to the worker before the graph runs -- even when that worker's device cache
already holds the buffer.  Dask's Active Memory Manager, left alone, drops
"superfluous" replicas without knowing which one sits next to a device copy,
and every later request then pays a worker-to-worker transfer.  This policy
takes the place of ``ReduceReplicas``: it drops the same number of replicas,
but never the ones on workers whose device holds the buffer, and it keeps
two replicas of a cached buffer (where two exist) so that losing one worker
does not lose a tenant's weights.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from distributed.active_memory_manager import (
    ActiveMemoryManagerPolicy,
    ReduceReplicas,
    Suggestion,
)

if TYPE_CHECKING:
    from .directory import BufferDirectory


class DeviceAwareReduceReplicas(ActiveMemoryManagerPolicy):
    __slots__ = ("directory",)

    def __init__(self, directory: BufferDirectory) -> None:
        self.directory = directory

    def run(self):  # type: ignore[no-untyped-def]
        for ts in self.manager.scheduler.replicated_tasks:
            key = str(ts.key)
            by_device = {ws for ws in ts.who_has if self.directory.holds(ws.address, key)}
            cached = bool(self.directory.holders(key))
            waiting_on = {w.processing_on for w in ts.waiters or () if w.processing_on}
            keep_n = max(2 if cached else 1, len(waiting_on))
            ndrop = len(ts.who_has) - keep_n
            if ts in self.manager.pending:
                pending_repl, pending_drop = self.manager.pending[ts]
                ndrop += len(pending_repl) - len(pending_drop)
            if ndrop <= 0:
                continue
            droppable = set(ts.who_has) - by_device - waiting_on
            for _ in range(min(ndrop, len(droppable))):
                ws = yield Suggestion("drop", ts, droppable)
                if ws is None:
                    break
                droppable.discard(ws)


def install(scheduler, directory: BufferDirectory) -> bool:  # type: ignore[no-untyped-def]
    """Swap the scheduler's ReduceReplicas for the device-aware policy."""
    amm = scheduler.extensions.get("amm")
    if amm is None:
        return False
    for policy in list(amm.policies):
        if type(policy) is ReduceReplicas:
            amm.policies.discard(policy)
            amm.add_policy(DeviceAwareReduceReplicas(directory))
            return True
    return False
