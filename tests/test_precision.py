"""Every method under fp32, bf16 and fp16 through the pipeline, on CPU autocast.

A GPU runs the same autocast code paths; CPU autocast supports both bf16 and fp16, so a defect of a
reduced-precision path shows here first. Stated tolerances, against float32 on the same model:
maps r >= 0.99; logits within ``LOGIT_TOL[precision]`` times the largest logit.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch
from torch import nn

from service.cam import METHODS, CamQuery
from service.imaging import encode_png
from service.pipeline import Pipeline
from service.preprocess import Preprocess
from service.registry import ModelSpec, serve_module
from service.rendering import HeatmapSpec

PRE = Preprocess(resize=(32, 32), crop=None, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
IMAGES = [encode_png(np.random.default_rng(i).integers(0, 255, (32, 32, 3), dtype=np.uint8)) for i in range(3)]
# bf16 keeps 8 significant bits, fp16 11: a logit's rounding error grows with the sum of the magnitudes.
LOGIT_TOL = {"bf16": 3e-2, "fp16": 4e-3}
MIN_R = 0.99


class PrecisionNet(nn.Module):
    """A seeded 6-class CNN whose last block ends in a ReLU module then global pooling and one linear layer,
    so ``features`` has AblationCAM's closed form and ``features.3`` needs a tail replay."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        )
        self.head = nn.Linear(32, 6)
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.2, 0.2)
                    m.running_var.uniform_(0.5, 1.5)
            self.head.weight.mul_(4)  # logits of a few units, as a trained model's

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


_PIPELINES: dict[str, Pipeline] = {}


def _pipeline(precision: str) -> Pipeline:
    if precision not in _PIPELINES:
        spec = ModelSpec(name=f"p-{precision}", source="python:x:y", precision=precision, output="none",
                         target_layer="features")
        _PIPELINES[precision] = Pipeline(serve_module(PrecisionNet(), spec, None, PRE))
    return _PIPELINES[precision]


def _run(precision: str, query: CamQuery):
    rt = _pipeline(precision)
    return asyncio.run(rt.run(IMAGES, top_k=6, query=query, spec=HeatmapSpec("array", "feature"),
                              max_pixels=10**6))


def _compare(query: CamQuery, precision: str) -> list[float]:
    """The maps' correlations against float32 (one per image and target); checks the logits on the way."""
    ref, low = _run("fp32", query), _run(precision, query)
    rs = []
    for a, b in zip(ref, low, strict=True):
        logits_a, logits_b = np.array(a.scores), np.array(b.scores)  # output="none": the logits themselves
        assert np.abs(logits_a - logits_b).max() <= LOGIT_TOL[precision] * np.abs(logits_a).max()
        assert a.explanations is not None and b.explanations is not None
        for ea, eb in zip(a.explanations, b.explanations, strict=True):
            assert ea.index == eb.index
            ma, mb = np.asarray(ea.heatmap.data, float).ravel(), np.asarray(eb.heatmap.data, float).ravel()
            rs.append(1.0 if np.array_equal(ma, mb) else float(np.corrcoef(ma, mb)[0, 1]))
    return rs


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_keeps_its_maps_under_reduced_precision(method, precision):
    rs = _compare(CamQuery(method=method, top=2), precision)
    assert min(rs) >= MIN_R, f"{method} in {precision}: r = {min(rs):.4f}"


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_ablationcam_by_tail_replay_under_reduced_precision(precision):
    """A layer inside the last block: no closed form, the layers after it are replayed."""
    rs = _compare(CamQuery(method="ablationcam", layer="features.3", top=2), precision)
    assert min(rs) >= MIN_R
    assert _pipeline(precision).model.engine._closed_form == {"features": True, "features.3": False}


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("query", [
    CamQuery(method="gradcam", smooth="aug"),
    CamQuery(method="gradcam++", smooth="eigen"),
    CamQuery(method="ablationcam", smooth="aug"),
    CamQuery(method="layercam", layer=("features", "features.3"), fuse="product"),
    CamQuery(method="scorecam", layer=("features", "features.3"), fuse="max"),
], ids=["aug", "eigen", "ablation-aug", "fuse-product", "fuse-scorecam"])
def test_smoothing_and_fusion_under_reduced_precision(query, precision):
    assert min(_compare(query, precision)) >= MIN_R


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_metrics_under_reduced_precision(precision):
    query = CamQuery(method="gradcam", top=2, metrics=("confidence", "deletion", "insertion"), metric_steps=8)
    assert min(_compare(query, precision)) >= MIN_R
    ref, low = _run("fp32", query), _run(precision, query)
    for a, b in zip(ref, low, strict=True):
        for ea, eb in zip(a.explanations or [], b.explanations or [], strict=True):
            assert ea.metrics is not None and eb.metrics is not None
            assert ea.metrics.keys() == eb.metrics.keys()
            for name, value in ea.metrics.items():
                assert eb.metrics[name] == pytest.approx(value, abs=0.05), name


def test_ablationcam_closed_form_is_found_under_autocast():
    """The closed form is recognised in bf16 too (it was refused, then failed on the dtype), and a head that
    only looks linear is still refused."""
    from service.cam.replay import linear_head

    model = PrecisionNet().eval()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    for dtype in (torch.bfloat16, torch.float16):
        with torch.autocast("cpu", dtype=dtype), torch.no_grad():
            act = model.features(x)
            logits = model.head(act.mean(dim=(2, 3)))
            assert linear_head(model, act.float(), logits.float(), dtype) is not None
            # max pooling instead of the mean: not the closed form, however loose the tolerance
            fake = model.head(act.amax(dim=(2, 3)))
            assert linear_head(model, act.float(), fake.float(), dtype) is None


@pytest.mark.needs_cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_every_method_on_cuda_keeps_the_cpu_maps(precision):
    spec = ModelSpec(name="cuda", source="python:x:y", precision=precision, output="none", target_layer="features",
                     device="cuda")
    rt = Pipeline(serve_module(PrecisionNet(), spec, None, PRE))
    for method in METHODS:
        query = CamQuery(method=method, top=2)
        ref = _run("fp32", query)
        out = asyncio.run(rt.run(IMAGES, top_k=6, query=query, spec=HeatmapSpec("array", "feature"),
                                 max_pixels=10**6))
        for a, b in zip(ref, out, strict=True):
            for ea, eb in zip(a.explanations or [], b.explanations or [], strict=True):
                ma, mb = np.asarray(ea.heatmap.data, float).ravel(), np.asarray(eb.heatmap.data, float).ravel()
                r = 1.0 if np.array_equal(ma, mb) else float(np.corrcoef(ma, mb)[0, 1])
                assert r >= (0.999 if precision == "fp32" else MIN_R), f"{method} on cuda in {precision}: r = {r:.4f}"
