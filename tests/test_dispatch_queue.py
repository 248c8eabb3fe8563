"""DispatchQueue and FairShare, property-tested (pure Python, no Dask)."""

from __future__ import annotations

import math
from collections import deque

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    precondition,
    rule,
)

from dask_kaas import KaasError
from dask_kaas.plugin.dispatch import DispatchQueue
from dask_kaas.plugin.fairshare import FairShare

weights = st.floats(0.25, 4.0)
costs = st.floats(0.001, 0.05)


def serve(q: DispatchQueue, cost: dict[str, float], steps: int, depth: int = 1,
          estimate: float = 0.002, refill: bool = True):
    """A server with ``depth`` released requests at a time: each step releases
    the next request and finishes the oldest one with its measured cost."""
    served = {t: 0.0 for t in cost}
    counts = {t: 0 for t in cost}
    inflight: deque = deque()
    n = 0
    for _ in range(steps):
        nxt = q.pop()
        if nxt is None:
            break
        key, tenant = nxt
        q.started(key, tenant, estimate)
        inflight.append((key, tenant))
        if refill:
            q.push(f"{tenant}-{n}", tenant)
            n += 1
        if len(inflight) >= depth:
            k, t = inflight.popleft()
            q.finished(k, cost[t])
            served[t] += cost[t]
            counts[t] += 1
    return served, counts


@settings(max_examples=60, deadline=None)
@given(ws=st.lists(weights, min_size=2, max_size=5), cs=st.lists(costs, min_size=5, max_size=5),
       depth=st.integers(1, 4))
def test_shares_converge_to_weights_while_backlogged(ws, cs, depth):
    tenants = [f"t{i}" for i in range(len(ws))]
    q = DispatchQueue()
    for t, w in zip(tenants, ws):
        q.set_weight(t, w)
        for i in range(depth + 1):
            q.push(f"{t}-init{i}", t)
    cost = dict(zip(tenants, cs))
    served, _ = serve(q, cost, steps=3000, depth=depth)
    normalized = [served[t] / q.share.weight(t) for t in tenants]
    # Each tenant is at most a few requests (the ones in flight plus one)
    # of normalized service away from every other, whatever the costs.
    slack = (depth + 1) * max(c / w for c, w in zip(cs, ws)) + \
        (depth + 1) * 0.002 / min(ws)
    assert max(normalized) - min(normalized) <= slack + 1e-9, (normalized, slack)
    # ... so the measured shares are the weights once the run is long.
    if min(normalized) > 20 * slack:
        total_w = sum(ws)
        total_s = sum(served.values())
        for t, w in zip(tenants, ws):
            assert math.isclose(served[t] / total_s, w / total_w, rel_tol=0.1), (served, ws)


@settings(max_examples=60, deadline=None)
@given(w_light=weights, w_flood=weights, c_light=costs, c_flood=costs,
       n_light=st.integers(1, 30))
def test_a_flood_does_not_starve_a_light_tenant(w_light, w_flood, c_light, c_flood, n_light):
    q = DispatchQueue()
    q.set_weight("light", w_light)
    q.set_weight("flood", w_flood)
    for i in range(500):
        q.push(f"flood-{i}", "flood")
    serve(q, {"flood": c_flood}, steps=200)  # the flood ran alone for a while
    for i in range(n_light):
        q.push(f"light-{i}", "light")
    pops = 0
    left = n_light
    while left:
        key, tenant = q.pop()
        pops += 1
        q.started(key, tenant, 0.0)
        q.finished(key, c_light if tenant == "light" else c_flood)
        q.push(f"flood-more-{pops}", "flood")
        left -= tenant == "light"
    # The flood gets its weighted share, no more: the light tenant's work is
    # done after about n_light * (1 + flood's share per light request) pops.
    per_light = (c_light / w_light) / (c_flood / w_flood)
    assert pops <= n_light * (1 + per_light) + per_light + 2


def test_returning_tenant_banks_no_credit():
    q = DispatchQueue()
    for i in range(100):
        q.push(f"a{i}", "a")
    serve(q, {"a": 0.01}, steps=50, refill=False)
    assert q.share.of("a") == pytest.approx(0.5)
    for i in range(20):
        q.push(f"b{i}", "b")
    # b was idle all along: it starts at the virtual time of a's last release
    # (at most that release's charge behind a), not at 0
    assert q.share.of("a") - 0.01 <= q.share.of("b") < q.share.of("a")
    order = []
    for _ in range(20):
        key, tenant = q.pop()
        q.started(key, tenant, 0.01)
        order.append(tenant)
    assert order[:3] == ["b", "a", "b"]
    assert order.count("b") == 10  # no more than its share


def test_priority_then_fifo_within_a_tenant():
    q = DispatchQueue()
    for key, prio in [("x", 0), ("y", 5), ("z", 0), ("w", 5), ("v", -1)]:
        q.push(key, "t", prio)
    assert [q.pop()[0] for _ in range(5)] == ["y", "w", "x", "z", "v"]
    assert q.pop() is None and q.peek() is None


def test_weight_change_applies_to_queued_work_at_once():
    q = DispatchQueue()
    for i in range(200):
        q.push(f"a{i}", "a")
        q.push(f"b{i}", "b")
    q.set_weight("a", 3.0)  # after queueing: the queued work follows it
    _, counts = serve(q, {"a": 0.01, "b": 0.01}, steps=200, refill=False)
    assert counts["a"] == pytest.approx(3 * counts["b"], abs=3)


def test_refund_when_a_released_request_does_not_finish():
    q = DispatchQueue()
    q.push("k", "t")
    key, tenant = q.pop()
    q.started(key, tenant, 0.5)
    assert q.share.of("t") == pytest.approx(0.5)
    q.finished(key, None)  # lost with its worker: it will run again
    assert q.share.of("t") == pytest.approx(0.0)
    assert q.running() == 0
    q.finished(key, 1.0)  # a second end of the same key changes nothing
    assert q.share.of("t") == pytest.approx(0.0)


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), "2", None, True, [1]])
def test_hostile_weights_are_kaas_errors(bad):
    with pytest.raises(KaasError, match="weight"):
        FairShare().set_weight("t", bad)


def test_non_finite_charge_is_ignored():
    f = FairShare()
    f.charge("t", float("nan"))
    f.charge("t", float("inf"))
    assert f.of("t") == 0.0


class QueueMachine(RuleBasedStateMachine):
    """Any sequence of pushes, pops, removals, weight changes and service
    keeps the queue consistent with a plain model of it."""

    keys = Bundle("keys")

    def __init__(self) -> None:
        super().__init__()
        self.q = DispatchQueue()
        self.model: dict[str, tuple[str, int, int]] = {}  # key -> tenant, priority, order
        self.order = 0
        self.n = 0
        self.released: dict[str, str] = {}
        self.last_step = 0.0

    @rule(target=keys, tenant=st.sampled_from("abcd"), priority=st.integers(-2, 2))
    def push(self, tenant, priority):
        key = f"k{self.n}"
        self.n += 1
        backlogged = {t for t, _, _ in self.model.values()}
        floor = min((self.q.share.of(t) for t in backlogged), default=None)
        vtime = self.q.virtual_time()
        assert self.q.push(key, tenant, priority)
        assert not self.q.push(key, tenant, priority)  # no duplicates
        if tenant not in backlogged and floor is not None:
            # at most the last released request's charge below the backlog
            assert vtime <= floor + 1e-12
            assert self.q.share.of(tenant) >= vtime - 1e-12
            assert self.q.share.of(tenant) >= floor - self.last_step - 1e-12
        self.model[key] = (tenant, priority, self.order)
        self.order += 1
        return key

    @rule(key=consumes(keys))
    def remove(self, key):
        assert self.q.remove(key) == (key in self.model)
        self.model.pop(key, None)
        assert not self.q.remove(key)

    @precondition(lambda self: self.model)
    @rule(estimate=st.floats(0, 0.1))
    def pop(self, estimate):
        backlogged = {t for t, _, _ in self.model.values()}
        least = min(self.q.share.of(t) for t in backlogged)
        key, tenant = self.q.pop()
        assert self.q.share.of(tenant) == least
        best = min((-p, o) for t, p, o in self.model.values() if t == tenant)
        assert (-self.model[key][1], self.model[key][2]) == best
        del self.model[key]
        self.q.started(key, tenant, estimate)
        self.last_step = estimate / self.q.share.weight(tenant)
        self.released[key] = tenant

    @precondition(lambda self: self.released)
    @rule(data=st.data(), measured=st.one_of(st.none(), st.floats(0, 0.1)))
    def finish(self, data, measured):
        key = data.draw(st.sampled_from(sorted(self.released)))
        del self.released[key]
        self.q.finished(key, measured)

    @rule(tenant=st.sampled_from("abcd"), weight=weights)
    def set_weight(self, tenant, weight):
        self.q.set_weight(tenant, weight)

    @invariant()
    def consistent(self):
        assert len(self.q) == len(self.model)
        counts: dict[str, int] = {}
        for t, _, _ in self.model.values():
            counts[t] = counts.get(t, 0) + 1
        assert self.q.backlog() == counts
        assert set(self.q) == set(self.model)
        assert self.q.running() == len(self.released)
        nxt = self.q.peek()
        assert (nxt is None) == (not self.model)


QueueMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=60,
                                          deadline=None)
test_queue_state_machine = QueueMachine.TestCase


def test_peek_skips_excluded_tenants_and_keeps_them_queued():
    q = DispatchQueue()
    q.push("a1", "a")
    q.push("b1", "b")
    q.push("c1", "c")
    assert q.peek() == ("a1", "a")
    assert q.peek(exclude={"a"}) == ("b1", "b")
    assert q.peek(exclude={"a", "b"}) == ("c1", "c")
    assert q.peek(exclude={"a", "b", "c"}) is None
    assert [q.pop()[0] for _ in range(3)] == ["a1", "b1", "c1"]


@pytest.mark.parametrize("key,bad", [
    ("prefetch", -1), ("prefetch", 65), ("prefetch", 1.5), ("prefetch", "1"),
    ("prefetch", True), ("prefetch", float("nan")), ("prefetch", [1]),
    ("dispatch-interval", "soon"), ("dispatch-interval", 0), ("dispatch-interval", -1),
    ("dispatch-interval", float("inf")), ("dispatch-interval", "1000 days"),
    ("dispatch-interval", "0.1ms"), ("dispatch-interval", {"a": 1}),
    ("dispatch-interval", b"\xff"),
    ("anticipation", -1), ("anticipation", "11s"), ("anticipation", "later"),
    ("anticipation", float("nan")), ("anticipation", float("inf")), ("anticipation", True),
    ("anticipation", [0.05]), ("anticipation", b"\xff"), ("anticipation", "-5ms"),
    ("anticipation", 10 ** 400),
])
def test_hostile_dispatch_config_is_a_kaas_error(key, bad):
    import dask

    from dask_kaas.plugin.scheduler import KaasSchedulerPlugin

    with dask.config.set({f"kaas.{key}": bad}), pytest.raises(KaasError, match=f"kaas.{key}"):
        KaasSchedulerPlugin()


def test_dispatch_config_defaults_and_valid_values():
    import dask

    from dask_kaas.plugin.scheduler import KaasSchedulerPlugin

    p = KaasSchedulerPlugin()
    assert p.dispatch.prefetch == 1 and p.dispatch.interval_s == pytest.approx(0.2)
    assert p.dispatch.queue.anticipate_s == pytest.approx(0.05)
    with dask.config.set({"kaas.prefetch": 0, "kaas.dispatch-interval": "50ms",
                          "kaas.anticipation": None}):
        p = KaasSchedulerPlugin()
    assert p.dispatch.prefetch == 0 and p.dispatch.interval_s == pytest.approx(0.05)
    assert p.dispatch.queue.anticipate_s == 0
    for value, seconds in [(0, 0.0), ("20ms", 0.02), (1, 1.0), ("10s", 10.0)]:
        with dask.config.set({"kaas.anticipation": value}):
            assert KaasSchedulerPlugin().dispatch.queue.anticipate_s == seconds
