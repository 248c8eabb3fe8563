"""The gateway's wire formats without a cluster: tenants file, KServe v2
bodies (JSON and binary tensors), const uploads and graph admission, each
fed hostile input.  Only GatewayError / TenantsFileError (KaasError
subclasses) may come out."""

from __future__ import annotations

import io
import json

import dask
import numpy as np
import pytest

from dask_kaas import In, Kernel, KernelGraph, Out
from dask_kaas.gateway.admission import admit_graph
from dask_kaas.gateway.errors import BadRequestError, GatewayError, TenantsFileError
from dask_kaas.gateway.kserve import decode_infer_request, encode_infer_response
from dask_kaas.gateway.registry import ModelRegistry, check_name
from dask_kaas.gateway.tenants import TenantBook, token_digest
from dask_kaas.gateway.tensors import const_from_body
from dask_kaas.graph.errors import KaasError
from dask_kaas.workloads.jacobi import jacobi_graph


def layer() -> KernelGraph:
    g = KernelGraph("alice/layer")
    x = g.input("x", (2, 3), np.float32)
    w = g.const("w", (3, 2), np.float32)
    n = g.input("n", (2,), np.int32)
    y = g.output("y", (2, 2), np.float32)
    m = g.output("m", (2,), np.int32)
    g.launch(Kernel.library("gemm"), [In(x), In(w), Out(y)])
    g.launch(Kernel.library("copy"), [In(n), Out(m)])
    return g


# -- tenants file ----------------------------------------------------------------
GOOD = f"""
tenants:
  alice: {{token_sha256: "{token_digest('a-token')}", weight: 2.0, max_in_flight: 3}}
  bob:   {{token_sha256: "{token_digest('b-token').upper()}"}}
operators:
  ops:   {{token_sha256: "{token_digest('o-token')}"}}
"""


def test_tenants_file_and_tokens():
    book = TenantBook.parse(GOOD)
    alice = book.authenticate("Bearer a-token")
    assert (alice.name, alice.role, alice.weight, alice.max_in_flight) == ("alice", "tenant",
                                                                           2.0, 3)
    bob = book.authenticate("bearer  b-token ")  # scheme is case-insensitive
    assert (bob.name, bob.weight, bob.max_in_flight) == ("bob", 1.0, 64)
    assert book.authenticate("Bearer o-token").is_operator
    for header in (None, "", "Bearer", "Bearer ", "Basic a-token", "a-token",
                   "Bearer a-token2", "Bearer " + token_digest("a-token"), "Bearer \xff\xfe"):
        assert book.authenticate(header) is None, header


def test_tenants_file_non_ascii_token():
    token = "clé-ü"
    book = TenantBook.parse(f"tenants: {{u: {{token_sha256: {token_digest(token)}}}}}")
    # Tornado hands header values over as latin-1 text of the raw UTF-8 bytes
    assert book.authenticate("Bearer " + token.encode().decode("latin-1")).name == "u"


@pytest.mark.parametrize("text", [
    "", "[]", "tenants: [alice]", "tenants: {alice: 3}", "nobody: {}",
    "tenants: {alice: {token_sha256: abc}}",
    "tenants: {alice: {token_sha256: 12}}",
    f"tenants: {{'../x': {{token_sha256: {'0' * 64}}}}}",
    f"tenants: {{'': {{token_sha256: {'0' * 64}}}}}",
    f"tenants: {{{'a' * 65}: {{token_sha256: {'0' * 64}}}}}",
    f"tenants: {{7: {{token_sha256: {'0' * 64}}}}}",
    f"tenants: {{a: {{token_sha256: {'0' * 64}, weight: true}}}}",
    f"tenants: {{a: {{token_sha256: {'0' * 64}, weight: .nan}}}}",
    f"tenants: {{a: {{token_sha256: {'0' * 64}, weight: .inf}}}}",
    f"tenants: {{a: {{token_sha256: {'0' * 64}, weight: -1}}}}",
    f"tenants: {{a: {{token_sha256: {'0' * 64}, weight: 1e300}}}}",
    f"tenants: {{a: {{token_sha256: {'0' * 64}, weight: '2'}}}}",
    f"tenants: {{a: {{token_sha256: {'0' * 64}, max_in_flight: 1.5}}}}",
    f"tenants: {{a: {{token_sha256: {'0' * 64}, max_in_flight: 0}}}}",
    f"tenants: {{a: {{token_sha256: {'0' * 64}, max_in_flight: {10 ** 30}}}}}",
    f"tenants: {{a: {{token_sha256: {'0' * 64}, admin: true}}}}",
    f"tenants: {{a: {{token_sha256: {'0' * 64}}}, b: {{token_sha256: {'0' * 64}}}}}",
    f"operators: {{o: {{token_sha256: {'0' * 64}, weight: 2}}}}",
    "tenants: {a: [" * 5000,
    "tenants: &x [*x]",
    "\t- bad: yaml: :",
    "x" * ((1 << 20) + 1),
])
def test_tenants_file_hostile(text):
    with pytest.raises(TenantsFileError) as info:
        TenantBook.parse(text)
    assert isinstance(info.value, KaasError) and str(info.value)


def test_tenants_file_not_utf8(tmp_path):
    p = tmp_path / "t.yaml"
    p.write_bytes(b"tenants:\n  \xff\xfe: {}\n")
    with pytest.raises(TenantsFileError, match="UTF-8"):
        TenantBook.load(p)
    with pytest.raises(TenantsFileError, match="cannot read"):
        TenantBook.load(tmp_path / "missing.yaml")


# -- KServe v2 requests ----------------------------------------------------------------
def infer_body(inputs, outputs=None, parameters=None, binary=()):
    doc = {"inputs": inputs}
    if outputs is not None:
        doc["outputs"] = outputs
    if parameters is not None:
        doc["parameters"] = parameters
    header = json.dumps(doc).encode()
    return header + b"".join(binary), (str(len(header)) if binary else None)


X = np.arange(6, dtype=np.float32).reshape(2, 3) / 7
N = np.array([-5, 2**31 - 1], np.int32)


def test_decode_json_flat_nested_and_binary():
    g = layer()
    body, hl = infer_body([
        {"name": "x", "datatype": "FP32", "shape": [2, 3], "data": X.ravel().tolist()},
        {"name": "n", "datatype": "INT32", "shape": [2], "data": N.tolist()}])
    req = decode_infer_request(body, hl, g)
    np.testing.assert_array_equal(req.inputs["x"], X)
    np.testing.assert_array_equal(req.inputs["n"], N)
    assert req.outputs == [("y", False), ("m", False)]
    body, hl = infer_body([
        {"name": "x", "datatype": "FP32", "shape": [2, 3], "data": X.tolist()},
        {"name": "n", "datatype": "INT32", "shape": [2],
         "parameters": {"binary_data_size": 8}}],
        outputs=[{"name": "m", "parameters": {"binary_data": True}}],
        parameters={"timeout": 250000, "custom": {"anything": [1]}},
        binary=[N.astype("<i4").tobytes()])
    req = decode_infer_request(body, hl, g)
    np.testing.assert_array_equal(req.inputs["x"], X)
    np.testing.assert_array_equal(req.inputs["n"], N)
    assert req.outputs == [("m", True)] and req.timeout_s == 0.25
    assert req.inputs["n"].dtype == np.int32 and req.inputs["n"].flags.writeable


def test_encode_binary_and_json_outputs_round_trip():
    g = layer()
    body, hl = infer_body(
        [{"name": "x", "datatype": "FP32", "shape": [2, 3], "data": X.ravel().tolist()},
         {"name": "n", "datatype": "INT32", "shape": [2], "data": N.tolist()}],
        outputs=[{"name": "y", "parameters": {"binary_data": True}},
                 {"name": "m", "parameters": {"binary_data": False}}])
    req = decode_infer_request(body, hl, g)
    y = np.array([[np.nan, np.inf], [-1.5, 3e38]], np.float32)
    payload, header_len = encode_infer_response(g, req, {"y": y, "m": N})
    head = json.loads(payload[:header_len])
    assert [o["name"] for o in head["outputs"]] == ["y", "m"]
    assert head["outputs"][0]["parameters"]["binary_data_size"] == 16
    np.testing.assert_array_equal(np.frombuffer(payload[header_len:], "<f4").reshape(2, 2), y)
    assert head["outputs"][1]["data"] == N.tolist()


BAD_INFER = {
    "not json": (b"{", None),
    "not utf-8": (b'{"inputs": "\xff\xfe"}', None),
    "deep nesting": (b"[" * 100_000 + b"]" * 100_000, None),
    "deep data": (json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 3],
                                          "data": [[[[[[[[[[[[1.0]]]]]]]]]]]]}]}).encode(), None),
    "array": (b"[]", None),
    "duplicate key": (b'{"inputs": [], "inputs": []}', None),
    "inputs not a list": (b'{"inputs": {"x": 1}}', None),
    "input not an object": (b'{"inputs": [7]}', None),
    "header length larger than body": (b'{"inputs": []}', "1000"),
    "header length negative": (b'{"inputs": []}', "-3"),
    "header length not a number": (b'{"inputs": []}', "12abc"),
    "header length huge": (b'{"inputs": []}', "9" * 40),
    "header length unicode digits": (b'{"inputs": []}', "\u0661\u0662"),
    "sequence": (b'{"inputs": [], "parameters": {"sequence_id": 3}}', None),
}


def tensor(**kw):
    t = {"name": "x", "datatype": "FP32", "shape": [2, 3], "data": X.ravel().tolist()}
    t.update(kw)
    return {k: v for k, v in t.items() if v is not DROP}


DROP = object()
N_OK = {"name": "n", "datatype": "INT32", "shape": [2], "data": [1, 2]}
BAD_TENSORS = {
    "missing input": [tensor()],
    "unknown input": [tensor(), N_OK, tensor(name="zz")],
    "const given as input": [tensor(), N_OK, tensor(name="w", shape=[3, 2])],
    "output given as input": [tensor(), N_OK, tensor(name="y", shape=[2, 2])],
    "input twice": [tensor(), tensor(), N_OK],
    "name not a string": [tensor(name=["x"]), N_OK],
    "wrong datatype": [tensor(datatype="FP64"), N_OK],
    "BYTES": [tensor(datatype="BYTES"), N_OK],
    "wrong shape": [tensor(shape=[3, 2]), N_OK],
    "huge shape": [tensor(shape=[10**30, 10**30]), N_OK],
    "negative shape": [tensor(shape=[-2, -3]), N_OK],
    "shape of strings": [tensor(shape=["2", "3"]), N_OK],
    "shape of bools": [tensor(shape=[True, True]), N_OK],
    "shape not a list": [tensor(shape="2,3"), N_OK],
    "too few values": [tensor(data=[1.0] * 5), N_OK],
    "too many values": [tensor(data=[1.0] * 7), N_OK],
    "ragged": [tensor(data=[[1.0, 2.0, 3.0], [1.0]]), N_OK],
    "strings": [tensor(data=["a"] * 6), N_OK],
    "nulls": [tensor(data=[None] * 6), N_OK],
    "objects": [tensor(data=[{}] * 6), N_OK],
    "data not a list": [tensor(data="123456"), N_OK],
    "too large for FP32": [tensor(data=[1e300] * 6), N_OK],
    "no data": [tensor(data=DROP), N_OK],
    "bools into FP32": [tensor(data=[True] * 6), N_OK],
    "float into INT32": [tensor(), dict(N_OK, data=[1.5, 2])],
    "int out of INT32 range": [tensor(), dict(N_OK, data=[2**31, 0])],
    "int beyond int64": [tensor(), dict(N_OK, data=[10**30, 0])],
    "binary size wrong": [tensor(data=DROP, parameters={"binary_data_size": 23}), N_OK],
    "binary size negative": [tensor(data=DROP, parameters={"binary_data_size": -24}), N_OK],
    "binary size string": [tensor(data=DROP, parameters={"binary_data_size": "24"}), N_OK],
    "binary size and data": [tensor(parameters={"binary_data_size": 24}), N_OK],
    "binary data missing": [tensor(data=DROP, parameters={"binary_data_size": 24}), N_OK],
    "parameters not an object": [tensor(parameters=[1]), N_OK],
    "shared memory": [tensor(data=DROP, parameters={"shared_memory_region": "r"}), N_OK],
}


@pytest.mark.parametrize("case", sorted(BAD_INFER) + sorted(BAD_TENSORS))
def test_decode_hostile(case):
    if case in BAD_INFER:
        body, hl = BAD_INFER[case]
    else:
        body, hl = infer_body(BAD_TENSORS[case])
    with pytest.raises(BadRequestError) as info:
        decode_infer_request(body, hl, layer())
    assert str(info.value)


@pytest.mark.parametrize("outputs, parameters", [
    ({"y": 1}, None), ([{"name": "x"}], None), ([{"name": "w"}], None),
    ([{"name": "y"}, {"name": "y"}], None), ([{"nam": "y"}], None),
    ([{"name": "y", "parameters": {"binary_data": "yes"}}], None),
    ([{"name": "y", "parameters": {"classification": 3}}], None),
    (None, {"binary_data_output": 1}), (None, {"timeout": -5}), (None, {"timeout": "5"}),
    (None, {"timeout": float("nan")}), (None, {"timeout": True}), (None, []),
    (None, None),
])
def test_decode_hostile_outputs_and_parameters(outputs, parameters):
    body, hl = infer_body([tensor(), N_OK], outputs=outputs, parameters=parameters)
    if outputs is None and parameters is None:  # the control case decodes
        assert decode_infer_request(body, hl, layer()).outputs == [("y", False), ("m", False)]
        return
    with pytest.raises(BadRequestError):
        decode_infer_request(body, hl, layer())


def test_decode_trailing_binary_and_id():
    body, _ = infer_body([tensor(), N_OK])
    with pytest.raises(BadRequestError, match="after the last binary tensor"):
        decode_infer_request(body + b"junk", str(len(body)), layer())
    for bad_id in (7, "x" * 300):
        b2, _ = infer_body([tensor(), N_OK])
        doc = json.loads(b2)
        doc["id"] = bad_id
        with pytest.raises(BadRequestError, match="id"):
            decode_infer_request(json.dumps(doc).encode(), None, layer())


def test_bool_tensor_binary_is_normalised():
    g = KernelGraph("t/b")
    a = g.input("a", (4,), np.bool_)
    o = g.output("o", (4,), np.bool_)
    g.launch(Kernel.library("copy"), [In(a), Out(o)])
    body, hl = infer_body([{"name": "a", "datatype": "BOOL", "shape": [4],
                            "parameters": {"binary_data_size": 4}}], binary=[b"\x00\x02\xff\x01"])
    np.testing.assert_array_equal(decode_infer_request(body, hl, g).inputs["a"],
                                  [False, True, True, True])
    body, hl = infer_body([{"name": "a", "datatype": "BOOL", "shape": [4], "data": [1, 0, 1, 0]}])
    with pytest.raises(BadRequestError, match="BOOL"):
        decode_infer_request(body, hl, g)


# -- const uploads -------------------------------------------------------------------
def npy(arr) -> bytes:
    f = io.BytesIO()
    np.save(f, arr)
    return f.getvalue()


def test_const_raw_and_npy():
    w = layer().buffers["w"]
    W = np.arange(6, dtype=np.float32).reshape(3, 2)
    np.testing.assert_array_equal(const_from_body(W.astype("<f4").tobytes(), None, w, "m"), W)
    np.testing.assert_array_equal(const_from_body(npy(W), "application/x-npy", w, "m"), W)
    big_endian = const_from_body(npy(W.astype(">f4")), None, w, "m")
    assert big_endian.dtype == np.float32 and (big_endian == W).all()
    fortran = const_from_body(npy(np.asfortranarray(W)), None, w, "m")
    assert fortran.flags.c_contiguous and (fortran == W).all()


@pytest.mark.parametrize("body, ctype", [
    (b"", None), (b"\x00" * 23, None), (b"\x00" * 25, None),
    (npy(np.zeros((2, 3), np.float32)), None), (npy(np.zeros((3, 2), np.float64)), None),
    (npy(np.zeros((3, 2), np.int32)), None), (npy(np.zeros((3, 2), object)), None),
    (npy(np.zeros((3, 2), np.float32))[:-4], None), (b"\x93NUMPY\x01\x00\xff\xff", None),
    (b"\x93NUMPY" + b"\xff" * 100, None), (b"\x00" * 24, "application/x-npy"),
])
def test_const_hostile(body, ctype):
    with pytest.raises(BadRequestError) as info:
        const_from_body(body, ctype, layer().buffers["w"], "alice/layer")
    assert "'w'" in str(info.value)


# -- graph admission and the registry ----------------------------------------------------
def test_admit_renames_and_refuses_python_functions():
    g = admit_graph(layer().to_json().encode(), "alice", "layer")
    assert g.name == "alice/layer" and g == layer()
    doc = jacobi_graph(8, 3).to_json().encode()
    with dask.config.set({"kaas.array-modules": []}):
        with pytest.raises(BadRequestError, match="kaas.array-modules"):
            admit_graph(doc, "alice", "jacobi")
    with dask.config.set({"kaas.array-modules": ["dask_kaas.workloads"]}):
        assert admit_graph(doc, "alice", "jacobi").launches[0].kernel.cpu is not None
        evil = json.loads(doc)
        evil["kernels"][0]["cpu"] = "os:system"
        with pytest.raises(BadRequestError, match="'os'"):
            admit_graph(json.dumps(evil).encode(), "alice", "jacobi")
        evil["kernels"][0]["cpu"] = "dask_kaas.workloadsX:f"  # a prefix is not a package
        with pytest.raises(BadRequestError, match="workloadsX"):
            admit_graph(json.dumps(evil).encode(), "alice", "jacobi")
        evil["kernels"][0] = {"kind": "array", "name": "f", "fn": ["os", "system"]}
        with pytest.raises(BadRequestError, match="string"):
            admit_graph(json.dumps(evil).encode(), "alice", "jacobi")


def test_admit_caps_n_iter():
    doc = json.loads(layer().to_json())
    doc["n_iter"] = 11
    with dask.config.set({"kaas.max-n-iter": 10}):
        with pytest.raises(BadRequestError, match="max-n-iter"):
            admit_graph(json.dumps(doc).encode(), "alice", "layer")


def complex_output_graph() -> bytes:
    g = KernelGraph("c")
    a = g.input("a", (2,), np.complex64)
    o = g.output("o", (2,), np.complex64)
    g.launch(Kernel.library("copy"), [In(a), Out(o)])
    return g.to_json().encode()


@pytest.mark.parametrize("body", [
    b"", b"null", b"[1]", b'"graph"', b"\xff\xfe{}", b"[" * 100_000, b'{"name": "a", "name": "b"}',
    b'{"format": "other/9"}', b'{"buffers": 5}', b'{"kernels": [{"kind": "array"}]}',
    b'{"name": "x", "buffers": [], "kernels": [], "launches": []}',
    complex_output_graph(),
    json.dumps({**json.loads(layer().to_json()), "n_iter": -1}).encode(),
    json.dumps({**json.loads(layer().to_json()), "n_iter": 10**40}).encode(),
    json.dumps({**json.loads(layer().to_json()), "buffers": [
        {"name": "x", "shape": [10**30], "dtype": "float32", "kind": "input"}]}).encode(),
])
def test_admit_hostile_documents(body):
    with pytest.raises(GatewayError) as info:
        admit_graph(body, "alice", "m")
    assert info.value.status == 400 and str(info.value)


@pytest.mark.parametrize("name", ["..", ".", "a/b", "", "-x", "a" * 65, "é", "a b", "a\x00",
                                  "%2e%2e", None, 3])
def test_bad_names(name):
    with pytest.raises(BadRequestError):
        check_name(name)


def test_registry_namespaces_and_bounds():
    reg = ModelRegistry(max_models=2, max_const_bytes=30)
    reg.put("alice", "m", layer())
    assert reg.put("bob", "m", layer()) is True
    assert reg.put("alice", "m", layer()) is False  # replaced
    reg.put("alice", "n", layer())
    with pytest.raises(BadRequestError, match="models"):
        reg.put("alice", "third", layer())
    reg.set_const("alice", "m", "w", np.zeros((3, 2), np.float32), "t")  # 24 bytes
    with pytest.raises(GatewayError) as info:
        reg.set_const("alice", "n", "w", np.zeros((3, 2), np.float32), "t")
    assert info.value.status == 413
    assert reg.get("alice", "m").ready and not reg.get("bob", "m").ready
    with pytest.raises(GatewayError) as info:
        reg.get("bob", "n")  # alice's
    assert info.value.status == 404
    with pytest.raises(BadRequestError):
        reg.set_const("alice", "m", "x", np.zeros((2, 3), np.float32), "t")  # an input
    assert reg.retain_tenants(["bob"]) == ["alice"]
    assert reg.list("alice") == [] and [m.name for m in reg.list("bob")] == ["m"]
