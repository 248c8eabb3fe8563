"""Built-in kernels, written once against the array API.

Each built-in is an array function ``fn(xp, *args)`` that works with ``xp``
being NumPy (CPU backend) or CuPy (CUDA backend, where ``matmul`` goes to
cuBLAS), plus a check of its arguments that runs at graph-build time, so a
shape error in a gemm is reported when the graph is validated rather than as
a broadcasting error on a remote worker.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


class LibraryArgError(ValueError):
    """Raised by a built-in's check; turned into a GraphError with context."""


def _gemm(xp: Any, a: Any, b: Any, c: Any, alpha: Any = None, beta: Any = None) -> None:
    if beta is not None and beta != 0:
        prod = xp.matmul(a, b)
        if alpha is not None:
            prod *= alpha
        c *= beta
        c += prod
        return
    xp.matmul(a, b, out=c)
    if alpha is not None and alpha != 1:
        c *= alpha


def _axpy(xp: Any, alpha: Any, x: Any, y: Any) -> None:
    y += alpha * x


def _relu(xp: Any, x: Any, y: Any) -> None:
    xp.maximum(x, 0, out=y)


def _add(xp: Any, x: Any, y: Any, z: Any) -> None:
    xp.add(x, y, out=z)


def _copy(xp: Any, x: Any, y: Any) -> None:
    y[...] = x


def _reduce_sum(xp: Any, x: Any, out: Any) -> None:
    out[...] = xp.sum(x, dtype=out.dtype)


@dataclass(frozen=True)
class ArgSpec:
    """One positional argument of a built-in: a buffer (with the access it
    needs) or a literal, possibly optional."""

    name: str
    role: str  # "in", "out", "inout" or "literal"
    optional: bool = False


@dataclass(frozen=True)
class Builtin:
    name: str
    fn: Callable[..., None]
    args: tuple[ArgSpec, ...]
    check: Callable[[Sequence[Any]], None]
    doc: str


def _shapes(args: Sequence[Any]) -> list[tuple[int, ...] | None]:
    return [getattr(a, "shape", None) for a in args]


def _check_gemm(args: Sequence[Any]) -> None:
    a, b, c = _shapes(args[:3])
    if len(a) != 2 or len(b) != 2 or len(c) != 2:
        raise LibraryArgError(f"gemm needs 2-d buffers, got shapes {a}, {b}, {c}")
    if a[1] != b[0] or c != (a[0], b[1]):
        raise LibraryArgError(f"gemm shapes do not chain: {a} @ {b} -> {c}")
    if len(args) == 5 and args[4] != 0 and getattr(args[2], "mode", "inout") != "inout":
        raise LibraryArgError("gemm with a non-zero beta reads c: pass it as InOut(c)")


def _check_same_shape(args: Sequence[Any]) -> None:
    shapes = [s for s in _shapes(args) if s is not None]
    if len(set(shapes)) > 1:
        raise LibraryArgError(f"arguments must have the same shape, got {shapes}")


def _check_add(args: Sequence[Any]) -> None:
    x, y, z = _shapes(args)
    try:
        out = np.broadcast_shapes(x, y)
    except ValueError:
        raise LibraryArgError(f"add cannot broadcast {x} with {y}") from None
    if out != z:
        raise LibraryArgError(f"add of {x} and {y} gives {out}, output is {z}")


def _check_reduce(args: Sequence[Any]) -> None:
    out = _shapes(args)[1]
    if out not in ((), (1,)):
        raise LibraryArgError(f"reduce_sum output must have shape () or (1,), got {out}")


BUILTINS: dict[str, Builtin] = {
    b.name: b
    for b in [
        Builtin("gemm", _gemm,
                (ArgSpec("a", "in"), ArgSpec("b", "in"), ArgSpec("c", "out"),
                 ArgSpec("alpha", "literal", True), ArgSpec("beta", "literal", True)),
                _check_gemm, "c = alpha * a @ b + beta * c (beta given: c is read)"),
        Builtin("axpy", _axpy,
                (ArgSpec("alpha", "literal"), ArgSpec("x", "in"), ArgSpec("y", "inout")),
                lambda args: _check_same_shape(args[1:]), "y = alpha * x + y"),
        Builtin("relu", _relu, (ArgSpec("x", "in"), ArgSpec("y", "out")),
                _check_same_shape, "y = max(x, 0)"),
        Builtin("add", _add, (ArgSpec("x", "in"), ArgSpec("y", "in"), ArgSpec("z", "out")),
                _check_add, "z = x + y (y may broadcast, e.g. a bias)"),
        Builtin("copy", _copy, (ArgSpec("x", "in"), ArgSpec("y", "out")),
                _check_same_shape, "y = x"),
        Builtin("reduce_sum", _reduce_sum, (ArgSpec("x", "in"), ArgSpec("out", "out")),
                _check_reduce, "out = sum(x)"),
    ]
}
