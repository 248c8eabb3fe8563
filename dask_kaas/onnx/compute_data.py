"""The operators' arithmetic, data movement: reshapes, slicing, gathering,
padding and reductions that select rather than compute, written once
against the array module ``xp`` (see :mod:`.compute` for the conventions
every function here follows).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .attrs import Attrs
from .compute import _same, put


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


def _spans(axis: int, sizes: Sequence[int]) -> list[tuple[slice, ...]]:
    """Consecutive index spans of ``sizes`` entries along ``axis``."""
    out, pos = [], 0
    for n in sizes:
        out.append((slice(None),) * axis + (slice(pos, pos + n),))
        pos += n
    return out


def concat(xp: Any, ins: Sequence[Any], outs: Sequence[Any], a: Attrs) -> None:
    axis, y = a.int(), outs[0]
    sizes = [x.shape[axis] for x in ins]
    for x, span in zip(ins, _spans(axis, sizes)):
        put(y[span], x)
    if sum(sizes) != y.shape[axis]:
        raise ValueError("concatenated sizes do not add up to the output")


def split(xp: Any, ins: Sequence[Any], outs: Sequence[Any], a: Attrs) -> None:
    axis = a.int()
    for y, span in zip(outs, _spans(axis, [y.shape[axis] for y in outs])):
        put(y, ins[0][span])


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
