"""The gateway's dynamic batcher on its own (issue 19): requests stacked along
the batch dimension, split back by rows, errors kept to the request that
causes them, limits held.  The runner is a plain coroutine that computes
``2 * x + 1`` row-wise (or fails on a marked row), so every property is
checked on values; the end-to-end path through a cluster is in
test_gateway_onnx.py.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dask_kaas.gateway.batching import Batcher
from dask_kaas.gateway.errors import BadRequestError, GatewayTimeoutError
from dask_kaas.gateway.onnx_models import BatchingConfig, looks_like_onnx, parse_batching
from dask_kaas.graph.errors import KaasError

BAD = -999.0


class Runner:
    """Row-wise ``2x + 1``; a row holding BAD fails the whole run (as one
    request's out-of-range index fails a graph run)."""

    def __init__(self, gate: asyncio.Event | None = None, fail_with: Exception | None = None):
        self.calls: list[int] = []
        self.gate = gate
        self.fail_with = fail_with

    async def __call__(self, inputs):
        x = inputs["x"]
        self.calls.append(x.shape[0])
        if self.gate is not None:
            await self.gate.wait()
        await asyncio.sleep(0)
        if self.fail_with is not None:
            raise self.fail_with
        if (x == BAD).any():
            raise KaasError("index out of range in row data")
        return {"y": 2 * x + 1, "rows": np.arange(x.shape[0])}


def cfg(**kw) -> BatchingConfig:
    base = dict(max_batch_size=8, dynamic=True, max_queue_delay_s=0.05, instances=1)
    base.update(kw)
    return BatchingConfig(**base)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 4), min_size=1, max_size=20), st.integers(1, 8))
def test_each_caller_gets_exactly_its_rows(sizes, max_batch):
    sizes = [min(s, max_batch) for s in sizes]

    async def main():
        run = Runner()
        b = Batcher(cfg(max_batch_size=max_batch), run)
        xs = [np.full((n, 3), float(i), np.float32) + np.arange(n)[:, None]
              for i, n in enumerate(sizes)]
        outs = await asyncio.gather(*(b.submit({"x": x}) for x in xs))
        for x, out in zip(xs, outs):
            np.testing.assert_array_equal(out["y"], 2 * x + 1)
        assert all(n <= max_batch for n in run.calls)
        assert sum(run.calls) == sum(sizes)
        assert sum(k * v for k, v in b.batch_rows.items()) == sum(sizes)
        assert sum(k * v for k, v in b.batch_requests.items()) == len(sizes)
    asyncio.run(main())


def test_requests_that_wait_together_share_one_run():
    async def main():
        gate = asyncio.Event()
        run = Runner(gate)
        b = Batcher(cfg(max_batch_size=16, instances=1), run)
        first = asyncio.ensure_future(b.submit({"x": np.zeros((1, 2), np.float32)}))
        await asyncio.sleep(0.2)  # past the delay: the first runs alone, and holds the slot
        rest = [asyncio.ensure_future(b.submit({"x": np.full((1, 2), i, np.float32)}))
                for i in range(1, 6)]
        await asyncio.sleep(0.01)
        gate.set()
        await asyncio.gather(first, *rest)
        assert run.calls == [1, 5]  # the five waited together while the slot was busy
        for i, r in enumerate(rest, 1):
            np.testing.assert_array_equal(r.result()["y"], np.full((1, 2), 2 * i + 1))
    asyncio.run(main())


def test_a_full_batch_leaves_without_waiting_out_the_delay():
    async def main():
        run = Runner()
        b = Batcher(cfg(max_batch_size=4, max_queue_delay_s=3600.0), run)
        outs = await asyncio.wait_for(asyncio.gather(
            *(b.submit({"x": np.ones((1, 1), np.float32) * i}) for i in range(4))), 60)
        assert run.calls == [4] and len(outs) == 4
        # a preferred size is reached: it leaves too
        b2 = Batcher(cfg(max_batch_size=8, max_queue_delay_s=3600.0, preferred=(2,)), run)
        await asyncio.wait_for(asyncio.gather(
            *(b2.submit({"x": np.ones((1, 1), np.float32)}) for _ in range(2))), 60)
    asyncio.run(main())


def test_an_error_fails_only_the_request_that_causes_it():
    async def main():
        gate = asyncio.Event()
        run = Runner(gate)
        b = Batcher(cfg(), run)
        xs = [np.full((1, 2), float(i), np.float32) for i in range(6)]
        xs[3][0, 1] = BAD
        futs = [asyncio.ensure_future(b.submit({"x": x})) for x in xs]
        await asyncio.sleep(0.1)
        gate.set()
        done = await asyncio.gather(*futs, return_exceptions=True)
        assert isinstance(done[3], KaasError)
        for i, out in enumerate(done):
            if i != 3:
                np.testing.assert_array_equal(out["y"], 2 * xs[i] + 1)
        assert run.calls[0] == 6  # one batched run first, then each alone
    asyncio.run(main())


def test_a_timeout_or_cluster_failure_fails_that_batch_only():
    async def main():
        for error in (GatewayTimeoutError("late"), RuntimeError("worker lost")):
            run = Runner(fail_with=error)
            b = Batcher(cfg(max_queue_delay_s=0.02), run)
            done = await asyncio.gather(
                *(b.submit({"x": np.ones((1, 1), np.float32)}) for _ in range(3)),
                return_exceptions=True)
            assert all(d is error for d in done)
            run.fail_with = None  # the next batch is unaffected
            out = await b.submit({"x": np.ones((1, 1), np.float32)})
            np.testing.assert_array_equal(out["y"], [[3.0]])
    asyncio.run(main())


def test_a_caller_that_goes_away_is_not_run():
    async def main():
        gate = asyncio.Event()
        run = Runner(gate)
        b = Batcher(cfg(max_queue_delay_s=0.0), run)
        busy = asyncio.ensure_future(b.submit({"x": np.zeros((1, 1), np.float32)}))
        await asyncio.sleep(0.05)  # running, holding the one slot
        gone = asyncio.ensure_future(b.submit({"x": np.ones((1, 1), np.float32)}))
        stays = asyncio.ensure_future(b.submit({"x": np.full((1, 1), 2.0, np.float32)}))
        await asyncio.sleep(0.01)
        gone.cancel()
        gate.set()
        await busy
        out = await stays
        np.testing.assert_array_equal(out["y"], [[5.0]])
        assert run.calls == [1, 1]
    asyncio.run(main())


def test_an_output_without_the_batch_rows_is_not_split_wrong():
    async def main():
        async def collapse(inputs):
            return {"y": inputs["x"].sum(axis=0, keepdims=True)}  # not row-wise
        b = Batcher(cfg(max_queue_delay_s=0.05), collapse)
        xs = [np.full((1, 2), float(i + 1), np.float32) for i in range(3)]
        outs = await asyncio.gather(*(b.submit({"x": x}) for x in xs))
        for x, out in zip(xs, outs):  # each rerun alone: its own answer
            np.testing.assert_array_equal(out["y"], x)
    asyncio.run(main())


# -- configuration ---------------------------------------------------------------------
def test_parse_batching_accepts_and_refuses():
    c = parse_batching({"dynamic_batching": "true", "max_batch_size": "32",
                        "max_queue_delay_us": "500", "preferred_batch_size": "8,4,8",
                        "instances": "3"}, True, 64)
    assert (c.dynamic, c.max_batch_size, c.max_queue_delay_s, c.preferred, c.instances) == \
        (True, 32, 0.0005, (4, 8), 3)
    assert parse_batching({}, True, 64).dynamic is False  # off by default
    assert parse_batching({}, False, 64).max_batch_size == 0
    for query, batch_dim in (({"dynamic_batching": "true"}, False),
                             ({"max_batch_size": "4"}, False),
                             ({"max_batch_size": "x"}, True), ({"max_batch_size": "-1"}, True),
                             ({"max_batch_size": "9" * 30}, True),
                             ({"preferred_batch_size": "128"}, True),
                             ({"preferred_batch_size": ","}, True),
                             ({"instances": "0"}, True), ({"max_queue_delay_us": "1.5"}, True),
                             ({"dynamic_batching": "yes please"}, True),
                             ({"dynamic_batching": "true", "max_batch_size": "0"}, True),
                             ({"\udcff": "1"}, True), ({"max_batch_size": "\u0663"}, True)):
        with pytest.raises(BadRequestError):
            parse_batching(query, batch_dim, 64)


def test_onnx_is_recognised_by_type_or_first_byte():
    assert looks_like_onnx(b"{}", "application/onnx")
    assert looks_like_onnx(b"\x08\x07", None)
    assert not looks_like_onnx(b"\x08\x07", "application/json")
    assert not looks_like_onnx(b'{"name": "g"}', None)
    assert not looks_like_onnx(b"", None)


def test_requests_of_other_non_batch_shapes_are_not_stacked_together():
    async def main():
        run = Runner()
        b = Batcher(cfg(max_batch_size=16, max_queue_delay_s=0.05), run)
        xs = [np.full((1, 2 + i % 2), float(i), np.float32) for i in range(6)]
        outs = await asyncio.gather(*(b.submit({"x": x}) for x in xs))
        for x, out in zip(xs, outs):
            np.testing.assert_array_equal(out["y"], 2 * x + 1)
        assert sorted(run.calls) == [3, 3]  # one run per sequence length
    asyncio.run(main())
