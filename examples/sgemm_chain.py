"""A chain of matrix products whose intermediates never leave the device.

Each link is its own graph, C_k = relu(C_{k-1} @ B_k), computed by a tiled
CUDA sgemm kernel (NumPy on the CPU backend; see
``dask_kaas/workloads/sgemm.py``).  Every intermediate is kept on the device
(``keep_on_device``) and handed to the next graph by reference, which places
that graph on the worker holding it.

    python examples/sgemm_chain.py
"""

from __future__ import annotations

import numpy as np

from dask_kaas import submit_kernel_graph
from dask_kaas.workloads.sgemm import link_graph


def main(client=None, n: int = 128, links: int = 6, seed: int = 0) -> list[str]:
    """Run the chain and check it against NumPy; returns the worker each
    link's result lives on."""
    rng = np.random.default_rng(seed)
    a0 = rng.standard_normal((n, n)).astype(np.float32)
    bs = [(rng.standard_normal((n, n)) / np.sqrt(n)).astype(np.float32) for _ in range(links)]
    graph = link_graph(n)
    current = a0
    futures = []
    for b in bs:
        fut = submit_kernel_graph(graph, {"a": current, "b": b}, client, keep_on_device=["c"])
        futures.append(fut)
        current = fut["c"]
    result = current.result()
    expect = a0
    for b in bs:
        expect = np.maximum(expect @ b, 0)
    np.testing.assert_allclose(result, expect, rtol=1e-3, atol=1e-3)
    who = futures[0].client.who_has(futures)
    return [who[f.key][0] for f in futures]


if __name__ == "__main__":
    from dask_kaas import KaasClient, LocalKaasCluster

    with LocalKaasCluster() as cluster, KaasClient(cluster) as client:
        workers = main(client)
        print(f"{len(workers)} links ran on {sorted(set(workers))}")
