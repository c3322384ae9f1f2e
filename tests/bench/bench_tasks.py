"""Detection and segmentation benchmark (``make bench``): explain vs predict, and vs pytorch-grad-cam's
one-call-per-target loop.

torchvision's fasterrcnn_mobilenet_v3_large_320_fpn (random weights, batch-norm statistics from random
images so that boxes differ) at 320x320 and lraspp_mobilenet_v3_large at 224x224, and the built-in
shapes-detect and shapes-seg on scenes of three shapes, batch 1 and 8, one and five targets per image,
Grad-CAM at the default layer. ``explain/predict`` is camserve's explain time over its
predict time for the same batch; ``vs pytorch-grad-cam`` is pytorch-grad-cam's time for the same maps (one
call per image and target, with ``FasterRCNNBoxScoreTarget`` / ``SemanticSegmentationTarget``) over ours.
Each cell times the variants in turns and reports the median of the per-turn ratios.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

os.environ.setdefault("TQDM_DISABLE", "1")

import torch
import torchvision
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import FasterRCNNBoxScoreTarget, SemanticSegmentationTarget

from service.cam import CamEngine, CamQuery
from service.cam.tasks import TaskTarget, get_task
from tests.bench import cpu_name


def _calibrated_detector() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, num_classes=6, box_score_thresh=0.0)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    with torch.no_grad():
        calib = torch.rand(4, 3, 320, 320, generator=torch.Generator().manual_seed(5))
        model.backbone(model.transform(list(calib))[0].tensors)
    return model.eval()


class _Out(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.model(x)["out"]
        return out


def _turns(fns: list[Callable[..., object]], rounds: int) -> list[list[float]]:
    for fn in fns:
        fn()  # warm-up
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            times[i].append(time.perf_counter() - t0)
    return times


def _ratio(a: list[float], b: list[float]) -> float:
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


Row = tuple[str, int, int, float, float, float | None]


def _row(name: str, batch: int, targets: int, fns: list[Callable[..., object]], rounds: int) -> Row:
    """Predict, explain and (when timed) pytorch-grad-cam, in turns."""
    times = _turns(fns, rounds)
    ref = _ratio(times[2], times[1]) if len(times) > 2 else None
    return name, batch, targets, statistics.median(times[0]) * 1000, _ratio(times[1], times[0]), ref


def _scenes(n_shapes: int) -> torch.Tensor:
    """Eight 64x64 scenes of ``n_shapes`` shapes of different classes, normalised as the built-in models take them."""
    from service.models.multiscenes import make_multi_scenes, stack_images
    from service.models.shapes import to_input

    return to_input(stack_images(make_multi_scenes(8, seed=11, n_shapes=n_shapes, distinct_labels=True)))


def torchvision_detection_rows(rounds: int, reference: bool) -> list[Row]:
    x = torch.rand(8, 3, 320, 320, generator=torch.Generator().manual_seed(1))
    return detection_rows("fasterrcnn_mobilenet_v3_large_320_fpn", _calibrated_detector(), x, [], rounds, reference)


def builtin_detection_rows(rounds: int, reference: bool) -> list[Row]:
    from service.models.shapes_detect import load_shapes_detect

    model, labels = load_shapes_detect()
    return detection_rows("builtin:shapes-detect (3 shapes, so 5 targets are 3)", model, _scenes(3), labels, rounds,
                          reference)


def detection_rows(name: str, model: torch.nn.Module, x: torch.Tensor, labels: list[str], rounds: int,
                   with_reference: bool = True) -> list[Row]:
    engine = CamEngine(model, x[:1], task=get_task("detection", labels))
    layer = engine.layers.default
    rows = []
    for batch in (1, 8):
        xb = x[:batch]
        found = [s.detections for s in engine.explain(xb, [CamQuery(top=5)] * batch).summaries or []]
        for targets in (1, 5):
            queries = [CamQuery(layer=layer, objective="score+iou",
                                targets=tuple(TaskTarget(box=d.box, label=d.label) for d in f[:targets]))
                       for f in found]

            def predict(xb: torch.Tensor = xb) -> None:
                engine.predict(xb)

            def explain(xb: torch.Tensor = xb, queries: list[CamQuery] = queries) -> None:
                engine.explain(xb, queries)

            def reference(xb: torch.Tensor = xb, found: list = found, targets: int = targets) -> None:
                for p in model.parameters():
                    p.requires_grad_(True)
                with GradCAM(model=model, target_layers=[dict(model.named_modules())[layer]]) as cam:
                    for i in range(xb.shape[0]):
                        for d in found[i][:targets]:
                            cam(input_tensor=xb[i : i + 1],
                                targets=[FasterRCNNBoxScoreTarget([d.label], [torch.tensor(d.box)])])
                for p in model.parameters():
                    p.requires_grad_(False)

            rows.append(_row(name, batch, targets, [predict, explain, reference][:3 if with_reference else 2], rounds))
    engine.close()
    return rows


def torchvision_segmentation_rows(rounds: int, reference: bool) -> list[Row]:
    torch.manual_seed(0)
    model = torchvision.models.segmentation.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None,
                                                                       num_classes=6).eval()
    x = torch.rand(8, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    return segmentation_rows("lraspp_mobilenet_v3_large", model, _Out(model), x, ["background", *"abcde"], rounds,
                             reference)


def builtin_segmentation_rows(rounds: int, reference: bool) -> list[Row]:
    from service.models.shapes_seg import load_shapes_seg

    model, labels = load_shapes_seg()
    return segmentation_rows("builtin:shapes-seg (5 classes over 3 shapes)", model, model, _scenes(3), labels, rounds,
                             reference)


def segmentation_rows(name: str, model: torch.nn.Module, wrapped: torch.nn.Module, x: torch.Tensor,
                      labels: list[str], rounds: int, with_reference: bool = True) -> list[Row]:
    """``wrapped``: the model returning the logits tensor itself, as pytorch-grad-cam's target needs."""
    engine = CamEngine(model, x[:1], task=get_task("segmentation", labels))
    layer = engine.layers.default
    prefix = "model." if wrapped is not model else ""
    rows = []
    for batch in (1, 8):
        xb = x[:batch]
        for targets in (1, 5):
            queries = [CamQuery(layer=layer, targets=tuple(TaskTarget(index=c) for c in range(1, 1 + targets)))] * batch

            def predict(xb: torch.Tensor = xb) -> None:
                engine.predict(xb)

            def explain(xb: torch.Tensor = xb, queries: list[CamQuery] = queries) -> None:
                engine.explain(xb, queries)

            with torch.no_grad():
                masks = wrapped(xb).argmax(dim=1)

            def reference(xb: torch.Tensor = xb, targets: int = targets, masks: torch.Tensor = masks) -> None:
                for p in model.parameters():
                    p.requires_grad_(True)
                with GradCAM(model=wrapped, target_layers=[dict(wrapped.named_modules())[prefix + layer]]) as cam:
                    for i in range(xb.shape[0]):
                        for c in range(1, 1 + targets):
                            region = (masks[i] == c).float().numpy()
                            cam(input_tensor=xb[i : i + 1], targets=[SemanticSegmentationTarget(c, region)])
                for p in model.parameters():
                    p.requires_grad_(False)

            rows.append(_row(name, batch, targets, [predict, explain, reference][:3 if with_reference else 2], rounds))
    engine.close()
    return rows


ROWS = {"fasterrcnn": torchvision_detection_rows, "shapes-detect": builtin_detection_rows,
        "lraspp": torchvision_segmentation_rows, "shapes-seg": builtin_segmentation_rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--only", action="append", choices=sorted(ROWS), default=None,
                        help="only this model's rows (repeatable); default: all four")
    parser.add_argument("--no-reference", action="store_true",
                        help="skip pytorch-grad-cam (its loop is most of the run time)")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    print(f"# {cpu_name()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; medians of {args.rounds} turns; load {os.getloadavg()[0]:.1f}")
    print("| model | batch | targets | predict ms | explain/predict | pytorch-grad-cam/ours |")
    print("|---|---|---|---|---|---|")
    torch.set_grad_enabled(True)
    for key, rows in ROWS.items():
        if args.only and key not in args.only:
            continue
        for name, batch, targets, pred_ms, ratio, ref in rows(args.rounds, not args.no_reference):
            shown = "-" if ref is None else f"{ref:.1f}x"
            print(f"| {name} | {batch} | {targets} | {pred_ms:.1f} | {ratio:.2f} | {shown} |", flush=True)


if __name__ == "__main__":
    main()
