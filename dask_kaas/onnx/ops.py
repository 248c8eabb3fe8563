"""The operator table: for each supported ONNX operator, its arithmetic
(:mod:`.compute`), how its attributes become launch literals, and which of
its inputs are parameters read at import rather than buffers.

One table serves both backends (the compute functions take ``xp``) and
import-time constant folding (the same functions run on NumPy).  Whatever
an encoder cannot map exactly (an attribute value, a runtime value where a
constant is needed, training mode) is refused with UnsupportedOperatorError.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import compute as ops_compute
from . import compute_data, compute_nn
from .attrs import Encoder
from .errors import UnsupportedOperatorError


@dataclass
class Value:
    """What the importer knows of a tensor: its shape and dtype, and its
    value when it is a constant at import."""

    shape: tuple[int, ...]
    dtype: np.dtype
    const: np.ndarray | None = None


@dataclass
class NodeCtx:
    """One node as its encoder sees it."""

    name: str
    op: str
    since: int
    attrs: dict[str, Any]
    ins: list[Value | None]
    outs: list[Value] = field(default_factory=list)

    def attr(self, key: str, default: Any = None) -> Any:
        return self.attrs.get(key, default)

    def fail(self, what: str) -> UnsupportedOperatorError:
        return UnsupportedOperatorError(what, node=self.name, op=self.op)

    def has(self, i: int) -> bool:
        return i < len(self.ins) and self.ins[i] is not None

    def const(self, i: int, what: str) -> np.ndarray | None:
        """Input ``i`` as a constant (None if absent); refused if it is only
        known at run time, since it decides shapes or attributes."""
        if not self.has(i):
            return None
        v = self.ins[i]
        assert v is not None
        if v.const is None:
            raise self.fail(f"input {i} ({what}) must be a constant at import (an "
                            "initializer or computed from constants), not a runtime value")
        return v.const

    @property
    def rank(self) -> int:
        v = self.ins[0]
        assert v is not None
        return len(v.shape)

    def axis(self, a: int, rank: int | None = None) -> int:
        r = self.rank if rank is None else rank
        if not -r <= a < max(r, 1):
            raise self.fail(f"axis {a} out of range for rank {r}")
        return a + r if a < 0 else a


Compute = Callable[[Any, Sequence[Any], Sequence[Any], Any], None]
Encode = Callable[[NodeCtx, Encoder], None]


def _nothing(ctx: NodeCtx, e: Encoder) -> None:
    return None


@dataclass(frozen=True)
class OpSpec:
    op: str
    compute: Compute | None
    encode: Encode = _nothing
    #: Input positions read at import (shapes, axes, pads), never buffers.
    params: Callable[[NodeCtx], Sequence[int]] = lambda ctx: ()
    #: Outputs beyond these counts are refused (training outputs, indices).
    max_outputs: int = 1
    #: Output shapes where ONNX's shape inference gives none.
    infer: Callable[[NodeCtx], list[Value]] | None = None


# -- encoders ---------------------------------------------------------------------
def _float_attrs(*spec: tuple[str, float]) -> Encode:
    def enc(ctx: NodeCtx, e: Encoder) -> None:
        for key, default in spec:
            e.float(ctx.attr(key, default))
    return enc


def _gelu(ctx: NodeCtx, e: Encoder) -> None:
    mode = ctx.attr("approximate", "none")
    if mode not in ("none", "tanh"):
        raise ctx.fail(f"approximate={mode!r} (none and tanh are supported)")
    e.int(mode == "tanh")


def _isinf(ctx: NodeCtx, e: Encoder) -> None:
    e.int(ctx.attr("detect_negative", 1)).int(ctx.attr("detect_positive", 1))


UNARY_ATTRS: dict[str, Encode] = {
    "LeakyRelu": _float_attrs(("alpha", 0.01)),
    "Elu": _float_attrs(("alpha", 1.0)),
    "Celu": _float_attrs(("alpha", 1.0)),
    "Selu": _float_attrs(("alpha", 1.67326319217681884765625),
                         ("gamma", 1.05070102214813232421875)),
    "HardSigmoid": _float_attrs(("alpha", 0.2), ("beta", 0.5)),
    "ThresholdedRelu": _float_attrs(("alpha", 1.0)),
    "Shrink": _float_attrs(("bias", 0.0), ("lambd", 0.5)),
    "Gelu": _gelu,
    "IsInf": _isinf,
}


def _mod(ctx: NodeCtx, e: Encoder) -> None:
    e.int(ctx.attr("fmod", 0))


def _clip(ctx: NodeCtx, e: Encoder) -> None:
    x = ctx.ins[0]
    assert x is not None
    if ctx.since < 11:
        lo, hi = ctx.attr("min"), ctx.attr("max")
    else:
        lo_a, hi_a = ctx.const(1, "min"), ctx.const(2, "max")
        lo = None if lo_a is None else lo_a.reshape(-1)[0].item()
        hi = None if hi_a is None else hi_a.reshape(-1)[0].item()
    e.int(lo is not None).scalar(x.dtype.type(0 if lo is None else lo))
    e.int(hi is not None).scalar(x.dtype.type(0 if hi is None else hi))


def _gemm(ctx: NodeCtx, e: Encoder) -> None:
    e.int(ctx.attr("transA", 0)).int(ctx.attr("transB", 0))
    e.float(ctx.attr("alpha", 1.0)).float(ctx.attr("beta", 1.0))


def _spatial(ctx: NodeCtx, ks: Sequence[int], out_sp: Sequence[int]
             ) -> tuple[list[int], list[int], list[int]]:
    """Explicit pads, strides and dilations of a Conv or pool."""
    x = ctx.ins[0]
    assert x is not None
    nd = len(ks)
    in_sp = x.shape[2:]
    strides = list(ctx.attr("strides", [1] * nd))
    dil = list(ctx.attr("dilations", [1] * nd))
    if len(strides) != nd or len(dil) != nd or len(in_sp) != nd:
        raise ctx.fail(f"strides {strides} / dilations {dil} do not match {nd} spatial axes")
    if any(s < 1 for s in strides) or any(d < 1 for d in dil):
        raise ctx.fail("strides and dilations must be positive")
    auto = ctx.attr("auto_pad", "NOTSET")
    if isinstance(auto, bytes):
        auto = auto.decode("utf-8", "replace")
    if auto == "NOTSET":
        pads = list(ctx.attr("pads", [0] * (2 * nd)))
        if len(pads) != 2 * nd or any(p < 0 for p in pads):
            raise ctx.fail(f"pads {pads} are not {2 * nd} non-negative ints")
    elif auto == "VALID":
        pads = [0] * (2 * nd)
    elif auto in ("SAME_UPPER", "SAME_LOWER"):
        begins, ends = [], []
        for n, k, s, d, o in zip(in_sp, ks, strides, dil, out_sp):
            total = max(0, (o - 1) * s + (k - 1) * d + 1 - n)
            small = total // 2
            big = total - small
            begins.append(small if auto == "SAME_UPPER" else big)
            ends.append(big if auto == "SAME_UPPER" else small)
        pads = begins + ends
    else:
        raise ctx.fail(f"auto_pad={auto!r}")
    return pads, strides, dil


def _conv(ctx: NodeCtx, e: Encoder) -> None:
    x, w = ctx.ins[0], ctx.ins[1]
    assert x is not None and w is not None
    group = ctx.attr("group", 1)
    ks = list(w.shape[2:])
    if "kernel_shape" in ctx.attrs and list(ctx.attrs["kernel_shape"]) != ks:
        raise ctx.fail(f"kernel_shape {ctx.attrs['kernel_shape']} differs from W's {ks}")
    if x.dtype != w.dtype:
        raise ctx.fail("X and W of different types")
    if group < 1 or x.shape[1] != w.shape[1] * group or w.shape[0] % group:
        raise ctx.fail(f"group={group} does not fit X {x.shape} and W {w.shape}")
    pads, strides, dil = _spatial(ctx, ks, ctx.outs[0].shape[2:])
    e.int(group).ints(pads).ints(strides).ints(dil)
    e.int(0)  # activation applied in place: 0 none, 1 Relu (fused at import)


def _pool(avg: bool) -> Encode:
    def enc(ctx: NodeCtx, e: Encoder) -> None:
        ks = list(ctx.attr("kernel_shape", []))
        if not ks or any(k < 1 for k in ks):
            raise ctx.fail(f"kernel_shape {ks}")
        pads, strides, dil = _spatial(ctx, ks, ctx.outs[0].shape[2:])
        spans = [(k - 1) * d + 1 for k, d in zip(ks, dil)]
        if any(p >= k for p, k in zip(pads, spans + spans)):
            raise ctx.fail(f"pads {pads} as large as the window {spans} (a window of "
                           "padding only)")
        e.ints(ks).ints(pads).ints(strides).ints(dil)
        if avg:
            e.int(ctx.attr("count_include_pad", 0))
    return enc


def _bn(ctx: NodeCtx, e: Encoder) -> None:
    if ctx.attr("training_mode", 0):
        raise ctx.fail("training_mode=1 (inference only)")
    e.float(ctx.attr("epsilon", 1e-5))


def _layer_norm(ctx: NodeCtx, e: Encoder) -> None:
    stash = ctx.attr("stash_type", 1)
    if stash not in (1, 11):
        raise ctx.fail(f"stash_type={stash}")
    e.int(ctx.axis(ctx.attr("axis", -1))).float(ctx.attr("epsilon", 1e-5)).int(stash == 1)


def _lrn(ctx: NodeCtx, e: Encoder) -> None:
    size = ctx.attr("size")
    if not isinstance(size, int) or size < 1:
        raise ctx.fail(f"size={size!r}")
    e.float(ctx.attr("alpha", 1e-4)).float(ctx.attr("beta", 0.75)).float(
        ctx.attr("bias", 1.0)).int(size)


def _softmax(ctx: NodeCtx, e: Encoder) -> None:
    legacy = ctx.since < 13
    axis = ctx.attr("axis", 1 if legacy else -1)
    e.int(legacy).int(ctx.axis(axis))


def _axis(key: str = "axis", default: int = 0) -> Encode:
    def enc(ctx: NodeCtx, e: Encoder) -> None:
        e.int(ctx.axis(ctx.attr(key, default)))
    return enc


def _concat(ctx: NodeCtx, e: Encoder) -> None:
    if "axis" not in ctx.attrs:
        raise ctx.fail("Concat without axis")
    e.int(ctx.axis(ctx.attrs["axis"]))


def _slice(ctx: NodeCtx, e: Encoder) -> None:
    x = ctx.ins[0]
    assert x is not None
    if ctx.since < 10:
        starts, ends = ctx.attr("starts"), ctx.attr("ends")
        axes, steps = ctx.attr("axes"), None
        if starts is None or ends is None:
            raise ctx.fail("Slice without starts/ends")
    else:
        starts = ctx.const(1, "starts")
        ends = ctx.const(2, "ends")
        axes = ctx.const(3, "axes")
        steps = ctx.const(4, "steps")
        starts, ends = [int(v) for v in starts.reshape(-1)], [int(v) for v in ends.reshape(-1)]
        axes = None if axes is None else [int(v) for v in axes.reshape(-1)]
        steps = None if steps is None else [int(v) for v in steps.reshape(-1)]
    starts, ends = list(starts), list(ends)
    axes = list(range(len(starts))) if axes is None else [ctx.axis(a) for a in axes]
    steps = [1] * len(starts) if steps is None else list(steps)
    if not len(starts) == len(ends) == len(axes) == len(steps) or len(set(axes)) != len(axes):
        raise ctx.fail("starts, ends, axes and steps of different lengths or repeated axes")
    e.int(len(axes))
    for axis, start, end, step in zip(axes, starts, ends, steps):
        dim = x.shape[axis]
        if step == 0:
            raise ctx.fail("a step of 0")
        start = start + dim if start < 0 else start
        end = end + dim if end < 0 else end
        if step > 0:
            start, end = min(max(start, 0), dim), min(max(end, 0), dim)
        else:
            start, end = min(max(start, 0), dim - 1), min(max(end, -1), dim - 1)
        e.int(axis).int(start).int(end).int(step)


def _transpose(ctx: NodeCtx, e: Encoder) -> None:
    r = ctx.rank
    perm = list(ctx.attr("perm", list(range(r))[::-1]))
    if sorted(perm) != list(range(r)):
        raise ctx.fail(f"perm {perm} is not a permutation of {r} axes")
    e.ints(perm)


def _dropout(ctx: NodeCtx, e: Encoder) -> None:
    if ctx.since >= 12 and ctx.has(2):
        mode = ctx.const(2, "training_mode")
        if mode is not None and bool(mode.reshape(-1)[0]):
            raise ctx.fail("training_mode=true (inference only)")


def _tile(ctx: NodeCtx, e: Encoder) -> None:
    reps = ctx.const(1, "repeats")
    assert reps is not None
    e.ints(int(v) for v in reps.reshape(-1))


def _pad(ctx: NodeCtx, e: Encoder) -> None:
    x = ctx.ins[0]
    assert x is not None
    r = len(x.shape)
    mode = ctx.attr("mode", "constant")
    if isinstance(mode, bytes):
        mode = mode.decode("utf-8", "replace")
    modes = ("constant", "reflect", "edge", "wrap")
    if mode not in modes:
        raise ctx.fail(f"mode={mode!r}")
    if ctx.since < 11:
        pads = list(ctx.attr("pads", []))
        value: Any = ctx.attr("value", 0.0)
        axes = list(range(r))
    else:
        p = ctx.const(1, "pads")
        assert p is not None
        pads = [int(v) for v in p.reshape(-1)]
        cv = ctx.const(2, "constant_value")
        value = 0 if cv is None or cv.size == 0 else cv.reshape(-1)[0].item()
        ax = ctx.const(3, "axes")
        axes = list(range(r)) if ax is None else [ctx.axis(int(a)) for a in ax.reshape(-1)]
    if len(pads) != 2 * len(axes):
        raise ctx.fail(f"{len(pads)} pads for {len(axes)} axes")
    full = [0] * (2 * r)
    for i, a in enumerate(axes):
        full[a], full[a + r] = pads[i], pads[i + len(axes)]
    if mode != "constant":
        for a in range(r):
            if (full[a] > 0 or full[a + r] > 0) and x.shape[a] == 0:
                raise ctx.fail(f"{mode} padding of an empty axis")
    e.int(modes.index(mode)).ints(full).scalar(x.dtype.type(value))


REDUCE_KIND = {"ReduceSum": "sum", "ReduceMean": "mean", "ReduceMax": "max",
               "ReduceMin": "min", "ReduceProd": "prod", "ReduceL1": "l1",
               "ReduceL2": "l2", "ReduceSumSquare": "sumsquare", "ReduceLogSum": "logsum",
               "ReduceLogSumExp": "logsumexp"}


def _axes_input_since(op: str) -> int:
    return 13 if op == "ReduceSum" else 18


def _reduce(ctx: NodeCtx, e: Encoder) -> None:
    x = ctx.ins[0]
    assert x is not None
    if ctx.since >= _axes_input_since(ctx.op):
        a = ctx.const(1, "axes")
        axes = [] if a is None else [int(v) for v in a.reshape(-1)]
        noop = ctx.attr("noop_with_empty_axes", 0)
    else:
        axes = list(ctx.attr("axes", []))
        noop = 0
    axes = sorted({ctx.axis(a) for a in axes})
    if not axes and noop:
        e.int(1).int(1).ints([])
        return
    reduced = axes or list(range(len(x.shape)))
    if REDUCE_KIND[ctx.op] in ("max", "min") and any(x.shape[a] == 0 for a in reduced):
        raise ctx.fail("a maximum or minimum over an empty set")
    e.int(0).int(ctx.attr("keepdims", 1)).ints(axes)


def _arg(ctx: NodeCtx, e: Encoder) -> None:
    x = ctx.ins[0]
    assert x is not None
    axis = ctx.axis(ctx.attr("axis", 0))
    if x.shape[axis] == 0:
        raise ctx.fail("an arg-maximum over an empty axis")
    e.int(axis).int(ctx.attr("keepdims", 1)).int(ctx.attr("select_last_index", 0))


def _cumsum(ctx: NodeCtx, e: Encoder) -> None:
    a = ctx.const(1, "axis")
    assert a is not None
    e.int(ctx.axis(int(a.reshape(-1)[0]))).int(ctx.attr("exclusive", 0)).int(
        ctx.attr("reverse", 0))


def _depth_to_space(ctx: NodeCtx, e: Encoder) -> None:
    mode = ctx.attr("mode", "DCR")
    if isinstance(mode, bytes):
        mode = mode.decode("utf-8", "replace")
    if mode not in ("DCR", "CRD"):
        raise ctx.fail(f"mode={mode!r}")
    e.int(ctx.attr("blocksize")).int(mode == "CRD")


def _trilu(ctx: NodeCtx, e: Encoder) -> None:
    k = ctx.const(1, "k")
    e.int(ctx.attr("upper", 1)).int(0 if k is None else int(k.reshape(-1)[0]))


def _feature_extractor_shape(ctx: NodeCtx) -> list[Value]:
    """ArrayFeatureExtractor's output: the indices replace the last axis (a
    1-D input gives one row), as onnxruntime computes it."""
    x, idx = ctx.ins[0], ctx.ins[1]
    if x is None or idx is None:
        raise ctx.fail("needs X and Y")
    k = int(np.prod(idx.shape))
    shape = (1, k) if len(x.shape) == 1 else tuple(x.shape[:-1]) + (k,)
    return [Value(shape, x.dtype)]


def _params(*idx: int, since: int = 0) -> Callable[[NodeCtx], Sequence[int]]:
    return lambda ctx: idx if ctx.since >= since else ()


def _build() -> dict[str, OpSpec]:
    table: dict[str, OpSpec] = {}

    def add(spec: OpSpec) -> None:
        table[spec.op] = spec

    for name in ops_compute.UNARY:
        if name == "Identity":
            continue
        add(OpSpec(name, ops_compute.unary(name), UNARY_ATTRS.get(name, _nothing)))
    for name in ops_compute.BINARY:
        add(OpSpec(name, ops_compute.binary(name)))
    add(OpSpec("Mod", ops_compute.mod, _mod))
    for name in ("Sum", "Mean", "Max", "Min"):
        add(OpSpec(name, ops_compute.variadic(name)))
    add(OpSpec("Where", ops_compute.where))
    add(OpSpec("Clip", ops_compute.clip, _clip, _params(1, 2, since=11)))
    add(OpSpec("Cast", ops_compute.cast))
    add(OpSpec("CastLike", ops_compute.cast, params=_params(1)))
    add(OpSpec("MatMul", compute_nn.matmul))
    add(OpSpec("Gemm", compute_nn.gemm, _gemm))
    add(OpSpec("Conv", compute_nn.conv, _conv))
    add(OpSpec("MaxPool", compute_nn.max_pool, _pool(False)))
    add(OpSpec("AveragePool", compute_nn.average_pool, _pool(True)))
    add(OpSpec("GlobalAveragePool", compute_nn.global_pool("avg")))
    add(OpSpec("GlobalMaxPool", compute_nn.global_pool("max")))
    add(OpSpec("BatchNormalization", compute_nn.batch_norm, _bn))
    add(OpSpec("InstanceNormalization", compute_nn.instance_norm, _float_attrs(("epsilon", 1e-5))))
    add(OpSpec("LayerNormalization", compute_nn.layer_norm, _layer_norm, max_outputs=3))
    add(OpSpec("LRN", compute_nn.lrn, _lrn))
    add(OpSpec("Softmax", compute_nn.softmax("soft"), _softmax))
    add(OpSpec("LogSoftmax", compute_nn.softmax("log"), _softmax))
    add(OpSpec("Hardmax", compute_nn.softmax("hard"), _softmax))
    add(OpSpec("Identity", compute_data.reshape))
    add(OpSpec("Reshape", compute_data.reshape, params=_params(1)))
    add(OpSpec("Flatten", compute_data.reshape))
    add(OpSpec("Squeeze", compute_data.reshape, params=_params(1, since=13)))
    add(OpSpec("Unsqueeze", compute_data.reshape, params=_params(1, since=13)))
    add(OpSpec("Dropout", compute_data.reshape, _dropout, _params(1, 2, since=12), max_outputs=2))
    add(OpSpec("Expand", compute_data.expand, params=_params(1)))
    add(OpSpec("Tile", compute_data.tile, _tile, _params(1)))
    add(OpSpec("Transpose", compute_data.transpose, _transpose))
    add(OpSpec("Concat", compute_data.concat, _concat))
    add(OpSpec("Split", compute_data.split, _axis(), _params(1, since=13), max_outputs=64))
    add(OpSpec("Slice", compute_data.slice_, _slice, _params(1, 2, 3, 4, since=10)))
    add(OpSpec("Gather", compute_data.gather, _axis()))
    add(OpSpec("GatherElements", compute_data.gather_elements, _axis()))
    add(OpSpec("Pad", compute_data.pad, _pad, _params(1, 2, 3, since=11)))
    for name, kind in REDUCE_KIND.items():
        add(OpSpec(name, compute_data.where_reduce(kind), _reduce,
                   _params(1, since=_axes_input_since(name))))
    add(OpSpec("ArgMax", compute_data.arg_reduce("max"), _arg))
    add(OpSpec("ArgMin", compute_data.arg_reduce("min"), _arg))
    add(OpSpec("CumSum", compute_data.cumsum, _cumsum, _params(1)))
    add(OpSpec("DepthToSpace", compute_data.depth_to_space, _depth_to_space))
    add(OpSpec("SpaceToDepth", compute_data.space_to_depth, _depth_to_space))
    add(OpSpec("Trilu", compute_data.einsum_free_trilu, _trilu, _params(1)))
    add(OpSpec("ArrayFeatureExtractor", compute_data.array_feature_extractor,
               infer=_feature_extractor_shape))  # ai.onnx.ml
    # Folded at import (their outputs are constants once shapes are fixed).
    for name in ("Shape", "Size", "Constant", "ConstantOfShape", "Range"):
        add(OpSpec(name, None))
    return table


OPS: dict[str, OpSpec] = _build()

#: Operators of another domain than the default ai.onnx one.
DOMAINS: dict[str, str] = {"ArrayFeatureExtractor": "ai.onnx.ml"}

#: Operators computed only at import: a runtime input makes them refused.
FOLD_ONLY = frozenset(k for k, v in OPS.items() if v.compute is None)
