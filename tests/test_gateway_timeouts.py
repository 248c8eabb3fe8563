"""The gateway's default request timeout sits above Dask's own timeouts
(issue 16, item 15).

Before, it was 30 s, Dask's default TCP timeout: a request on a host that
went silent got 504 just before Dask noticed and ran it again elsewhere.
"""

from __future__ import annotations

import os
import subprocess
import sys

import dask
import pytest
from dask.utils import parse_timedelta
from gateway_helpers import GatewayProcess, tenants_yaml

from dask_kaas import LocalKaasCluster
from dask_kaas.gateway import cli
from dask_kaas.gateway.timeouts import MARGIN_S, dask_failover_s, default_request_timeout


def dask_s(key: str) -> float:
    return float(parse_timedelta(dask.config.get(key), default="s"))


@pytest.mark.parametrize("tcp, connect", [(None, None), ("45s", "10s"), (5, 7),
                                          ("2 minutes", "30s")])
def test_the_default_is_above_dask_tcp_and_connect_timeouts(tcp, connect):
    settings = {}
    if tcp is not None:
        settings = {"distributed.comm.timeouts.tcp": tcp,
                    "distributed.comm.timeouts.connect": connect}
    with dask.config.set(settings):
        tcp_s = dask_s("distributed.comm.timeouts.tcp")
        connect_s = dask_s("distributed.comm.timeouts.connect")
        assert dask_failover_s() == tcp_s + connect_s
        assert default_request_timeout() == tcp_s + connect_s + MARGIN_S
        assert default_request_timeout() > tcp_s + connect_s


def test_the_cli_default_follows_dask_and_a_flag_still_wins(tmp_path):
    """``dask-kaas gateway`` with no --request-timeout: above Dask's TCP
    timeout (it was equal to it); with one: exactly that."""
    parser = cli.argparse.ArgumentParser()
    cli.add_arguments(parser)
    base = ["--scheduler", "tcp://127.0.0.1:9", "--tenants", "t.yaml"]
    args = parser.parse_args(base)
    default = (parse_timedelta(args.request_timeout, default="s")
               if args.request_timeout is not None else default_request_timeout())
    assert default > dask_s("distributed.comm.timeouts.tcp") + \
        dask_s("distributed.comm.timeouts.connect")
    assert parser.parse_args([*base, "--request-timeout", "5s"]).request_timeout == "5s"


def test_the_gateway_process_says_which_timeout_it_uses(tmp_path):
    """From the environment's Dask config, as an operator would set it; a
    flag at or below Dask's timeouts is warned about."""
    path = tmp_path / "t.yaml"
    path.write_text(tenants_yaml({"a": {"token": "a"}}, {}))
    env = {"DASK_DISTRIBUTED__COMM__TIMEOUTS__TCP": "41s",
           "DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": "9s"}
    with LocalKaasCluster(1, backend="cpu", dashboard_address="127.0.0.1:0",
                          device_memory_limit="64MB") as cluster:
        g = GatewayProcess(cluster.scheduler_address, str(path), env=env)
        try:
            assert f"request timeout {41 + 9 + MARGIN_S:g} s" in g.log(), g.log()
            assert "not above Dask" not in g.log()
        finally:
            g.stop()
        g = GatewayProcess(cluster.scheduler_address, str(path), "--request-timeout", "41s",
                           env=env)
        try:
            assert "request timeout 41 s" in g.log() and "not above Dask" in g.log()
        finally:
            g.stop()


def test_a_bad_dask_timeout_is_refused_clearly(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text(tenants_yaml({"a": {"token": "a"}}, {}))
    proc = subprocess.run([sys.executable, "-m", "dask_kaas.gateway", "--scheduler",
                           "tcp://127.0.0.1:9", "--tenants", str(path)],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ,
                               "DASK_DISTRIBUTED__COMM__TIMEOUTS__TCP": "soon"})
    assert proc.returncode == 2 and "dask-kaas gateway:" in proc.stderr, proc.stderr
