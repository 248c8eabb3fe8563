"""FairShare: each tenant's virtual runtime, advanced by measured service.

Why measured service and not tags stamped at submission: a tag computed from
a run-time *estimate* when the request arrives charges tenants admitted
before and after the estimate changes different prices, and it freezes the
order of work that has not started.  Here a tenant's virtual runtime grows by
the device time its graphs really used (reported by the worker), divided by
its weight, and the dispatcher always serves the backlogged tenant with the
least.  While released work runs, the dispatcher charges its *estimate*
(``charge``) and corrects it by the difference once the measured time is in,
so several releases in a row do not all go to the same tenant.

A tenant that becomes backlogged again starts no lower than the system's
virtual time (``rejoin``): idle time banks no credit, so a tenant back from a
pause cannot shut the others out.  The queue takes as virtual time the least
backlogged virtual runtime, or the virtual runtime at which the last request
was released if that is lower (the start tag of start-time fair queueing).
Why the second: a client that sends its next request when the last one
returns has, between the two, nothing queued; levelling it up to the
backlogged tenants' runtimes, which already include the request just
released to one of them, took a bit of its weight every time (two tenants at
2:1 with four such clients each measured 1.5:1 that way).
"""

from __future__ import annotations

import math

from ..checks import check_weight


class FairShare:
    """Weights and virtual runtimes of tenants (a tenant not seen has weight 1)."""

    def __init__(self) -> None:
        self.weights: dict[str, float] = {}
        self.vruntime: dict[str, float] = {}

    def weight(self, tenant: str) -> float:
        return self.weights.get(tenant, 1.0)

    def set_weight(self, tenant: str, weight: float) -> None:
        """Takes effect at once: every later charge uses the new weight, and
        the order of queued work is decided by virtual runtime at release."""
        self.weights[tenant] = check_weight(weight, optional=False)  # type: ignore[assignment]

    def charge(self, tenant: str, seconds: float) -> float:
        """Advance ``tenant`` by ``seconds`` of device time (negative for a
        correction of an earlier estimate); returns its new virtual runtime."""
        if not math.isfinite(seconds):
            seconds = 0.0
        vr = self.vruntime.get(tenant, 0.0) + seconds / self.weight(tenant)
        self.vruntime[tenant] = vr
        return vr

    def rejoin_at(self, tenant: str, floor: float) -> float:
        """Where ``tenant`` would start if it became backlogged at virtual
        time ``floor``: there, unless it is already ahead."""
        return max(self.vruntime.get(tenant, floor), floor)

    def rejoin(self, tenant: str, floor: float) -> float:
        """``tenant`` becomes backlogged at virtual time ``floor``."""
        vr = self.vruntime[tenant] = self.rejoin_at(tenant, floor)
        return vr

    def forget(self, tenant: str) -> None:
        """Drop an idle tenant's state (it rejoins at the virtual time)."""
        self.weights.pop(tenant, None)
        self.vruntime.pop(tenant, None)

    def of(self, tenant: str) -> float:
        return self.vruntime.get(tenant, 0.0)
