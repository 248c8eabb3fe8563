"""Running requests on the cluster without blocking the gateway's event loop.

The gateway holds one ordinary (synchronous) :class:`~dask_kaas.KaasClient`,
whose Dask event loop runs in its own thread, and serves HTTP on a second
event loop in the main thread.  Why not one loop with ``asynchronous=True``:
``submit_kernel_graph`` calls the scheduler synchronously inside
(``_ClientState.ensure``/``refresh`` use ``client.sync`` for the plugin
registration and the worker-info RPC, and a const's first use calls
``client.scatter``); on an asynchronous client those calls return
coroutines instead of results, and on the client's own loop thread they
would deadlock.  So:

* ``submit_kernel_graph`` runs in a small thread pool (it returns as soon as
  the graph is sent; only its occasional scheduler RPCs block, and they block
  a pool thread, not the HTTP loop);
* the result is awaited *on the client's loop* with the future's own
  coroutine (``KernelGraphFuture._result``: a result pushed with its
  worker's report needs no gather) handed over by
  ``asyncio.run_coroutine_threadsafe``: no thread waits per request, so
  thousands of requests may be in flight;
* on timeout or when the HTTP caller goes away the Dask future is cancelled
  the same way (``client.cancel(..., asynchronous=True)``), so an abandoned
  request that has not started never runs.

Consts go through the client's own const registry
(:class:`~dask_kaas.consts.ConstRegistry`), exactly as the direct client's
do: found by content token (taken once, at upload: a const is read-only
here), sent to two workers, under a fresh key if the token was released
before (Dask forgets a released key asynchronously, so re-sending the same
key could be undone by that release), and sent again with its requests by
the client's :class:`~dask_kaas.resend.Resender` if every copy dies with its
workers.  The gateway holds no const future of its own: the model holds the
array, and the registry keeps the cluster copy while that array lives.

Admission (``max_in_flight`` per tenant, 429) is counted here too, on the
HTTP loop thread only.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
from distributed import Future

from ..client import KaasClient, _state
from ..consts import ConstRegistry
from ..device.handles import DeviceArray
from ..graph.graph import KernelGraph
from .errors import GatewayTimeoutError, TooManyRequestsError
from .tenants import Principal

logger = logging.getLogger(__name__)
_SUBMIT_TAKES_TIMEOUT = "timeout" in inspect.signature(KaasClient.submit_kernel_graph).parameters


def _read_outcome(fut: Any) -> None:
    if not fut.cancelled():
        fut.exception()


class Dispatcher:
    def __init__(self, client: KaasClient, submit_threads: int = 4) -> None:
        self.client = client
        self.pool = concurrent.futures.ThreadPoolExecutor(
            submit_threads, thread_name_prefix="kaas-gateway-submit")
        #: ONNX imports (seconds for a large model) run here, one at a time, so
        #: they never hold the threads that submit requests
        self.import_pool = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="kaas-gateway-import")
        self.in_flight: dict[str, int] = {}

    # -- admission ---------------------------------------------------------
    def admit(self, tenant: Principal) -> None:
        n = self.in_flight.get(tenant.name, 0)
        if n >= tenant.max_in_flight:
            raise TooManyRequestsError(f"tenant {tenant.name!r} has {n} requests in flight, "
                                       f"its max_in_flight; retry later")
        self.in_flight[tenant.name] = n + 1

    def release(self, tenant: Principal) -> None:
        n = self.in_flight.get(tenant.name, 1) - 1
        if n <= 0:
            self.in_flight.pop(tenant.name, None)
        else:
            self.in_flight[tenant.name] = n

    # -- consts --------------------------------------------------------------
    def _consts(self) -> ConstRegistry:
        """The client's const registry (the plugins installed first: it asks
        the scheduler which workers run graphs).  Blocking: a pool thread."""
        state = _state(self.client)
        state.ensure()
        return state.consts

    async def send_const(self, value: np.ndarray, token: str) -> None:
        """Send an uploaded const ahead of its first request.  Not counted as
        in use: it stays on the cluster while the model holds ``value``."""
        await self.call(lambda: self._consts().future(token, value, fresh=False))

    def const_futures(self, consts: Mapping[str, tuple[np.ndarray, str]]) -> dict[str, Future]:
        """The cluster copy of each ``name: (value, token)``, sent where the
        cluster lacks it.  Blocking: a pool thread, just before the submission
        that holds them (see ``ConstRegistry.hold``)."""
        registry = self._consts()
        return {name: registry.future(token, value) for name, (value, token) in consts.items()}

    async def import_call(self, fn: Any, *args: Any) -> Any:
        """A blocking ONNX import (upload or a new input shape) off the HTTP
        loop and off the submission threads."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.import_pool, lambda: fn(*args))

    # -- running -----------------------------------------------------------
    async def call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """A blocking client call (weights, policy, caches) off the HTTP loop."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.pool, lambda: fn(*args, **kwargs))

    async def run(self, graph: KernelGraph, inputs: Mapping[str, Any], tenant: str,
                  weight: float, timeout_s: float,
                  consts: Mapping[str, tuple[np.ndarray, str]] | None = None
                  ) -> dict[str, np.ndarray]:
        """Run ``graph`` for ``tenant``; its outputs as host arrays.
        ``consts``: ``name: (value, content token)`` of the model's consts.

        Raises GatewayTimeoutError past ``timeout_s`` (counted from now, so
        the submission counts too) and the graph's own KaasError if it fails.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        # Where the client takes a time limit, the worker enforces it as well.
        limit = {"timeout": timeout_s} if _SUBMIT_TAKES_TIMEOUT else {}

        def submit() -> tuple[Future, concurrent.futures.Future]:
            values = {**inputs, **self.const_futures(consts or {})}
            fut = self.client.submit_kernel_graph(graph, values, tenant=tenant, weight=weight,
                                                  **limit)
            # start waiting on the client's loop now, not after a hop back to this one
            return fut, asyncio.run_coroutine_threadsafe(
                fut._result(), self.client.loop.asyncio_loop)

        # asyncio.wait, not wait_for: on Python < 3.12 wait_for can swallow a
        # cancellation that races with completion, and a caller that hung up
        # must never be waited for.
        submitted = loop.run_in_executor(self.pool, submit)
        try:
            await asyncio.wait({submitted}, timeout=timeout_s)
        except asyncio.CancelledError:
            submitted.add_done_callback(self._cancel_when_submitted)
            raise
        if not submitted.done():
            submitted.add_done_callback(self._cancel_when_submitted)
            raise self._timeout(graph, timeout_s)
        fut, gathered = submitted.result()
        waiting = asyncio.wrap_future(gathered)
        try:
            await asyncio.wait({waiting}, timeout=max(deadline - loop.time(), 0.0))
        except asyncio.CancelledError:
            self._abandon(fut, waiting)
            raise
        if not waiting.done():
            self._abandon(fut, waiting)
            raise self._timeout(graph, timeout_s)
        out = waiting.result()
        return {k: np.asarray(v.get() if isinstance(v, DeviceArray) else v)
                for k, v in out.items()}

    @staticmethod
    def _timeout(graph: KernelGraph, timeout_s: float) -> GatewayTimeoutError:
        return GatewayTimeoutError(f"request did not finish within {timeout_s:g} s",
                                   graph=graph.name)

    def cancel(self, fut: Future) -> None:
        """Cancel a request's Dask future without blocking this thread."""
        try:
            asyncio.run_coroutine_threadsafe(self.client.cancel([fut], asynchronous=True),
                                             self.client.loop.asyncio_loop)
        except RuntimeError:  # the client's loop is closed: nothing left to cancel
            pass

    def _abandon(self, fut: Future, waiting: asyncio.Future) -> None:
        """Nobody waits for this request any more: cancel its Dask future.

        The wait is left to end by itself (the cancellation makes it raise
        at once) rather than cancelled from outside, which would make
        distributed log an error from inside ``Client._gather``; its outcome
        is read here so that asyncio does not log it as never retrieved."""
        self.cancel(fut)
        waiting.add_done_callback(_read_outcome)

    def _cancel_when_submitted(self, submitted: asyncio.Future) -> None:
        if not submitted.cancelled() and submitted.exception() is None:
            fut, gathered = submitted.result()
            self.cancel(fut)
            gathered.add_done_callback(_read_outcome)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.import_pool.shutdown(wait=False, cancel_futures=True)
