"""The ``dask-kaas`` command."""

from __future__ import annotations

import argparse
import importlib
import sys

#: Subcommand -> (module with add_arguments(parser) and run(args), help).
#: Modules are imported only when the command line is built, so each
#: subcommand's dependencies stay out of ``import dask_kaas``.
COMMANDS = {
    "demo": ("dask_kaas.demo", "run a multi-tenant MLP workload on a local cluster"),
    "bench": ("dask_kaas.bench.cli", "benchmark kaas against static and naive"),
    "bench-gpu": ("dask_kaas.bench.gpu", "GPU micro-benchmark (needs a GPU)"),
    "gateway": ("dask_kaas.gateway.cli", "authenticated KServe v2 HTTP gateway for tenants"),
    "bench-gateway": ("dask_kaas.bench.gateway", "load and overhead of the KServe gateway"),
    "bench-import": ("dask_kaas.bench.imports", "start-up cost of importing dask_kaas"),
    "bench-placement": ("dask_kaas.bench.placement",
                        "cost of one dispatch decision on a simulated pool"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dask-kaas", description="Kernel-as-a-Service on Dask")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=help_text)
        module.add_arguments(p)
        p.set_defaults(func=module.run)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
