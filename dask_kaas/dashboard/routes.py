"""``/kaas/state.json``: everything the KaaS page shows, for scripts."""

from __future__ import annotations

import json
import logging
import math
from typing import TYPE_CHECKING, Any

import dask
from tornado.web import RequestHandler

if TYPE_CHECKING:
    from distributed import Scheduler

PATH = "/kaas/state.json"

logger = logging.getLogger(__name__)


class KaasStateHandler(RequestHandler):
    def initialize(self, dask_server: Scheduler) -> None:
        self.server = dask_server

    async def get(self) -> None:
        plugin = self.server.extensions.get("kaas")
        if plugin is None:
            self.set_status(404)
            self.write({"error": "dask_kaas is not installed on this scheduler"})
            return
        try:
            body = encode(await plugin.handle_state())
        except Exception as e:  # one bad answer, never a route that stays broken
            logger.exception("kaas state for %s failed", PATH)
            self.set_status(500)
            self.write({"error": f"{type(e).__name__}: {e}"})
            return
        self.set_header("Content-Type", "application/json")
        self.write(body)


def encode(state: Any) -> str:
    """Strict JSON (what a browser's JSON.parse accepts) of any state: keys
    become strings, non-finite floats null, unknown objects their str."""
    try:
        return json.dumps(state, default=_jsonable, allow_nan=False)
    except (TypeError, ValueError):
        return json.dumps(_clean(state), default=_jsonable, allow_nan=False)


def _clean(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [_clean(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    return str(obj)


def install(scheduler: Scheduler) -> bool:
    """Add the route to the scheduler's HTTP server (works on a running one)."""
    app = getattr(scheduler, "http_application", None)
    if app is None:
        return False
    prefix = (dask.config.get("distributed.scheduler.http.prefix", None) or "").rstrip("/")
    app.add_handlers(r".*", [(prefix + PATH, KaasStateHandler, {"dask_server": scheduler})])
    return True
