"""dask_kaas on the Dask dashboard: the KaaS page, a JSON route, Prometheus.

Importing this module adds the ``/kaas`` Bokeh page to the scheduler
dashboard's applications (and its menu), so a scheduler created afterwards in
this process shows it: ``LocalKaasCluster`` and ``dask scheduler --preload
dask_kaas.preload`` both import it before the scheduler's dashboard starts.
"""

from __future__ import annotations

from .page import register_page

register_page()
