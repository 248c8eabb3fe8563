"""The control plane's settings as the latency profile and the closed-loop
bench switch them live between windows: the client's and the scheduler's
stream intervals, release at submission and the worker's report path
("dask" is how the code ran before issue 20), and CPU per process.
"""

from __future__ import annotations

import time
from typing import Any

#: name -> (client stream ms, scheduler->worker stream ms, release at
#: submission, worker->scheduler stream ms or None to leave it (Dask's 2 ms),
#: the KaaS report with Dask's task-finished, results pushed with the
#: report, concurrent submissions coalesced, one instance per distinct
#: graph in every process).  "dask" is how the code ran before these
#: settings: Dask's own intervals, every graph held and released by a pass,
#: the report sent on its own a tick before task-finished, every result
#: gathered, one message per submission, a graph copy per request.
Variant = tuple[float, float, bool, "float | None", bool, bool, bool, bool]
VARIANTS: dict[str, Variant] = {
    "dask": (10.0, 5.0, False, None, False, False, False, False),
    "client-interval": (1.0, 5.0, False, None, False, False, False, False),
    "+worker-interval": (1.0, 1.0, False, None, False, False, False, False),
    "+at-submit": (1.0, 1.0, True, None, False, False, False, False),
    "+report-with-result": (1.0, 1.0, True, None, True, False, False, False),
    "+push-result": (1.0, 1.0, True, None, True, True, False, False),
    "+coalesce": (1.0, 1.0, True, None, True, True, True, False),
    "+shared-graphs": (1.0, 1.0, True, None, True, True, True, True),
    # Not in the code: the workers' own stream to the scheduler at 1 ms too.
    "+worker-stream-1ms": (1.0, 1.0, True, 1.0, True, True, True, True),
}
#: The settings the code runs with by default.
DEFAULT_VARIANT = "+shared-graphs"


def _share_graphs(on: bool) -> None:
    from ..graph import shared

    shared.SHARE = on


def _sched_settings(dask_scheduler: Any, worker_ms: float, at_submit: bool,
                    share: bool = True) -> float:
    _share_graphs(share)
    for comm in dask_scheduler.stream_comms.values():
        comm.interval = worker_ms / 1000
    dask_scheduler.extensions["kaas"].dispatch.release_at_submit = at_submit
    return time.process_time()


def _worker_settings(dask_worker: Any, ms: float | None, with_result: bool = True,
                     share: bool = True) -> float:
    from ..plugin.worker import PLUGIN_NAME

    _share_graphs(share)
    if ms is not None:
        dask_worker.batched_stream.interval = ms / 1000
    plugin = dask_worker.plugins.get(PLUGIN_NAME)
    if plugin is not None:
        plugin.report_with_result = with_result
    return time.process_time()


def apply_variant(client: Any, variant: Variant) -> None:
    """Switch the control-plane settings of ``client``, its scheduler and
    every worker live (the client's stream: this client only)."""
    from ..client import _state
    from ..plugin.push import push_limit

    client_ms, worker_ms, at_submit, report_ms, with_result, push, coalesce, share = variant
    comm = client.scheduler_comm
    comm.interval = client_ms / 1000
    state = _state(client)
    state._tuned = comm  # tune_stream leaves this setting alone
    state.push_bytes = push_limit() if push else 0
    state.coalesce = coalesce
    _share_graphs(share)
    client.run_on_scheduler(_sched_settings, worker_ms=worker_ms, at_submit=at_submit,
                            share=share)
    client.run(_worker_settings, ms=report_ms if report_ms is not None else 2.0,
               with_result=with_result, share=share)



def process_cpu(client: Any, shared: bool = False) -> tuple[float, float, float]:
    """CPU seconds so far of this process, the scheduler's (0 when it is
    this process) and the workers'."""
    sched = 0.0 if shared else client.run_on_scheduler(lambda: time.process_time())
    workers = sum(client.run(lambda: time.process_time()).values())
    return time.process_time(), sched, workers
