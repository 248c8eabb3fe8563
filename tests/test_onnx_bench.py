"""The ONNX benchmark workload and the single-request comparison: the
workload computes what onnxruntime computes, tenants have their own weights,
bad arguments are usage errors (never a traceback)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from dask_kaas import submit_kernel_graph  # noqa: E402
from dask_kaas.bench.workloads import make_workload  # noqa: E402
from dask_kaas.graph import KaasError  # noqa: E402
from dask_kaas.onnx.zoo import light_model  # noqa: E402


def test_onnx_workload_tenants_have_their_own_weights_and_the_cluster_agrees(client):
    w = make_workload("onnx:squeezenet", batch=1)
    t0, t1 = w.make_tenant(0), w.make_tenant(1)
    assert set(t0.consts) == set(t1.consts) == {b.name for b in w.graph.inputs
                                                 if b.kind.value == "const"}
    assert any(not np.array_equal(t0.consts[k], t1.consts[k]) for k in t0.consts)
    req = w.make_request(np.random.default_rng(0))
    got = submit_kernel_graph(w.graph, {**t0.consts, **req}, client, tenant="wl").result()
    np.testing.assert_allclose(got[w.output], w.reference(t0, req), rtol=1e-4, atol=1e-6)
    # the host reference is the model itself: tenant 0 is light_model(seed=1000)
    model, data = light_model("squeezenet", seed=1000)
    ref = ort.InferenceSession(model.SerializeToString(),
                               providers=["CPUExecutionProvider"]).run(None, req)[0]
    np.testing.assert_allclose(got[w.output], ref, rtol=1e-3, atol=1e-4)


def test_onnx_workload_from_a_path_and_bert(tmp_path):
    import onnx

    from dask_kaas.onnx.zoo import bert_encoder

    p = tmp_path / "bert.onnx"
    onnx.save(bert_encoder(layers=1), str(p))
    w = make_workload(f"onnx:{p}", batch=3)
    assert w.graph.buffers["input_ids"].shape == (3, 16)
    a, b = w.make_tenant(0), w.make_tenant(1)
    assert not np.array_equal(a.consts["word_emb"], b.consts["word_emb"])
    req = w.make_request(np.random.default_rng(1))
    assert w.reference(a, req).shape == (3, 16, 64)
    assert make_workload("onnx:bert", batch=2).graph.buffers["attention_mask"].shape == (2, 16)
    with pytest.raises(KaasError):
        make_workload(f"onnx:{tmp_path / 'missing.onnx'}", batch=1)


@pytest.mark.parametrize("args", [
    ["--workload", "onnx:"], ["--workload", "resnet"], ["--workload", ""],
    ["--threads", "0"], ["--threads", "x"], ["--requests", "-1"], ["--requests", "1e9"],
    ["--scenario", "singles"],
])
def test_bad_onnx_bench_arguments_are_usage_errors(args):
    p = subprocess.run([sys.executable, "-m", "dask_kaas.cli", "bench", *args],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and args[0] in p.stderr, p.stderr[-2000:]
    assert "Traceback" not in p.stderr


@pytest.mark.parametrize("args", [
    [b"--model", b"/no/such/\xff.onnx", b"--scenario", b"single"],
    [b"--workload", b"onnx:\xfe\xff", b"--scenario", b"single"],
    [b"--scenario", b"single", b"--workload", b"mlp"],
    [b"--model", b"/no/such/model.onnx", b"--tenants", b"1", b"--modes", b"kaas"],
])
def test_models_the_bench_cannot_load_are_usage_errors(args):
    p = subprocess.run([sys.executable.encode(), b"-m", b"dask_kaas.cli", b"bench", *args],
                       capture_output=True, timeout=120)
    assert p.returncode == 2, p.stderr[-2000:]
    assert b"Traceback" not in p.stderr


def test_single_request_comparison_reports_both_and_checks_every_result(tmp_path):
    out = tmp_path / "single.json"
    p = subprocess.run([sys.executable, "-m", "dask_kaas.cli", "bench", "--workload",
                        "onnx:squeezenet", "--scenario", "single", "--requests", "3",
                        "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["wrong"] == 0 and doc["requests"] == 3
    assert doc["kaas_p50_ms"] > 0 and doc["onnxruntime_p50_ms"] > 0
    assert 0 < doc["temp_ratio"] < 1
    assert "onnxruntime p50" in p.stdout
