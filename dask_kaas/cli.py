"""The ``dask-kaas`` command."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    from . import demo

    parser = argparse.ArgumentParser(prog="dask-kaas", description="Kernel-as-a-Service on Dask")
    sub = parser.add_subparsers(dest="command", required=True)
    p_demo = sub.add_parser("demo", help="run a multi-tenant MLP workload on a local cluster")
    demo.add_arguments(p_demo)
    p_demo.set_defaults(func=demo.run)
    try:
        from .bench import cli as bench_cli
    except ImportError:  # pragma: no cover - the bench package is part of the package
        bench_cli = None
    if bench_cli is not None:
        p_bench = sub.add_parser("bench", help="benchmark kaas against static and naive")
        bench_cli.add_arguments(p_bench)
        p_bench.set_defaults(func=bench_cli.run)
    from .bench import gpu as bench_gpu

    p_gpu = sub.add_parser("bench-gpu", help="GPU micro-benchmark (needs a GPU)")
    bench_gpu.add_arguments(p_gpu)
    p_gpu.set_defaults(func=bench_gpu.run)
    from .gateway import cli as gateway_cli

    p_gw = sub.add_parser("gateway", help="authenticated KServe v2 HTTP gateway for tenants")
    gateway_cli.add_arguments(p_gw)
    p_gw.set_defaults(func=gateway_cli.run)
    from .bench import gateway as bench_gateway

    p_bgw = sub.add_parser("bench-gateway", help="load and overhead of the KServe gateway")
    bench_gateway.add_arguments(p_bgw)
    p_bgw.set_defaults(func=bench_gateway.run)
    from .bench import imports as bench_imports

    p_imports = sub.add_parser("bench-import", help="start-up cost of importing dask_kaas")
    bench_imports.add_arguments(p_imports)
    p_imports.set_defaults(func=bench_imports.run)
    from .bench import placement as bench_placement

    p_place = sub.add_parser("bench-placement",
                             help="cost of one dispatch decision on a simulated pool")
    bench_placement.add_arguments(p_place)
    p_place.set_defaults(func=bench_placement.run)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
