"""Bounded scheduler memory: idle tenants, unused graph costs and the
Prometheus tenant labels do not grow with every name a client ever sent."""

from __future__ import annotations

import time
import urllib.request

import dask
import numpy as np
import pytest
from distributed import wait
from prometheus_client.parser import text_string_to_metric_families

from dask_kaas import KaasClient, Kernel, KernelGraph, LocalKaasCluster, Out
from dask_kaas.dashboard.metrics import OTHER, label_value

N = 16


def add_one(xp, x, y, seconds):
    time.sleep(float(seconds))
    y[...] = x + 1


def graph(name, seconds=0.0):
    g = KernelGraph(name)
    x = g.input("x", (N,), np.float32)
    y = g.output("y", (N,), np.float32)
    g.launch(Kernel.array(add_one), [x, Out(y), np.float64(seconds)])
    return g


def sizes(client):
    return client.run_on_scheduler(lambda dask_scheduler:
                                   dask_scheduler.extensions["kaas"].book.sizes())


def expire(client, ahead_s):
    """Run the plugin's expiry as if ``ahead_s`` seconds had passed."""
    return client.run_on_scheduler(
        lambda dask_scheduler, ahead_s=ahead_s:
        dask_scheduler.extensions["kaas"].expire(time.monotonic() + ahead_s))


@pytest.fixture(scope="module")
def bd_client():
    with LocalKaasCluster(2, backend="cpu", dashboard_address="127.0.0.1:0",
                          device_memory_limit="64MB") as cluster, KaasClient(cluster) as c:
        yield c, cluster.dashboard_link.rsplit("/", 1)[0]


def test_idle_tenants_and_graph_costs_expire(bd_client):
    c, _ = bd_client
    x = np.arange(N, dtype=np.float32)
    futs = []
    for i in range(60):
        futs += c.map_kernel_graph(graph(f"bound-{i % 7}"), [{"x": x}] * 3, tenant=f"idle-{i}")
    for y in c.gather(futs):
        np.testing.assert_array_equal(y["y"], x + 1)
    c.kaas_set_weight("pinned-tenant", 3.0)
    busy = c.submit_kernel_graph(graph("bound-busy", seconds=3.0), {"x": x}, tenant="busy")
    del futs
    deadline = time.monotonic() + 30
    while sizes(c)["requests"] > 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    before = sizes(c)
    assert before["tenants"] >= 61 and before["graph_costs"] >= 7, before
    # Not idle long enough yet: nothing goes.
    assert expire(c, 0)["tenants"] == 0
    gone = expire(c, 10**6)
    after = sizes(c)
    assert gone["tenants"] >= 60 and gone["graphs"] >= 7, gone
    # The tenant with a request in flight stays, and so does the operator's weight.
    assert after["requests"] == 1 and after["tenants"] == 1, after
    assert after["queued"] == 1 and after["running"] == 1, after
    assert after["shares"] == 2, after  # "busy" and "pinned-tenant"
    assert after["graph_costs"] == 0 and after["worker_costs"] == 0, after
    stats = c.kaas_stats()
    assert set(stats["tenants"]) == {"busy"} and stats["weights"]["pinned-tenant"] == 3.0
    np.testing.assert_array_equal(busy.result()["y"], x + 1)
    del busy
    while sizes(c)["requests"] and time.monotonic() < deadline:
        time.sleep(0.05)
    expire(c, 10**6)
    after = sizes(c)
    assert (after["requests"], after["tenants"], after["shares"], after["queued"],
            after["planned"], after["backlog"], after["running"]) == (0, 0, 1, 0, 0, 0, 0), after


def metric_page(base):
    with urllib.request.urlopen(f"{base}/metrics", timeout=30) as r:
        return r.read().decode()


def metric_samples(base):
    text = metric_page(base)
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == "dask_kaas_requests_total":
                out[s.labels["tenant"]] = s.value
    return out, len(text)


def test_prometheus_tenant_labels_capped_and_bounded(bd_client):
    c, base = bd_client
    x = np.arange(N, dtype=np.float32)
    g = graph("bound-metrics")
    # (Names that are not valid UTF-8 cannot reach the scheduler intact: the
    # label function's own test covers them.)
    # (The client refuses names over 200 characters: these are the longest.)
    hostile = ["a" * 200, "a" * 199 + "b", OTHER, "x\n\"}{", "é" * 200]
    counts = {f"top-{i}": 20 - i for i in range(3)} | {f"low-{i}": 1 for i in range(8)}
    counts |= {name: 2 for name in hostile}
    futs = [f for name, n in counts.items()
            for f in c.map_kernel_graph(g, [{"x": x}] * n, tenant=name)]
    wait(futs)
    with dask.config.set({"kaas.metrics-max-tenants": 6, "kaas.metrics-label-length": 40}):
        samples, _ = metric_samples(base)
        page = metric_page(base)
    stats = c.kaas_stats()["tenants"]
    assert all(len(label) <= 40 for label in samples), list(samples)
    assert len(samples) <= 7, list(samples)
    for name in ("top-0", "top-1", "top-2"):
        assert samples[name] == stats[name]["graphs_run"] == counts[name]
    ranked = sorted(stats, key=lambda n: (-stats[n]["submitted"], label_value(n, 10**6)))
    named = [n for n in ranked if label_value(n, 40) != OTHER][:6]
    assert named[:3] == ["top-0", "top-1", "top-2"]
    for name in named:
        assert samples[label_value(name, 40)] == stats[name]["graphs_run"]
    # Every request of the cluster is counted once: by name or under "other".
    assert sum(samples.values()) == sum(t["graphs_run"] for t in stats.values())
    assert samples[OTHER] == sum(t["graphs_run"] for n, t in stats.items()
                                 if n not in named)
    assert "a" * 41 not in page  # long names are cut


@pytest.mark.parametrize("name, limit", [
    ("plain", 64), ("é" * 500, 64), ("\udcff\udc80", 64), (b"\xff\xfe", 64), (12345, 64),
    (None, 64), ("a" * 10**6, 16), ("x", 1), ("", 8)])
def test_label_value_is_bounded_utf8(name, limit):
    out = label_value(name, limit)
    assert isinstance(out, str) and len(out) <= max(limit, 10)
    out.encode("utf-8")  # no lone surrogates left


def test_long_names_with_one_prefix_stay_apart():
    a, b = label_value("p" * 1000 + "a", 32), label_value("p" * 1000 + "b", 32)
    assert a != b and len(a) == len(b) == 32
