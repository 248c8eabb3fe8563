"""Per-request limits: the time limit and the cap on ``n_iter``.

Both are checked twice: by the client, so a mistake is refused before
anything reaches the cluster, and by the worker, because the request a
worker receives is only as trustworthy as the client that built it.
"""

from __future__ import annotations

import math
from typing import Any

from . import config
from .graph.errors import GraphError, KaasError


def check_timeout(value: Any, graph: str | None = None, what: str = "timeout") -> float | None:
    """``value`` as a time limit in seconds: a finite number > 0, or None."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise KaasError(f"{what} must be a number of seconds or None, got "
                        f"{type(value).__name__}", graph=graph)
    try:
        seconds = float(value)
    except OverflowError:  # an int too large for a float
        seconds = math.inf
    if not math.isfinite(seconds) or seconds <= 0:
        raise KaasError(f"{what} must be finite and > 0 seconds, got {value!r}", graph=graph)
    return seconds


def _config_seconds(key: str, graph: str | None = None) -> float | None:
    """A ``kaas.*`` duration: a number of seconds, a string such as "30s", or null."""
    from dask.utils import parse_timedelta

    value = config.get(key)
    if isinstance(value, str):
        try:
            value = parse_timedelta(value)
        except (ValueError, KeyError, TypeError):
            raise KaasError(f"kaas.{key} must be a duration such as '30s', got "
                            f"{value!r}", graph=graph) from None
    return check_timeout(value, graph, what=f"kaas.{key}")


def request_timeout(timeout: Any = None, graph: str | None = None) -> float | None:
    """The time limit of a request: its own ``timeout`` when given, else
    ``kaas.request-timeout`` (None: no limit)."""
    if timeout is not None:
        return check_timeout(timeout, graph)
    return _config_seconds("request-timeout", graph)


#: ``kaas.request-timeout-grace`` when it is null.
DEFAULT_GRACE_S = 10.0


def timeout_grace() -> float:
    """How long a timed-out kernel may run on before its worker is restarted."""
    grace = _config_seconds("request-timeout-grace")
    return DEFAULT_GRACE_S if grace is None else grace


def max_n_iter() -> int | None:
    """``kaas.max-n-iter``: the largest ``n_iter`` a graph may ask for."""
    cap = config.get("max-n-iter")
    if cap is None:
        return None
    if isinstance(cap, bool) or not isinstance(cap, int) or cap < 1:
        raise KaasError(f"kaas.max-n-iter must be a positive integer or null, got {cap!r}")
    return cap


def check_n_iter(graph: Any) -> None:
    """Refuse a graph whose ``n_iter`` exceeds ``kaas.max-n-iter``."""
    n_iter = getattr(graph, "n_iter", None)
    name = getattr(graph, "name", None)
    if isinstance(n_iter, bool) or not isinstance(n_iter, int) or n_iter < 1:
        raise GraphError(f"n_iter must be a positive int, got {n_iter!r}", graph=name)
    cap = max_n_iter()
    if cap is not None and n_iter > cap:
        raise GraphError(f"n_iter {n_iter} exceeds kaas.max-n-iter ({cap})", graph=name)
