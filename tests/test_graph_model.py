"""The kernel-graph data model: building, validation errors, dict/JSON form."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dask_kaas import (
    BufferRoleError,
    DuplicateBufferError,
    GraphTooLargeError,
    In,
    InOut,
    InputMismatchError,
    KaasError,
    Kernel,
    KernelDefinitionError,
    KernelGraph,
    LaunchConfigError,
    LiteralTypeError,
    MissingInputError,
    Out,
    SerializationError,
    UnexpectedInputError,
    UninitializedReadError,
    UnknownBufferError,
    UnwrittenOutputError,
)
from dask_kaas.workloads import jacobi, mlp

gemm = Kernel.library("gemm")
relu = Kernel.library("relu")
copy = Kernel.library("copy")


def scale_fn(xp, x, y, a):
    y[...] = a * x


scale = Kernel.array(scale_fn)


def simple():
    g = KernelGraph("simple")
    x = g.input("x", (4, 4), np.float32)
    w = g.const("w", (4, 4), np.float32)
    y = g.output("y", (4, 4), np.float32)
    return g, x, w, y


def test_error_names_graph_launch_and_buffer():
    g, x, w, y = simple()
    g.launch(gemm, [x, w, Out(y)])
    with pytest.raises(BufferRoleError) as e:
        g.launch(relu, [x, Out(w)])
    assert e.value.graph == "simple" and e.value.launch == 1 and e.value.buffer == "w"
    assert "graph 'simple'" in str(e.value) and "launch 1 (kernel 'relu')" in str(e.value)
    assert "buffer 'w'" in str(e.value)
    assert isinstance(e.value, KaasError)


def test_duplicate_buffer():
    g, *_ = simple()
    with pytest.raises(DuplicateBufferError, match="'x'"):
        g.temp("x", (2,), np.float32)


def test_foreign_buffer():
    g, x, w, y = simple()
    other = KernelGraph("other")
    z = other.output("z", (4, 4), np.float32)
    with pytest.raises(UnknownBufferError, match="belongs to graph 'other'") as e:
        g.launch(relu, [x, Out(z)])
    assert e.value.buffer == "z"


@pytest.mark.parametrize("literal,hint", [(3, "np.int32"), (0.5, "np.float32"),
                                          (True, "np.bool_"), ("3", "")])
def test_python_literals_are_rejected(literal, hint):
    g, x, w, y = simple()
    with pytest.raises(LiteralTypeError, match="argument 2") as e:
        g.launch(scale, [x, Out(y), literal])
    assert hint in str(e.value)


def test_numpy_literals_are_accepted():
    g, x, w, y = simple()
    g.launch(scale, [x, Out(y), np.float32(2)])
    assert g.launches[0].args[2].dtype == np.float32


def test_read_before_write_and_unwritten_output():
    g = KernelGraph("rw")
    x = g.input("x", (4,), np.float32)
    t = g.temp("t", (4,), np.float32)
    y = g.output("y", (4,), np.float32)
    z = g.output("z", (4,), np.float32)
    g.launch(relu, [t, Out(y)])
    with pytest.raises(UninitializedReadError) as e:
        g.validate()
    assert e.value.buffer == "t" and e.value.launch == 0
    g2 = KernelGraph("unwritten")
    x = g2.input("x", (4,), np.float32)
    y = g2.output("y", (4,), np.float32)
    g2.output("z", (4,), np.float32)
    g2.launch(relu, [x, Out(y)])
    with pytest.raises(UnwrittenOutputError, match="'z'"):
        g2.validate()
    del z


def test_role_conflicts():
    g, x, w, y = simple()
    with pytest.raises(BufferRoleError, match="const"):
        g.launch(copy, [x, Out(w)])
    with pytest.raises(BufferRoleError, match="aliasing"):
        g.launch(Kernel.library("add"), [x, x, Out(x)])
    with pytest.raises(BufferRoleError, match="InOut"):
        g.launch(Kernel.library("axpy"), [np.float32(1), x, Out(y)])


def test_inputs_missing_extra_and_mismatched():
    g, x, w, y = simple()
    g.launch(gemm, [x, w, Out(y)])
    ok = {"x": np.zeros((4, 4), np.float32), "w": np.zeros((4, 4), np.float32)}
    g.validate(ok)
    with pytest.raises(MissingInputError, match="'w'"):
        g.validate({"x": ok["x"]})
    with pytest.raises(UnexpectedInputError, match="'y'.*output"):
        g.validate({**ok, "y": ok["x"]})
    with pytest.raises(UnexpectedInputError, match="'q'"):
        g.validate({**ok, "q": ok["x"]})
    with pytest.raises(InputMismatchError, match="shape"):
        g.validate({**ok, "x": np.zeros((4, 5), np.float32)})
    with pytest.raises(InputMismatchError, match="float64"):
        g.validate({**ok, "x": np.zeros((4, 4))})


@pytest.mark.parametrize("grid,block,match", [
    (0, 32, "grid"), ((1, 1, 1, 1), 32, "1 to 3"), (1, 2048, "block"), (1, (32, 32, 2), "2048"),
    (1, (1, 1, 65), "block\\[2\\]"), (1.5, 32, "int"), (None, 32, "needs both"),
])
def test_bad_launch_dims(grid, block, match):
    g, x, w, y = simple()
    k = Kernel.cuda("extern \"C\" __global__ void f(float* y) {}", "f")
    with pytest.raises(LaunchConfigError, match=match):
        g.launch(k, [Out(y)], grid=grid, block=block)


def test_bad_shared_mem():
    g, x, w, y = simple()
    k = Kernel.cuda("extern \"C\" __global__ void f(float* y) {}", "f")
    with pytest.raises(LaunchConfigError, match="shared_mem"):
        g.launch(k, [Out(y)], grid=1, block=32, shared_mem=10**7)


def test_graph_larger_than_any_device():
    g, x, w, y = simple()
    g.launch(gemm, [x, w, Out(y)])
    g.validate(device_capacity=g.nbytes)
    with pytest.raises(GraphTooLargeError, match=str(g.nbytes)):
        g.validate(device_capacity=g.nbytes - 1)


def test_library_argument_checks():
    g = KernelGraph("lib")
    a = g.input("a", (4, 3), np.float32)
    b = g.input("b", (4, 3), np.float32)
    c = g.output("c", (4, 3), np.float32)
    with pytest.raises(KaasError, match="do not chain"):
        g.launch(gemm, [a, b, Out(c)])
    with pytest.raises(KaasError, match="takes 3 to 5 arguments"):
        g.launch(gemm, [a])
    with pytest.raises(KernelDefinitionError, match="unknown library kernel"):
        Kernel.library("conv9d")


def test_lambda_graph_cannot_be_json_but_names_kernel():
    g, x, w, y = simple()
    g.launch(Kernel.array(lambda xp, a, b: None, name="anon"), [x, Out(y)])
    with pytest.raises(SerializationError, match="lambda") as e:
        g.to_json()
    assert e.value.kernel == "anon"


def test_examples_round_trip_exactly():
    for g in [mlp.mlp_graph(8, 16, 32, 4), jacobi.jacobi_graph(64, 10)]:
        d = g.to_dict()
        g2 = KernelGraph.from_json(json.dumps(d))
        assert g2 == g
        assert g2.to_dict() == d
        assert g2.launches[0].kernel.cpu is g.launches[0].kernel.cpu or \
            g2.launches[0].kernel.kind == "library"


def test_cuda_file_round_trip(tmp_path):
    p = tmp_path / "k.ptx"
    p.write_bytes(b".version 8.0\n.target sm_90\n// fake ptx body \x00\x01")
    g, x, w, y = simple()
    g.launch(Kernel.cuda_file(p, "k", cpu=jacobi.jacobi_step_cpu), [x, Out(y)], grid=1, block=1)
    g2 = KernelGraph.from_json(g.to_json())
    assert g2 == g and g2.launches[0].kernel.image == p.read_bytes()
    with pytest.raises(KernelDefinitionError, match=".ptx or .cubin"):
        Kernel.cuda_file(tmp_path / "k.txt", "k")


def test_from_dict_rejects_malformed_documents():
    g, x, w, y = simple()
    g.launch(gemm, [x, w, Out(y)])
    d = g.to_dict()
    bad = json.loads(json.dumps(d))
    bad["launches"][0]["args"][0]["buffer"] = "nope"
    with pytest.raises(SerializationError, match="unknown buffer 'nope'"):
        KernelGraph.from_dict(bad)
    bad = json.loads(json.dumps(d))
    del bad["buffers"]
    with pytest.raises(SerializationError, match="lacks field 'buffers'"):
        KernelGraph.from_dict(bad)
    with pytest.raises(SerializationError, match="format"):
        KernelGraph.from_dict({**d, "format": "other/9"})
    with pytest.raises(SerializationError, match="JSON"):
        KernelGraph.from_json("{not json")


def test_errors_survive_pickling():
    import pickle

    e = UninitializedReadError("msg", graph="g", launch=3, kernel="k", buffer="b")
    e2 = pickle.loads(pickle.dumps(e))
    assert type(e2) is UninitializedReadError and str(e2) == str(e) and e2.launch == 3


# -- property tests --------------------------------------------------------

DTYPES = ["float32", "float64", "int32", "int64", "uint8", "int8", "float16", "complex64",
          "bool"]
shapes = st.lists(st.integers(0, 5), min_size=0, max_size=3).map(tuple)


def literal_strategy():
    return st.one_of(
        st.floats(allow_nan=True, allow_infinity=True, width=32).map(np.float32),
        st.floats(allow_nan=True, allow_infinity=True).map(np.float64),
        st.integers(-2**31, 2**31 - 1).map(np.int32),
        st.integers(-2**63, 2**63 - 1).map(np.int64),
        st.integers(0, 255).map(np.uint8),
        st.booleans().map(np.bool_),
        st.complex_numbers(allow_nan=False, width=64).map(np.complex64),
    )


@st.composite
def graphs(draw):
    g = KernelGraph(draw(st.text(min_size=1, max_size=8)), n_iter=draw(st.integers(1, 5)))
    n = draw(st.integers(1, 5))
    bufs = []
    kinds = [g.input, g.const, g.temp, g.output]
    for i in range(n):
        make = draw(st.sampled_from(kinds))
        bufs.append(make(f"b{i}", draw(shapes), draw(st.sampled_from(DTYPES))))
    for _ in range(draw(st.integers(1, 4))):
        args = []
        used = set()
        for _ in range(draw(st.integers(0, 4))):
            if draw(st.booleans()) and bufs:
                b = draw(st.sampled_from(bufs))
                if b.name in used:
                    continue
                used.add(b.name)
                wrap = In if b.kind.value == "const" else draw(st.sampled_from([In, Out, InOut]))
                args.append(wrap(b))
            else:
                args.append(draw(literal_strategy()))
        grid = draw(st.one_of(st.none(), st.integers(1, 1000),
                              st.tuples(st.integers(1, 100), st.integers(1, 100))))
        kernel = draw(st.sampled_from([scale, Kernel.array(scale_fn, name="other")]))
        g.launch(kernel, args, grid=grid, block=None if grid is None else 32)
    return g


@settings(max_examples=150, deadline=None)
@given(graphs())
def test_dict_and_json_round_trip_exactly(g):
    d = g.to_dict()
    back = KernelGraph.from_dict(d)
    assert back == g
    assert back.to_dict() == d
    text = g.to_json()
    assert json.loads(text) == json.loads(KernelGraph.from_json(text).to_json())
    def strict(name):
        raise AssertionError(f"non-standard JSON constant {name}")

    json.loads(text, parse_constant=strict)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from(["x", "w", "t", "y"]), min_size=1, max_size=6),
       st.lists(st.booleans(), min_size=6, max_size=6))
def test_dataflow_validation_matches_a_simple_model(reads, writes_first):
    """Random launch sequences: validation fails exactly when a temp/output is
    read before written or an output is never written."""
    g = KernelGraph("df")
    bufs = {"x": g.input("x", (2,), np.float32), "w": g.const("w", (2,), np.float32),
            "t": g.temp("t", (2,), np.float32), "y": g.output("y", (2,), np.float32)}
    written = {"x", "w"}
    expected_error = None
    for name, wf in zip(reads, writes_first):
        target = "t" if name in ("x", "w") else ("y" if name == "t" else "t")
        if wf:
            g.launch(copy, [bufs["x"], Out(bufs[name if name in ("t", "y") else target])])
            written.add(name if name in ("t", "y") else target)
        else:
            if name in ("t", "y") and name not in written and expected_error is None:
                expected_error = UninitializedReadError
            g.launch(relu, [bufs[name], Out(bufs["y" if name != "y" else "t"])])
            written.add("y" if name != "y" else "t")
    if expected_error is None and "y" not in written:
        expected_error = UnwrittenOutputError
    if expected_error is None:
        g.validate()
    else:
        with pytest.raises(expected_error):
            g.validate()
