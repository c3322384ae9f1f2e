"""Where the time of one request goes, stage by stage, in-process (``make bench-stages``).

One shapes ``/explain`` of a 64x64 PNG sent as JSON base64: each stage is timed alone (median of many
calls), in rounds that visit every stage once, so a busy shared machine slows them all alike. The
stages are the pipeline's own functions, so ``--tree DIR`` (an exported older commit) measures the
same stages of older code for a before/after table.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import platform
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from PIL import Image


async def _timed(fn: Callable[[], Any], reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


async def _atimed(fn: Callable[[], Awaitable[Any]], reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        await fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


async def measure(rounds: int, reps: int) -> dict[str, float]:
    from fastapi.responses import JSONResponse

    from service.api.encoding import inference_json
    from service.api.parsing import decode_base64
    from service.batching import Batcher
    from service.cam import CamQuery
    from service.models.scenes import make_scene
    from service.pipeline import Job, Pipeline
    from service.registry import load_model
    from service.rendering import HeatmapSpec
    from service.results import InferenceResult
    from service.sources import ModelSpec

    buf = io.BytesIO()
    Image.fromarray(make_scene(np.random.default_rng(0)).image).save(buf, format="PNG")
    png = buf.getvalue()
    body = json.dumps({"image": base64.b64encode(png).decode()}).encode()
    pool = ThreadPoolExecutor(2, thread_name_prefix="cpu")
    model_thread = ThreadPoolExecutor(1, thread_name_prefix="model")
    pipeline = Pipeline(load_model(ModelSpec(name="shapes", source="builtin:shapes")), pool)
    spec, query = HeatmapSpec(), CamQuery()
    prepared = pipeline.prepare(png, 10**8)
    job = Job(prepared.pixels, query)
    result = pipeline.compute([job])[0]
    assert not isinstance(result, BaseException)
    finished = pipeline.finish(prepared, result, 5, spec)
    loop = asyncio.get_running_loop()
    noop: Batcher[int, int] = Batcher(lambda items: items, max_batch_size=32)
    batcher = Batcher(pipeline.compute, max_batch_size=32)
    noop.start()
    batcher.start()

    def in_model_thread(pause_s: float) -> float:
        time.sleep(pause_s)
        t0 = time.perf_counter()
        pipeline.compute([job])
        return time.perf_counter() - t0

    async def engine(pause_s: float = 0.0) -> float:
        times = [await loop.run_in_executor(model_thread, in_model_thread, pause_s) for _ in range(reps)]
        return statistics.median(times) * 1000

    async def whole() -> object:
        kwargs: dict[str, Any] = {"submit": batcher.submit}
        if hasattr(batcher, "expect"):
            kwargs["expect"] = batcher.expect
        return await pipeline.run([png], top_k=5, query=query, spec=spec, max_pixels=10**8, **kwargs)

    stages: dict[str, Callable[[], Awaitable[float]]] = {
        "JSON body + base64 decode": lambda: _timed(lambda: decode_base64(json.loads(body)["image"], 0), reps),
        "decode + preprocess (prepare)": lambda: _timed(lambda: pipeline.prepare(png, 10**8), reps),
        "engine, in the model thread (compute)": engine,
        # What a lone request meets: the model thread (and its OpenMP workers) idle since the last one.
        "engine after a 6 ms idle pause": lambda: engine(0.006),
        "render: topk, resample, PNG (finish)": lambda: _timed(lambda: pipeline.finish(prepared, result, 5, spec),
                                                               reps),
        "response JSON (base64 + dumps)": lambda: _timed(
            lambda: JSONResponse(inference_json(InferenceResult("shapes", [finished]))), reps),
        "one hop: loop -> CPU pool -> loop": lambda: _atimed(lambda: loop.run_in_executor(pool, int), reps),
        "batcher round trip (no-op model)": lambda: _atimed(lambda: noop.submit([1]), reps),
        "whole pipeline.run with its batcher": lambda: _atimed(whole, reps),
    }
    for fn in stages.values():  # warm every path
        await fn()
    results: dict[str, list[float]] = {name: [] for name in stages}
    for r in range(rounds):
        for name, fn in list(stages.items())[r % len(stages):] + list(stages.items())[:r % len(stages)]:
            results[name].append(await fn())
    await noop.stop()
    await batcher.stop()
    pool.shutdown()
    model_thread.shutdown()
    return {name: statistics.median(v) for name, v in results.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--reps", type=int, default=100, help="calls per stage per round")
    parser.add_argument("--torch-threads", type=int, help="torch.set_num_threads (default: torch's own)")
    parser.add_argument("--tree", help="import `service` from this directory (an exported older commit)")
    args = parser.parse_args()
    if args.tree:
        sys.path.insert(0, args.tree)
    import torch
    import uvloop

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)

    out = uvloop.run(measure(args.rounds, args.reps))
    import service

    print(f"# stages of one shapes /explain (64x64 PNG, JSON) on {platform.machine()}, code from "
          f"{service.__file__}, {torch.get_num_threads()} torch threads; "
          f"medians of {args.rounds} rounds x {args.reps} calls")
    print("| stage | ms |")
    print("|---|---|")
    for name, ms in out.items():
        print(f"| {name} | {ms:.3f} |")


if __name__ == "__main__":
    main()
