"""The operators' arithmetic, written once against the array module ``xp``.

Every function here is ``compute(xp, ins, outs, a)``: ``ins`` the input
arrays, ``outs`` the output arrays to fill (already of the shapes and dtypes
shape inference fixed at import), ``a`` the attribute literals
(:class:`~dask_kaas.onnx.attrs.Attrs`).  Only operations NumPy and CuPy both
have are used (no SciPy, no stride tricks): Conv is im2col by strided slices
plus one batched ``matmul`` (cuBLAS on CuPy), pooling is a maximum or sum
over the window's strided slices, erf is a rational approximation.

A result is written with :func:`put`, which refuses a result whose shape
differs from its output instead of broadcasting it silently: a kernel bug
becomes an error, never a wrong answer.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .attrs import Attrs


def put(out: Any, r: Any) -> None:
    shape = tuple(getattr(r, "shape", ()))
    if shape != tuple(out.shape):
        raise ValueError(f"operator result has shape {shape}, its output {tuple(out.shape)}")
    rk = np.dtype(getattr(r, "dtype", out.dtype)).kind
    if rk != out.dtype.kind and not (rk in "iu" and out.dtype.kind in "iu"):
        raise ValueError(f"operator result has dtype {r.dtype}, its output {out.dtype}")
    out[...] = r


def _same(x: Any, v: float) -> Any:
    """A scalar in ``x``'s dtype (float16 stays float16)."""
    return x.dtype.type(v)


# -- erf: |x| < 0.5 by its Taylor series, else 1 - erfc by the Chebyshev
#    fit of Press et al. (fractional error below 1.2e-7); float64 inside.
_ERFC = (-1.26551223, 1.00002368, 0.37409196, 0.09678418, -0.18628806, 0.27886807,
         -1.13520398, 1.48851587, -0.82215223, 0.17087277)


def erf(xp: Any, x: Any) -> Any:
    """erf in the input's precision (float64 for float64, float32 else),
    with operations in place: it is the Gelu of every transformer layer."""
    wide = np.float64 if x.dtype == np.float64 else np.float32
    z = xp.abs(x).astype(wide)
    # Past 4 (float32) or 6 (float64) erf rounds to 1: clamping keeps exp()
    # out of subnormal numbers, which cost a hundred times more.
    z = xp.minimum(z, wide(6 if wide is np.float64 else 4), out=z)
    t = z * wide(0.5)
    t += wide(1)
    xp.reciprocal(t, out=t)
    poly = t * wide(_ERFC[-1])
    for c in reversed(_ERFC[1:-1]):
        poly += wide(c)
        poly *= t
    poly += wide(_ERFC[0])
    poly -= z * z
    xp.exp(poly, out=poly)
    poly *= t
    r = wide(1) - poly  # 1 - erfc(|x|)
    # Near 0, 1 - erfc loses the relative precision: there, the Taylor series
    # (|x| < 0.5: 6 terms reach float32's precision, 9 float64's), in Horner
    # form on x**2 so that no term of a tiny x becomes subnormal.
    zs = xp.minimum(z, wide(0.5))
    z2 = zs * zs
    z2 *= wide(-1)
    terms = 10 if wide is np.float64 else 7
    acc = xp.full(z.shape, wide(1 / (math.factorial(terms - 1) * (2 * terms - 1))), wide)
    for n in range(terms - 2, -1, -1):
        acc *= z2
        acc += wide(1 / (math.factorial(n) * (2 * n + 1)))
    acc *= zs
    acc *= wide(2.0 / math.sqrt(math.pi))
    r = xp.where(z < wide(0.5), acc, r)
    r *= xp.sign(x).astype(wide)
    return r.astype(x.dtype)


# -- elementwise -----------------------------------------------------------------
def _sigmoid(xp: Any, x: Any) -> Any:
    e = xp.exp(-xp.abs(x))
    one = _same(x, 1)
    return xp.where(x >= 0, one / (one + e), e / (one + e))


def _softplus(xp: Any, x: Any) -> Any:
    return xp.logaddexp(_same(x, 0), x)


UNARY: dict[str, Callable[[Any, Any, Attrs], Any]] = {
    "Relu": lambda xp, x, a: xp.maximum(x, _same(x, 0)),
    "Sigmoid": lambda xp, x, a: _sigmoid(xp, x),
    "Tanh": lambda xp, x, a: xp.tanh(x),
    "Exp": lambda xp, x, a: xp.exp(x),
    "Log": lambda xp, x, a: xp.log(x),
    "Sqrt": lambda xp, x, a: xp.sqrt(x),
    "Abs": lambda xp, x, a: xp.abs(x),
    "Neg": lambda xp, x, a: xp.negative(x),
    "Reciprocal": lambda xp, x, a: _same(x, 1) / x,
    "Floor": lambda xp, x, a: xp.floor(x),
    "Ceil": lambda xp, x, a: xp.ceil(x),
    "Round": lambda xp, x, a: xp.rint(x),  # half to even, as ONNX
    "Sign": lambda xp, x, a: xp.sign(x),
    "Sin": lambda xp, x, a: xp.sin(x),
    "Cos": lambda xp, x, a: xp.cos(x),
    "Tan": lambda xp, x, a: xp.tan(x),
    "Asin": lambda xp, x, a: xp.arcsin(x),
    "Acos": lambda xp, x, a: xp.arccos(x),
    "Atan": lambda xp, x, a: xp.arctan(x),
    "Sinh": lambda xp, x, a: xp.sinh(x),
    "Cosh": lambda xp, x, a: xp.cosh(x),
    "Asinh": lambda xp, x, a: xp.arcsinh(x),
    "Acosh": lambda xp, x, a: xp.arccosh(x),
    "Atanh": lambda xp, x, a: xp.arctanh(x),
    "Erf": lambda xp, x, a: erf(xp, x),
    "Not": lambda xp, x, a: xp.logical_not(x),
    "IsNaN": lambda xp, x, a: xp.isnan(x),
    "Softplus": lambda xp, x, a: _softplus(xp, x),
    "Softsign": lambda xp, x, a: x / (_same(x, 1) + xp.abs(x)),
    "Identity": lambda xp, x, a: x,
    "LeakyRelu": lambda xp, x, a: _leaky(xp, x, a.float()),
    "Elu": lambda xp, x, a: _elu(xp, x, a.float()),
    "Celu": lambda xp, x, a: _celu(xp, x, a.float()),
    "Selu": lambda xp, x, a: _selu(xp, x, a.float(), a.float()),
    "HardSigmoid": lambda xp, x, a: _hard_sigmoid(xp, x, a.float(), a.float()),
    "HardSwish": lambda xp, x, a: x * _hard_sigmoid(xp, x, 1 / 6, 0.5),
    "ThresholdedRelu": lambda xp, x, a: _thresholded(xp, x, a.float()),
    "Mish": lambda xp, x, a: x * xp.tanh(_softplus(xp, x)),
    "Gelu": lambda xp, x, a: _gelu(xp, x, a.int()),
    "IsInf": lambda xp, x, a: _isinf(xp, x, a.int(), a.int()),
    "Shrink": lambda xp, x, a: _shrink(xp, x, a.float(), a.float()),
}


def _leaky(xp: Any, x: Any, alpha: float) -> Any:
    return xp.where(x >= 0, x, x * _same(x, alpha))


def _elu(xp: Any, x: Any, alpha: float) -> Any:
    return xp.where(x > 0, x, _same(x, alpha) * (xp.exp(xp.minimum(x, _same(x, 0)))
                                                 - _same(x, 1)))


def _celu(xp: Any, x: Any, alpha: float) -> Any:
    al = _same(x, alpha)
    return xp.maximum(x, _same(x, 0)) + xp.minimum(
        _same(x, 0), al * (xp.exp(x / al) - _same(x, 1)))


def _selu(xp: Any, x: Any, alpha: float, gamma: float) -> Any:
    return _same(x, gamma) * _elu(xp, x, alpha)


def _hard_sigmoid(xp: Any, x: Any, alpha: float, beta: float) -> Any:
    return xp.clip(x * _same(x, alpha) + _same(x, beta), _same(x, 0), _same(x, 1))


def _thresholded(xp: Any, x: Any, alpha: float) -> Any:
    return xp.where(x > _same(x, alpha), x, _same(x, 0))


def _gelu(xp: Any, x: Any, tanh: int) -> Any:
    if tanh:
        inner = _same(x, math.sqrt(2 / math.pi)) * (x + _same(x, 0.044715) * x * x * x)
        return _same(x, 0.5) * x * (_same(x, 1) + xp.tanh(inner))
    return _same(x, 0.5) * x * (_same(x, 1) + erf(xp, x / _same(x, math.sqrt(2))))


def _isinf(xp: Any, x: Any, neg: int, pos: int) -> Any:
    return xp.isinf(x) & (((x < 0) & bool(neg)) | ((x > 0) & bool(pos)))


def _shrink(xp: Any, x: Any, bias: float, lambd: float) -> Any:
    b, lam = _same(x, bias), _same(x, lambd)
    return xp.where(x < -lam, x + b, xp.where(x > lam, x - b, _same(x, 0)))


#: Unary operators computed straight into their output (no temporary).
UNARY_OUT: dict[str, Callable[[Any, Any, Any], Any]] = {
    "Relu": lambda xp, x, y: xp.maximum(x, x.dtype.type(0), out=y),
    "Tanh": lambda xp, x, y: xp.tanh(x, out=y),
    "Exp": lambda xp, x, y: xp.exp(x, out=y),
    "Sqrt": lambda xp, x, y: xp.sqrt(x, out=y),
    "Abs": lambda xp, x, y: xp.abs(x, out=y),
    "Neg": lambda xp, x, y: xp.negative(x, out=y),
}


#: Elements per chunk for NumPy work with temporaries: under glibc's mmap
#: threshold (a Dask worker's MALLOC_TRIM_THRESHOLD_ freezes it at 128 KiB,
#: so every larger temporary is a fresh mapping that page-faults) and within
#: the L2 cache.
CHUNK = 1 << 14


def _chunks(xp: Any, n: int, width: int) -> list[slice]:
    """Row slices of about CHUNK elements (rows of ``width``) on NumPy; one
    slice on CuPy, whose pool allocates without faults and whose launches
    want whole arrays."""
    if xp is not np or n * width <= 2 * CHUNK:
        return [slice(0, n)]
    step = max(1, CHUNK // max(width, 1))
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]


def unary(name: str) -> Callable[..., None]:
    fn = UNARY[name]
    direct = UNARY_OUT.get(name)

    def compute(xp: Any, ins: Sequence[Any], outs: Sequence[Any], a: Attrs) -> None:
        x, y = ins[0], outs[0]
        if direct is not None and x.dtype == y.dtype and x.shape == y.shape:
            direct(xp, x, y)
            return
        if x.shape != y.shape or not y.flags.c_contiguous or x.ndim == 0:
            put(y, fn(xp, x, a))
            return
        flat_x, flat_y = x.reshape(-1), y.reshape(-1)
        start = a.pos
        for sl in _chunks(xp, flat_x.shape[0], 1):
            a.pos = start  # every chunk reads the same attributes
            put(flat_y[sl], fn(xp, flat_x[sl], a))

    return compute


def _int_div(xp: Any, a: Any, b: Any) -> Any:
    """Integer division truncating toward zero (C, and ONNX runtimes)."""
    q = xp.floor_divide(a, b)
    if np.dtype(a.dtype).kind == "u":
        return q
    fix = (xp.remainder(a, b) != 0) & ((a < 0) != (b < 0))
    return q + fix.astype(q.dtype)


def _pow(xp: Any, a: Any, b: Any) -> Any:
    if a.dtype.kind == "f":
        return xp.power(a, b.astype(a.dtype))
    if b.dtype.kind == "f":
        return xp.power(a.astype(np.float64), b.astype(np.float64)).astype(a.dtype)
    return xp.power(a, b.astype(a.dtype))


BINARY: dict[str, Callable[[Any, Any, Any], Any]] = {
    "Add": lambda xp, a, b: xp.add(a, b),
    "Sub": lambda xp, a, b: xp.subtract(a, b),
    "Mul": lambda xp, a, b: xp.multiply(a, b),
    "Div": lambda xp, a, b: _int_div(xp, a, b) if a.dtype.kind in "iu" else xp.divide(a, b),
    "Pow": _pow,
    "Equal": lambda xp, a, b: xp.equal(a, b),
    "Less": lambda xp, a, b: xp.less(a, b),
    "LessOrEqual": lambda xp, a, b: xp.less_equal(a, b),
    "Greater": lambda xp, a, b: xp.greater(a, b),
    "GreaterOrEqual": lambda xp, a, b: xp.greater_equal(a, b),
    "And": lambda xp, a, b: xp.logical_and(a, b),
    "Or": lambda xp, a, b: xp.logical_or(a, b),
    "Xor": lambda xp, a, b: xp.logical_xor(a, b),
    "PRelu": lambda xp, a, b: xp.where(a < 0, a * b, a),
    "BitwiseAnd": lambda xp, a, b: xp.bitwise_and(a, b),
    "BitwiseOr": lambda xp, a, b: xp.bitwise_or(a, b),
    "BitwiseXor": lambda xp, a, b: xp.bitwise_xor(a, b),
}
_UFUNC_OUT = {"Add": "add", "Sub": "subtract", "Mul": "multiply", "Max": "maximum",
              "Min": "minimum"}


def binary(name: str) -> Callable[..., None]:
    fn = BINARY[name]
    ufunc = _UFUNC_OUT.get(name)

    def compute(xp: Any, ins: Sequence[Any], outs: Sequence[Any], a: Attrs) -> None:
        x, y = ins
        out = outs[0]
        if ufunc is not None and x.dtype == y.dtype == out.dtype:
            getattr(xp, ufunc)(x, y, out=out)
            return
        if name == "Div" and x.dtype == y.dtype == out.dtype and out.dtype.kind == "f":
            xp.divide(x, y, out=out)
            return
        put(out, fn(xp, x, y))

    return compute


def mod(xp: Any, ins: Sequence[Any], outs: Sequence[Any], a: Attrs) -> None:
    x, y = ins
    put(outs[0], xp.fmod(x, y) if a.int() else xp.remainder(x, y))


def variadic(name: str) -> Callable[..., None]:
    ufunc = {"Sum": "add", "Max": "maximum", "Min": "minimum"}.get(name)

    def compute(xp: Any, ins: Sequence[Any], outs: Sequence[Any], a: Attrs) -> None:
        y = outs[0]
        if ufunc is not None and len(ins) > 1 and all(
                x.shape == y.shape and x.dtype == y.dtype for x in ins):
            f = getattr(xp, ufunc)
            f(ins[0], ins[1], out=y)
            for x in ins[2:]:
                f(y, x, out=y)
            return
        acc = ins[0]
        for x in ins[1:]:
            acc = {"Sum": xp.add, "Mean": xp.add, "Max": xp.maximum,
                   "Min": xp.minimum}[name](acc, x)
        if name == "Mean":
            acc = acc / _same(acc, len(ins))
        put(outs[0], xp.broadcast_to(acc, outs[0].shape) if len(ins) == 1 else acc)

    return compute


def where(xp: Any, ins: Sequence[Any], outs: Sequence[Any], a: Attrs) -> None:
    put(outs[0], xp.where(ins[0], ins[1], ins[2]))


def clip(xp: Any, ins: Sequence[Any], outs: Sequence[Any], a: Attrs) -> None:
    has_lo, lo, has_hi, hi = a.int(), a.scalar(), a.int(), a.scalar()
    r = ins[0]
    if has_lo:
        r = xp.maximum(r, r.dtype.type(lo))
    if has_hi:
        r = xp.minimum(r, r.dtype.type(hi))
    put(outs[0], r)


def cast(xp: Any, ins: Sequence[Any], outs: Sequence[Any], a: Attrs) -> None:
    put(outs[0], ins[0].astype(outs[0].dtype))


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


# -- data movement ---------------------------------------------------------------------
def reshape(xp: Any, ins: Sequence[Any], outs: Sequence[Any], a: Attrs) -> None:
    """Reshape, Flatten, Squeeze, Unsqueeze, Identity, Dropout: the output
    shape was resolved at import, the data is the same."""
    x, y = ins[0], outs[0]
    if x.size != y.size:
        raise ValueError(f"cannot view {x.shape} as {y.shape}")
    put(y, x.reshape(y.shape))
    if len(outs) > 1:  # Dropout's mask in inference: every element kept
        outs[1][...] = True


def expand(xp: Any, ins: Sequence[Any], outs: Sequence[Any], a: Attrs) -> None:
    put(outs[0], xp.broadcast_to(ins[0], outs[0].shape))


def tile(xp: Any, ins: Sequence[Any], outs: Sequence[Any], a: Attrs) -> None:
    reps = tuple(a.ints())
    x, y = ins[0], outs[0]
    if len(reps) != x.ndim or tuple(n * r for n, r in zip(x.shape, reps)) != y.shape:
        raise ValueError(f"Tile of {x.shape} by {reps} does not give {y.shape}")
    put(y, xp.tile(x, reps))


def transpose(xp: Any, ins: Sequence[Any], outs: Sequence[Any], a: Attrs) -> None:
    put(outs[0], xp.transpose(ins[0], a.ints()))


def concat(xp: Any, ins: Sequence[Any], outs: Sequence[Any], a: Attrs) -> None:
    axis = a.int()
    y = outs[0]
    pos = 0
    for x in ins:
        n = x.shape[axis]
        put(y[(slice(None),) * axis + (slice(pos, pos + n),)], x)
        pos += n
    if pos != y.shape[axis]:
        raise ValueError("concatenated sizes do not add up to the output")


def split(xp: Any, ins: Sequence[Any], outs: Sequence[Any], a: Attrs) -> None:
    axis = a.int()
    x = ins[0]
    pos = 0
    for y in outs:
        n = y.shape[axis]
        put(y, x[(slice(None),) * axis + (slice(pos, pos + n),)])
        pos += n


def slice_(xp: Any, ins: Sequence[Any], outs: Sequence[Any], a: Attrs) -> None:
    n = a.int()
    x = ins[0]
    index = [slice(None)] * x.ndim
    for _ in range(n):
        axis, start, stop, step = a.int(), a.int(), a.int(), a.int()
        index[axis] = slice(start, None if stop < 0 else stop, step)
    put(outs[0], x[tuple(index)])


def _normal_indices(xp: Any, idx: Any, dim: int, op: str) -> Any:
    """``idx`` with negative entries counted from the end, after checking
    every entry is within ``-dim..dim-1`` (NumPy would wrap or fail unclearly)."""
    if idx.size:
        lo, hi = int(idx.min()), int(idx.max())
        if lo < -dim or hi >= dim:
            raise IndexError(f"{op} index out of range {-dim}..{dim - 1}: {lo}..{hi}")
    return xp.where(idx < 0, idx + dim, idx)


def gather(xp: Any, ins: Sequence[Any], outs: Sequence[Any], a: Attrs) -> None:
    axis = a.int()
    x, idx = ins
    idx = _normal_indices(xp, idx, x.shape[axis], "Gather")
    put(outs[0], xp.take(x, idx, axis=axis))


def gather_elements(xp: Any, ins: Sequence[Any], outs: Sequence[Any], a: Attrs) -> None:
    axis = a.int()
    x, idx = ins
    idx = _normal_indices(xp, idx, x.shape[axis], "GatherElements")
    put(outs[0], xp.take_along_axis(x, idx, axis=axis))


def pad(xp: Any, ins: Sequence[Any], outs: Sequence[Any], a: Attrs) -> None:
    mode, pads, value = a.int(), a.ints(), a.scalar()
    x = ins[0]
    nd = x.ndim
    begins, ends = pads[:nd], pads[nd:]
    if len(pads) != 2 * nd or tuple(n + b + e for n, b, e in zip(x.shape, begins, ends)) \
            != tuple(outs[0].shape):
        raise ValueError(f"pads {pads} of {x.shape} do not give {outs[0].shape}")
    crop = tuple(slice(-b if b < 0 else 0, x.shape[i] + e if e < 0 else None)
                 for i, (b, e) in enumerate(zip(begins, ends)))
    x = x[crop]
    width = [(max(b, 0), max(e, 0)) for b, e in zip(begins, ends)]
    if mode == 0:
        r = xp.pad(x, width, mode="constant", constant_values=x.dtype.type(value))
    else:
        r = xp.pad(x, width, mode=("reflect", "edge", "wrap")[mode - 1])
    put(outs[0], r)


def where_reduce(kind: str) -> Callable[..., None]:
    """ReduceSum, ReduceMean, ... over the axes resolved at import."""

    def compute(xp: Any, ins: Sequence[Any], outs: Sequence[Any], a: Attrs) -> None:
        noop, keep, axes = a.int(), a.int(), tuple(a.ints())
        x, y = ins[0], outs[0]
        if noop:
            put(y, x)
            return
        ax = axes or None
        if kind == "sum":
            r = xp.sum(x, axis=ax, keepdims=bool(keep), dtype=x.dtype)
        elif kind == "mean":
            r = xp.mean(x, axis=ax, keepdims=bool(keep))
        elif kind == "max":
            r = xp.amax(x, axis=ax, keepdims=bool(keep))
        elif kind == "min":
            r = xp.amin(x, axis=ax, keepdims=bool(keep))
        elif kind == "prod":
            r = xp.prod(x, axis=ax, keepdims=bool(keep), dtype=x.dtype)
        elif kind == "l1":
            r = xp.sum(xp.abs(x), axis=ax, keepdims=bool(keep), dtype=x.dtype)
        elif kind == "l2":
            r = xp.sqrt(xp.sum(x * x, axis=ax, keepdims=bool(keep), dtype=x.dtype))
        elif kind == "sumsquare":
            r = xp.sum(x * x, axis=ax, keepdims=bool(keep), dtype=x.dtype)
        elif kind == "logsum":
            r = xp.log(xp.sum(x, axis=ax, keepdims=bool(keep), dtype=x.dtype))
        else:  # logsumexp, shifted by the maximum so it does not overflow
            if x.size == 0:
                r = xp.log(xp.sum(xp.exp(x), axis=ax, keepdims=bool(keep)))
            else:
                m = xp.amax(x, axis=ax, keepdims=True)
                m = xp.where(xp.isfinite(m), m, _same(x, 0))
                s = xp.sum(xp.exp(x - m), axis=ax, keepdims=True)
                r = xp.log(s) + m
                if not keep:
                    r = r.reshape(y.shape)
        put(y, xp.asarray(r).astype(y.dtype))

    return compute


def arg_reduce(kind: str) -> Callable[..., None]:
    def compute(xp: Any, ins: Sequence[Any], outs: Sequence[Any], a: Attrs) -> None:
        axis, keep, last = a.int(), a.int(), a.int()
        x = ins[0]
        f = xp.argmax if kind == "max" else xp.argmin
        if last:
            r = x.shape[axis] - 1 - f(xp.flip(x, axis=axis), axis=axis)
        else:
            r = f(x, axis=axis)
        if keep:
            r = xp.expand_dims(r, axis)
        put(outs[0], xp.asarray(r).astype(np.int64))

    return compute


def cumsum(xp: Any, ins: Sequence[Any], outs: Sequence[Any], a: Attrs) -> None:
    axis, exclusive, reverse = a.int(), a.int(), a.int()
    x = ins[0]
    if reverse:
        x = xp.flip(x, axis=axis)
    r = xp.cumsum(x, axis=axis, dtype=x.dtype)
    if exclusive:
        r = r - x
    if reverse:
        r = xp.flip(r, axis=axis)
    put(outs[0], r)


def depth_to_space(xp: Any, ins: Sequence[Any], outs: Sequence[Any], a: Attrs) -> None:
    b, crd = a.int(), a.int()
    x = ins[0]
    n, c, h, w = x.shape
    if crd:
        t = x.reshape(n, c // (b * b), b, b, h, w).transpose(0, 1, 4, 2, 5, 3)
    else:
        t = x.reshape(n, b, b, c // (b * b), h, w).transpose(0, 3, 4, 1, 5, 2)
    put(outs[0], t.reshape(outs[0].shape))


def space_to_depth(xp: Any, ins: Sequence[Any], outs: Sequence[Any], a: Attrs) -> None:
    b, crd = a.int(), a.int()
    x = ins[0]
    n, c, h, w = x.shape
    t = x.reshape(n, c, h // b, b, w // b, b).transpose(
        (0, 1, 3, 5, 2, 4) if crd else (0, 3, 5, 1, 2, 4))
    put(outs[0], t.reshape(outs[0].shape))


def einsum_free_trilu(xp: Any, ins: Sequence[Any], outs: Sequence[Any], a: Attrs) -> None:
    upper, k = a.int(), a.int()
    x = ins[0]
    put(outs[0], xp.triu(x, k) if upper else xp.tril(x, k))


def array_feature_extractor(xp: Any, ins: Sequence[Any], outs: Sequence[Any],
                            a: Attrs) -> None:
    """ai.onnx.ml ArrayFeatureExtractor: elements of the last axis by index
    (scikit-learn classifiers map class indices to labels with it)."""
    x, idx = ins
    idx = idx.reshape(-1)
    dim = x.shape[-1]
    if idx.size:
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= dim:
            raise IndexError(f"ArrayFeatureExtractor index out of range 0..{dim - 1}")
    r = xp.take(x, idx, axis=-1)
    if r.size != outs[0].size:
        raise ValueError(f"ArrayFeatureExtractor gives {r.shape}, its output {outs[0].shape}")
    put(outs[0], r.reshape(outs[0].shape))
