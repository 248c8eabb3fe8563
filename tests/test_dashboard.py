"""The KaaS page, /kaas/state.json and /metrics, and a command-line cluster."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from dask_kaas import KaasClient, Kernel, KernelGraph, LocalKaasCluster, Out

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARTIFACTS = os.path.join(ROOT, "test-artifacts")


def small_graph(name: str = "page") -> KernelGraph:
    g = KernelGraph(name)
    x = g.input("x", (32, 32), np.float32)
    w = g.const("w", (32, 32), np.float32)
    y = g.output("y", (32, 32), np.float32)
    g.launch(Kernel.library("gemm"), [x, w, Out(y)])
    return g


def run_two_tenants(client: KaasClient, n: int = 12) -> None:
    g = small_graph()
    rng = np.random.default_rng(0)
    weights = {t: rng.random((32, 32), np.float32) for t in ("alice", "bob")}
    futs = []
    for _ in range(n):
        for tenant, w in weights.items():
            x = rng.random((32, 32), np.float32)
            futs.append((client.submit_kernel_graph(g, {"x": x, "w": w}, tenant=tenant), x, w))
    for f, x, w in futs:
        np.testing.assert_allclose(f.result()["y"], x @ w, rtol=1e-5)


def http_get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as r:
        assert r.status == 200
        return r.read()


@pytest.fixture(scope="module")
def dash():
    with LocalKaasCluster(2, backend="cpu", dashboard_address="127.0.0.1:0") as cluster, \
            KaasClient(cluster) as client:
        run_two_tenants(client)
        base = cluster.dashboard_link.rsplit("/", 1)[0]
        yield client, base


def test_state_json_equals_kaas_stats(dash):
    client, base = dash
    stats = client.kaas_stats()
    state = json.loads(http_get(f"{base}/kaas/state.json"))
    assert set(state["workers"]) == set(stats["workers"]) and len(stats["workers"]) == 2
    for addr, ws in stats["workers"].items():
        for k in ("hits", "misses", "evictions", "bytes_to_device", "graphs_run",
                  "used_bytes", "capacity_bytes"):
            assert state["workers"][addr][k] == ws[k], k
    for tenant in ("alice", "bob"):
        assert state["tenants"][tenant]["graphs_run"] == stats["tenants"][tenant]["graphs_run"]
        assert stats["tenants"][tenant]["graphs_run"] == 12
        assert state["tenants"][tenant]["bytes_to_device"] == \
            stats["tenants"][tenant]["bytes_to_device"]
    resident = {bid for held in state["resident"].values() for bid in held}
    assert any(b.startswith("kaas-const-") for b in resident)
    assert {run["tenant"] for run in state["timeline"]} >= {"alice", "bob"}


def test_prometheus_metrics_equal_kaas_stats(dash):
    client, base = dash
    stats = client.kaas_stats()
    text = http_get(f"{base}/metrics").decode()
    samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    for addr, ws in stats["workers"].items():
        lab = (("worker", addr),)
        assert samples[("dask_kaas_cache_hits_total", lab)] == ws["hits"]
        assert samples[("dask_kaas_cache_misses_total", lab)] == ws["misses"]
        assert samples[("dask_kaas_cache_evictions_total", lab)] == ws["evictions"]
        assert samples[("dask_kaas_bytes_to_device_total", lab)] == ws["bytes_to_device"]
        assert samples[("dask_kaas_device_capacity_bytes", lab)] == ws["capacity_bytes"]
        assert samples[("dask_kaas_device_used_bytes", lab)] == ws["used_bytes"]
    for tenant in ("alice", "bob"):
        lab = (("tenant", tenant),)
        assert samples[("dask_kaas_requests_total", lab)] == 12
        assert samples[("dask_kaas_request_errors_total", lab)] == 0
        assert samples[("dask_kaas_request_latency_seconds_count", lab)] == 12
        inf = (("le", "+Inf"), ("tenant", tenant))
        assert samples[("dask_kaas_request_latency_seconds_bucket", inf)] == 12
        assert samples[("dask_kaas_tenant_bytes_to_device_total", lab)] == \
            stats["tenants"][tenant]["bytes_to_device"]


def test_metrics_collector_is_registered_once_and_removed():
    from prometheus_client.core import REGISTRY

    from dask_kaas.dashboard import metrics

    before = set(metrics._plugins)
    with LocalKaasCluster(1, backend="cpu", dashboard_address="127.0.0.1:0") as c1, \
            LocalKaasCluster(1, backend="cpu", dashboard_address="127.0.0.1:0") as c2:
        assert len(set(metrics._plugins) - before) == 2
        collector = metrics._collector
        assert collector is not None
        assert list(REGISTRY._collector_to_names).count(collector) == 1  # registered once
        for c in (c1, c2):  # each scheduler's /metrics reports its own workers
            with KaasClient(c) as client:
                client.kaas_stats()
            base = c.dashboard_link.rsplit("/", 1)[0]
            text = http_get(f"{base}/metrics").decode()
            (mine,) = c.scheduler_info["workers"]
            (other,) = (c2 if c is c1 else c1).scheduler_info["workers"]
            assert f'worker="{mine}"' in text and f'worker="{other}"' not in text
    assert set(metrics._plugins) == before
    if not before:
        assert metrics._collector is None and collector not in REGISTRY._collector_to_names


def chromium_path() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        p = shutil.which(name)
        if p:
            return p
    return None


BOKEH_READY = """() => window.Bokeh !== undefined && Bokeh.documents.length > 0
    && Bokeh.documents[0].roots().length > 0"""

CDS_TEXT = """() => {
    const out = [];
    for (const m of Bokeh.documents[0].all_models) {
        if (m.data === undefined || m.data === null) continue;
        const entries = m.data instanceof Map ? [...m.data.entries()] : Object.entries(m.data);
        for (const [k, v] of entries) out.push(k + '=' + Array.from(v).join('|'));
    }
    return out.join('\\n');
}"""

PLOT_COUNT = """() => [...Bokeh.documents[0].all_models]
    .filter(m => m.x_range !== undefined && m.renderers !== undefined).length"""


@pytest.mark.browser
def test_kaas_page_renders_in_headless_chromium(dash):
    exe = chromium_path()
    if exe is None:
        pytest.skip("Debian's chromium is not installed (.ci/run installs it)")
    from playwright.sync_api import sync_playwright

    client, base = dash
    workers = [w.replace("tcp://", "") for w in client.kaas_stats()["workers"]]
    os.makedirs(ARTIFACTS, exist_ok=True)
    shot = os.path.join(ARTIFACTS, "kaas-page.png")
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=exe, headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1500})
            page.goto(f"{base}/kaas", wait_until="domcontentloaded")
            page.wait_for_function(BOKEH_READY, timeout=60_000)
            page.wait_for_function(
                f"() => {{ const t = ({CDS_TEXT})(); return t.includes('alice') "
                f"&& t.includes('bob') && {json.dumps(workers)}.every(w => t.includes(w)); }}",
                timeout=60_000)
            assert page.evaluate(PLOT_COUNT) >= 3
            cds = page.evaluate(CDS_TEXT)
            # The held backlog per tenant and each worker's graphs in flight
            # against its limit (2 workers, 1 slot, prefetch 1).
            assert "held=" in cds and "in_flight=" in cds and "limit=2|2" in cds, cds
            texts = page.evaluate("() => [...Bokeh.documents[0].all_models]"
                                  ".filter(m => typeof m.text === 'string')"
                                  ".map(m => m.text).join(' ')")
            assert "<code>no-worker</code>" in texts  # why Dask's bar shows them so
            assert "KaaS" in page.title()
            menu = page.locator("a[href$='kaas']")
            assert menu.count() >= 1  # listed in the dashboard's menu
            time.sleep(1.0)  # one more refresh so the timeline is drawn
            page.screenshot(path=shot, full_page=True)
        finally:
            browser.close()
    assert os.path.getsize(shot) > 20_000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_command_line_cluster_with_preload():
    port, dash_port = free_port(), free_port()
    env = dict(os.environ, DASK_KAAS__BACKEND="cpu", DASK_KAAS__DEVICE_MEMORY_LIMIT="64MB")
    dask_cli = [sys.executable, "-m", "distributed.cli.dask_scheduler"]
    procs = [subprocess.Popen(
        dask_cli + ["--host", "127.0.0.1", "--port", str(port), "--dashboard-address",
                    f"127.0.0.1:{dash_port}", "--preload", "dask_kaas.preload"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)]
    try:
        addr = f"tcp://127.0.0.1:{port}"
        worker_cli = [sys.executable, "-m", "distributed.cli.dask_worker"]
        procs.append(subprocess.Popen(
            worker_cli + [addr, "--host", "127.0.0.1", "--nworkers", "2", "--nthreads", "2",
                          "--resources", "GPU=1", "--preload", "dask_kaas.preload",
                          "--no-dashboard"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
        with KaasClient(addr, timeout=60) as client:
            client.wait_for_workers(2, timeout=60)
            run_two_tenants(client, n=4)
            stats = client.kaas_stats()
            assert len(stats["workers"]) == 2
            assert all(w["capacity_bytes"] == 64_000_000 for w in stats["workers"].values())
            assert stats["tenants"]["alice"]["graphs_run"] == 4
            page = http_get(f"http://127.0.0.1:{dash_port}/kaas").decode()
            assert "Bokeh" in page or "bokeh" in page
            state = json.loads(http_get(f"http://127.0.0.1:{dash_port}/kaas/state.json"))
            assert state["tenants"]["bob"]["graphs_run"] == 4
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
