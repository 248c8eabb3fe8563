"""ONNX models served through the gateway, as Triton serves them (issue 19).

A real LocalKaasCluster of two CPU workers, ``dask-kaas gateway`` as its own
process on 127.0.0.1 and the real ``tritonclient.http``: tenants upload
``.onnx`` files (an MLP and an embedding lookup made with ``onnx.helper``,
and the BERT-style encoder of the ONNX importer), read their KServe v2
metadata, call them at several batch sizes with binary and JSON tensors,
with dynamic batching off and on, and every answer is compared with
onnxruntime's.  Hostile uploads and requests get a 4xx, never a 500.
"""

from __future__ import annotations

import concurrent.futures
import json

import numpy as np
import onnx_gateway_models as models
import pytest
from gateway_helpers import GatewayProcess, tenants_yaml

from dask_kaas import LocalKaasCluster

tritonclient_http = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

TOKENS = {"alice": "alice-token", "bob": "bob-token"}
MAX_MODEL = 1 << 20
MLP = models.mlp()
RTOL, ATOL = 1e-3, 1e-4


def auth(tenant: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[tenant]}"}


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "tenants.yaml"
    path.write_text(tenants_yaml({t: {"token": tok, "max_in_flight": 64}
                                  for t, tok in TOKENS.items()}, {"op": "op-token"}))
    with LocalKaasCluster(2, backend="cpu", dashboard_address="127.0.0.1:0",
                          processes=True) as cluster:
        g = GatewayProcess(cluster.scheduler_address, str(path), "--request-timeout", "240s",
                           "--max-model-size", str(MAX_MODEL), "--max-batch-size", "32")
        try:
            yield g
        finally:
            g.stop()


def upload(gw: GatewayProcess, name: str, body: bytes, tenant: str = "alice",
           query: str = "", content_type: str | None = "application/onnx"
           ) -> tuple[int, object]:
    headers = {"Content-Type": content_type} if content_type else {}
    return gw.json("PUT", f"/v1/models/{name}{query}", body, TOKENS[tenant], headers)


def triton(gw: GatewayProcess):
    return tritonclient_http.InferenceServerClient(gw.address, network_timeout=120.0)


def infer_mlp(client, model: str, x: np.ndarray, binary: bool = True,
              tenant: str = "alice") -> np.ndarray:
    inp = tritonclient_http.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    out = tritonclient_http.InferRequestedOutput("y", binary_data=binary)
    return client.infer(model, [inp], outputs=[out], headers=auth(tenant)).as_numpy("y")


def xs(batch: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 16)).astype(np.float32)


# -- upload, metadata, variable batch ------------------------------------------------
def test_mlp_upload_metadata_and_batches_match_onnxruntime(gw):
    status, doc = upload(gw, "mlp", MLP)
    assert status == 201, doc
    assert doc["platform"] == "onnx" and doc["inputs"] == ["x"] and doc["outputs"] == ["y"]
    assert doc["batching"]["max_batch_size"] == 32
    assert doc["batching"]["dynamic_batching"] is False
    c = triton(gw)
    assert c.is_model_ready("mlp", headers=auth("alice"))
    meta = c.get_model_metadata("mlp", headers=auth("alice"))
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 16]}]
    assert meta["outputs"] == [{"name": "y", "datatype": "FP32", "shape": [-1, 8]}]
    for batch, binary in ((1, True), (3, False), (8, True), (1, False), (32, True)):
        x = xs(batch, batch)
        y = infer_mlp(c, "mlp", x, binary)
        assert y.shape == (batch, 8)
        np.testing.assert_allclose(y, models.ort_run(MLP, {"x": x})[0], rtol=RTOL, atol=ATOL)
    # a second call at a shape imports nothing more
    _, listing = gw.json("GET", "/v1/models", token=TOKENS["alice"])
    before = next(m for m in listing["models"] if m["name"] == "mlp")["imports"]
    infer_mlp(c, "mlp", xs(3, 9))
    _, listing = gw.json("GET", "/v1/models", token=TOKENS["alice"])
    entry = next(m for m in listing["models"] if m["name"] == "mlp")
    assert entry["imports"] == before and entry["consts"] == ["w1", "b1", "w2", "b2"]
    # over the batch limit: a 400 before anything is imported
    with pytest.raises(InferenceServerException) as info:
        infer_mlp(c, "mlp", xs(33, 1))
    assert info.value.status() == "400" and "batch" in info.value.message()


def test_recognised_by_content_and_other_tenant_sees_nothing(gw):
    status, doc = upload(gw, "sniffed", MLP, content_type=None)
    assert status == 201, doc
    assert doc["platform"] == "onnx"
    c = triton(gw)
    x = xs(2, 5)
    np.testing.assert_allclose(infer_mlp(c, "sniffed", x), models.ort_run(MLP, {"x": x})[0],
                               rtol=RTOL, atol=ATOL)
    # bob: not listed, no metadata, cannot call it (404: not disclosed)
    _, listing = gw.json("GET", "/v1/models", token=TOKENS["bob"])
    assert "sniffed" not in [m["name"] for m in listing["models"]]
    status, _ = gw.json("GET", "/v2/models/sniffed", token=TOKENS["bob"])
    assert status == 404
    with pytest.raises(InferenceServerException) as info:
        infer_mlp(c, "sniffed", x, tenant="bob")
    assert info.value.status() == "404"
    # bob uploads other weights under the same name: each gets its own answer
    other = models.mlp(seed=7)
    assert upload(gw, "sniffed", other, tenant="bob")[0] == 201
    np.testing.assert_allclose(infer_mlp(c, "sniffed", x, tenant="bob"),
                               models.ort_run(other, {"x": x})[0], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(infer_mlp(c, "sniffed", x), models.ort_run(MLP, {"x": x})[0],
                               rtol=RTOL, atol=ATOL)


def test_bert_encoder_two_inputs_and_outputs(gw):
    from dask_kaas.onnx.zoo import bert_encoder, bert_inputs

    model = bert_encoder().SerializeToString()
    status, doc = upload(gw, "bert", model, query="?dynamic_batching=true")
    assert status == 201, doc
    meta = triton(gw).get_model_metadata("bert", headers=auth("alice"))
    assert [i["shape"][0] for i in meta["inputs"] + meta["outputs"]] == [-1] * 4

    def call(batch: int, seed: int) -> None:
        c = triton(gw)  # one client per thread: tritonclient's is not thread-safe
        feed = bert_inputs(batch, seed=seed)
        ins = []
        for name, arr in feed.items():
            t = tritonclient_http.InferInput(name, list(arr.shape),
                                             "INT64" if arr.dtype == np.int64 else "FP32")
            t.set_data_from_numpy(arr, binary_data=seed % 2 == 0)
            ins.append(t)
        res = c.infer("bert", ins, headers=auth("alice"))
        want = models.ort_run(model, feed)
        for name, ref in zip(("last_hidden_state", "pooled"), want):
            np.testing.assert_allclose(res.as_numpy(name), ref, rtol=RTOL, atol=ATOL)

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda i: call(1 + i % 3, i), range(8)))


# -- dynamic batching ---------------------------------------------------------------
def test_dynamic_batching_stacks_requests_and_each_gets_its_rows(gw):
    status, doc = upload(gw, "mlpb", MLP, query="?dynamic_batching=true&max_batch_size=16"
                         "&max_queue_delay_us=200000&preferred_batch_size=8&instances=1")
    assert status == 201, doc
    assert doc["batching"]["dynamic_batching"] is True
    assert doc["batching"]["preferred_batch_size"] == [8]

    def call(i: int) -> tuple[np.ndarray, np.ndarray]:
        x = xs(1 + i % 3, 100 + i)
        return x, infer_mlp(triton(gw), "mlpb", x, binary=i % 2 == 0)

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        results = list(pool.map(call, range(24)))
    for x, y in results:
        np.testing.assert_allclose(y, models.ort_run(MLP, {"x": x})[0], rtol=RTOL, atol=ATOL)
    _, listing = gw.json("GET", "/v1/models", token=TOKENS["alice"])
    batching = next(m for m in listing["models"] if m["name"] == "mlpb")["batching"]
    rows = {int(k): v for k, v in batching["batch_rows"].items()}
    reqs = {int(k): v for k, v in batching["batch_requests"].items()}
    assert sum(k * v for k, v in rows.items()) == sum((1 + i % 3) for i in range(24))
    assert max(rows) <= 16
    assert max(reqs) > 1, f"no batch of several requests formed: {reqs}"


def test_a_bad_request_in_a_batch_fails_only_itself(gw):
    model = models.lookup()
    status, doc = upload(gw, "lookup", model, query="?dynamic_batching=true&max_batch_size=16"
                         "&max_queue_delay_us=300000&instances=1")
    assert status == 201, doc

    def call(i: int) -> tuple[np.ndarray, object]:
        ids = np.full((1, 4), i % 10, np.int64)
        if i == 3:
            ids[0, 2] = 1_000_000  # outside the table
        t = tritonclient_http.InferInput("ids", [1, 4], "INT64").set_data_from_numpy(ids)
        try:
            return ids, triton(gw).infer("lookup", [t], headers=auth("alice")).as_numpy("out")
        except InferenceServerException as e:
            return ids, e

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(call, range(8)))
    for i, (ids, out) in enumerate(results):
        if i == 3:
            assert isinstance(out, InferenceServerException), out
            assert out.status() is not None and 400 <= int(out.status()) < 500, out
        else:
            assert not isinstance(out, Exception), out
            np.testing.assert_allclose(out, models.ort_run(model, {"ids": ids})[0], rtol=RTOL)
    _, listing = gw.json("GET", "/v1/models", token=TOKENS["alice"])
    reqs = next(m for m in listing["models"] if m["name"] == "lookup")["batching"]
    assert max(int(k) for k in reqs["batch_requests"]) > 1, reqs


def test_batching_config_is_checked(gw):
    fixed = models.mlp(batch=4)
    status, doc = upload(gw, "fixed", fixed, query="?dynamic_batching=true")
    assert status == 400 and "symbolic first dimension" in doc["error"]
    for query in ("?max_batch_size=-1", "?max_batch_size=abc", "?dynamic_batching=maybe",
                  "?preferred_batch_size=64", "?instances=0", "?colour=red",
                  "?max_queue_delay_us=1e9", "?max_batch_size=%ff", "?%ff%fe=1",
                  "?max_batch_size=4&max_batch_size=5"):
        status, doc = upload(gw, "cfg", MLP, query=query)
        assert status == 400, (query, doc)
    # a fixed-shape model serves its one shape
    assert upload(gw, "fixed", fixed)[0] == 201
    x = xs(4, 3)
    np.testing.assert_allclose(infer_mlp(triton(gw), "fixed", x),
                               models.ort_run(fixed, {"x": x})[0], rtol=RTOL, atol=ATOL)
    assert triton(gw).get_model_metadata("fixed", headers=auth("alice"))["inputs"][0][
        "shape"] == [4, 16]


# -- refusals and hostile input ------------------------------------------------------
def test_refused_operator_is_a_400_naming_it(gw):
    status, doc = upload(gw, "einsum", models.refused("Einsum"))
    assert status == 400 and "Einsum" in doc["error"], doc
    status, _ = gw.json("GET", "/v2/models/einsum", token=TOKENS["alice"])
    assert status == 404


def test_oversized_model_is_a_413(gw):
    status, doc = upload(gw, "huge", models.big(MAX_MODEL + 4096))
    assert status == 413 and "max-model-size" in doc["error"], doc
    # a JSON graph document is still held to --max-body-size (64 MiB default) only
    status, doc = upload(gw, "huge", b"{" + b" " * 100 + b"}", content_type="application/json")
    assert status == 400, doc


def test_hostile_uploads_are_4xx(gw):
    bodies = {
        "not onnx": b"\x08this is not a protobuf at all \xff\xfe",
        "truncated": MLP[: len(MLP) // 2],
        "empty": b"",
        "zeros": b"\x00" * 64,
        "random": np.random.default_rng(0).bytes(4096),
    }
    for what, body in bodies.items():
        status, doc = upload(gw, "hostile", body)
        assert 400 <= status < 500, (what, status, doc)
    # non-UTF-8 bytes inside a tensor name of an otherwise valid model
    bad_name = MLP.replace(b"\x12\x01x", b"\x12\x01\xff").replace(b"\n\x01x", b"\n\x01\xff")
    status, doc = upload(gw, "hostile", bad_name)
    assert status < 500, doc
    # a model declaring an input of 2**40 x 16 floats: no request can fit it
    huge = models.mlp(batch=2**40)
    status, doc = upload(gw, "hugedims", huge)
    assert status in (201, 400), doc
    if status == 201:
        body = json.dumps({"inputs": [{"name": "x", "datatype": "FP32",
                                       "shape": [2**40, 16], "data": [0.0]}]}).encode()
        status, _, _ = gw.request("POST", "/v2/models/hugedims/infer", body, TOKENS["alice"])
        assert status == 400
    # an ONNX model cannot take per-const uploads
    status, _, _ = gw.request("PUT", "/v1/models/mlp/consts/w1", b"\0" * 16,
                              TOKENS["alice"])
    assert status == 400


def test_hostile_infer_requests_are_4xx(gw):
    if upload(gw, "mlp", MLP)[0] not in (200, 201):
        pytest.fail("upload")

    def post(doc: object, raw: bytes | None = None) -> int:
        body = raw if raw is not None else json.dumps(doc).encode()
        status, _, _ = gw.request("POST", "/v2/models/mlp/infer", body, TOKENS["alice"])
        return status

    def tensor(shape, datatype="FP32", data=None, name="x"):
        n = int(np.prod(shape)) if all(isinstance(d, int) and d >= 0 for d in shape) else 1
        return {"inputs": [{"name": name, "datatype": datatype, "shape": shape,
                            "data": data if data is not None else [0.0] * min(n, 64)}]}

    cases = {
        "huge batch": tensor([10**12, 16]),
        "huge over int64": tensor([2**70, 16]),
        "negative": tensor([-1, 16]),
        "zero": tensor([0, 16]),
        "wrong fixed dim": tensor([1, 17]),
        "wrong rank": tensor([16]),
        "float dim": tensor([1.5, 16]),
        "bool dim": tensor([True, 16]),
        "wrong datatype": tensor([1, 16], "FP64"),
        "string datatype": tensor([1, 16], "BYTES", ["a"] * 16),
        "unknown input": tensor([1, 16], name="z"),
        "too few values": tensor([2, 16], data=[0.0] * 3),
        "no inputs": {"inputs": []},
        "inputs not list": {"inputs": {"x": 1}},
        "not object": [1, 2],
    }
    for what, doc in cases.items():
        status = post(doc)
        assert 400 <= status < 500, (what, status)
    for raw in (b"\xff\xfe{\"inputs\": []}", b'{"inputs": [{"name": "\xff", "shape": [1]}]}',
                b"{", b""):
        status = post(None, raw)
        assert 400 <= status < 500, (raw, status)
    # the model still answers
    x = xs(2, 11)
    np.testing.assert_allclose(infer_mlp(triton(gw), "mlp", x),
                               models.ort_run(MLP, {"x": x})[0], rtol=RTOL, atol=ATOL)


def test_graphs_per_shape_are_bounded_least_recently_used_out():
    from dask_kaas.gateway.onnx_models import load_onnx

    served = load_onnx(MLP, "alice", "lru", {}, 32, max_graphs=2)
    assert served.imports == 1  # batch 1, at upload

    def shape(b: int) -> dict[str, tuple[int, ...]]:
        return {"x": (b, 16)}

    g2, consts2 = served.build(shape(2))
    assert served.imports == 2 and served.describe()["graphs_cached"] == 2
    assert served.build(shape(2))[0] is g2 and served.imports == 2  # a hit costs nothing
    served.build(shape(3))  # batch 1 is the least recently used: out
    assert served.imports == 3 and served.describe()["graphs_cached"] == 2
    assert served.cached(shape(1)) is None and served.cached(shape(2)) is not None
    served.build(shape(1))
    assert served.imports == 4
    # the weights are the same arrays at every batch, with one token each
    g3, consts3 = served.build(shape(3))
    assert all(consts3[n][0] is consts2[n][0] and consts3[n][1] == consts2[n][1]
               for n in ("w1", "b1", "w2", "b2"))
    assert g3.buffers["x"].shape == (3, 16) and g3.buffers["y"].shape == (3, 8)
