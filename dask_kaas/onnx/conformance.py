"""ONNX's own node conformance cases, run through the importer and a cluster.

``onnx.backend.test.case.node.collect_testcases`` generates every node case
of the installed ``onnx`` (model, inputs, expected outputs, tolerances).
Each case of an operator in the table is imported; inputs that the table
needs as constants (a Reshape's shape, Slice's starts, Clip's bounds: shapes
are fixed at import) are given as initializers when the case feeds them at
run time.  The imported cases are merged into a few large kernel graphs (one
request each, buffers renamed per case), run on the cluster, and each output
is compared with the expected one at the case's tolerances.

Every case ends as ``passed``, ``refused`` (a KaasError at import: an
operator, type, attribute value or opset the table does not implement) or
``wrong`` (a result outside tolerance, or a failure at run time): the
contract is that ``wrong`` stays 0.

``python -m dask_kaas.onnx.conformance`` prints the table on a local CPU
(or ``--backend cuda``) cluster.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..graph.errors import KaasError
from ..graph.graph import KernelGraph
from ..graph.launch import ArgRef, In, InOut, Out
from .importer import from_onnx, param_inputs, with_constants
from .ops import OPS


@dataclass
class Case:
    name: str
    op: str
    graph: KernelGraph | None = None
    feed: dict[str, np.ndarray] = field(default_factory=dict)
    expected: dict[str, np.ndarray] = field(default_factory=dict)
    rtol: float = 1e-3
    atol: float = 1e-7
    outcome: str = ""
    detail: str = ""


def _array(v: Any) -> np.ndarray:
    if hasattr(v, "data_type"):
        from onnx import numpy_helper

        return numpy_helper.to_array(v)
    return np.asarray(v)


def _operator(model: Any, name: str) -> str | None:
    """The table operator a case is about: the op of a one-node case, else
    the table op the case name starts with (an expanded function body)."""
    ops = [n.op_type for n in model.graph.node]
    if len(set(ops)) == 1:
        return ops[0] if ops[0] in OPS else None
    key = name[len("test_"):].replace("_", "").lower()
    best = None
    for op in set(ops) | set(OPS):
        if key.startswith(op.lower()) and op in OPS and (best is None or len(op) > len(best)):
            best = op
    return best


def import_case(model: Any, inputs: Sequence[Any]) -> tuple[KernelGraph, dict[str, np.ndarray]]:
    """Import a case, with its shape-like inputs as constants if the table
    needs them at import."""
    names = [vi.name for vi in model.graph.input
             if vi.name not in {t.name for t in model.graph.initializer}]
    feed = dict(zip(names, inputs))
    try:
        g, consts = from_onnx(model)
    except KaasError:
        fixed = {n: feed[n] for n in param_inputs(model) if n in feed}
        if not fixed:
            raise
        g, consts = from_onnx(with_constants(model, fixed))
        for n in fixed:
            feed.pop(n)
    return g, {**consts, **{n: v for n, v in feed.items() if n in g.buffers}}


def collect(ops: Sequence[str] | None = None) -> list[Case]:
    """Every node case (each data set separately) of the table's operators."""
    from onnx.backend.test.case.node import collect_testcases

    cases = []
    for tc in collect_testcases(None):
        op = _operator(tc.model, tc.name)
        if op is None or (ops is not None and op not in ops):
            continue
        for k, (inputs, outputs) in enumerate(tc.data_sets or []):
            name = tc.name if len(tc.data_sets) == 1 else f"{tc.name}[{k}]"
            case = Case(name, op, rtol=float(tc.rtol), atol=float(tc.atol))
            try:
                case.graph, case.feed = import_case(tc.model, [_array(v) for v in inputs])
            except KaasError as e:
                case.outcome, case.detail = "refused", e.detail
            else:
                case.expected = {o.name: _array(v) for o, v in zip(tc.model.graph.output,
                                                                    outputs)}
            cases.append(case)
    return cases


def merge(cases: Sequence[Case], name: str) -> tuple[KernelGraph, dict[str, np.ndarray],
                                                      dict[tuple[int, str], str]]:
    """One graph running every case (buffers renamed ``c<i>.<j>``): inputs
    and consts of the cases become its inputs."""
    g = KernelGraph(name)
    feed: dict[str, np.ndarray] = {}
    outputs: dict[tuple[int, str], str] = {}
    wrap = {"in": In, "out": Out, "inout": InOut}
    for i, case in enumerate(cases):
        assert case.graph is not None
        rename = {}
        for j, b in enumerate(case.graph.buffers.values()):
            new = f"c{i}.{j}"
            rename[b.name] = new
            if b.is_input:
                g.input(new, b.shape, b.dtype)
                feed[new] = np.asarray(case.feed[b.name])
            elif b.kind.value == "output":
                g.output(new, b.shape, b.dtype)
                outputs[(i, b.name)] = new
            else:
                g.temp(new, b.shape, b.dtype)
        for launch in case.graph.launches:
            args = [wrap[a.mode](g.buffers[rename[a.buffer.name]]) if isinstance(a, ArgRef)
                    else a for a in launch.args]
            g.launch(launch.kernel, args)
    return g, feed, outputs


def _compare(case: Case, got: dict[str, np.ndarray]) -> None:
    for oname, ref in case.expected.items():
        v = got.get(oname)
        if v is None or v.shape != ref.shape:
            case.outcome = "wrong"
            case.detail = f"output {oname}: shape {getattr(v, 'shape', None)} != {ref.shape}"
            return
        if ref.dtype.kind in "fc":
            ok = np.allclose(v.astype(np.float64), ref.astype(np.float64), rtol=case.rtol,
                             atol=case.atol, equal_nan=True)
        else:
            ok = np.array_equal(v, ref)
        if not ok:
            case.outcome = "wrong"
            case.detail = f"output {oname} differs"
            return
    case.outcome = "passed"


def run(cases: Sequence[Case], client: Any, *, per_request: int = 250,
        tenant: str = "onnx-conformance") -> None:
    """Run the imported cases in merged requests; a request that fails is
    rerun case by case, so one failure names its case."""
    from ..client import submit_kernel_graph

    todo = [c for c in cases if c.graph is not None]
    chunks = [todo[i:i + per_request] for i in range(0, len(todo), per_request)]
    futures = []
    for k, chunk in enumerate(chunks):
        g, feed, outs = merge(chunk, f"onnx_conformance_{k}")
        futures.append((chunk, outs, submit_kernel_graph(g, feed, client, tenant=tenant)))
    for chunk, outs, fut in futures:
        try:
            result = fut.result()
        except KaasError:
            for case in chunk:
                _run_one(case, client, tenant)
            continue
        for i, case in enumerate(chunk):
            _compare(case, {o: result[outs[(i, o)]] for o in case.expected})


def _run_one(case: Case, client: Any, tenant: str) -> None:
    from ..client import submit_kernel_graph

    assert case.graph is not None
    try:
        got = submit_kernel_graph(case.graph, case.feed, client, tenant=tenant).result()
    except KaasError as e:
        case.outcome, case.detail = "wrong", f"failed at run time: {e}"
        return
    _compare(case, got)


def table(cases: Sequence[Case]) -> dict[str, Counter]:
    out: dict[str, Counter] = defaultdict(Counter)
    for c in cases:
        out[c.op]["cases"] += 1
        out[c.op][c.outcome] += 1
    return dict(sorted(out.items()))


def format_table(cases: Sequence[Case]) -> str:
    rows = table(cases)
    lines = [f"{'operator':<24}{'cases':>6}{'passed':>8}{'refused':>8}{'wrong':>7}"]
    total: Counter = Counter()
    for op, c in rows.items():
        total.update(c)
        lines.append(f"{op:<24}{c['cases']:>6}{c['passed']:>8}{c['refused']:>8}{c['wrong']:>7}")
    lines.append(f"{'total (' + str(len(rows)) + ' operators)':<24}{total['cases']:>6}"
                 f"{total['passed']:>8}{total['refused']:>8}{total['wrong']:>7}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dask_kaas.onnx.conformance",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", default="cpu", choices=["cpu", "cuda", "auto"])
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--refusals", action="store_true", help="list each refused case and why")
    args = p.parse_args(argv)
    from ..client import KaasClient
    from ..cluster import LocalKaasCluster

    cases = collect()
    with LocalKaasCluster(args.workers, backend=args.backend, dashboard_address=None) as cl, \
            KaasClient(cl) as client:
        run(cases, client)
    print(format_table(cases))
    for c in cases:
        if c.outcome == "wrong" or (args.refusals and c.outcome == "refused"):
            print(f"{c.outcome}: {c.name}: {c.detail}")
    return 1 if any(c.outcome == "wrong" for c in cases) else 0


if __name__ == "__main__":
    sys.exit(main())
