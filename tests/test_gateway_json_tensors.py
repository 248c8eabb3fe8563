"""KServe v2 JSON tensors, exactly (issue 16, item 13).

Before: ``NaN``/``Infinity`` were accepted and written back as bare tokens,
FP16 ``70000`` became ``inf`` silently, INT8 accepted ``true``, and UINT64
values above 2**53 were refused as "non-integers".  Now each JSON element
must be exactly representable in the tensor's datatype, or the request is a
400 naming the tensor; the range properties are checked with hypothesis,
and the whole path through the real gateway at the end.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dask_kaas import KernelGraph
from dask_kaas.gateway.errors import BadRequestError
from dask_kaas.gateway.kserve import (
    decode_infer_request,
    encode_infer_response,
    loads_json,
)
from dask_kaas.gateway.tensors import DATATYPES

INTS = [name for name, dt in DATATYPES.items() if dt.kind in "iu"]
FLOATS = [name for name, dt in DATATYPES.items() if dt.kind == "f"]
SETTINGS = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


def one_input_graph(datatype: str, n: int) -> KernelGraph:
    g = KernelGraph("m")
    g.input("t", (n,), DATATYPES[datatype])
    g.output("o", (n,), DATATYPES[datatype])
    return g


def decode(datatype: str, values: list, raw: bytes | None = None):
    """The decoded tensor ``t`` (a 1-D input of the values' length)."""
    g = one_input_graph(datatype, len(values))
    body = raw if raw is not None else json.dumps(
        {"inputs": [{"name": "t", "datatype": datatype, "shape": [len(values)],
                     "data": values}]}).encode()
    return decode_infer_request(body, None, g).inputs["t"]


def refused(datatype: str, values: list, raw: bytes | None = None) -> BadRequestError:
    with pytest.raises(BadRequestError) as info:
        decode(datatype, values, raw)
    assert info.value.buffer == "t" and "'t'" in str(info.value), str(info.value)
    return info.value


def int_range(datatype: str) -> tuple[int, int]:
    info = np.iinfo(DATATYPES[datatype])
    return int(info.min), int(info.max)


# -- integers ---------------------------------------------------------------------------
@st.composite
def ints_in_range(draw):
    datatype = draw(st.sampled_from(INTS))
    lo, hi = int_range(datatype)
    edges = st.sampled_from([lo, hi, lo + 1, hi - 1, 0, 2**53 + 1 if hi > 2**53 else hi])
    values = draw(st.lists(st.one_of(st.integers(lo, hi), edges), min_size=1, max_size=12))
    return datatype, values


@SETTINGS
@given(ints_in_range())
def test_every_integer_in_range_is_exact(case):
    datatype, values = case
    arr = decode(datatype, values)
    assert arr.dtype == DATATYPES[datatype]
    assert [int(v) for v in arr.tolist()] == values  # exactly, UINT64 past 2**53 included


@st.composite
def one_int_out_of_range(draw):
    datatype = draw(st.sampled_from(INTS))
    lo, hi = int_range(datatype)
    bad = draw(st.one_of(st.integers(hi + 1, hi + 2**70), st.integers(lo - 2**70, lo - 1),
                         st.sampled_from([hi + 1, lo - 1, 10**300, -(10**300)])))
    values = draw(st.lists(st.integers(lo, hi), max_size=6))
    values.insert(draw(st.integers(0, len(values))), bad)
    return datatype, values


@SETTINGS
@given(one_int_out_of_range())
def test_an_integer_out_of_range_is_a_400_naming_the_tensor(case):
    datatype, values = case
    assert "out of range" in str(refused(datatype, values))


@SETTINGS
@given(st.sampled_from(INTS), st.lists(st.integers(0, 1), max_size=5),
       st.one_of(st.booleans(), st.floats(allow_nan=False, allow_infinity=False)))
def test_integers_take_no_booleans_and_no_floats(datatype, values, intruder):
    """``true`` is not 1 and ``2.0`` is not 2: the v2 JSON of an integer
    tensor is JSON integers."""
    refused(datatype, [*values, intruder])


def test_uint64_extremes_and_int64_extremes_exact():
    top = 2**64 - 1
    assert decode("UINT64", [top, 2**53 + 1, 0]).tolist() == [top, 2**53 + 1, 0]
    assert decode("INT64", [-(2**63), 2**63 - 1]).tolist() == [-(2**63), 2**63 - 1]
    refused("UINT64", [2**64])
    refused("UINT64", [-1])
    refused("INT8", [True])  # issue 16's example
    refused("INT8", [128])


# -- floats -----------------------------------------------------------------------------
def rounds_finite(value: float | int, datatype: str) -> bool:
    try:
        wide = float(value)
    except OverflowError:
        return False
    with np.errstate(over="ignore"):
        return bool(np.isfinite(np.float64(wide).astype(DATATYPES[datatype])))


@SETTINGS
@given(st.sampled_from(FLOATS),
       st.lists(st.one_of(st.floats(allow_nan=False, allow_infinity=False),
                          st.floats(-70000, 70000), st.integers(-(2**1100), 2**1100),
                          st.integers(-70000, 70000)), min_size=1, max_size=8))
def test_a_float_is_accepted_exactly_when_it_rounds_to_a_finite_value(datatype, values):
    if all(rounds_finite(v, datatype) for v in values):
        arr = decode(datatype, values)
        expected = np.array([float(v) for v in values]).astype(DATATYPES[datatype])
        np.testing.assert_array_equal(arr, expected)
    else:
        assert "out of range" in str(refused(datatype, values))


def test_fp16_edges():
    assert decode("FP16", [65504, -65504.0, 65519]).tolist() == [65504, -65504, 65504]
    assert "FP16" in str(refused("FP16", [70000]))  # issue 16's example: not inf
    refused("FP16", [65520])
    refused("FP32", [1e39])
    refused("FP64", [], raw=b'{"inputs": [{"name": "t", "datatype": "FP64", "shape": [1], '
                            b'"data": [1e400]}]}')
    refused("FP64", [2**1030])


@SETTINGS
@given(st.sampled_from(FLOATS + INTS + ["BOOL"]),
       st.sampled_from(["NaN", "Infinity", "-Infinity"]), st.integers(0, 3))
def test_nan_and_infinity_are_not_json(datatype, token, pos):
    values = ["0"] * 3 if datatype != "BOOL" else ["false"] * 3
    values.insert(pos, token)
    data = ", ".join(values)
    raw = ('{"inputs": [{"name": "t", "datatype": "' + datatype + '", "shape": [4], '
           '"data": [' + data + ']}]}').encode()
    err = refused(datatype, [0] * 4, raw=raw)
    assert "NaN or Infinity" in str(err)


def test_nan_anywhere_else_is_refused_too():
    g = one_input_graph("FP32", 1)
    for raw in (b'{"inputs": [{"name": "t", "datatype": "FP32", "shape": [1], "data": [1]}],'
                b' "parameters": {"timeout": NaN}}',
                b'{"id": Infinity, "inputs": []}'):
        with pytest.raises(BadRequestError):
            decode_infer_request(raw, None, g)
    for doc in (b'{"weight": NaN}', b'[-Infinity]'):
        with pytest.raises(BadRequestError, match="not JSON"):
            loads_json(doc, "the document")


@SETTINGS
@given(st.lists(st.integers(-3, 3), min_size=1, max_size=6))
def test_bool_takes_only_true_and_false(values):
    refused("BOOL", values)
    flags = [v > 0 for v in values]
    assert decode("BOOL", flags).tolist() == flags


@pytest.mark.parametrize("data", [["1"], [None], [{}], [[1]], [[[1]]], "1", {"a": 1}, 1])
def test_hostile_elements_are_refused(data):
    g = one_input_graph("INT32", 1)
    body = json.dumps({"inputs": [{"name": "t", "datatype": "INT32", "shape": [1],
                                   "data": data}]}).encode()
    with pytest.raises(BadRequestError) as info:
        decode_infer_request(body, None, g)
    assert info.value.buffer == "t"


def test_integers_with_more_digits_than_python_reads_are_a_400():
    raw = b'{"inputs": [{"name": "t", "datatype": "INT64", "shape": [1], "data": [' + \
        b"9" * 5000 + b"]}]}"
    with pytest.raises(BadRequestError):
        decode("INT64", [0], raw=raw)


def test_nested_and_flat_forms():
    g = KernelGraph("m")
    g.input("t", (2, 2), np.int16)
    g.output("o", (2, 2), np.int16)

    def body(data):
        return json.dumps({"inputs": [{"name": "t", "datatype": "INT16", "shape": [2, 2],
                                       "data": data}]}).encode()

    for data in ([1, 2, 3, 4], [[1, 2], [3, 4]]):
        assert decode_infer_request(body(data), None, g).inputs["t"].tolist() == [[1, 2], [3, 4]]
    for data in ([[1, 2], [3]], [[1, 2, 3], [4]], [1, 2, 3], [[1, 2], 3, 4], [[[1, 2]], [[3, 4]]]):
        with pytest.raises(BadRequestError):
            decode_infer_request(body(data), None, g)


def test_a_scalar_tensor_takes_one_value():
    g = KernelGraph("m")
    g.input("t", (), np.uint64)
    g.output("o", (), np.uint64)

    def body(data):
        return json.dumps({"inputs": [{"name": "t", "datatype": "UINT64", "shape": [],
                                       "data": data}]}).encode()

    arr = decode_infer_request(body([2**64 - 1]), None, g).inputs["t"]
    assert arr.shape == () and int(arr) == 2**64 - 1
    for data in ([], [1, 2], [[1]]):
        with pytest.raises(BadRequestError):
            decode_infer_request(body(data), None, g)


# -- outputs ----------------------------------------------------------------------------
def test_outputs_never_carry_nan_as_json_but_do_as_binary():
    g = one_input_graph("FP32", 3)
    for y in ([1.0, float("nan"), 2.0], [math.inf, 0, 1], [0, -math.inf, 1]):
        req = decode_infer_request(json.dumps({"inputs": [
            {"name": "t", "datatype": "FP32", "shape": [3], "data": [0, 0, 0]}]}).encode(),
            None, g)
        with pytest.raises(BadRequestError) as info:
            encode_infer_response(g, req, {"o": np.array(y, np.float32)})
        assert info.value.buffer == "o" and "binary" in str(info.value)
    req = decode_infer_request(json.dumps({
        "inputs": [{"name": "t", "datatype": "FP32", "shape": [3], "data": [0, 0, 0]}],
        "outputs": [{"name": "o", "parameters": {"binary_data": True}}]}).encode(), None, g)
    payload, n = encode_infer_response(g, req, {"o": np.array([np.nan, 1, 2], np.float32)})
    json.loads(payload[:n])  # strict JSON header
    assert np.isnan(np.frombuffer(payload[n:], "<f4")[0])


@SETTINGS
@given(st.sampled_from(FLOATS + INTS), st.data())
def test_json_outputs_round_trip_exactly(datatype, data):
    dt = DATATYPES[datatype]
    if dt.kind == "f":
        vals = data.draw(st.lists(st.floats(width=8 * dt.itemsize, allow_nan=False,
                                            allow_infinity=False), min_size=1, max_size=6))
    else:
        lo, hi = int_range(datatype)
        vals = data.draw(st.lists(st.integers(lo, hi), min_size=1, max_size=6))
    arr = np.array(vals, dt)
    g = one_input_graph(datatype, len(vals))
    req = decode_infer_request(json.dumps({"inputs": [
        {"name": "t", "datatype": datatype, "shape": [len(vals)],
         "data": arr.tolist()}]}).encode(), None, g)
    np.testing.assert_array_equal(req.inputs["t"], arr)
    payload, n = encode_infer_response(g, req, {"o": arr})
    out = json.loads(payload, parse_constant=lambda c: pytest.fail(f"bare {c} written"))
    np.testing.assert_array_equal(np.array(out["outputs"][0]["data"], dtype=dt), arr)


# -- through the real gateway -------------------------------------------------------------
def copy_graph() -> KernelGraph:
    from dask_kaas import In, Kernel, Out

    g = KernelGraph("copies")
    for name, dt in (("u", np.uint64), ("h", np.float16), ("b", np.int8), ("f", np.float32)):
        x = g.input(name, (3,), dt)
        y = g.output(f"{name}_out", (3,), dt)
        g.launch(Kernel.library("copy"), [In(x), Out(y)])
    return g


def test_through_the_gateway(tmp_path):
    """Exact values in and out of a real gateway; out-of-range values and
    NaN are a 400 naming the tensor, never a 500 or a silent inf."""
    from gateway_helpers import GatewayProcess, tenants_yaml

    from dask_kaas import LocalKaasCluster

    path = tmp_path / "t.yaml"
    path.write_text(tenants_yaml({"t": {"token": "tok"}}, {}))
    top = 2**64 - 1
    good = {"u": [top, 2**53 + 1, 0], "h": [65504, -0.5, 1], "b": [-128, 127, 0],
            "f": [1.5, -2, 3.25]}

    def body(**overrides):
        data = {**good, **overrides}
        types = {"u": "UINT64", "h": "FP16", "b": "INT8", "f": "FP32"}
        return json.dumps({"inputs": [{"name": n, "datatype": types[n], "shape": [3],
                                       "data": v} for n, v in data.items()]}).encode()

    with LocalKaasCluster(1, backend="cpu", dashboard_address="127.0.0.1:0",
                          device_memory_limit="64MB") as cluster:
        gw = GatewayProcess(cluster.scheduler_address, str(path))
        try:
            status, doc = gw.json("PUT", "/v1/models/copies", copy_graph().to_json().encode(),
                                  "tok")
            assert status == 201, doc
            status, doc = gw.json("POST", "/v2/models/copies/infer", body(), "tok")
            assert status == 200, doc
            out = {o["name"]: o["data"] for o in doc["outputs"]}
            assert out == {f"{n}_out": v for n, v in good.items()}  # UINT64 exact
            for overrides, tensor in (({"h": [70000, 0, 0]}, "h"), ({"b": [True, 0, 0]}, "b"),
                                      ({"u": [2**64, 0, 0]}, "u"), ({"u": [1.0, 0, 0]}, "u"),
                                      ({"f": [1e39, 0, 0]}, "f")):
                status, doc = gw.json("POST", "/v2/models/copies/infer", body(**overrides),
                                      "tok")
                assert status == 400 and f"buffer '{tensor}'" in doc["error"], doc
            raw = body().replace(b"[1.5, -2, 3.25]", b"[NaN, -Infinity, 1]")
            status, doc = gw.json("POST", "/v2/models/copies/infer", raw, "tok")
            assert status == 400 and "buffer 'f'" in doc["error"], doc
            # NaN computed (sent as binary data) cannot come back as JSON, only as binary
            nan = np.array([np.nan, 1, 2], "<f4").tobytes()
            doc = json.loads(body())
            doc["inputs"][3] = {"name": "f", "datatype": "FP32", "shape": [3],
                                "parameters": {"binary_data_size": 12}}
            for binary in (False, True):
                doc["outputs"] = [{"name": "f_out", "parameters": {"binary_data": binary}}]
                head = json.dumps(doc).encode()
                status, headers, data = gw.request(
                    "POST", "/v2/models/copies/infer", head + nan, "tok",
                    {"Inference-Header-Content-Length": str(len(head))})
                if binary:
                    n = int(headers["inference-header-content-length"])
                    assert status == 200 and np.isnan(np.frombuffer(data[n:], "<f4")[0])
                else:
                    assert status == 400 and b"f_out" in data and b"binary" in data, data
            assert "Traceback" not in gw.log(), gw.log()
        finally:
            gw.stop()
