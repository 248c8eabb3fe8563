"""One bad request never costs another its result (issue 9, worker side).

Real multi-process LocalKaasClusters on the CPU backend: kernels that raise
SystemExit/KeyboardInterrupt/GeneratorExit, kernels that never return, forged
requests and outputs a kernel never writes.
"""

from __future__ import annotations

import traceback

import numpy as np
import pytest
from distributed import wait
from kaas_graphs import N, scale_graph

from dask_kaas import (
    KaasClient,
    Kernel,
    KernelExecutionError,
    KernelGraph,
    LocalKaasCluster,
    Out,
)


def raising_graph(exc: BaseException, name: str = "bad") -> KernelGraph:
    def explode(xp, x, y):
        raise exc

    g = KernelGraph(name)
    x = g.input("x", (N,), np.float32)
    y = g.output("y", (N,), np.float32)
    g.launch(Kernel.array(explode, name="explode"), [x, Out(y)])
    return g


@pytest.fixture(scope="module")
def cluster():
    with LocalKaasCluster(2, backend="cpu", dashboard_address="127.0.0.1:0",
                          device_memory_limit="64MB") as c:
        yield c


@pytest.fixture(scope="module")
def client(cluster):
    with KaasClient(cluster) as c:
        yield c


def worker_pids(client) -> dict[str, int]:
    import os

    return client.run(os.getpid)


@pytest.mark.parametrize("exc", [SystemExit(3), KeyboardInterrupt(), GeneratorExit()],
                         ids=lambda e: type(e).__name__)
def test_base_exception_in_kernel_fails_only_its_request(client, exc):
    before = worker_pids(client)
    assert len(before) == 2
    rng = np.random.default_rng(1)
    w = rng.random(N, np.float32)
    xs = [rng.random(N, np.float32) for _ in range(20)]
    bad = client.map_kernel_graph(raising_graph(exc), [{"x": xs[0]} for _ in range(4)])
    good = client.map_kernel_graph(scale_graph(), [{"x": x, "w": w} for x in xs])
    wait(bad + good, timeout=60)
    for f in bad:
        assert f.status == "error"
        err = f.exception()
        assert isinstance(err, KernelExecutionError), repr(err)
        assert type(exc).__name__ in str(err) and "'bad'" in str(err)
    for f, x in zip(good, xs):
        np.testing.assert_allclose(f.result()["y"], 2 * x + w, rtol=1e-6)
    assert worker_pids(client) == before  # no worker died or was restarted


def user_kernel_that_fails(xp, x, y):
    raise ValueError("boom from the user's kernel")


def test_client_traceback_names_the_user_function(client):
    g = KernelGraph("tb")
    x = g.input("x", (N,), np.float32)
    y = g.output("y", (N,), np.float32)
    g.launch(Kernel.array(user_kernel_that_fails), [x, Out(y)])
    fut = client.submit_kernel_graph(g, {"x": np.ones(N, np.float32)})
    with pytest.raises(KernelExecutionError, match="boom from the user") as info:
        fut.result(timeout=60)
    text = "".join(traceback.format_exception(info.value))
    assert "user_kernel_that_fails" in text, text
    assert isinstance(info.value.__cause__, ValueError)
    # The same through the future's own traceback API.
    err = fut.exception()
    assert "user_kernel_that_fails" in "".join(traceback.format_exception(err))


class UnpicklableError(Exception):
    def __reduce__(self):
        raise TypeError("cannot pickle this exception")


def raise_unpicklable(xp, x, y):
    raise UnpicklableError("x" * 50_000)


def test_unpicklable_user_exception_still_arrives_as_kaas_error(client):
    g = KernelGraph("unpicklable")
    x = g.input("x", (N,), np.float32)
    y = g.output("y", (N,), np.float32)
    g.launch(Kernel.array(raise_unpicklable), [x, Out(y)])
    fut = client.submit_kernel_graph(g, {"x": np.ones(N, np.float32)})
    with pytest.raises(KernelExecutionError, match="Unpicklable") as info:
        fut.result(timeout=60)
    assert len(str(info.value)) < 5_000  # the user's message is cut, not the error
    assert "raise_unpicklable" in "".join(traceback.format_exception(info.value))


# -- isolation -----------------------------------------------------------------

@pytest.mark.parametrize("how", ["inline", "future"])
def test_forged_buffer_id_cannot_replace_another_tenants_const(client, how):
    """Mallory names Alice's const key in her request's InputRef.buffer_id and
    runs first on every worker; Alice's results must still be hers."""
    from dask.base import tokenize

    from dask_kaas.plugin.tasks import run_kernel_graph
    from dask_kaas.request import GraphRequest, InputRef

    rng = np.random.default_rng(7 if how == "inline" else 8)
    w_alice = rng.random(N, np.float32)
    victim_key = f"kaas-const-{tokenize(w_alice)}"
    w_mallory = np.full(N, 1000.0, np.float32)
    g = scale_graph("shared-shape")
    w_value = w_mallory if how == "inline" else client.scatter(w_mallory, broadcast=True)
    for i, addr in enumerate(sorted(worker_pids(client))):
        key = f"mallory-{how}-{i}"
        req = GraphRequest(key=key, graph=g.name, tenant="mallory", inputs=[
            InputRef("x", 4 * N, None), InputRef("w", 4 * N, victim_key, victim_key, True)])
        fut = client.submit(run_kernel_graph, g, req, np.ones(N, np.float32), w_value,
                            key=key, workers=[addr], allow_other_workers=False,
                            resources={"GPU": 1}, pure=False)
        np.testing.assert_allclose(fut.result(timeout=60)["y"], 2 + w_mallory)
    xs = [rng.random(N, np.float32) for _ in range(10)]
    futs = client.map_kernel_graph(g, [{"x": x, "w": w_alice} for x in xs], tenant="alice")
    for f, x in zip(futs, xs):
        np.testing.assert_allclose(f.result(timeout=60)["y"], 2 * x + w_alice, rtol=1e-6)


def writes_sevens(xp, x, y):
    y[...] = 7


def writes_nothing(xp, x, y):
    """Declares y as its output and never touches it."""


def one_kernel_graph(name: str, fn, n: int = 1024) -> KernelGraph:
    g = KernelGraph(name)
    x = g.input("x", (n,), np.float32)
    y = g.output("y", (n,), np.float32)
    g.launch(Kernel.array(fn), [x, Out(y)])
    return g


def test_output_a_kernel_never_writes_comes_back_zero(client):
    """4 KiB outputs: before zero-filling, the second graph returned the
    first one's sevens (freed memory handed out again)."""
    sevens = one_kernel_graph("sevens", writes_sevens)
    lazy = one_kernel_graph("lazy", writes_nothing)
    x = np.ones(1024, np.float32)
    for _ in range(20):
        assert (client.submit_kernel_graph(sevens, {"x": x}, tenant="a").result()["y"] == 7).all()
        y = client.submit_kernel_graph(lazy, {"x": x}, tenant="b").result()["y"]
        assert not y.any(), np.unique(y)


@pytest.mark.parametrize("forge", ["renamed", "missing", "extra-value", "not-a-request",
                                   "keep-foreign-name"])
def test_forged_request_shapes_fail_only_that_request(client, forge):
    """Requests built by hand that do not match their graph: a KaasError for
    that request, the workers live on."""
    from dask_kaas import InputMismatchError, KaasError
    from dask_kaas.plugin.tasks import run_kernel_graph
    from dask_kaas.request import GraphRequest, InputRef

    before = worker_pids(client)
    g = scale_graph("forged")
    x, w = np.ones(N, np.float32), np.full(N, 3.0, np.float32)
    refs = [InputRef("x", 4 * N, None), InputRef("w", 4 * N, None)]
    values = [x, w]
    keep: dict = {}
    expected: type[KaasError] = InputMismatchError
    if forge == "renamed":
        refs = [InputRef("w", 4 * N, None), InputRef("x", 4 * N, None)]
    elif forge == "missing":
        refs, values = refs[:1], values[:1]
    elif forge == "extra-value":
        values = values + [x]
    elif forge == "keep-foreign-name":
        keep, expected = {"y": "kaas-const-somebody-else", 7: "x"}, None
    req = GraphRequest(key=f"forged-{forge}", graph=g.name, tenant="mallory", inputs=refs,
                       keep=keep)
    args = (g, {"not": "a request"}) if forge == "not-a-request" else (g, req)
    fut = client.submit(run_kernel_graph, *args, *values, key=f"forged-{forge}",
                        resources={"GPU": 1}, pure=False)
    if expected is None:  # the kept output is named after the task, not the request
        out = fut.result(timeout=60)
        assert out["y"].buffer_id == f"forged-{forge}-out-y"
        np.testing.assert_allclose(np.asarray(out["y"]), 2 * x + w)
    else:
        with pytest.raises(KaasError) as info:
            fut.result(timeout=60)
        if forge != "not-a-request":
            assert isinstance(info.value, expected) and "'forged'" in str(info.value)
    assert worker_pids(client) == before


def test_a_kernel_raising_memory_error_is_its_own_failure(client):
    """Issue 16 item 4: not device out-of-memory, so no retry and nobody's
    consts are evicted; the client gets a KernelExecutionError chained to
    the kernel's own MemoryError."""
    from dask_kaas import DeviceOutOfMemoryError

    rng = np.random.default_rng(4)
    w = rng.random(N, np.float32)
    xs = [rng.random(N, np.float32) for _ in range(8)]
    wait(client.map_kernel_graph(scale_graph(), [{"x": x, "w": w} for x in xs]), timeout=60)
    stats = client.kaas_stats()["workers"]
    evictions = {a: st["evictions"] for a, st in stats.items()}
    entries = {a: st["entries"] for a, st in stats.items()}
    bad = client.map_kernel_graph(raising_graph(MemoryError("my own accounting"), "greedy"),
                                  [{"x": xs[0]} for _ in range(4)])
    wait(bad, timeout=60)
    for f in bad:
        err = f.exception()
        assert isinstance(err, KernelExecutionError) and not isinstance(
            err, DeviceOutOfMemoryError), repr(err)
        assert "MemoryError: my own accounting" in str(err)
        assert isinstance(err.__cause__, MemoryError)
    stats = client.kaas_stats()["workers"]
    assert {a: st["evictions"] for a, st in stats.items()} == evictions
    assert all(stats[a]["entries"] >= n for a, n in entries.items() if a in stats)
