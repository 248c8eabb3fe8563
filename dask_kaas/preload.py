"""``dask scheduler --preload dask_kaas.preload``: dask_kaas on a cluster
started from the command line.

On the scheduler it installs the scheduler plugin, which adds the KaaS page to
the dashboard when it starts and hands the worker plugin to every worker that
joins (start workers with ``dask worker ADDRESS --resources GPU=1``).  Settings come
from the ``kaas.*`` Dask config, e.g. ``DASK_KAAS__POLICY=balance`` or
``DASK_KAAS__DEVICE_MEMORY_LIMIT=8GB`` in the environment of the processes.
On a worker (``dask worker --preload dask_kaas.preload``) it checks the
configured backend before the worker starts taking tasks.
"""

from __future__ import annotations

from typing import Any


def dask_setup(server: Any) -> None:
    from distributed import Scheduler

    if isinstance(server, Scheduler):
        from .plugin.scheduler import KaasSchedulerPlugin

        if "dask-kaas" not in server.plugins:
            server.add_plugin(KaasSchedulerPlugin())
        return
    from . import config
    from .device.backend import resolve_backend_name

    resolve_backend_name(config.get("backend"))  # fail now, with a KaasError, if unusable
