"""Buffers: the named, typed arrays a kernel graph reads and writes."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np


class BufferKind(str, enum.Enum):
    """What a buffer is for, which decides how the system may treat it.

    ``const`` is the important one: the caller promises the value never
    changes, so a device copy can be kept and reused across requests (model
    weights).  ``input`` values are per request; ``temp`` buffers live only
    while the graph runs; ``output`` buffers are returned.
    """

    INPUT = "input"
    CONST = "const"
    TEMP = "temp"
    OUTPUT = "output"


@dataclass(frozen=True, eq=False)
class Buffer:
    """A named array of a fixed shape and dtype inside one graph.

    Identity matters: a buffer belongs to the graph that made it (``owner``),
    so passing a buffer of graph A to a launch of graph B is caught.
    """

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    kind: BufferKind
    owner: object = field(repr=False, compare=False, default=None)

    @property
    def nbytes(self) -> int:
        return int(math.prod(self.shape)) * self.dtype.itemsize

    @property
    def is_input(self) -> bool:
        return self.kind in (BufferKind.INPUT, BufferKind.CONST)

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        # Without its owner: a graph pickles its buffers itself and gives
        # them back their owner when loaded (graph/shared.py).
        return (Buffer, (self.name, self.shape, self.dtype, self.kind))

    def same_as(self, other: Buffer) -> bool:
        """Equal description (name, shape, dtype, kind), ignoring ownership."""
        return (self.name, self.shape, self.dtype, self.kind) == (
            other.name, other.shape, other.dtype, other.kind)


#: Most dimensions of a buffer (NumPy allows 64; no kernel needs more than a few).
MAX_NDIM = 32
#: Most elements of a buffer: sizes stay exact in a float64 (JSON readers in
#: other languages, the dashboard, Prometheus) and far above any device.
MAX_ELEMENTS = 2**53
MAX_DIM = MAX_ELEMENTS


def normalize_shape(shape: object) -> tuple[int, ...]:
    if isinstance(shape, (int, np.integer)):
        shape = (shape,)
    try:
        dims = tuple(shape)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"shape must be an int or a sequence of ints, got {shape!r}") from None
    for d in dims:
        if isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 0:
            raise ValueError(f"shape dimensions must be non-negative ints, got {shape!r}")
    if len(dims) > MAX_NDIM:
        raise ValueError(f"shape has {len(dims)} dimensions, more than {MAX_NDIM}")
    out = tuple(int(d) for d in dims)
    if any(d > MAX_ELEMENTS for d in out) or math.prod(out) > MAX_ELEMENTS:
        raise ValueError(f"shape {out} has more than 2**53 elements")
    return out


def normalize_dtype(dtype: object) -> np.dtype:
    dt = np.dtype(dtype)  # type: ignore[call-overload]
    if dt.hasobject or dt.fields is not None or dt.subdtype is not None:
        raise TypeError(f"buffers need a plain numeric dtype, got {dt!r}")
    if dt.kind not in "biufc":
        raise TypeError(f"buffers need a plain numeric dtype, got {dt!r}")
    if not dt.isnative:
        # Device arrays (CuPy) only hold native byte order: refusing it here
        # names the buffer, instead of a bare ValueError on the worker.
        raise TypeError(f"buffers need native byte order, got {dt.str!r}; convert the "
                        f"data with arr.astype(arr.dtype.newbyteorder('='))")
    return dt


def dtype_name(dt: np.dtype) -> str:
    """The shortest name that maps back to exactly this dtype."""
    return dt.name if np.dtype(dt.name) == dt else dt.str
