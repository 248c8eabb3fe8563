"""Errors of the ONNX importer, all KaasErrors (and GraphErrors: a model
that cannot become a kernel graph is a malformed graph for this system)."""

from __future__ import annotations

from ..graph.errors import GraphError


class OnnxImportError(GraphError):
    """The model cannot be read or turned into a kernel graph (not ONNX, not
    a valid model, an input whose shape is left unknown, ...)."""


class UnsupportedOperatorError(OnnxImportError):
    """A node uses an operator, attribute value, data type or opset that the
    operator table does not implement: refused at import, never run wrong."""

    def __init__(self, message: str, *, node: str | None = None, op: str | None = None,
                 graph: str | None = None, **kw: object) -> None:
        self.node = node
        self.op = op
        where = []
        if node is not None:
            where.append(f"node {node!r}")
        if op is not None:
            where.append(f"operator {op}")
        prefix = (", ".join(where) + ": ") if where and not message.startswith("node ") else ""
        super().__init__(prefix + message, graph=graph, **kw)  # type: ignore[arg-type]

    def __reduce__(self):  # type: ignore[override]
        return (_rebuild_unsupported, (self.detail, self.graph))


def _rebuild_unsupported(detail: str, graph: str | None) -> UnsupportedOperatorError:
    e = UnsupportedOperatorError.__new__(UnsupportedOperatorError)
    GraphError.__init__(e, detail, graph=graph)
    e.node = e.op = None
    return e


class UnknownDimensionError(OnnxImportError):
    """A graph input has a dimension that is neither fixed in the model nor
    by ``batch=``: a kernel graph has static shapes, so it is never guessed."""
