"""dask_kaas on the Dask dashboard: the KaaS page, a JSON route, Prometheus.

Nothing here is imported until a scheduler starts the KaaS plugin: workers,
clients and schedulers without a dashboard never import Bokeh on our account.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from distributed import Scheduler

    from ..plugin.scheduler import KaasSchedulerPlugin


def install(scheduler: Scheduler, plugin: KaasSchedulerPlugin) -> None:
    """Add the ``/kaas`` page and menu entry (where the scheduler has a
    dashboard), ``/kaas/state.json`` and the ``dask_kaas_*`` metrics."""
    from . import metrics, page, routes

    page.install_page(scheduler)
    routes.install(scheduler)
    metrics.register(plugin)


def uninstall(plugin: KaasSchedulerPlugin) -> None:
    from . import metrics

    metrics.unregister(plugin)
