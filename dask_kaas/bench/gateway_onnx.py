"""``dask-kaas bench-gateway --model NAME|PATH.onnx``: an ONNX model served
through the gateway, with dynamic batching off and on.

It starts a LocalKaasCluster and a gateway process, uploads the model twice
for one tenant (``off``: every request runs alone; ``on``: dynamic batching),
then

1. single requests at low load, one at a time and interleaved: onnxruntime
   called directly (one thread, as a worker's kernel runs), the same model
   through a direct ``KaasClient`` (:func:`dask_kaas.onnx.register_onnx_model`)
   and through the gateway with batching off; every answer is checked
   against onnxruntime (rtol 1e-3);
2. ``--clients`` closed-loop ``tritonclient.http`` clients sending batch-1
   requests for ``--duration`` seconds, first to ``off`` then to ``on``;
   throughput, p50/p99 latency, every answer checked, and the batch sizes the
   gateway formed (from its model listing).

``--model``: ``mlp`` (a small MLP whose per-request overhead dominates),
``bert`` (the importer's BERT-style encoder), a light model zoo name
(``resnet50``, ...: seeded random weights, its batch dimension made
symbolic as an exporter with dynamic axes writes it) or a path.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from typing import Any

import numpy as np

TENANT_TOKEN = "bench-onnx-token"
RTOL, ATOL = 1e-3, 1e-4


def mlp_model(n_in: int = 64, hidden: int = 128, n_out: int = 16, seed: int = 0) -> Any:
    """x [batch, n_in] -> Gemm, Relu, Gemm -> y [batch, n_out] (symbolic batch)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w = [numpy_helper.from_array((rng.standard_normal(s) * 0.2).astype(np.float32), n)
         for n, s in (("w1", (n_in, hidden)), ("b1", (hidden,)), ("w2", (hidden, n_out)),
                      ("b2", (n_out,)))]
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"]),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Gemm", ["r", "w2", "b2"], ["y"])]
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", n_in])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", n_out])], w)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def batch_symbolic(model: Any) -> Any:
    """A copy of a fixed-batch-1 model whose first dimension is symbolic:
    graph inputs/outputs get ``N`` and a Reshape to a constant shape that
    starts with 1 keeps the incoming batch instead (shape ``0``)."""
    from onnx import numpy_helper

    m = type(model)()
    m.CopyFrom(model)
    for vi in list(m.graph.input) + list(m.graph.output):
        dims = vi.type.tensor_type.shape.dim
        if len(dims) and dims[0].HasField("dim_value") and dims[0].dim_value == 1:
            dims[0].Clear()
            dims[0].dim_param = "N"
    del m.graph.value_info[:]
    inits = {t.name: t for t in m.graph.initializer}
    for node in m.graph.node:
        if node.op_type == "Reshape" and len(node.input) > 1 and node.input[1] in inits:
            t = inits[node.input[1]]
            shape = numpy_helper.to_array(t).copy()
            if shape.size and shape[0] == 1:
                shape[0] = 0
                t.CopyFrom(numpy_helper.from_array(shape, t.name))
    return m


def load(name: str) -> tuple[Any, str]:
    """(ModelProto with a symbolic batch, label)."""
    import onnx

    from ..onnx import zoo

    if name == "mlp":
        return mlp_model(), "mlp (64-128-16)"
    if name == "bert":
        return zoo.bert_encoder(), "bert-style encoder (2 layers, hidden 64, seq 16)"
    if os.path.exists(name):
        return batch_symbolic(onnx.load(name)), os.path.basename(name)
    model, _ = zoo.light_model(name)
    return batch_symbolic(model), f"light_{name} (seeded random weights)"


def example_inputs(model: Any, batch: int, seed: int) -> dict[str, np.ndarray]:
    """Random inputs for the model's graph inputs at ``batch`` rows."""
    from ..onnx.load import dtype_of

    if model.graph.name == "bert_encoder" or {i.name for i in model.graph.input} == {
            "input_ids", "attention_mask"}:
        from ..onnx.zoo import bert_inputs

        return bert_inputs(batch, seed=seed)
    rng = np.random.default_rng(seed)
    inits = {t.name for t in model.graph.initializer}
    out = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        shape = [batch if i == 0 else (d.dim_value or 1) for i, d in enumerate(tt.shape.dim)]
        dt = dtype_of(tt.elem_type, vi.name)
        out[vi.name] = (rng.standard_normal(shape).astype(dt) if dt.kind == "f"
                        else rng.integers(0, 2, shape).astype(dt))
    return out


def _session(model_bytes: bytes) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])


def _put(address: str, path: str, body: bytes) -> dict[str, Any]:
    req = urllib.request.Request(f"http://{address}{path}", data=body, method="PUT",
                                 headers={"Authorization": f"Bearer {TENANT_TOKEN}",
                                          "Content-Type": "application/onnx"})
    with urllib.request.urlopen(req, timeout=300) as resp:
        return json.loads(resp.read())


def _listing(address: str) -> dict[str, Any]:
    req = urllib.request.Request(f"http://{address}/v1/models",
                                 headers={"Authorization": f"Bearer {TENANT_TOKEN}"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return {m["name"]: m for m in json.loads(resp.read())["models"]}


def _infer(th: Any, client: Any, name: str, feed: dict[str, np.ndarray],
           outputs: list[str]) -> list[np.ndarray]:
    from ..gateway.tensors import kserve_datatype

    ins = []
    for n, a in feed.items():
        t = th.InferInput(n, list(a.shape), kserve_datatype(a.dtype))
        t.set_data_from_numpy(a)
        ins.append(t)
    res = client.infer(name, ins, headers={"Authorization": f"Bearer {TENANT_TOKEN}"})
    return [res.as_numpy(o) for o in outputs]


def _close(got: list[np.ndarray], want: list[np.ndarray]) -> bool:
    return all(g is not None and g.shape == w.shape and
               np.allclose(g, w, rtol=RTOL, atol=ATOL) for g, w in zip(got, want))


def run(args: Any) -> int:
    import tritonclient.http as th

    from ..client import KaasClient
    from ..cluster import LocalKaasCluster
    from ..gateway.tenants import token_digest
    from ..onnx import register_onnx_model

    try:
        model, label = load(args.model)
    except Exception as e:  # noqa: BLE001 - a usage error, not a traceback
        print(f"dask-kaas bench-gateway: cannot load --model {args.model[:200]!r}: "
              f"{type(e).__name__}: {str(e)[:300]}", file=sys.stderr)
        return 2
    body = model.SerializeToString()
    sess = _session(body)
    outputs = [o.name for o in model.graph.output]
    result: dict[str, Any] = {"model": label, "workers": args.workers, "clients": args.clients,
                              "duration_s": args.duration, "cpus": os.cpu_count(),
                              "load_average": os.getloadavg()[0]}
    query = (f"?dynamic_batching=true&max_batch_size={args.max_batch_size}"
             f"&max_queue_delay_us={args.max_queue_delay_us}&instances={args.instances}")
    with tempfile.TemporaryDirectory() as tmp, \
            LocalKaasCluster(args.workers, backend="cpu",
                             dashboard_address="127.0.0.1:0") as cluster, \
            KaasClient(cluster) as direct:
        tenants_file = os.path.join(tmp, "tenants.yaml")
        with open(tenants_file, "w") as f:
            f.write(f"tenants:\n  bench: {{token_sha256: {token_digest(TENANT_TOKEN)}, "
                    f"max_in_flight: {args.clients * 4}}}\n")
        proc = subprocess.Popen(
            [sys.executable, "-m", "dask_kaas.gateway", "--scheduler",
             cluster.scheduler_address, "--host", "127.0.0.1", "--port", "0", "--tenants",
             tenants_file, "--max-model-size", "1GiB", "--max-const-bytes", "4GiB"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        line = proc.stdout.readline() if proc.stdout else ""
        if "serving" not in line:
            proc.kill()
            raise RuntimeError(f"the gateway did not start: {line!r}")
        address = line.split()[-1].split("//")[1]
        try:
            t0 = time.perf_counter()
            _put(address, "/v1/models/off", body)
            result["upload_s"] = time.perf_counter() - t0
            _put(address, "/v1/models/on" + query, body)
            kaas_model = register_onnx_model(direct, model, tenant="direct")
            result["latency"] = _latency(args, th, address, sess, kaas_model, model, outputs)
            result["load"] = {}
            for name in ("off", "on"):
                result["load"][name] = _load(args, th, address, name, sess, model, outputs)
            listing = _listing(address)
            batching = listing["on"]["batching"]
            result["load"]["on"]["batch_rows"] = batching["batch_rows"]
            result["load"]["on"]["batch_requests"] = batching["batch_requests"]
            for name in ("off", "on"):
                result["load"][name]["imports"] = listing[name]["imports"]
            off, on = result["load"]["off"], result["load"]["on"]
            result["speedup"] = on["throughput_per_s"] / max(off["throughput_per_s"], 1e-9)
        finally:
            proc.terminate()
            proc.wait(30)
    _print(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    bad = sum(r["wrong"] + r["errors"] for r in result["load"].values()
              if isinstance(r, dict) and "wrong" in r)
    return 0 if bad == 0 and result["latency"]["wrong"] == 0 else 1


def _latency(args: Any, th: Any, address: str, sess: Any, kaas_model: Any, model: Any,
             outputs: list[str]) -> dict[str, Any]:
    client = th.InferenceServerClient(address, network_timeout=300.0)
    samples: dict[str, list[float]] = {"gateway": [], "direct": [], "onnxruntime": []}
    wrong = 0
    for i in range(args.latency_requests + 3):
        feed = example_inputs(model, 1, 1000 + i)
        want = sess.run(None, feed)
        calls = [("onnxruntime", lambda f=feed: sess.run(None, f)),
                 ("gateway", lambda f=feed: _infer(th, client, "off", f, outputs)),
                 ("direct", lambda f=feed: [kaas_model(f)[o] for o in outputs])]
        for key, call in calls if i % 2 == 0 else calls[::-1]:
            time.sleep(0.02)
            t0 = time.perf_counter()
            got = call()
            if i >= 3:  # the first requests import, send weights and learn
                samples[key].append(time.perf_counter() - t0)
            wrong += not _close(got, want)
    out: dict[str, Any] = {"requests": args.latency_requests, "wrong": wrong}
    for key, s in samples.items():
        out[f"{key}_p50_ms"] = float(np.median(s)) * 1e3
    out["gateway_vs_direct"] = out["gateway_p50_ms"] / out["direct_p50_ms"]
    out["gateway_vs_onnxruntime"] = out["gateway_p50_ms"] / out["onnxruntime_p50_ms"]
    return out


def _load(args: Any, th: Any, address: str, name: str, sess: Any, model: Any,
          outputs: list[str]) -> dict[str, Any]:
    pairs = []
    for i in range(16):
        feed = example_inputs(model, 1, 50 + i)
        pairs.append((feed, sess.run(None, feed)))
    lat: list[float] = []
    counts = {"wrong": 0, "errors": 0}
    stop_at = 0.0
    lock = threading.Lock()

    def loop(i: int) -> None:
        client = th.InferenceServerClient(address, network_timeout=300.0)
        n = i
        while time.perf_counter() < stop_at:
            feed, want = pairs[n % len(pairs)]
            n += 1
            t0 = time.perf_counter()
            try:
                got = _infer(th, client, name, feed, outputs)
            except Exception:  # noqa: BLE001 - counted and reported
                with lock:
                    counts["errors"] += 1
                continue
            dt = time.perf_counter() - t0
            with lock:
                lat.append(dt)
                counts["wrong"] += not _close(got, want)

    # warm up with the same load, unmeasured: the batch sizes the run will
    # form are imported and their weights sent before the clock starts
    warm_s = min(5.0, args.duration / 3)
    stop_at = time.perf_counter() + warm_s
    threads = [threading.Thread(target=loop, args=(i,)) for i in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lat.clear()
    counts_warm = dict(counts)
    threads = [threading.Thread(target=loop, args=(i,)) for i in range(args.clients)]
    start = time.perf_counter()
    stop_at = start + args.duration
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    return {"completed": len(lat), "throughput_per_s": len(lat) / elapsed,
            "warmup_s": warm_s, "warmup_wrong": counts_warm["wrong"],
            "warmup_errors": counts_warm["errors"],
            "p50_ms": float(np.median(lat)) * 1e3 if lat else None,
            "p99_ms": float(np.percentile(lat, 99)) * 1e3 if lat else None, **counts}


def _print(r: dict[str, Any]) -> None:
    lat = r["latency"]
    print(f"{r['model']} through the gateway: {r['workers']} CPU workers, {r['cpus']} CPUs, "
          f"load average {r['load_average']:.1f}; upload {r['upload_s']:.2f} s")
    print(f"single requests ({lat['requests']} each, batch 1): onnxruntime p50 "
          f"{lat['onnxruntime_p50_ms']:.2f} ms, direct KaasClient p50 {lat['direct_p50_ms']:.2f}"
          f" ms, gateway p50 {lat['gateway_p50_ms']:.2f} ms (gateway/direct "
          f"{lat['gateway_vs_direct']:.2f}x, gateway/onnxruntime "
          f"{lat['gateway_vs_onnxruntime']:.2f}x); wrong {lat['wrong']}")
    for name in ("off", "on"):
        load = r["load"][name]
        print(f"{r['clients']} batch-1 clients, batching {name}: "
              f"{load['throughput_per_s']:.1f} req/s, p50 {load['p50_ms']:.1f} ms, p99 "
              f"{load['p99_ms']:.1f} ms, wrong {load['wrong']}, errors {load['errors']}")
    print(f"batching speedup {r['speedup']:.2f}x; batches formed (rows: runs) "
          f"{r['load']['on']['batch_rows']}; graphs imported {r['load']['on']['imports']}")
