"""DeviceCache: the worker's device memory, owned and accounted exactly.

Every byte a graph uses on the device goes through here: cached buffers
(keyed by identity, so equal weights are loaded once), and the private
buffers of a running graph (temps, outputs, per-request inputs).  Graphs
reserve everything they need up front, atomically; buffers in use are
pinned; unpinned buffers are evicted least-recently-used first; buffers that
hold the only copy of their data (outputs kept on the device) are written
back to their host handle before they are dropped.  ``used_bytes`` never
exceeds ``capacity_bytes``: a graph that does not fit waits for running
graphs to release memory, and one that could never fit is refused.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np

from ..graph.errors import DeviceFaultError, DeviceOutOfMemoryError
from . import oom
from .backend import Backend
from .cache_records import CacheEntry, CacheStats, Load, Reservation

__all__ = ["CacheEntry", "CacheStats", "DeviceCache", "Load", "Reservation"]


class DeviceCache:
    def __init__(self, backend: Backend, capacity_bytes: int,
                 wait_timeout: float = 300.0,
                 needed_soon: Callable[[], set[str]] | None = None,
                 on_fault: Callable[[str], bool] | None = None) -> None:
        if capacity_bytes <= 0:
            raise ValueError(f"device capacity must be positive, got {capacity_bytes}")
        self.backend = backend
        self.capacity_bytes = int(capacity_bytes)
        self.wait_timeout = wait_timeout
        #: Buffer ids that graphs already queued on this worker will use:
        #: evicted only when nothing else can go (look-ahead before LRU).
        self.needed_soon = needed_soon
        #: Called with the reason when a copy to the host meets a sticky
        #: device fault (a read by any thread, a write-back, a clear): the
        #: runtime marks its worker broken, and says whether it was the first.
        self.on_fault = on_fault
        self.stats = CacheStats()
        self._entries: OrderedDict[str, CacheEntry] = OrderedDict()
        self._entry_bytes = 0
        self._private_bytes = 0
        self._cond = threading.Condition()
        self._events: list[tuple[str, str, int]] = []
        self._closed = False

    # -- accounting ----------------------------------------------------
    @property
    def used_bytes(self) -> int:
        return self._entry_bytes + self._private_bytes

    def _account(self) -> None:
        used = self.used_bytes
        assert used <= self.capacity_bytes, (used, self.capacity_bytes)
        if used > self.stats.peak_used_bytes:
            self.stats.peak_used_bytes = used

    def snapshot(self) -> dict[str, Any]:
        with self._cond:
            const_bytes = sum(e.nbytes for e in self._entries.values() if e.const)
            return {
                "capacity_bytes": self.capacity_bytes,
                "used_bytes": self.used_bytes,
                "cached_bytes": self._entry_bytes,
                "const_bytes": const_bytes,
                "private_bytes": self._private_bytes,
                "entries": len(self._entries),
                "hits": self.stats.hits,
                "misses": self.stats.misses,
                "evictions": self.stats.evictions,
                "bytes_to_device": self.stats.bytes_to_device,
                "bytes_to_host": self.stats.bytes_to_host,
                "writebacks": self.stats.writebacks,
                "peak_used_bytes": self.stats.peak_used_bytes,
                "seconds_to_device": self.stats.seconds_to_device,
            }

    def resident(self) -> dict[str, int]:
        """Buffer id -> bytes of every buffer currently on the device."""
        with self._cond:
            return {k: e.nbytes for k, e in self._entries.items() if not e.loading}

    def __contains__(self, buffer_id: str) -> bool:
        with self._cond:
            e = self._entries.get(buffer_id)
            return e is not None and not e.loading

    def drain_events(self) -> list[tuple[str, str, int]]:
        """("add" | "remove", buffer id, bytes) since the last call, for the
        scheduler's buffer directory."""
        with self._cond:
            events, self._events = self._events, []
            return events

    # -- eviction --------------------------------------------------------
    def _evictable_bytes(self) -> int:
        return sum(e.nbytes for e in self._entries.values() if e.pins == 0 and not e.loading)

    def _victims(self, need: int, exclude: Any = ()) -> list[CacheEntry]:
        """The unpinned entries to drop for ``need`` bytes to be free: first
        those no queued graph will use, least recently used first, then the
        rest.  Caller holds the lock."""
        soon = self.needed_soon() if self.needed_soon is not None else set()
        free = self.capacity_bytes - self.used_bytes
        out: list[CacheEntry] = []
        chosen: set[str] = set()
        for spare_soon in (True, False):
            for key, e in self._entries.items():
                if free >= need:
                    return out
                if (key not in chosen and key not in exclude and e.pins == 0
                        and not e.loading and not (spare_soon and key in soon)):
                    out.append(e)
                    chosen.add(key)
                    free += e.nbytes
        return out

    def _evict_until(self, need: int) -> None:
        """Drop the victims for ``need`` bytes.  Caller holds the lock and
        checked it is possible."""
        for e in self._victims(need):
            self._remove(e, evicted=True)

    def _copy_to_host(self, e: CacheEntry) -> np.ndarray:
        """A host copy of ``e``'s device array.  A sticky device fault met
        here marks the worker broken (``on_fault``) like one met by a kernel."""
        reason = ""
        try:
            self.backend.wait_ready(e.ready, None)
            return self.backend.to_host(e.array, None)
        except Exception as exc:  # noqa: BLE001 - only a sticky fault is handled here
            if not self.backend.is_fatal(exc):
                raise
            reason = f"{type(exc).__name__}: {exc}"
        first = self.on_fault(reason) if self.on_fault is not None else True
        err = DeviceFaultError(f"the device faulted while copying {e.buffer_id!r} to the "
                               f"host ({reason}); its worker is restarted")
        err.innocent = first is False  # type: ignore[attr-defined]
        raise err

    @staticmethod
    def _sole_copy(e: CacheEntry) -> bool:
        return e.array is not None and e.owner is not None and e.owner() is not None

    def _write_back_victims(self, need: int, exclude: Any) -> bool:
        """Copy to the host, with the lock released, the victims that hold
        the only copy of their data, so that evicting them later under the
        lock copies nothing and other slots are not held up.  Returns whether
        anything was written back (the caller then looks again).  Caller
        holds the lock once."""
        return self._write_back([e for e in self._victims(need, exclude) if self._sole_copy(e)])

    def _write_back(self, todo: list[CacheEntry]) -> bool:
        """Write ``todo`` back to their handles with the lock released."""
        if not todo:
            return False
        for e in todo:
            e.pins += 1  # neither evicted nor dropped while copied
        hosts: list[np.ndarray | None] = []
        self._cond.release()
        try:
            for e in todo:
                hosts.append(self._copy_to_host(e))
        finally:
            self._cond.acquire()
            for e, host in zip(todo, hosts + [None] * (len(todo) - len(hosts))):
                e.pins -= 1
                owner = e.owner() if e.owner is not None else None
                if host is not None and owner is not None:
                    owner._store_host(host)
                    e.owner = None  # no longer the only copy
                    self.stats.writebacks += 1
                    self.stats.bytes_to_host += host.nbytes
                if e.pins == 0 and e.drop_when_unpinned and e.buffer_id in self._entries:
                    self._remove(e, evicted=False)
            self._cond.notify_all()
        return True

    def _remove(self, e: CacheEntry, evicted: bool) -> None:
        owner = e.owner() if e.owner is not None else None
        if owner is not None and e.array is not None:
            host = self._copy_to_host(e)
            owner._store_host(host)
            self.stats.writebacks += 1
            self.stats.bytes_to_host += host.nbytes
        del self._entries[e.buffer_id]
        self._entry_bytes -= e.nbytes
        e.array = None
        if evicted:
            self.stats.evictions += 1
        self._events.append(("remove", e.buffer_id, e.nbytes))
        self._cond.notify_all()

    # -- reservations ----------------------------------------------------
    def reserve(self, loads: list[Load], private_bytes: int, stream: Any = None,
                graph: str | None = None) -> Reservation:
        """Pin (and load, on a miss) every cacheable buffer in ``loads`` and
        set aside ``private_bytes`` for the graph's own buffers, atomically.

        Waits while other graphs hold the memory needed; raises
        DeviceOutOfMemoryError when the request could never fit.
        """
        res = Reservation()
        # One pin and one load per identity: two buffers of a graph may hold
        # the same content (two zero biases share a const key).
        unique: dict[str, Load] = {}
        for ld in loads:
            unique.setdefault(ld.buffer_id, ld)
        loads = list(unique.values())
        sizes = {ld.buffer_id: self.backend.alloc_size(ld.nbytes) for ld in loads}
        private = int(private_bytes)
        deadline = time.monotonic() + self.wait_timeout
        with self._cond:
            while True:
                self._check_open()
                loading = [k for k in sizes if k in self._entries and self._entries[k].loading]
                if loading:
                    self._wait(deadline, graph)
                    continue
                misses = [k for k in sizes if k not in self._entries]
                hit_bytes = sum(sizes[k] for k in sizes if k in self._entries)
                need = sum(sizes[k] for k in misses) + private
                if need + hit_bytes > self.capacity_bytes:
                    raise DeviceOutOfMemoryError(
                        f"needs {need + hit_bytes} bytes of device memory at once but the "
                        f"device cache holds {self.capacity_bytes}", graph=graph)
                free = self.capacity_bytes - self.used_bytes
                evictable = self._evictable_bytes() - sum(
                    self._entries[k].nbytes for k in sizes
                    if k in self._entries and self._entries[k].pins == 0)
                if need > free + evictable:
                    self._wait(deadline, graph)
                    continue
                if self._write_back_victims(need, sizes):
                    continue
                break
            # Pin hits first so eviction below cannot take them.
            hit_markers = []
            for ld in loads:
                e = self._entries.get(ld.buffer_id)
                if e is not None:
                    e.pins += 1
                    self._entries.move_to_end(ld.buffer_id)
                    res.pinned.append(ld.buffer_id)
                    res.hits += 1
                    res.arrays[ld.buffer_id] = e.array
                    if e.ready is not None:
                        hit_markers.append(e.ready)
            self._evict_until(need)
            missing = [ld for ld in loads if ld.buffer_id not in self._entries]
            for ld in missing:
                e = CacheEntry(ld.buffer_id, sizes[ld.buffer_id], pins=1, const=ld.const)
                self._entries[ld.buffer_id] = e
                self._entry_bytes += e.nbytes
                res.pinned.append(ld.buffer_id)
                res.misses += 1
            self._private_bytes += private
            res.private_bytes = private
            self.stats.hits += res.hits
            self.stats.misses += res.misses
            self._account()
        # A hit may have been loaded by another slot whose copy is still in
        # flight on that slot's stream: this graph's stream waits for it.
        for marker in hit_markers:
            self.backend.wait_ready(marker, stream)
        # Copy misses to the device outside the lock: other graphs may run.
        try:
            for ld in missing:
                t0 = time.perf_counter()
                host = ld.source()
                try:
                    arr = self.backend.to_device(host, stream)
                except MemoryError as e:  # the worker's own allocation: the device's
                    oom.mark(e)
                    raise
                # Marked after the copy is queued, before anyone can hit it.
                marker = self.backend.record_ready(stream)
                dt = time.perf_counter() - t0
                with self._cond:
                    e = self._entries[ld.buffer_id]
                    e.array = arr
                    e.ready = marker
                    e.loading = False
                    res.arrays[ld.buffer_id] = arr
                    res.bytes_to_device += host.nbytes
                    res.seconds_to_device += dt
                    self.stats.bytes_to_device += host.nbytes
                    self.stats.seconds_to_device += dt
                    self._events.append(("add", ld.buffer_id, e.nbytes))
                    self._cond.notify_all()
        except BaseException:
            self.release(res)
            raise
        return res

    def _wait(self, deadline: float, graph: str | None) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not self._cond.wait(timeout=min(remaining, 1.0)):
            if time.monotonic() >= deadline:
                raise DeviceOutOfMemoryError(
                    f"waited {self.wait_timeout:.0f}s for device memory held by other graphs",
                    graph=graph)

    def count_private_load(self, res: Reservation, nbytes: int, seconds: float) -> None:
        """Record a copy to the device that is not cached (per-request data)."""
        with self._cond:
            res.bytes_to_device += nbytes
            res.seconds_to_device += seconds
            self.stats.bytes_to_device += nbytes
            self.stats.seconds_to_device += seconds

    def release(self, res: Reservation, keep: dict[str, tuple[Any, int, Any]] | None = None
                ) -> None:
        """Unpin a graph's buffers and return its private bytes.

        ``keep`` maps new buffer ids to (device array, bytes, owner handle):
        outputs kept on the device, which move from the graph's private bytes
        into the cache as entries whose only copy is on the device.
        """
        with self._cond:
            for key in res.pinned:
                e = self._entries.get(key)
                if e is None:
                    continue
                e.pins -= 1
                if e.loading and e.array is None:
                    # A failed load: forget the half-made entry.
                    del self._entries[key]
                    self._entry_bytes -= e.nbytes
                elif e.pins == 0 and e.drop_when_unpinned:
                    self._remove(e, evicted=False)
            res.pinned = []
            kept_bytes = 0
            for key, (arr, nbytes, owner) in (keep or {}).items():
                size = self.backend.alloc_size(nbytes)
                kept_bytes += size
                old = self._entries.pop(key, None)
                if old is not None:
                    self._entry_bytes -= old.nbytes
                self._entries[key] = CacheEntry(
                    key, size, array=arr, loading=False,
                    owner=weakref.ref(owner) if owner is not None else None)
                self._entry_bytes += size
                self._events.append(("add", key, size))
            self._private_bytes -= res.private_bytes
            # Kept outputs were counted in the graph's private bytes.
            assert kept_bytes <= res.private_bytes or not keep, (kept_bytes, res.private_bytes)
            res.private_bytes = 0
            self._account()
            self._cond.notify_all()

    # -- kept outputs ----------------------------------------------------
    def discard(self, buffer_id: str) -> None:
        """Forget a buffer whose handle is gone (no write-back)."""
        with self._cond:
            e = self._entries.get(buffer_id)
            if e is None:
                return
            e.owner = None
            if e.pins:
                e.drop_when_unpinned = True
            elif not e.loading:
                self._remove(e, evicted=False)

    def read_host(self, buffer_id: str) -> np.ndarray | None:
        """A host copy of a resident buffer, or None if it is not here."""
        with self._cond:
            e = self._entries.get(buffer_id)
            if e is None or e.loading:
                return None
            e.pins += 1
        host = None
        try:
            host = self._copy_to_host(e)
        finally:
            with self._cond:
                e.pins -= 1
                if host is not None:
                    self.stats.bytes_to_host += host.nbytes
                if e.pins == 0 and e.drop_when_unpinned and e.buffer_id in self._entries:
                    self._remove(e, evicted=False)
        return host

    def _check_open(self) -> None:
        if self._closed:
            raise DeviceOutOfMemoryError("the device cache is closed (worker shutting down)")

    #: Rounds of write-backs outside the lock before ``clear`` drops the rest.
    CLEAR_ROUNDS = 3

    def clear(self) -> None:
        """Drop every unpinned entry.  Kept outputs are written back to their
        handles first, with the lock released (other slots go on), so only
        an output kept while clearing is copied under the lock."""
        with self._cond:
            for _ in range(self.CLEAR_ROUNDS):
                todo = [e for e in self._entries.values()
                        if e.pins == 0 and not e.loading and self._sole_copy(e)]
                if not self._write_back(todo):
                    break
            for e in list(self._entries.values()):
                if e.pins == 0 and not e.loading:
                    self._remove(e, evicted=False)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            for e in self._entries.values():
                e.array = None
            self._entries.clear()
            self._entry_bytes = 0
            self._cond.notify_all()
