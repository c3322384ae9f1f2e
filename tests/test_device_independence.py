"""What a GPU would be the first to find, checked on CPU: tensors the batched path creates on the CPU
(without naming a device), and the places it waits for the device (host synchronisations).

A ``TorchFunctionMode`` watches every torch call made from ``service/`` while a batch is computed: a factory
(``torch.zeros``, ``torch.tensor``, ...) without ``device=`` would put its tensor on the CPU next to a model
on a GPU; a read of a tensor's values on the host (``.tolist()``, ``bool()``, ``.item()``, ``nonzero``)
waits for the device. Factories must name a device; host reads must be in ``SYNCS``, each with its reason.
"""

from __future__ import annotations

import asyncio
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

from service.cam import METHODS, CamQuery
from service.imaging import encode_png
from service.pipeline import Job, Pipeline
from service.rendering import HeatmapSpec
from tests.test_precision import PrecisionNet, _pipeline

SERVICE = str(Path(__file__).resolve().parents[1] / "service")
FACTORIES = {torch.tensor, torch.as_tensor, torch.zeros, torch.ones, torch.empty, torch.full, torch.arange,
             torch.eye, torch.linspace, torch.rand, torch.randn, torch.randint, torch.from_numpy}
HOST_READS = {torch.Tensor.tolist, torch.Tensor.item, torch.Tensor.__bool__, torch.Tensor.__int__,
              torch.Tensor.__float__, torch.Tensor.numpy, torch.Tensor.cpu, torch.Tensor.nonzero, torch.nonzero}
# Where the batched path waits for the device on purpose: (file, function) -> why.
SYNCS = {
    ("engine.py", "_targets"): "the top classes become the request's targets, sent back as integers",
    ("replay.py", "linear_head"): "whether the closed form holds decides how AblationCAM runs (once per group)",
    ("methods.py", "run"): "ScoreCAM's live channels: how many masked forwards run depends on them",
}
IMAGES = [encode_png(np.random.default_rng(i).integers(0, 255, (32, 32, 3), dtype=np.uint8)) for i in range(2)]


class Watch(TorchFunctionMode):
    """Records factory calls without a device and host reads, made from ``service/``."""

    def __init__(self) -> None:
        super().__init__()
        self.cpu_factories: Counter[tuple[str, str, int]] = Counter()
        self.host_reads: Counter[tuple[str, str]] = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in FACTORIES or func in HOST_READS:
            frame = sys._getframe(1)
            while frame is not None and frame.f_code.co_filename.startswith(str(Path(torch.__file__).parent)):
                frame = frame.f_back
            if frame is not None and frame.f_code.co_filename.startswith(SERVICE):
                where = (Path(frame.f_code.co_filename).name, frame.f_code.co_name)
                if func in FACTORIES and kwargs.get("device") is None and func is not torch.from_numpy:
                    self.cpu_factories[(*where, frame.f_lineno)] += 1
                if func in HOST_READS:
                    self.host_reads[where] += 1
        return func(*args, **kwargs)


def _compute(rt: Pipeline, query: CamQuery) -> Watch:
    jobs = [Job(rt.prepare(img, 10**6).pixels, query) for img in IMAGES]
    with Watch() as watch:
        results = rt.compute(jobs)
        for r in results:
            assert not isinstance(r, BaseException)
            while r.pending is not None:
                (r,) = rt.compute([Job(torch.empty(0), None, resume=r.pending)])
    return watch


QUERIES = [CamQuery(method=m, top=2) for m in METHODS] + [
    CamQuery(smooth="aug"), CamQuery(method="gradcam++", smooth="eigen"),
    CamQuery(layer=("features", "features.3"), fuse="product"), CamQuery(method="ablationcam", layer="features.3"),
    CamQuery(metrics=("confidence", "deletion", "insertion"), metric_steps=4),
]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_batched_path_creates_no_tensor_without_a_device_and_waits_only_where_listed(precision):
    rt = _pipeline(precision)
    reads: Counter[tuple[str, str]] = Counter()
    for q in QUERIES:
        watch = _compute(rt, q)
        assert not watch.cpu_factories, f"{q}: tensors created without a device at {dict(watch.cpu_factories)}"
        reads.update(watch.host_reads)
    assert set(reads) <= set(SYNCS), f"host reads outside the list: {set(reads) - set(SYNCS)}"


def test_the_watch_sees_what_it_looks_for():
    """The check cannot pass vacuously: a factory without a device and a host read from service/ are seen."""
    from service.cam import engine

    with Watch() as watch:
        engine.normalize_by_peak(torch.ones(1, 2, 2))  # from service/, but neither
        rt = _pipeline("fp32")
        rt.model.engine._targets(torch.randn(1, 6), engine._expand(torch.zeros(1, 3, 4, 4), [CamQuery(top=2)]))
    assert not watch.cpu_factories
    assert watch.host_reads == Counter({("engine.py", "_targets"): 1})


def test_a_whole_request_reads_the_device_only_in_the_batched_path_and_where_results_leave():
    """Preprocessing, the batched path and rendering: no tensor without a device (the resampling weights of a
    new geometry are built on the device), and host reads only where listed or where the results leave the
    device (rendering's one copy of the small maps; the scores, notes and metrics of ``finish``)."""
    from service import preprocess

    preprocess.resample_weights.cache_clear()
    rt = _pipeline("fp32")
    with Watch() as watch:
        asyncio.run(rt.run(IMAGES[:1], top_k=2, query=CamQuery(top=2), spec=HeatmapSpec("png", "input"),
                           max_pixels=10**6))
    assert not watch.cpu_factories
    finish = {("pipeline.py", fn) for fn in ("finish", "_note", "_metrics")}  # the scores, notes and metrics
    leaving = {(f, fn) for f, fn in watch.host_reads if f == "rendering.py" or (f, fn) in finish}
    assert leaving and set(watch.host_reads) - leaving <= set(SYNCS)


def test_the_model_of_the_precision_tests_is_used():
    assert isinstance(_pipeline("fp32").model.module, PrecisionNet)
