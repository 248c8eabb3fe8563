"""Reading a model: a ModelProto, a path or the bytes of a .onnx file in, a
ModelProto or an OnnxImportError out, whatever the input."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from ..graph.names import show
from .errors import OnnxImportError, UnsupportedOperatorError

#: ONNX element types the operator table computes on (TensorProto codes).
DTYPES: dict[int, np.dtype] = {
    1: np.dtype(np.float32), 2: np.dtype(np.uint8), 3: np.dtype(np.int8),
    4: np.dtype(np.uint16), 5: np.dtype(np.int16), 6: np.dtype(np.int32),
    7: np.dtype(np.int64), 9: np.dtype(np.bool_), 10: np.dtype(np.float16),
    11: np.dtype(np.float64), 12: np.dtype(np.uint32), 13: np.dtype(np.uint64),
}
CODES: dict[np.dtype, int] = {v: k for k, v in DTYPES.items()}


def dtype_of(code: int, where: str) -> np.dtype:
    dt = DTYPES.get(code)
    if dt is None:
        try:
            import onnx

            label = onnx.TensorProto.DataType.Name(code)
        except Exception:  # noqa: BLE001 - an unknown code from a hostile model
            label = f"type code {code}"
        raise UnsupportedOperatorError(f"{where}: data type {label} is not supported "
                                       f"(supported: float16/32/64, (u)int8..64, bool)")
    return dt


def load_model(model: Any) -> Any:
    """The ModelProto of ``model``: a ModelProto, a path (str or PathLike) to
    a .onnx file (external data beside it is loaded), or the file's bytes."""
    import onnx

    if isinstance(model, onnx.ModelProto):
        return model
    if isinstance(model, (bytes, bytearray, memoryview)):
        m = onnx.ModelProto()
        try:
            m.ParseFromString(bytes(model))
        except Exception as e:  # noqa: BLE001 - protobuf raises several kinds
            raise OnnxImportError(f"the bytes are not an ONNX model: {type(e).__name__}: "
                                  f"{show(str(e))}") from None
        if not m.HasField("graph"):
            raise OnnxImportError("the bytes are not an ONNX model (no graph)")
        return m
    if isinstance(model, (str, os.PathLike)):
        try:
            path = os.fspath(model)
            if "\x00" in path:
                raise ValueError("a NUL character in the path")
            m = onnx.load(path)
        except Exception as e:  # noqa: BLE001 - OSError, DecodeError, ValueError, ...
            raise OnnxImportError(f"cannot read an ONNX model from {show(model)}: "
                                  f"{type(e).__name__}: {show(str(e))}") from None
        if not m.HasField("graph"):
            raise OnnxImportError(f"{show(model)} is not an ONNX model (no graph)")
        return m
    raise OnnxImportError(f"from_onnx takes an onnx.ModelProto, a path or the bytes of a "
                          f"model, got {type(model).__name__}")


def tensor_array(t: Any, where: str) -> np.ndarray:
    """A TensorProto's value as a NumPy array of a supported dtype."""
    from onnx import numpy_helper

    dtype_of(t.data_type, where)
    if t.data_location == 1 and not t.raw_data:  # EXTERNAL, not loaded
        raise OnnxImportError(f"{where}: tensor data is stored outside the model and was "
                              "not loaded (pass the model's path)")
    try:
        a = numpy_helper.to_array(t)
    except Exception as e:  # noqa: BLE001 - hostile sizes or data
        raise OnnxImportError(f"{where}: cannot read the tensor: {type(e).__name__}: "
                              f"{show(str(e))}") from None
    return np.array(a, order="C", copy=None)
