"""The KServe v2 inference protocol: request and response bodies.

Covers JSON tensors and the *binary tensor data* extension exactly as
``tritonclient.http`` writes and reads it: the body is a JSON header followed
by raw tensor bytes; the ``Inference-Header-Content-Length`` header gives the
JSON header's length; an input's ``parameters.binary_data_size`` says how
many of the following bytes are its data (in input order); an output asked
for with ``parameters.binary_data: true`` (or every output, with the request
parameter ``binary_data_output: true``) comes back the same way.

Input tensors are the graph's ``input`` buffers (its consts belong to the
model and are uploaded once); output tensors are its ``output`` buffers.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..graph.buffers import BufferKind
from ..graph.graph import KernelGraph
from .errors import BadRequestError
from .json_tensors import NonFinite
from .tensors import (
    check_shape,
    kserve_datatype,
    tensor_from_bytes,
    tensor_from_json,
    tensor_to_json,
)

HEADER_LENGTH = "Inference-Header-Content-Length"
MAX_ID_CHARS = 256
#: Request parameters with a meaning here; others (custom ones) are ignored.
UNSUPPORTED_PARAMETERS = ("sequence_id", "sequence_start", "sequence_end")


@dataclass
class InferRequest:
    """A decoded inference request."""

    inputs: dict[str, np.ndarray]
    #: (output name, as binary?) in the order the response lists them
    outputs: list[tuple[str, bool]]
    id: str | None = None
    #: the caller's own time limit (Triton's ``timeout`` parameter, in µs), seconds
    timeout_s: float | None = None
    parameters: dict[str, Any] = field(default_factory=dict)


def _refuse_constant(what: str) -> Any:
    def refuse(text: str) -> Any:
        raise BadRequestError(f"{what} holds {text}, which is not JSON (JSON has no NaN "
                              "or Infinity)")
    return refuse


def loads_json(raw: bytes | memoryview, what: str, non_finite: bool = False) -> Any:
    """Strict JSON: UTF-8, no duplicate keys, bounded nesting, no ``NaN`` or
    ``Infinity`` (Python's json reads them; JSON has neither).  Any failure
    is a BadRequestError (never RecursionError, UnicodeDecodeError or the
    ValueError of an integer over Python's 4300 digits).  ``non_finite``:
    read those tokens as :class:`NonFinite` markers instead, so that the
    tensor holding one is named when it is refused."""
    try:
        text = bytes(raw).decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadRequestError(f"{what} is not UTF-8: {e.reason} at byte {e.start}") from None

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        d = dict(pairs)
        if len(d) != len(pairs):
            raise BadRequestError(f"{what} repeats a key in one object")
        return d

    constant = NonFinite if non_finite else _refuse_constant(what)
    try:
        return json.loads(text, object_pairs_hook=no_duplicates, parse_constant=constant)
    except json.JSONDecodeError as e:
        raise BadRequestError(f"{what} is not valid JSON: {e}") from None
    except RecursionError:
        raise BadRequestError(f"{what} is nested too deeply") from None
    except ValueError as e:  # an integer literal over Python's digit limit
        raise BadRequestError(f"{what} holds a number that cannot be read: "
                              f"{str(e)[:120]}") from None


def parse_header_length(value: str | None, body_length: int) -> int | None:
    """The JSON header's length from ``Inference-Header-Content-Length``."""
    if value is None:
        return None
    text = value.strip()
    if not text.isascii() or not text.isdigit() or len(text) > 18:
        raise BadRequestError(f"{HEADER_LENGTH} must be a non-negative integer, got "
                              f"{value[:40]!r}")
    n = int(text)
    if n > body_length:
        raise BadRequestError(f"{HEADER_LENGTH} is {n} but the body has only "
                              f"{body_length} bytes")
    return n


def _mapping(value: Any, what: str, model: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise BadRequestError(f"{what} must be a JSON object, got {type(value).__name__}",
                              graph=model)
    return value


def _flag(params: Mapping[str, Any], key: str, default: bool, model: str) -> bool:
    value = params.get(key, default)
    if not isinstance(value, bool):
        raise BadRequestError(f"parameter {key!r} must be true or false, got "
                              f"{type(value).__name__}", graph=model)
    return value


def _timeout(params: Mapping[str, Any], model: str) -> float | None:
    value = params.get("timeout")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            math.isfinite(value) and value > 0):
        raise BadRequestError(f"parameter 'timeout' must be a positive number of "
                              f"microseconds, got {value!r}", graph=model)
    return float(value) / 1e6


def decode_infer_request(body: bytes, header_length: str | None,
                         graph: KernelGraph) -> InferRequest:
    """Decode a KServe v2 ``infer`` body for the model ``graph``."""
    model = graph.name
    n = parse_header_length(header_length, len(body))
    view = memoryview(body)
    header, binary = (view, view[:0]) if n is None else (view[:n], view[n:])
    doc = loads_json(header, "the inference request", non_finite=True)
    if not isinstance(doc, Mapping):
        raise BadRequestError("the inference request must be a JSON object", graph=model)
    params = _mapping(doc.get("parameters"), "parameters", model)
    for key in UNSUPPORTED_PARAMETERS:
        if key in params:
            raise BadRequestError(f"parameter {key!r} is not supported (models are "
                                  "stateless kernel graphs)", graph=model)
    req_id = doc.get("id")
    if req_id is not None and (not isinstance(req_id, str) or len(req_id) > MAX_ID_CHARS):
        raise BadRequestError(f"id must be a string of at most {MAX_ID_CHARS} characters",
                              graph=model)
    inputs = _decode_inputs(doc.get("inputs"), binary, graph)
    outputs = _decode_outputs(doc.get("outputs"), _flag(params, "binary_data_output",
                                                        False, model), graph)
    return InferRequest(inputs, outputs, req_id, _timeout(params, model), dict(params))


def _decode_inputs(items: Any, binary: memoryview, graph: KernelGraph) -> dict[str, np.ndarray]:
    model = graph.name
    if not isinstance(items, list):
        raise BadRequestError("'inputs' must be a JSON array of tensors", graph=model)
    wanted = {b.name: b for b in graph.buffers_of(BufferKind.INPUT)}
    out: dict[str, np.ndarray] = {}
    offset = 0
    for i, item in enumerate(items):
        if not isinstance(item, Mapping):
            raise BadRequestError(f"inputs[{i}] must be a JSON object", graph=model)
        name = item.get("name")
        if not isinstance(name, str):
            raise BadRequestError(f"inputs[{i}] needs a string 'name'", graph=model)
        buf = wanted.get(name)
        if buf is None:
            kind = graph.buffers[name].kind.value if name in graph.buffers else None
            why = (f"it is a {kind} buffer of the model" if kind else
                   f"the model's inputs are {sorted(wanted)}")
            raise BadRequestError(f"not an input tensor: {why}", graph=model, buffer=name)
        if name in out:
            raise BadRequestError("input given twice", graph=model, buffer=name)
        datatype = item.get("datatype")
        expected = kserve_datatype(buf.dtype)
        if datatype != expected:
            raise BadRequestError(f"datatype {str(datatype)[:20]!r} differs from the "
                                  f"model's {expected}", graph=model, buffer=name)
        check_shape(item.get("shape"), buf, model)
        tparams = _mapping(item.get("parameters"), f"inputs[{i}].parameters", model)
        if "shared_memory_region" in tparams:
            raise BadRequestError("shared-memory tensors are not supported", graph=model,
                                  buffer=name)
        size = tparams.get("binary_data_size")
        if size is None:
            if "data" not in item:
                raise BadRequestError("input has neither 'data' nor binary_data_size",
                                      graph=model, buffer=name)
            out[name] = tensor_from_json(item["data"], buf, model)
            continue
        if "data" in item:
            raise BadRequestError("input has both 'data' and binary_data_size",
                                  graph=model, buffer=name)
        if isinstance(size, bool) or not isinstance(size, int) or size != buf.nbytes:
            raise BadRequestError(f"binary_data_size must be {buf.nbytes} for this tensor, "
                                  f"got {str(size)[:40]}", graph=model, buffer=name)
        if offset + size > len(binary):
            raise BadRequestError(f"binary data ends early: the tensor needs bytes "
                                  f"{offset}..{offset + size} of {len(binary)}",
                                  graph=model, buffer=name)
        out[name] = tensor_from_bytes(binary[offset:offset + size], buf, model)
        offset += size
    if offset != len(binary):
        raise BadRequestError(f"{len(binary) - offset} bytes of binary data after the "
                              "last binary tensor", graph=model)
    missing = sorted(set(wanted) - set(out))
    if missing:
        raise BadRequestError(f"missing input tensor(s) {missing}", graph=model)
    return out


def _decode_outputs(items: Any, binary_default: bool,
                    graph: KernelGraph) -> list[tuple[str, bool]]:
    model = graph.name
    names = [b.name for b in graph.outputs]
    if items is None:
        return [(n, binary_default) for n in names]
    if not isinstance(items, list):
        raise BadRequestError("'outputs' must be a JSON array", graph=model)
    out: list[tuple[str, bool]] = []
    for i, item in enumerate(items):
        if not isinstance(item, Mapping) or not isinstance(item.get("name"), str):
            raise BadRequestError(f"outputs[{i}] must be an object with a string 'name'",
                                  graph=model)
        name = item["name"]
        if name not in names:
            raise BadRequestError(f"not an output tensor; the model's outputs are {names}",
                                  graph=model, buffer=name)
        if any(name == n for n, _ in out):
            raise BadRequestError("output asked for twice", graph=model, buffer=name)
        oparams = _mapping(item.get("parameters"), f"outputs[{i}].parameters", model)
        if "classification" in oparams or "shared_memory_region" in oparams:
            raise BadRequestError("classification and shared-memory outputs are not "
                                  "supported", graph=model, buffer=name)
        out.append((name, _flag(oparams, "binary_data", binary_default, model)))
    return out


def encode_infer_response(graph: KernelGraph, request: InferRequest,
                          results: Mapping[str, np.ndarray], version: str = "1",
                          model_name: str | None = None) -> tuple[bytes, int | None]:
    """The response body, and the JSON header's length when binary outputs
    follow it (for ``Inference-Header-Content-Length``).  ``model_name`` is
    the name the caller used (default: the graph's)."""
    outputs = []
    blobs: list[bytes] = []
    for name, binary in request.outputs:
        buf = graph.buffers[name]
        arr = np.ascontiguousarray(np.asarray(results[name], dtype=buf.dtype)
                                   .reshape(buf.shape))
        entry: dict[str, Any] = {"name": name, "datatype": kserve_datatype(buf.dtype),
                                 "shape": list(buf.shape)}
        if binary:
            raw = arr.astype(buf.dtype.newbyteorder("<"), copy=False).tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            entry["data"] = tensor_to_json(arr, buf, graph.name)
        outputs.append(entry)
    doc: dict[str, Any] = {"model_name": model_name or graph.name, "model_version": version,
                           "outputs": outputs}
    if request.id is not None:
        doc["id"] = request.id
    header = json.dumps(doc, allow_nan=False).encode("utf-8")
    if not blobs:
        return header, None
    return b"".join([header, *blobs]), len(header)


def model_metadata(graph: KernelGraph, version: str = "1") -> dict[str, Any]:
    """``GET /v2/models/{name}``: inputs and outputs with KServe datatypes."""
    def tensors(kind: BufferKind) -> list[dict[str, Any]]:
        return [{"name": b.name, "datatype": kserve_datatype(b.dtype), "shape": list(b.shape)}
                for b in graph.buffers_of(kind)]

    return {"name": graph.name, "versions": [version], "platform": "dask_kaas",
            "inputs": tensors(BufferKind.INPUT), "outputs": tensors(BufferKind.OUTPUT)}
