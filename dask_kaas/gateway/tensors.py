"""Tensors on the wire: KServe v2 datatypes, JSON and binary tensor data, consts.

Every function here takes bytes or decoded JSON from an untrusted caller and
either returns an array of *exactly* the declared buffer's shape and dtype
(a fresh, native-byte-order copy) or raises :class:`BadRequestError` naming
the model and buffer.  Shapes are compared with the declared ones before any
size is computed, so a hostile shape never sizes an allocation.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np

from ..graph.buffers import Buffer
from .errors import BadRequestError
from .json_tensors import tensor_from_json, tensor_to_json

__all__ = ["DATATYPES", "kserve_datatype", "check_shape", "tensor_from_json", "tensor_to_json",
           "tensor_from_bytes", "const_from_body"]

#: KServe v2 tensor datatypes of the NumPy dtypes a buffer may have.
#: (BYTES and BF16 have no buffer dtype; complex numbers have no KServe type.)
DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8), "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32), "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8), "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32), "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16), "FP32": np.dtype(np.float32), "FP64": np.dtype(np.float64),
}
_BY_DTYPE = {dt.newbyteorder("<"): name for name, dt in DATATYPES.items()}
NPY_MAGIC = b"\x93NUMPY"


def kserve_datatype(dtype: np.dtype) -> str | None:
    """The KServe datatype of ``dtype`` (either byte order), or None."""
    return _BY_DTYPE.get(np.dtype(dtype).newbyteorder("<"))


def _fail(model: str, buffer: str, message: str) -> BadRequestError:
    return BadRequestError(message, graph=model, buffer=buffer)


def check_shape(shape: Any, buf: Buffer, model: str) -> None:
    """``shape`` (from JSON) must be a list of ints equal to the buffer's."""
    if not isinstance(shape, list) or any(isinstance(d, bool) or not isinstance(d, int)
                                          for d in shape):
        raise _fail(model, buf.name, f"shape must be a list of integers, got "
                                     f"{_short(shape)}")
    if tuple(shape) != buf.shape:
        raise _fail(model, buf.name, f"shape {_short(shape)} differs from the model's "
                                     f"{list(buf.shape)}")


def tensor_from_bytes(raw: bytes | memoryview, buf: Buffer, model: str) -> np.ndarray:
    """A tensor from binary tensor data: little-endian, row-major, exactly
    the buffer's byte size (the caller checked ``binary_data_size``)."""
    if len(raw) != buf.nbytes:
        raise _fail(model, buf.name, f"{len(raw)} bytes of tensor data; the tensor needs "
                                     f"{buf.nbytes}")
    if buf.dtype.kind == "b":  # any non-zero byte is True, as in C
        return (np.frombuffer(raw, np.uint8) != 0).reshape(buf.shape)
    wire = buf.dtype.newbyteorder("<")
    return np.frombuffer(raw, wire).reshape(buf.shape).astype(buf.dtype)


def const_from_body(body: bytes, content_type: str | None, buf: Buffer,
                    model: str) -> np.ndarray:
    """A const's value from an upload: an ``.npy`` file (recognised by its
    magic bytes) or raw little-endian bytes of the declared shape and dtype."""
    if body[:len(NPY_MAGIC)] != NPY_MAGIC:
        if content_type and "npy" in content_type.lower():
            raise _fail(model, buf.name, "body is declared as .npy but lacks the .npy magic")
        return tensor_from_bytes(body, buf, model)
    try:
        arr = np.load(io.BytesIO(body), allow_pickle=False)
    except (ValueError, OSError, EOFError, SyntaxError, TypeError, MemoryError) as e:
        raise _fail(model, buf.name, f"not a readable .npy file: {e}") from None
    if not isinstance(arr, np.ndarray):
        raise _fail(model, buf.name, "expected one array (.npy), got an archive")
    if arr.shape != buf.shape:
        raise _fail(model, buf.name, f".npy array has shape {list(arr.shape)}; the const "
                                     f"is {list(buf.shape)}")
    if arr.dtype.hasobject or arr.dtype.newbyteorder("<") != buf.dtype.newbyteorder("<"):
        raise _fail(model, buf.name, f".npy array has dtype {arr.dtype}; the const is "
                                     f"{buf.dtype}")
    return np.ascontiguousarray(arr.astype(buf.dtype))


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
