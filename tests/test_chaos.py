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


def _graph_and_check(client) -> None:
    """One request through the pool, compared with NumPy."""
    import numpy as np

    from dask_kaas import Kernel, KernelGraph, Out

    g = KernelGraph("after-kills")
    x = g.input("x", (4, 8), np.float32)
    w = g.const("w", (8, 8), np.float32)
    y = g.output("y", (4, 8), np.float32)
    g.launch(Kernel.library("gemm"), [x, w, Out(y)])
    xs = np.arange(32, dtype=np.float32).reshape(4, 8)
    ws = np.eye(8, dtype=np.float32) * 2
    out = client.submit_kernel_graph(g, {"x": xs, "w": ws}).result(timeout=120)["y"]
    np.testing.assert_allclose(out, xs @ ws)


def _wait_workers(cluster, names: set, within: float = 90.0) -> bool:
    """True once every name has a running Nanny and the scheduler lists as
    many workers (a worker whose start failed is retried meanwhile)."""
    def back() -> bool:
        nannies = dict(cluster.workers)
        return (set(nannies) == names
                and all(w.status.name == "running" for w in nannies.values())
                and len(cluster.scheduler_info["workers"]) == len(names))

    deadline = time.monotonic() + within
    while not back() and time.monotonic() < deadline:
        time.sleep(0.1)
    return back()


def test_a_worker_dask_gave_up_on_is_started_again():
    """SpecCluster drops a worker not back within lost-worker-timeout (it
    closes the Nanny and forgets the name) and a Nanny whose new process dies
    while starting closes itself; neither was ever replaced.  Both are here."""
    with LocalKaasCluster(2, backend="cpu", dashboard_address=None) as cluster, \
            KaasClient(cluster) as client:
        client.wait_for_workers(2, timeout=60)
        first, second = sorted(cluster.workers)
        cluster.sync(cluster.workers[first].close)       # a Nanny that closed itself
        nanny = cluster.workers.pop(second)               # SpecCluster's give-up
        cluster.sync(nanny.close)
        assert _wait_workers(cluster, {first, second}), (cluster.workers,
                                                          cluster.scheduler_info["workers"])
        client.wait_for_workers(2, timeout=60)
        _graph_and_check(client)


def test_kills_every_second_leave_every_worker_back():
    """Item 9 of issue 16: under a kill every second the pool used to shrink
    to nothing.  After the kills stop, every worker is back and serves."""
    workload = make_workload("mlp", weights_mib=0.5, batch=2)
    tenants = [workload.make_tenant(i) for i in range(2)]
    spec = ChaosSpec(duration=15.0, kill_every=1.0, grace=120.0, chain_every=0,
                     fresh_every=0, expected_workers=2, recover_s=90.0)
    with LocalKaasCluster(2, backend="cpu", dashboard_address=None) as cluster, \
            KaasClient(cluster) as client:
        res = run_chaos(client, workload, tenants, spec, progress=False)
        assert res.kills >= 5, res.summary()
        assert res.workers_end == 2, res.summary()
        _graph_and_check(client)
