"""Keep a cached buffer's host copy where its device copy is, without
changing Dask's replica policy.

A graph task depends on its inputs' Dask keys, so Dask fetches the host copy
to the worker before the graph runs -- even when that worker's device cache
already holds the buffer.  If the Active Memory Manager drops the host replica
that sits next to a device copy, every later request there pays a
worker-to-worker transfer, and the next AMM pass drops the new replica again.

Dask's policies (``ReduceReplicas`` or whatever the user configured) decide
*how many* replicas of a key to drop; the AMM then picks *which* worker drops
each one (``ActiveMemoryManagerExtension._find_dropper``).  We leave every
configured policy alone and refine only that choice, and only for buffers
some device holds: a running worker whose device holds the buffer keeps its
host replica, and such a buffer keeps two host replicas while two exist, so
losing one worker does not lose a tenant's weights.  For every other key the
AMM behaves exactly as Dask's own.

Why not a policy of our own: policies run one after another in set order,
and no policy can take back a drop another one has already chosen, so a
separate policy could protect nothing reliably.  Workers that are paused or
retiring are never protected, so ``RetireWorker`` can always empty them.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from distributed.core import Status

if TYPE_CHECKING:
    from distributed.scheduler import TaskState, WorkerState

    from .directory import BufferDirectory

logger = logging.getLogger(__name__)

#: Host replicas a device-cached buffer keeps while that many exist.
MIN_REPLICAS = 2


class DeviceAwareDropper:
    """Stands in for the AMM's ``_find_dropper`` on one scheduler."""

    def __init__(self, original: Any, directory: BufferDirectory) -> None:
        self.original = original
        self.directory = directory

    def __call__(self, ts: TaskState, candidates: set[WorkerState] | None,
                 pending_drop: set[WorkerState]) -> WorkerState | None:
        key = ts.key
        if not isinstance(key, str) or not ts.who_has or not self.directory.known(key):
            return self.original(ts, candidates, pending_drop)
        holders = self.directory.holders(key)
        if not holders:
            return self.original(ts, candidates, pending_drop)
        allowed = set(ts.who_has) if candidates is None else candidates & ts.who_has
        allowed -= {ws for ws in allowed
                    if ws.address in holders and ws.status == Status.running}
        if len(ts.who_has) - len(pending_drop) <= MIN_REPLICAS:
            allowed = {ws for ws in allowed if ws.status != Status.running}
        if not allowed:
            return None
        return self.original(ts, allowed, pending_drop)


def install(scheduler: Any, directory: BufferDirectory) -> bool:
    """Refine the scheduler's AMM drop choice for device-cached buffers
    (idempotent; every configured policy keeps running unchanged)."""
    amm = scheduler.extensions.get("amm")
    if amm is None:
        return False
    current = getattr(amm, "_find_dropper", None)
    if isinstance(current, DeviceAwareDropper):
        current.directory = directory
        return True
    if current is None:
        logger.warning("dask_kaas: this distributed's Active Memory Manager has no "
                       "_find_dropper; host copies next to device copies are not protected")
        return False
    amm._find_dropper = DeviceAwareDropper(current, directory)
    return True


def uninstall(scheduler: Any) -> None:
    """Give the AMM back its own drop choice (when the plugin closes)."""
    amm = scheduler.extensions.get("amm")
    if amm is not None and isinstance(amm.__dict__.get("_find_dropper"), DeviceAwareDropper):
        del amm._find_dropper
