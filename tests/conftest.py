from __future__ import annotations

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))


def gpu_available() -> bool:
    from dask_kaas.device.backend import gpu_count

    return gpu_count() > 0


def pytest_collection_modifyitems(config, items):
    if gpu_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (cupy.is_available() is False here)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def cluster():
    """One CPU-backend cluster shared by the tests that need nothing special."""
    from dask_kaas import LocalKaasCluster

    with LocalKaasCluster(2, backend="cpu", dashboard_address="127.0.0.1:0",
                          device_memory_limit="256MB") as c:
        yield c


@pytest.fixture(scope="session")
def client(cluster):
    from dask_kaas import KaasClient

    with KaasClient(cluster) as c:
        yield c
