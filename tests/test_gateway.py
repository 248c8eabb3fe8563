"""The gateway end to end: a LocalKaasCluster, ``dask-kaas gateway`` started as
its own process on 127.0.0.1, and the real ``tritonclient.http`` client (plus
raw HTTP for what a well-behaved client never sends)."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import threading

import numpy as np
import pytest

from dask_kaas import In, KaasClient, Kernel, KernelGraph, LocalKaasCluster, Out
from dask_kaas.workloads.jacobi import jacobi_graph, problem, reference

tritonclient_http = pytest.importorskip("tritonclient.http")
from gateway_helpers import GatewayProcess, tenants_yaml  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

OPS = "ops-token"
TOKENS = {"alice": "alice-token", "bob": "bob-token", "carol": "carol-token",
          "dave": "dave-token"}
TENANTS = {"alice": {"token": TOKENS["alice"], "weight": 2.0},
           "bob": {"token": TOKENS["bob"]},
           "carol": {"token": TOKENS["carol"], "max_in_flight": 1},
           "dave": {"token": TOKENS["dave"]}}
MAX_BODY = 2 << 20
GATEWAY_ENV = {"DASK_KAAS__ARRAY_MODULES": '["dask_kaas.workloads"]'}


@pytest.fixture(scope="module")
def kaas(tmp_path_factory):
    """One worker with one slot: a request queued behind a slow one is still
    queued when the test acts on it."""
    with LocalKaasCluster(1, backend="cpu", dashboard_address="127.0.0.1:0",
                          device_memory_limit="256MB") as cluster, KaasClient(cluster) as client:
        yield cluster, client


@pytest.fixture(scope="module")
def gw(kaas, tmp_path_factory):
    cluster, _ = kaas
    path = tmp_path_factory.mktemp("gw") / "tenants.yaml"
    path.write_text(tenants_yaml(TENANTS, {"ops": OPS}))
    g = GatewayProcess(cluster.scheduler_address, str(path), "--max-body-size", str(MAX_BODY),
                       "--request-timeout", "60s", env=GATEWAY_ENV)
    yield g
    g.stop()


def auth(tenant: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[tenant]}"}


def layer_graph() -> KernelGraph:
    g = KernelGraph("layer")
    x = g.input("x", (8, 16), np.float32)
    w = g.const("w", (16, 4), np.float32)
    b = g.const("b", (4,), np.float32)
    h = g.temp("h", (8, 4), np.float32)
    a = g.temp("a", (8, 4), np.float32)
    y = g.output("y", (8, 4), np.float32)
    g.launch(Kernel.library("gemm"), [In(x), In(w), Out(h)])
    g.launch(Kernel.library("add"), [In(h), In(b), Out(a)])
    g.launch(Kernel.library("relu"), [In(a), Out(y)])
    return g


def slow_graph() -> KernelGraph:
    """About a second or more of CPU work: w @ w, a hundred times."""
    g = KernelGraph("slow", n_iter=100)
    x = g.input("x", (4, 512), np.float32)
    w = g.const("w", (512, 512), np.float32)
    h = g.temp("h", (512, 512), np.float32)
    y = g.output("y", (4, 512), np.float32)
    g.launch(Kernel.library("gemm"), [In(w), In(w), Out(h)])
    g.launch(Kernel.library("gemm"), [In(x), In(h), Out(y)])
    return g


def npy(arr: np.ndarray) -> bytes:
    f = io.BytesIO()
    np.save(f, arr)
    return f.getvalue()


def register(gw: GatewayProcess, tenant: str, name: str, graph: KernelGraph,
             consts: dict[str, np.ndarray], token: str | None = None) -> None:
    token = token or TOKENS[tenant]
    status, doc = gw.json("PUT", f"/v1/models/{name}", graph.to_json().encode(), token)
    assert status in (200, 201), doc
    for i, (buf, value) in enumerate(consts.items()):
        body = npy(value) if i % 2 else value.astype(value.dtype.newbyteorder("<")).tobytes()
        status, _, data = gw.request("PUT", f"/v1/models/{name}/consts/{buf}", body, token)
        assert status == 204, data


def triton(gw: GatewayProcess):
    return tritonclient_http.InferenceServerClient(gw.address, network_timeout=120.0)


def infer(client, tenant: str, model: str, x: np.ndarray, binary: bool, **kw):
    inp = tritonclient_http.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    out = tritonclient_http.InferRequestedOutput("y", binary_data=binary)
    return client.infer(model, [inp], outputs=[out], headers=auth(tenant), **kw).as_numpy("y")


RNG = np.random.default_rng(0)
W = RNG.standard_normal((16, 4)).astype(np.float32)
B = RNG.standard_normal(4).astype(np.float32)
WS = (RNG.random((512, 512)) / 512).astype(np.float32)


def layer_ref(x, w=W, b=B):
    return np.maximum(x @ w + b, 0)


def slow_ref(x):
    return x @ (WS @ WS)


# -- the happy path, with tritonclient ------------------------------------------------
def test_tritonclient_binary_and_json_tensors(gw, kaas):
    register(gw, "alice", "layer", layer_graph(), {"w": W, "b": B})
    c = triton(gw)
    assert c.is_server_live() and c.is_server_ready()
    assert "binary_tensor_data" in c.get_server_metadata()["extensions"]
    assert c.is_model_ready("layer", headers=auth("alice"))
    meta = c.get_model_metadata("layer", headers=auth("alice"))
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [8, 16]}]
    assert meta["outputs"] == [{"name": "y", "datatype": "FP32", "shape": [8, 4]}]
    for binary in (True, False, True):
        x = RNG.standard_normal((8, 16)).astype(np.float32)
        np.testing.assert_allclose(infer(c, "alice", "layer", x, binary), layer_ref(x),
                                   rtol=1e-5, atol=1e-6)
    # no outputs named: tritonclient asks for every output in binary
    x = RNG.standard_normal((8, 16)).astype(np.float32)
    inp = tritonclient_http.InferInput("x", [8, 16], "FP32").set_data_from_numpy(x)
    res = c.infer("layer", [inp], headers=auth("alice"), model_version="1", request_id="r-7")
    np.testing.assert_allclose(res.as_numpy("y"), layer_ref(x), rtol=1e-5, atol=1e-6)
    assert res.get_response()["id"] == "r-7"
    status, doc = gw.json("GET", "/v1/models", token=TOKENS["alice"])
    assert status == 200 and [m["name"] for m in doc["models"]] == ["layer"]
    assert doc["models"][0]["ready"] is True
    # the tenant's name and weight come from the tenants file
    assert kaas[1].kaas_stats()["weights"]["alice"] == 2.0


def test_curl_style_json_and_allowed_cpu_function(gw):
    """A CUDA kernel whose CPU implementation comes from a module the
    operator allowed (kaas.array-modules) runs through the gateway; a
    function from any other module is refused."""
    n, iters = 32, 6
    graph = jacobi_graph(n, iters)
    A, b = problem(n)
    register(gw, "alice", "jacobi", graph, {"A": A})
    x0 = np.zeros(n, np.float32)
    body = {"inputs": [{"name": "b", "datatype": "FP32", "shape": [n], "data": b.tolist()},
                       {"name": "x0", "datatype": "FP32", "shape": [n], "data": x0.tolist()}]}
    status, doc = gw.json("POST", "/v2/models/jacobi/infer", body, TOKENS["alice"])
    assert status == 200, doc
    assert (doc["model_name"], doc["model_version"]) == ("jacobi", "1")
    (out,) = doc["outputs"]
    assert (out["name"], out["datatype"], out["shape"]) == ("x", "FP32", [n])
    np.testing.assert_allclose(out["data"], reference(A, b, x0, iters), rtol=1e-4, atol=1e-5)
    evil = json.loads(graph.to_json())
    evil["kernels"][0]["cpu"] = "os:system"
    status, doc = gw.json("PUT", "/v1/models/evil", json.dumps(evil).encode(), TOKENS["alice"])
    assert status == 400 and "kaas.array-modules" in doc["error"]
    status, _ = gw.json("GET", "/v2/models/evil", token=TOKENS["alice"])
    assert status == 404


# -- who may do what ------------------------------------------------------------------
def test_wrong_token_refused(gw):
    for token in (None, "", "Alice-token", "wrong", TOKENS["alice"] + "x", TOKENS["bob"][:-1],
                  "\xff\xfe\x80", "x" * 10_000):
        status, headers, data = gw.request("GET", "/v1/models", token=token)
        assert status == 401 and "Bearer" in headers["www-authenticate"]
        assert json.loads(data)["error"]
    status, _, _ = gw.request("GET", "/v1/models",
                              headers={"Authorization": f"Basic {TOKENS['alice']}"})
    assert status == 401
    with pytest.raises(InferenceServerException) as info:
        triton(gw).infer("layer", [tritonclient_http.InferInput("x", [8, 16], "FP32")
                                   .set_data_from_numpy(np.zeros((8, 16), np.float32))],
                         headers={"Authorization": "Bearer nope"})
    assert info.value.status() == "401"
    # roles: tenants cannot use operator routes, operators have no models
    assert gw.json("GET", "/v1/models", token=OPS)[0] == 403
    assert gw.request("GET", "/metrics", token=TOKENS["alice"])[0] == 403
    assert gw.json("PUT", "/v1/policy", {"policy": "balance"}, TOKENS["bob"])[0] == 403
    assert gw.json("GET", "/v2/health/live")[0] == 200  # probes need no token


def test_tenants_cannot_see_or_call_each_others_models(gw):
    register(gw, "alice", "secret", layer_graph(), {"w": W, "b": B})
    bob = TOKENS["bob"]
    for method, path in [("GET", "/v2/models/secret"), ("GET", "/v2/models/secret/ready"),
                         ("GET", "/v2/models/secret/versions/1"), ("DELETE", "/v1/models/secret"),
                         ("POST", "/v2/models/secret/infer")]:
        status, doc = gw.json(method, path, {"inputs": []} if method == "POST" else None, bob)
        assert status == 404 and "secret" in doc["error"], (method, path)
    status, _, _ = gw.request("PUT", "/v1/models/secret/consts/w", W.tobytes(), bob)
    assert status == 404
    with pytest.raises(InferenceServerException) as info:
        infer(triton(gw), "bob", "secret", np.zeros((8, 16), np.float32), True)
    assert info.value.status() == "404"
    assert gw.json("GET", "/v1/models", token=bob) == (200, {"models": []})
    # bob's own "secret" is his: same name, other weights, other answers
    W2, B2 = -W, B + 1
    register(gw, "bob", "secret", layer_graph(), {"w": W2, "b": B2})
    x = RNG.standard_normal((8, 16)).astype(np.float32)
    c = triton(gw)
    np.testing.assert_allclose(infer(c, "bob", "secret", x, True), layer_ref(x, W2, B2),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(infer(c, "alice", "secret", x, True), layer_ref(x),
                               rtol=1e-5, atol=1e-6)
    assert gw.request("DELETE", "/v1/models/secret", token=bob)[0] == 204
    assert gw.json("GET", "/v2/models/secret", token=bob)[0] == 404
    np.testing.assert_allclose(infer(c, "alice", "secret", x, False), layer_ref(x),
                               rtol=1e-5, atol=1e-6)


def const_keys(client) -> set[str]:
    return set(client.run_on_scheduler(lambda dask_scheduler: [
        str(k) for k in dask_scheduler.tasks if str(k).startswith("kaas-const-")]))


def test_consts_sent_once_cached_and_released_with_the_model(gw, kaas):
    _, client = kaas
    before = const_keys(client)
    w3, b3 = W * 3, B * 3  # values no other test uses
    register(gw, "bob", "cached", layer_graph(), {"w": w3, "b": b3})
    sent = const_keys(client) - before
    assert len(sent) == 2  # on upload, one key per const
    hits = client.kaas_stats()["tenants"].get("bob", {}).get("hits", 0)
    c = triton(gw)
    for _ in range(4):
        x = RNG.standard_normal((8, 16)).astype(np.float32)
        np.testing.assert_allclose(infer(c, "bob", "cached", x, True), layer_ref(x, w3, b3),
                                   rtol=1e-5, atol=1e-6)
    assert const_keys(client) - before == sent  # nothing sent again
    assert client.kaas_stats()["tenants"]["bob"]["hits"] >= hits + 6  # device-cache hits
    # new weights replace the old ones on the cluster; deleting the model frees them
    status, _, _ = gw.request("PUT", "/v1/models/cached/consts/b", (b3 + 1).tobytes(),
                              TOKENS["bob"])
    assert status == 204
    gw.wait_for(lambda: len(const_keys(client) - before) == 2 and
                const_keys(client) - before != sent, "the old b released")
    assert gw.request("DELETE", "/v1/models/cached", token=TOKENS["bob"])[0] == 204
    gw.wait_for(lambda: not (const_keys(client) - before), "the consts released")


def test_tls(kaas, tmp_path):
    import shutil
    import ssl
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True,
                   capture_output=True)
    path = tmp_path / "tenants.yaml"
    path.write_text(tenants_yaml({"alice": {"token": "tls-alice"}}, {}))
    g = GatewayProcess(kaas[0].scheduler_address, str(path), "--tls-cert", str(cert),
                       "--tls-key", str(key))
    try:
        assert g.url.startswith("https://")
        g.ssl_context = ssl.create_default_context(cafile=str(cert))
        assert g.json("GET", "/v1/models", token="tls-alice") == (200, {"models": []})
        g.ssl_context = ssl.create_default_context()  # does not trust the certificate
        with pytest.raises(ssl.SSLError):
            g.request("GET", "/v2/health/live")
    finally:
        g.stop()


# -- hostile requests -------------------------------------------------------------------
def good_infer_body() -> dict:
    x = np.ones((8, 16), np.float32)
    return {"inputs": [{"name": "x", "datatype": "FP32", "shape": [8, 16],
                        "data": x.ravel().tolist()}]}


def binary_infer(extra_header: dict[str, str], tail: bytes = b"") -> tuple[bytes, dict]:
    head = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [8, 16],
                                   "parameters": {"binary_data_size": 512}}]}).encode()
    return head + b"\0" * 512 + tail, {"Inference-Header-Content-Length": str(len(head)),
                                       **extra_header}


HOSTILE = {
    "not json": b"{'inputs': ",
    "not utf-8": b'{"inputs": [{"name": "\xc3\x28"}]}',
    "deep nesting": b'{"inputs": ' + b"[" * 200_000 + b"]" * 200_000 + b"}",
    "wrong types": json.dumps({"inputs": [{"name": 1, "datatype": 2, "shape": "3"}]}).encode(),
    "huge shape": json.dumps({"inputs": [{"name": "x", "datatype": "FP32",
                                          "shape": [2**62, 2**62], "data": [1.0]}]}).encode(),
    "huge values": json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [8, 16],
                                           "data": [1e308] * 128}]}).encode(),
    "NaN literal": b'{"inputs": [{"name": "x", "datatype": "INT32", "shape": [8, 16], '
                   b'"data": [NaN]}]}',
    "const as input": json.dumps({"inputs": [
        {"name": "w", "datatype": "FP32", "shape": [16, 4], "data": [0.0] * 64}]}).encode(),
}


def test_lying_content_length(gw):
    """A Content-Length that is not a number is refused before any body."""
    with socket.create_connection((gw.host, gw.port), timeout=60) as sock:
        sock.sendall(b"POST /v2/models/layer/infer HTTP/1.1\r\nHost: x\r\nAuthorization: "
                     b"Bearer " + TOKENS["alice"].encode() + b"\r\nContent-Length: 12abc\r\n"
                     b"\r\n{}")
        reply = b""
        while b"\r\n\r\n" not in reply:
            chunk = sock.recv(4096)
            if not chunk:
                break
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 400")


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_malformed_infer_bodies_get_400_with_message(gw, case):
    register(gw, "alice", "layer", layer_graph(), {"w": W, "b": B})
    status, doc = gw.json("POST", "/v2/models/layer/infer", HOSTILE[case], TOKENS["alice"])
    assert status == 400 and isinstance(doc["error"], str) and doc["error"], doc


@pytest.mark.parametrize("value", ["100000", "-5", "abc", "0x10", " ", "1e3",
                                   "99999999999999999999"])
def test_lying_inference_header_length(gw, value):
    register(gw, "alice", "layer", layer_graph(), {"w": W, "b": B})
    body, headers = binary_infer({"Inference-Header-Content-Length": value})
    status, doc = gw.json("POST", "/v2/models/layer/infer", body, TOKENS["alice"], headers)
    assert status == 400 and "Inference-Header-Content-Length" in doc["error"], doc


def test_binary_body_checks(gw):
    register(gw, "alice", "layer", layer_graph(), {"w": W, "b": B})
    body, headers = binary_infer({})
    status, doc = gw.json("POST", "/v2/models/layer/infer", body, TOKENS["alice"], headers)
    assert status == 200 and np.array(doc["outputs"][0]["data"]).shape == (32,)
    body, headers = binary_infer({}, tail=b"extra")
    status, doc = gw.json("POST", "/v2/models/layer/infer", body, TOKENS["alice"], headers)
    assert status == 400 and "after the last binary tensor" in doc["error"]
    status, doc = gw.json("POST", "/v2/models/layer/infer", body[:-100], TOKENS["alice"],
                          headers)
    assert status == 400 and "ends early" in doc["error"]
    status, doc = gw.json("POST", "/v2/models/layer/infer", body, TOKENS["alice"],
                          {**headers, "Content-Encoding": "gzip"})
    assert status == 400 and "Content-Encoding" in doc["error"]


@pytest.mark.parametrize("path, status", [
    ("/v1/models/..", 400), ("/v1/models/%2e%2e", 400), ("/v1/models/a%2fb", 400),
    ("/v1/models/%ff%fe", 400), ("/v1/models/.hidden", 400), ("/v1/models/" + "a" * 65, 400),
    ("/v1/models/a%00b", 400), ("/v1/models/layer/consts/..", 400),
    ("/v2/models/..%2f..%2fetc/infer", 404), ("/v2/models/layer/versions/2", 404),
    ("/v2/nothing", 404), ("/../../etc/passwd", 404),
])
def test_bad_paths(gw, path, status):
    register(gw, "alice", "layer", layer_graph(), {"w": W, "b": B})
    method = ("PUT" if path.startswith("/v1/models/") else
              "POST" if path.endswith("/infer") else "GET")
    got, doc = gw.json(method, path, layer_graph().to_json().encode()
                       if method == "PUT" else None, TOKENS["alice"])
    assert got == status and doc["error"], (path, got, doc)


def test_bad_graph_documents_and_unready_model(gw):
    a = TOKENS["alice"]
    for body in (b"", b"\xff\xfe", b"[]", b'{"name": "x"}', b"[" * 100_000,
                 json.dumps({**json.loads(layer_graph().to_json()), "n_iter": 10**9}).encode()):
        status, doc = gw.json("PUT", "/v1/models/bad", body, a)
        assert status == 400 and doc["error"], body[:20]
    register(gw, "alice", "half", layer_graph(), {"w": W})  # b never uploaded
    status, doc = gw.json("GET", "/v2/models/half/ready", token=a)
    assert status == 400 and "'b'" in doc["error"]
    status, doc = gw.json("POST", "/v2/models/half/infer", good_infer_body(), a)
    assert status == 400 and "not uploaded" in doc["error"]
    for buf, body in (("x", W.tobytes()), ("nope", W.tobytes()), ("b", b"\0" * 3),
                      ("b", npy(np.zeros(4, np.float64)))):
        status, _, data = gw.request("PUT", f"/v1/models/half/consts/{buf}", body, a)
        assert status == 400 and json.loads(data)["error"], buf


def test_body_too_large_413(gw):
    a = TOKENS["alice"]
    big = b"\0" * (MAX_BODY + 1000)
    status, doc = gw.json("POST", "/v2/models/layer/infer", big, a)
    assert status == 413 and str(MAX_BODY) in doc["error"]
    status, doc = gw.json("PUT", "/v1/models/layer/consts/w", big, a)
    assert status == 413
    # chunked, without a Content-Length: counted as it arrives
    conn_status = _chunked_post(gw, "/v2/models/layer/infer", a, MAX_BODY + 1000)
    assert conn_status == 413
    # a Content-Length far over the limit is answered before any body is read
    with socket.create_connection((gw.host, gw.port), timeout=60) as sock:
        sock.sendall(b"PUT /v1/models/x HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                     + a.encode() + b"\r\nContent-Length: 1000000000000\r\n\r\n{}")
        reply = b""
        while b"\r\n\r\n" not in reply:
            reply += sock.recv(4096)
    assert reply.startswith(b"HTTP/1.1 413")


def _chunked_post(gw: GatewayProcess, path: str, token: str, size: int) -> int:
    import http.client

    conn = http.client.HTTPConnection(gw.host, gw.port, timeout=60)
    try:
        conn.putrequest("POST", path)
        conn.putheader("Authorization", f"Bearer {token}")
        conn.putheader("Transfer-Encoding", "chunked")
        conn.endheaders()
        chunk = b"\0" * 65536
        sent = 0
        while sent < size:
            conn.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            sent += len(chunk)
        conn.send(b"0\r\n\r\n")
        resp = conn.getresponse()
        assert "error" in json.loads(resp.read())
        return resp.status
    finally:
        conn.close()


# -- operators -------------------------------------------------------------------------
def test_operator_routes(gw, kaas):
    _, client = kaas
    status, doc = gw.json("PUT", "/v1/tenants/bob/weight", {"weight": 3.5}, OPS)
    assert status == 200 and doc == {"tenant": "bob", "weight": 3.5}
    assert client.kaas_stats()["weights"]["bob"] == 3.5
    for bad in ({"weight": -1}, {"weight": "2"}, {"weight": True}, {"w": 1}, [1],
                b'{"weight": NaN}', b'{"weight": Infinity}', {"weight": 1e300},
                {"weight": 1e-7}):
        assert gw.json("PUT", "/v1/tenants/bob/weight", bad, OPS)[0] == 400, bad
    # a refused weight leaves bob's as it was: his requests still run
    register(gw, "bob", "layer-b", layer_graph(), {"w": W, "b": B})
    infer(triton(gw), "bob", "layer-b", np.ones((8, 16), np.float32), True)
    assert client.kaas_stats()["weights"]["bob"] == 3.5
    assert gw.json("PUT", "/v1/tenants/mallory/weight", {"weight": 1}, OPS)[0] == 404
    status, doc = gw.json("PUT", "/v1/policy", {"policy": "balance"}, OPS)
    assert status == 200 and client.kaas_stats()["policy"] == "balance"
    assert gw.json("PUT", "/v1/policy", {"policy": "no-such-policy"}, OPS)[0] == 400
    assert gw.json("PUT", "/v1/policy", {"policy": 7}, OPS)[0] == 400
    assert gw.json("PUT", "/v1/policy", {"policy": "affinity"}, OPS)[0] == 200
    register(gw, "alice", "layer", layer_graph(), {"w": W, "b": B})
    infer(triton(gw), "alice", "layer", np.ones((8, 16), np.float32), True)
    used = sum(w["used_bytes"] for w in client.kaas_stats()["workers"].values())
    assert used > 0
    assert gw.request("POST", "/v1/caches/clear", token=OPS)[0] == 204
    assert sum(w["used_bytes"] for w in client.kaas_stats()["workers"].values()) == 0


def test_metrics_count_what_happened(gw):
    key = "dask_kaas_gateway_requests_total"
    register(gw, "alice", "layer", layer_graph(), {"w": W, "b": B})
    before = gw.metrics(OPS)
    c = triton(gw)
    for _ in range(3):
        infer(c, "alice", "layer", np.ones((8, 16), np.float32), True)
    for _ in range(2):
        gw.request("GET", "/v1/models", token="bad")
    gw.json("POST", "/v2/models/layer/infer", b"{", TOKENS["alice"])
    after = gw.metrics(OPS)

    def delta(**labels):
        k = (key, tuple(sorted(labels.items())))
        return after.get(k, 0) - before.get(k, 0)

    assert delta(tenant="alice", model="layer", status="200") == 3
    assert delta(tenant="-", model="-", status="401") == 2
    assert delta(tenant="alice", model="layer", status="400") == 1
    hist = ("dask_kaas_gateway_latency_seconds_count",
            (("model", "layer"), ("tenant", "alice")))
    assert after[hist] - before.get(hist, 0) == 3
    # a deleted model's series go with it (new names cannot grow the metrics)
    register(gw, "alice", "temp", layer_graph(), {"w": W, "b": B})
    infer(c, "alice", "temp", np.ones((8, 16), np.float32), True)
    assert any(dict(labels).get("model") == "temp" for _, labels in gw.metrics(OPS))
    assert gw.request("DELETE", "/v1/models/temp", token=TOKENS["alice"])[0] == 204
    assert not any(dict(labels).get("model") == "temp" for _, labels in gw.metrics(OPS))


# -- slow requests: 429, 504, disconnect ---------------------------------------------------
def _in_flight(gw, tenant):
    return gw.sample(OPS, "dask_kaas_gateway_in_flight", tenant=tenant)


def test_over_max_in_flight_429_with_retry_after(gw):
    register(gw, "carol", "slow", slow_graph(), {"w": WS})
    x = RNG.random((4, 512)).astype(np.float32)
    result = {}
    t = threading.Thread(target=lambda: result.update(
        y=infer(triton(gw), "carol", "slow", x, True)))
    t.start()
    try:
        gw.wait_for(lambda: _in_flight(gw, "carol") == 1, "carol's request in flight")
        status, headers, data = gw.request(
            "POST", "/v2/models/slow/infer",
            json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [4, 512],
                                    "data": x.ravel().tolist()}]}).encode(), TOKENS["carol"])
        assert status == 429 and int(headers["retry-after"]) >= 1
        assert "max_in_flight" in json.loads(data)["error"]
        # a const upload counts too, and a refused one changes nothing
        status, headers, _ = gw.request("PUT", "/v1/models/slow/consts/w",
                                        np.zeros_like(WS).tobytes(), TOKENS["carol"])
        assert status == 429 and "retry-after" in headers
    finally:
        t.join(120)
    np.testing.assert_allclose(result["y"], slow_ref(x), rtol=1e-4, atol=1e-6)


def test_past_the_request_timeout_504(gw):
    register(gw, "carol", "slow", slow_graph(), {"w": WS})
    before = gw.sample(OPS, "dask_kaas_gateway_requests_total", tenant="carol", model="slow",
                       status="504")
    with pytest.raises(InferenceServerException) as info:
        infer(triton(gw), "carol", "slow", np.ones((4, 512), np.float32), True,
              timeout=20_000)  # microseconds, as Triton's parameter
    assert info.value.status() == "504" and "within" in info.value.message()
    assert gw.sample(OPS, "dask_kaas_gateway_requests_total", tenant="carol", model="slow",
                     status="504") == before + 1
    gw.wait_for(lambda: _in_flight(gw, "carol") == 0, "carol's slot back")


def test_disconnect_cancels_the_request(gw, kaas):
    """A request whose caller hangs up while it waits behind another never
    runs: the gateway cancels its Dask future."""
    _, client = kaas
    register(gw, "dave", "slow", slow_graph(), {"w": WS})
    x = RNG.random((4, 512)).astype(np.float32)
    result = {}
    first = threading.Thread(target=lambda: result.update(
        y=infer(triton(gw), "dave", "slow", x, True)))
    first.start()
    gw.wait_for(lambda: _in_flight(gw, "dave") == 1, "dave's first request in flight")
    head = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [4, 512],
                                   "parameters": {"binary_data_size": x.nbytes}}]}).encode()
    body = head + x.tobytes()
    sock = socket.create_connection((gw.host, gw.port))
    sock.sendall(b"POST /v2/models/slow/infer HTTP/1.1\r\nHost: x\r\n"
                 b"Authorization: Bearer " + TOKENS["dave"].encode() + b"\r\n"
                 b"Inference-Header-Content-Length: %d\r\nContent-Length: %d\r\n\r\n"
                 % (len(head), len(body)) + body)
    gw.wait_for(lambda: _in_flight(gw, "dave") == 2, "dave's second request in flight")
    sock.close()
    gw.wait_for(lambda: gw.sample(OPS, "dask_kaas_gateway_requests_total", tenant="dave",
                                  model="slow", status="499") == 1,
                lambda: f"the 499; gateway log:\n{gw.log()[-3000:]}")
    first.join(120)
    np.testing.assert_allclose(result["y"], slow_ref(x), rtol=1e-4, atol=1e-6)

    def dave_tasks():
        return client.run_on_scheduler(
            lambda dask_scheduler: [str(k) for k in dask_scheduler.tasks
                                    if "dave/slow" in str(k)])

    gw.wait_for(lambda: not dave_tasks(), "dave's tasks released", timeout=60)
    assert client.kaas_stats()["tenants"]["dave"]["graphs_run"] == 1
    # abandoning requests (this one, the 504 before) leaves no error in the log
    assert "never retrieved" not in gw.log() and "Traceback" not in gw.log(), gw.log()


# -- the process: reload, second gateway, CLI ---------------------------------------------
def test_sighup_rereads_tenants_file_second_gateway(kaas, tmp_path):
    """A second gateway on the same cluster (through ``dask-kaas gateway``)."""
    cluster, _ = kaas
    path = tmp_path / "tenants.yaml"
    path.write_text(tenants_yaml({"erin": {"token": "erin-1"}, "frank": {"token": "frank-1"}},
                                 {"ops": OPS}))
    g = GatewayProcess(cluster.scheduler_address, str(path), module="dask_kaas.cli")
    try:
        register(g, "erin", "layer", layer_graph(), {"w": W, "b": B}, "erin-1")
        register(g, "frank", "m", layer_graph(), {}, "frank-1")
        # erin's token changes, frank leaves, gina arrives
        path.write_text(tenants_yaml({"erin": {"token": "erin-2"}, "gina": {"token": "gina-1"}},
                                     {"ops": OPS}))
        os.kill(g.proc.pid, signal.SIGHUP)
        g.wait_for(lambda: g.json("GET", "/v1/models", token="gina-1")[0] == 200, "reload")
        assert g.json("GET", "/v1/models", token="erin-1")[0] == 401
        assert g.json("GET", "/v1/models", token="frank-1")[0] == 401
        status, doc = g.json("GET", "/v1/models", token="erin-2")
        assert status == 200 and [m["name"] for m in doc["models"]] == ["layer"]
        x = RNG.standard_normal((8, 16)).astype(np.float32)
        c = tritonclient_http.InferenceServerClient(g.address)
        inp = tritonclient_http.InferInput("x", [8, 16], "FP32").set_data_from_numpy(x)
        y = c.infer("layer", [inp], headers={"Authorization": "Bearer erin-2"}).as_numpy("y")
        np.testing.assert_allclose(y, layer_ref(x), rtol=1e-5, atol=1e-6)
        # a broken file changes nothing
        path.write_bytes(b"tenants: {erin: \xff")
        os.kill(g.proc.pid, signal.SIGHUP)
        g.wait_for(lambda: "not reloaded" in g.log(), "the refused reload")
        assert g.json("GET", "/v1/models", token="gina-1")[0] == 200
        path.write_text(tenants_yaml({"erin": {"token": "erin-3"}}, {"ops": OPS}))
        os.kill(g.proc.pid, signal.SIGHUP)
        g.wait_for(lambda: g.json("GET", "/v1/models", token="erin-3")[0] == 200, "reload")
        assert g.json("GET", "/v1/models", token="gina-1")[0] == 401
    finally:
        g.stop()
    assert g.proc.returncode == 0


def test_cli_refuses_a_bad_tenants_file(tmp_path):
    import subprocess
    import sys

    path = tmp_path / "t.yaml"
    path.write_text("tenants: {alice: {token_sha256: nothex}}")
    proc = subprocess.run([sys.executable, "-m", "dask_kaas.gateway", "--scheduler",
                           "tcp://127.0.0.1:9", "--tenants", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "token_sha256" in proc.stderr
    path.write_text(tenants_yaml({"alice": {"token": "a"}}, {}))
    for flags in (["--max-body-size", "lots"], ["--request-timeout", "-5"],
                  ["--request-timeout", "nan"], ["--max-body-size", "0"],
                  ["--tls-cert", str(path)], ["--tls-cert", str(path), "--tls-key", str(path)]):
        proc = subprocess.run([sys.executable, "-m", "dask_kaas.gateway", "--scheduler",
                               "tcp://127.0.0.1:9", "--tenants", str(path), *flags],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and "dask-kaas gateway:" in proc.stderr, flags
