"""Anticipation: keeping a place for a request that is about to come.

Most clients send their next request when the last one returns (an HTTP
client, a user's loop of ``.result()``).  Between the two such a tenant has
nothing queued, and a work-conserving dispatcher hands every place that opens
meanwhile to whoever has work waiting, so shares follow how many requests
each tenant keeps outstanding, not the weights.  So a place that opens on a
worker that is still busy (a prefetch place: the worker idles not one moment
while it stays empty) is kept, for a short while, for a tenant ahead in fair
order whose request has just finished and whose next one is expected.  A
place on an idle worker is never kept.

``ExpectedReturns`` is the bookkeeping (which tenants owe a request, since
when, and how long each usually takes to come back: the wait is learned per
tenant); ``DispatchQueue.anticipation`` decides against the fair order, and
``PlaceTimer`` runs the dispatcher's release pass again when a wait ends.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from .. import config
from ..graph.errors import KaasError

#: Longest ``kaas.anticipation`` in seconds.
MAX_ANTICIPATION_S = 10.0
#: Weight of a new sample in a tenant's mean return time.
RETURN_EWMA = 0.2
#: Wait at most this many times a tenant's mean return time.
RETURN_SLACK = 2.0


def anticipation_s() -> float:
    """``kaas.anticipation`` in seconds (null or 0: off)."""
    from dask.utils import parse_timedelta

    value = config.get("anticipation", 0.05)
    if value is None:
        return 0.0
    try:
        seconds = parse_timedelta(value) if isinstance(value, str) else value
        ok = (not isinstance(seconds, bool) and isinstance(seconds, (int, float))
              and 0 <= seconds <= MAX_ANTICIPATION_S)
    except (ValueError, KeyError, TypeError, OverflowError):
        ok = False
    if not ok:
        raise KaasError(f"kaas.anticipation must be a duration from 0 to "
                        f"{MAX_ANTICIPATION_S:g} s (or null), got {value!r}")
    return float(seconds)


@dataclass
class Expected:
    """Requests a tenant is expected to send again (one per finished one)."""

    owed: int
    since: float  # when the last of them finished
    until: float  # when waiting for them ends
    due: float  # when the next one is expected, by its mean return time


class ExpectedReturns:
    """Who owes a request back, and how long each tenant takes to send one."""

    def __init__(self, window_s: float = 0.0) -> None:
        #: Longest a place is kept for an expected request (0: never).
        self.window_s = window_s
        #: tenant -> requests expected back, oldest ``since`` first
        self._owed: OrderedDict[str, Expected] = OrderedDict()
        #: tenant -> mean seconds from a finished request to its next one
        self.mean_s: dict[str, float] = {}

    def __bool__(self) -> bool:
        return bool(self._owed)

    def finished(self, tenant: str, now: float, still_out: int) -> None:
        """One of ``tenant``'s requests finished at ``now``, ``still_out``
        others not yet: a client waiting for this result sends one more; a
        tenant owes at most one per request it still has out, plus this one
        (a finished burst is not owed back in full)."""
        if self.window_s <= 0:
            return
        exp = self._owed.pop(tenant, None)
        owed = min((exp.owed if exp else 0) + 1, still_out + 1)
        self._owed[tenant] = Expected(owed, now, now + self.wait_s(tenant),
                                      now + self.mean_s.get(tenant, 0.0))

    def returned(self, tenant: str, now: float) -> None:
        """``tenant`` sent a request at ``now``: one fewer owed, and a sample
        of its return time."""
        exp = self._owed.get(tenant)
        if exp is None:
            return
        sample = max(now - exp.since, 0.0)
        if sample <= self.window_s:
            mean = self.mean_s.get(tenant)
            self.mean_s[tenant] = sample if mean is None else (
                mean + RETURN_EWMA * (sample - mean))
        exp.owed -= 1
        if exp.owed <= 0:
            del self._owed[tenant]

    def waiting(self, now: float) -> Iterator[tuple[str, Expected]]:
        """Tenants whose requests are still waited for at ``now``."""
        cut = now - self.window_s
        while self._owed:  # oldest first: drop the ones past any wait
            tenant, exp = next(iter(self._owed.items()))
            if exp.since > cut:
                break
            del self._owed[tenant]
        for tenant, exp in self._owed.items():
            if exp.until > now:
                yield tenant, exp

    def wait_s(self, tenant: str) -> float:
        """How long after a finished request its tenant's next one is waited
        for: twice its mean return time (all of ``window_s`` until one is
        known), at most ``window_s``."""
        mean = self.mean_s.get(tenant)
        if mean is None:
            return self.window_s
        return min(self.window_s, RETURN_SLACK * mean + 0.001)

    def forget(self, tenant: str) -> None:
        self.mean_s.pop(tenant, None)
        self._owed.pop(tenant, None)


class PlaceTimer:
    """One timer on the scheduler's loop for the end of the earliest wait."""

    def __init__(self, loop_of: Callable[[], Any], on_end: Callable[[], None]) -> None:
        self._loop_of = loop_of
        self._on_end = on_end
        self._handle: Any = None
        self._when = 0.0

    def at(self, when: float, now: float) -> None:
        """Call ``on_end`` at monotonic time ``when`` (unless set earlier)."""
        if self._handle is not None and self._when <= when:
            return
        loop = self._loop_of()
        if loop is None:
            return
        self.cancel()
        self._when = when
        self._handle = loop.call_later(max(when - now, 0.0) + 0.0005, self._fire)

    def _fire(self) -> None:
        self._handle = None
        self._on_end()

    def cancel(self) -> None:
        loop = self._loop_of()
        if self._handle is not None and loop is not None:
            loop.remove_timeout(self._handle)
        self._handle = None
