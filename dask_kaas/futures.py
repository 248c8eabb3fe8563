"""The futures a kernel-graph submission returns.

A request's outputs come back as a dict of host arrays, and an output kept
on a device (``keep_on_device``) has a future of its own that can be passed
to the next graph or any Dask task; both are ordinary Dask futures otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from distributed import Client, Future

from .device.handles import DeviceArray


def _to_host(value: Any) -> Any:
    return value.get() if isinstance(value, DeviceArray) else value


class DeviceArrayFuture(Future):
    """Future of an output kept on a worker's device.

    Pass it as an input to another graph (which is then placed on the worker
    holding it) or to any Dask task; ``result()`` copies it to the host.
    """

    def result(self, timeout: Any = None) -> np.ndarray:  # type: ignore[override]
        return np.asarray(_to_host(super().result(timeout=timeout)))


class KernelGraphFuture(Future):
    """Future of a submitted kernel graph.

    ``result()`` is ``{output name: numpy array}``; ``fut[name]`` is the
    :class:`DeviceArrayFuture` of an output named in ``keep_on_device``.
    It is an ordinary Dask future otherwise: ``client.submit(f, fut)`` gets
    the dict of outputs.
    """

    def __init__(self, key: str, client: Client, graph: str,
                 kept: Mapping[str, DeviceArrayFuture]) -> None:
        super().__init__(key, client)
        self.graph = graph
        self.kept = dict(kept)

    def __getitem__(self, name: str) -> DeviceArrayFuture:
        try:
            return self.kept[name]
        except KeyError:
            raise KeyError(f"graph {self.graph!r} keeps no output {name!r} on the device; "
                           f"kept: {sorted(self.kept)}") from None

    def result(self, timeout: Any = None) -> dict[str, np.ndarray]:  # type: ignore[override]
        out = super().result(timeout=timeout)
        return {k: _to_host(v) for k, v in out.items()}

    async def _result(self, raiseit: bool = True) -> Any:
        # A result pushed with its worker's report (plugin/push.py) has
        # arrived before the key's key-in-memory: no gather for it.
        await self._state.wait()
        if self.status == "finished":
            state = getattr(self.client, "_kaas_state", None)
            out = state.pushed.take(self.key) if state is not None else None
            if out is not None:
                return out
        return await super()._result(raiseit)
