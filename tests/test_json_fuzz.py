"""Fuzzing KernelGraph.from_json: mutated valid documents, random JSON and
random bytes.  Whatever comes in, only a KaasError may come out, and every
document that is accepted must be written back by ``to_json`` and read back
as the same graph.

The quick profile runs in every ``pytest``; ``pytest -m slow`` runs 10,000
documents and prints what happened (``-s`` to see it).
"""

from __future__ import annotations

import copy
import json
import time
from collections import Counter

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dask_kaas import In, InOut, KaasError, Kernel, KernelGraph, Out
from dask_kaas.workloads import jacobi, mlp, sgemm


def _literals_graph() -> KernelGraph:
    g = KernelGraph("literals", n_iter=2)
    x = g.input("x", (3, 2), np.float64)
    t = g.temp("t", (3, 2), np.float64)
    y = g.output("y", (3, 2), np.float64)
    g.launch(Kernel.library("copy"), [In(x), Out(t)])
    g.launch(Kernel.array(sgemm.relu_inplace_fn), [InOut(t), np.int8(-3), np.uint64(2**64 - 1),
                                                   np.float16(0.5), np.float32("nan"),
                                                   np.complex128(1 - 2j), np.bool_(True)],
             grid=(2, 3), block=32, shared_mem=16)
    g.launch(Kernel.library("copy"), [t, Out(y)])
    return g


def _image_graph() -> KernelGraph:
    g = KernelGraph("image")
    x = g.input("x", (4,), np.float32)
    y = g.output("y", (4,), np.float32)
    k = Kernel(Kernel.CUDA_FILE, "k", image=b".version 8.0\x00\xff", image_format="ptx",
               cpu=jacobi.jacobi_step_cpu)
    g.launch(k, [x, Out(y)], grid=1, block=1)
    return g


SEEDS = [g.to_dict() for g in (mlp.mlp_graph(2, 4, 8, 2), jacobi.jacobi_graph(8, 3),
                               sgemm.link_graph(4), _literals_graph(), _image_graph())]

SPECIAL = st.sampled_from([
    None, True, False, 0, 1, -1, 2, 2.7, -0.0, 1e308, 2**31, 2**63, 2**64, 10**100,
    -(10**100), float("nan"), float("inf"), float("-inf"), "", " ", "nan", "inf", "-inf",
    "Infinity", "this:s", "os:system", "sys:exit", "builtins:exec", "numpy:add",
    "numpy:ndarray.sum", "dask_kaas.config:os.system", "dask_kaas.bench.__main__:main",
    "antigravity:fly", "\ud800", "x" * 300, "float32", "int8", "bool", "complex64",
    "float128", "object", "<f4", ">f8", "S5", "f4,f4", "in", "out", "inout", "input",
    "const", "temp", "output", "cuda", "array", "library", "cuda_file", "gemm", "-O3",
    "ptx", "cubin", "AAAA", "!!", "dask-kaas-graph/1", [], {}, [[]], [1e308, 1e308],
    [-1], [0], [2**62, 2**62], list(range(40)), {"literal": 1, "dtype": "int32"},
    {"buffer": "x"}, {"buffer": "x", "mode": "out"},
])
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=4),
    max_leaves=12)
VALUES = st.one_of(SPECIAL.map(copy.deepcopy), JSON)  # copies: mutations edit in place


def _like(node):
    """Values of the same JSON type as ``node`` (more documents stay valid, so
    the round trip is exercised too)."""
    if isinstance(node, bool):
        return st.booleans()
    if isinstance(node, int):
        return st.integers(-5, 2**33) | st.integers()
    if isinstance(node, float):
        return st.floats(width=32) | st.floats()
    if isinstance(node, str):
        return st.sampled_from([node + "2", node.upper(), node[:-1]]) | st.text(max_size=8)
    return VALUES


def _children(node):
    if isinstance(node, dict):
        return list(node)
    if isinstance(node, list):
        return list(range(len(node)))
    return []


@st.composite
def mutated_documents(draw):
    doc = copy.deepcopy(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 4))):
        parent, key, node = None, None, doc
        while _children(node) and draw(st.integers(0, 3)) > 0:
            parent, key = node, draw(st.sampled_from(_children(node)))
            node = node[key]
        op = draw(st.sampled_from(["replace", "replace", "delete", "add", "duplicate"]))
        if parent is None:
            if op == "replace":
                doc = draw(VALUES)
            continue
        if op == "replace":
            parent[key] = draw(_like(node) | VALUES)
        elif op == "delete":
            del parent[key]
        elif op == "add" and isinstance(node, dict):
            node[draw(st.sampled_from(["extra", "name", "cpu", "mode", "n_iter"]) |
                      st.text(max_size=6))] = draw(VALUES)
        elif op == "add" and isinstance(node, list):
            node.insert(draw(st.integers(0, len(node))), draw(VALUES))
        elif op == "duplicate" and isinstance(parent, list):
            parent.append(copy.deepcopy(node))
    return doc


@st.composite
def encoded(draw, docs):
    """A document as text or bytes, sometimes with NaN constants, broken
    bytes or cut short."""
    doc = draw(docs)
    text = json.dumps(doc, ensure_ascii=draw(st.booleans()))
    form = draw(st.sampled_from(["text", "bytes", "corrupt", "cut"]))
    if form == "text":
        return text
    raw = text.encode("utf-8", "surrogatepass")
    if form == "corrupt" and raw:
        i = draw(st.integers(0, len(raw) - 1))
        raw = raw[:i] + bytes([draw(st.integers(0, 255))]) + raw[i + 1:]
    elif form == "cut":
        raw = raw[:draw(st.integers(0, len(raw)))]
    return raw


DOCUMENTS = st.one_of(
    encoded(mutated_documents()),
    encoded(mutated_documents()),
    encoded(mutated_documents()),
    encoded(JSON),
    st.binary(max_size=200),
    st.text(max_size=200),
    st.sampled_from(["[" * 5000, '{"a":' * 3000, "1" * 5000, "\ufeff{}", "-", "nul"]),
)


class Tally:
    def __init__(self) -> None:
        self.outcomes: Counter[str] = Counter()
        self.slowest = 0.0
        self.bad: list[str] = []


def check_one(doc, tally: Tally) -> None:
    start = time.perf_counter()
    try:
        g = KernelGraph.from_json(doc)
    except KaasError:
        tally.outcomes["refused"] += 1
        return
    except Exception as e:  # noqa: BLE001 - this is what the test looks for
        tally.outcomes["other exception"] += 1
        tally.bad.append(f"{type(e).__name__}: {e} <- {doc!r:.300}")
        return
    finally:
        tally.slowest = max(tally.slowest, time.perf_counter() - start)
    tally.outcomes["accepted"] += 1
    try:
        text = g.to_json()
        back = KernelGraph.from_json(text)
        assert back == g, "read back as a different graph"
        assert back.to_json() == text, "written differently the second time"
    except Exception as e:  # noqa: BLE001
        tally.outcomes["accepted-then-unwritable"] += 1
        tally.bad.append(f"unwritable: {type(e).__name__}: {e} <- {doc!r:.300}")


def run_fuzz(n: int) -> Tally:
    tally = Tally()

    @settings(max_examples=n, deadline=None, database=None, derandomize=False,
              suppress_health_check=list(HealthCheck))
    @given(DOCUMENTS)
    def fuzz(doc):
        check_one(doc, tally)

    fuzz()
    total = sum(tally.outcomes.values())
    print(f"\nfrom_json fuzz: {total} documents, {dict(tally.outcomes)}, "
          f"slowest {tally.slowest * 1e3:.1f} ms")
    assert not tally.bad, "\n".join(tally.bad[:20])
    assert tally.outcomes["accepted"] > 0 and tally.outcomes["refused"] > 0
    return tally


def test_fuzz_from_json_quick():
    run_fuzz(300)


@pytest.mark.slow
def test_fuzz_from_json_10k():
    tally = run_fuzz(10_000)
    assert sum(tally.outcomes.values()) >= 10_000
