"""The batcher, driven by a fake batch function gated with events (no sleeps decide outcomes), and its
dispatch policy, driven by made-up clocks."""

from __future__ import annotations

import asyncio
import threading

import pytest

from service.batching import Batcher, BatchStats, DispatchPolicy, _CostFit
from service.config import ConfigError, load_settings
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


async def _settle(rounds: int = 50) -> None:
    """Let every ready task (the batcher's loop included) run until it blocks."""
    for _ in range(rounds):
        await asyncio.sleep(0)


@pytest.mark.parametrize("policy", ["adaptive", "fixed"])
def test_concurrent_requests_share_a_batch_and_get_their_own_results(policy):
    fn = Gate()
    # Fixed: a short wait, so the first batch starts alone; adaptive: a lone request never waits.
    b = Batcher(fn, max_batch_size=8, max_wait_s=60 if policy == "adaptive" else 0.001, policy=policy)

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
        with pytest.raises(ModelError, match=r"failed on a batch of 1: ValueError: boom$"):
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


# -- the adaptive policy, end to end ------------------------------------------------------------------
def test_a_lone_request_runs_at_once_whatever_the_wait():
    fn = Gate()
    b = Batcher(fn, max_batch_size=8, max_wait_s=60)  # the fixed policy would hold it for a minute

    async def body():
        return [await asyncio.wait_for(b.submit([i]), 5) for i in range(3)]

    assert run(_with(b, body)) == [["r0"], ["r1"], ["r2"]]
    assert fn.batches == [[0], [1], [2]]


def test_a_request_to_an_idle_model_runs_alone_in_the_model_thread_at_once():
    """No trip through the batch loop: ``fn`` runs in the model's own thread, once, and its result comes back."""
    fn = Gate()
    b = Batcher(fn, max_batch_size=8, max_wait_s=60, policy="fixed", name="m")  # fixed: a batch would wait 60 s
    stats: list[BatchStats] = []
    b._on_batch = stats.append

    async def body():
        got = await asyncio.wait_for(b.run_alone(lambda: threading.current_thread().name), 5)
        await _settle()
        return got, b.idle

    name, idle = run(_with(b, body))
    assert name.startswith("camserve-m") and idle
    assert fn.batches == [] and [s.size for s in stats] == [1]


def test_requests_arriving_while_one_runs_alone_queue_and_share_the_next_batch():
    fn = Gate()
    b = Batcher(fn, max_batch_size=8)
    entered, release = threading.Event(), threading.Event()

    def lone():
        entered.set()
        release.wait(10)
        return "lone"

    async def body():
        first = asyncio.create_task(b.run_alone(lone))
        await asyncio.to_thread(entered.wait, 10)
        busy = await b.run_alone(lambda: "second")  # not idle: refused, nothing run
        queued = [asyncio.create_task(b.submit([i])) for i in range(3)]
        await _settle()
        depth = b.queue_depth
        release.set()
        return busy, depth, await first, [await q for q in queued]

    busy, depth, first, rest = run(_with(b, body))
    assert busy is None and depth == 3  # held while the lone request ran
    assert first == "lone" and rest == [["r0"], ["r1"], ["r2"]]
    assert fn.batches == [[0, 1, 2]]


def test_run_alone_refuses_when_busy_or_stopped_and_reports_errors_as_a_batch_does():
    fn = Gate()
    fn.release.clear()
    b = Batcher(fn, max_batch_size=2)

    def boom():
        raise ValueError("bad")

    async def body():
        assert await b.run_alone(lambda: 1) is None  # not started
        b.start()
        with pytest.raises(ModelError, match="bad"):
            await b.run_alone(boom)
        assert await b.run_alone(lambda: 1, images=3) is None  # more than a batch
        with b.expect(1):  # another request's image is being decoded
            expecting = await b.run_alone(lambda: 1)
        task = asyncio.create_task(b.submit([1]))
        await asyncio.to_thread(fn.entered.wait, 5)
        running = await b.run_alone(lambda: 1)
        fn.release.set()
        await task
        await b.stop()
        return running, expecting, await b.run_alone(lambda: 1)

    assert run(body()) == (None, None, None)


def test_fixed_policy_holds_a_batch_until_it_is_full():
    fn = Gate()
    b = Batcher(fn, max_batch_size=2, max_wait_s=60, policy="fixed")

    async def body():
        first = asyncio.create_task(b.submit([1]))
        await _settle()
        held = b.queue_depth  # still queued: nothing has started
        second = await asyncio.wait_for(b.submit([2]), 5)
        return held, await first, second

    held, first, second = run(_with(b, body))
    assert held == 1 and first == ["r1"] and second == ["r2"]
    assert fn.batches == [[1, 2]]


def test_a_batch_waits_for_images_that_are_being_decoded():
    fn = Gate()
    b = Batcher(fn, max_batch_size=8, max_wait_s=60)
    decoded = asyncio.Event()

    async def decoding_request():
        with b.expect(2):
            await decoded.wait()
        return await b.submit([2, 3])

    async def body():
        slow = asyncio.create_task(decoding_request())
        await _settle()
        assert b.expected_images == 2
        first = asyncio.create_task(b.submit([1]))
        await _settle()
        held = b.queue_depth
        decoded.set()
        return held, await asyncio.wait_for(first, 5), await asyncio.wait_for(slow, 5)

    held, first, slow = run(_with(b, body))
    assert held == 1 and first == ["r1"] and slow == ["r2", "r3"]
    assert fn.batches == [[1, 2, 3]]
    assert b.expected_images == 0


def test_a_request_that_fails_while_decoding_stops_the_wait():
    fn = Gate()
    b = Batcher(fn, max_batch_size=8, max_wait_s=60)
    fail = asyncio.Event()

    async def failing_request():
        with b.expect(1):
            await fail.wait()
            raise ValueError("not an image")

    async def body():
        bad = asyncio.create_task(failing_request())
        await _settle()
        first = asyncio.create_task(b.submit([1]))
        await _settle()
        held = b.queue_depth
        fail.set()
        with pytest.raises(ValueError, match="not an image"):
            await bad
        return held, await asyncio.wait_for(first, 5)

    held, first = run(_with(b, body))
    assert held == 1 and first == ["r1"] and fn.batches == [[1]]


def test_a_batch_waits_for_announced_images_no_longer_than_max_wait():
    fn = Gate()
    stats: list[BatchStats] = []
    b = Batcher(fn, max_batch_size=8, max_wait_s=0.05, on_batch=stats.append)

    async def body():
        with b.expect(1):  # never submitted while the batch waits
            return await asyncio.wait_for(b.submit([1]), 5)

    assert run(_with(b, body)) == ["r1"]
    assert stats[0].queued_s >= 0.045  # it did hold the batch open, and then gave up


def test_expectation_release_is_idempotent_and_empty_ones_cost_nothing():
    b = Batcher(Gate(), max_batch_size=8)
    e = b.expect(3)
    assert b.expected_images == 3
    e.release()
    e.release()
    with b.expect(0):
        assert b.expected_images == 0


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="batch_policy"):
        Batcher(Gate(), policy="greedy")


def test_policy_setting_from_the_environment():
    assert load_settings(env={}).batch_policy == "adaptive"
    assert load_settings(env={"SERVICE_BATCH_POLICY": "fixed"}).batch_policy == "fixed"
    with pytest.raises(ConfigError, match="batch_policy"):
        load_settings(env={"SERVICE_BATCH_POLICY": "eager"})


# -- the policy alone, with made-up clocks ----------------------------------------------------------
def _gpu_like(p: DispatchPolicy) -> None:
    """Batches that cost 10 ms plus 0.1 ms an image: one more image is almost free."""
    for n in (1, 4, 2, 8, 3, 16):
        p.ran(n, 0.010 + 0.0001 * n)


def _cpu_like(p: DispatchPolicy) -> None:
    """Batches that cost 0.2 ms plus 2 ms an image: batching saves almost nothing."""
    for n in (1, 4, 2, 8, 3, 16):
        p.ran(n, 0.0002 + 0.002 * n)


def test_cost_fit_recovers_setup_and_per_item_time():
    fit = _CostFit()
    assert fit.params() is None
    for _ in range(5):
        fit.add(4, 0.01)
    assert fit.params() is None  # one size only: no slope
    for n in (1, 2, 8):
        fit.add(n, 0.003 + 0.001 * n)
    fit2 = _CostFit()
    for n in (1, 2, 3, 5, 8):
        fit2.add(n, 0.003 + 0.001 * n)
    setup, per_item = fit2.params()
    assert setup == pytest.approx(0.003) and per_item == pytest.approx(0.001)


def test_fixed_policy_always_waits_for_the_deadline():
    p = DispatchPolicy(8, 0.005, "fixed")
    assert p.hold_until(10.0, 1, 10.0, None) == pytest.approx(10.005)
    assert p.hold_until(10.006, 1, 10.0, None) is None  # past the deadline
    assert p.hold_until(10.0, 8, 10.0, None) is None  # full


def test_adaptive_policy_starts_at_once_without_evidence():
    p = DispatchPolicy(8, 0.005)
    _gpu_like(p)
    p.arrived(10.0)  # a first request: no rate yet
    assert p.hold_until(10.0, 1, 10.0, None) is None


def test_adaptive_policy_waits_for_announced_images_that_will_make_it():
    p = DispatchPolicy(8, 0.005)
    p.arrived(10.0)
    assert p.hold_until(10.0001, 1, 10.0, oldest_expected=9.999) == pytest.approx(10.005)
    assert p.hold_until(10.0001, 8, 10.0, oldest_expected=9.999) is None  # the batch is full anyway
    for _ in range(20):
        p.prepared(0.050)  # decoding has been taking 50 ms: these would not make the 5 ms bound
    assert p.hold_until(10.0001, 1, 10.0, oldest_expected=9.999) is None


def test_adaptive_policy_waits_for_a_predicted_arrival_only_where_batching_pays():
    gpu, cpu = DispatchPolicy(32, 0.005), DispatchPolicy(32, 0.005)
    _gpu_like(gpu)
    _cpu_like(cpu)
    for p in (gpu, cpu):
        for i in range(20):  # a request every 0.5 ms
            p.arrived(10.0 + i * 0.0005)
    last = 10.0 + 19 * 0.0005
    # GPU: holding one image 0.5 ms saves most of a 10 ms setup; wait until the next one is due.
    assert gpu.hold_until(last + 0.0001, 1, last, None) == pytest.approx(last + 0.0005)
    # CPU: every image costs 2 ms more in a batch than the setup it saves: start now.
    assert cpu.hold_until(last + 0.0001, 1, last, None) is None
    # Overdue: the predicted request did not come; do not keep guessing.
    assert gpu.hold_until(last + 0.0006, 1, last, None) is None
    # With many images already held, one more is not worth delaying all of them.
    many_gpu = DispatchPolicy(256, 0.005)
    for n in (1, 100, 200):
        many_gpu.ran(n, 0.010 + 0.0001 * n)
    for i in range(20):
        many_gpu.arrived(10.0 + i * 0.0005)
    assert many_gpu.hold_until(last + 0.0001, 100, last, None) is None


def test_adaptive_policy_forgets_a_burst_after_a_quiet_spell():
    p = DispatchPolicy(32, 0.005)
    _gpu_like(p)
    for i in range(20):
        p.arrived(10.0 + i * 0.0005)
    p.arrived(20.0)  # ten seconds later
    p.arrived(25.0)
    assert p.hold_until(25.0001, 1, 25.0, None) is None
