"""``dask-kaas gateway`` (also ``python -m dask_kaas.gateway``)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import ssl
import sys

from dask.utils import parse_bytes, parse_timedelta


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scheduler", required=True, help="address of the cluster's scheduler")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000, help="port (0: any free port)")
    p.add_argument("--tenants", required=True, help="tenants file (YAML); SIGHUP re-reads it")
    p.add_argument("--tls-cert", default=None, help="certificate (PEM) to serve HTTPS")
    p.add_argument("--tls-key", default=None, help="private key (PEM) of --tls-cert")
    p.add_argument("--max-body-size", default="64MiB", help="largest request body")
    p.add_argument("--request-timeout", default=None,
                   help="longest an inference request may take (504 past it); default: "
                        "Dask's TCP + connect timeouts + 30s (90s with Dask's defaults), "
                        "so a request on a host that went silent is re-run by Dask "
                        "before the gateway gives up on it")
    p.add_argument("--max-models", type=int, default=64, help="models per tenant")
    p.add_argument("--max-const-bytes", default="1GiB", help="const bytes per tenant")
    p.add_argument("--submit-threads", type=int, default=4,
                   help="threads that submit graphs to the cluster")
    p.add_argument("--max-model-size", default="512MiB",
                   help="largest ONNX file a tenant may upload as a model (413 above)")
    p.add_argument("--max-batch-size", type=int, default=64,
                   help="default max_batch_size of an ONNX model whose first dimension "
                        "is symbolic (a model's upload may set its own)")
    p.add_argument("--max-graphs", type=int, default=8,
                   help="graphs (distinct input shapes) kept per ONNX model, least "
                        "recently used out")


def ssl_context(cert: str | None, key: str | None) -> ssl.SSLContext | None:
    if not cert and not key:
        return None
    if not cert or not key:
        raise ValueError("--tls-cert and --tls-key go together")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    return ctx


def run(args: argparse.Namespace) -> int:
    from ..client import KaasClient
    from ..graph.errors import KaasError
    from .app import Gateway
    from .tenants import TenantBook
    from .timeouts import dask_failover_s, default_request_timeout

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s "
                                                   "%(message)s")
    try:
        tls = ssl_context(args.tls_cert, args.tls_key)
        max_body = parse_bytes(args.max_body_size)
        failover = dask_failover_s()
        timeout = (default_request_timeout() if args.request_timeout is None
                   else parse_timedelta(args.request_timeout, default="s"))
        max_const = parse_bytes(args.max_const_bytes)
        max_model = parse_bytes(args.max_model_size)
        if not (math.isfinite(timeout) and timeout > 0) or max_body < 1 or max_const < 0 \
                or args.max_models < 1 or args.submit_threads < 1 or max_model < 1 \
                or not 0 <= args.max_batch_size <= 1 << 16 or args.max_graphs < 1:
            raise ValueError("--request-timeout, --max-body-size, --max-model-size, "
                             "--max-models, --max-graphs and --submit-threads must be "
                             "positive, --max-batch-size in 0..65536")
        TenantBook.load(args.tenants)  # refuse a bad file before connecting
    except (ValueError, OSError, TypeError, KeyError, KaasError) as e:
        print(f"dask-kaas gateway: {e}", file=sys.stderr)
        return 2
    log = logging.getLogger(__name__)
    log.info("request timeout %g s (Dask gives up on a silent host after %g s)", timeout,
             failover)
    if timeout <= failover:
        log.warning("--request-timeout %g s is not above Dask's TCP + connect timeouts "
                    "(%g s): a request on a host that goes silent gets 504 before Dask "
                    "runs it again", timeout, failover)
    client = KaasClient(args.scheduler, set_as_default=False)
    try:
        gateway = Gateway(client, args.tenants, max_body_size=max_body,
                          request_timeout=timeout, max_models=args.max_models,
                          max_const_bytes=max_const, submit_threads=args.submit_threads,
                          max_model_size=max_model, max_batch_size=args.max_batch_size,
                          max_graphs=args.max_graphs)
    except (KaasError, ValueError) as e:
        client.close()
        print(f"dask-kaas gateway: {e}", file=sys.stderr)
        return 2
    try:  # install the plugins and see the workers now, not on the first request
        client.kaas_stats()
    except KaasError as e:
        log.warning("cluster not ready yet: %s", e)

    def announce(address: str) -> None:
        print(f"dask-kaas gateway serving {address}", flush=True)

    try:
        asyncio.run(gateway.serve(args.host, args.port, tls, on_listen=announce))
    finally:
        client.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dask-kaas gateway",
        description="authenticated KServe v2 HTTP gateway in front of a dask_kaas cluster")
    add_arguments(parser)
    return run(parser.parse_args(argv))
