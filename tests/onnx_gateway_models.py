"""Small ONNX models for the gateway's ONNX tests and bench, made with
``onnx.helper`` (seeded weights, a symbolic ``batch`` first dimension)."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper


def mlp(n_in: int = 16, hidden: int = 32, n_out: int = 8, seed: int = 0,
        batch: str | int = "batch") -> bytes:
    """x [batch, n_in] -> Gemm -> Relu -> Gemm -> y [batch, n_out]."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array((rng.standard_normal((n_in, hidden)) * 0.3)
                                .astype(np.float32), "w1"),
        numpy_helper.from_array((rng.standard_normal(hidden) * 0.1).astype(np.float32), "b1"),
        numpy_helper.from_array((rng.standard_normal((hidden, n_out)) * 0.3)
                                .astype(np.float32), "w2"),
        numpy_helper.from_array((rng.standard_normal(n_out) * 0.1).astype(np.float32), "b2"),
    ]
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Gemm", ["r", "w2", "b2"], ["y"], name="fc2")]
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, n_in])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, n_out])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]
                             ).SerializeToString()


def lookup(rows: int = 10, width: int = 3, seed: int = 1) -> bytes:
    """ids int64 [batch, 4] -> Gather(table) -> out [batch, 4, width]: an id
    outside the table fails the request that sent it."""
    table = np.random.default_rng(seed).standard_normal((rows, width)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["out"], name="embed", axis=0)],
        "lookup", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 4])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 4, width])],
        [numpy_helper.from_array(table, "table")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]
                             ).SerializeToString()


def refused(op: str = "Einsum") -> bytes:
    """A model whose one node is an operator the table does not have."""
    graph = helper.make_graph(
        [helper.make_node(op, ["a", "b"], ["c"], name="contract", equation="ij,jk->ik")],
        "refused", [helper.make_tensor_value_info("a", TensorProto.FLOAT, [2, 3]),
                    helper.make_tensor_value_info("b", TensorProto.FLOAT, [3, 4])],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [2, 4])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]
                             ).SerializeToString()


def big(nbytes: int) -> bytes:
    """An Add of a constant of about ``nbytes`` bytes (for the size limit)."""
    n = max(nbytes // 4, 1)
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "c"], ["y"], name="add")], "big",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [n])],
        [numpy_helper.from_array(np.ones(n, np.float32), "c")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]
                             ).SerializeToString()


def ort_run(model: bytes, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    """onnxruntime's outputs (CPU, one thread)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
    return sess.run(None, feed)
