"""The batcher, driven by a fake batch function gated with events (no sleeps decide outcomes)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from service.batching import Batcher
from service.errors import ModelError, NotReady, Overloaded, RequestTimeout


class Gate:
    """A batch function that records its batches and, when armed, blocks until released."""

    def __init__(self, fail_on: object = None) -> None:
        self.batches: list[list[object]] = []
        self.release = threading.Event()
        self.entered = threading.Event()
        self.release.set()
        self.fail_on = fail_on

    def __call__(self, items: list[object]) -> list[object]:
        self.batches.append(list(items))
        self.entered.set()
        self.release.wait(10)
        if self.fail_on in items:
            raise ValueError("boom")
        return [f"r{i}" for i in items]


def run(coro):
    return asyncio.run(coro)


async def _with(batcher: Batcher, body):
    batcher.start()
    try:
        return await body()
    finally:
        await batcher.stop()


def test_concurrent_requests_share_a_batch_and_get_their_own_results():
    fn = Gate()
    b = Batcher(fn, max_batch_size=8, max_wait_s=0.5)

    async def body():
        fn.release.clear()
        first = asyncio.create_task(b.submit([0]))
        await asyncio.to_thread(fn.entered.wait, 5)  # batch [0] is running; the rest queue behind it
        rest = [asyncio.create_task(b.submit([i, i + 100])) for i in range(1, 4)]
        await asyncio.sleep(0)
        fn.release.set()
        return await first, await asyncio.gather(*rest)

    first, rest = run(_with(b, body))
    assert first == ["r0"]
    assert rest == [[f"r{i}", f"r{i + 100}"] for i in range(1, 4)]
    assert fn.batches[0] == [0] and sorted(fn.batches[1]) == sorted([1, 101, 2, 102, 3, 103])


def test_a_request_larger_than_the_batch_is_split():
    fn = Gate()
    b = Batcher(fn, max_batch_size=4, max_wait_s=0.001)
    out = run(_with(b, lambda: b.submit(list(range(10)))))
    assert out == [f"r{i}" for i in range(10)]
    assert [len(x) for x in fn.batches] == [4, 4, 2]


def test_full_queue_is_refused_at_once_with_retry_after():
    fn = Gate()
    b = Batcher(fn, max_batch_size=2, max_wait_s=0.001, max_queue=3)

    async def body():
        fn.release.clear()
        running = asyncio.create_task(b.submit([0]))
        await asyncio.to_thread(fn.entered.wait, 5)
        queued = asyncio.create_task(b.submit([1, 2, 3]))
        await asyncio.sleep(0.01)
        with pytest.raises(Overloaded) as err:
            await b.submit([4])
        fn.release.set()
        await running
        return err.value, await queued

    err, queued = run(_with(b, body))
    assert err.retry_after >= 1 and queued == ["r1", "r2", "r3"]


def test_failure_fails_only_that_batch():
    fn = Gate(fail_on=1)
    b = Batcher(fn, max_batch_size=1, max_wait_s=0.001)

    async def body():
        with pytest.raises(ModelError, match="ValueError"):
            await b.submit([1])
        return await b.submit([2])

    assert run(_with(b, body)) == ["r2"]


def test_timeout_and_cancelled_requests_are_dropped_before_they_run():
    fn = Gate()
    b = Batcher(fn, max_batch_size=1, max_wait_s=0.001)

    async def body():
        fn.release.clear()
        blocker = asyncio.create_task(b.submit(["blocker"]))
        await asyncio.to_thread(fn.entered.wait, 5)
        with pytest.raises(RequestTimeout):
            await b.submit(["late"], timeout_s=0.05)
        gone = asyncio.create_task(b.submit(["gone"]))
        await asyncio.sleep(0.01)
        gone.cancel()  # a client that disconnected
        fn.release.set()
        await blocker
        return await b.submit(["next"])

    assert run(_with(b, body)) == ["rnext"]
    assert fn.batches == [["blocker"], ["next"]]


def test_results_must_match_inputs_one_to_one():
    b = Batcher(lambda items: ["only one"], max_batch_size=4, max_wait_s=0.05)

    async def body():
        with pytest.raises(ModelError):
            await b.submit([1, 2])

    run(_with(b, body))


def test_stop_answers_queued_and_running_requests():
    fn = Gate()
    b = Batcher(fn, max_batch_size=1, max_wait_s=0.001)

    async def body():
        b.start()
        fn.release.clear()
        running = asyncio.create_task(b.submit(["running"]))
        await asyncio.to_thread(fn.entered.wait, 5)
        queued = asyncio.create_task(b.submit(["queued"]))
        await asyncio.sleep(0.01)
        stopping = asyncio.create_task(b.stop())
        await asyncio.sleep(0.01)
        fn.release.set()
        await stopping
        results = await asyncio.gather(running, queued, return_exceptions=True)
        with pytest.raises(NotReady):
            await b.submit(["late"])
        return results

    results = run(body())
    assert all(isinstance(r, NotReady) for r in results), results
