"""The gateway's request timeout, above Dask's own.

When a worker's host goes silent (power, kernel panic, link down), nothing
fails at once: the scheduler learns of it when its connection to the worker
times out, after ``distributed.comm.timeouts.tcp``, and only then re-runs
the worker's tasks elsewhere (fetching or re-sending their consts, which may
take another ``distributed.comm.timeouts.connect`` when the first try was to
the dead host).  A gateway that gave up at the same moment (its old default,
30 s, was Dask's default TCP timeout) answered 504 to every such request just
before Dask would have run it again.  So, by default, a request may take
Dask's TCP timeout plus its connect timeout plus :data:`MARGIN_S` for the
re-run itself: 90 s with Dask's defaults.

A silent worker the scheduler has nothing to send to is only noticed at
``distributed.scheduler.worker-ttl`` (5 minutes by default); a gateway whose
requests must survive that too needs ``--request-timeout`` above it, or a
lower ``worker-ttl``.
"""

from __future__ import annotations

import dask
from dask.utils import parse_timedelta

#: Seconds left, past Dask's time to give up on a silent host, for a request
#: to run again on another worker.
MARGIN_S = 30.0


def dask_seconds(key: str) -> float:
    """A Dask duration setting (``"30s"``, a number, ...) in seconds."""
    return float(parse_timedelta(dask.config.get(key), default="s"))


def dask_failover_s() -> float:
    """How long Dask may take to give up on a silent host: its TCP timeout
    (noticing) plus its connect timeout (a first try to the dead address)."""
    return dask_seconds("distributed.comm.timeouts.tcp") + \
        dask_seconds("distributed.comm.timeouts.connect")


def default_request_timeout() -> float:
    """The gateway's request timeout when none is given: Dask's time to give
    up on a silent host, plus :data:`MARGIN_S` to run the request again."""
    return dask_failover_s() + MARGIN_S
