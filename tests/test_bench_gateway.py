"""dask-kaas bench-gateway: the gateway under load, end to end (short run)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def test_short_gateway_load_run_reports_correct_results_and_shares(tmp_path):
    out = tmp_path / "g.json"
    p = subprocess.run(
        [sys.executable, "-m", "dask_kaas.cli", "bench-gateway", "--duration", "3",
         "--latency-requests", "3", "--batch", "64", "--hidden", "256", "--clients", "4",
         "--json", str(out)],
        capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    r = json.loads(out.read_text())
    load = r["load"]
    assert load["wrong"] == 0 and load["errors"] == 0
    # every result was checked against NumPy; both tenants were served
    assert all(n > 0 for n in load["completed"].values()), load
    assert load["held_samples"] > 0 and 0.0 <= load["all_held_share"] <= 1.0
    assert load["scheduler_weights"] == {"t1": 2.0, "t2": 1.0}
    assert r["latency"]["requests"] == 3 and r["latency"]["ratio"] > 0
    assert "completions ratio" in p.stdout and "held in the scheduler" in p.stdout


@pytest.mark.parametrize("args", [
    ["--weights", "two,one"], ["--weights", "0,1"], ["--weights", "-1"], ["--weights", ""],
    ["--weights", ",".join(["1"] * 17)], ["--weights", "nan"], ["--weights", "inf,1"],
    ["--duration", "0"], ["--duration", "-5"], ["--duration", "1e9"], ["--duration", "x"],
    ["--clients", "0"], ["--clients", "1000000"], ["--workers", "1.5"], ["--batch", "-1"],
])
def test_bad_arguments_are_refused_with_a_usage_error(args):
    p = subprocess.run([sys.executable, "-m", "dask_kaas.cli", "bench-gateway", *args],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and args[0] in p.stderr, p.stderr[-2000:]
    assert "Traceback" not in p.stderr


def test_non_utf8_arguments_are_refused_with_a_usage_error():
    for args in ([b"--weights", b"\xff,1"], [b"--duration", b"\xfe"], [b"--clients", b"\xff"]):
        p = subprocess.run([sys.executable.encode(), b"-m", b"dask_kaas.cli", b"bench-gateway",
                            *args], capture_output=True, timeout=60)
        assert p.returncode == 2 and args[0] in p.stderr, p.stderr[-2000:]
        assert b"Traceback" not in p.stderr
