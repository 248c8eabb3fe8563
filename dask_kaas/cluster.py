"""LocalKaasCluster: a LocalCluster whose workers each own a device.

Like dask-cuda's LocalCUDACluster it makes one worker per GPU (each with
``CUDA_VISIBLE_DEVICES`` naming its device first), and unlike it, it can also
put several workers on one GPU, each with its own slice of device memory
(``workers_per_device``).  Without a GPU it runs the CPU backend, two workers
by default, so the whole system can be used and tested anywhere.
"""

from __future__ import annotations

import copy
import os
from typing import Any

from distributed import LocalCluster

from . import config
from .device.backend import gpu_count, resolve_backend_name
from .graph.errors import KaasError
from .plugin.scheduler import KaasSchedulerPlugin
from .plugin.worker import KaasWorkerPlugin


def visible_devices() -> list[str]:
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env:
        return [d.strip() for d in env.split(",") if d.strip()]
    return [str(i) for i in range(gpu_count())]


def rotate(devices: list[str], first: str) -> str:
    """CUDA_VISIBLE_DEVICES for a worker whose device is ``first``."""
    i = devices.index(first)
    return ",".join(devices[i:] + devices[:i])


class LocalKaasCluster(LocalCluster):
    """A local Dask cluster ready for kernel graphs.

    Parameters
    ----------
    n_workers:
        Workers to start; default one per GPU times ``workers_per_device``,
        or 2 on the CPU backend.
    backend:
        ``"auto"`` (CUDA where a GPU is visible, else CPU), ``"cuda"`` or ``"cpu"``.
    device_memory_limit:
        Device memory each worker's cache may use: bytes, a string ("64MB") or
        a fraction of the device.  With several workers per device the default
        fraction is divided among them.
    slots:
        Graphs a worker may run at once (CUDA streams / CPU threads); the
        worker advertises this many units of the ``GPU`` resource.
    policy:
        Placement policy: ``affinity`` (default), ``balance``, ``round_robin``
        or ``static``.
    """

    def __init__(self, n_workers: int | None = None, *, backend: str = "auto",
                 device_memory_limit: Any = None, rmm_pool_size: Any = None,
                 slots: int = 1, policy: str | None = None, workers_per_device: int = 1,
                 threads_per_worker: int | None = None, host: str = "127.0.0.1",
                 dashboard_address: str | None = "127.0.0.1:8787", **kwargs: Any) -> None:
        from . import dashboard  # noqa: F401 - the KaaS page, before the dashboard starts

        self.kaas_backend = resolve_backend_name(backend)
        if slots < 1 or workers_per_device < 1:
            raise KaasError("slots and workers_per_device must be at least 1")
        self.devices = visible_devices() if self.kaas_backend == "cuda" else []
        if n_workers is None:
            n_workers = len(self.devices) * workers_per_device if self.devices else 2
        if self.kaas_backend == "cuda" and n_workers > len(self.devices) * workers_per_device:
            raise KaasError(f"{n_workers} workers requested but {len(self.devices)} GPU(s) x "
                            f"{workers_per_device} worker(s) per device are available")
        if device_memory_limit is None and self.kaas_backend == "cuda" and workers_per_device > 1:
            device_memory_limit = config.GPU_DEFAULT_FRACTION / workers_per_device
        self.workers_per_device = workers_per_device
        worker_plugin = KaasWorkerPlugin(self.kaas_backend, device_memory_limit, rmm_pool_size)
        scheduler_kwargs = dict(kwargs.pop("scheduler_kwargs", None) or {})
        scheduler_kwargs.setdefault("plugins", []).append(
            KaasSchedulerPlugin(policy=policy, worker_plugin=worker_plugin))
        resource = config.get("resource", "GPU")
        resources = dict(kwargs.pop("resources", None) or {})
        resources[resource] = slots
        super().__init__(n_workers=n_workers, threads_per_worker=threads_per_worker or slots + 1,
                         host=host, dashboard_address=dashboard_address,
                         scheduler_kwargs=scheduler_kwargs, resources=resources, **kwargs)

    def new_worker_spec(self) -> dict[Any, Any]:
        spec = super().new_worker_spec()
        if not self.devices:
            return spec
        ((name, options),) = spec.items()
        options = copy.deepcopy(options)
        taken = sum(1 for n in self.worker_spec if n != name)
        device = self.devices[(taken // self.workers_per_device) % len(self.devices)]
        env = dict(options["options"].get("env") or {})
        env["CUDA_VISIBLE_DEVICES"] = rotate(self.devices, device)
        options["options"]["env"] = env
        return {name: options}
