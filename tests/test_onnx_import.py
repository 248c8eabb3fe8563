"""The ONNX importer without a cluster: what a model becomes, what is
refused and how, the memory plan, and hostile input (only KaasErrors)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from dask_kaas.graph import (  # noqa: E402
    BufferKind,
    GraphError,
    In,
    KaasError,
    Kernel,
    KernelGraph,
    Out,
    SerializationError,
)
from dask_kaas.graph.memplan import plan_temps  # noqa: E402
from dask_kaas.onnx import (  # noqa: E402
    OnnxImportError,
    UnknownDimensionError,
    UnsupportedOperatorError,
    from_onnx,
    supported_operators,
)
from dask_kaas.onnx.zoo import LIGHT_MODELS, bert_encoder, light_model, light_path  # noqa: E402

ISSUE_OPERATORS = [
    "Conv", "Gemm", "MatMul", "Add", "Sub", "Mul", "Div", "Sum", "Pow", "Sqrt", "Exp", "Erf",
    "Relu", "Sigmoid", "Tanh", "Gelu", "Clip", "LeakyRelu", "Softmax", "LogSoftmax",
    "BatchNormalization", "LayerNormalization", "LRN", "MaxPool", "AveragePool",
    "GlobalAveragePool", "Concat", "Split", "Slice", "Reshape", "Flatten", "Transpose",
    "Squeeze", "Unsqueeze", "Gather", "Cast", "Where", "ReduceMean", "ReduceSum", "Identity",
    "Dropout", "Shape", "ConstantOfShape", "Constant"]


def conv_model(opset: int = 13, **conv_attrs) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "b")
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", **conv_attrs),
             helper.make_node("Relu", ["c"], ["y"], name="relu")]
    g = helper.make_graph(nodes, "convnet",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                         ["N", 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [w, b])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def one_node(op: str, inputs, outputs, opset: int = 17, inits=(), elem=TensorProto.FLOAT,
             shape=(2, 3), **attrs) -> onnx.ModelProto:
    node = helper.make_node(op, [i for i in inputs], outputs, name="the_node", **attrs)
    ins = [helper.make_tensor_value_info(i, elem, list(shape)) for i in inputs
           if i and i not in {t.name for t in inits}]
    g = helper.make_graph([node], "one", ins,
                          [helper.make_tensor_value_info(o, elem, None) for o in outputs],
                          list(inits))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def test_the_table_covers_the_issue_and_more_than_45_operators():
    ops = supported_operators()
    assert len(ops) >= 45
    assert not [op for op in ISSUE_OPERATORS if op not in ops]


def test_a_model_becomes_buffers_launches_and_consts():
    g, consts = from_onnx(conv_model(), batch=2)
    assert g.buffers["x"].kind == BufferKind.INPUT and g.buffers["x"].shape == (2, 3, 8, 8)
    assert g.buffers["w"].kind == BufferKind.CONST and g.buffers["b"].kind == BufferKind.CONST
    assert g.buffers["y"].kind == BufferKind.OUTPUT and g.buffers["y"].shape == (2, 4, 6, 6)
    # the Relu runs inside the Conv; the Conv's im2col columns are a planned temp
    assert [launch.kernel.name for launch in g.launches] == ["Conv"]
    assert "c" not in g.buffers
    (scratch,) = [b for b in g.buffers.values() if b.kind == BufferKind.TEMP]
    assert scratch.shape == (2, 3, 9, 6, 6)
    assert sorted(consts) == ["b", "w"]
    assert consts["w"].shape == (4, 3, 3, 3)
    # ModelProto, path and bytes give the same graph
    assert from_onnx(conv_model().SerializeToString(), batch=2)[0] == g


def test_model_from_a_path_and_the_classmethod(tmp_path):
    p = tmp_path / "m.onnx"
    onnx.save(conv_model(), str(p))
    g, _ = KernelGraph.from_onnx(p, batch={"N": 5})
    assert g.buffers["x"].shape == (5, 3, 8, 8)
    assert g.name == "convnet"
    assert KernelGraph.from_onnx(str(p), batch=1, name="mine")[0].name == "mine"


def test_attributes_round_trip_through_json_and_name_their_operator():
    g, _ = from_onnx(conv_model(pads=[1, 0, 1, 0], strides=[2, 1], group=1), batch=1)
    doc = g.to_json()
    assert "dask_kaas.onnx.kernels:Conv" in doc
    back = KernelGraph.from_json(doc)
    assert back == g
    conv = back.launches[0]
    lits = [int(a) for a in conv.args if isinstance(a, np.generic)]
    assert lits[:2] == [2, 1]  # the output and its im2col scratch, group 1
    assert lits[-1] == 1  # the fused Relu
    assert g.buffers["y"].shape == (1, 4, 4, 6)


def test_a_graph_document_reads_in_a_fresh_process_by_default_config(tmp_path):
    """kaas.array-modules lists dask_kaas.onnx by default: a process that
    never imported it reads an imported model's JSON."""
    g, _ = from_onnx(bert_encoder(layers=1), batch=2)
    p = tmp_path / "g.json"
    p.write_text(g.to_json())
    code = ("import sys; from dask_kaas.graph import KernelGraph; "
            f"g = KernelGraph.from_json(open({str(p)!r}).read()); "
            "print(len(g.launches), 'onnx' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True).stdout.split()
    assert out == [str(len(g.launches)), "False"]  # and onnx itself is not needed


def test_shape_arithmetic_is_folded_at_import():
    g, consts = from_onnx(bert_encoder(layers=1), batch=3)
    names = {launch.kernel.name for launch in g.launches}
    assert not names & {"Shape", "Concat", "ConstantOfShape"}  # all folded
    assert g.buffers["input_ids"].shape == (3, 16)
    assert g.buffers["last_hidden_state"].shape == (3, 16, 64)
    assert all(isinstance(v, np.ndarray) for v in consts.values())


def test_a_dimension_left_open_names_the_input():
    with pytest.raises(UnknownDimensionError, match=r"'x' dimension 0 \('N'\)"):
        from_onnx(conv_model())
    with pytest.raises(UnknownDimensionError, match="'input_ids'"):
        from_onnx(bert_encoder(layers=1), batch={"other": 2})


@pytest.mark.parametrize("batch", [0, -1, 2**40, 1.5, True, "2", [2], {"N": -3},
                                   {"N": "x"}, {3: 4}])
def test_bad_batch_values_are_refused(batch):
    with pytest.raises(OnnxImportError):
        from_onnx(conv_model(), batch=batch)


def test_unsupported_things_are_refused_naming_node_operator_and_what():
    m = one_node("NonMaxSuppression", ["a", "b"], ["y"])
    with pytest.raises(UnsupportedOperatorError,
                       match="node 'the_node', operator NonMaxSuppression: the operator is "
                             "not in the table"):
        from_onnx(m)
    with pytest.raises(UnsupportedOperatorError, match="BFLOAT16"):
        from_onnx(one_node("Relu", ["x"], ["y"], elem=TensorProto.BFLOAT16))
    with pytest.raises(UnsupportedOperatorError, match="opset 8"):
        from_onnx(one_node("Relu", ["x"], ["y"], opset=8))
    with pytest.raises(UnsupportedOperatorError, match="approximate="):
        from_onnx(one_node("Gelu", ["x"], ["y"], opset=20, approximate="cubic"))
    with pytest.raises(UnsupportedOperatorError, match="(?i)training_mode"):
        params = [numpy_helper.from_array(np.ones(3, np.float32), n) for n in "sbmv"]
        from_onnx(one_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"],
                           inits=params, training_mode=1))
    custom = one_node("Relu", ["x"], ["y"])
    custom.graph.node[0].domain = "com.example"
    custom.opset_import.append(helper.make_opsetid("com.example", 1))
    with pytest.raises(UnsupportedOperatorError, match="domain 'com.example'"):
        from_onnx(custom)
    # a shape that depends on a runtime value is refused, not guessed
    with pytest.raises(UnsupportedOperatorError, match="depends on runtime values"):
        m = one_node("Reshape", ["x", "s"], ["y"], shape=(6,))
        m.graph.input[1].type.tensor_type.elem_type = TensorProto.INT64
        m.graph.input[1].type.tensor_type.shape.dim[0].dim_value = 2
        from_onnx(m)
    with pytest.raises(UnsupportedOperatorError, match="MaxPool: 2 outputs"):
        from_onnx(one_node("MaxPool", ["x"], ["y", "i"], shape=(1, 1, 4, 4),
                           kernel_shape=[2, 2]))


def test_shape_inputs_given_as_initializers_are_read_at_import():
    shape = numpy_helper.from_array(np.array([3, -1], np.int64), "s")
    g, consts = from_onnx(one_node("Reshape", ["x", "s"], ["y"], inits=[shape], shape=(6, 2)))
    assert g.buffers["y"].shape == (3, 4)
    assert "s" not in consts  # a parameter, not a buffer


@pytest.mark.parametrize("model", [
    None, 42, 3.5, ["not", "a", "model"], {"graph": 1}, b"", b"\xff\xfe\x00garbage\x80",
    bytes(range(256)) * 10, "/no/such/file.onnx", "bad\x00path", "\udcff.onnx",
    bytearray(b"\x0a\x05hello"),
])
def test_hostile_models_give_only_kaas_errors(model):
    with pytest.raises(KaasError):
        from_onnx(model)


def _varint(n: int) -> bytes:
    out = b""
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out += bytes([byte | 0x80])
        else:
            return out + bytes([byte])


def _field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _nested_graphs(depth: int) -> bytes:
    """Protobuf bytes of a model whose graph nests a graph attribute
    ``depth`` levels deep (GraphProto.node -> NodeProto.attribute ->
    AttributeProto.g -> ...), written by hand: onnx.helper cannot."""
    graph = b""
    for _ in range(depth):
        graph = _field(1, _field(5, _field(6, graph)))
    return _field(7, graph)


def _nested_if(depth: int) -> bytes:
    leaf = g = helper.make_graph([], "leaf", [], [])
    for _ in range(depth):
        node = helper.make_node("If", ["c"], ["o"], then_branch=g, else_branch=leaf)
        g = helper.make_graph([node], "level", [], [])
    return helper.make_model(g).SerializeToString()


def test_deeply_nested_and_malformed_models():
    with pytest.raises(KaasError):
        from_onnx(_nested_graphs(10_000))
    with pytest.raises(UnsupportedOperatorError):  # parses, and If is not in the table
        from_onnx(_nested_if(3))
    good = conv_model().SerializeToString()
    for cut in (5, len(good) // 2, len(good) - 3):
        with pytest.raises(KaasError):
            from_onnx(good[:cut], batch=1)
    reads_nothing = one_node("Relu", ["x"], ["y"])
    reads_nothing.graph.node[0].input[0] = "nowhere"
    with pytest.raises(OnnxImportError, match="'nowhere'"):
        from_onnx(reads_nothing)
    twice = one_node("Relu", ["x"], ["x"])
    with pytest.raises(KaasError):
        from_onnx(twice)


def test_huge_declared_shapes_are_refused():
    with pytest.raises(GraphError):
        from_onnx(one_node("Relu", ["x"], ["y"], shape=(2**40, 2**40)))
    big = helper.make_node("ConstantOfShape", ["s"], ["y"], name="big")
    s = numpy_helper.from_array(np.array([10**6, 10**6], np.int64), "s")
    m = helper.make_model(helper.make_graph([big], "g", [], [
        helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [s]),
        opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(UnsupportedOperatorError, match="bytes"):
        from_onnx(m)
    lying = onnx.TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[2**30, 2**30],
                             raw_data=b"\0" * 4)
    m = one_node("Add", ["x", "w"], ["y"], inits=[lying])
    with pytest.raises(KaasError):
        from_onnx(m)


def test_an_output_that_is_a_constant_or_an_input_is_copied():
    c = helper.make_node("Constant", [], ["k"], value=numpy_helper.from_array(
        np.arange(3, dtype=np.float32)))
    m = helper.make_model(helper.make_graph(
        [c], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
        [helper.make_tensor_value_info("k", TensorProto.FLOAT, [3])]),
        opset_imports=[helper.make_opsetid("", 17)])
    g, consts = from_onnx(m)
    assert g.buffers["k"].kind == BufferKind.OUTPUT
    assert [launch.kernel.name for launch in g.launches] == ["Identity"]
    (value,) = consts.values()
    np.testing.assert_array_equal(value, np.arange(3, dtype=np.float32))


# -- the memory plan ------------------------------------------------------------------
def _check_plan(g: KernelGraph) -> None:
    plan = plan_temps(g)
    temps = [b for b in g.buffers.values() if b.kind == BufferKind.TEMP]
    live = {}
    for i, launch in enumerate(g.launches):
        for a in launch.buffer_args():
            lo, hi = live.get(a.buffer.name, (i, i))
            live[a.buffer.name] = (min(lo, i), max(hi, i))
    for x in temps:
        ox = plan.offsets[x.name]
        assert ox % 256 == 0 and ox + x.nbytes <= plan.arena_bytes
        for y in temps:
            if x is y or x.name not in live or y.name not in live:
                continue
            (a0, a1), (b0, b1) = live[x.name], live[y.name]
            if a0 <= b1 and b0 <= a1:  # live together: memory must not overlap
                oy = plan.offsets[y.name]
                assert ox + x.nbytes <= oy or oy + y.nbytes <= ox, (x.name, y.name)


@pytest.mark.parametrize("name", LIGHT_MODELS)
def test_memory_plan_of_each_light_model_is_sound(name):
    g, _ = from_onnx(light_path(name))
    _check_plan(g)
    d = g.describe()
    assert d["temp_peak_bytes"] <= d["temp_sum_bytes"]
    assert g.nbytes == sum(b.nbytes for b in g.buffers.values()
                           if b.kind != BufferKind.TEMP) + d["temp_peak_bytes"]
    print(f"{name}: temps {d['temp_sum_bytes'] / 2**20:.1f} MiB summed, "
          f"{d['temp_peak_bytes'] / 2**20:.1f} MiB planned ({d['temp_ratio']:.1%})")


def test_resnet50_imports_fast_with_temps_planned_below_40_percent():
    model, _ = light_model("resnet50")
    t0 = time.perf_counter()
    g, consts = from_onnx(model)
    took = time.perf_counter() - t0
    d = g.describe()
    print(f"ResNet-50 import {took:.3f} s, {len(g.launches)} launches, temps "
          f"{d['temp_sum_bytes'] / 2**20:.1f} -> {d['temp_peak_bytes'] / 2**20:.1f} MiB")
    assert d["temp_ratio"] <= 0.40
    assert d["kernels"]["Conv"] == 53
    assert sum(v.nbytes for v in consts.values()) > 90 * 2**20


def _fill(xp, y):
    y[...] = 7


def _half(xp, x, y):
    y[: y.shape[0] // 2] = x[: y.shape[0] // 2]


def test_plan_without_sharing_for_iterations_and_zeroing_for_partial_writers():
    g = KernelGraph("g")
    x = g.input("x", (64,), np.float32)
    t1 = g.temp("t1", (64,), np.float32)
    t2 = g.temp("t2", (64,), np.float32)
    t3 = g.temp("t3", (64,), np.float32)
    y = g.output("y", (64,), np.float32)
    g.launch(Kernel.array(_fill), [Out(t1)])
    g.launch(Kernel.library("copy"), [In(t1), Out(t2)])
    g.launch(Kernel.array(_half), [In(x), Out(t3)])
    g.launch(Kernel.library("add"), [In(t2), In(t3), Out(y)])
    plan = plan_temps(g)
    # t1 is dead once t2 is written: t3 takes its place, and is zeroed first
    assert plan.offsets["t3"] == plan.offsets["t1"]
    assert plan.zero_before == {2: ("t3",)}
    assert plan.arena_bytes == 2 * 256
    g2 = KernelGraph("g2", n_iter=3)
    a = g2.temp("a", (8,), np.float32)
    b = g2.temp("b", (8,), np.float32)
    g2.launch(Kernel.array(_fill), [Out(a)])
    g2.launch(Kernel.library("copy"), [In(a), Out(b)])
    plan2 = plan_temps(g2)
    assert plan2.arena_bytes == plan2.sum_bytes + 2 * (256 - 32) and not plan2.zero_before


def test_plan_is_recomputed_when_the_graph_grows():
    g = KernelGraph("g")
    t = g.temp("t", (10,), np.float64)
    g.launch(Kernel.array(_fill), [Out(t)])
    assert plan_temps(g).sum_bytes == 80
    u = g.temp("u", (10,), np.float64)
    g.launch(Kernel.library("copy"), [In(t), Out(u)])
    assert plan_temps(g).sum_bytes == 160


def test_json_of_an_onnx_graph_is_still_strict():
    g, _ = from_onnx(conv_model(), batch=1)
    doc = g.to_dict()
    doc["launches"][0]["args"][3]["literal"] = 1.5  # the output count as a float
    with pytest.raises(SerializationError):
        KernelGraph.from_dict(doc)


def test_conformance_module_needs_no_import_of_onnx_for_kernels():
    code = ("import sys, dask_kaas.onnx.kernels as k; "
            "print(len(k.KERNELS) > 100, 'onnx' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True, env={**os.environ}).stdout.split()
    assert out == ["True", "False"]


def test_conv_batchnorm_relu_fuse_into_one_launch_with_the_same_result():
    from dask_kaas.onnx.execute import run_graph

    ort = pytest.importorskip("onnxruntime")
    rng = np.random.default_rng(1)
    inits = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), n)
             for n, shape in (("w", (6, 3, 3, 3)), ("s", (6,)), ("bb", (6,)), ("m", (6,)))]
    inits.append(numpy_helper.from_array(rng.uniform(0.5, 2, 6).astype(np.float32), "v"))
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("BatchNormalization", ["c", "s", "bb", "m", "v"], ["n"],
                              epsilon=1e-3),
             helper.make_node("Relu", ["n"], ["y"]),
             helper.make_node("Sigmoid", ["c2"], ["z"]),
             helper.make_node("Conv", ["x", "w"], ["c2"])]  # read twice: not fused
    nodes = nodes[:3] + [nodes[4], nodes[3]]
    m = helper.make_model(helper.make_graph(
        nodes, "fuse", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 9, 9])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("c2", TensorProto.FLOAT, None)], inits),
        opset_imports=[helper.make_opsetid("", 15)])
    g, consts = from_onnx(m)
    assert [launch.kernel.name for launch in g.launches] == ["Conv", "Conv", "Sigmoid"]
    x = rng.standard_normal((2, 3, 9, 9)).astype(np.float32)
    got = run_graph(g, {**consts, "x": x})
    ref = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]
                               ).run(None, {"x": x})
    for name, r in zip(["y", "z", "c2"], ref):
        np.testing.assert_allclose(got[name], r, rtol=1e-4, atol=1e-5)


def test_graphs_of_one_model_at_several_batches_share_their_weights():
    """OnnxModel builds a graph per input shape; folded weights (here the
    BatchNormalization folded into the Conv) are computed once and are the
    same arrays in every graph, so the cluster holds one copy."""
    from dask_kaas.onnx.serve import OnnxModel

    rng = np.random.default_rng(2)
    inits = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), n)
             for n, shape in (("w", (4, 3, 3, 3)), ("s", (4,)), ("bb", (4,)), ("m", (4,)))]
    inits.append(numpy_helper.from_array(rng.uniform(0.5, 2, 4).astype(np.float32), "v"))
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]),
             helper.make_node("BatchNormalization", ["c", "s", "bb", "m", "v"], ["y"])]
    model = helper.make_model(helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits),
        opset_imports=[helper.make_opsetid("", 15)])
    m = OnnxModel(model, max_graphs=2)
    g1, c1 = m.graph_for({"x": (1, 3, 6, 6)})
    g2, c2 = m.graph_for({"x": (5, 3, 6, 6)})
    assert g1.buffers["y"].shape == (1, 4, 4, 4) and g2.buffers["y"].shape == (5, 4, 4, 4)
    assert c1.keys() == c2.keys() and len(c1) == 2  # W and B with the BatchNorm folded in
    assert all(c1[k] is c2[k] for k in c1)
    assert m.graph_for({"x": (1, 3, 6, 6)})[0] is g1  # cached
    m.graph_for({"x": (2, 3, 6, 6)})
    m.graph_for({"x": (3, 3, 6, 6)})
    assert len(m._graphs) == 2  # least recently used out
