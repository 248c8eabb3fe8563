"""ConstRegistry: the const arrays one client has on its cluster.

A const is scattered once and found again by content (its Dask key is
``kaas-const-<token>``, which is also its device-cache identity).  The token
is taken from the array's *logical* content at every submission
(:func:`.const_identity.content_token`): a transpose or another memory order of the same bytes
is another const, and an array changed in place since its last submission is
sent again under its new content.  Two things bound what the client keeps:

* an entry is *in use* while a live request future of this client needs it:
  then the registry holds the cluster copy and the array itself, so that a
  const whose every replica died with its workers can be sent again (see
  :class:`Resender`) — no request is lost while its client lives;
* otherwise it is a cache for the next submission, kept only while the
  program still holds the array (it will likely send it again), within
  ``kaas.client-const-cache`` bytes, least recently used first out.  An array
  the program dropped releases its cluster copy at once.

A const released here and sent again later gets a new key: Dask forgets a
released key asynchronously, so scattering the same key again could be
undone by the release still on its way.

Weak-reference callbacks and finalizers run on whatever thread the garbage
collector happens to run, including the client's event loop, so they never
wait for the registry lock: they mark it dirty and whoever holds it sweeps.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import threading
import time
import uuid
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import dask
import numpy as np
from dask.utils import parse_bytes, parse_timedelta
from distributed import Client, Future
from distributed.comm.core import CommClosedError

from . import config
from .const_identity import content_token
from .graph.errors import KaasError

#: Future states after which a const must be scattered again.
GONE = ("lost", "error", "cancelled")
#: A const scattered for a submission counts as in use this long even before
#: the submission's futures exist (so a temporary array is not released
#: between scatter and submit).
FRESH_S = 60.0
#: Released tokens remembered (their next scatter takes a fresh key).
RELEASED_KEPT = 4096
#: What a scatter to a dead or unknown worker raises: try the next one.
SCATTER_FAILURES = (KeyError, ValueError, OSError, TimeoutError, asyncio.TimeoutError,
                    CommClosedError)

logger = logging.getLogger(__name__)


def scatter_timeout() -> float:
    """Seconds one scatter attempt may take: Dask's connect timeout (a dead
    host is given up after it) plus the time to send."""
    connect = parse_timedelta(dask.config.get("distributed.comm.timeouts.connect"), "s")
    return float(connect) + 10.0


def const_key(token: str) -> str:
    return f"kaas-const-{token}"


def cache_budget() -> int:
    """``kaas.client-const-cache`` in bytes."""
    value = config.get("client-const-cache", "256MB")
    try:
        if isinstance(value, bool):
            raise TypeError(value)
        nbytes = int(parse_bytes(value)) if isinstance(value, str) else int(value)
    except (TypeError, ValueError, OverflowError):
        raise KaasError(f"kaas.client-const-cache must be a size such as '256MB' or a "
                        f"number of bytes, got {value!r}") from None
    if nbytes < 0:
        raise KaasError(f"kaas.client-const-cache must not be negative, got {value!r}")
    return nbytes


@dataclass(eq=False)
class ConstEntry:
    token: str
    key: str
    nbytes: int
    future: Future | None = None
    #: Held while in use (to send again); None otherwise.
    array: np.ndarray | None = None
    #: The program's array (weak): alive means it may be sent again.
    source: weakref.ref | None = None
    users: int = 0
    fresh_at: float = 0.0
    last_used: float = 0.0

    def in_use(self, now: float) -> bool:
        return self.users > 0 or now - self.fresh_at < FRESH_S


class ConstRegistry:
    def __init__(self, client: Client, candidates: Callable[[bool], list[str]]) -> None:
        self.client = client
        #: (refresh) -> addresses of the workers that run graphs
        self.candidates = candidates
        self.entries: OrderedDict[str, ConstEntry] = OrderedDict()
        self.lock = threading.RLock()
        self._dirty = False
        self._sweeping = False
        #: Tokens whose user died while the lock was taken (see sweep).
        self._pending_release: list[str] = []
        self._by_key: dict[str, str] = {}  # Dask key -> token
        self._released: OrderedDict[str, None] = OrderedDict()

    # -- lookups ---------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values())

    def future(self, token: str, arr: np.ndarray, fresh: bool = True) -> Future:
        """The cluster copy of ``arr`` (content ``token``), scattered if needed.

        ``fresh=False`` sends it ahead of any request (the gateway, on upload):
        the entry is then not counted as in use for :data:`FRESH_S`, so it
        stays only while the caller holds ``arr`` (and within the budget),
        and a value replaced before any request used it is released at once.
        """
        now = time.monotonic()
        with self.lock:
            e = self.entries.get(token)
            if e is None:
                key = const_key(token)
                if token in self._released:
                    key = f"{key}-{uuid.uuid4().hex[:12]}"
                e = self.entries[token] = ConstEntry(token, key, int(arr.nbytes))
                self._by_key[key] = token
            try:  # the latest array with this content decides whether it is kept
                e.source = weakref.ref(arr, self._source_died)
            except TypeError:
                e.source = None
            if fresh:
                e.fresh_at = now
            e.last_used = now
            e.array = np.asarray(arr, order="C")
            self.entries.move_to_end(token)
            fut = e.future
        if fut is None or fut.status in GONE:
            fut = self._scatter(e.key, np.asarray(arr, order="C"))
            with self.lock:
                e.future = fut
        self.sweep()
        return fut

    def token_of(self, key: str) -> str | None:
        """The token of a const key this registry scattered."""
        with self.lock:
            return self._by_key.get(key)

    def has_array(self, token: str) -> bool:
        """Whether this client can send the const again."""
        with self.lock:
            e = self.entries.get(token)
            return e is not None and e.array is not None

    def resend(self, token: str) -> Future | None:
        """The const again, scattered anew if the cluster lost every copy;
        None if this client no longer has the array as it was submitted
        (dropped, or changed in place since: sending it under the old
        content's key would compute with other weights)."""
        with self.lock:
            e = self.entries.get(token)
            if e is None or e.array is None:
                return None
            fut, arr = e.future, e.array
        if fut is not None and fut.status not in GONE and self._held(fut):
            return fut
        if content_token(arr) != token:
            return None
        fut = self._scatter(e.key, arr)
        with self.lock:
            e.future = fut
        return fut

    def _scatter(self, key: str, arr: np.ndarray) -> Future:
        """Send a const to one graph worker, then a second copy in the
        background (losing one worker then loses no const).

        Each attempt is bounded: a worker that was just killed, or whose
        host went silent, may still be on the scheduler's list, and Dask's
        ``scatter(broadcast=True)`` then retries replication to it for ever.
        So the first copy goes to one worker at a time (the next one on a
        failure, then Dask's choice), and the second is best effort.
        """
        deadline = time.monotonic() + 2 * scatter_timeout()
        for attempt in itertools.count():
            workers = list(self.candidates(attempt > 0))
            random.shuffle(workers)
            for addr in workers[:2]:
                try:
                    fut = self._scatter_to(key, arr, [addr])
                except SCATTER_FAILURES:
                    continue
                others = [w for w in workers if w != addr]
                if others:
                    self.client.loop.add_callback(self._second_copy, key, arr, others[0])
                return fut
            try:
                return self._scatter_to(key, arr, None)  # Dask's choice
            except SCATTER_FAILURES:
                # Every worker is going or being replaced (a restart, a
                # crash of the whole pool): wait for new ones, within bounds.
                if time.monotonic() > deadline:
                    raise
                time.sleep(min(0.2 * 2 ** attempt, 2.0))
        raise AssertionError("unreachable")  # pragma: no cover

    def _held(self, fut: Future) -> bool:
        """Whether a worker still holds a const: its cancellation may not
        have reached this client yet when the requests that need it are
        sent again."""
        try:
            return bool(self.client.who_has([fut]).get(fut.key))
        except Exception:  # noqa: BLE001 - unsure: send it again (same content)
            return False

    def _scatter_to(self, key: str, arr: np.ndarray, workers: list[str] | None) -> Future:
        async def send() -> Future:
            futs = await asyncio.wait_for(
                self.client.scatter({key: arr}, workers=workers, hash=False, asynchronous=True),
                scatter_timeout())
            return futs[key]
        return self.client.sync(send)

    async def _second_copy(self, key: str, arr: np.ndarray, addr: str) -> None:
        """A replica on another worker; a failure only costs the replica."""
        try:
            with self.lock:
                wanted = self._by_key.get(key) is not None
            if wanted:
                await asyncio.wait_for(
                    self.client.scatter({key: arr}, workers=[addr], hash=False,
                                        asynchronous=True),
                    scatter_timeout())
        except Exception as e:  # noqa: BLE001 - best effort by design
            logger.info("second copy of const %s on %s failed: %r", key, addr, e)

    # -- use by requests -------------------------------------------------------
    def hold(self, owner: Any, tokens: Iterable[str]) -> None:
        """``owner`` (a request future) needs these consts while it lives."""
        tokens = list(tokens)
        if not tokens:
            return
        with self.lock:
            for tok in tokens:
                e = self.entries.get(tok)
                if e is not None:
                    e.users += 1
                    e.fresh_at = 0.0
        weakref.finalize(owner, self._release, tokens)
        if self._dirty:
            self.sweep()

    def _release(self, tokens: list[str]) -> None:
        if not self.lock.acquire(blocking=False):
            self._pending_release.extend(tokens)
            self._dirty = True
            return
        try:
            self._drop_users(tokens)
        finally:
            self.lock.release()
        self.sweep(blocking=False)

    def _drop_users(self, tokens: Iterable[str]) -> None:
        for tok in tokens:
            e = self.entries.get(tok)
            if e is not None:
                e.users = max(0, e.users - 1)

    def _source_died(self, _: Any) -> None:
        self._dirty = True
        self.sweep(blocking=False)

    # -- bounds ----------------------------------------------------------------
    def sweep(self, blocking: bool = True) -> None:
        """Release what nothing needs, then evict idle entries over budget."""
        if not self.lock.acquire(blocking=blocking):
            self._dirty = True
            return
        try:
            if self._sweeping:
                # A finalizer run mid-sweep (same thread: the lock is an
                # RLock).  Leave the work to the running sweep, and leave its
                # flag alone: clearing it here would let the next nested
                # sweep forget entries the running one is iterating over.
                self._dirty = True
                return
            self._sweeping = True
            try:
                self._dirty = True
                while self._dirty:
                    self._dirty = False
                    released = self._sweep_once()
                    del released  # dropping futures may run finalizers: they set _dirty
            finally:
                self._sweeping = False
        finally:
            self.lock.release()

    def _sweep_once(self) -> list[ConstEntry]:
        pending, self._pending_release = self._pending_release, []
        self._drop_users(pending)
        now = time.monotonic()
        released = []
        for tok, e in list(self.entries.items()):
            if e.in_use(now):
                continue
            e.array = None
            if e.source is None or e.source() is None:
                released.append(self._forget(tok))
        budget = cache_budget()
        idle = sum(e.nbytes for e in self.entries.values() if not e.in_use(now))
        for tok, e in list(self.entries.items()):  # least recently used first
            if idle <= budget:
                break
            if not e.in_use(now):
                idle -= e.nbytes
                released.append(self._forget(tok))
        return released

    def _forget(self, token: str) -> ConstEntry:
        e = self.entries.pop(token)
        self._by_key.pop(e.key, None)
        self._released[token] = None
        self._released.move_to_end(token)
        while len(self._released) > RELEASED_KEPT:
            self._released.popitem(last=False)
        return e
