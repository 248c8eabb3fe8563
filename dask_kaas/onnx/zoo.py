"""Real architectures to test and benchmark with, without a download.

The ``onnx`` package ships the model-zoo graphs of nine classic CNNs as
``light_*.onnx``: their weights are replaced by ``ConstantOfShape`` nodes or
left as graph inputs.  :func:`light_model` gives such a model back with
seeded random initializers, scaled the way networks are initialised (He
for Conv/Gemm weights, near-identity normalisation) so that activations
stay finite through every layer.  :func:`bert_encoder` builds a BERT-style
encoder with ``onnx.helper`` (embedding Gather, attention with Softmax,
LayerNormalization, Gelu by Erf, shapes computed with Shape/Gather/Concat).
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from typing import Any

import numpy as np

LIGHT_MODELS = ("resnet50", "densenet121", "inception_v1", "inception_v2", "shufflenet",
                "squeezenet", "vgg19", "bvlc_alexnet", "zfnet512")


def light_path(name: str) -> str:
    import onnx

    if name not in LIGHT_MODELS:
        raise ValueError(f"unknown light model {name!r}; known: {', '.join(LIGHT_MODELS)}")
    return os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light",
                        f"light_{name}.onnx")


def _consumers(graph: Any) -> dict[str, list[tuple[Any, int]]]:
    uses: dict[str, list[tuple[Any, int]]] = defaultdict(list)
    for node in graph.node:
        for i, n in enumerate(node.input):
            uses[n].append((node, i))
    return uses


def _random_weight(name: str, shape: tuple[int, ...], uses: dict[str, list[tuple[Any, int]]],
                   rng: np.random.Generator) -> np.ndarray:
    """Values for a weight, by what reads it."""
    consumer = uses.get(name, [])
    while consumer and consumer[0][0].op_type == "Unsqueeze":
        consumer = uses.get(consumer[0][0].output[0], [])
    op, idx = (consumer[0][0].op_type, consumer[0][1]) if consumer else ("", -1)
    if op in ("Conv", "Gemm") and idx == 1:
        node = consumer[0][0]
        fan_in = math.prod(shape[1:])
        if op == "Gemm":
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            fan_in = shape[1] if trans_b else shape[0]
        return rng.standard_normal(shape) * math.sqrt(2.0 / max(fan_in, 1))
    if op == "BatchNormalization":
        if idx in (1, 4):  # scale, variance
            return rng.uniform(0.5, 1.5, shape)
        return rng.standard_normal(shape) * 0.1
    if op == "Mul":
        return rng.uniform(0.5, 1.5, shape)
    return rng.standard_normal(shape) * 0.05


def light_model(name: str, seed: int = 0) -> tuple[Any, str]:
    """(model, data input name): a light model with seeded random weights
    as initializers (every ConstantOfShape of a constant shape and every
    graph input besides the image becomes one)."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(light_path(name))
    g = m.graph
    rng = np.random.default_rng(seed)
    inits = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    uses = _consumers(g)
    data = next(i.name for i in g.input if i.name not in inits and
                [d.dim_value for d in i.type.tensor_type.shape.dim] == [1, 3, 224, 224])
    new_inits = []
    keep_nodes = []
    for node in g.node:
        if node.op_type == "ConstantOfShape" and node.input[0] in inits:
            shape = tuple(int(d) for d in inits[node.input[0]])
            w = _random_weight(node.output[0], shape, uses, rng).astype(np.float32)
            new_inits.append(numpy_helper.from_array(w, node.output[0]))
        else:
            keep_nodes.append(node)
    for vi in g.input:
        if vi.name == data or vi.name in inits:
            continue
        shape = tuple(d.dim_value for d in vi.type.tensor_type.shape.dim)
        w = _random_weight(vi.name, shape, uses, rng).astype(np.float32)
        new_inits.append(numpy_helper.from_array(w, vi.name))
    used = {n for node in keep_nodes for n in node.input}
    del g.node[:]
    g.node.extend(keep_nodes)
    old = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(old + new_inits)
    inputs = [vi for vi in g.input if vi.name == data]
    del g.input[:]
    g.input.extend(inputs)
    return m, data


def light_input(seed: int = 1, batch: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 3, 224, 224)).astype(np.float32)


def bert_encoder(*, layers: int = 2, hidden: int = 64, heads: int = 4, seq: int = 16,
                 vocab: int = 128, ffn: int = 256, seed: int = 0, opset: int = 17) -> Any:
    """A BERT-style encoder with a symbolic ``batch`` dimension.

    Inputs: ``input_ids`` int64 [batch, seq], ``attention_mask`` float32
    [batch, seq]; outputs ``last_hidden_state`` [batch, seq, hidden] and
    ``pooled`` [batch, hidden] (Tanh of a dense layer on the first token).
    """
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    head = hidden // heads
    nodes: list[Any] = []
    inits: list[Any] = []

    def const(name: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def weight(name: str, shape: tuple[int, ...], scale: float) -> str:
        return const(name, (rng.standard_normal(shape) * scale).astype(np.float32))

    def node(op: str, ins: list[str], out: str, **attrs: Any) -> str:
        nodes.append(helper.make_node(op, ins, [out], name=out, **attrs))
        return out

    def dense(x: str, n_in: int, n_out: int, prefix: str) -> str:
        w = weight(prefix + ".w", (n_in, n_out), 1 / math.sqrt(n_in))
        b = weight(prefix + ".b", (n_out,), 0.02)
        return node("Add", [node("MatMul", [x, w], prefix + ".mm"), b], prefix + ".out")

    def layer_norm(x: str, prefix: str) -> str:
        g = const(prefix + ".gamma", (1 + 0.1 * rng.standard_normal(hidden)).astype(np.float32))
        b = weight(prefix + ".beta", (hidden,), 0.02)
        return node("LayerNormalization", [x, g, b], prefix + ".out", axis=-1, epsilon=1e-12)

    # Shapes the way exporters write them: from Shape(input_ids) at run time.
    shape = node("Shape", ["input_ids"], "ids_shape")
    batch = node("Unsqueeze", [node("Gather", [shape, const("zero", np.array(0))], "batch"),
                               const("axes0", np.array([0]))], "batch_1d")
    heads_shape = node("Concat", [batch, const("s_h_d", np.array([seq, heads, head]))],
                       "heads_shape", axis=0)
    flat_shape = node("Concat", [batch, const("s_hidden", np.array([seq, hidden]))],
                      "flat_shape", axis=0)

    emb = node("Gather", [weight("word_emb", (vocab, hidden), 0.5), "input_ids"], "word")
    x = node("Add", [emb, weight("pos_emb", (seq, hidden), 0.5)], "embedded")
    x = layer_norm(x, "emb_ln")
    one = const("one", np.array(1.0, np.float32))
    mask = node("Mul", [node("Sub", [one, "attention_mask"], "inv_mask"),
                        const("neg", np.array(-10000.0, np.float32))], "mask_bias")
    mask = node("Unsqueeze", [mask, const("axes12", np.array([1, 2]))], "mask_4d")
    scale = const("scale", np.array(math.sqrt(head), np.float32))
    for i in range(layers):
        p = f"l{i}"

        def split_heads(t: str, perm: list[int], name: str) -> str:
            r = node("Reshape", [t, heads_shape], name + ".r")
            return node("Transpose", [r], name + ".t", perm=perm)

        q = split_heads(dense(x, hidden, hidden, p + ".q"), [0, 2, 1, 3], p + ".qh")
        k = split_heads(dense(x, hidden, hidden, p + ".k"), [0, 2, 3, 1], p + ".kh")
        v = split_heads(dense(x, hidden, hidden, p + ".v"), [0, 2, 1, 3], p + ".vh")
        s = node("Div", [node("MatMul", [q, k], p + ".qk"), scale], p + ".scores")
        s = node("Add", [s, mask], p + ".masked")
        a = node("Softmax", [s], p + ".probs", axis=-1)
        ctx = node("Transpose", [node("MatMul", [a, v], p + ".ctx")], p + ".ctx_t",
                   perm=[0, 2, 1, 3])
        ctx = node("Reshape", [ctx, flat_shape], p + ".ctx_flat")
        x = layer_norm(node("Add", [dense(ctx, hidden, hidden, p + ".o"), x], p + ".res1"),
                       p + ".ln1")
        h = dense(x, hidden, ffn, p + ".ffn1")
        erf = node("Erf", [node("Div", [h, const(p + ".sqrt2", np.array(math.sqrt(2),
                                                                     np.float32))],
                                p + ".h_scaled")], p + ".erf")
        gelu = node("Mul", [node("Mul", [h, node("Add", [erf, one], p + ".erf1")], p + ".hg"),
                            const(p + ".half", np.array(0.5, np.float32))], p + ".gelu")
        x = layer_norm(node("Add", [dense(gelu, ffn, hidden, p + ".ffn2"), x], p + ".res2"),
                       p + ".ln2")
    last = node("Identity", [x], "last_hidden_state")
    first = node("Gather", [last, const("zero_idx", np.array(0))], "first_token", axis=1)
    pooled = node("Tanh", [dense(first, hidden, hidden, "pool")], "pooled")
    graph = helper.make_graph(
        nodes, "bert_encoder",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", seq]),
         helper.make_tensor_value_info("attention_mask", TensorProto.FLOAT, ["batch", seq])],
        [helper.make_tensor_value_info(last, TensorProto.FLOAT, ["batch", seq, hidden]),
         helper.make_tensor_value_info(pooled, TensorProto.FLOAT, ["batch", hidden])],
        inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                             producer_name="dask_kaas.onnx.zoo")


def bert_inputs(batch: int, *, seq: int = 16, vocab: int = 128, seed: int = 1
                ) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    mask = np.ones((batch, seq), np.float32)
    mask[:, seq - seq // 4:] = 0  # padded tail
    return {"input_ids": rng.integers(0, vocab, (batch, seq)).astype(np.int64),
            "attention_mask": mask}
