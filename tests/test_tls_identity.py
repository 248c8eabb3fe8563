"""Tenant identity and operator actions on a cluster with Dask TLS and
client certificates (made here with the openssl CLI): a tenant is its
certificate's CN, operator actions need a CN listed in kaas.operators."""

from __future__ import annotations

import shutil
import subprocess

import dask
import numpy as np
import pytest
from distributed.security import Security

from dask_kaas import (
    AccessDeniedError,
    KaasClient,
    KaasError,
    Kernel,
    KernelGraph,
    LocalKaasCluster,
    Out,
)

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")


def openssl(*args: str, cwd) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    """A CA, and a certificate signed by it for each CN."""
    d = tmp_path_factory.mktemp("tls")
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out",
            "ca.pem", "-days", "2", "-subj", "/CN=kaas-test-ca", cwd=d)
    for cn in ("node", "ops", "alice", "bob"):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{cn}.key", "-out",
                f"{cn}.csr", "-subj", f"/O=kaas-test/CN={cn}", cwd=d)
        openssl("x509", "-req", "-in", f"{cn}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                "-CAcreateserial", "-out", f"{cn}.pem", "-days", "2", cwd=d)
    return d


def security(certs, cn: str, node: bool = False) -> Security:
    kw = dict(tls_ca_file=str(certs / "ca.pem"), require_encryption=True,
              tls_client_cert=str(certs / f"{cn}.pem"), tls_client_key=str(certs / f"{cn}.key"))
    if node:
        kw.update(tls_scheduler_cert=str(certs / f"{cn}.pem"),
                  tls_scheduler_key=str(certs / f"{cn}.key"),
                  tls_worker_cert=str(certs / f"{cn}.pem"),
                  tls_worker_key=str(certs / f"{cn}.key"))
    return Security(**kw)


@pytest.fixture(scope="module")
def tls_cluster(certs):
    with dask.config.set({"kaas.operators": ["ops"]}):
        with LocalKaasCluster(1, backend="cpu", protocol="tls://", dashboard_address="127.0.0.1:0",
                              security=security(certs, "node", node=True),
                              device_memory_limit="64MB") as c:
            yield c


@pytest.fixture(scope="module")
def clients(certs, tls_cluster):
    opened = {cn: KaasClient(tls_cluster.scheduler_address, security=security(certs, cn))
              for cn in ("ops", "alice", "bob")}
    yield opened
    for c in opened.values():
        c.close()


def graph():
    g = KernelGraph("tls-relu")
    x = g.input("x", (4,), np.float32)
    y = g.output("y", (4,), np.float32)
    g.launch(Kernel.library("relu"), [x, Out(y)])
    return g


X = np.array([-1, 2, -3, 4], np.float32)


def test_cluster_really_uses_tls(tls_cluster, clients):
    assert tls_cluster.scheduler_address.startswith("tls://")
    with pytest.raises((OSError, TypeError)):  # no certificate, no connection
        KaasClient(tls_cluster.scheduler_address, timeout="3s")


def test_operator_can_switch_policy_and_clear_caches(clients):
    ops = clients["ops"]
    assert ops.kaas_set_policy("balance") == "balance"
    assert ops.kaas_stats()["policy"] == "balance"
    assert ops.kaas_set_policy("affinity") == "affinity"
    ops.kaas_clear_caches()
    ops.kaas_set_weight("alice", 1.5)  # another tenant's weight
    assert ops.kaas_stats()["weights"]["alice"] == 1.5


def test_tenant_cannot_do_operator_actions(clients):
    alice, ops = clients["alice"], clients["ops"]
    with pytest.raises(AccessDeniedError, match="operator action.*'alice'"):
        alice.kaas_set_policy("balance")
    assert ops.kaas_stats()["policy"] == "affinity"
    with pytest.raises(AccessDeniedError, match="operator action"):
        alice.kaas_clear_caches()


def test_tenant_sets_only_its_own_weight(clients):
    alice, bob = clients["alice"], clients["bob"]
    with pytest.raises(AccessDeniedError, match="weight of tenant 'bob'"):
        alice.kaas_set_weight("bob", 5.0)
    assert "bob" not in alice.kaas_stats()["weights"]
    bob.kaas_set_weight("bob", 2.0)
    assert bob.kaas_stats()["weights"]["bob"] == 2.0


def test_tenant_cannot_submit_as_another(clients):
    alice, ops = clients["alice"], clients["ops"]
    fut = alice.submit_kernel_graph(graph(), {"x": X}, tenant="bob")
    with pytest.raises(AccessDeniedError, match="may not submit as tenant 'bob'"):
        fut.result(timeout=60)
    mine = alice.submit_kernel_graph(graph(), {"x": X}, tenant="alice")
    default = alice.submit_kernel_graph(graph(), {"x": X})  # "default" means its identity
    for f in (mine, default):
        np.testing.assert_array_equal(f.result(timeout=60)["y"], np.maximum(X, 0))
    # an operator (a gateway) may submit for any tenant
    carol = ops.submit_kernel_graph(graph(), {"x": X}, tenant="carol")
    np.testing.assert_array_equal(carol.result(timeout=60)["y"], np.maximum(X, 0))
    tenants = ops.kaas_stats()["tenants"]
    assert tenants["alice"]["graphs_run"] == 2
    assert tenants["carol"]["graphs_run"] == 1
    assert "bob" not in tenants and "default" not in tenants


def test_a_tenant_sees_only_its_own_statistics(clients):
    alice, bob, ops = clients["alice"], clients["bob"], clients["ops"]
    np.testing.assert_array_equal(
        bob.submit_kernel_graph(graph(), {"x": X}).result(timeout=60)["y"], np.maximum(X, 0))
    alice.submit_kernel_graph(graph(), {"x": X}).result(timeout=60)
    bob.kaas_set_weight("bob", 3.0)
    mine = alice.kaas_stats()
    assert set(mine["tenants"]) == {"alice"} and mine["tenants"]["alice"]["graphs_run"] >= 1
    assert "bob" not in mine["weights"]
    assert set(mine["dispatch"]["vruntime"]) <= {"alice"}
    assert set(mine["dispatch"]["backlog"]) <= {"alice"}
    assert mine["workers"]  # the cluster's own figures stay visible
    everyone = ops.kaas_stats()
    assert {"alice", "bob"} <= set(everyone["tenants"]) and everyone["weights"]["bob"] == 3.0
    with pytest.raises(AccessDeniedError, match="kaas_state is an operator action"):
        alice.kaas_state()
    assert "resident" in ops.kaas_state()


@pytest.mark.parametrize("value", [5, [None], {"ops": True}])
def test_a_malformed_operators_setting_lets_nobody_in(clients, value):
    with dask.config.set({"kaas.operators": value}):
        with pytest.raises(KaasError, match="kaas.operators"):
            clients["ops"].kaas_set_policy("balance")
    assert clients["ops"].kaas_stats()["policy"] == "affinity"
    with dask.config.set({"kaas.operators": "ops"}):  # one identity as a string
        assert clients["ops"].kaas_set_policy("affinity") == "affinity"
