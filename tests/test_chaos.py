"""Workers die under multi-tenant load: no request is lost, none is wrong.

The same code as ``dask-kaas bench --scenario chaos``, shorter: a worker is
killed with SIGKILL every two seconds (its Nanny starts a new one with an
empty cache) and every worker at once mid-run, while four tenants keep
requests in flight; each result is compared with NumPy.
"""

from __future__ import annotations

import time

from dask_kaas import KaasClient, LocalKaasCluster
from dask_kaas.bench.chaos import ChaosSpec, run_chaos
from dask_kaas.bench.workloads import make_workload


def test_no_request_lost_or_wrong_while_workers_are_killed():
    workload = make_workload("mlp", weights_mib=1.0, batch=4)
    tenants = [workload.make_tenant(i) for i in range(4)]
    spec = ChaosSpec(duration=12.0, kill_every=2.0, kill_all_at=6.0, grace=120.0)
    with LocalKaasCluster(2, backend="cpu", dashboard_address=None) as cluster, \
            KaasClient(cluster) as client:
        res = run_chaos(client, workload, tenants, spec, progress=False)
    assert res.kills >= 3 and res.kill_all == 1, res.summary()
    assert res.lost == 0 and res.wrong == 0, res.summary()
    assert res.done == res.submitted > 0


def test_removal_of_a_worker_the_cluster_never_saw_keeps_the_watch_alive():
    """A worker that dies before the cluster heard that it joined: the
    scheduler's "remove" names an address the cluster does not know.  The
    cluster must shrug (Dask's SpecCluster raised KeyError there, which
    ended its watch of the scheduler and failed close())."""
    with LocalKaasCluster(1, backend="cpu", dashboard_address=None) as cluster, \
            KaasClient(cluster) as client:
        cluster._update_worker_status("remove", "tcp://127.0.0.1:9")  # as the watch would
        cluster.scale(2)
        client.wait_for_workers(2, timeout=60)
        deadline = time.monotonic() + 30
        while len(cluster.scheduler_info["workers"]) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(cluster.scheduler_info["workers"]) == 2  # the watch still runs
