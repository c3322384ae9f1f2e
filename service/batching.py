"""The per-model dynamic batcher.

Callers ``await submit(items)``; a single loop task waits for the first pending item, then fills a
batch until ``max_batch_size`` items or ``max_wait_s`` after that first item, and runs it in the
model's own worker thread so the event loop never blocks. Each item carries its future; items whose
future was cancelled (client gone, timeout) before their batch starts are dropped from it. A failure
of the batch function fails every future of that batch and nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from service.errors import CamserveError, ModelError, NotReady, Overloaded, RequestTimeout

T = TypeVar("T")
R = TypeVar("R")

BatchFn = Callable[[list[T]], Sequence[R | BaseException]]


@dataclass
class _Pending(Generic[T, R]):
    item: T
    future: asyncio.Future[R]
    enqueued: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class BatchStats:
    size: int
    queued_s: float
    compute_s: float


class Batcher(Generic[T, R]):
    """``fn`` maps a list of items to one result (or exception) per item, in order."""

    def __init__(self, fn: BatchFn[T, R], *, max_batch_size: int = 32, max_wait_s: float = 0.005,
                 max_queue: int = 256, name: str = "model",
                 on_batch: Callable[[BatchStats], None] | None = None) -> None:
        if max_batch_size < 1:
            raise ValueError(f"`max_batch_size` must be at least 1, got {max_batch_size}")
        self._fn = fn
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.name = name
        self._on_batch = on_batch
        self._queue: deque[_Pending[T, R]] = deque()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # One thread per model: the engine is serial anyway, and a dedicated thread keeps model
        # work from queueing behind decode/encode jobs in the shared pool.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"camserve-{name}")
        self._compute_ema_s = 0.05
        self._running: list[_Pending[T, R]] = []

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name=f"batcher-{self.name}")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        # Queued requests, and those of a batch cut short, are answered rather than left hanging.
        for p in [*self._queue, *self._running]:
            if not p.future.done():
                p.future.set_exception(NotReady("the server is shutting down"))
        self._queue.clear()
        self._running = []
        # Let a batch cut short finish in its thread without blocking the event loop meanwhile.
        await asyncio.to_thread(self._executor.shutdown, True)

    async def drain(self) -> None:
        """Wait until every queued image has been computed (callers stop submitting first)."""
        while self._task is not None and (self._queue or self._running):
            self._wakeup.set()
            await asyncio.sleep(0.005)

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    # -- callers ---------------------------------------------------------------------------------
    async def submit(self, items: Sequence[T], timeout_s: float | None = None) -> list[R]:
        """Queue ``items`` and wait for their results, in order.

        Raises :class:`Overloaded` at once when the queue cannot take them all, and
        :class:`RequestTimeout` after ``timeout_s``.
        """
        if self._task is None:
            raise NotReady(f"model {self.name!r} is not serving (starting or shutting down)")
        if len(self._queue) + len(items) > self.max_queue:
            raise Overloaded(f"model {self.name!r} queue is full ({len(self._queue)} of {self.max_queue} images "
                             f"waiting)", retry_after=self._retry_after())
        loop = asyncio.get_running_loop()
        pending = [_Pending[T, R](item, loop.create_future()) for item in items]
        self._queue.extend(pending)
        self._wakeup.set()
        futures = [p.future for p in pending]
        try:
            return list(await asyncio.wait_for(asyncio.gather(*futures), timeout_s))
        except TimeoutError:
            raise RequestTimeout(f"request took longer than the {timeout_s:g} s timeout") from None
        finally:
            for f in futures:  # timed out or cancelled: let the loop drop what has not started
                f.cancel()

    def _retry_after(self) -> float:
        batches_ahead = len(self._queue) / self.max_batch_size + 1
        return max(1.0, round(batches_ahead * self._compute_ema_s))

    # -- the loop --------------------------------------------------------------------------------
    def _drop_cancelled(self) -> None:
        while self._queue and self._queue[0].future.done():
            self._queue.popleft()

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while True:
                self._drop_cancelled()
                if not self._queue:
                    break
                deadline = self._queue[0].enqueued + self.max_wait_s
                while len(self._queue) < self.max_batch_size and (remaining := deadline - time.monotonic()) > 0:
                    self._wakeup.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wakeup.wait(), remaining)
                batch: list[_Pending[T, R]] = []
                while self._queue and len(batch) < self.max_batch_size:
                    p = self._queue.popleft()
                    if not p.future.done():
                        batch.append(p)
                if batch:
                    await self._run(loop, batch)

    async def _run(self, loop: asyncio.AbstractEventLoop, batch: list[_Pending[T, R]]) -> None:
        started = time.monotonic()
        self._running = batch
        try:
            results = await loop.run_in_executor(self._executor, self._fn, [p.item for p in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"batch function returned {len(results)} results for {len(batch)} items")
        except CamserveError as exc:
            results = [exc] * len(batch)
        except Exception as exc:
            err = ModelError(f"model {self.name!r} failed on a batch of {len(batch)}: {type(exc).__name__}")
            err.__cause__ = exc
            results = [err] * len(batch)
        # (Cancelled by stop(): `_running` stays set, so stop() can answer this batch's callers.)
        self._running = []
        elapsed = time.monotonic() - started
        self._compute_ema_s = 0.8 * self._compute_ema_s + 0.2 * elapsed
        if self._on_batch is not None:
            self._on_batch(BatchStats(len(batch), started - batch[0].enqueued, elapsed))
        for p, r in zip(batch, results, strict=True):
            if p.future.done():
                continue
            if isinstance(r, BaseException):
                p.future.set_exception(r)
            else:
                p.future.set_result(r)
