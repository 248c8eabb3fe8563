"""LocalKaasCluster: a LocalCluster whose workers each own a device.

Like dask-cuda's LocalCUDACluster it makes one worker per GPU (each with
``CUDA_VISIBLE_DEVICES`` naming its device first), and unlike it, it can also
put several workers on one GPU, each with its own slice of device memory
(``workers_per_device``).  Without a GPU it runs the CPU backend, two workers
by default, so the whole system can be used and tested anywhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import os
from typing import Any

import dask.config
from distributed import LocalCluster

from . import config
from .device.backend import gpu_count, resolve_backend_name
from .graph.errors import KaasError
from .plugin.scheduler import KaasSchedulerPlugin
from .plugin.worker import KaasWorkerPlugin

logger = logging.getLogger(__name__)

#: How often the cluster checks that every worker it should have is there.
WATCH_INTERVAL_S = 1.0
#: Nanny states after which it will not bring its worker back by itself
#: ("init" for a Nanny in ``workers``: its start was awaited and failed).
_DEAD_NANNY_STATES = ("closed", "closing", "failed", "init")


def visible_devices() -> list[str]:
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env:
        return [d.strip() for d in env.split(",") if d.strip()]
    return [str(i) for i in range(gpu_count())]


def rotate(devices: list[str], first: str) -> str:
    """CUDA_VISIBLE_DEVICES for a worker whose device is ``first``."""
    i = devices.index(first)
    return ",".join(devices[i:] + devices[:i])


def normalize_devices(devices: Any) -> list[str]:
    """GPU ids from a list of ints/strings or a "0,1" string; a KaasError
    for anything else (the ids end up in an environment variable)."""
    if isinstance(devices, str):
        devices = [d.strip() for d in devices.split(",") if d.strip()]
    if not isinstance(devices, (list, tuple)) or not devices:
        raise KaasError(f"devices must be a non-empty list of GPU ids, got {devices!r}")
    out = []
    for d in devices:
        if isinstance(d, bool) or not isinstance(d, (int, str)):
            raise KaasError(f"GPU ids must be ints or strings, got {d!r}")
        d = str(d).strip()
        if not d or len(d) > 64 or not all(c.isalnum() or c in "-_:" for c in d):
            raise KaasError(f"GPU ids must be numbers or UUIDs, got {d!r}")
        out.append(d)
    if len(set(out)) != len(out):
        raise KaasError(f"devices lists a GPU twice: {out}")
    return out


def next_device(devices: list[str], assigned: list[str]) -> str:
    """The device the next worker gets: the one fewest workers use, the
    first in order on a tie (so workers spread over the GPUs)."""
    counts = {d: 0 for d in devices}
    for d in assigned:
        if d in counts:
            counts[d] += 1
    return min(devices, key=lambda d: counts[d])


def with_devices(specs: dict[Any, Any], devices: list[str],
                 assigned: dict[Any, str]) -> dict[Any, Any]:
    """Worker specs where each worker not in ``assigned`` (name -> device)
    gets a device of its own, ``CUDA_VISIBLE_DEVICES`` naming it first.

    Pure: the specs are copied (LocalCluster shares one options dict among
    all its initial workers) and ``assigned`` is updated.
    """
    out = {}
    for name, spec in specs.items():
        if not devices or name in assigned:
            out[name] = spec
            continue
        device = next_device(devices, list(assigned.values()))
        spec = copy.deepcopy(spec)
        options = spec.setdefault("options", {})
        env = dict(options.get("env") or {})
        env["CUDA_VISIBLE_DEVICES"] = rotate(devices, device)
        options["env"] = env
        assigned[name] = device
        out[name] = spec
    return out


def _with_workers_per_device(worker_config: Any, workers_per_device: int) -> dict[str, Any]:
    """The Dask config each Nanny gives its worker, with
    ``kaas.workers-per-device`` set: a worker sizes its RMM pool from the
    device's free memory divided by it.  A Nanny merges this over its own
    config one top-level key deep, so the whole ``kaas`` section goes."""
    if worker_config is not None and not isinstance(worker_config, dict):
        raise KaasError("config must be a dict of Dask settings, got "
                        f"{type(worker_config).__name__}")
    out = dict(worker_config or {})
    section = dict(out.get("kaas") or dask.config.get("kaas", default={}) or {})
    section["workers-per-device"] = workers_per_device
    out["kaas"] = section
    return out


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
    devices:
        GPU ids to spread the workers over (default: ``CUDA_VISIBLE_DEVICES``,
        else every GPU).  Each worker's ``CUDA_VISIBLE_DEVICES`` names its own
        device first, so it sees that device as device 0.
    """

    def __init__(self, n_workers: int | None = None, *, backend: str = "auto",
                 device_memory_limit: Any = None, rmm_pool_size: Any = None,
                 slots: int = 1, policy: str | None = None, workers_per_device: int = 1,
                 devices: Any = None, threads_per_worker: int | None = None,
                 host: str = "127.0.0.1", dashboard_address: str | None = "127.0.0.1:8787",
                 **kwargs: Any) -> None:
        self.kaas_backend = resolve_backend_name(backend)
        if slots < 1 or workers_per_device < 1:
            raise KaasError("slots and workers_per_device must be at least 1")
        if devices is not None:
            self.devices = normalize_devices(devices)
        else:
            self.devices = visible_devices() if self.kaas_backend == "cuda" else []
        #: Worker name -> the device it was given.
        self.device_of: dict[Any, str] = {}
        if n_workers is None:
            n_workers = len(self.devices) * workers_per_device if self.devices else 2
        if self.kaas_backend == "cuda" and n_workers > len(self.devices) * workers_per_device:
            raise KaasError(f"{n_workers} workers requested but {len(self.devices)} GPU(s) x "
                            f"{workers_per_device} worker(s) per device are available")
        if self.kaas_backend == "cuda" and not kwargs.get("processes", True) and n_workers > 1:
            raise KaasError("the cuda backend needs processes=True for more than one worker: "
                            "each worker sets the process-wide RMM memory resource and "
                            "CUDA_VISIBLE_DEVICES applies to a whole process")
        if device_memory_limit is None and self.kaas_backend == "cuda" and workers_per_device > 1:
            device_memory_limit = config.GPU_DEFAULT_FRACTION / workers_per_device
        self.workers_per_device = workers_per_device
        if workers_per_device > 1 and kwargs.get("processes", True):
            kwargs["config"] = _with_workers_per_device(kwargs.get("config"), workers_per_device)
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

    async def _start(self) -> None:
        # LocalCluster builds its initial workers' specs without
        # new_worker_spec (only scale() calls that): give them their devices
        # here, before SpecCluster launches any of them.
        self.worker_spec = self._assign_devices(self.worker_spec)
        await super()._start()
        self._watch_task: asyncio.Task | None = asyncio.ensure_future(self._watch_workers())

    async def _close(self) -> None:
        task = getattr(self, "_watch_task", None)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
            self._watch_task = None
        # A Nanny whose start failed (killed while starting) stays in "init";
        # SpecCluster's close asserts every Nanny it created is closed.
        for nanny in list(getattr(self, "_created", ())):
            if getattr(nanny, "status", None) is not None and nanny.status.name == "init":
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(nanny.close(), 10)
                if nanny.status.name == "init":
                    nanny.status = type(nanny.status).failed
        await super()._close()

    async def _watch_workers(self) -> None:
        """Keep every worker of the spec alive, for as long as the cluster runs.

        A Nanny restarts its worker process when it dies, but Dask's
        SpecCluster gives up on a name in two ways: a worker not back within
        ``distributed.deploy.lost-worker-timeout`` has its Nanny closed and
        dropped, and a Nanny whose new process dies while starting (a kill
        during start-up) closes itself.  Neither is ever replaced, so a pool
        under repeated kills shrinks to nothing.  Here any name of the spec
        that had a worker once and has no live Nanny now gets a new one (a
        name never seen yet is SpecCluster's own start or scale-up).
        """
        self._kaas_seen: set[Any] = set()
        while True:
            await asyncio.sleep(WATCH_INTERVAL_S)
            if self.status.name not in ("running", "created"):
                continue
            try:
                await self._revive_workers()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - a start that failed: next round tries again
                logger.warning("dask_kaas: restarting a lost worker failed (%s: %s); "
                               "trying again", type(e).__name__, e)

    async def _revive_workers(self) -> None:
        self._kaas_seen.update(self.workers)
        self._kaas_seen &= set(self.worker_spec)  # scaled down: not ours to revive
        dead = [name for name, w in list(self.workers.items())
                if name in self.worker_spec
                and getattr(getattr(w, "status", None), "name", "running") in _DEAD_NANNY_STATES]
        for name in dead:
            nanny = self.workers.pop(name, None)
            if nanny is not None:
                with contextlib.suppress(Exception):
                    await nanny.close()
        missing = (set(self.worker_spec) & self._kaas_seen) - set(self.workers)
        if missing:
            logger.warning("dask_kaas: starting worker(s) %s again (lost under faults)",
                           sorted(map(str, missing)))
            self.worker_spec = self._assign_devices(self.worker_spec)
            await self._correct_state()

    def _assign_devices(self, specs: dict[Any, Any]) -> dict[Any, Any]:
        if not self.devices or not self.processes:
            return specs  # in-process workers share the process's environment
        live = {n: d for n, d in self.device_of.items() if n in self.worker_spec}
        out = with_devices(specs, self.devices, live)
        self.device_of = live
        return out

    def _update_worker_status(self, op: str, msg: Any) -> None:
        # Workers here get killed and restarted (a sticky device fault, a
        # runaway kernel, a chaos run).  When one dies before the cluster heard
        # that it joined, the scheduler's "remove" names a worker the cluster
        # never knew; SpecCluster then raises KeyError, which ends its watch of
        # the scheduler and fails the cluster's close.  Nothing is known about
        # that worker, so there is nothing to update.
        if op == "remove" and msg not in self.scheduler_info.get("workers", {}):
            return
        super()._update_worker_status(op, msg)

    def new_worker_spec(self) -> dict[Any, Any]:
        return self._assign_devices(super().new_worker_spec())
