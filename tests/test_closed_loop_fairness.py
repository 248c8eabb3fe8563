"""Fair shares for clients that wait for each result (closed loop).

Most tenants' clients send their next request when the last one returns (an
HTTP client, a loop of ``.result()``), so between the two such a tenant has
nothing queued.  These tests drive the real ``DispatchQueue`` with a
discrete-event model of the dispatcher's release rule (workers with slots
and prefetch places, released FIFO) and of such clients, in simulated time:
the shares must follow the weights, and keeping places for expected requests
(anticipation) must never cost throughput.
"""

from __future__ import annotations

import heapq
import itertools
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dask_kaas.plugin.dispatch import DispatchQueue


def closed_loop(weights: dict[str, float], clients: dict[str, int], *, workers: int = 2,
                prefetch: int = 1, service: float = 0.046, think: float = 0.006,
                duration: float = 20.0, anticipate: float = 0.05, estimate: float | None = None,
                jitter: float = 0.3, seed: int = 0) -> dict[str, int]:
    """Completions per tenant after ``duration`` simulated seconds.

    Each worker has one slot and ``prefetch`` prefetch places; a request
    takes ``service`` seconds (± ``jitter``) and its client sends the next
    one ``think`` seconds after the result.  The release rule is the
    dispatcher's: the next request in fair order goes to a worker with a
    free slot, else to a prefetch place unless the queue's anticipation
    keeps all of them."""
    rnd = random.Random(seed)
    q = DispatchQueue(anticipate_s=anticipate)
    for tenant, w in weights.items():
        q.set_weight(tenant, w)
    events: list = []
    seq = itertools.count()
    queued: list[list[tuple[str, str]]] = [[] for _ in range(workers)]  # FIFO, head runs
    ends: list[float | None] = [None] * workers
    done = dict.fromkeys(weights, 0)
    timer: list[float | None] = [None]

    def at(t: float, kind: str, arg) -> None:
        heapq.heappush(events, (t, next(seq), kind, arg))

    def vary(x: float) -> float:
        return x * (1 + rnd.uniform(-jitter, jitter))

    started = [0.0] * workers

    def run_head(w: int, now: float) -> None:
        started[w] = now
        ends[w] = now + vary(service)
        at(ends[w], "finish", w)

    def release_pass(now: float) -> None:
        while True:
            room = [w for w in range(workers) if len(queued[w]) < 1 + prefetch]
            nxt = q.peek()
            if not room or nxt is None:
                return
            key, tenant = nxt
            idle = [w for w in room if not queued[w]]
            if not idle:
                spare = sum(1 + prefetch - len(queued[w]) for w in room)
                busy_until = min(ends[w] for w in room)
                reserved, until = q.anticipation(tenant, now, busy_until)
                if reserved >= spare:
                    if timer[0] is None or until < timer[0]:
                        timer[0] = until
                        at(until, "wake", None)
                    return
            q.remove(key)
            q.started(key, tenant, service if estimate is None else estimate)
            w = (idle or room)[0]
            queued[w].append((key, tenant))
            if len(queued[w]) == 1:
                run_head(w, now)

    for tenant, n in clients.items():
        for _ in range(n):
            at(rnd.uniform(0, 0.01), "arrive", tenant)
    keys = itertools.count()
    while events:
        now, _, kind, arg = heapq.heappop(events)
        if now > duration:
            break
        if kind == "arrive":
            q.push(f"{arg}-{next(keys)}", arg, now=now)
        elif kind == "finish":
            key, tenant = queued[arg].pop(0)
            q.finished(key, now - started[arg], now=now)
            ends[arg] = None
            done[tenant] += 1
            at(now + vary(think), "arrive", tenant)
            if queued[arg]:
                run_head(arg, now)
        elif kind == "wake" and timer[0] == now:
            timer[0] = None
        release_pass(now)
    return done


def ratio(done: dict[str, int]) -> float:
    return done["a"] / done["b"]


@pytest.mark.parametrize("think", [0.001, 0.006, 0.02])
@pytest.mark.parametrize("anticipate", [0.0, 0.05])
def test_weights_hold_with_four_waiting_clients_per_tenant(think, anticipate):
    # 2 workers x (1 slot + 1 prefetch) = 4 places, as many as either
    # tenant has requests: the case that measured 1.5:1 when a tenant back
    # with a new request was levelled up to the backlog's runtime.
    done = closed_loop({"a": 2, "b": 1}, {"a": 4, "b": 4}, think=think, anticipate=anticipate)
    assert ratio(done) == pytest.approx(2.0, rel=0.05), done


def test_anticipation_keeps_weights_when_clients_are_slow_to_come_back():
    # The next request comes 40 ms after a 46 ms request: without keeping a
    # prefetch place for it, the other tenant takes it every time.
    kept = closed_loop({"a": 2, "b": 1}, {"a": 4, "b": 4}, think=0.04, anticipate=0.05)
    not_kept = closed_loop({"a": 2, "b": 1}, {"a": 4, "b": 4}, think=0.04, anticipate=0.0)
    assert ratio(kept) == pytest.approx(2.0, rel=0.1), kept
    assert ratio(not_kept) < 1.7, not_kept
    # and it costs no throughput: no worker waited
    assert sum(kept.values()) >= sum(not_kept.values()) - 2


@pytest.mark.parametrize("estimate", [0.023, 0.1])
def test_an_estimate_off_by_two_is_corrected_by_measured_time(estimate):
    # The scheduler charges its estimate at release and the measured time at
    # the end; a graph whose learned time is half or twice the real one.
    # (Far worse estimates, say a tenth, bring the shares near 1:1 here:
    # most of the work in flight is then invisible to the fair order.)
    done = closed_loop({"a": 2, "b": 1}, {"a": 4, "b": 4}, estimate=estimate)
    assert ratio(done) == pytest.approx(2.0, rel=0.1), done


def test_tenants_that_cannot_fill_their_share_leave_it_to_others():
    # Two requests each against four places: nobody is ever backlogged, so
    # the work is served as it comes (no place is kept idle for a weight).
    done = closed_loop({"a": 2, "b": 1}, {"a": 2, "b": 2})
    assert ratio(done) == pytest.approx(1.0, rel=0.1), done
    busy = closed_loop({"a": 1, "b": 1}, {"a": 4, "b": 4})
    assert sum(done.values()) >= 0.95 * sum(busy.values())


@settings(max_examples=25, deadline=None)
@given(w=st.sampled_from([1.5, 2.0, 3.0]), n=st.integers(4, 8), workers=st.integers(1, 3),
       think_share=st.floats(0.0, 0.4), seed=st.integers(0, 2 ** 16))
def test_shares_follow_weights_for_any_backlogged_closed_loop(w, n, workers, think_share, seed):
    # Enough clients that both tenants always have a request waiting for
    # one of the 2 x workers places; clients come back within 40% of a
    # request's time.
    clients = max(n, 3 * workers)
    done = closed_loop({"a": w, "b": 1}, {"a": clients, "b": clients}, workers=workers,
                       think=0.046 * think_share, duration=30.0, seed=seed)
    assert ratio(done) == pytest.approx(w, rel=0.1), done


def test_anticipation_counts_expected_requests_of_tenants_ahead_only():
    q = DispatchQueue(anticipate_s=0.05)
    q.set_weight("a", 2.0)
    for key, tenant in [("a0", "a"), ("b0", "b"), ("b1", "b")]:
        q.push(key, tenant, now=0.0)
    for _ in range(2):
        key, tenant = q.pop()
        q.started(key, tenant, 0.04)
    # a ran one 20 ms (virtual) request, b one 40 ms: a is ahead in fair order
    q.finished("a0", 0.04, now=1.0)
    assert q.anticipation("b", now=1.001) == (1, pytest.approx(1.05))
    q.finished("b0", 0.04, now=1.0)
    assert q.anticipation("a", now=1.001) == (0, None)  # b is behind a: nothing kept for it
    q.push("a1", "a", now=1.01)  # a's request came back 10 ms later
    assert q.anticipation("b", now=1.011) == (0, None)  # it is queued: peek orders it
    assert q.returns.mean_s["a"] == pytest.approx(0.01)
    # the next wait is learned: twice 10 ms (+1 ms), not all 50 ms
    assert q.returns.wait_s("a") == pytest.approx(0.021)
    key, tenant = q.pop()
    assert tenant == "a"
    q.started(key, tenant, 0.01)
    q.finished(key, 0.01, now=2.0)  # a still behind b (b1 is queued)
    assert q.anticipation("b", now=2.001) == (1, pytest.approx(2.021))
    # a worker is expected free before a's next request (due at 2.010): no use waiting
    assert q.anticipation("b", now=2.001, busy_until=2.005) == (0, None)
    assert q.anticipation("b", now=2.03) == (0, None)  # waited long enough
    q.forget("a")
    assert "a" not in q.returns.mean_s and q.share.of("a") == 0.0


def test_no_anticipation_when_off():
    q = DispatchQueue(anticipate_s=0.0)
    q.push("a0", "a", now=0.0)
    q.push("b0", "b", now=0.0)
    key, tenant = q.pop()
    q.started(key, tenant, 0.01)
    q.finished(key, 0.01, now=0.5)
    assert q.anticipation("b", now=0.5) == (0, None)


def test_a_finished_burst_is_not_owed_back_in_full():
    q = DispatchQueue(anticipate_s=0.05)
    for i in range(100):
        q.push(f"a{i}", "a", now=0.0)
    q.push("b0", "b", now=0.0)
    released = []
    for _ in range(101):
        key, tenant = q.pop()
        q.started(key, tenant, 0.001)
        released.append(key)
    for i, key in enumerate(released):
        if key.startswith("a"):
            q.finished(key, 0.001, now=1.0 + i * 1e-4)
    assert q.running_tenants() == {"b"}
    # a kept nothing out at the end: one request expected back, not 99
    q.push("b1", "b", now=1.02)
    q.set_weight("b", 0.01)  # b far behind a in fair order now
    q.charge("b", 1.0)
    reserved, _ = q.anticipation("b", now=1.02)
    assert reserved == 1
