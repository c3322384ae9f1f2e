"""Pipeline: the GPU-oriented paths (OOM splitting, autocast precision) exercised on CPU, and running
with or without a batcher."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from service import pipeline as pipeline_module
from service.batching import Batcher
from service.cam import CamQuery
from service.errors import InvalidArgument, InvalidImage, OutOfMemory, PayloadTooLarge
from service.imaging import encode_png
from service.labels import class_index
from service.pipeline import Job, Pipeline
from service.registry import ModelSpec, serve_module
from service.rendering import HeatmapSpec
from tests.api.models import TINY_PRE, Tiny, tiny_model

IMAGES = [encode_png(np.random.default_rng(i).integers(0, 255, (32, 32, 3), dtype=np.uint8)) for i in range(6)]


class OomAbove(Tiny):
    """Raises CUDA's out-of-memory error for batches larger than ``limit``."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.sizes: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.sizes.append(len(x))
        if len(x) > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return super().forward(x)


def _pipeline(module: torch.nn.Module, **spec: str) -> Pipeline:
    return Pipeline(serve_module(module, ModelSpec(name="m", source="python:x:y", **spec), None, TINY_PRE))


def test_out_of_memory_splits_the_batch_and_retries():
    rt = _pipeline(OomAbove(limit=2))
    jobs = [Job(rt.prepare(img, 10**6).pixels, CamQuery()) for img in IMAGES[:5]]
    rt.model.module.sizes.clear()
    results = rt.compute(jobs)
    assert all(not isinstance(r, BaseException) for r in results)
    assert rt.model.module.sizes == [5, 2, 3, 1, 2]  # 5 fails -> 2 runs, 3 fails -> 1 + 2 run
    single = rt.compute(jobs[:1])
    for a, b in zip([results[0]], single, strict=True):
        torch.testing.assert_close(a.cam.maps, b.cam.maps)


def test_one_image_that_does_not_fit_fails_alone_with_503():
    rt = _pipeline(OomAbove(limit=1))
    rt.model.module.limit = 0  # after loading: nothing fits any more
    jobs = [Job(rt.prepare(img, 10**6).pixels, None) for img in IMAGES[:2]]
    results = rt.compute(jobs)
    assert all(isinstance(r, OutOfMemory) for r in results)
    assert "does not fit" in results[0].message


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_keeps_the_maps(precision):
    fp32 = _pipeline(Tiny())
    low = _pipeline(Tiny(), precision=precision)

    async def run(rt: Pipeline):
        return await rt.run(IMAGES, top_k=2, query=CamQuery(classes=(1,)), spec=HeatmapSpec("array", "feature"),
                            max_pixels=10**6)

    a, b = asyncio.run(run(fp32)), asyncio.run(run(low))
    for x, y in zip(a, b, strict=True):
        ma, mb = np.array(x.explanations[0].heatmap.data), np.array(y.explanations[0].heatmap.data)
        assert np.corrcoef(ma.ravel(), mb.ravel())[0, 1] > 0.98


@pytest.mark.needs_cuda
def test_cuda_matches_cpu():
    cpu = tiny_model()
    gpu = serve_module(Tiny(), ModelSpec(name="g", source="python:x:y", device="cuda"), None, TINY_PRE)
    x = torch.stack([Pipeline(cpu).prepare(i, 10**6).pixels for i in IMAGES])
    q = [CamQuery(top=2)] * len(IMAGES)
    out_cpu = cpu.engine.explain(cpu.preprocess.normalize(x), q)
    out_gpu = gpu.engine.explain(gpu.preprocess.normalize(x.cuda()), q)
    for a, b in zip(out_cpu.cams, out_gpu.cams, strict=True):
        torch.testing.assert_close(a.maps, b.maps.cpu(), atol=1e-3, rtol=1e-3)


def test_a_label_wins_over_an_index_and_odd_strings_are_refused():
    labels = ["1", "0", "3", "cat"]
    assert class_index(labels, "1") == 0  # the label "1", not index 1
    assert class_index(labels, "2") == 2  # no such label: an index
    assert class_index(labels, 3) == 3
    for bad in ("²", "9" * 5000, "dog", True, 4, -1):
        with pytest.raises(InvalidArgument):
            class_index(labels, bad)


def test_a_pixel_tensor_input_gives_the_same_result_as_its_image():
    """Clients that preprocess themselves (OIP `pixels`) get what the image would have given."""
    rt = _pipeline(Tiny())
    prepared = rt.prepare(IMAGES[0], 10**6)
    normalized = rt.model.preprocess.normalize(prepared.pixels)
    query, spec = CamQuery(classes=(2,)), HeatmapSpec("array", "input")

    async def run(inputs):
        return await rt.run(inputs, top_k=4, query=query, spec=spec, max_pixels=10**6)

    from_png, from_uint8, from_float = (asyncio.run(run([x])) for x in (IMAGES[0], prepared.pixels, normalized))
    for other in (from_uint8, from_float):
        assert other[0].scores == pytest.approx(from_png[0].scores, abs=1e-5)
        np.testing.assert_allclose(other[0].explanations[0].heatmap.data, from_png[0].explanations[0].heatmap.data,
                                   atol=1e-5)


# -- where the work runs ------------------------------------------------------------------------------
class CountingPool(ThreadPoolExecutor):
    """A CPU pool that counts the jobs handed to it."""

    def __init__(self) -> None:
        super().__init__(2)
        self.jobs = 0

    def submit(self, fn, /, *args, **kwargs):
        self.jobs += 1
        return super().submit(fn, *args, **kwargs)


LARGE = encode_png(np.random.default_rng(9).integers(0, 255, (200, 200, 3), dtype=np.uint8))


def _run(rt: Pipeline, images, **kwargs):
    async def go():
        return await rt.run(images, top_k=3, query=CamQuery(), spec=HeatmapSpec(), max_pixels=10**6, **kwargs)

    return asyncio.run(go())


def test_small_images_stay_on_the_loop_and_large_ones_go_to_the_pool():
    pool = CountingPool()
    rt = Pipeline(_pipeline(Tiny()).model, pool)
    _run(rt, IMAGES[:1])
    assert pool.jobs == 0  # a 32x32 image: decoded and rendered on the loop
    _run(rt, [LARGE])
    assert pool.jobs == 2  # 200x200: decoded and rendered in the pool
    pool.jobs = 0
    _run(rt, [IMAGES[0]] * 40)  # 40 small ones: past the per-request budget, the rest go to the pool
    assert 0 < pool.jobs < 80
    pool.shutdown()


def test_the_loop_and_the_pool_give_the_same_results(monkeypatch):
    rt = Pipeline(_pipeline(Tiny()).model, CountingPool())
    inline = _run(rt, IMAGES[:3])
    monkeypatch.setattr(pipeline_module, "INLINE_PIXELS", 0)
    pooled = _run(rt, IMAGES[:3])
    assert rt.cpu_pool.jobs == 6
    for a, b in zip(inline, pooled, strict=True):
        assert a.scores == b.scores
        assert a.explanations[0].heatmap.data == b.explanations[0].heatmap.data


def test_images_being_decoded_are_announced_to_the_batcher(monkeypatch):
    rt = _pipeline(Tiny())
    batcher = Batcher(rt.compute, max_batch_size=8)
    decoding, go_on = threading.Event(), threading.Event()
    original = Pipeline.prepare

    def slow_prepare(self, *args):
        decoding.set()
        go_on.wait(10)
        return original(self, *args)

    monkeypatch.setattr(Pipeline, "prepare", slow_prepare)

    async def body():
        batcher.start()
        task = asyncio.create_task(rt.run([LARGE, LARGE], top_k=3, query=None, spec=None, max_pixels=10**6,
                                          submit=batcher.submit, expect=batcher.expect))
        await asyncio.to_thread(decoding.wait, 10)
        during = batcher.expected_images
        go_on.set()
        await task
        after = batcher.expected_images
        await batcher.stop()
        return during, after

    assert asyncio.run(body()) == (2, 0)


def test_a_lone_image_is_decoded_and_computed_in_the_model_thread_in_one_hop(monkeypatch):
    pool = CountingPool()
    rt = Pipeline(_pipeline(Tiny()).model, pool)
    batcher = Batcher(rt.compute, max_batch_size=8, name="tiny")
    threads: list[str] = []
    original = Pipeline.prepare

    def prepare(self, *args):
        threads.append(threading.current_thread().name)
        return original(self, *args)

    monkeypatch.setattr(Pipeline, "prepare", prepare)

    async def body():
        batcher.start()
        kwargs = {"submit": batcher.submit, "expect": batcher.expect}
        try:
            lone = await rt.run([LARGE], top_k=3, query=CamQuery(), spec=HeatmapSpec(), max_pixels=10**6,
                                alone=batcher.run_alone, **kwargs)
            batched = await rt.run([LARGE], top_k=3, query=CamQuery(), spec=HeatmapSpec(), max_pixels=10**6,
                                   **kwargs)
        finally:
            await batcher.stop()
        return lone, batched

    lone, batched = asyncio.run(body())
    assert threads[0].startswith("camserve-tiny") and not threads[1].startswith("camserve-tiny")
    assert pool.jobs == 1 + 2  # the lone one renders in the pool (200x200); the batched one decodes there too
    assert lone[0].scores == batched[0].scores
    assert lone[0].explanations[0].heatmap.data == batched[0].explanations[0].heatmap.data
    pool.shutdown()


def test_a_lone_request_reports_a_bad_image_and_too_many_heatmap_pixels():
    rt = Pipeline(_pipeline(Tiny()).model, CountingPool())

    async def go(images, **kwargs):
        batcher = Batcher(rt.compute, max_batch_size=8)
        batcher.start()
        try:
            return await rt.run(images, top_k=3, query=CamQuery(), spec=HeatmapSpec(), max_pixels=10**6,
                                submit=batcher.submit, alone=batcher.run_alone, **kwargs)
        finally:
            await batcher.stop()

    with pytest.raises(InvalidImage) as err:
        asyncio.run(go([b"junk"]))
    assert err.value.message.startswith("image 0: ")
    with pytest.raises(PayloadTooLarge):
        asyncio.run(go([LARGE], max_render_pixels=100))


def test_a_bad_image_is_named_on_either_path():
    rt = Pipeline(_pipeline(Tiny()).model, CountingPool())
    for images in ([IMAGES[0], b"junk"], [LARGE, LARGE[:500]]):
        with pytest.raises(InvalidImage) as err:
            _run(rt, images)
        assert err.value.message.startswith("image 1: ")  # the message clients see
