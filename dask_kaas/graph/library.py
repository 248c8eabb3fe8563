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


def _no_temps(args: Sequence[Any]) -> int:
    return 0


@dataclass(frozen=True)
class Builtin:
    name: str
    fn: Callable[..., None]
    args: tuple[ArgSpec, ...]
    check: Callable[[Sequence[Any]], None]
    doc: str
    #: Bytes of device temporaries one call allocates (``alpha * x`` in
    #: axpy, ...), so the device cache can set them aside with the graph.
    temp_bytes: Callable[[Sequence[Any]], int] = _no_temps


def _nbytes(arg: Any) -> int:
    buf = getattr(arg, "buffer", arg)
    return int(getattr(buf, "nbytes", 0) or 0)


def _gemm_temps(args: Sequence[Any]) -> int:
    beta = args[4] if len(args) == 5 else None
    return _nbytes(args[2]) if beta is not None and beta != 0 else 0


def _reduce_temps(args: Sequence[Any]) -> int:
    return int(getattr(args[1], "dtype", np.dtype(np.float64)).itemsize)


def graph_temp_bytes(graph: Any, alloc: Callable[[int], int] = int) -> int:
    """Device bytes the built-ins of a graph allocate as temporaries, at
    most, at one time: the launches of a graph run one after the other on
    one stream, where a freed temporary is reused at once.  (Array and CUDA
    kernels' own temporaries come out of the pool's headroom.)"""
    most = 0
    for launch in graph.launches:
        if launch.kernel.kind == "library":
            spec = BUILTINS[launch.kernel.name]
            most = max(most, alloc(spec.temp_bytes(launch.args)))
    return most


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
                _check_gemm, "c = alpha * a @ b + beta * c (beta given: c is read)",
                _gemm_temps),
        Builtin("axpy", _axpy,
                (ArgSpec("alpha", "literal"), ArgSpec("x", "in"), ArgSpec("y", "inout")),
                lambda args: _check_same_shape(args[1:]), "y = alpha * x + y",
                lambda args: _nbytes(args[1])),
        Builtin("relu", _relu, (ArgSpec("x", "in"), ArgSpec("y", "out")),
                _check_same_shape, "y = max(x, 0)"),
        Builtin("add", _add, (ArgSpec("x", "in"), ArgSpec("y", "in"), ArgSpec("z", "out")),
                _check_add, "z = x + y (y may broadcast, e.g. a bias)"),
        Builtin("copy", _copy, (ArgSpec("x", "in"), ArgSpec("y", "out")),
                _check_same_shape, "y = x"),
        Builtin("reduce_sum", _reduce_sum, (ArgSpec("x", "in"), ArgSpec("out", "out")),
                _check_reduce, "out = sum(x)", _reduce_temps),
    ]
}
