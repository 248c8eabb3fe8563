"""dask-kaas bench-gateway --model: an ONNX model through the gateway with
dynamic batching off and on, every answer checked against onnxruntime
(a short run; the figures come from longer runs, see docs/batching.md)."""

from __future__ import annotations

import json
import subprocess
import sys


def test_short_onnx_run_checks_every_answer_and_reports_batches(tmp_path):
    out = tmp_path / "onnx.json"
    p = subprocess.run(
        [sys.executable, "-m", "dask_kaas.cli", "bench-gateway", "--model", "mlp",
         "--duration", "2", "--clients", "6", "--latency-requests", "3",
         "--max-queue-delay-us", "20000", "--json", str(out)],
        capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["latency"]["wrong"] == 0 and r["latency"]["requests"] == 3
    for mode in ("off", "on"):
        assert r["load"][mode]["wrong"] == 0 and r["load"][mode]["errors"] == 0
        assert r["load"][mode]["completed"] > 0
    rows = {int(k): v for k, v in r["load"]["on"]["batch_rows"].items()}
    assert sum(rows.values()) > 0 and max(rows) <= 16
    assert "batching speedup" in p.stdout and "onnxruntime p50" in p.stdout


def test_a_model_that_cannot_be_loaded_is_a_usage_error(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08not a model")
    for model in ("no_such_light_model", str(bad)):
        p = subprocess.run([sys.executable, "-m", "dask_kaas.cli", "bench-gateway",
                            "--model", model], capture_output=True, text=True, timeout=120)
        assert p.returncode == 2 and "--model" in p.stderr, p.stderr[-2000:]
