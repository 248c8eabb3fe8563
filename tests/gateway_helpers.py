"""Starting a gateway process and talking raw HTTP to it, for the gateway tests."""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from dask_kaas.gateway import token_digest


def tenants_yaml(tenants: dict[str, dict[str, Any]], operators: dict[str, str]) -> str:
    lines = ["tenants:"]
    for name, fields in tenants.items():
        fields = dict(fields)
        fields["token_sha256"] = token_digest(fields.pop("token"))
        lines.append(f"  {name}: {json.dumps(fields)}")
    lines.append("operators:")
    for name, token in operators.items():
        lines.append(f"  {name}: {{token_sha256: {token_digest(token)}}}")
    return "\n".join(lines) + "\n"


class GatewayProcess:
    """``dask-kaas gateway`` as its own process on 127.0.0.1, any free port."""

    def __init__(self, scheduler: str, tenants_file: str, *args: str,
                 env: dict[str, str] | None = None, module: str = "dask_kaas.gateway") -> None:
        cmd = [sys.executable, "-m", module]
        if module == "dask_kaas.cli":
            cmd.append("gateway")
        cmd += ["--scheduler", scheduler, "--host", "127.0.0.1", "--port", "0",
                "--tenants", tenants_file, *args]
        self.stderr = tempfile.NamedTemporaryFile(prefix="gateway-", suffix=".log")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.stderr, text=True,
                                     env={**os.environ, **(env or {})})
        line = self.proc.stdout.readline()
        if "serving" not in line:
            self.proc.kill()
            raise RuntimeError(f"gateway did not start: {line!r}\n{self.log()}")
        self.url = line.split()[-1]
        self.ssl_context = None
        self.host, self.port = self.url.split("//")[1].rsplit(":", 1)
        self.port = int(self.port)
        self.address = f"{self.host}:{self.port}"

    def log(self) -> str:
        with open(self.stderr.name, errors="replace") as f:
            return f.read()

    def request(self, method: str, path: str, body: bytes | None = None, token: str | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        if self.ssl_context is not None:
            conn = http.client.HTTPSConnection(self.host, self.port, timeout=60,
                                               context=self.ssl_context)
        else:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=60)
        h = dict(headers or {})
        if token is not None:
            h["Authorization"] = f"Bearer {token}"
        try:
            conn.request(method, path, body=body, headers=h)
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()

    def json(self, method: str, path: str, body: Any = None, token: str | None = None,
             headers: dict[str, str] | None = None) -> tuple[int, Any]:
        if body is not None and not isinstance(body, bytes):
            body = json.dumps(body).encode()
        status, _, data = self.request(method, path, body, token, headers)
        return status, (json.loads(data) if data else None)

    def metrics(self, token: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        status, _, data = self.request("GET", "/metrics", token=token)
        assert status == 200, data
        out = {}
        for fam in text_string_to_metric_families(data.decode()):
            for s in fam.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out

    def sample(self, token: str, name: str, **labels: str) -> float:
        return self.metrics(token).get((name, tuple(sorted(labels.items()))), 0.0)

    def wait_for(self, predicate: Any, what: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for "
                                     f"{what() if callable(what) else what}")
            time.sleep(0.02)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()
        self.stderr.close()
