"""Attributes as launch literals.

A launch carries only NumPy scalars besides its buffers, so an operator's
attributes (resolved at import: pads made explicit, axes made positive,
constant inputs such as Slice's starts read) travel as a flat sequence of
scalars: ints as int64, floats as float32 (ONNX's own attribute type), a
list as its length then its items.  The sequence round-trips through
``to_json``/``from_json`` like any literal, and the kernel reads it back in
the same order with :class:`Attrs`.

Launch layout of every ONNX kernel: input buffers, output buffers, then the
number of outputs (int64), then the attribute literals.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np


class Encoder:
    """Builds the literal sequence of one launch."""

    def __init__(self) -> None:
        self.items: list[np.generic] = []

    def int(self, v: int) -> Encoder:
        self.items.append(np.int64(int(v)))
        return self

    def float(self, v: float) -> Encoder:
        self.items.append(np.float32(v))
        return self

    def ints(self, vs: Iterable[int]) -> Encoder:
        vs = [int(v) for v in vs]
        self.int(len(vs))
        for v in vs:
            self.int(v)
        return self

    def scalar(self, v: np.generic) -> Encoder:
        """A literal of its own dtype (a Clip bound in the tensor's type)."""
        self.items.append(v)
        return self


class Attrs:
    """Reads back what an :class:`Encoder` wrote, in order."""

    __slots__ = ("lits", "pos")

    def __init__(self, lits: Sequence[Any]) -> None:
        self.lits = lits
        self.pos = 0

    def _next(self) -> Any:
        if self.pos >= len(self.lits):
            raise ValueError("the launch carries fewer attribute literals than the "
                             "operator reads")
        v = self.lits[self.pos]
        self.pos += 1
        return v

    def int(self) -> int:
        return int(self._next())

    def float(self) -> float:
        return float(self._next())

    def ints(self) -> list[int]:
        n = self.int()
        if not 0 <= n <= 64:
            raise ValueError(f"an attribute list of {n} items")
        return [self.int() for _ in range(n)]

    def scalar(self) -> Any:
        return self._next()


def split_args(args: Sequence[Any]) -> tuple[list[Any], list[Any], Attrs]:
    """(inputs, outputs, attributes) of a launch's arguments: buffers are
    arrays, literals NumPy scalars, and the first literal counts the outputs."""
    k = 0
    while k < len(args) and not isinstance(args[k], np.generic):
        k += 1
    if k == len(args):
        raise ValueError("an ONNX kernel launch lacks its output count literal")
    n_out = int(args[k])
    if not 0 < n_out <= k:
        raise ValueError(f"output count {n_out} does not fit {k} buffer arguments")
    buffers = list(args[:k])
    return buffers[:k - n_out], buffers[k - n_out:], Attrs(args[k + 1:])
