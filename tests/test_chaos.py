"""Workers die under multi-tenant load: no request is lost, none is wrong.

The same code as ``dask-kaas bench --scenario chaos``, shorter: a worker is
killed with SIGKILL every two seconds (its Nanny starts a new one with an
empty cache) and every worker at once mid-run, while four tenants keep
requests in flight; each result is compared with NumPy.
"""

from __future__ import annotations

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
