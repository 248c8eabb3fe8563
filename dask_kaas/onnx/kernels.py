"""One array-function kernel per operator of the table, named after it
(``dask_kaas.onnx.kernels:Conv``), so a graph's JSON form names each launch's
operator and reads back to the same function.

A kernel is ``fn(xp, *args)`` with the launch layout of :mod:`.attrs`: it
splits its arguments and runs the operator's compute function.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from .attrs import split_args
from .ops import OPS, OpSpec


def _make(spec: OpSpec) -> Callable[..., None]:
    compute = spec.compute
    assert compute is not None

    def kernel(xp: Any, *args: Any) -> None:
        ins, outs, attrs = split_args(args)
        with np.errstate(all="ignore"):  # ONNX gives inf/nan silently (log(0), 0/0)
            compute(xp, ins, outs, attrs)

    kernel.__name__ = kernel.__qualname__ = spec.op
    kernel.__module__ = __name__
    kernel.__doc__ = f"The ONNX {spec.op} operator as an array-function kernel."
    # Every output element is written (results go through compute.put or a
    # full out=), so the memory plan need not zero a reused temp first.
    kernel.kaas_writes_all = True  # type: ignore[attr-defined]
    return kernel


KERNELS: dict[str, Callable[..., None]] = {}
for _spec in OPS.values():
    if _spec.compute is not None:
        KERNELS[_spec.op] = globals()[_spec.op] = _make(_spec)
del _spec
