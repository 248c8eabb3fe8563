"""A graph pickles as the bytes of its description and a receiving process
keeps one instance per distinct description (graph/shared.py, issue 20):
never a stale or a wrong graph -- two graphs of one name stay apart, a
changed graph is sent as what it is now -- and on a real cluster every
answer matches NumPy."""

from __future__ import annotations

import pickle

import cloudpickle
import numpy as np
import pytest

from dask_kaas import Kernel, KernelGraph, Out
from dask_kaas.graph import shared
from dask_kaas.graph.memplan import plan_temps


def scale_kernel(factor):
    def scale(xp, x, y):
        y[...] = factor * x
    return scale


def add_one(xp, x, y):
    y[...] = x + 1


def make(name="share", n=8, fn=add_one, temp=False):
    g = KernelGraph(name)
    x = g.input("x", (n,), np.float32)
    y = g.output("y", (n,), np.float32)
    if temp:
        t = g.temp("t", (n,), np.float32)
        g.launch(Kernel.array(fn), [x, Out(t)])
        g.launch(Kernel.array(add_one), [t, Out(y)])
    else:
        g.launch(Kernel.array(fn), [x, Out(y)])
    return g


def test_loads_of_the_same_bytes_share_one_instance_owning_its_buffers():
    g = make(temp=True)
    plan_temps(g)  # a cache on the graph: not part of what it pickles as
    blob = pickle.dumps(g)
    a, b = pickle.loads(blob), pickle.loads(pickle.dumps(g))
    assert a is b and a == g and a is not g
    assert "_temp_plan" not in pickle.loads(shared.graph_blob(g))
    for buf in a.buffers.values():
        assert buf.owner is a
    for launch in a.launches:
        for arg in launch.buffer_args():
            assert arg.buffer is a.buffers[arg.buffer.name]
    assert pickle.loads(pickle.dumps(a)) is a  # sent on: the same bytes


def test_two_graphs_of_one_name_never_share():
    g1, g2 = make("same-name", 8), make("same-name", 16)
    h1 = make("same-name", 8, fn=scale_kernel(2.0))
    loaded = [pickle.loads(cloudpickle.dumps(x)) for x in (g1, g2, h1)]
    assert loaded[0] is not loaded[1] and loaded[0] is not loaded[2]
    assert loaded[0].inputs[0].shape == (8,) and loaded[1].inputs[0].shape == (16,)
    x = np.arange(8, dtype=np.float32)
    y = np.empty(8, np.float32)
    loaded[2].launches[0].kernel.fn(np, x, y)
    np.testing.assert_array_equal(y, 2 * x)


def test_a_changed_graph_is_never_served_as_its_old_bytes():
    g = make("grows")
    blob = pickle.dumps(g)
    loaded = pickle.loads(blob)
    loaded.output("extra", (8,), np.float32)  # changed where it was loaded
    assert shared.BLOB not in loaded.__dict__
    again = pickle.loads(blob)
    assert again is not loaded and again == g and "extra" not in again.buffers
    changed = pickle.loads(pickle.dumps(loaded))
    assert "extra" in changed.buffers and changed == loaded
    # the sender's own graph changed after a send: the next send says so
    g.output("late", (8,), np.float32)
    assert "late" in pickle.loads(pickle.dumps(g)).buffers


def test_the_cache_is_bounded_and_an_evicted_graph_loads_again():
    first = pickle.dumps(make("bounded-0"))
    pickle.loads(first)
    for i in range(1, shared.MAX_SHARED + 20):
        pickle.loads(pickle.dumps(make(f"bounded-{i}")))
    assert len(shared._loaded) <= shared.MAX_SHARED
    assert pickle.loads(first) == make("bounded-0")


def test_sharing_off_makes_an_instance_per_load(monkeypatch):
    monkeypatch.setattr(shared, "SHARE", False)
    g = make("unshared")
    a, b = pickle.loads(pickle.dumps(g)), pickle.loads(pickle.dumps(g))
    assert a is not b and a == b == g
    assert all(buf.owner is a for buf in a.buffers.values())


@pytest.mark.parametrize("junk", [b"", b"\x80\x05junk", pickle.dumps(["not", "a", "dict"])])
def test_junk_bytes_do_not_become_a_graph(junk):
    with pytest.raises(Exception):  # noqa: B017 - any failure, never a graph
        shared.load_graph(junk)
    assert all(isinstance(v, KernelGraph) for v in shared._loaded.values())


def test_same_name_graphs_alternating_on_a_cluster_give_each_its_own_answer(client):
    """Two graphs named alike, different kernels and shapes, alternating on
    the same workers: each request runs its own graph."""
    graphs = [(make("alike", 8, fn=scale_kernel(2.0)), 8, 2.0),
              (make("alike", 16, fn=scale_kernel(3.0)), 16, 3.0),
              (make("alike", 8, fn=scale_kernel(5.0)), 8, 5.0)]
    futs = []
    for i in range(12):
        g, n, factor = graphs[i % 3]
        x = np.arange(n, dtype=np.float32) + i
        futs.append((client.submit_kernel_graph(g, {"x": x}, tenant="alike"), x, factor))
    for fut, x, factor in futs:
        np.testing.assert_allclose(fut.result(timeout=60)["y"], factor * x)
