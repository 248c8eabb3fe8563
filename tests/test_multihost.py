"""Scheduler, gateway, workers and client on separate hosts under faults.

Runs ``scripts/multihost.sh``: each process in its own Linux network
namespace on a private bridge with no route out.  Every scenario loads the
cluster through the direct client and through the gateway at once and checks
every result against NumPy; the script prints one JSON line per scenario.
Needs root and ``ip netns``; skipped with the reason elsewhere.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "multihost.sh"
#: The script's namespaces are kh<id>...; one id per test process.
NETNS_ID = 20 + os.getpid() % 200


def _why_not() -> str | None:
    if not sys.platform.startswith("linux"):
        return "network namespaces are Linux only"
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    if shutil.which("ip") is None:
        return "needs the ip command (iproute2)"
    probe = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"ip netns unavailable: {probe.stderr.strip()[:200]}"
    return None


pytestmark = pytest.mark.skipif(_why_not() is not None, reason=_why_not() or "")


def run_multihost(scenarios: str, load_s: float | None = None,
                  timeout: float = 280.0) -> dict[str, dict]:
    """Run the script; its JSON line for each scenario, by name."""
    cmd = ["bash", str(SCRIPT), "--scenarios", scenarios]
    if load_s is not None:
        cmd += ["--load-s", str(load_s)]
    env = dict(os.environ, PYTHON=sys.executable, KAAS_NETNS_ID=str(NETNS_ID),
               DASK=str(Path(sys.executable).parent / "dask"))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            rec = json.loads(line)
            out[rec["scenario"]] = rec
    assert set(out) == set(scenarios.split(",")), (proc.stdout[-2000:], proc.stderr[-4000:])
    return out


def _assert_nothing_lost(rec: dict) -> None:
    for path in ("direct", "gateway"):
        counts = rec[path]
        assert counts["ok"] > 0, rec
        assert counts["wrong"] == 0, rec
        assert counts["lost"] == 0, rec
    assert rec["workers_end"] == 3, rec


def _no_namespaces_left() -> None:
    """The script's trap removed every namespace it made (the bridge with them)."""
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not [n for n in left.split() if n.startswith(f"kh{NETNS_ID}")], left


def test_results_right_across_hosts_and_a_worker_host_killed():
    res = run_multihost("baseline,kill", load_s=15)
    _assert_nothing_lost(res["baseline"])
    _assert_nothing_lost(res["kill"])
    _no_namespaces_left()


@pytest.mark.slow
def test_a_worker_host_link_down_for_20_and_40_seconds():
    res = run_multihost("link20,link40", timeout=420)
    _assert_nothing_lost(res["link20"])
    _assert_nothing_lost(res["link40"])
    _no_namespaces_left()


@pytest.mark.slow
def test_the_gateway_host_link_down_for_20_seconds():
    res = run_multihost("gwlink", timeout=300)
    _assert_nothing_lost(res["gwlink"])
    _no_namespaces_left()
