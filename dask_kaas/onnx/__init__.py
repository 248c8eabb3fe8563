"""ONNX models as kernel graphs.

``from_onnx(model, batch=...)`` turns an ONNX model into a KernelGraph and
its consts; every operator is an array function written once against the
NumPy/CuPy API (:mod:`.compute`), listed in one table (:mod:`.ops`).  This
package depends on :mod:`dask_kaas.graph` and nothing above it; ``onnx`` is
imported only when a model is imported.
"""

from .errors import OnnxImportError, UnknownDimensionError, UnsupportedOperatorError
from .importer import from_onnx
from .ops import OPS
from .serve import OnnxModel, register_onnx_model

__all__ = ["OPS", "OnnxImportError", "OnnxModel", "UnknownDimensionError",
           "UnsupportedOperatorError", "from_onnx", "register_onnx_model",
           "supported_operators"]


def supported_operators() -> list[str]:
    """The ONNX operators of the table, sorted."""
    return sorted(OPS)
