"""Which graph documents the gateway accepts as models.

A tenant is not trusted: its graph may use CUDA C, PTX, cubin and library
kernels (data the worker compiles or looks up), but an *array* kernel, or a
CUDA kernel's ``cpu=`` implementation, names a Python function that the
gateway and every worker would import and call.  Those are refused unless
the function's module is listed in ``kaas.array-modules`` (an operator's
decision), and the check runs on the raw document *before*
``KernelGraph.from_json`` could import anything.  ``n_iter`` is capped by
``kaas.max-n-iter`` in ``from_json`` itself.  The graph is renamed ``tenant/model`` so that two
tenants' models of the same name never share learned run times or keys.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from .. import config
from ..graph.errors import KaasError
from ..graph.graph import KernelGraph
from .errors import BadRequestError
from .kserve import loads_json
from .tensors import kserve_datatype

#: Fields of a kernel description that name a Python function.
CODE_FIELDS = ("fn", "cpu")


def array_modules() -> list[str]:
    """``kaas.array-modules``: modules array functions may come from (none
    when the key is unset)."""
    value = config.get("array-modules", None) or []
    if isinstance(value, str) or not all(isinstance(m, str) and m for m in value):
        raise KaasError(f"config kaas.array-modules must be a list of module names, "
                        f"got {value!r}")
    return list(value)


def _module_allowed(module: str, allowed: list[str]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in allowed)


def check_code_references(doc: Mapping[str, Any], model: str) -> None:
    """Refuse a document naming a function outside ``kaas.array-modules``."""
    kernels = doc.get("kernels")
    if not isinstance(kernels, list):
        return  # from_json says what is wrong with it
    allowed = array_modules()
    for i, kernel in enumerate(kernels):
        if not isinstance(kernel, Mapping):
            continue
        for field in CODE_FIELDS:
            ref = kernel.get(field)
            if ref is None:
                continue
            if not isinstance(ref, str):
                raise BadRequestError(f"kernels[{i}].{field} must be a 'module:function' "
                                      f"string, got {type(ref).__name__}", graph=model)
            module = ref.partition(":")[0]
            if not _module_allowed(module, allowed):
                raise BadRequestError(
                    f"kernels[{i}].{field} names a Python function in module "
                    f"{module[:80]!r}; through the gateway, functions may only come from "
                    f"the modules in kaas.array-modules {allowed} (use CUDA, PTX, cubin "
                    "or library kernels)", graph=model)


def admit_graph(body: bytes, tenant: str, model: str) -> KernelGraph:
    """The graph a tenant registers as ``model``, or BadRequestError."""
    doc = loads_json(body, "the graph document")
    if not isinstance(doc, dict):
        raise BadRequestError("a graph document must be a JSON object", graph=model)
    check_code_references(doc, model)
    doc["name"] = f"{tenant}/{model}"
    try:
        graph = KernelGraph.from_json(json.dumps(doc))
    except KaasError as e:
        raise BadRequestError(str(e)) from None
    except Exception as e:  # noqa: BLE001 - a hostile document must be a 400, never a 500
        raise BadRequestError(f"malformed graph document: {type(e).__name__}: "
                              f"{str(e)[:200]}", graph=model) from None
    if not graph.outputs:
        raise BadRequestError("a model needs at least one output buffer", graph=graph.name)
    for buf in graph.inputs + graph.outputs:
        if buf.kind.value != "const" and kserve_datatype(buf.dtype) is None:
            raise BadRequestError(f"dtype {buf.dtype} has no KServe datatype (use bool, "
                                  "[u]int8-64 or float16/32/64 for inputs and outputs)",
                                  graph=graph.name, buffer=buf.name)
    try:
        graph.validate()
    except KaasError as e:
        raise BadRequestError(str(e)) from None
    return graph
