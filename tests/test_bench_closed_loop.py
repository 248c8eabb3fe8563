"""``dask-kaas bench --scenario closed-loop`` run tiny: every answer right,
the report's fields present, the issue's targets computed from its cells."""

from __future__ import annotations

import pytest

from dask_kaas.bench.closed_loop import format_doc, run_closed_loop


def test_closed_loop_tiny_run_reports_every_field():
    doc = run_closed_loop(workers=2, clients=(1, 8), batches=(1,), rounds=2, window_s=0.3,
                          tenants=2, weights_mib=1.0, timeout_s=240,
                          modes=("old", "new", "plain", "frozen"))
    assert [(c["batch"], c["clients"]) for c in doc["cells"]] == [(1, 1), (1, 8)]
    for cell in doc["cells"]:
        assert set(cell["modes"]) == {"old", "new", "plain", "frozen"}
        for d in cell["modes"].values():
            assert d["windows"] == 2 and d["requests"] > 0
            assert d["wrong"] == 0 and d["error_count"] == 0, d["errors"]
            assert d["throughput"] > 0 and d["p50_ms"] > 0 and d["p99_ms"] >= d["p50_ms"]
            assert set(d["cpu_ms"]) == {"client", "scheduler", "workers", "all"}
            assert d["cpu_ms"]["all"] == pytest.approx(
                d["cpu_ms"]["client"] + d["cpu_ms"]["scheduler"] + d["cpu_ms"]["workers"],
                rel=0.5)  # medians per process, each over the windows
            assert d["cpu_ms"]["workers"] > 0
        for r in (cell["new_over_old"], cell["frozen_over_old"]):
            assert r["throughput"] > 0 and r["cpu_all"] > 0
            assert len(r["throughput_paired"]) == 2
        assert cell["kaas_over_plain_p50"] > 0
    assert set(doc["targets"]) == {"single_kaas_over_plain", "cpu_per_request_8_clients_cut",
                                   "throughput_8_clients_gain"}
    text = format_doc(doc)
    assert "new/old" in text and "frozen/old" in text and "target throughput_8_clients_gain" in text


def test_closed_loop_refuses_an_unknown_mode():
    with pytest.raises(RuntimeError, match="unknown modes"):
        run_closed_loop(workers=1, clients=(1,), batches=(1,), modes=("fast",), rounds=1,
                        window_s=0.1, tenants=1, weights_mib=1.0, timeout_s=120)
