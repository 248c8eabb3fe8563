"""``dask-kaas bench`` (also ``python -m dask_kaas.bench``)."""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from typing import Any

from dask.utils import parse_bytes

from .. import config

ALL_MODES = ["kaas", "kaas-dask", "kaas-balance", "kaas-round_robin", "kaas-static", "naive",
             "static"]
QUICK_MODES = ["kaas", "kaas-dask", "naive", "static"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scenario", default="throughput", choices=["throughput", "chaos", "single",
                                                             "latency-profile", "closed-loop"],
                   help="chaos: tenants' load while workers are killed (lost/wrong requests); "
                        "single (ONNX workloads): one request at a time through the cluster "
                        "against onnxruntime on as many threads; closed-loop: 1/8/32 clients "
                        "x batch 1/32 of the MLP, the control plane before issue 20 (old), "
                        "now (new) and plain client.submit in alternating windows "
                        "(--duration: seconds per window)")
    from .placement import count_arg

    p.add_argument("--threads", type=count_arg(1, 256), default=1,
                   help="single: BLAS threads of the worker and onnxruntime's intra-op threads")
    p.add_argument("--requests", type=count_arg(1, 100_000), default=20,
                   help="single: timed requests")
    p.add_argument("--loop-clients", default="1,8,32",
                   help="closed-loop: comma-separated counts of concurrent clients")
    p.add_argument("--loop-batches", default="1,32", help="closed-loop: comma-separated batches")
    p.add_argument("--loop-modes", default="old,new,plain",
                   help="closed-loop: from old,new,plain")
    p.add_argument("--rounds", type=count_arg(1, 1000), default=4,
                   help="closed-loop: windows per mode and cell")
    p.add_argument("--kill-every", type=float, default=3.0,
                   help="chaos: seconds between killing a random worker")
    p.add_argument("--kill-all-at", type=float, default=None,
                   help="chaos: seconds into the run at which every worker is killed")
    p.add_argument("--workload", default="mlp", type=workload_arg,
                   help="mlp, jacobi, sgemm, or onnx:<model> (a light model of the onnx "
                        "package such as onnx:resnet50, onnx:bert, or onnx:PATH.onnx)")
    p.add_argument("--model", default=None, metavar="PATH.onnx",
                   help="an ONNX model as the workload (the same as --workload onnx:PATH)")
    p.add_argument("--tenants", default=None,
                   help="comma-separated tenant counts (default 2,4,8; --quick: 8)")
    p.add_argument("--workers", type=int, default=2, help="devices (workers) in the pool")
    p.add_argument("--modes", default=None, help=f"comma-separated, from {','.join(ALL_MODES)}")
    p.add_argument("--weights-mib", type=float, default=16.0, help="constant data per tenant")
    p.add_argument("--batch", type=int, default=16,
                   help="rows per request: enough device work per request that the "
                        "workers, not the load generator, are the bottleneck")
    p.add_argument("--device-memory-limit", default=None,
                   help="per worker (default: 1.25 x all tenants' weights / workers + 8 MiB, "
                        "so they fit the pool but not one device)")
    p.add_argument("--load", default="closed", choices=["closed", "open"])
    p.add_argument("--outstanding", type=int, default=2, help="closed loop: per tenant")
    p.add_argument("--rate", type=float, default=100.0, help="open loop: requests/s")
    p.add_argument("--duration", type=float, default=None, help="seconds per mode")
    p.add_argument("--slots", type=int, default=1, help="graphs a worker runs at once")
    from .placement import count_arg

    p.add_argument("--clients", type=count_arg(1, 64), default=1,
                   help="load generator processes for the kaas and naive modes, each with "
                        "its own client and a share of the tenants; with more than one, "
                        "scheduler-side latency is reported too")
    p.add_argument("--no-fairness", action="store_true")
    p.add_argument("--no-overhead", action="store_true")
    p.add_argument("--quick", action="store_true", help="a run of under 2 minutes")
    p.add_argument("--json", default=None, help="write results here")
    p.add_argument("--plot", default=None, help="write a PNG plot here")


def workload_arg(value: str) -> str:
    if value in ("mlp", "jacobi", "sgemm") or (value.startswith("onnx:") and len(value) > 5):
        return value
    raise argparse.ArgumentTypeError(
        f"unknown workload {value!r}: mlp, jacobi, sgemm or onnx:<model>")


def machine() -> dict[str, Any]:
    from .. import __version__
    from ..device.backend import gpu_count

    try:
        import distributed

        dver = distributed.__version__
    except Exception:  # noqa: BLE001
        dver = "?"
    return {"platform": platform.platform(), "python": platform.python_version(),
            "cpus": os.cpu_count(), "gpus": gpu_count(), "distributed": dver,
            "dask_kaas": __version__}


def run(args: argparse.Namespace) -> int:
    if args.model:
        args.workload = f"onnx:{args.model}"
    if args.scenario == "single":
        if not args.workload.startswith("onnx:"):
            print("--scenario single compares ONNX workloads with onnxruntime: pass "
                  "--workload onnx:<model> or --model PATH.onnx", file=sys.stderr)
            return 2
        from ..graph.errors import KaasError
        from ..onnx.compare import run_single

        try:
            return run_single(args)
        except KaasError as e:
            print(f"dask-kaas bench: {e}", file=sys.stderr)
            return 2
    if args.scenario == "chaos":
        from .chaos import run_scenario

        return run_scenario(args)
    if args.scenario == "latency-profile":
        from .latency_profile import run_scenario as run_profile_scenario

        return run_profile_scenario(args)
    if args.scenario == "closed-loop":
        from .closed_loop import run_scenario as run_closed_loop_scenario

        return run_closed_loop_scenario(args)
    from ..client import KaasClient
    from ..cluster import LocalKaasCluster
    from .driver import LoadSpec, run_load
    from .modes import KaasMode, NaiveMode, StaticMode
    from .report import plot, table, write_json
    from .scenarios import fairness_order, overhead, weighted_share
    from .workloads import make_workload

    t_start = time.perf_counter()
    counts = [int(c) for c in (args.tenants or ("8" if args.quick else "2,4,8")).split(",")]
    modes = (args.modes or ",".join(QUICK_MODES if args.quick else ALL_MODES)).split(",")
    unknown = set(modes) - set(ALL_MODES)
    if unknown:
        print(f"unknown modes: {sorted(unknown)}", file=sys.stderr)
        return 2
    duration = args.duration or (6.0 if args.quick else 15.0)
    from ..graph.errors import KaasError

    try:
        workload = make_workload(args.workload, args.weights_mib, batch=args.batch)
        all_tenants = [workload.make_tenant(i) for i in range(max(counts))]
    except (KaasError, ValueError) as e:  # a model the importer refuses, an unknown name
        print(f"dask-kaas bench: {e}", file=sys.stderr)
        return 2
    per_tenant = all_tenants[0].nbytes
    if args.device_memory_limit:
        limit = parse_bytes(args.device_memory_limit)
    else:
        # Each worker holds its share of all weights with a quarter to spare:
        # together they fit the pool, but never one device.
        limit = int(max(counts) * per_tenant * 1.25 / args.workers) + 8 * 2**20
    spec = LoadSpec(kind=args.load, outstanding=args.outstanding, rate=args.rate,
                    duration=duration)
    doc: dict[str, Any] = {
        "command": "dask-kaas bench " + " ".join(sys.argv[2:] if len(sys.argv) > 2 else []),
        "machine": machine(),
        "config": {"workload": args.workload, "workers": args.workers, "tenant_counts": counts,
                   "weights_bytes_per_tenant": per_tenant, "device_memory_limit": limit,
                   "load": args.load, "outstanding": args.outstanding, "rate": args.rate,
                   "batch": args.batch,
                   "duration_s": duration, "slots": args.slots},
        "runs": [],
    }
    print(f"workload {args.workload}: {per_tenant / 2**20:.1f} MiB of weights per tenant; "
          f"{args.workers} workers with {limit / 2**20:.0f} MiB of device memory each; "
          f"{args.load} loop, {duration:.0f}s per mode")

    with LocalKaasCluster(args.workers, device_memory_limit=limit, slots=args.slots,
                          dashboard_address=None) as cluster, KaasClient(cluster) as client:
        doc["config"]["backend"] = cluster.kaas_backend
        static_mode = None
        for n in counts:
            tenants = all_tenants[:n]
            for m in modes:
                if m == "static":
                    static_mode = static_mode or StaticMode(args.workers, workload)
                    mode: Any = static_mode
                elif m == "naive":
                    mode = NaiveMode(client, workload, config.get("resource", "GPU"))
                else:
                    policy = "affinity" if m == "kaas" else m.split("-", 1)[1]
                    mode = KaasMode(client, workload, policy, name=m)
                if args.clients > 1 and m != "static":
                    from .multiproc import run_load_processes

                    res = run_load_processes(
                        client, mode, m, (args.workload, args.weights_mib, args.batch),
                        tenants, spec, args.clients).summary()
                else:
                    res = run_load(mode, workload, tenants, spec).summary()
                if m == "static":
                    static_mode.close()  # a fresh pool per tenant count
                    static_mode = None
                else:
                    mode.close()
                doc["runs"].append(res)
                print(table([res]).splitlines()[-1], flush=True)
        if not args.no_fairness:
            print("fairness...", flush=True)
            # Heavier requests (batch 64), so that the workers rather than this
            # process's load generator are what the tenants compete for.
            heavy = make_workload(args.workload, args.weights_mib, batch=max(64, args.batch))
            doc["fairness"] = {
                "kaas": fairness_order(client, heavy, mode="kaas"),
                "fifo": [fairness_order(client, heavy, mode="fifo") for _ in range(3)],
                "weighted": weighted_share(client, heavy, duration=min(8.0, duration)),
            }
        if not args.no_overhead:
            print("overhead...", flush=True)
            doc["overhead"] = overhead(client, rounds=5 if args.quick else 10)

    doc["ratios"] = ratios(doc["runs"], max(counts))
    doc["elapsed_s"] = round(time.perf_counter() - t_start, 1)
    print()
    print(table(doc["runs"]))
    print_summary(doc)
    if args.json:
        write_json(args.json, doc)
        print(f"JSON: {args.json}")
    if args.plot:
        plot(args.plot, doc["runs"])
        print(f"plot: {args.plot}")
    return 0


def ratios(runs: list[dict[str, Any]], n: int) -> dict[str, float | None]:
    by = {r["mode"]: r for r in runs if r["tenants"] == n}

    def div(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    k, s, nv = by.get("kaas"), by.get("static"), by.get("naive")
    return {
        "tenants": n,
        "kaas_vs_static_throughput": div(k and k["throughput_rps"], s and s["throughput_rps"]),
        "kaas_vs_naive_throughput": div(k and k["throughput_rps"], nv and nv["throughput_rps"]),
        "static_vs_kaas_p99": div(s and s["p99_ms"], k and k["p99_ms"]),
    }


def print_summary(doc: dict[str, Any]) -> None:
    r = doc["ratios"]

    def f(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}x"

    print(f"\nratios at {r['tenants']} tenants: kaas/static throughput "
          f"{f(r['kaas_vs_static_throughput'])}, kaas/naive throughput "
          f"{f(r['kaas_vs_naive_throughput'])}, static/kaas p99 {f(r['static_vs_kaas_p99'])}")
    fair = doc.get("fairness")
    if fair:
        fifo_last = [x["last_light"] for x in fair["fifo"]]
        print(f"fairness: light's last of {fair['kaas']['total']} completions at position "
              f"{fair['kaas']['last_light']} with kaas (FIFO: {fifo_last}); weighted 2:1 "
              f"completed {fair['weighted']['completed']} (ratio "
              f"{f(fair['weighted']['ratio'])})")
    for r in doc["runs"]:
        if r.get("scheduler_p50_ms") is not None:
            print(f"{r['mode']} ({r['tenants']} tenants): scheduler-side p50 "
                  f"{r['scheduler_p50_ms']:.1f} ms, p99 {r['scheduler_p99_ms']:.1f} ms "
                  f"(client-side {r['p50_ms']:.1f} / {r['p99_ms']:.1f} ms)")
    ov = doc.get("overhead")
    if ov:
        print(f"overhead: kaas p50 {ov['kaas_p50_ms']:.2f} ms vs plain client.submit "
              f"{ov['plain_submit_p50_ms']:.2f} ms ({ov['ratio']:.2f}x)")
    print(f"elapsed {doc['elapsed_s']}s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dask-kaas bench", description=__doc__)
    add_arguments(p)
    return run(p.parse_args(argv))
