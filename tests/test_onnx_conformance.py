"""ONNX's own node conformance cases through the importer and a real
cluster: every case of an operator in the table passes or is refused at
import, none gives a wrong answer.  The table is printed (pytest -s)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("onnx")

from dask_kaas.onnx import conformance  # noqa: E402
from dask_kaas.onnx.backend import KaasBackend  # noqa: E402
from dask_kaas.onnx.execute import run_graph  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

#: Operators the issue names: each must pass at least one ONNX case.
REQUIRED = ["Conv", "Gemm", "MatMul", "Add", "Sub", "Mul", "Div", "Sum", "Pow", "Sqrt", "Exp",
            "Erf", "Relu", "Sigmoid", "Tanh", "Gelu", "Clip", "LeakyRelu", "Softmax",
            "LogSoftmax", "BatchNormalization", "LayerNormalization", "LRN", "MaxPool",
            "AveragePool", "GlobalAveragePool", "Concat", "Split", "Slice", "Reshape",
            "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Gather", "Cast", "Where",
            "ReduceMean", "ReduceSum", "Identity", "Dropout"]


@pytest.fixture(scope="module")
def cases(client):
    cs = conformance.collect()
    conformance.run(cs, client)
    print("\n" + conformance.format_table(cs))
    return cs


def test_no_case_of_a_supported_operator_gives_a_wrong_answer(cases):
    wrong = [(c.name, c.detail) for c in cases if c.outcome == "wrong"]
    assert wrong == []
    assert {c.outcome for c in cases} <= {"passed", "refused"}


def test_at_least_45_operators_pass_and_every_issue_operator_does(cases):
    rows = conformance.table(cases)
    passing = {op for op, c in rows.items() if c["passed"]}
    assert len(passing) >= 45
    assert [op for op in REQUIRED if op not in passing] == []
    total = sum(c["passed"] for c in rows.values())
    assert total >= 800, total


def test_refusals_name_what_is_unsupported(cases):
    refused = [c for c in cases if c.outcome == "refused"]
    assert refused
    for c in refused:
        assert c.detail and len(c.detail) < 1000
    by_name = {c.name: c.detail for c in refused}
    assert "training" in by_name["test_batchnorm_example_training_mode"]
    assert "BFLOAT16" in by_name["test_cast_FLOAT_to_BFLOAT16"]


def test_onnx_backend_runs_cases_through_the_cluster(client):
    """onnx.backend.base.Backend: prepare + run, as ONNX's runners call it."""
    from onnx.backend.test.case.node import collect_testcases

    names = {"test_conv_with_strides_padding", "test_softmax_axis_0",
             "test_gemm_all_attributes", "test_reshape_negative_dim", "test_slice_neg_steps",
             "test_layer_normalization_4d_axis1", "test_maxpool_2d_ceil",
             "test_averagepool_2d_pads_count_include_pad"}
    seen = set()
    for tc in collect_testcases(None):
        if tc.name not in names:
            continue
        seen.add(tc.name)
        rep = KaasBackend.prepare(tc.model, "CPU", client=client, tenant="backend-test")
        for inputs, outputs in tc.data_sets:
            got = rep.run([np.asarray(v) for v in inputs])
            assert len(got) == len(outputs)
            for g, e in zip(got, outputs):
                np.testing.assert_allclose(g, e, rtol=tc.rtol, atol=tc.atol)
    assert seen == names
    assert KaasBackend.supports_device("CPU")
    assert not KaasBackend.supports_device("TPU")


#: Functions of CuPy's documented API (docs.cupy.dev reference: ufuncs,
#: creation, manipulation, indexing, reductions) that NumPy has too: the only
#: ones an operator may call on ``xp``.
CUPY_API = set("""
abs add amax amin arange arccos arccosh arcsin arcsinh arctan arctanh argmax argmin
around asarray bitwise_and bitwise_or bitwise_xor broadcast_to ceil clip concatenate cos
cosh cumsum divide empty equal exp expand_dims flip floor floor_divide fmod full greater
greater_equal isfinite isinf isnan less less_equal log logaddexp logical_and logical_not
logical_or logical_xor matmul maximum mean minimum multiply negative ones pad power prod
reciprocal remainder reshape rint sign sin sinh sqrt square subtract sum take
take_along_axis tan tanh tile transpose tril triu where zeros zeros_like
""".split())


class CupyLike:
    """NumPy that answers only with CuPy's functions (and is not ``np``, so
    kernels take their CuPy paths: no NumPy-only chunking)."""

    def __getattr__(self, name):
        if name not in CUPY_API:
            raise AttributeError(f"xp.{name} is not a CuPy function")
        return getattr(np, name)


def test_every_passing_case_runs_with_only_cupy_functions(cases):
    """The table works on CuPy by construction: each passing case, run in
    process with an ``xp`` that has only CuPy's functions, still passes."""
    xp = CupyLike()
    checked = 0
    for case in cases:
        if case.outcome != "passed":
            continue
        got = run_graph(case.graph, case.feed, xp=xp)
        for name, ref in case.expected.items():
            if ref.dtype.kind in "fc":
                np.testing.assert_allclose(got[name].astype(np.float64),
                                           ref.astype(np.float64), rtol=case.rtol,
                                           atol=case.atol, equal_nan=True, err_msg=case.name)
            else:
                np.testing.assert_array_equal(got[name], ref, err_msg=case.name)
        checked += 1
    assert checked >= 800
