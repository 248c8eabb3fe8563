"""How a CUDA worker splits its device memory between RMM pool and cache.

The device cache accounts every buffer a graph declares, exactly.  What it
cannot see comes from the same RMM pool: temporaries inside kernels (CuPy
reductions, cuBLAS and CUB workspaces), and the blocks RMM keeps on each
stream's free list.  So the cache gets the pool minus a headroom, the larger
of a fraction of the pool and a minimum; the worker reports RMM's own peak
next to the cache's, which is the headroom really used.

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


@dataclass(frozen=True)
class DeviceSizing:
    pool_bytes: int
    cache_bytes: int
    headroom_bytes: int


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


def size_device_memory(total: int, free: int, limit: Any = None, pool: Any = None,
                       headroom: Headroom | None = None,
                       default_fraction: float = config.GPU_DEFAULT_FRACTION) -> DeviceSizing:
    """Pool and cache sizes for one worker.

    ``limit`` is what the cache may hold (``device_memory_limit``), ``pool``
    the RMM pool (``rmm_pool_size``); either may be bytes, a string or a
    fraction of ``total``.  Given only a limit, the pool is the limit plus
    headroom; given a pool, the cache is what the headroom leaves (and at
    most the limit); given neither, the pool is ``default_fraction`` of the
    device.  The pool never exceeds the memory free now.
    """
    headroom = headroom or headroom_from_config()
    free_aligned = int(free) // RMM_ALIGNMENT * RMM_ALIGNMENT
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
    pool_bytes = min(pool_bytes, free_aligned) // RMM_ALIGNMENT * RMM_ALIGNMENT
    room = headroom.of(pool_bytes)
    cache = pool_bytes - room
    if cache_limit is not None:
        cache = min(cache, cache_limit)
    if cache <= 0:
        raise KaasError(
            f"an RMM pool of {pool_bytes} bytes ({free} bytes of the device's {total} are "
            f"free) leaves no room for the device cache after {room} bytes of headroom; "
            "lower kaas.device-memory-headroom or free device memory")
    return DeviceSizing(pool_bytes=pool_bytes, cache_bytes=int(cache), headroom_bytes=room)
