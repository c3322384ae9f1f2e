"""Perturbation work runs in chunks through the model's batcher: other traffic waits at most one chunk,
and a cancelled request runs no further chunks."""

from __future__ import annotations

import asyncio
import contextlib

import numpy as np

from service.batching import Batcher
from service.cam import CamQuery
from service.imaging import encode_png
from service.pipeline import Job, JobResult, Pipeline
from service.rendering import HeatmapSpec
from tests.api.models import tiny_model

IMAGE = encode_png(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))


def _logged_pipeline(delay_s: float = 0.01) -> tuple[Pipeline, list[str]]:
    pipeline = Pipeline(tiny_model(delay_s=delay_s))
    pipeline.model.engine.chunk_rows = 1  # Tiny's 8 channels: 8 ScoreCAM chunks
    log: list[str] = []
    compute = pipeline.compute

    def logged(jobs: list[Job]):
        for j in jobs:
            log.append("chunk" if j.resume is not None else "explain" if j.query is not None else "predict")
        return compute(jobs)

    pipeline.compute = logged  # type: ignore[method-assign]
    return pipeline, log


async def _until(condition, timeout_s: float = 30.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():  # noqa: ASYNC110 - the log is written by the model thread, not the loop
            await asyncio.sleep(0.001)


def test_a_predict_behind_scorecam_waits_at_most_one_chunk():
    async def scenario():
        pipeline, log = _logged_pipeline()
        batcher: Batcher[Job, JobResult] = Batcher(pipeline.compute, max_batch_size=8, max_wait_s=0.0, name="m")
        batcher.start()
        try:
            run = dict(top_k=1, max_pixels=10**6, submit=batcher.submit)
            explain = asyncio.create_task(pipeline.run([IMAGE], query=CamQuery(method="scorecam"),
                                                       spec=HeatmapSpec("array", "feature"), **run))
            await _until(lambda: log.count("chunk") >= 2)
            at_submit = len(log)
            predicted = await pipeline.run([IMAGE], query=None, spec=None, **run)
            served_at = log.index("predict")
            results = await explain
        finally:
            await batcher.stop()
        return log, at_submit, served_at, predicted, results

    log, at_submit, served_at, predicted, results = asyncio.run(scenario())
    # 8 masked forwards, then the step that turns their scores into the map
    assert log.count("chunk") == 9 and log[0] == "explain"
    assert log[at_submit:served_at].count("chunk") <= 1, log
    assert served_at < len(log) - 1  # the predict was not left to the end
    assert predicted[0].explanations is None
    assert results[0].explanations[0].method == "scorecam"


def test_cancelling_stops_the_remaining_chunks():
    async def scenario():
        pipeline, log = _logged_pipeline()
        batcher: Batcher[Job, JobResult] = Batcher(pipeline.compute, max_batch_size=8, max_wait_s=0.0, name="m")
        batcher.start()
        try:
            task = asyncio.create_task(pipeline.run([IMAGE], top_k=1, query=CamQuery(method="scorecam"), spec=None,
                                                    max_pixels=10**6, submit=batcher.submit))
            await _until(lambda: log.count("chunk") >= 2)
            task.cancel()
            at_cancel = log.count("chunk")
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await pipeline.run([IMAGE], top_k=1, query=None, spec=None, max_pixels=10**6, submit=batcher.submit)
        finally:
            await batcher.stop()
        return log, at_cancel

    log, at_cancel = asyncio.run(scenario())
    assert log.count("chunk") <= at_cancel + 1 < 9, log  # at most the chunk already running


def test_metrics_reach_the_explanation_without_a_batcher():
    pipeline = Pipeline(tiny_model())
    query = pipeline.model.engine.check(CamQuery(metrics=("confidence", "deletion"), metric_steps=4, top=2))
    results = asyncio.run(pipeline.run([IMAGE], top_k=2, query=query, spec=HeatmapSpec("array", "feature"),
                                       max_pixels=10**6))
    figures = results[0].explanations[0].metrics
    assert set(figures) == {"average_drop", "increase", "deletion", "steps"} and figures["steps"] == 4
    assert 0 <= figures["deletion"] <= 1
