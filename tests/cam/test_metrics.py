"""Faithfulness metrics: equal to torchcam's on the same maps, and telling Grad-CAM from uninformed maps."""

from __future__ import annotations

import contextlib
from functools import partial

import pytest
import torch
from torchcam.metrics import ClassificationMetric, DeletionInsertionMetric

from service.cam import CamEngine, CamQuery
from service.cam.metrics import (
    average_drop,
    check_metrics,
    deletion,
    deletion_baseline,
    increase,
    insertion,
    insertion_baseline,
    metric_forwards,
    metrics_work,
    run,
)
from service.errors import InvalidArgument
from service.models.scenes import make_scenes
from service.models.shapes import load_shapes, to_input


class _FixedMaps:
    """The part of a torchcam extractor its metrics use, answering with maps computed beforehand."""

    def __init__(self, model, maps):
        self.model = model
        self.maps = maps

    def __call__(self, class_idx=None, scores=None, normalized=True, **kwargs):
        return [self.maps]

    def fuse_cams(self, cams):
        return cams[0]

    def _hooks_off(self):
        return contextlib.nullcontext()


def _gradcam_on_scenes(n: int, seed: int):
    """The shapes model, ``n`` fresh scenes as its input, their labels, and Grad-CAM's map of each label."""
    model, _ = load_shapes()
    images, labels, _ = make_scenes(n, seed=seed)
    x = to_input(images)
    classes = torch.as_tensor(labels, dtype=torch.long)
    with CamEngine(model, x[:1]) as engine:
        out = engine.explain(x, [CamQuery(classes=(int(c),)) for c in classes])
    return model, x, classes, torch.stack([cam.maps[0] for cam in out.cams])


@pytest.fixture(scope="module")
def shapes_batch():
    model, x, classes, maps = _gradcam_on_scenes(12, seed=123)
    for p in model.parameters():
        p.requires_grad_(True)
    return model, x, maps, classes


def test_confidence_equals_torchcam(shapes_batch):
    model, x, maps, classes = shapes_batch
    ref = ClassificationMetric(_FixedMaps(model, maps), partial(torch.softmax, dim=-1))
    ref.update(x, class_idx=classes.tolist())
    expected = ref.summary()
    assert average_drop(model, x, maps, classes, chunk_rows=5).mean().item() == pytest.approx(
        expected["avg_drop"], abs=1e-4)
    assert increase(model, x, maps, classes).mean().item() == pytest.approx(expected["conf_increase"], abs=1e-4)


@pytest.mark.parametrize("steps", [4, 16, pytest.param(64, marks=pytest.mark.slow)])
def test_deletion_and_insertion_equal_torchcam(shapes_batch, steps):
    model, x, maps, classes = shapes_batch
    for kind, fn, baseline in (("deletion", deletion, deletion_baseline(x)),
                               ("insertion", insertion, insertion_baseline(x))):
        ref = DeletionInsertionMetric(_FixedMaps(model, maps), partial(torch.softmax, dim=-1), steps=steps,
                                      baseline=baseline, batch_size=7)
        ref.update(x, class_idx=classes.tolist())
        ours = fn(model, x, maps, classes, steps=steps, chunk_rows=9)
        assert ours.shape == (len(x),)
        assert ours.mean().item() == pytest.approx(ref.summary()[f"{kind}_auc"], abs=1e-4), kind


def test_metrics_work_yields_per_chunk_and_counts_forwards(shapes_batch):
    model, x, maps, classes = shapes_batch
    calls = []

    def counted(batch):
        calls.append(len(batch))
        return model(batch)

    work = metrics_work(counted, x[:2], maps[:2], classes[:2], ["confidence", "deletion", "insertion"], steps=4,
                        chunk_rows=3)
    chunks = 0
    with contextlib.suppress(StopIteration):
        while True:
            next(work)
            chunks += 1
    assert max(calls) <= 3 and chunks == len(calls)
    # One forward for the unperturbed scores, then what metric_forwards promises per explanation.
    assert sum(calls) == 2 + 2 * metric_forwards(["confidence", "deletion", "insertion"], 4)


def test_metric_options_are_validated():
    assert check_metrics(["deletion", "confidence", "deletion"], 16) == ("deletion", "confidence")
    with pytest.raises(InvalidArgument, match=r"`metrics`.*'faith'"):
        check_metrics(["faith"], 16)
    with pytest.raises(InvalidArgument, match="`metric_steps` must be between 4 and 64, got 65"):
        check_metrics(["deletion"], 65)


@pytest.fixture(scope="module")
def maps_200():
    """The shapes model, 200 fresh scenes, their labels, and three maps per scene: Grad-CAM's, a
    random one and a centred Gaussian blob."""
    model, x, classes, gradcam = _gradcam_on_scenes(200, seed=2024)
    n, h, w = gradcam.shape
    random = torch.rand(n, h, w, generator=torch.Generator().manual_seed(5))
    yy, xx = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    blob = torch.exp(-((yy - h / 2) ** 2 + (xx - w / 2) ** 2) / (2 * (h / 4) ** 2)).expand(n, h, w)
    return model, x, classes, {"gradcam": gradcam, "random": random, "centre": blob}


@pytest.fixture(scope="module")
def scores_200(maps_200) -> dict[str, dict[str, float]]:
    model, x, classes, maps = maps_200
    names = ["confidence", "deletion", "insertion"]
    return {label: {k: v.mean().item() for k, v in run(metrics_work(model, x, m, classes, names)).items()}
            for label, m in maps.items()}


@pytest.mark.slow
@pytest.mark.parametrize("metric", ["average_drop", "deletion", "insertion"])
def test_gradcam_beats_random_and_centre_maps_over_200_scenes(scores_200, metric):
    lower_is_better = metric in ("average_drop", "deletion")
    for other in ("random", "centre"):
        ours, theirs = scores_200["gradcam"][metric], scores_200[other][metric]
        assert (ours < theirs) if lower_is_better else (ours > theirs), scores_200


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="measured: on the shapes model Grad-CAM's `increase` (share of images whose "
                   "confidence rises when multiplied by the map) is 0.06, below a random map's 0.155; the cause is "
                   "the reference protocol's masking, shown by the next test")
def test_gradcam_beats_random_and_centre_maps_on_increase(scores_200):
    for other in ("random", "centre"):
        assert scores_200["gradcam"]["increase"] > scores_200[other]["increase"], scores_200


def test_increase_follows_the_map_when_masking_fades_to_the_models_own_neutral_input(maps_200):
    """Why Grad-CAM loses on `increase` above. The reference protocol multiplies the normalised input
    by the map, so masked pixels go to the dataset's mean colour. The shapes model first subtracts
    each image's own mean colour (its scenes have random backgrounds), so for it the neutral input is
    that mean, not the dataset's: multiplying by the map changes the contrast between the shape and
    its background, which the classifier reads, and confidence falls even where the map keeps the
    whole shape. Fading each image towards its own mean instead (``mean + (x - mean) * map``) leaves
    a kept shape as the model saw it, and then Grad-CAM's maps raise confidence more often than a random
    map or a centre blob, and drop it less (measured: increase 0.215 against 0.015 and 0.12, average
    drop 0.063 against 0.32 and 0.11): the maps are faithful; the protocol's baseline does not suit
    this model."""
    model, x, classes, maps = maps_200
    mean = x.mean(dim=(2, 3), keepdim=True)
    with torch.inference_mode():
        base = model(x).softmax(1).gather(1, classes[:, None])[:, 0]
        scores = {}
        for label, m in maps.items():
            up = torch.nn.functional.interpolate(m[:, None].float(), size=x.shape[-2:], mode="bilinear",
                                                 align_corners=False)
            p = model(mean + (x - mean) * up).softmax(1).gather(1, classes[:, None])[:, 0]
            scores[label] = {"increase": (p > base).float().mean().item(),
                             "average_drop": ((base - p).clamp(min=0) / base).mean().item()}
    for other in ("random", "centre"):
        assert scores["gradcam"]["increase"] > scores[other]["increase"], scores
        assert scores["gradcam"]["average_drop"] < scores[other]["average_drop"], scores
