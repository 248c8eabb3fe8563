"""Jacobi iteration for A x = b: one graph, repeated with ``n_iter``.

The step kernel is CUDA C (compiled with NVRTC on a GPU worker) with a NumPy
implementation of the same argument order for the CPU backend; see
``dask_kaas/workloads/jacobi.py``.  ``x0`` is an input the graph updates in
place, so the graph works on a private device copy and the caller's array
is left alone.

    python examples/jacobi.py
"""

from __future__ import annotations

import numpy as np

from dask_kaas import submit_kernel_graph
from dask_kaas.workloads.jacobi import jacobi_graph, problem, reference


def main(client=None, n: int = 256, iterations: int = 50) -> float:
    """Solve, check against NumPy and the direct solve; returns |Ax - b|."""
    A, b = problem(n)
    x0 = np.zeros(n, np.float32)
    out = submit_kernel_graph(jacobi_graph(n, iterations), {"A": A, "b": b, "x0": x0},
                              client).result()
    x = out["x"]
    np.testing.assert_allclose(x, reference(A, b, x0, iterations), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(x, np.linalg.solve(A.astype(np.float64), b), atol=1e-3)
    assert not x0.any(), "the caller's x0 must not be modified"
    return float(np.linalg.norm(A @ x - b))


if __name__ == "__main__":
    from dask_kaas import KaasClient, LocalKaasCluster

    with LocalKaasCluster() as cluster, KaasClient(cluster) as client:
        print(f"residual |Ax - b| = {main(client):.2e}")
