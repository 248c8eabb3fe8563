"""dask-kaas bench --clients N: several load-generator processes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def test_two_client_processes_report_client_and_scheduler_latency(tmp_path):
    out = tmp_path / "b.json"
    p = subprocess.run(
        [sys.executable, "-m", "dask_kaas.cli", "bench", "--quick", "--modes", "kaas,naive",
         "--clients", "2", "--tenants", "4", "--duration", "2", "--weights-mib", "1",
         "--no-fairness", "--no-overhead", "--json", str(out)],
        capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    runs = {r["mode"]: r for r in json.loads(out.read_text())["runs"]}
    kaas, naive = runs["kaas"], runs["naive"]
    for r in (kaas, naive):
        assert r["requests"] > 0 and r["errors"] == 0 and r["verified"] >= 2
        # Both processes' tenants completed requests.
        assert set(r["per_tenant"]) == {f"tenant-{i}" for i in range(4)}, r["per_tenant"]
    # The scheduler sees each request for part of the time its client waits.
    assert 0 < kaas["scheduler_p50_ms"] <= kaas["p50_ms"] * 1.05
    assert naive["scheduler_p50_ms"] is None  # plain Dask tasks: no plugin figure
    assert "scheduler-side p50" in p.stdout


@pytest.mark.parametrize("bad", ["0", "-1", "65", "two", "1e3"])
def test_bad_client_counts_are_refused(bad):
    p = subprocess.run([sys.executable, "-m", "dask_kaas.cli", "bench", "--clients", bad],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "--clients" in p.stderr
