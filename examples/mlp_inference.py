"""Multi-tenant MLP inference: each tenant has its own weights as `const`.

Every request is a two-layer perceptron (gemm + bias + relu, gemm + bias) on
a fresh batch; the graph is built in ``dask_kaas/workloads/mlp.py``.  The
weights are consts: they are sent to the cluster once, cached on a worker's
device, and later requests of the same tenant are placed on that worker.

    python examples/mlp_inference.py
"""

from __future__ import annotations

import numpy as np
from distributed import as_completed

from dask_kaas import submit_kernel_graph
from dask_kaas.workloads.mlp import inputs_for, make_model, mlp_graph, requests


def main(client=None, tenants: int = 4, n_requests: int = 40, batch: int = 16,
         d_in: int = 256, hidden: int = 512, d_out: int = 64) -> dict[str, int]:
    """Run the workload, check every result against NumPy; returns the
    number of requests per tenant."""
    models = [make_model(f"tenant-{t}", d_in, hidden, d_out, seed=t) for t in range(tenants)]
    graph = mlp_graph(batch, d_in, hidden, d_out)
    futures = {}
    for model, x in requests(models, n_requests, batch, d_in):
        fut = submit_kernel_graph(graph, inputs_for(model, x), client, tenant=model.tenant)
        futures[fut] = (model, x)
    done: dict[str, int] = {}
    for fut in as_completed(list(futures)):
        model, x = futures[fut]
        np.testing.assert_allclose(fut.result()["y"], model.reference(x), rtol=1e-4, atol=1e-4)
        done[model.tenant] = done.get(model.tenant, 0) + 1
    return done


if __name__ == "__main__":
    from dask_kaas import KaasClient, LocalKaasCluster

    with LocalKaasCluster() as cluster, KaasClient(cluster) as client:
        print(main(client))
        print("all results match NumPy")
