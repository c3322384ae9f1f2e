"""The per-model dynamic batcher and the policy that decides when a batch starts.

Callers ``await submit(items)``; a single loop task collects pending items into batches of at most
``max_batch_size`` and runs each in the model's own worker thread so the event loop never blocks.
Each item carries its future; items whose future was cancelled (client gone, timeout) before their
batch starts are dropped from it. A failure of the batch function fails every future of that batch
and nothing else. While a batch runs, the next one fills on its own: whatever arrives meanwhile is
queued and goes in the next batch.

When the model is idle and images are queued, :class:`DispatchPolicy` decides whether to start now
or to hold the batch open. ``"fixed"`` is the classic rule: hold until the batch is full or the oldest
image has waited ``max_wait_s``. ``"adaptive"`` (the default) holds only on evidence that waiting
pays, and never past that same bound:

- *known arrivals*: the request path announces images it is reading or decoding with
  ``with batcher.expect(n): ...`` around that work. While such images are on their way, and are
  predicted (from the recent time from ``expect`` to submission) to land before the bound, the batch
  waits for them; each arrival or failed request re-decides at once. This wait carries no break-even
  test (below) on purpose: the model thread idles while those images decode, but the cores do not,
  and on a 2-core CPU applying the test here cost 10% of throughput at concurrency 32 (shapes
  ``/explain``, 152 against 168 images/s, medians of 12 interleaved rounds).
- *predicted arrivals*: otherwise, the next submission is predicted from the recent gaps between
  submissions, and the batch waits for it only if it is due soon enough to pay for itself. With a
  batch costing ``setup + per_item * n`` (fitted online from the batches run), holding ``q`` queued
  images for ``g`` seconds so that one more joins lowers the summed latency only when
  ``g < (setup - q * per_item) / (q + 1)``: on a CPU, where time grows with the batch, that is never;
  on a GPU, where a batch costs little more than one image, it is a millisecond or so.

So a lone request runs at once, whatever ``max_wait_s`` is; under load, batches fill while the
previous one runs and wait for images that are already decoding.

A request that finds the model idle (nothing queued, running or announced) can go further with
:meth:`Batcher.run_alone`: its whole model-side work, decoding included, runs in the model thread in one
hop, as a plain model server would run it, instead of a hop to the CPU pool to decode, a turn of the
batcher's loop and a hop to the model thread. Requests arriving meanwhile queue as usual, and their
batch starts as soon as the lone one ends.

How others decide, and why this is different (facts from their documentation and source):
Ray Serve's ``@serve.batch`` always waits ``batch_wait_timeout_s`` after the first request unless the
batch fills, so a lone request pays the whole timeout. Triton's dynamic batcher, when an instance
is free, either sends what is queued at once (the default, no delay: small batches under bursty
load) or, with ``max_queue_delay_microseconds``, holds any batch below its preferred size for that
delay, again paid in full by a lone request. BentoML's adaptive batcher fits batch latency as
``a * n + b`` like this one, but polls the queue on a 1 ms tick and decides to wait from the mean of
its own past waits, after a training phase that forces batches of 1, 2 and 3; it cannot know that a
request is still being decoded. This policy is event-driven (no polling tick), uses the one signal
a server has and a batcher alone does not (images already being read and decoded), and its
guess-based waits carry an explicit break-even test instead of a learned habit.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Generic, TypeVar

from service.errors import CamserveError, ModelError, NotReady, Overloaded, RequestTimeout, describe

T = TypeVar("T")
R = TypeVar("R")
X = TypeVar("X")

BatchFn = Callable[[list[T]], Sequence[R | BaseException]]
POLICIES = ("adaptive", "fixed")


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


class _CostFit:
    """Batch time as ``setup + per_item * n``, a least-squares fit that forgets old batches
    (each batch weighs ``decay`` times the next one's)."""

    def __init__(self, decay: float = 0.95) -> None:
        self.decay = decay
        self._w = self._n = self._t = self._nn = self._nt = 0.0

    def add(self, n: int, seconds: float) -> None:
        d = self.decay
        self._w = d * self._w + 1
        self._n = d * self._n + n
        self._t = d * self._t + seconds
        self._nn = d * self._nn + n * n
        self._nt = d * self._nt + n * seconds

    def params(self) -> tuple[float, float] | None:
        """``(setup_s, per_item_s)``, or None until batches of different sizes have been seen."""
        det = self._w * self._nn - self._n * self._n
        if self._w < 2 or det <= 1e-9 * self._w * self._w:  # one size only: the slope is unknown
            return None
        per_item = max(0.0, (self._w * self._nt - self._n * self._t) / det)
        setup = max(0.0, (self._t - per_item * self._n) / self._w)
        return setup, per_item


class DispatchPolicy:
    """When an idle model should start a batch. Pure bookkeeping: every method takes the time
    (``time.monotonic()`` seconds) from its caller, so tests can drive it with made-up clocks."""

    def __init__(self, max_batch_size: int, max_wait_s: float, kind: str = "adaptive") -> None:
        if kind not in POLICIES:
            raise ValueError(f"`batch_policy` must be one of {', '.join(POLICIES)}, got {kind!r}")
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.kind = kind
        self.cost = _CostFit()
        self._last_arrival: float | None = None
        self._gap_s = math.inf  # smoothed time between submissions
        self._prep_s = 0.0  # smoothed time from `expect` to its release
        # A long idle gap counts as this much, so a burst after a quiet spell is recognised quickly.
        self._gap_cap_s = max(2 * max_wait_s, 1e-3)

    def arrived(self, now: float) -> None:
        """A request submitted its images."""
        if self._last_arrival is not None:
            gap = min(now - self._last_arrival, self._gap_cap_s)
            self._gap_s = gap if math.isinf(self._gap_s) else 0.7 * self._gap_s + 0.3 * gap
        self._last_arrival = now

    def prepared(self, seconds: float) -> None:
        """An expectation was released after ``seconds`` (its images submitted, or its request failed)."""
        self._prep_s = 0.7 * self._prep_s + 0.3 * seconds

    def ran(self, size: int, seconds: float) -> None:
        self.cost.add(size, seconds)

    def hold_until(self, now: float, queued: int, oldest_enqueued: float,
                   oldest_expected: float | None) -> float | None:
        """With ``queued`` images waiting, the oldest since ``oldest_enqueued``, and (``oldest_expected``)
        the start of the oldest unreleased expectation: the time to wait until (a new arrival or a
        released expectation should re-ask sooner), or None to start the batch now."""
        deadline = oldest_enqueued + self.max_wait_s
        if queued >= self.max_batch_size or now >= deadline:
            return None
        if self.kind == "fixed":
            return deadline
        if oldest_expected is not None and oldest_expected + self._prep_s <= deadline:
            return deadline  # images are being decoded and should make it in time
        if self._last_arrival is None:
            return None
        due = self._last_arrival + self._gap_s
        if not now < due < deadline:  # overdue, or too late for this batch anyway
            return None
        fit = self.cost.params()
        if fit is None:
            return None
        setup, per_item = fit
        if due - now < (setup - queued * per_item) / (queued + 1):
            return due
        return None


class Expectation:
    """Images a request is about to submit (still being read or decoded). Leave the ``with`` block,
    or call :meth:`release` (idempotent), right before submitting them or when the request fails."""

    __slots__ = ("_batcher", "images", "started")

    def __init__(self, batcher: Batcher[Any, Any], images: int) -> None:
        self._batcher: Batcher[Any, Any] | None = batcher if images > 0 else None
        self.images = images
        self.started = time.monotonic()
        if self._batcher is not None:
            self._batcher._expecting[self] = None

    def release(self) -> None:
        batcher, self._batcher = self._batcher, None
        if batcher is not None:
            del batcher._expecting[self]
            batcher._policy.prepared(time.monotonic() - self.started)
            batcher._wakeup.set()  # a batch waiting for these images may now start

    def __enter__(self) -> Expectation:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.release()


class Batcher(Generic[T, R]):
    """``fn`` maps a list of items to one result (or exception) per item, in order."""

    def __init__(self, fn: BatchFn[T, R], *, max_batch_size: int = 32, max_wait_s: float = 0.005,
                 max_queue: int = 256, name: str = "model", policy: str = "adaptive",
                 on_batch: Callable[[BatchStats], None] | None = None,
                 executor: ThreadPoolExecutor | None = None) -> None:
        if max_batch_size < 1:
            raise ValueError(f"`max_batch_size` must be at least 1, got {max_batch_size}")
        self._fn = fn
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.name = name
        self._policy = DispatchPolicy(max_batch_size, max_wait_s, policy)
        self._on_batch = on_batch
        self._queue: deque[_Pending[T, R]] = deque()
        self._expecting: dict[Expectation, None] = {}  # insertion-ordered: the first is the oldest
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # One thread per model: the engine is serial anyway, and a dedicated thread keeps model
        # work from queueing behind decode/encode jobs in the shared pool. Given, it is the thread the
        # model was loaded and warmed in (service.threads); the batcher owns it from here and shuts it down.
        self._executor = executor or ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"camserve-{name}")
        self._compute_ema_s = 0.05
        self._running: list[_Pending[T, R]] = []
        # A lone request's work running in the model thread (``run_alone``) until it ends there.
        self._alone: Future[Any] | None = None
        self._batches_run = 0

    @property
    def policy(self) -> str:
        return self._policy.kind

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
        while self._task is not None and (self._queue or self._running or self._alone is not None):
            self._wakeup.set()
            await asyncio.sleep(0.005)

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def idle(self) -> bool:
        """Nothing queued, running (in a batch or alone) or announced: a request now would be alone."""
        return not (self._queue or self._running or self._expecting or self._alone is not None)

    @property
    def expected_images(self) -> int:
        """Images announced with :meth:`expect` and not yet released."""
        return sum(e.images for e in self._expecting)

    # -- callers ---------------------------------------------------------------------------------
    def expect(self, images: int) -> Expectation:
        """Announce ``images`` that a request is reading or decoding and will submit soon, so that a
        batch about to start may wait for them (``adaptive`` policy). Use as a context manager around
        that work and submit after leaving it: an expectation held across ``submit`` would make the
        batch wait for images that are already in it."""
        return Expectation(self, images)

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
        now = time.monotonic()
        pending = [_Pending[T, R](item, loop.create_future(), now) for item in items]
        self._queue.extend(pending)
        self._policy.arrived(now)
        self._wakeup.set()
        futures = [p.future for p in pending]
        try:
            return list(await asyncio.wait_for(asyncio.gather(*futures), timeout_s))
        except TimeoutError:
            raise RequestTimeout(f"request took longer than the {timeout_s:g} s timeout") from None
        finally:
            for f in futures:  # timed out or cancelled: let the loop drop what has not started
                f.cancel()

    async def run_alone(self, fn: Callable[[], X], images: int = 1) -> X | None:
        """``fn()`` in the model thread at once if the model is :attr:`idle` (and serving), else None with
        nothing run: the caller then takes the batched path. ``fn`` is a lone request's whole model-side work
        for ``images`` images (at most ``max_batch_size``); its errors are reported as a batch's are.

        Whatever is submitted while ``fn`` runs waits in the queue, so it still forms one batch."""
        if self._task is None or not self.idle or not 0 < images <= self.max_batch_size:
            return None
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        self._policy.arrived(started)
        work = self._executor.submit(fn)
        self._alone = work
        # Cleared when the thread is done, not when the caller stops waiting (a timeout): until then a batch
        # would only queue behind it in the model thread, and lose what arrives meanwhile.
        work.add_done_callback(lambda _: loop.call_soon_threadsafe(self._alone_done, work, started, images))
        try:
            return await asyncio.wrap_future(work)
        except CamserveError:
            raise
        except Exception as exc:
            # Worded as a batch's failure: to a client, a lone request is a batch of its own images.
            raise ModelError(f"model {self.name!r} failed on a batch of {images}: {describe(exc)}") from exc

    def _alone_done(self, work: Future[Any], started: float, images: int) -> None:
        if self._alone is work:
            self._alone = None
        if work.cancelled() or work.exception() is not None:
            return  # an upload that failed to decode, or a failure: not an execution of the model
        elapsed = time.monotonic() - started
        self._compute_ema_s = 0.8 * self._compute_ema_s + 0.2 * elapsed
        self._batches_run += 1
        # (Not fitted into the policy's batch cost: the time includes decoding.)
        if self._on_batch is not None:
            self._on_batch(BatchStats(images, 0.0, elapsed))
        self._wakeup.set()  # a batch that filled meanwhile may start

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
            self._drop_cancelled()
            # Clearing before deciding is race-free: submit() and release() run on this same loop.
            self._wakeup.clear()
            if not self._queue or self._alone is not None:  # (the queue fills while a lone request runs)
                await self._wakeup.wait()
                continue
            now = time.monotonic()
            oldest_expected = next(iter(self._expecting)).started if self._expecting else None
            until = self._policy.hold_until(now, len(self._queue), self._queue[0].enqueued, oldest_expected)
            if until is not None:
                timer = loop.call_later(until - now, self._wakeup.set)
                try:
                    await self._wakeup.wait()
                finally:
                    timer.cancel()
                continue
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
        failed = True
        try:
            results = await loop.run_in_executor(self._executor, self._fn, [p.item for p in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"batch function returned {len(results)} results for {len(batch)} items")
            failed = False
        except CamserveError as exc:
            results = [exc] * len(batch)
        except Exception as exc:
            err = ModelError(f"model {self.name!r} failed on a batch of {len(batch)}: {describe(exc)}")
            err.__cause__ = exc
            results = [err] * len(batch)
        # (Cancelled by stop(): `_running` stays set, so stop() can answer this batch's callers.)
        self._running = []
        elapsed = time.monotonic() - started
        self._compute_ema_s = 0.8 * self._compute_ema_s + 0.2 * elapsed
        self._batches_run += 1
        # The first batch pays one-off costs (allocator, kernel selection); a batch that failed early
        # says nothing about what a batch costs.
        if not failed and self._batches_run > 1:
            self._policy.ran(len(batch), elapsed)
        if self._on_batch is not None:
            self._on_batch(BatchStats(len(batch), started - batch[0].enqueued, elapsed))
        for p, r in zip(batch, results, strict=True):
            if p.future.done():
                continue
            if isinstance(r, BaseException):
                p.future.set_exception(r)
            else:
                p.future.set_result(r)
