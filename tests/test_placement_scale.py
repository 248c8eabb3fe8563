"""Placement at release: candidate sets, the decision log, bench-placement."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dask_kaas.bench.placement import simulate
from dask_kaas.plugin.candidates import LoadIndex, candidate_workers
from dask_kaas.plugin.directory import BufferDirectory
from dask_kaas.plugin.placement import (
    AffinityPolicy,
    CostModel,
    PlacementContext,
    WorkerView,
    completion_terms,
)
from dask_kaas.request import GraphRequest, InputRef

MIB = 2**20


@settings(max_examples=80, deadline=None)
@given(data=st.data(), n=st.integers(2, 40))
def test_candidates_choose_what_a_full_scan_chooses(data, n):
    """Without memory pressure the winner is a holder or one of the least
    loaded, so scoring only those gives the full scan's answer."""
    workers = [f"w{i:02d}" for i in range(n)]
    d = BufferDirectory()
    for b in "abcde":
        for w in data.draw(st.lists(st.sampled_from(workers), max_size=3, unique=True)):
            d.added(w, b, data.draw(st.integers(1, 64)) * MIB)
    wait = {w: data.draw(st.floats(0, 0.2)) for w in workers}
    index = LoadIndex()
    for w in workers:
        index.update(w, wait[w])
    used = data.draw(st.lists(st.sampled_from("abcde"), min_size=1, max_size=3, unique=True))
    req = GraphRequest("k", "g", "t", [InputRef(b, 8 * MIB, b, None, True) for b in used],
                       nbytes=30 * MIB)
    ctx = PlacementContext(d, CostModel(), who_has=lambda key: set())
    views = {w: WorkerView(w, 1, None, 0, wait[w], 0) for w in workers}
    policy = AffinityPolicy()
    full = policy.choose(req, list(views.values()), ctx)
    full_terms = policy.last_terms[full.address]
    some = candidate_workers(req, d, index, ctx.who_has)
    picked = policy.choose(req, [views[w] for w in some], ctx)
    assert sum(policy.last_terms[picked.address].values()) == pytest.approx(
        sum(full_terms.values()))
    assert len(some) <= 4 + 8


def test_decision_log_keeps_the_winner_and_the_runner_up_only():
    d = BufferDirectory()
    d.added("w1", "a", 32 * MIB)
    ctx = PlacementContext(d, CostModel(), who_has=lambda key: set())
    req = GraphRequest("k", "g", "t", [InputRef("w", 32 * MIB, "a", None, True)],
                       nbytes=32 * MIB)
    views = [WorkerView(f"w{i}", 1, None, 0, 0.001 * i, 0) for i in range(50)]
    policy = AffinityPolicy()
    chosen = policy.choose(req, views, ctx)
    assert chosen.address == "w1"  # holds the weights
    assert list(policy.last_terms) == ["w1", "w0"]
    assert policy.last_terms["w1"] == completion_terms(req, views[1], ctx)
    assert policy.last_terms["w1"]["load"] == 0.0 < policy.last_terms["w0"]["load"]


def test_load_index_least_and_discard():
    idx = LoadIndex()
    for i, t in enumerate([0.5, 0.1, 0.3, 0.2]):
        idx.update(f"w{i}", t)
    assert idx.least(2) == ["w1", "w3"]
    idx.update("w1", 0.9)  # busier now
    idx.discard("w3")  # full
    assert idx.least(3) == ["w2", "w0", "w1"]
    for _ in range(1000):  # stale entries do not pile up
        idx.update("w0", idx._at["w0"] + 1)
    assert len(idx._heap) <= 4 * len(idx) + 64 + 1
    assert idx.least(10) == ["w2", "w1", "w0"]


def test_simulate_reports_every_decision():
    r = simulate(20, 500, decisions=300, tenants=3)
    assert r["workers"] == 20 and r["buffers"] == 500 and r["decisions"] == 300
    assert 0 < r["us_per_decision_p50"] <= r["us_per_decision_p99"]


def test_bench_placement_cli_writes_json(tmp_path):
    out = tmp_path / "p.json"
    subprocess.run([sys.executable, "-m", "dask_kaas.cli", "bench-placement", "--workers",
                    "10", "--buffers", "100", "--decisions", "50", "--json", str(out)],
                   check=True, capture_output=True)
    r = json.loads(out.read_text())
    assert {"workers", "buffers", "decisions", "us_per_decision_p50",
            "us_per_decision_p99"} <= set(r)
    assert r["workers"] == 10 and r["decisions"] == 50


@pytest.mark.parametrize("bad", ["0", "-5", "nan", "1e99", "\udcff", "10" * 30])
def test_bench_placement_rejects_bad_counts(bad):
    p = subprocess.run([sys.executable, "-m", "dask_kaas.cli", "bench-placement",
                        "--workers", bad], capture_output=True, text=True,
                       errors="surrogateescape")
    assert p.returncode == 2 and "--workers" in p.stderr
