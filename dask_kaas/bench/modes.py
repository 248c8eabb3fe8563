"""The systems a benchmark compares, behind one small interface.

- ``KaasMode``: this system (any placement policy).
- ``NaiveMode``: plain ``client.submit`` of the same NumPy work with the GPU
  resource and default Dask placement; no device cache, so every call copies
  all its inputs to the "device" (fresh memory), as a GPU function without a
  cache would.
- ``StaticMode``: dedicated allocation, the serverless status quo.  A tenant
  needs a device of its own; with more tenants than devices it waits for one
  and pays a real cold start: the device's worker process is restarted and
  the tenant's weights are loaded into the new one.
"""

from __future__ import annotations

import abc
import concurrent.futures
import queue
import threading
import time
from collections import deque
from typing import Any

import dask
from distributed import Client, Future, LocalCluster, as_completed

from ..client import KaasClient
from .workloads import Tenant, Workload, run_host


def scatter_named(client: Client, arrays: dict[str, Any], **kwargs: Any) -> dict[str, Future]:
    """Scatter named arrays under fresh keys (a dict given to ``scatter``
    would use its names as keys, shared by every tenant)."""
    names = list(arrays)
    futs = client.scatter([arrays[n] for n in names], hash=False, **kwargs)
    return dict(zip(names, futs))


class Mode(abc.ABC):
    name = "?"

    def prepare(self, tenants: list[Tenant]) -> None:
        self.tenants = tenants

    @abc.abstractmethod
    def submit(self, tenant: int, request: dict[str, Any]) -> Any:
        """Start one request; returns a future (Dask's, or concurrent's)."""

    def submit_many(self, tenant: int, requests: list[dict[str, Any]]) -> list[Any]:
        """Start several requests of one tenant at once."""
        return [self.submit(tenant, r) for r in requests]

    def completions(self) -> Any:
        """An ``as_completed``-like object: ``add(future)``, and iteration
        yielding finished futures.  The load generator fetches only the
        results it checks, so that it is not itself the bottleneck of a
        2-core machine (every mode is measured the same way)."""
        return as_completed([])

    def output(self, result: Any) -> Any:
        """The output array out of a request's result."""
        return result

    def counters(self) -> dict[str, float]:
        """Cumulative hits, misses, bytes_to_device, cold_starts."""
        return {}

    def close(self) -> None:  # noqa: B027 - nothing to release by default
        """Release what ``prepare`` set up."""


class KaasMode(Mode):
    def __init__(self, client: KaasClient, workload: Workload, policy: str = "affinity",
                 name: str | None = None, manage: bool = True) -> None:
        self.client = client
        self.workload = workload
        self.policy = policy
        self.name = name or ("kaas" if policy == "affinity" else f"kaas-{policy}")
        #: False in the extra load-generator processes: one process sets the
        #: policy and clears the caches for all of them.
        self.manage = manage

    def prepare(self, tenants: list[Tenant]) -> None:
        super().prepare(tenants)
        if self.manage:
            self.client.kaas_set_policy(self.policy)
            self.client.kaas_clear_caches()
        # ONNX models' weights (about 100 MiB a tenant) are scattered once, as
        # the naive mode does and as OnnxModel does, rather than identified by
        # content at every submission on the load generator's cores.
        self.weights = [scatter_named(self.client, t.consts) if
                        self.workload.name.startswith("onnx:") else t.consts for t in tenants]

    def submit(self, tenant: int, request: dict[str, Any]) -> Any:
        t = self.tenants[tenant]
        return self.client.submit_kernel_graph(self.workload.graph,
                                               {**self.weights[tenant], **request},
                                               tenant=t.name)

    def output(self, result: Any) -> Any:
        return result[self.workload.output]

    def close(self) -> None:
        self.weights = []

    def counters(self) -> dict[str, float]:
        ws = self.client.kaas_stats()["workers"].values()
        return {k: float(sum(w[k] for w in ws))
                for k in ("hits", "misses", "bytes_to_device", "evictions")}


class NaiveMode(Mode):
    name = "naive"

    def __init__(self, client: Client, workload: Workload, resource: str = "GPU") -> None:
        self.client = client
        self.workload = workload
        self.resource = resource
        self._bytes = 0
        self._lock = threading.Lock()

    def prepare(self, tenants: list[Tenant]) -> None:
        super().prepare(tenants)
        # Weights live in the cluster's host memory, scattered once per tenant.
        self.weights = [scatter_named(self.client, t.consts) for t in tenants]

    def submit(self, tenant: int, request: dict[str, Any]) -> Any:
        t = self.tenants[tenant]
        with self._lock:
            self._bytes += t.nbytes + sum(a.nbytes for a in request.values())
        return self.client.submit(run_host, self.workload.host_fn, True,
                                  **self.weights[tenant], **request,
                                  resources={self.resource: 1}, pure=False)

    def output(self, result: Any) -> Any:
        return result[self.workload.output]

    def counters(self) -> dict[str, float]:
        return {"bytes_to_device": float(self._bytes)}

    def close(self) -> None:
        self.weights = []


class _CompletionQueue:
    """``as_completed`` for concurrent futures."""

    def __init__(self) -> None:
        self._done: queue.Queue[Any] = queue.Queue()
        self._count = 0
        self._lock = threading.Lock()

    def add(self, fut: concurrent.futures.Future) -> None:
        with self._lock:
            self._count += 1
        fut.add_done_callback(self._done.put)

    def __iter__(self) -> Any:
        return self

    def __next__(self) -> Any:
        with self._lock:
            if self._count == 0:
                raise StopIteration
            self._count -= 1
        return self._done.get()

    def count(self) -> int:
        with self._lock:
            return self._count

    def next_batch(self, block: bool = True) -> list[Any]:
        out = []
        with self._lock:
            if self._count == 0:
                return out
        out.append(self._done.get())
        while True:
            try:
                out.append(self._done.get_nowait())
            except queue.Empty:
                break
        with self._lock:
            self._count -= len(out)
        return out


class StaticMode(Mode):
    """Dedicated devices, handed from tenant to tenant with cold starts."""

    name = "static"

    def __init__(self, n_devices: int, workload: Workload) -> None:
        self.workload = workload
        self.n_devices = n_devices
        self._pending: dict[int, deque] = {}
        self._serving: set[int] = set()
        self._cond = threading.Condition()
        self._restart_lock = threading.Lock()
        self._stop = False
        self.cold_starts = 0
        self.bytes_to_device = 0
        self.cold_start_seconds: list[float] = []
        # A worker missing while it restarts must not be closed for good.
        self._config = dask.config.set({"distributed.deploy.lost-worker-timeout": "600s"})
        self._config.__enter__()
        self.cluster = LocalCluster(n_workers=n_devices, threads_per_worker=1,
                                    resources={"GPU": 1}, host="127.0.0.1",
                                    dashboard_address=None, processes=True)
        self.client = Client(self.cluster)

    def prepare(self, tenants: list[Tenant]) -> None:
        super().prepare(tenants)
        self._pending = {i: deque() for i in range(len(tenants))}
        names = sorted(self._names())
        self._threads = [threading.Thread(target=self._device_loop, args=(name,), daemon=True,
                                          name=f"static-device-{name}") for name in names]
        for th in self._threads:
            th.start()

    def _names(self) -> dict[Any, str]:
        return {w["name"]: addr for addr, w in self.client.scheduler_info()["workers"].items()}

    def _address(self, name: Any) -> str:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            addr = self._names().get(name)
            if addr is not None:
                return addr
            time.sleep(0.05)
        raise TimeoutError(f"static baseline: worker {name!r} did not come back")

    def submit(self, tenant: int, request: dict[str, Any]) -> Any:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            self._pending[tenant].append((request, fut, time.monotonic()))
            self._cond.notify_all()
        return fut

    def _next_tenant(self) -> int | None:
        """The tenant whose oldest request has waited longest, among those no
        device is serving.  Caller holds the lock."""
        best = None
        for t, q in self._pending.items():
            if q and t not in self._serving and (best is None or q[0][2] < best[1]):
                best = (t, q[0][2])
        return best[0] if best else None

    def _device_loop(self, name: Any) -> None:
        warm: int | None = None
        weights: dict[str, Future] = {}
        addr = self._address(name)
        while True:
            with self._cond:
                tenant = self._next_tenant()
                while tenant is None and not self._stop:
                    self._cond.wait(0.1)
                    tenant = self._next_tenant()
                if self._stop:
                    return
                self._serving.add(tenant)
                batch = list(self._pending[tenant])
                self._pending[tenant].clear()
            try:
                if warm != tenant:
                    weights = {}  # no results may remain on a worker we restart
                    t0 = time.perf_counter()
                    with self._restart_lock:  # concurrent restarts race in Dask
                        self.client.restart_workers([addr])
                    addr = self._address(name)
                    weights = scatter_named(self.client, self.tenants[tenant].consts,
                                            workers=[addr])
                    self.cold_start_seconds.append(time.perf_counter() - t0)
                    self.cold_starts += 1
                    self.bytes_to_device += self.tenants[tenant].nbytes
                    warm = tenant
                futs = [self.client.submit(run_host, self.workload.host_fn, False, **weights,
                                           **req, workers=[addr], resources={"GPU": 1},
                                           pure=False) for req, _, _ in batch]
                for (req, out, _), f in zip(batch, futs):
                    try:
                        out.set_result(f.result()[self.workload.output])
                    except Exception as e:  # noqa: BLE001 - reported as a failed request
                        out.set_exception(e)
                    self.bytes_to_device += sum(a.nbytes for a in req.values())
                del futs
            except Exception as e:  # noqa: BLE001
                for _, out, _ in batch:
                    if not out.done():
                        out.set_exception(e)
                warm = None
            finally:
                with self._cond:
                    self._serving.discard(tenant)
                    self._cond.notify_all()

    def completions(self) -> Any:
        return _CompletionQueue()

    def counters(self) -> dict[str, float]:
        return {"bytes_to_device": float(self.bytes_to_device),
                "cold_starts": float(self.cold_starts)}

    def close(self) -> None:
        with self._cond:
            self._stop = True
            for q in self._pending.values():
                for _, fut, _ in q:
                    fut.cancel()
                q.clear()
            self._cond.notify_all()
        for th in getattr(self, "_threads", []):
            th.join(timeout=30)
        self.client.close()
        self.cluster.close()
        self._config.__exit__(None, None, None)
