"""One request at a time: an ONNX model through the cluster against
onnxruntime on the same number of threads, measured side by side.

``dask-kaas bench --workload onnx:resnet50 --scenario single [--threads 1]``
starts one CPU worker whose BLAS uses ``--threads`` threads, runs the model
through ``submit_kernel_graph`` and through an onnxruntime session with as
many intra-op threads, alternating, and reports both medians, their ratio,
the import time and the temp memory plan.  The cluster is called through
:class:`~.serve.OnnxModel` (weights scattered once and named by key) and,
for comparison, through ``submit_kernel_graph`` with the weights as arrays
(identified by content at every submission).  Every cluster result is
checked against onnxruntime's (rtol 1e-3, atol 1e-4).
"""

from __future__ import annotations

import json
import os
import statistics
import time
from typing import Any

import numpy as np


def load_target(target: str, batch: int) -> tuple[Any, dict[str, np.ndarray]]:
    """(ModelProto, one request's inputs) of a light model, ``bert`` or a path."""
    from .load import load_model
    from .zoo import LIGHT_MODELS, bert_encoder, bert_inputs, light_input, light_model

    if target in LIGHT_MODELS:
        model, data = light_model(target, seed=1000)
        return model, {data: light_input(seed=1)}
    if target == "bert":
        return bert_encoder(seed=1000), bert_inputs(batch)
    model = load_model(target)
    from .importer import from_onnx

    graph, _ = from_onnx(model, batch=batch)
    rng = np.random.default_rng(1)
    feed = {}
    for b in graph.buffers.values():
        if b.kind.value == "input":
            feed[b.name] = (rng.standard_normal(b.shape).astype(b.dtype) if b.dtype.kind == "f"
                            else np.zeros(b.shape, b.dtype))
    return model, feed


def run_single(args: Any) -> int:
    threads = max(1, int(args.threads))
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)  # read by the worker process when it starts
    import onnxruntime as ort

    from ..client import KaasClient, submit_kernel_graph
    from ..cluster import LocalKaasCluster
    from .importer import from_onnx
    from .serve import OnnxModel

    target = args.workload[len("onnx:"):]
    model, feed = load_target(target, args.batch)
    t0 = time.perf_counter()
    graph, consts = from_onnx(model, batch=args.batch)
    import_s = time.perf_counter() - t0
    d = graph.describe()
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), so,
                                providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    limit = int(graph.nbytes * 1.5) + 64 * 2**20
    kaas_s: list[float] = []
    arrays_s: list[float] = []
    ort_s: list[float] = []
    wrong = 0
    with LocalKaasCluster(1, backend=getattr(args, "backend", None) or "auto",
                          dashboard_address=None, device_memory_limit=limit,
                          threads_per_worker=1) as cluster, KaasClient(cluster) as client:
        inputs = {**consts, **feed}
        served = OnnxModel(model, client, tenant="single", batch=args.batch)
        for _ in range(3):  # warm: weights to the device, kernels resolved, pages touched
            served(feed)
            submit_kernel_graph(graph, inputs, client, tenant="single").result()
            sess.run(None, feed)
        for _ in range(max(1, int(args.requests))):
            t = time.perf_counter()
            got = served(feed)  # weights scattered once, named by key
            kaas_s.append(time.perf_counter() - t)
            t = time.perf_counter()
            got2 = submit_kernel_graph(graph, inputs, client, tenant="single").result()
            arrays_s.append(time.perf_counter() - t)  # weights as arrays: hashed each time
            t = time.perf_counter()
            ref = sess.run(None, feed)
            ort_s.append(time.perf_counter() - t)
            for n, r in zip(names, ref):
                for out in (got, got2):
                    if not np.allclose(out[n], r, rtol=1e-3, atol=1e-4):
                        wrong += 1
        backend = cluster.kaas_backend
    k50, o50 = statistics.median(kaas_s), statistics.median(ort_s)
    doc = {
        "command": "dask-kaas bench --workload " + args.workload + " --scenario single "
                   f"--threads {threads} --requests {args.requests}",
        "model": target, "backend": backend, "threads": threads,
        "launches": len(graph.launches), "import_s": round(import_s, 3),
        "temp_sum_mib": round(d["temp_sum_bytes"] / 2**20, 1),
        "temp_peak_mib": round(d["temp_peak_bytes"] / 2**20, 1),
        "temp_ratio": d["temp_ratio"],
        "weights_mib": round(sum(v.nbytes for v in consts.values()) / 2**20, 1),
        "kaas_p50_ms": round(k50 * 1e3, 2), "kaas_min_ms": round(min(kaas_s) * 1e3, 2),
        "onnxruntime_p50_ms": round(o50 * 1e3, 2),
        "onnxruntime_min_ms": round(min(ort_s) * 1e3, 2),
        "ratio_p50": round(k50 / o50, 3), "ratio_min": round(min(kaas_s) / min(ort_s), 3),
        "kaas_arrays_p50_ms": round(statistics.median(arrays_s) * 1e3, 2),
        "ratio_arrays_p50": round(statistics.median(arrays_s) / o50, 3),
        "requests": len(kaas_s), "wrong": wrong,
    }
    print(f"{target}: {doc['launches']} launches, imported in {doc['import_s']:.3f} s; "
          f"temps {doc['temp_sum_mib']} MiB summed -> {doc['temp_peak_mib']} MiB planned "
          f"({doc['temp_ratio']:.1%}); weights {doc['weights_mib']} MiB")
    print(f"single request on {threads} thread(s), {backend} backend: kaas p50 "
          f"{doc['kaas_p50_ms']} ms (min {doc['kaas_min_ms']}), onnxruntime p50 "
          f"{doc['onnxruntime_p50_ms']} ms (min {doc['onnxruntime_min_ms']}): "
          f"{doc['ratio_p50']:.2f}x at the median, {doc['ratio_min']:.2f}x at the minimum; "
          f"{wrong} wrong of {2 * len(kaas_s)}")
    print(f"submit_kernel_graph with the weights as arrays (hashed at every submission): "
          f"p50 {doc['kaas_arrays_p50_ms']} ms ({doc['ratio_arrays_p50']:.2f}x)")
    if getattr(args, "json", None):
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=2)
        print(f"JSON: {args.json}")
    return 1 if wrong else 0
