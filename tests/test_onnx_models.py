"""Real architectures through submit_kernel_graph on a real cluster, against
onnxruntime: the nine model-zoo CNNs shipped with onnx (seeded random
weights) and a BERT-style encoder, at rtol 1e-3 / atol 1e-4.  The three with
hundreds of MiB of weights (VGG-19, AlexNet, ZFNet-512) are marked slow."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from dask_kaas import KaasClient, LocalKaasCluster, submit_kernel_graph  # noqa: E402
from dask_kaas.graph import (  # noqa: E402
    InputMismatchError,
    KaasError,
    Kernel,
    KernelGraph,
    MissingInputError,
    Out,
    TenantError,
    UnexpectedInputError,
)
from dask_kaas.onnx import UnsupportedOperatorError, from_onnx  # noqa: E402
from dask_kaas.onnx.serve import OnnxModel, register_onnx_model  # noqa: E402
from dask_kaas.onnx.zoo import bert_encoder, bert_inputs, light_input, light_model  # noqa: E402

RTOL, ATOL = 1e-3, 1e-4
FAST = ["resnet50", "densenet121", "inception_v1", "inception_v2", "shufflenet", "squeezenet"]
#: Hundreds of MiB of weights each (sent to the cluster and compared): slow.
SLOW = ["vgg19", "bvlc_alexnet", "zfnet512"]


@pytest.fixture(scope="module")
def big_client():
    with LocalKaasCluster(2, backend="cpu", dashboard_address=None,
                          device_memory_limit="1500MB") as cluster, \
            KaasClient(cluster) as client:
        yield client


def reference(model, feed):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    s = ort.InferenceSession(model.SerializeToString(), so,
                             providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in s.get_outputs()], s.run(None, feed)))


def check_light(client, name):
    model, data = light_model(name, seed=3)
    x = light_input(seed=4)
    g, consts = from_onnx(model)
    got = submit_kernel_graph(g, {**consts, data: x}, client, tenant=name).result()
    ref = reference(model, {data: x})
    assert set(got) == set(ref)
    for k, r in ref.items():
        assert np.isfinite(r).all()
        np.testing.assert_allclose(got[k], r, rtol=RTOL, atol=ATOL)
    d = g.describe()
    print(f"{name}: {len(g.launches)} launches, temps {d['temp_sum_bytes'] / 2**20:.1f} MiB "
          f"-> {d['temp_peak_bytes'] / 2**20:.1f} MiB planned")


@pytest.mark.parametrize("name", FAST)
def test_light_model_matches_onnxruntime(big_client, name):
    check_light(big_client, name)


@pytest.mark.slow
@pytest.mark.parametrize("name", SLOW)
def test_heavy_light_model_matches_onnxruntime(big_client, name):
    check_light(big_client, name)


def test_bert_encoder_matches_onnxruntime_at_several_batches(client):
    model = bert_encoder(layers=2, seed=5)
    for batch in (1, 4):
        g, consts = from_onnx(model, batch=batch)
        feed = bert_inputs(batch, seed=batch)
        got = submit_kernel_graph(g, {**consts, **feed}, client, tenant="bert").result()
        ref = reference(model, feed)
        for k, r in ref.items():
            np.testing.assert_allclose(got[k], r, rtol=RTOL, atol=ATOL)
    ops = {launch.kernel.name for launch in g.launches}
    assert {"Gather", "MatMul", "Softmax", "LayerNormalization", "Erf"} <= ops


def test_registered_model_is_called_by_input_names_at_any_batch(client):
    model = bert_encoder(layers=1, seed=7)
    m = register_onnx_model(client, model, tenant="alice")
    assert list(m.inputs) == ["input_ids", "attention_mask"]
    assert m.inputs["input_ids"][0] == (None, 16)
    for batch in (2, 3, 2):
        feed = bert_inputs(batch, seed=10 + batch)
        got = m(**feed)
        ref = reference(model, feed)
        for k in m.outputs:
            np.testing.assert_allclose(got[k], ref[k], rtol=RTOL, atol=ATOL)
    assert len(m._graphs) == 2  # one graph per distinct shape, reused
    positional = m(feed["input_ids"], feed["attention_mask"])
    np.testing.assert_array_equal(positional["pooled"], got["pooled"])
    assert m.submit(feed).result()["pooled"].shape == (2, 64)
    with pytest.raises(MissingInputError):
        m(input_ids=feed["input_ids"])
    with pytest.raises(UnexpectedInputError):
        m(**feed, other=feed["input_ids"])
    with pytest.raises(InputMismatchError):
        m(input_ids=[[1, 2]], attention_mask=feed["attention_mask"])
    with pytest.raises(KaasError):  # a fixed dimension of the wrong size
        m(input_ids=np.zeros((2, 5), np.int64), attention_mask=np.ones((2, 5), np.float32))
    with pytest.raises(TenantError):
        register_onnx_model(client, model, tenant="")
    with pytest.raises(KaasError):
        OnnxModel(model, client, max_graphs=0)


def test_a_registered_model_the_table_cannot_run_is_refused_at_registration(client):
    from onnx import TensorProto, helper

    node = helper.make_node("NonZero", ["x"], ["y"], name="nz")
    model = helper.make_model(helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.INT64, None)]),
        opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(UnsupportedOperatorError, match="nz.*NonZero"):
        register_onnx_model(client, model)


def _dirty(xp, y):
    y[...] = 5


def _copy(xp, x, y):
    y[...] = x


def _first_half(xp, x, y):
    y[: y.shape[0] // 2] = x[: y.shape[0] // 2]


def test_a_reused_temp_starts_zeroed_on_the_worker(client):
    """The memory plan puts t3 where t1 was; a kernel that writes only half
    of t3 must still find zeros in the other half (as without planning)."""
    g = KernelGraph("reuse")
    x = g.input("x", (1024,), np.float32)
    t1 = g.temp("t1", (1024,), np.float32)
    t2 = g.temp("t2", (1024,), np.float32)
    t3 = g.temp("t3", (1024,), np.float32)
    y1 = g.output("y1", (1024,), np.float32)
    y2 = g.output("y2", (1024,), np.float32)
    g.launch(Kernel.array(_dirty), [Out(t1)])
    g.launch(Kernel.array(_copy), [t1, Out(t2)])
    g.launch(Kernel.array(_first_half), [x, Out(t3)])
    g.launch(Kernel.array(_copy), [t2, Out(y1)])
    g.launch(Kernel.array(_copy), [t3, Out(y2)])
    assert g.describe()["temp_peak_bytes"] < g.describe()["temp_sum_bytes"]
    x_val = np.arange(1024, dtype=np.float32)
    out = submit_kernel_graph(g, {"x": x_val}, client).result()
    np.testing.assert_array_equal(out["y1"], np.full(1024, 5, np.float32))
    np.testing.assert_array_equal(out["y2"][:512], x_val[:512])
    np.testing.assert_array_equal(out["y2"][512:], 0)


def test_many_requests_share_cached_weights(client):
    """A second request of the same model sends no weights again."""
    model, data = light_model("squeezenet", seed=1)
    g, consts = from_onnx(model)
    xs = [light_input(seed=s) for s in range(3)]
    futs = [submit_kernel_graph(g, {**consts, data: x}, client, tenant="sq") for x in xs]
    for x, f in zip(xs, futs):
        np.testing.assert_allclose(f.result()["softmaxout_1"],
                                   reference(model, {data: x})["softmaxout_1"],
                                   rtol=RTOL, atol=ATOL)


def test_a_scikit_learn_classifier_converted_with_skl2onnx(client):
    """MLPClassifier through skl2onnx: with zipmap=False every operator is in
    the table (ArrayFeatureExtractor of ai.onnx.ml included) and labels and
    probabilities match onnxruntime; with ZipMap (a sequence of maps, not a
    tensor) the import refuses, naming it."""
    pytest.importorskip("sklearn")
    skl2onnx = pytest.importorskip("skl2onnx")
    from sklearn.neural_network import MLPClassifier

    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 8)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(int) + (x[:, 2] > 1)
    clf = MLPClassifier((16,), max_iter=400, random_state=0).fit(x, y)
    model = skl2onnx.to_onnx(clf, x[:1], options={id(clf): {"zipmap": False}},
                             target_opset=17)
    m = register_onnx_model(client, model, tenant="sklearn")
    got = m(X=x[:7])
    ref = reference(model, {"X": x[:7]})
    np.testing.assert_array_equal(got["label"], ref["label"])
    np.testing.assert_array_equal(got["label"], clf.predict(x[:7]))
    np.testing.assert_allclose(got["probabilities"], ref["probabilities"], rtol=RTOL,
                               atol=ATOL)
    with_zipmap = skl2onnx.to_onnx(clf, x[:1], target_opset=17)
    with pytest.raises(UnsupportedOperatorError, match="ZipMap.*ai.onnx.ml"):
        from_onnx(with_zipmap, batch=1)


def test_the_onnx_resnet_example(big_client):
    import onnx_resnet

    assert onnx_resnet.main(big_client, "squeezenet", tenants=2, requests=1) < 1e-3


@pytest.mark.parametrize("model", [b"garbage", 7, None, "/no/such.onnx", b"\x0a\xff\xff"])
def test_hostile_models_for_registration_and_the_backend(client, model):
    from dask_kaas.onnx.backend import KaasBackend

    with pytest.raises(KaasError):
        register_onnx_model(client, model)
    with pytest.raises(KaasError):
        KaasBackend.prepare(model, "CPU", client=client)
    assert KaasBackend.is_compatible(model) is False


def test_hostile_literals_in_a_graph_document_fail_their_request(client):
    """A JSON document may carry any literals; an ONNX kernel checks them
    against its buffers before looping or allocating (a window of 10**6 x
    10**6 is refused, not run), and only that request fails."""
    from onnx import TensorProto, helper

    from dask_kaas.graph import KernelExecutionError

    pool = helper.make_model(helper.make_graph(
        [helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[2, 2])], "pool",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]),
        opset_imports=[helper.make_opsetid("", 17)])
    g, _ = from_onnx(pool)
    x = np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4)
    good = submit_kernel_graph(g, {"x": x}, client).result()["y"]
    np.testing.assert_array_equal(good, reference(pool, {"x": x})["y"])
    doc = g.to_dict()
    lits = [a for a in doc["launches"][0]["args"] if "literal" in a]
    assert [v["literal"] for v in lits[1:4]] == [2, 2, 2]  # kernel_shape
    for bad in ([10**6, 10**6], [0, 2], [-3, 2]):
        lits[2]["literal"], lits[3]["literal"] = bad
        hostile = KernelGraph.from_dict(doc)
        with pytest.raises(KernelExecutionError, match="window"):
            submit_kernel_graph(hostile, {"x": x}, client).result()
    lits[2]["literal"] = lits[3]["literal"] = 2
    lits[0]["literal"] = 5  # more outputs than buffers
    with pytest.raises(KaasError):
        submit_kernel_graph(KernelGraph.from_dict(doc), {"x": x}, client).result()


def test_client_method_registers_a_model_from_bytes_and_refuses_junk(client, tmp_path):
    """``KaasClient.register_onnx_model`` is the one-call entry point: the
    model's serialized bytes (or a path) in, a callable out whose answers are
    onnxruntime's; junk in is a KaasError naming what is wrong."""
    model = bert_encoder(layers=1, seed=11)
    m = client.register_onnx_model(model.SerializeToString(), tenant="carol", name="enc")
    feed = bert_inputs(3, seed=4)
    got = m(**feed)
    ref = reference(model, feed)
    for k in m.outputs:
        np.testing.assert_allclose(got[k], ref[k], rtol=RTOL, atol=ATOL)
    path = tmp_path / "enc.onnx"
    path.write_bytes(model.SerializeToString())
    by_path = client.register_onnx_model(str(path), tenant="carol", batch=3)
    np.testing.assert_allclose(by_path(**feed)["pooled"], ref["pooled"], rtol=RTOL, atol=ATOL)
    for junk in (b"\xff\xfe not a model", 12, None, str(tmp_path / "missing.onnx"),
                 "\udcff.onnx", [[[[]]]]):
        with pytest.raises(KaasError):
            client.register_onnx_model(junk, tenant="carol")
    for bad in ({"batch": -1}, {"batch": 2**40}, {"max_graphs": "8"}, {"tenant": 5},
                {"tenant": "x" * 10_000}, {"name": 5}, {"name": "\udcff"},
                {"name": "x" * 1_000_000}, {"name": b"\xff"}, {"name": ""}):
        with pytest.raises(KaasError):
            client.register_onnx_model(model, **bad)


@pytest.mark.parametrize("without_ort", [False, True])
def test_the_device_checks_model_check_compares_with_a_reference(client, monkeypatch,
                                                                without_ort):
    """``python -m dask_kaas.onnx.model_check`` (run by gpu-check.sh on the
    CUDA backend): onnxruntime's answers where it is installed, else the same
    graph on NumPy in-process (the GPU image has no onnxruntime)."""
    import sys

    from dask_kaas.onnx import model_check

    if without_ort:
        monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails
    r = model_check.check(client, "squeezenet", requests=2)
    assert r["reference"] == ("the same graph on NumPy in-process" if without_ort
                              else "onnxruntime (CPU)")
    assert r["largest_difference"] < 1e-3 and r["launches"] > 10


@pytest.mark.parametrize("argv", [["--model", "nope"], ["--requests", "0"],
                                  ["--requests", "10**9"], ["--backend", "tpu"]])
def test_model_check_refuses_bad_arguments(argv):
    from dask_kaas.onnx import model_check

    with pytest.raises(SystemExit) as e:
        model_check.main(argv)
    assert e.value.code == 2
