"""How a CUDA worker splits its device memory between RMM pool and cache.

The device cache accounts every buffer a graph declares, exactly.  What it
cannot see comes from the same RMM pool: temporaries inside kernels (CuPy
reductions, cuBLAS and CUB workspaces), and the blocks RMM keeps on each
stream's free list.  So the cache gets the pool minus a headroom, the larger
of a fraction of the pool and a minimum; the worker reports RMM's own peak
next to the cache's, which is the headroom really used.

Outside the pool, every worker needs device memory that neither the cache
nor RMM sees: its CUDA context, cuBLAS workspaces, loaded modules, local
memory for spilled registers.  So a pool never takes all the free memory:
it is at most the free memory less a reserve, and where several workers
share one device (``workers_per_device``) at most an equal share of the
device less their reserves.  The share is of the device's total, not of
the memory free now: workers that start one after the other would
otherwise each get a share of what the previous ones left.

A pure function of the numbers, so the rules are tested without a GPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .. import config
from ..graph.errors import KaasError

#: RMM hands out (and sizes its pool in) multiples of 256 bytes.
RMM_ALIGNMENT = 256
#: Device memory each worker leaves outside its pool, unless configured
#: (``kaas.device-memory-reserve``): a CUDA context alone takes ~0.5 GiB.
DEFAULT_RESERVE = 1 << 30


@dataclass(frozen=True)
class DeviceSizing:
    pool_bytes: int
    cache_bytes: int
    headroom_bytes: int
    reserve_bytes: int = 0
    workers_per_device: int = 1


@dataclass(frozen=True)
class Headroom:
    fraction: float
    minimum: int

    def of(self, pool: int) -> int:
        return max(int(pool * self.fraction), self.minimum)


def headroom_from_config(value: Any = None) -> Headroom:
    """The ``kaas.device-memory-headroom`` setting, checked."""
    key = "kaas.device-memory-headroom"
    if value is None:
        value = config.get("device-memory-headroom") or {}
    if not isinstance(value, dict):
        raise KaasError(f"{key} must be a mapping with 'fraction' and 'minimum', got {value!r}")
    unknown = set(value) - {"fraction", "minimum"}
    if unknown:
        raise KaasError(f"{key} has unknown entries {sorted(map(str, unknown))}")
    fraction = value.get("fraction", 0.05)
    if (isinstance(fraction, bool) or not isinstance(fraction, (int, float))
            or not math.isfinite(fraction) or not 0 <= fraction < 0.5):
        raise KaasError(f"{key}.fraction must be a number in [0, 0.5), got {fraction!r}")
    minimum = value.get("minimum", "256MiB")
    bad = KaasError(f"{key}.minimum must be bytes or a size such as '256MiB', got {minimum!r}")
    if isinstance(minimum, bool) or not isinstance(minimum, (int, str)):
        raise bad
    if isinstance(minimum, str):
        try:
            minimum = config.parse_memory(minimum, 0)
        except KaasError:
            raise bad from None
    if not 0 <= minimum <= 2**50:
        raise bad
    return Headroom(float(fraction), int(minimum))


def reserve_from_config(value: Any = None) -> int:
    """The ``kaas.device-memory-reserve`` setting in bytes, checked."""
    key = "kaas.device-memory-reserve"
    if value is None:
        value = config.get("device-memory-reserve", DEFAULT_RESERVE)
    bad = KaasError(f"{key} must be bytes or a size such as '1GiB', got {value!r}")
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise bad
    if isinstance(value, str):
        try:
            value = config.parse_memory(value, 0)
        except KaasError:
            raise bad from None
    if not 0 <= value <= 2**50:
        raise bad
    return int(value)


def workers_per_device_from_config(value: Any = None) -> int:
    """The ``kaas.workers-per-device`` setting (how many workers share this
    worker's device), checked."""
    if value is None:
        value = config.get("workers-per-device", 1)
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1024:
        raise KaasError(f"kaas.workers-per-device must be an int in 1..1024, got {value!r}")
    return value


def size_device_memory(total: int, free: int, limit: Any = None, pool: Any = None,
                       headroom: Headroom | None = None,
                       default_fraction: float = config.GPU_DEFAULT_FRACTION,
                       reserve: int | None = None,
                       workers_per_device: int | None = None) -> DeviceSizing:
    """Pool and cache sizes for one worker.

    ``limit`` is what the cache may hold (``device_memory_limit``), ``pool``
    the RMM pool (``rmm_pool_size``); either may be bytes, a string or a
    fraction of ``total``.  Given only a limit, the pool is the limit plus
    headroom; given a pool, the cache is what the headroom leaves (and at
    most the limit); given neither, the pool is ``default_fraction`` of the
    device.  The pool never exceeds the memory free now less ``reserve``,
    nor this worker's share of the device (``total`` divided among
    ``workers_per_device`` workers, each leaving its reserve).
    """
    headroom = headroom or headroom_from_config()
    reserve = reserve_from_config(reserve)
    wpd = workers_per_device_from_config(workers_per_device)
    share = (int(total) - wpd * reserve) // wpd
    cap = max(0, min(int(free) - reserve, share)) // RMM_ALIGNMENT * RMM_ALIGNMENT
    cache_limit = config.parse_memory(limit, total) if limit is not None else None
    if pool is not None:
        pool_bytes = config.parse_memory(pool, total)
    elif cache_limit is not None:
        # The smallest pool whose headroom leaves exactly the limit.
        pool_bytes = max(cache_limit + headroom.minimum,
                         math.ceil(cache_limit / (1 - headroom.fraction)))
        pool_bytes = -(-pool_bytes // RMM_ALIGNMENT) * RMM_ALIGNMENT
    else:
        pool_bytes = int(total * default_fraction)
    pool_bytes = min(pool_bytes, cap) // RMM_ALIGNMENT * RMM_ALIGNMENT
    room = headroom.of(pool_bytes)
    cache = pool_bytes - room
    if cache_limit is not None:
        cache = min(cache, cache_limit)
    if cache <= 0:
        raise KaasError(
            f"an RMM pool of {pool_bytes} bytes ({free} bytes of the device's {total} are "
            f"free, {reserve} kept outside the pool, {wpd} worker(s) per device) leaves no "
            f"room for the device cache after {room} bytes of headroom; lower "
            "kaas.device-memory-headroom or kaas.device-memory-reserve, or free device memory")
    return DeviceSizing(pool_bytes=pool_bytes, cache_bytes=int(cache), headroom_bytes=room,
                        reserve_bytes=reserve, workers_per_device=wpd)
