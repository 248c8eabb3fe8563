"""``/kaas/state.json``: everything the KaaS page shows, for scripts."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import dask
from tornado.web import RequestHandler

if TYPE_CHECKING:
    from distributed import Scheduler

PATH = "/kaas/state.json"


class KaasStateHandler(RequestHandler):
    def initialize(self, dask_server: Scheduler) -> None:
        self.server = dask_server

    async def get(self) -> None:
        plugin = self.server.extensions.get("kaas")
        if plugin is None:
            self.set_status(404)
            self.write({"error": "dask_kaas is not installed on this scheduler"})
            return
        state = await plugin.handle_state()
        self.set_header("Content-Type", "application/json")
        self.write(json.dumps(state, default=_jsonable))


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
