"""Dynamic batching of one tenant's model, as Triton's ``dynamic_batching``.

Requests of one tenant and one model wait in one queue on the gateway's
event loop.  A batch leaves when it holds ``max_batch_size`` rows, when it
reaches the largest preferred size, or when its oldest request has waited
``max_queue_delay``, whichever comes first, and only while fewer than
``instances`` batched runs of the model are in flight (as a Triton model
instance takes a batch when it is free; while every slot is busy the queue
fills, and the next batch leaves the moment a slot frees, without waiting
out any delay).  The requests' inputs are stacked along the first dimension
into one graph run, and the outputs split back by rows: each caller gets
exactly its own rows.

Errors: if a batched run fails with a request-level error (a KaasError,
such as an index out of range in one request's data), each of its requests
is run again alone, so an error fails only the request that causes it.
A timeout or a cluster failure fails the requests of that batch only.

Fair share: a batch holds one tenant's requests only and is submitted under
that tenant, so the scheduler charges each tenant for its own rows.  See
docs/batching.md for why this lives in the gateway.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

import numpy as np

from ..graph.errors import KaasError
from .errors import GatewayError
from .onnx_models import BatchingConfig

logger = logging.getLogger(__name__)

#: Runs a model on stacked inputs and returns its outputs by name.
Runner = Callable[[dict[str, np.ndarray]], Awaitable[Mapping[str, np.ndarray]]]


@dataclass
class _Waiting:
    inputs: dict[str, np.ndarray]
    rows: int
    future: asyncio.Future
    arrival: float
    #: what must agree to stack: every input's dtype and non-batch dimensions
    kind: tuple


def _kind(inputs: Mapping[str, np.ndarray]) -> tuple:
    return tuple((n, a.dtype.str, a.shape[1:]) for n, a in sorted(inputs.items()))


class Batcher:
    """The queue and batch former of one (tenant, model)."""

    def __init__(self, config: BatchingConfig, run: Runner,
                 batch_rows: Counter | None = None,
                 batch_requests: Counter | None = None) -> None:
        self.config = config
        self._run = run
        self._queue: deque[_Waiting] = deque()
        self._wake = asyncio.Event()
        self._former: asyncio.Task | None = None
        self.running = 0
        #: rows per run -> runs; requests per run -> runs (reported by the model)
        self.batch_rows = batch_rows if batch_rows is not None else Counter()
        self.batch_requests = batch_requests if batch_requests is not None else Counter()
        self._tasks: set[asyncio.Task] = set()

    @property
    def target(self) -> int:
        """Rows at which a batch leaves without waiting for the delay."""
        top = self.config.preferred[-1] if self.config.preferred else self.config.max_batch_size
        return min(top, self.config.max_batch_size)

    async def submit(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Queue one request (its first dimension is its rows); its outputs."""
        loop = asyncio.get_running_loop()
        rows = int(next(iter(inputs.values())).shape[0])
        item = _Waiting(inputs, rows, loop.create_future(), loop.time(), _kind(inputs))
        self._queue.append(item)
        self._wake.set()
        if self._former is None or self._former.done():
            self._former = asyncio.ensure_future(self._form())
        try:
            return await item.future
        except asyncio.CancelledError:
            try:
                self._queue.remove(item)  # not taken yet: it never runs
            except ValueError:
                pass
            raise

    def _pending_rows(self) -> int:
        return sum(w.rows for w in self._queue)

    async def _form(self) -> None:
        """Form batches while requests wait (one former task per queue)."""
        loop = asyncio.get_running_loop()
        while self._queue:
            if self.running >= self.config.instances:
                self._wake.clear()
                await self._wake.wait()  # a run ended (or a request came)
                continue
            deadline = self._queue[0].arrival + self.config.max_queue_delay_s
            while self._queue and self._pending_rows() < self.target:
                left = deadline - loop.time()
                if left <= 0:
                    break
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), left)
                except asyncio.TimeoutError:
                    break
            batch = self._take()
            if not batch:
                continue
            self.running += 1
            task = asyncio.ensure_future(self._execute(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _take(self) -> list[_Waiting]:
        """The next batch: the oldest request and, in arrival order, the
        others of the same kind (non-batch shapes: a model with another
        symbolic dimension is only stacked at equal sizes) that fit."""
        while self._queue and self._queue[0].future.done():  # callers gone
            self._queue.popleft()
        if not self._queue:
            return []
        first = self._queue.popleft()
        batch, rows, keep = [first], first.rows, deque()
        while self._queue:
            item = self._queue.popleft()
            if item.future.done():
                continue
            if item.kind == first.kind and rows + item.rows <= self.config.max_batch_size:
                batch.append(item)
                rows += item.rows
            else:
                keep.append(item)
        self._queue = keep
        return batch

    async def _execute(self, batch: list[_Waiting]) -> None:
        try:
            rows = sum(w.rows for w in batch)
            self.batch_rows[rows] += 1
            self.batch_requests[len(batch)] += 1
            if len(batch) == 1:
                await self._alone(batch[0])
                return
            names = list(batch[0].inputs)
            try:
                stacked = {n: np.concatenate([w.inputs[n] for w in batch], axis=0)
                           for n in names}
                out = await self._run(stacked)
                parts = self._split(out, batch, rows)
            except GatewayError as e:  # timeout: this batch's requests only
                self._fail(batch, e)
                return
            except KaasError as e:  # one request's data, maybe: each alone
                logger.info("batched run of %d requests failed (%s); running each alone",
                            len(batch), e)
                await asyncio.gather(*(self._alone(w) for w in batch))
                return
            except Exception as e:  # noqa: BLE001 - the cluster failed: these requests
                self._fail(batch, e)
                return
            for w, part in zip(batch, parts):
                if not w.future.done():
                    w.future.set_result(part)
        except BaseException as e:  # noqa: BLE001 - never leave a caller waiting
            self._fail(batch, e if isinstance(e, Exception) else
                       GatewayError("the batched run was cancelled"))
            if not isinstance(e, Exception):
                raise
        finally:
            self.running -= 1
            self._wake.set()
            if self._queue and (self._former is None or self._former.done()):
                self._former = asyncio.ensure_future(self._form())

    @staticmethod
    def _split(out: Mapping[str, np.ndarray], batch: list[_Waiting],
               rows: int) -> list[dict[str, np.ndarray]]:
        for name, arr in out.items():
            if arr.ndim == 0 or arr.shape[0] != rows:
                raise KaasError(f"output {name!r} has shape {arr.shape}, not {rows} rows: "
                                "the model's first dimension is not a batch")
        parts = []
        start = 0
        for w in batch:
            parts.append({n: np.ascontiguousarray(a[start:start + w.rows])
                          for n, a in out.items()})
            start += w.rows
        return parts

    async def _alone(self, w: _Waiting) -> None:
        if w.future.done():
            return
        try:
            out = await self._run(w.inputs)
        except Exception as e:  # noqa: BLE001 - handed to its caller
            if not w.future.done():
                w.future.set_exception(e)
            return
        if not w.future.done():
            w.future.set_result(dict(out))

    @staticmethod
    def _fail(batch: list[_Waiting], e: BaseException) -> None:
        for w in batch:
            if not w.future.done():
                w.future.set_exception(e)

    def close(self) -> None:
        if self._former is not None:
            self._former.cancel()
        for w in self._queue:
            if not w.future.done():
                w.future.cancel()
        self._queue.clear()
