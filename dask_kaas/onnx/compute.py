"""The operators' arithmetic, written once against the array module ``xp``.

Every function here is ``compute(xp, ins, outs, a)``: ``ins`` the input
arrays, ``outs`` the output arrays to fill (already of the shapes and dtypes
shape inference fixed at import), ``a`` the attribute literals
(:class:`~dask_kaas.onnx.attrs.Attrs`).  Only operations NumPy and CuPy both
have are used (no SciPy, no stride tricks): Conv is im2col by strided slices
plus one batched ``matmul`` (cuBLAS on CuPy), pooling is a maximum or sum
over the window's strided slices, erf is a rational approximation.

Elementwise operators and the helpers every family uses live here; the
neural-network families in :mod:`.compute_nn`, data movement in
:mod:`.compute_data`.

A result is written with :func:`put`, which refuses a result whose shape
differs from its output instead of broadcasting it silently: a kernel bug
becomes an error, never a wrong answer.
"""

from __future__ import annotations

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
