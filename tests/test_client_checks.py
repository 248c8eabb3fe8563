"""Client-side checks of a submission: bad inputs, weights, priorities and
tenants are refused before anything reaches the cluster, each as a specific
KaasError naming the graph (and the buffer)."""

from __future__ import annotations

import numpy as np
import pytest

from dask_kaas import (
    InputMismatchError,
    Kernel,
    KernelGraph,
    Out,
    RequestParameterError,
    TenantError,
    UnknownBufferError,
)


def graph():
    g = KernelGraph("checked")
    x = g.input("x", (4,), np.float32)
    y = g.output("y", (4,), np.float32)
    g.launch(Kernel.library("relu"), [x, Out(y)])
    return g


X = np.array([-1, 2, -3, 4], np.float32)
PROBE = "checks-probe"


def never_reached(client):
    assert PROBE not in client.kaas_stats()["tenants"]


@pytest.mark.parametrize("value", [None, "abcd", b"abcd", {"a": 1}, [object()] * 4,
                                   [1.0, 2.0, 3.0, 4.0], np.ma.masked_array(X), np.float32(1),
                                   memoryview(X)])
def test_inputs_that_are_not_arrays_or_futures(client, value):
    with pytest.raises(InputMismatchError) as e:
        client.submit_kernel_graph(graph(), {"x": value}, tenant=PROBE)
    assert e.value.graph == "checked" and e.value.buffer == "x"
    never_reached(client)


@pytest.mark.parametrize("weight", [0, -1, 0.0, float("nan"), float("inf"), "2", True, 1e-320,
                                    1e300, [2.0]])
def test_bad_weights(client, weight):
    with pytest.raises(RequestParameterError, match="weight") as e:
        client.submit_kernel_graph(graph(), {"x": X}, tenant=PROBE, weight=weight)
    assert e.value.graph == "checked"
    with pytest.raises(RequestParameterError, match="weight"):
        client.kaas_set_weight(PROBE, weight)
    never_reached(client)


@pytest.mark.parametrize("priority", ["high", 2**100, -(2**31) - 1, 2**31, True, 2.0, None])
def test_bad_priorities(client, priority):
    with pytest.raises(RequestParameterError, match="priority") as e:
        client.map_kernel_graph(graph(), [{"x": X}], tenant=PROBE, priority=priority)
    assert e.value.graph == "checked"
    never_reached(client)


@pytest.mark.parametrize("tenant", ["", None, 5, "t" * 201, ("a",), "\ud800"])
def test_bad_tenants(client, tenant):
    with pytest.raises(TenantError) as e:
        client.submit_kernel_graph(graph(), {"x": X}, tenant=tenant)
    assert e.value.graph == "checked"
    with pytest.raises(TenantError):
        client.kaas_set_weight(tenant, 2.0)


@pytest.mark.parametrize("keep", [[["y"]], [None], 5, ["nope"]])
def test_bad_keep_on_device(client, keep):
    with pytest.raises((UnknownBufferError, RequestParameterError)) as e:
        client.submit_kernel_graph(graph(), {"x": X}, tenant=PROBE, keep_on_device=keep)
    assert e.value.graph == "checked"
    never_reached(client)


def test_good_values_still_run(client):
    fut = client.submit_kernel_graph(graph(), {"x": X}, tenant="checks-good",
                                     priority=np.int64(2**31 - 1), weight=np.float32(2.5))
    np.testing.assert_array_equal(fut.result()["y"], np.maximum(X, 0))
    scalar = KernelGraph("scalar")
    s = scalar.input("s", (), np.float64)
    out = scalar.output("out", (), np.float64)
    scalar.launch(Kernel.library("relu"), [s, Out(out)])
    fut = client.submit_kernel_graph(scalar, {"s": np.array(-2.0)}, tenant="checks-good",
                                     priority=-(2**31), weight=1)
    assert fut.result()["out"] == 0.0
    assert client.kaas_stats()["weights"]["checks-good"] == 1.0
