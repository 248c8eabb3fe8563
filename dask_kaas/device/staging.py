"""Host-to-device copies of large buffers through pinned staging memory.

A DMA engine reads only pinned (page-locked) host memory at full speed; the
buffers a tenant hands in are ordinary pageable memory.  So large copies go
in chunks through two pinned buffers per stream: while the DMA of one chunk
runs, the next is copied into the other buffer.  One host thread copying
into pinned memory is slower than a PCIe 5 link, so each chunk is filled by
several threads (NumPy releases the GIL while it copies).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

#: Copies at least this large are staged; smaller ones go straight through.
STAGING_THRESHOLD = 1 << 20
CHUNK = 16 << 20
#: Threads filling one staging chunk: half the cores, at most 8 (past that
#: host memory bandwidth, not threads, is the limit).
FILL_THREADS = max(1, min(8, (os.cpu_count() or 2) // 2))


class _Pair:
    """Two pinned host buffers and the events saying their DMA is done."""

    def __init__(self, cupy: Any, cupyx: Any) -> None:
        self.buffers = [cupyx.empty_pinned((CHUNK,), dtype=np.uint8) for _ in range(2)]
        self.events = [cupy.cuda.Event(disable_timing=True) for _ in range(2)]
        self.used = [False, False]


def split_ranges(n: int, parts: int, align: int = 4096) -> list[tuple[int, int]]:
    """``[0, n)`` cut into at most ``parts`` contiguous ranges of aligned
    starts, covering every byte once."""
    if n <= 0:
        return []
    per_part = -(-n // max(1, parts))
    step = -(-per_part // align) * align
    return [(lo, min(n, lo + step)) for lo in range(0, n, step)]


class StagedCopier:
    def __init__(self, cupy: Any, cupyx: Any, threads: int = FILL_THREADS) -> None:
        self.cupy = cupy
        self.cupyx = cupyx
        self._pairs: dict[int, _Pair] = {}
        self._threads = threads
        self._pool = (ThreadPoolExecutor(threads, thread_name_prefix="kaas-staging")
                      if threads > 1 else None)

    def _fill(self, dst: np.ndarray, src: np.ndarray) -> None:
        ranges = split_ranges(src.nbytes, self._threads)
        if self._pool is None or len(ranges) < 2:
            np.copyto(dst, src)
            return
        futures = [self._pool.submit(np.copyto, dst[lo:hi], src[lo:hi]) for lo, hi in ranges]
        for f in futures:
            f.result()

    def copy(self, dst_ptr: int, src: np.ndarray, stream: Any) -> None:
        """Queue the copy of the bytes of ``src`` (C-contiguous) to device
        address ``dst_ptr`` on ``stream``.  Returns once the host data has
        been read; the last DMAs may still be in flight."""
        cupy = self.cupy
        flat = src.reshape(-1).view(np.uint8)
        n = flat.nbytes
        pair = self._pairs.get(id(stream))
        if pair is None:
            pair = self._pairs[id(stream)] = _Pair(cupy, self.cupyx)
        kind = cupy.cuda.runtime.memcpyHostToDevice
        for i, off in enumerate(range(0, n, CHUNK)):
            k = i % 2
            m = min(CHUNK, n - off)
            if pair.used[k]:
                pair.events[k].synchronize()  # the DMA out of this buffer is done
            self._fill(pair.buffers[k][:m], flat[off:off + m])
            cupy.cuda.runtime.memcpyAsync(dst_ptr + off, pair.buffers[k].ctypes.data, m, kind,
                                          stream.ptr)
            pair.events[k].record(stream)
            pair.used[k] = True

    def close(self) -> None:
        for pair in self._pairs.values():
            for event in pair.events:
                event.synchronize()
        self._pairs.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
