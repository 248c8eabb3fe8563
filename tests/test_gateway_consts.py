"""The gateway's consts survive the loss of workers and re-uploads (issue 16,
items 6 and 7).

A real LocalKaasCluster of two CPU-backend workers, ``dask-kaas gateway`` as
its own process on 127.0.0.1 and raw HTTP: the worker processes that hold a
model's const are SIGKILLed while requests for the model are running, and
every request must still be answered 200 with the right result (the
gateway's consts are replicated and sent again like the direct client's).
Re-uploading a const with the same content must not break the model.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import time

import numpy as np
import pytest
from gateway_helpers import GatewayProcess, tenants_yaml

from dask_kaas import In, KaasClient, Kernel, KernelGraph, LocalKaasCluster, Out

TOKEN = "erin-token"
OTHER = "fred-token"
N = 192
ITERS = 12


def slow_graph() -> KernelGraph:
    """A fraction of a second of CPU work per request: (w @ w) a dozen times."""
    g = KernelGraph("wsq", n_iter=ITERS)
    x = g.input("x", (4, N), np.float32)
    w = g.const("w", (N, N), np.float32)
    h = g.temp("h", (N, N), np.float32)
    y = g.output("y", (4, N), np.float32)
    g.launch(Kernel.library("gemm"), [In(w), In(w), Out(h)])
    g.launch(Kernel.library("gemm"), [In(x), In(h), Out(y)])
    return g


W = (np.random.default_rng(16).random((N, N)) / N).astype(np.float32)
WW = W @ W


def infer_body(x: np.ndarray) -> bytes:
    return json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": list(x.shape),
                                   "data": x.ravel().tolist()}]}).encode()


def infer(gw: GatewayProcess, model: str, x: np.ndarray,
          token: str = TOKEN) -> tuple[int, object]:
    status, doc = gw.json("POST", f"/v2/models/{model}/infer", infer_body(x), token)
    if status != 200:
        return status, doc
    return status, np.asarray(doc["outputs"][0]["data"], np.float32).reshape(4, N)


def upload(gw: GatewayProcess, model: str, w: np.ndarray, token: str = TOKEN) -> None:
    status, _, data = gw.request("PUT", f"/v1/models/{model}/consts/w", w.tobytes(), token)
    assert status == 204, data


def register(gw: GatewayProcess, model: str, w: np.ndarray = W, token: str = TOKEN) -> None:
    status, doc = gw.json("PUT", f"/v1/models/{model}", slow_graph().to_json().encode(), token)
    assert status in (200, 201), doc
    upload(gw, model, w, token)


def holders(client: KaasClient) -> set[str]:
    """Addresses of the workers holding any of the gateway's consts."""
    return set(client.run_on_scheduler(lambda dask_scheduler: [
        ws.address for ts in dask_scheduler.tasks.values()
        if str(ts.key).startswith("kaas-const-") for ws in ts.who_has]))


def kill(client: KaasClient, addrs: set[str]) -> None:
    for pid in client.run(os.getpid, workers=sorted(addrs)).values():
        os.kill(pid, signal.SIGKILL)


@pytest.fixture
def setup(tmp_path):
    with LocalKaasCluster(2, backend="cpu", dashboard_address="127.0.0.1:0",
                          device_memory_limit="128MB") as cluster, \
            KaasClient(cluster) as client:
        path = tmp_path / "tenants.yaml"
        path.write_text(tenants_yaml({"erin": {"token": TOKEN, "max_in_flight": 64},
                                      "fred": {"token": OTHER}}, {}))
        gw = GatewayProcess(cluster.scheduler_address, str(path), "--request-timeout", "240s")
        try:
            yield client, gw
        finally:
            gw.stop()


@pytest.mark.parametrize("victims", ["one holder", "every holder"])
def test_requests_survive_the_death_of_the_workers_holding_the_const(setup, victims):
    """Issue 16 item 6: the gateway kept one copy of each const; when its
    worker died mid-load, its requests got 503 FutureCancelledError."""
    client, gw = setup
    register(gw, "wsq", W)
    # two copies from the upload on, as the direct client's consts have
    deadline = time.monotonic() + 60
    while len(holders(client)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(holders(client)) == 2, holders(client)
    rng = np.random.default_rng(6)
    xs = [rng.random((4, N), dtype=np.float32) for _ in range(48)]
    status, y = infer(gw, "wsq", xs[0])  # the const is on the cluster and in use
    assert status == 200, y
    answered: list[int] = []

    def one(x: np.ndarray) -> tuple[int, object, np.ndarray]:
        status, y = infer(gw, "wsq", x)
        answered.append(status)
        return status, y, x

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        futs = [pool.submit(one, x) for x in xs]
        deadline = time.monotonic() + 120
        while len(answered) < 6 and time.monotonic() < deadline:
            time.sleep(0.01)
        who = holders(client)
        assert who, "the const is on no worker"
        victims_now = who if victims == "every holder" else {sorted(who)[0]}
        kill(client, victims_now)
        results = [f.result(timeout=300) for f in futs]
    assert len(answered) - sum(1 for s in answered if s == 200) == 0, (
        f"statuses {sorted(set(answered))}; gateway log:\n{gw.log()[-3000:]}")
    for status, y, x in results:
        assert status == 200
        np.testing.assert_allclose(y, x @ WW, rtol=1e-4, atol=1e-5)
    # and the model still serves once the workers are back
    client.wait_for_workers(2, timeout=120)
    status, y = infer(gw, "wsq", xs[1])
    assert status == 200, y
    np.testing.assert_allclose(y, xs[1] @ WW, rtol=1e-4, atol=1e-5)
    assert "Traceback" not in gw.log(), gw.log()[-3000:]


def test_reuploading_the_same_const_keeps_the_model_working(setup):
    """Issue 16 item 7: re-uploading a const with the same content released
    the old future while scattering the same key again: the release won,
    every request got 504 and the gateway logged "sent ... again" in a loop."""
    client, gw = setup
    register(gw, "wsq", W)
    x = np.random.default_rng(7).random((4, N), dtype=np.float32)
    for round_ in range(4):
        upload(gw, "wsq", W.copy())  # same content, a new upload
        for _ in range(2):
            status, y = infer(gw, "wsq", x)
            assert status == 200, (round_, y, gw.log()[-3000:])
            np.testing.assert_allclose(y, x @ WW, rtol=1e-4, atol=1e-5)
    # a new value after the same one, and back: each answer from its own weights
    upload(gw, "wsq", 2 * W)
    status, y = infer(gw, "wsq", x)
    assert status == 200, y
    np.testing.assert_allclose(y, x @ (4 * WW), rtol=1e-4, atol=1e-5)
    upload(gw, "wsq", W)
    status, y = infer(gw, "wsq", x)
    assert status == 200, y
    np.testing.assert_allclose(y, x @ WW, rtol=1e-4, atol=1e-5)
    # deleting the model and registering it again with the same weights
    assert gw.request("DELETE", "/v1/models/wsq", token=TOKEN)[0] == 204
    register(gw, "wsq", W)
    status, y = infer(gw, "wsq", x)
    assert status == 200, (y, gw.log()[-3000:])
    np.testing.assert_allclose(y, x @ WW, rtol=1e-4, atol=1e-5)
    assert gw.log().count("again") < 5, gw.log()[-3000:]


def test_equal_weights_of_two_tenants_outlive_either_model(setup):
    """Two tenants upload the same weights (one cluster copy, by content);
    one deletes its model, re-registers it, deletes it again: the other's
    model answers right throughout, and another tenant's model name is
    still not found."""
    client, gw = setup
    x = np.random.default_rng(8).random((4, N), dtype=np.float32)
    register(gw, "mine", W)
    register(gw, "theirs", W.copy(), OTHER)
    for token, model in ((TOKEN, "mine"), (OTHER, "theirs")):
        status, y = infer(gw, model, x, token)
        assert status == 200, y
        np.testing.assert_allclose(y, x @ WW, rtol=1e-4, atol=1e-5)
    for _ in range(2):
        assert gw.request("DELETE", "/v1/models/theirs", token=OTHER)[0] == 204
        status, y = infer(gw, "mine", x)
        assert status == 200, y
        np.testing.assert_allclose(y, x @ WW, rtol=1e-4, atol=1e-5)
        register(gw, "theirs", W.copy(), OTHER)
        status, y = infer(gw, "theirs", x, OTHER)
        assert status == 200, y
        np.testing.assert_allclose(y, x @ WW, rtol=1e-4, atol=1e-5)
    assert infer(gw, "theirs", x)[0] == 404  # erin cannot reach fred's model
    assert gw.request("PUT", "/v1/models/theirs/consts/w", W.tobytes(), TOKEN)[0] == 404
