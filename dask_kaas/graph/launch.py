"""Launches: one kernel call with its arguments and launch dimensions."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Union

import numpy as np

from .buffers import Buffer
from .kernels import Kernel

IN, OUT, INOUT = "in", "out", "inout"

MAX_GRID = (2**31 - 1, 65535, 65535)
MAX_BLOCK = (1024, 1024, 64)
MAX_THREADS_PER_BLOCK = 1024
#: Largest dynamic shared memory per block on current NVIDIA parts (227 KiB on Hopper).
MAX_SHARED_MEM = 227 * 1024


@dataclass(frozen=True)
class ArgRef:
    """A buffer argument and how the kernel accesses it."""

    buffer: Buffer
    mode: str

    @property
    def reads(self) -> bool:
        return self.mode in (IN, INOUT)

    @property
    def writes(self) -> bool:
        return self.mode in (OUT, INOUT)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.buffer.shape

    @property
    def dtype(self) -> np.dtype:
        return self.buffer.dtype


def In(buf: Buffer) -> ArgRef:  # noqa: N802 - reads like a keyword in a graph
    """The kernel only reads ``buf``."""
    return ArgRef(_need_buffer(buf, "In"), IN)


def Out(buf: Buffer) -> ArgRef:  # noqa: N802
    """The kernel writes ``buf`` without reading it first."""
    return ArgRef(_need_buffer(buf, "Out"), OUT)


def InOut(buf: Buffer) -> ArgRef:  # noqa: N802
    """The kernel reads and updates ``buf`` in place."""
    return ArgRef(_need_buffer(buf, "InOut"), INOUT)


def _need_buffer(buf: Any, wrapper: str) -> Buffer:
    if not isinstance(buf, Buffer):
        raise TypeError(f"{wrapper}() takes a Buffer, got {type(buf).__name__}")
    return buf


Arg = Union[ArgRef, np.generic]

#: The C types a literal can be passed as: what CuPy's launcher packs by
#: size (1, 2, 4, 8 or 16 bytes).  ``np.longdouble`` is 16 bytes on x86-64
#: and would be packed as a complex128: a ``double`` parameter read
#: ``np.longdouble(1.5)`` as -2.0.
LITERAL_KINDS = "biufc"


def literal_problem(value: Any) -> str | None:
    """Why ``value`` cannot be a literal argument, or None."""
    if not isinstance(value, np.generic) or np.dtype(value.dtype).kind not in LITERAL_KINDS:
        return (f"a literal must be a NumPy scalar of a bool, int, float or complex dtype, "
                f"got {type(value).__name__}")
    dt = np.dtype(value.dtype)
    if dt.kind in "fc" and dt.itemsize > (8 if dt.kind == "f" else 16):
        return (f"{dt.name} literals have no CUDA type (use np.float64 or np.complex128); "
                "CuPy would pass their bytes as another type")
    if not dt.isnative:
        return f"literal of non-native byte order {dt.str}"
    return None


@dataclass(frozen=True)
class Launch:
    """One call of ``kernel`` with ``args`` in the kernel's argument order."""

    kernel: Kernel
    args: tuple[Arg, ...]
    grid: tuple[int, int, int] | None = None
    block: tuple[int, int, int] | None = None
    shared_mem: int = 0

    def __post_init__(self) -> None:
        from .errors import LiteralTypeError

        for pos, a in enumerate(self.args):
            if not isinstance(a, ArgRef):
                problem = literal_problem(a)
                if problem:
                    raise LiteralTypeError(f"argument {pos}: {problem}",
                                           kernel=getattr(self.kernel, "name", None))

    def buffer_args(self) -> list[ArgRef]:
        return [a for a in self.args if isinstance(a, ArgRef)]


def normalize_dims(value: Any, what: str, limits: tuple[int, int, int]) -> tuple[int, int, int]:
    """Turn ``8`` or ``(8, 4)`` into ``(8, 4, 1)``, checking CUDA's limits.

    Raises ValueError with a precise reason (turned into LaunchConfigError
    with context by the caller).
    """
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        dims: tuple[Any, ...] = (value,)
    elif isinstance(value, (tuple, list)):
        dims = tuple(value)
    else:
        raise ValueError(f"{what} must be an int or a tuple of 1 to 3 ints, got {value!r}")
    if not 1 <= len(dims) <= 3:
        raise ValueError(f"{what} must have 1 to 3 dimensions, got {value!r}")
    for d in dims:
        if isinstance(d, bool) or not isinstance(d, (int, np.integer)):
            raise ValueError(f"{what} dimensions must be ints, got {value!r}")
    full = tuple(int(d) for d in dims) + (1,) * (3 - len(dims))
    for axis, (d, lim) in enumerate(zip(full, limits)):
        if not 1 <= d <= lim:
            raise ValueError(f"{what}[{axis}] = {d} is outside 1..{lim}")
    if what == "block" and math.prod(full) > MAX_THREADS_PER_BLOCK:
        raise ValueError(f"block {full} has {math.prod(full)} threads, "
                         f"more than {MAX_THREADS_PER_BLOCK}")
    return full  # type: ignore[return-value]
