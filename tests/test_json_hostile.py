"""KernelGraph.from_json / from_dict against hostile documents: each one the
issue found accepted or crashing is refused with a SerializationError naming
the field, and reading never imports a module it is not allowed to."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap

import dask
import numpy as np
import pytest

from dask_kaas import InOut, KaasError, Kernel, KernelGraph, Out, SerializationError
from dask_kaas.workloads import jacobi, mlp, sgemm


def library_graph():
    g = KernelGraph("lib", n_iter=3)
    x = g.input("x", (4,), np.float32)
    y = g.input("y", (4,), np.float32)
    z = g.output("z", (4,), np.float32)
    g.launch(Kernel.library("axpy"), [np.float32(2.0), x, InOut(y)])
    g.launch(Kernel.library("copy"), [y, Out(z)])
    return g


def base() -> dict:
    return library_graph().to_dict()


def literal_doc(value, dtype):
    d = base()
    d["launches"][0]["args"][0] = {"literal": value, "dtype": dtype}
    return d


def with_(path, value, doc=None):
    """A copy of ``doc`` (default: the library graph) with one field set."""
    d = copy.deepcopy(doc or base())
    node = d
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return d


def cuda_doc():
    return jacobi.jacobi_graph(8, 2).to_dict()


HOSTILE = [
    # (document, a fragment of the message naming the field)
    (with_(["n_iter"], 10**100), "n_iter"),
    (with_(["n_iter"], 1_000_001), "n_iter"),
    (with_(["n_iter"], 0), "n_iter"),
    (with_(["n_iter"], True), "n_iter"),
    (with_(["n_iter"], 2.0), "n_iter"),
    (literal_doc("inf", "bool"), "args[0].literal"),
    (literal_doc(1, "bool"), "args[0].literal"),
    (literal_doc(2.7, "int32"), "args[0].literal"),
    (literal_doc(2**31, "int32"), "args[0].literal"),
    (literal_doc(-1, "uint8"), "args[0].literal"),
    (literal_doc(True, "float32"), "args[0].literal"),
    (literal_doc(1e39, "float32"), "does not fit float32"),
    (literal_doc("Infinity", "float32"), "bad float literal"),
    (literal_doc([1.0], "complex64"), "complex literal"),
    (literal_doc(1.0, "float128"), "float128"),
    (literal_doc(1.0, None), "args[0].dtype"),
    (with_(["launches", 0, "kernel"], -1), "launches[0].kernel"),
    (with_(["launches", 0, "kernel"], 2), "launches[0].kernel"),
    (with_(["launches", 0, "kernel"], 0.0), "launches[0].kernel"),
    (with_(["launches", 0, "kernel"], False), "launches[0].kernel"),
    (with_(["name"], 7), "field name"),
    (with_(["name"], ""), "field name"),
    (with_(["name"], "g" * 201), "field name"),
    (with_(["buffers", 0, "name"], ["x"]), "buffers[0].name"),
    (with_(["kernels", 0, "name"], None), "kernels[0].name"),
    (with_(["buffers", 0, "dtype"], None), "buffers[0].dtype"),
    (with_(["buffers", 0, "dtype"], "object"), "buffers[0].dtype"),
    (with_(["buffers", 0, "dtype"], "f4,f4"), "buffers[0].dtype"),
    (with_(["buffers", 0, "dtype"], "U5"), "buffers[0].dtype"),
    (with_(["buffers", 0, "kind"], "weights"), "buffers[0].kind"),
    (with_(["buffers", 0, "shape"], [-1]), "buffers[0].shape[0]"),
    (with_(["buffers", 0, "shape"], [4.0]), "buffers[0].shape[0]"),
    (with_(["buffers", 0, "shape"], "4"), "buffers[0].shape"),
    (with_(["buffers", 0, "shape"], [2**40, 2**40]), "2**53"),
    (with_(["buffers", 0, "shape"], [1] * 40), "dimensions"),
    (with_(["buffers", 1, "name"], "x"), "DuplicateBufferError"),
    (with_(["launches", 0, "args", 1, "mode"], "write"), "args[1].mode"),
    (with_(["launches", 0, "args", 1, "buffer"], 3), "args[1].buffer"),
    (with_(["launches", 0, "grid"], [1.5]), "launches[0].grid[0]"),
    (with_(["launches", 0, "shared_mem"], 10**9), "launches[0].shared_mem"),
    (with_(["n_iters"], 2), "unknown key 'n_iters'"),
    (with_(["format"], "dask-kaas-graph/9"), "format"),
    (with_(["kernels", 0, "kind"], "python"), "kernels[0].kind"),
    (with_(["kernels", 0, "name"], "nope"), "unknown library kernel"),
    (with_(["kernels", 0, "source"], "", cuda_doc()), "kernels[0].source"),
    (with_(["kernels", 0, "source"], "  \n", cuda_doc()), "kernels[0].source"),
    (with_(["kernels", 0, "options"], "-O3", cuda_doc()), "kernels[0].options"),
    (with_(["kernels", 0, "options"], [3], cuda_doc()), "kernels[0].options[0]"),
    (with_(["kernels", 0, "cpu"], 5, cuda_doc()), "kernels[0].cpu"),
    (with_(["kernels", 0, "cpu"], "os:system", cuda_doc()), "kernels[0].cpu"),
    (with_(["kernels", 0, "cpu"], "sys:exit", cuda_doc()), "standard library"),
    (with_(["kernels", 0, "cpu"], "builtins:exec", cuda_doc()), "standard library"),
    (with_(["kernels", 0, "cpu"], "dask_kaas.config:os.system", cuda_doc()), "kernels[0].cpu"),
    (with_(["kernels", 0, "cpu"], "dask_kaas.bench.__main__:main", cuda_doc()), "public names"),
    (with_(["kernels", 0, "cpu"], "numpy:ndarray.sum", cuda_doc()), "kernels[0].cpu"),
    (with_(["kernels", 0, "cpu"], "numpy:__class__", cuda_doc()), "public names"),
    ("not a dict", "must be an object"),
    (None, "must be an object"),
]


@pytest.mark.parametrize("doc,fragment", HOSTILE, ids=[str(i) for i in range(len(HOSTILE))])
def test_hostile_documents_are_refused_naming_the_field(doc, fragment):
    with pytest.raises(SerializationError) as e:
        KernelGraph.from_dict(doc)
    assert fragment in str(e.value)
    if isinstance(doc, dict):  # the same through JSON text and UTF-8 bytes
        text = json.dumps(doc)
        for form in (text, text.encode()):
            with pytest.raises(SerializationError) as e2:
                KernelGraph.from_json(form)
            assert fragment in str(e2.value)


@pytest.mark.parametrize("text,fragment", [
    (b"\xff\xfe{}", "not UTF-8"),
    (b'{"name": "\xc3"}', "not UTF-8"),
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ('{"a":' * 50_000 + "1" + "}" * 50_000, "nested too deeply"),
    ("1" * 5000, "not valid JSON"),
    ('{"name": "a", "name": "b"}', "duplicate key 'name'"),
    ('{"literal": NaN}', "non-finite"),
    ("", "not valid JSON"),
    ("\ufeff{}", "not valid JSON"),
    (None, "JSON text or UTF-8 bytes"),
    (12, "JSON text or UTF-8 bytes"),
    ({"name": "x"}, "JSON text or UTF-8 bytes"),
])
def test_hostile_text_is_refused(text, fragment):
    with pytest.raises(SerializationError, match=fragment):
        KernelGraph.from_json(text)


def test_lone_surrogate_names_are_refused():
    text = json.dumps(base()).replace('"lib"', '"\\ud800"', 1)
    with pytest.raises(SerializationError, match="surrogate"):
        KernelGraph.from_json(text)


def test_size_cap():
    text = json.dumps(base())
    with dask.config.set({"kaas.max-graph-document": len(text) - 1}):
        with pytest.raises(SerializationError, match="max-graph-document"):
            KernelGraph.from_json(text)
        with pytest.raises(SerializationError, match="max-graph-document"):
            KernelGraph.from_json(text.encode())
    assert KernelGraph.from_json(text) == library_graph()


def test_n_iter_cap_follows_config():
    doc = with_(["n_iter"], 50)
    with dask.config.set({"kaas.max-n-iter": 49}):
        with pytest.raises(SerializationError, match="n_iter"):
            KernelGraph.from_dict(doc)
    assert KernelGraph.from_dict(doc).n_iter == 50


def test_builder_errors_keep_their_cause_and_context():
    doc = with_(["launches", 0, "args", 2, "mode"], "in")  # axpy's y must be written
    with pytest.raises(SerializationError) as e:
        KernelGraph.from_dict(doc)
    assert e.value.graph == "lib" and e.value.launch == 0
    assert type(e.value.__cause__).__name__ == "BufferRoleError"


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=120)


def test_reading_imports_no_module_it_may_not():
    """``"fn": "this:s"`` printed the Zen of Python; now nothing is imported
    (checked in a fresh interpreter, where nothing imported ``this`` before)."""
    r = _run("""
        import json, sys
        from dask_kaas import KernelGraph, SerializationError
        from dask_kaas.workloads import sgemm
        d = sgemm.link_graph(4).to_dict()
        i = [k["kind"] for k in d["kernels"]].index("array")
        for ref in ["this:s", "antigravity:geohash", "dask_kaas.bench.__main__:main",
                    "dask_kaas.bench.cli:main"]:
            d["kernels"][i]["fn"] = ref
            try:
                KernelGraph.from_json(json.dumps(d))
            except SerializationError as e:
                print("refused", ref, "|", e)
        print(sorted(m for m in ("this", "antigravity", "dask_kaas.bench.__main__",
                                 "dask_kaas.bench.cli", "webbrowser") if m in sys.modules))
    """)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert "Beautiful is better than ugly" not in r.stdout
    assert lines[-1] == "[]"
    # not even the project's own command line: only dask_kaas.workloads is listed
    assert sum(line.startswith("refused") for line in lines) == 4
    assert "dask_kaas.bench" not in r.stdout.splitlines()[-1]


def test_listed_modules_are_imported_others_are_not(tmp_path, monkeypatch):
    (tmp_path / "kaas_user_kernels.py").write_text(
        "IMPORTED = True\n\ndef scale(xp, x, y):\n    y[...] = 2 * x\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    d = sgemm.link_graph(4).to_dict()
    i = [k["kind"] for k in d["kernels"]].index("array")
    d["kernels"][i]["fn"] = "kaas_user_kernels:scale"
    with pytest.raises(SerializationError, match="kaas.array-modules"):
        KernelGraph.from_dict(d)
    assert "kaas_user_kernels" not in sys.modules
    with dask.config.set({"kaas.array-modules": ["numpy", "kaas_user_kernels"]}):
        g = KernelGraph.from_dict(d)
    try:
        assert g.launches[1].kernel.fn is sys.modules["kaas_user_kernels"].scale
        # once imported, the module may be named without the listing
        assert KernelGraph.from_json(g.to_json()) == g
    finally:
        sys.modules.pop("kaas_user_kernels", None)


def test_functions_of_the_standard_library_cannot_be_written_either():
    import math

    g = KernelGraph("std")
    x = g.input("x", (2,), np.float64)
    y = g.output("y", (2,), np.float64)
    g.launch(Kernel.array(math.fsum), [x, Out(y)])
    with pytest.raises(SerializationError, match="standard library"):
        g.to_json()


@pytest.mark.parametrize("make", [library_graph, lambda: mlp.mlp_graph(2, 4, 8, 2),
                                  lambda: jacobi.jacobi_graph(8, 3),
                                  lambda: sgemm.link_graph(4)])
def test_shipped_graphs_still_round_trip(make):
    g = make()
    text = g.to_json()
    back = KernelGraph.from_json(text.encode())
    assert back == g and back.to_json() == text


def test_no_n_iter_cap_still_bounds_it_to_64_bits():
    with dask.config.set({"kaas.max-n-iter": None}):
        assert KernelGraph.from_dict(with_(["n_iter"], 2**40)).n_iter == 2**40
        with pytest.raises(SerializationError, match="n_iter"):
            KernelGraph.from_dict(with_(["n_iter"], 2**64))


@pytest.mark.parametrize("key,value", [
    ("kaas.array-modules", 5), ("kaas.array-modules", [None]),
    ("kaas.max-graph-document", "lots"), ("kaas.max-graph-document", -1),
    ("kaas.max-graph-document", float("inf")), ("kaas.max-n-iter", "many"),
    ("kaas.max-n-iter", 0),
])
def test_bad_config_values_are_a_serialization_error(key, value):
    text = sgemm.link_graph(4).to_json()
    with dask.config.set({key: value}):
        with pytest.raises(KaasError, match=key):
            KernelGraph.from_json(text)


def test_cuda_source_that_cannot_be_written_is_refused_when_built():
    from dask_kaas import KernelDefinitionError

    for kw in ({"source": "__global__ void k() {} // \ud800"},
               {"source": "__global__ void k() {}", "options": ["-D\udfff"]}):
        with pytest.raises(KernelDefinitionError, match="Unicode"):
            Kernel.cuda(name="k", **kw)
    for kw in ({"options": 5}, {"options": "-O3"}, {"name_expressions": 5},
               {"options": [b"-O3"]}):
        with pytest.raises(KernelDefinitionError, match="list of strings"):
            Kernel.cuda("__global__ void k() {}", "k", **kw)
