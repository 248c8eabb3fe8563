"""KServe v2 JSON tensor data, exactly: JSON values in, JSON values out.

The v2 protocol carries a JSON tensor's elements as JSON values: ``true`` /
``false`` for BOOL and JSON numbers for the numeric datatypes.  JSON has no
NaN or Infinity, so neither is accepted here nor ever written (such values
travel as binary tensor data).  Each element must be representable in the
tensor's datatype, or the request is refused (400) naming the tensor:

* BOOL takes only ``true``/``false``; no numeric datatype takes them;
* an integer datatype takes only integers (``1.0`` and ``1e3`` are numbers
  with a fraction or exponent: refused) within its exact range, UINT64 up to
  2**64 - 1 included (read as Python integers, never through a float);
* a float datatype takes any JSON number whose value, rounded to the
  datatype (IEEE round-to-nearest), is finite: FP16 takes 65504 and 65519,
  not 70000 (which would silently become ``inf``).

Why not ``np.array(data)``: it makes ``[true, 1]`` the integers ``[1, 1]``,
turns big unsigned integers mixed with others into floats, and lets the
caller's values decide the dtype before any check.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..graph.buffers import Buffer
from .errors import BadRequestError


class NonFinite:
    """What ``NaN``, ``Infinity`` and ``-Infinity`` parse to in an inference
    request (``json.loads(parse_constant=...)``): not a number, so refused
    by whichever field meets it, with the tensor's name where it is data."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text


_NAMES = {bool: "booleans", str: "strings", type(None): "nulls", dict: "objects",
          list: "arrays nested deeper than the tensor's shape", NonFinite: "NaN or Infinity",
          float: "non-integers"}


def _datatype(buf: Buffer) -> str:
    from .tensors import kserve_datatype
    return str(kserve_datatype(buf.dtype))


def _fail(model: str, buf: Buffer, message: str) -> BadRequestError:
    return BadRequestError(message, graph=model, buffer=buf.name)


def _leaves(data: list[Any], shape: tuple[int, ...], size: int) -> list[Any] | None:
    """The elements of ``data`` in row-major order, if it is nested to
    exactly ``shape`` or flat with ``size`` elements; else None."""
    if not shape:  # a scalar: one element, flat
        return data if len(data) == 1 else None
    level: list[Any] = [data]
    for dim in shape:
        nxt: list[Any] = []
        for item in level:
            if type(item) is not list or len(item) != dim:
                break
            nxt.extend(item)
        else:
            level = nxt
            continue
        break
    else:
        return level
    return data if len(data) == size else None


def tensor_from_json(data: Any, buf: Buffer, model: str) -> np.ndarray:
    """A tensor from a KServe JSON ``data`` field: flat (row-major) or nested
    to exactly the buffer's shape, each element exactly representable."""
    if type(data) is not list:
        raise _fail(model, buf, f"data must be a JSON array, got {type(data).__name__}")
    size = int(np.prod(buf.shape, dtype=np.int64))
    flat = _leaves(data, buf.shape, size)
    if flat is None:
        raise _fail(model, buf, f"data has {len(data)} elements at its top level; expected "
                                f"{size} values (flat) or nested to shape {list(buf.shape)}")
    if not flat:
        return np.zeros(buf.shape, buf.dtype)
    target = buf.dtype
    allowed = {"b": (bool,), "i": (int,), "u": (int,), "f": (int, float)}[target.kind]
    kinds = set(map(type, flat))
    wrong = kinds.difference(allowed)
    if wrong:
        what = " and ".join(sorted(_NAMES.get(k, k.__name__) for k in wrong))
        hint = ("; JSON has no NaN or Infinity: send such values as binary tensor data"
                if NonFinite in wrong else "")
        raise _fail(model, buf, f"data holds {what}; the tensor is {_datatype(buf)}{hint}")
    if target.kind == "b":
        return np.array(flat, dtype=np.bool_).reshape(buf.shape)
    if target.kind in "iu":
        info = np.iinfo(target)
        lo, hi = min(flat), max(flat)
        if lo < info.min or hi > info.max:
            bad = lo if lo < info.min else hi
            raise _fail(model, buf, f"value {_short_int(bad)} is out of range for "
                                    f"{_datatype(buf)} [{info.min}, {info.max}]")
        return np.array(flat, dtype=target).reshape(buf.shape)
    return _floats(flat, buf, model)


def _floats(flat: list[Any], buf: Buffer, model: str) -> np.ndarray:
    """JSON numbers to a float datatype; any that round to infinity refused."""
    try:
        wide = np.array(flat, dtype=np.float64)
    except OverflowError:  # an integer beyond float64
        top = float(np.finfo(np.float64).max)  # a Python float: compared with ints exactly
        bad = next(v for v in flat if type(v) is int and abs(v) > top)
        raise _fail(model, buf, f"value {_short_int(bad)} is out of range for "
                                f"{_datatype(buf)}") from None
    with np.errstate(over="ignore"):
        out = wide.astype(buf.dtype)
    # JSON's NaN and Infinity were refused, so every infinity here is a value
    # too large for the datatype (a literal such as 1e400 parses to inf).
    inf = np.isinf(out)
    if inf.any():
        bad = flat[int(np.argmax(inf))]
        raise _fail(model, buf, f"value {_short_int(bad) if type(bad) is int else bad!r} is "
                                f"out of range for {_datatype(buf)} (largest finite: "
                                f"{float(np.finfo(buf.dtype).max)!r})")
    return out.reshape(buf.shape)


def tensor_to_json(arr: np.ndarray, buf: Buffer, model: str) -> list[Any]:
    """An output's JSON ``data`` (flat, row-major).  NaN and infinities have
    no JSON form: such an output must be asked for as binary data."""
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise _fail(model, buf, "the output holds NaN or Infinity, which JSON cannot carry "
                                "(KServe v2 JSON tensors are JSON numbers); ask for it as "
                                "binary data (parameters.binary_data: true)")
    return arr.ravel().tolist()


def _short_int(value: int) -> str:
    """An integer for a message: in full up to 40 digits, else its magnitude
    (``str`` of a huge int is slow, and refused past 4300 digits)."""
    if value.bit_length() <= 130:
        return str(value)
    return f"{'-' if value < 0 else ''}2**{value.bit_length() - 1}-ish"
