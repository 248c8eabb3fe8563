"""Memory planning of temp buffers: temps that are never live at the same
time share memory, so a request reserves the peak of its live temps, not
their sum (a 176-layer network needs a few activations at once, not all).

A temp is live from the first launch that touches it to the last one (both
included: a launch's inputs and outputs never share).  With ``n_iter > 1``
every temp is live throughout (a temp written late may be read again at the
start of the next iteration), so nothing is shared.  Placement is greedy by
size (largest first, at the lowest offset free of every temp whose lifetime
overlaps), on 256-byte boundaries, in one byte arena.

Temps start zeroed: the arena is allocated zeroed, and a temp whose region
an earlier temp used is zeroed again before its first launch, unless the
kernel that first touches it writes it as an output and declares that it
writes every element (an array function with ``kaas_writes_all = True``,
as the ONNX operator kernels do): then the zeroing is skipped as useless.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from .buffers import BufferKind

if TYPE_CHECKING:
    from .graph import KernelGraph

#: Offsets of temps in the arena are multiples of this (CUDA's allocation granule).
ALIGN = 256


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


@dataclass(frozen=True)
class TempPlan:
    """Where each temp lives in one arena of ``arena_bytes``."""

    #: Temp name -> byte offset in the arena.
    offsets: dict[str, int]
    #: Bytes of the arena: the peak of live temps (plus alignment).
    arena_bytes: int
    #: Sum of the temps' bytes, as if none shared.
    sum_bytes: int
    #: Launch index -> temps to zero just before it (their region was used).
    zero_before: dict[int, tuple[str, ...]] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        """Arena bytes over the sum of temps (1.0 when there are none)."""
        return self.arena_bytes / self.sum_bytes if self.sum_bytes else 1.0


def _writes_all(launch: object, name: str) -> bool:
    kernel = getattr(launch, "kernel", None)
    fn = getattr(kernel, "fn", None)
    if getattr(kernel, "kind", None) != "array" or not getattr(fn, "kaas_writes_all", False):
        return False
    return any(a.buffer.name == name and a.mode == "out"
               for a in launch.buffer_args())  # type: ignore[attr-defined]


def plan_temps(graph: KernelGraph) -> TempPlan:
    """The memory plan of ``graph``'s temps (cached on the graph until a
    buffer or launch is added)."""
    stamp = (len(graph.buffers), len(graph.launches), graph.n_iter)
    cached = graph.__dict__.get("_temp_plan")
    if cached is not None and cached[0] == stamp:
        return cached[1]
    plan = _plan(graph)
    graph.__dict__["_temp_plan"] = (stamp, plan)
    return plan


def _plan(graph: KernelGraph) -> TempPlan:
    temps = [b for b in graph.buffers.values() if b.kind == BufferKind.TEMP]
    if not temps:
        return TempPlan({}, 0, 0)
    total = sum(b.nbytes for b in temps)
    if graph.n_iter > 1:
        offsets, pos = {}, 0
        for b in temps:
            offsets[b.name] = pos
            pos += _aligned(b.nbytes)
        return TempPlan(offsets, pos, total)
    first: dict[str, int] = {}
    last: dict[str, int] = {}
    for i, launch in enumerate(graph.launches):
        for a in launch.buffer_args():
            n = a.buffer.name
            first.setdefault(n, i)
            last[n] = i
    names = [b.name for b in temps]
    size = np.array([_aligned(b.nbytes) for b in temps], dtype=np.int64)
    start = np.array([first.get(n, -1) for n in names], dtype=np.int64)
    end = np.array([last.get(n, -1) for n in names], dtype=np.int64)
    off = np.zeros(len(temps), dtype=np.int64)
    placed = np.zeros(len(temps), dtype=bool)
    for i in sorted(range(len(temps)), key=lambda k: (-size[k], start[k])):
        live = placed & (start <= end[i]) & (start[i] <= end)
        best = 0
        if size[i] and live.any():
            busy = sorted(zip(off[live].tolist(), (off[live] + size[live]).tolist()))
            for lo, hi in busy:
                if best + size[i] <= lo:
                    break
                best = max(best, hi)
        off[i] = best
        placed[i] = True
    arena = int((off + size).max())
    zero_before: dict[int, list[str]] = {}
    for i, n in enumerate(names):
        if size[i] == 0 or start[i] < 0:
            continue
        earlier = (end < start[i]) & (end >= 0) & (off < off[i] + size[i]) & (off + size > off[i])
        if earlier.any() and not _writes_all(graph.launches[int(start[i])], n):
            zero_before.setdefault(int(start[i]), []).append(n)
    return TempPlan(dict(zip(names, off.tolist())), arena, total,
                    {k: tuple(v) for k, v in zero_before.items()})
