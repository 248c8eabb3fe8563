"""The operators' arithmetic, neural-network families: matrix products,
convolution (im2col plus one batched ``matmul``), pooling, normalisation and
softmax, written once against the array module ``xp`` (see
:mod:`.compute` for the conventions every function here follows).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .attrs import Attrs
from .compute import _chunks, _same, put


# -- linear algebra ---------------------------------------------------------------
def matmul(xp: Any, ins: Sequence[Any], outs: Sequence[Any], a: Attrs) -> None:
    x, w = ins
    out = outs[0]
    if x.dtype == w.dtype == out.dtype and out.ndim >= 2 and x.ndim >= 2 and w.ndim >= 2:
        xp.matmul(x, w, out=out)
    else:
        put(out, xp.matmul(x, w))


def gemm(xp: Any, ins: Sequence[Any], outs: Sequence[Any], a: Attrs) -> None:
    trans_a, trans_b, alpha, beta = a.int(), a.int(), a.float(), a.float()
    x, w = ins[0], ins[1]
    y = outs[0]
    x = x.T if trans_a else x
    w = w.T if trans_b else w
    if x.dtype == w.dtype == y.dtype:
        xp.matmul(x, w, out=y)
    else:
        put(y, xp.matmul(x, w))
    if alpha != 1.0:
        y *= _same(y, alpha)
    if len(ins) > 2 and beta != 0.0:
        c = ins[2]
        y += c if beta == 1.0 else c * _same(c, beta)


def _padded(xp: Any, x: Any, begins: Sequence[int], ends: Sequence[int], fill: Any) -> Any:
    """``x`` with its trailing ``len(begins)`` axes padded by ``fill``."""
    if not any(begins) and not any(ends):
        return x
    lead = x.ndim - len(begins)
    shape = x.shape[:lead] + tuple(n + b + e for n, b, e in zip(x.shape[lead:], begins, ends))
    out = xp.full(shape, fill, dtype=x.dtype)
    inner = (slice(None),) * lead + tuple(slice(b, b + n) for b, n in
                                          zip(begins, x.shape[lead:]))
    out[inner] = x
    return out


def _windows(ks: Sequence[int], strides: Sequence[int], dil: Sequence[int],
             osp: Sequence[int]) -> list[tuple[slice, ...]]:
    """The strided slices of a padded input, one per kernel offset."""
    return [tuple(slice(o * d, o * d + s * (n - 1) + 1, s)
                  for o, d, s, n in zip(off, dil, strides, osp))
            for off in itertools.product(*(range(k) for k in ks))]


def _im2col(x: Any, cols: Any, ks: Sequence[int], pads: Sequence[int],
            strides: Sequence[int], dil: Sequence[int]) -> None:
    """``cols[:, :, kidx, *o] = x_padded[:, :, o * stride + kidx * dilation]``
    without a padded copy of ``x``: each kernel offset copies the output
    positions whose input is inside ``x`` and zeroes the rest."""
    nd = len(ks)
    osp = cols.shape[3:]
    begins = pads[:nd]
    for kidx, off in enumerate(itertools.product(*(range(k) for k in ks))):
        dst: list[slice] = []
        src: list[slice] = []
        partial = False
        for o, d, s, n, b, size in zip(off, dil, strides, osp, begins, x.shape[2:]):
            # input index of output j is j * s + o * d - b: kept while in 0..size-1
            first = max(0, -((o * d - b) // s))
            last = min(n - 1, (size - 1 - o * d + b) // s)
            if last < first:
                partial = True
                dst.append(slice(0, 0))
                src.append(slice(0, 0))
                continue
            if first > 0 or last < n - 1:
                partial = True
            start = first * s + o * d - b
            dst.append(slice(first, last + 1))
            src.append(slice(start, start + (last - first) * s + 1, s))
        target = cols[:, :, kidx]
        if partial:
            target[...] = 0
        target[(slice(None), slice(None)) + tuple(dst)] = \
            x[(slice(None), slice(None)) + tuple(src)]


def conv(xp: Any, ins: Sequence[Any], outs: Sequence[Any], a: Attrs) -> None:
    group, pads, strides, dil, act = a.int(), a.ints(), a.ints(), a.ints(), a.int()
    x, w = ins[0], ins[1]
    _check_window(x, w.shape[2:], pads, strides, dil, pool=False)
    if group < 1 or x.shape[1] != w.shape[1] * group or w.shape[0] % group:
        raise ValueError(f"group {group} does not fit X {x.shape} and W {w.shape}")
    y = outs[0]
    nd = x.ndim - 2
    n, c = x.shape[:2]
    m = w.shape[0]
    ks = w.shape[2:]
    osp = y.shape[2:]
    k = math.prod(ks)
    length = math.prod(osp)
    if k == 1 and all(s == 1 for s in strides) and not any(pads):
        cols = x.reshape(n, c, 1, length)
    else:
        # im2col into the launch's scratch buffer (a temp of the graph, so
        # the memory plan accounts for it and no allocation happens here)
        shape = (n, c, k) + tuple(osp)
        cols = outs[1] if len(outs) > 1 else xp.empty(shape, dtype=x.dtype)
        _im2col(x, cols, ks, pads, strides, dil)
    cg, mg = c // group, m // group
    cols = cols.reshape(n, group, cg * k, length)
    wm = w.reshape(group, mg, cg * k)
    if y.flags.c_contiguous and w.dtype == x.dtype == y.dtype:
        xp.matmul(wm, cols, out=y.reshape(n, group, mg, length))
    else:
        put(y, xp.matmul(wm, cols).reshape(y.shape))
    if len(ins) > 2:
        y += ins[2].reshape((1, m) + (1,) * nd)
    if act == 1:  # a Relu fused at import: one pass, no buffer of its own
        xp.maximum(y, y.dtype.type(0), out=y)


def _pool_setup(xp: Any, x: Any, y: Any, a: Attrs, fill: Any
                ) -> tuple[Any, list[tuple[slice, ...]], list[int], list[int], list[int]]:
    ks, pads, strides, dil = a.ints(), a.ints(), a.ints(), a.ints()
    nd = len(ks)
    osp = y.shape[2:]
    _check_window(x, ks, pads, strides, dil)
    begins, ends = list(pads[:nd]), list(pads[nd:])
    extra = [max(0, (o - 1) * s + (k - 1) * d + 1 - (n + b + e)) for o, s, k, d, n, b, e in
             zip(osp, strides, ks, dil, x.shape[2:], begins, ends)]
    xpad = _padded(xp, x, begins, [e + ex for e, ex in zip(ends, extra)], fill)
    return xpad, _windows(ks, strides, dil, osp), begins, ends, extra


def _check_window(x: Any, ks: Sequence[int], pads: Sequence[int], strides: Sequence[int],
                  dil: Sequence[int], pool: bool = True) -> None:
    """Attribute literals that fit the input (the importer always writes
    such; a hand-written document must too): no window larger than the
    padded input, so the loops over a window stay as small as the input."""
    nd = x.ndim - 2
    if not (len(ks) == len(strides) == len(dil) == nd and len(pads) == 2 * nd):
        raise ValueError(f"window attributes for {len(ks)} axes, the input has {nd}")
    for i, (k, s, d, n) in enumerate(zip(ks, strides, dil, x.shape[2:])):
        b, e = pads[i], pads[i + nd]
        if k < 1 or s < 1 or d < 1 or b < 0 or e < 0 or (k - 1) * d + 1 > n + b + e \
                or (pool and (b >= (k - 1) * d + 1 or e >= (k - 1) * d + 1)):
            raise ValueError(f"window {k} (stride {s}, dilation {d}, pads {b}, {e}) does "
                             f"not fit an axis of {n}")


def _lowest(dt: np.dtype) -> Any:
    return dt.type(-np.inf) if dt.kind == "f" else np.iinfo(dt).min


def max_pool(xp: Any, ins: Sequence[Any], outs: Sequence[Any], a: Attrs) -> None:
    x, y = ins[0], outs[0]
    xpad, wins, *_ = _pool_setup(xp, x, y, a, _lowest(x.dtype))
    acc = None
    for sl in wins:
        v = xpad[(slice(None), slice(None)) + sl]
        acc = v.copy() if acc is None else xp.maximum(acc, v, out=acc)
    put(y, acc)


def average_pool(xp: Any, ins: Sequence[Any], outs: Sequence[Any], a: Attrs) -> None:
    x, y = ins[0], outs[0]
    zero = x.dtype.type(0)
    xpad, wins, begins, ends, extra = _pool_setup(xp, x, y, a, zero)
    include_pad = a.int()
    acc = None
    for sl in wins:
        v = xpad[(slice(None), slice(None)) + sl]
        acc = v.astype(x.dtype, copy=True) if acc is None else xp.add(acc, v, out=acc)
    # The divisor: how many elements of each window count (explicit pads do
    # under count_include_pad; the ceil_mode overhang never does).
    sp = x.shape[2:]
    ones = xp.ones((1, 1) + tuple(sp), dtype=x.dtype)
    if include_pad:
        ones = _padded(xp, ones, begins, ends, x.dtype.type(1))
        mask = _padded(xp, ones, [0] * len(sp), extra, zero)
    else:
        mask = _padded(xp, ones, begins, [e + ex for e, ex in zip(ends, extra)], zero)
    count = None
    for sl in wins:
        v = mask[(slice(None), slice(None)) + sl]
        count = v.copy() if count is None else count + v
    put(y, acc / count)


def global_pool(kind: str) -> Callable[..., None]:
    def compute(xp: Any, ins: Sequence[Any], outs: Sequence[Any], a: Attrs) -> None:
        x = ins[0]
        axes = tuple(range(2, x.ndim))
        r = xp.mean(x, axis=axes, keepdims=True) if kind == "avg" else \
            xp.amax(x, axis=axes, keepdims=True)
        put(outs[0], r.astype(x.dtype))

    return compute


# -- normalisation ------------------------------------------------------------------
def batch_norm(xp: Any, ins: Sequence[Any], outs: Sequence[Any], a: Attrs) -> None:
    eps = a.float()
    x, scale, bias, mean, var = ins
    shape = (1, x.shape[1]) + (1,) * (x.ndim - 2)
    mul = scale / xp.sqrt(var + _same(var, eps))
    add = bias - mean * mul
    r = x * mul.astype(x.dtype).reshape(shape)
    r += add.astype(x.dtype).reshape(shape)
    put(outs[0], r)


def instance_norm(xp: Any, ins: Sequence[Any], outs: Sequence[Any], a: Attrs) -> None:
    eps = a.float()
    x, scale, bias = ins
    axes = tuple(range(2, x.ndim))
    mean = xp.mean(x, axis=axes, keepdims=True)
    var = xp.mean((x - mean) ** 2, axis=axes, keepdims=True)
    shape = (1, x.shape[1]) + (1,) * (x.ndim - 2)
    r = (x - mean) / xp.sqrt(var + _same(x, eps)) * scale.reshape(shape) + bias.reshape(shape)
    put(outs[0], r.astype(x.dtype))


def layer_norm(xp: Any, ins: Sequence[Any], outs: Sequence[Any], a: Attrs) -> None:
    axis, eps, stash32 = a.int(), a.float(), a.int()
    x = ins[0]
    rows = math.prod(x.shape[:axis])
    width = math.prod(x.shape[axis:])
    if rows == 0 or width == 0 or not all(o.flags.c_contiguous for o in outs):
        _layer_norm_rows(xp, x, ins[1:], outs, axis, eps, stash32)
        return
    x2 = x.reshape((rows,) + x.shape[axis:])
    outs2 = [o.reshape((rows,) + o.shape[axis:]) for o in outs]
    for sl in _chunks(xp, rows, width):
        _layer_norm_rows(xp, x2[sl], ins[1:], [o[sl] for o in outs2], 1, eps, stash32)


def _layer_norm_rows(xp: Any, x: Any, params: Sequence[Any], outs: Sequence[Any],
                     axis: int, eps: float, stash32: int) -> None:
    xs = x.astype(np.float32) if stash32 and x.dtype != np.float64 else x
    axes = tuple(range(axis, x.ndim))
    mean = xp.mean(xs, axis=axes, keepdims=True)
    d = xs - mean
    var = xp.mean(d * d, axis=axes, keepdims=True)
    inv = _same(var, 1) / xp.sqrt(var + _same(var, eps))
    d *= inv
    r = d.astype(x.dtype)
    r *= params[0]
    if len(params) > 1:
        r += params[1]
    put(outs[0], r)
    if len(outs) > 1:
        put(outs[1], mean.astype(outs[1].dtype))
    if len(outs) > 2:
        put(outs[2], inv.astype(outs[2].dtype))


def lrn(xp: Any, ins: Sequence[Any], outs: Sequence[Any], a: Attrs) -> None:
    alpha, beta, bias, size = a.float(), a.float(), a.float(), a.int()
    x = ins[0]
    c = x.shape[1]
    if not 1 <= size <= 2 * c + 1:
        raise ValueError(f"LRN size {size} for {c} channels")
    lo = (size - 1) // 2
    hi = size - 1 - lo
    sq = x * x
    pad = xp.zeros((x.shape[0], c + size - 1) + x.shape[2:], dtype=x.dtype)
    pad[:, lo:lo + c] = sq
    s = pad[:, 0:c].copy()
    for j in range(1, size):
        s += pad[:, j:j + c]
    put(outs[0], x / (_same(x, bias) + _same(x, alpha / size) * s) ** _same(x, beta))
    del hi


def softmax(kind: str) -> Callable[..., None]:
    def compute(xp: Any, ins: Sequence[Any], outs: Sequence[Any], a: Attrs) -> None:
        legacy, axis = a.int(), a.int()
        x = ins[0]
        if legacy:
            x2 = x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))
            ax = 1
        else:
            x2, ax = x, axis
        if x2.size == 0:
            put(outs[0], x)
            return
        m = xp.amax(x2, axis=ax, keepdims=True)
        d = x2 - m
        if kind == "hard":  # one-hot of the first maximum (no put_along_axis: CuPy)
            idx = xp.expand_dims(xp.argmax(x2, axis=ax), ax)
            along = [1] * x2.ndim
            along[ax] = x2.shape[ax]
            r = (xp.arange(x2.shape[ax]).reshape(along) == idx).astype(x.dtype)
        else:
            e = xp.exp(d)
            s = xp.sum(e, axis=ax, keepdims=True)
            r = e / s if kind == "soft" else d - xp.log(s)
        put(outs[0], r.reshape(x.shape))

    return compute
