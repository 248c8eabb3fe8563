"""``python -m dask_kaas.onnx.model_check``: one model-zoo architecture
through a real cluster, against a reference computed outside it.

The device check (``scripts/gpu-check.sh``) runs it on the CUDA backend,
where the operator table runs on CuPy: the answers are compared with
onnxruntime's CPU output where onnxruntime is installed, else with the same
graph run on NumPy in this process (:func:`.execute.run_graph`), which checks
the CuPy path against the NumPy path the conformance cases already hold to
ONNX's expected outputs.  The report names which reference it used.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

#: Tolerances of the model tests (float32 through ~50 layers).
RTOL, ATOL = 1e-3, 1e-4


def reference(model: Any, graph: Any, consts: dict[str, np.ndarray], feed: dict[str, np.ndarray]
              ) -> tuple[str, dict[str, np.ndarray]]:
    """(name of the reference, its outputs) for ``feed``."""
    try:
        import onnxruntime as ort
    except ImportError:
        from .execute import run_graph

        return "the same graph on NumPy in-process", run_graph(graph, {**consts, **feed})
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return "onnxruntime (CPU)", dict(zip(names, session.run(None, feed)))


def check(client: Any, name: str = "resnet50", requests: int = 3) -> dict[str, Any]:
    """Run ``requests`` images of the light model ``name`` (seeded weights)
    through ``client``; compare each with the reference."""
    from .importer import from_onnx
    from .zoo import light_input, light_model

    model, data = light_model(name, seed=0)
    t0 = time.perf_counter()
    graph, consts = from_onnx(model, batch=1)
    import_s = time.perf_counter() - t0
    times, worst, ref_name = [], 0.0, ""
    for r in range(requests):
        feed = {data: light_input(seed=r)}
        t0 = time.perf_counter()
        got = client.submit_kernel_graph(graph, {**consts, **feed}, tenant="model-check").result()
        times.append(time.perf_counter() - t0)
        ref_name, ref = reference(model, graph, consts, feed)
        for k, v in ref.items():
            np.testing.assert_allclose(got[k], v, rtol=RTOL, atol=ATOL,
                                       err_msg=f"{name}: output {k}, image {r}")
            worst = max(worst, float(np.abs(got[k] - v).max()))
    return {"model": name, "launches": len(graph.launches), "import_s": import_s,
            "first_request_s": times[0],
            "median_request_s": statistics.median(times[1:] or times),
            "largest_difference": worst, "reference": ref_name, "requests": requests}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dask_kaas.onnx.model_check",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", default="auto", choices=["cpu", "cuda", "auto"])
    p.add_argument("--model", default="resnet50", help="a light model of the onnx package")
    p.add_argument("--requests", type=int, default=3)
    args = p.parse_args(argv)
    if not 1 <= args.requests <= 1000:
        p.error("--requests must be 1..1000")
    from .. import KaasClient, LocalKaasCluster
    from .zoo import LIGHT_MODELS

    if args.model not in LIGHT_MODELS:
        p.error(f"--model must be one of {', '.join(LIGHT_MODELS)}")
    with LocalKaasCluster(1, backend=args.backend, dashboard_address=None) as cluster, \
            KaasClient(cluster) as client:
        try:
            r = check(client, args.model, args.requests)
        except AssertionError as e:
            print(f"{args.model} on the {cluster.kaas_backend} backend: WRONG\n{e}")
            return 1
    print(f"{r['model']} on the {cluster.kaas_backend} backend: {r['launches']} launches, "
          f"import {r['import_s']:.2f}s, first request {r['first_request_s'] * 1e3:.0f} ms, "
          f"then median {r['median_request_s'] * 1e3:.1f} ms; {r['requests']} images match "
          f"{r['reference']} (largest difference {r['largest_difference']:.1e})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
