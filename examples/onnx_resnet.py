"""Serve an ONNX model on a dask_kaas cluster: ResNet-50 from the onnx
package (with seeded random weights), one copy per tenant, called by its
input name and checked against onnxruntime.

    python examples/onnx_resnet.py            # 2 CPU workers
    python examples/onnx_resnet.py squeezenet
"""

from __future__ import annotations

import sys

import numpy as np


def main(client, model_name: str = "resnet50", tenants: int = 2, requests: int = 2) -> float:
    """Run ``requests`` images per tenant; return the largest difference
    from onnxruntime."""
    import onnxruntime as ort

    from dask_kaas.onnx.zoo import light_input, light_model

    worst = 0.0
    for t in range(tenants):
        model, data = light_model(model_name, seed=t)  # each tenant: its own weights
        served = client.register_onnx_model(model, tenant=f"tenant-{t}")
        graph, _ = served.graph_for(None)
        d = graph.describe()
        print(f"tenant-{t}: {model_name} as {d['launches']} launches; temps "
              f"{d['temp_sum_bytes'] / 2**20:.0f} MiB summed, "
              f"{d['temp_peak_bytes'] / 2**20:.0f} MiB planned")
        session = ort.InferenceSession(model.SerializeToString(),
                                       providers=["CPUExecutionProvider"])
        for r in range(requests):
            x = light_input(seed=100 * t + r)
            out = served({data: x})  # outputs by name
            (name,) = served.outputs
            ref = session.run(None, {data: x})[0]
            np.testing.assert_allclose(out[name], ref, rtol=1e-3, atol=1e-4)
            worst = max(worst, float(np.abs(out[name] - ref).max()))
            print(f"  image {r}: class {int(out[name].argmax())} "
                  f"(onnxruntime: {int(ref.argmax())})")
    return worst


if __name__ == "__main__":
    from dask_kaas import KaasClient, LocalKaasCluster

    with LocalKaasCluster(2, backend="cpu", dashboard_address=None,
                          device_memory_limit="1GB") as cluster, KaasClient(cluster) as client:
        print(f"largest difference from onnxruntime: "
              f"{main(client, *sys.argv[1:2]):.2e}")
