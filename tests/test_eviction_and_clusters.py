"""Clusters with special settings: a small device, a plain Dask cluster."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from distributed import Client, LocalCluster, as_completed

from dask_kaas import KaasClient, Kernel, KernelGraph, LocalKaasCluster, Out
from dask_kaas.workloads import mlp


def test_working_set_larger_than_a_device_is_evicted_correctly():
    """Eight tenants with 576 KiB of weights each on two workers of 1.5 MB:
    far more than fits, so weights are evicted and reloaded, results stay
    right and the cache never holds more than its capacity."""
    with LocalKaasCluster(2, backend="cpu", device_memory_limit="1.5MB",
                          dashboard_address="127.0.0.1:0") as cluster, \
            KaasClient(cluster) as client:
        batch, d_in, hidden, d_out = 4, 256, 512, 32
        models = [mlp.make_model(f"t{i}", d_in, hidden, d_out, seed=i) for i in range(8)]
        graph = mlp.mlp_graph(batch, d_in, hidden, d_out)
        assert 2 * models[0].nbytes < 1.5e6 < 3 * models[0].nbytes
        futures = {}
        for model, x in mlp.requests(models, 64, batch, d_in, seed=1):
            futures[client.submit_kernel_graph(graph, mlp.inputs_for(model, x),
                                               tenant=model.tenant)] = (model, x)
        for fut in as_completed(list(futures)):
            model, x = futures[fut]
            np.testing.assert_allclose(fut.result()["y"], model.reference(x), rtol=1e-4,
                                       atol=1e-4)
        stats = client.kaas_stats()
        assert sum(w["evictions"] for w in stats["workers"].values()) > 0
        for w in stats["workers"].values():
            assert w["capacity_bytes"] == 1_500_000
            assert 0 < w["peak_used_bytes"] <= w["capacity_bytes"]
            assert w["used_bytes"] <= w["capacity_bytes"]
        assert all(t["graphs_run"] == 8 for t in stats["tenants"].values())


def test_plugins_install_themselves_on_a_plain_dask_cluster():
    with LocalCluster(n_workers=2, threads_per_worker=2, resources={"GPU": 1},
                      host="127.0.0.1", dashboard_address="127.0.0.1:0") as cluster:
        with KaasClient(cluster) as client:
            g = KernelGraph("plain")
            x = g.input("x", (3,), np.float32)
            y = g.output("y", (3,), np.float32)
            g.launch(Kernel.library("relu"), [x, Out(y)])
            xv = np.array([-1, 2, -3], np.float32)
            assert client.submit_kernel_graph(g, {"x": xv}).result()["y"].tolist() == [0, 2, 0]
            stats = client.kaas_stats()
            assert len(stats["workers"]) == 2
            assert sum(w["graphs_run"] for w in stats["workers"].values()) == 1
        # A second client finds the plugins in place (idempotent) and the same state.
        with KaasClient(cluster) as client2:
            assert sum(w["graphs_run"] for w in client2.kaas_stats()["workers"].values()) == 1


def test_cluster_without_gpu_resource_is_refused_clearly():
    from dask_kaas import NoKaasWorkersError
    from dask_kaas import client as client_mod

    with LocalCluster(n_workers=1, threads_per_worker=1, host="127.0.0.1",
                      dashboard_address="127.0.0.1:0") as cluster, Client(cluster) as c:
        old = client_mod.WORKER_WAIT_S
        client_mod.WORKER_WAIT_S = 0.5
        try:
            g = KernelGraph("nowhere")
            x = g.input("x", (1,), np.float32)
            y = g.output("y", (1,), np.float32)
            g.launch(Kernel.library("copy"), [x, Out(y)])
            with pytest.raises(NoKaasWorkersError, match="--resources GPU=1"):
                client_mod.submit_kernel_graph(g, {"x": np.ones(1, np.float32)}, c)
        finally:
            client_mod.WORKER_WAIT_S = old


def test_cuda_backend_without_gpu_is_a_kaas_error():
    from dask_kaas import BackendUnavailableError
    from dask_kaas.device.backend import gpu_count

    if gpu_count():
        pytest.skip("a GPU is present")
    with pytest.raises(BackendUnavailableError, match="no CUDA GPU"):
        LocalKaasCluster(backend="cuda")


def test_demo_command_runs_and_checks_results():
    out = subprocess.run(
        [sys.executable, "-m", "dask_kaas.cli", "demo", "--requests", "60", "--tenants", "3",
         "--hidden", "256", "--dashboard-address", "127.0.0.1:0"],
        capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "60 results match NumPy, 0 do not" in out.stdout
    assert "Per-worker device caches" in out.stdout and "tenant-2" in out.stdout
    assert "http://127.0.0.1:" in out.stdout
    # Nothing may go wrong on the way out either (finalizers at shutdown).
    assert "Traceback" not in out.stderr and "Exception ignored" not in out.stderr, \
        out.stderr[-3000:]
