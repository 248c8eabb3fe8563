"""The gateway counts every HTTP request once, by how it ended (issue 16,
item 11, the gateway's part).

Before: a request whose caller hung up mid-body, and a message Tornado
refused itself (garbled request line or header, broken chunked body), were
never counted, and deleting a model took its counts out of the totals.
Each request here is sent over a raw socket to the real gateway process in
front of a real LocalKaasCluster, and the sum of
``dask_kaas_gateway_requests_total`` must grow by exactly the number sent,
with the right status for each.
"""

from __future__ import annotations

import json
import socket
import time

import numpy as np
import pytest
from gateway_helpers import GatewayProcess, tenants_yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from dask_kaas import In, KaasClient, Kernel, KernelGraph, LocalKaasCluster, Out
from dask_kaas.gateway.metrics import GatewayMetrics

TOKEN, OPS = "kim-token", "ops-token"
KEY = "dask_kaas_gateway_requests_total"
AUTH = b"Authorization: Bearer " + TOKEN.encode() + b"\r\n"
MAX_BODY = 4096


def graph() -> KernelGraph:
    g = KernelGraph("relu")
    x = g.input("x", (4,), np.float32)
    y = g.output("y", (4,), np.float32)
    g.launch(Kernel.library("relu"), [In(x), Out(y)])
    return g


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    with LocalKaasCluster(1, backend="cpu", dashboard_address="127.0.0.1:0",
                          device_memory_limit="64MB") as cluster, KaasClient(cluster):
        path = tmp_path_factory.mktemp("counts") / "tenants.yaml"
        path.write_text(tenants_yaml({"kim": {"token": TOKEN}}, {"ops": OPS}))
        g = GatewayProcess(cluster.scheduler_address, str(path), "--max-body-size",
                           str(MAX_BODY))
        try:
            yield g
        finally:
            g.stop()


def counts(gw: GatewayProcess) -> dict[tuple[str, str, str], float]:
    """Requests by (tenant, model, status), the operator's own scrapes left out."""
    out = {}
    for (name, labels), value in gw.metrics(OPS).items():
        d = dict(labels)
        if name == KEY and d["tenant"] != "ops":
            out[(d["tenant"], d["model"], d["status"])] = value
    return out


def delta(before: dict, after: dict) -> dict:
    keys = set(before) | set(after)
    return {k: after.get(k, 0) - before.get(k, 0) for k in keys
            if after.get(k, 0) != before.get(k, 0)}


def send_raw(gw: GatewayProcess, data: bytes, read: bool = True) -> bytes:
    """Send ``data`` and close; the start of the reply (if ``read``)."""
    with socket.create_connection((gw.host, gw.port), timeout=30) as sock:
        sock.sendall(data)
        if not read:
            return b""
        reply = b""
        try:
            while b"\r\n" not in reply:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                reply += chunk
        except OSError:
            pass
        return reply


def settled(gw: GatewayProcess, before: dict, expected: dict) -> dict:
    """The counts once they reached ``expected`` (a closed connection is
    seen by the gateway a moment after the socket closes here)."""
    deadline = time.monotonic() + 30
    while True:
        got = delta(before, counts(gw))
        if got == expected or time.monotonic() > deadline:
            return got
        time.sleep(0.05)


def register(gw: GatewayProcess, name: str) -> None:
    status, doc = gw.json("PUT", f"/v1/models/{name}", graph().to_json().encode(), TOKEN)
    assert status in (200, 201), doc


def infer_body() -> bytes:
    return json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [4],
                                   "data": [-1, 0, 1, 2]}]}).encode()


def test_hung_up_mid_body_is_a_499(gw):
    before = counts(gw)
    send_raw(gw, b"PUT /v1/models/m HTTP/1.1\r\nHost: x\r\n" + AUTH +
             b"Content-Length: 500\r\n\r\n{\"na", read=False)
    assert settled(gw, before, {("kim", "-", "499"): 1}) == {("kim", "-", "499"): 1}


@pytest.mark.parametrize("data, tenant", [
    (b"GARBAGE\r\n\r\n", "-"),
    (b"GET /v1/models HTTP/1.1\r\nHost x\r\n\r\n", "-"),  # header without a colon
    (b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + AUTH +
     b"Transfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n", "-"),
    # a streamed body: its handler had authenticated the caller already
    (b"PUT /v1/models/m HTTP/1.1\r\nHost: x\r\n" + AUTH +
     b"Transfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n", "kim"),
    (b"GET /\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n", "-"),
], ids=["request line", "header", "chunk of a GET", "chunk of a PUT", "non-UTF-8 path"])
def test_a_message_refused_by_tornado_is_counted_once(gw, data, tenant):
    before = counts(gw)
    reply = send_raw(gw, data)
    assert reply.startswith(b"HTTP/1.1 4"), reply
    expected = {(tenant, "-", reply.split()[1].decode()): 1}
    assert settled(gw, before, expected) == expected
    time.sleep(0.3)  # and nothing else comes later
    assert delta(before, counts(gw)) == expected


def test_an_answered_request_refused_again_by_tornado_is_counted_once(gw):
    """A Content-Length over the drain limit: the handler answers 413, then
    Tornado refuses the message too (and logs it as malformed)."""
    before = counts(gw)
    reply = send_raw(gw, b"PUT /v1/models/m HTTP/1.1\r\nHost: x\r\n" + AUTH +
                     b"Content-Length: 99999999999\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 413"), reply
    assert settled(gw, before, {("kim", "-", "413"): 1}) == {("kim", "-", "413"): 1}
    time.sleep(0.5)  # and nothing else comes later
    assert delta(before, counts(gw)) == {("kim", "-", "413"): 1}


def test_every_request_of_a_mixed_load_counted_once_and_kept_after_delete(gw):
    register(gw, "tmp")
    before = counts(gw)
    sent = 0
    expected: dict[tuple[str, str, str], int] = {}

    def expect(key: tuple[str, str, str]) -> None:
        nonlocal sent
        sent += 1
        expected[key] = expected.get(key, 0) + 1

    for _ in range(3):
        status, doc = gw.json("POST", "/v2/models/tmp/infer", infer_body(), TOKEN)
        assert status == 200, doc
        expect(("kim", "tmp", "200"))
    assert gw.json("POST", "/v2/models/tmp/infer", b"{", TOKEN)[0] == 400
    expect(("kim", "tmp", "400"))
    assert gw.json("POST", "/v2/models/tmp/infer", infer_body().replace(b"-1", b"NaN"),
                   TOKEN)[0] == 400
    expect(("kim", "tmp", "400"))
    assert gw.json("GET", "/v1/models", token="wrong")[0] == 401
    expect(("-", "-", "401"))
    assert gw.json("GET", "/v2/models/nope", token=TOKEN)[0] == 404
    expect(("kim", "-", "404"))
    assert gw.request("PATCH", "/v1/models", token=TOKEN)[0] == 405
    expect(("kim", "-", "405"))
    assert gw.request("PUT", "/v1/models/tmp", b"\0" * (MAX_BODY + 1), TOKEN)[0] == 413
    expect(("kim", "-", "413"))
    send_raw(gw, b"POST /v2/models/tmp/infer HTTP/1.1\r\nHost: x\r\n" + AUTH +
             b"Content-Length: 100\r\n\r\n{", read=False)
    expect(("kim", "-", "499"))  # the handler never ran: no model named yet
    send_raw(gw, b"BROKEN\r\n\r\n")
    expect(("-", "-", "400"))
    got = settled(gw, before, expected)
    assert got == expected and sum(got.values()) == sent, (got, expected)
    # deleting the model keeps its counts, under the tenant's "-" model
    assert gw.request("DELETE", "/v1/models/tmp", token=TOKEN)[0] == 204
    expect(("kim", "-", "204"))
    after = counts(gw)
    assert not any(k[1] == "tmp" for k in after)
    assert sum(after.values()) - sum(before.values()) == sent
    for status in ("200", "400"):
        assert after.get(("kim", "-", status), 0) >= expected[("kim", "tmp", status)]


# -- the counter itself -------------------------------------------------------------------
NAMES = st.sampled_from(["a", "b", "-", "x.y", "ü"])
OPS_ = st.lists(st.one_of(
    st.tuples(st.just("req"), NAMES, NAMES, st.sampled_from([200, 400, 499, 504])),
    st.tuples(st.just("latency"), NAMES, NAMES, st.floats(0, 10)),
    st.tuples(st.just("forget_model"), NAMES, NAMES),
    st.tuples(st.just("forget_tenant"), NAMES)), max_size=40)


@settings(max_examples=200, deadline=None)
@given(OPS_)
def test_forgetting_models_and_tenants_never_loses_a_count(ops):
    """Whatever is deleted in between, the exported total is the number of
    requests observed, and it never goes down."""
    m = GatewayMetrics()
    observed = last = 0
    for op in ops:
        if op[0] == "req":
            m.observe(op[1], op[2], op[3])
            observed += 1
        elif op[0] == "latency":
            m.observe_latency(op[1], op[2], op[3])
        elif op[0] == "forget_model":
            m.forget_model(op[1], op[2])
        else:
            m.forget_tenant(op[1])
        total = sum(s.value for fam in text_string_to_metric_families(m.render().decode())
                    for s in fam.samples if s.name == KEY)
        assert total == observed >= last
        last = total
    forgotten = {(o[1], o[2]) for o in ops if o[0] == "forget_model"}
    # a model forgotten last (no request since) has no series of its own left
    for tenant, model in forgotten:
        later = [o for o in ops[max(i for i, o in enumerate(ops)
                                    if o[:3] == ("forget_model", tenant, model)):]
                 if o[0] in ("req", "latency") and o[1:3] == (tenant, model)]
        if not later and model != "-":
            assert not any(k[:2] == (tenant, model) for k in m.requests.counts)
