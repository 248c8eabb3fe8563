"""The records DeviceCache keeps: its entries and statistics, what a graph
asks it to load, and what a running graph holds in it."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class CacheEntry:
    buffer_id: str
    nbytes: int
    array: Any = None
    pins: int = 0
    loading: bool = True
    const: bool = False
    #: Where the (asynchronous) copy to the device is done: a backend marker
    #: (a CUDA event) that readers on other streams wait for.  None: ready.
    ready: Any = None
    #: The handle whose data this entry is the only copy of (kept outputs).
    owner: weakref.ref[Any] | None = None
    drop_when_unpinned: bool = False


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    bytes_to_device: int = 0
    bytes_to_host: int = 0
    writebacks: int = 0
    peak_used_bytes: int = 0
    seconds_to_device: float = 0.0


@dataclass
class Load:
    """A cacheable buffer a graph needs: identity, size, and where its bytes
    come from on a miss."""

    buffer_id: str
    nbytes: int
    source: Callable[[], np.ndarray]
    const: bool = False


@dataclass
class Reservation:
    """What one graph holds in the cache while it runs."""

    pinned: list[str] = field(default_factory=list)
    private_bytes: int = 0
    hits: int = 0
    misses: int = 0
    bytes_to_device: int = 0
    seconds_to_device: float = 0.0
    arrays: dict[str, Any] = field(default_factory=dict)
