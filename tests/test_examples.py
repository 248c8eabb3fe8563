"""The examples run on the CPU backend and check themselves against NumPy."""

from __future__ import annotations

import jacobi
import mlp_inference
import sgemm_chain


def test_jacobi_example(client):
    assert jacobi.main(client, n=128, iterations=60) < 1e-3


def test_sgemm_chain_example(client):
    workers = sgemm_chain.main(client, n=64, links=4)
    assert len(workers) == 4


def test_mlp_inference_example(client):
    done = mlp_inference.main(client, tenants=3, n_requests=12, d_in=64, hidden=128, d_out=16)
    assert done == {"tenant-0": 4, "tenant-1": 4, "tenant-2": 4}
