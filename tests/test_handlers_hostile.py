"""The scheduler's kaas_* handlers and update_graph against hostile input,
called the way a forged client would (raw scheduler RPC, hand-made request
annotations): each refusal reaches the caller as a KaasError and nothing of
it enters the plugin's state, so /kaas/state.json keeps answering."""

from __future__ import annotations

import json
import math
import urllib.request
import uuid

import dask
import numpy as np
import pytest

from dask_kaas import (
    KaasError,
    Kernel,
    KernelGraph,
    Out,
    RequestParameterError,
    TenantError,
)
from dask_kaas.plugin.tasks import run_kernel_graph
from dask_kaas.request import ANNOTATION, GraphRequest, InputRef, RequestTable


def state_json(cluster) -> dict:
    base = cluster.dashboard_link.rsplit("/", 1)[0]
    with urllib.request.urlopen(f"{base}/kaas/state.json", timeout=30) as r:
        assert r.status == 200
        return json.loads(r.read(), parse_constant=lambda c: pytest.fail(f"non-JSON {c}"))


@pytest.mark.parametrize("tenant,weight,error", [
    (5, 2.0, TenantError), (None, 2.0, TenantError), ("", 2.0, TenantError),
    ("t" * 201, 2.0, TenantError), (["a"], 2.0, TenantError), (("a", "b"), 2.0, TenantError),
    ("ok", 0, RequestParameterError), ("ok", -1, RequestParameterError),
    ("ok", math.nan, RequestParameterError), ("ok", math.inf, RequestParameterError),
    ("ok", "2", RequestParameterError), ("ok", True, RequestParameterError),
    ("ok", None, RequestParameterError), ("ok", [2.0], RequestParameterError),
])
def test_set_weight_refuses_hostile_arguments(client, cluster, tenant, weight, error):
    with pytest.raises(error):
        client.sync(client.scheduler.kaas_set_weight, tenant=tenant, weight=weight)
    state = state_json(cluster)
    assert "ok" not in state["weights"]
    assert all(isinstance(w, float) and 0 < w < math.inf for w in state["weights"].values())


@pytest.mark.parametrize("policy", [None, 5, ["affinity"], "fastest", "x" * 10_000])
def test_set_policy_refuses_hostile_arguments(client, cluster, policy):
    before = client.kaas_stats()["policy"]
    with pytest.raises(RequestParameterError, match="policy"):
        client.sync(client.scheduler.kaas_set_policy, policy=policy)
    assert client.kaas_stats()["policy"] == before
    state_json(cluster)


def relu_graph():
    g = KernelGraph("forged")
    x = g.input("x", (4,), np.float32)
    y = g.output("y", (4,), np.float32)
    g.launch(Kernel.library("relu"), [x, Out(y)])
    return g


def submit_forged(client, **fields):
    """Submit a graph task with a hand-made request annotation, bypassing
    every client-side check."""
    g = relu_graph()
    key = f"kaas-forged-{uuid.uuid4().hex}"
    req = dict(key=key, graph=g.name, tenant="forger",
               inputs=[InputRef("x", 16, None, None, False)], nbytes=g.nbytes)
    req.update(fields)
    request = GraphRequest(**req)
    x = np.array([-1, 2, -3, 4], np.float32)
    with dask.annotate(**{ANNOTATION: RequestTable([request])}):
        return client.submit(run_kernel_graph, g, request, x, key=key, resources={"GPU": 1},
                             pure=False)


@pytest.mark.parametrize("fields,error,fragment", [
    ({"tenant": 5}, TenantError, "tenant"),
    ({"tenant": ("a", "b")}, TenantError, "tenant"),
    ({"tenant": "t" * 10_000}, TenantError, "tenant"),
    ({"priority": 2**100}, RequestParameterError, "priority"),
    ({"priority": "high"}, RequestParameterError, "priority"),
    ({"weight": math.nan}, RequestParameterError, "weight"),
    ({"weight": -1.0}, RequestParameterError, "weight"),
    ({"graph": None}, RequestParameterError, "graph name"),
    ({"inputs": [InputRef("x", -5, None)]}, RequestParameterError, "input reference"),
    ({"push": -1}, RequestParameterError, "push"),
    ({"push": True}, RequestParameterError, "push"),
    ({"push": 2**80}, RequestParameterError, "push"),
    ({"push": "1MB"}, RequestParameterError, "push"),
    ({"push": 1.5}, RequestParameterError, "push"),
])
def test_forged_requests_are_refused_and_state_stays_readable(client, cluster, fields, error,
                                                               fragment):
    fut = submit_forged(client, **fields)
    with pytest.raises(error, match=fragment):
        fut.result(timeout=60)
    # the cluster still serves honest requests, and its state is valid JSON
    good = submit_forged(client, tenant="honest")
    np.testing.assert_array_equal(good.result(timeout=60)["y"], [0, 2, 0, 4])
    state = state_json(cluster)
    assert all(isinstance(t, str) and 0 < len(t) <= 200 for t in state["tenants"])
    assert "forger" not in state["tenants"]
    assert state["tenants"]["honest"]["graphs_run"] >= 1


def test_a_garbage_annotation_is_refused(client, cluster):
    key = f"kaas-garbage-{uuid.uuid4().hex}"
    with dask.annotate(**{ANNOTATION: {"key": key, "nonsense": [1, 2]}}):
        fut = client.submit(run_kernel_graph, relu_graph(), None, key=key,
                            resources={"GPU": 1}, pure=False)
    with pytest.raises(KaasError, match="malformed kaas request"):
        fut.result(timeout=60)
    state_json(cluster)


def test_state_encoding_is_strict_json_whatever_the_state():
    from dask_kaas.dashboard.routes import encode

    state = {"tenants": {5: {"p50": math.nan}, ("a", "b"): {"p99": math.inf}},
             "resident": {"w": {"x", "y"}}, "obj": object()}
    back = json.loads(encode(state), parse_constant=lambda c: pytest.fail(f"non-JSON {c}"))
    assert back["tenants"] == {"5": {"p50": None}, "('a', 'b')": {"p99": None}}
    assert sorted(back["resident"]["w"]) == ["x", "y"] and back["obj"].startswith("<object")


@pytest.mark.parametrize("identity", [None, "alice", "bob\udcff", "", "x" * 10_000])
def test_own_view_shows_a_tenant_nothing_of_another_whatever_the_names(identity):
    from dask_kaas.plugin.access import own_view

    stats = {"tenants": {"alice": {"graphs_run": 1}, "bob\udcff": {"graphs_run": 2},
                         "x" * 10_000: {}},
             "weights": {"alice": 2.0, "mallory": 3.0},
             "workers": {"tcp://127.0.0.1:1": {"hits": 5}},
             "dispatch": {"backlog": {"alice": 1, "bob\udcff": 4}, "vruntime": "garbage",
                          "weights": None, "releases": 7}}
    view = own_view(stats, identity)
    for table in (view["tenants"], view["weights"], view["dispatch"]["backlog"]):
        assert set(table) <= {identity}
    assert view["workers"] == stats["workers"] and view["dispatch"]["releases"] == 7
    assert view["dispatch"]["vruntime"] == "garbage"  # not a table: nothing to cut
    assert stats["tenants"]["alice"] == {"graphs_run": 1}  # the original is left whole
