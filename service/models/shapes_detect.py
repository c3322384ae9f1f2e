"""The built-in "shapes-detect" detector: a small CenterNet-style net trained on multi-shape scenes.

A conv-BN-ReLU backbone reaches stride 4 (a 16x16 grid for 64x64 input); the head's hidden 3x3 conv +
ReLU (`head.hidden`, the default layer to explain) feeds three 1x1 convs: one heatmap per class, the box
size and the sub-cell offset of the box centre. In eval mode `forward` returns torchvision's detection
convention, one dict per image with `boxes` (K, 4) float32 (x0, y0, x1, y1) in input pixels, `labels`
(K,) int64 indexes into SHAPE_CLASSES and `scores` (K,) float32. Peaks are chosen on detached maps, then
scores, sizes and offsets are gathered from the live ones, so `scores` and `boxes` are differentiable
with respect to the input and to `head.hidden`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torchvision
from torch import nn
from torch.nn import functional as F

from service.models.multiscenes import MAX_SHAPES, MultiScene, make_multi_scenes, stack_images
from service.models.scenes import SCENE_SIZE, SHAPE_CLASSES
from service.models.shapes import MEAN, STD, _conv_block, to_input

INPUT_SIZE = SCENE_SIZE
STRIDE = 4
DEFAULT_WEIGHTS = Path(__file__).with_name("shapes_detect.pt")

Detections = list[dict[str, torch.Tensor]]

# Sizes are regressed in units of 16 px, so targets (14-24 px) sit near 1 like the other outputs.
_SIZE_UNIT = 16.0
# CenterNet's prior: initial heatmap probability 0.1, so the focal loss starts small on the many negatives.
_HEATMAP_PRIOR_BIAS = -2.19
_TRAIN_SCENES = 8_000
_EPOCHS = 2
_BATCH_SIZE = 64
_EVAL_BATCH_SIZE = 256
_LR = 3e-3
_WEIGHT_DECAY = 1e-4
_VAL_SCENES = 500
_VAL_SEED_OFFSET = 7_919


class DetectionHead(nn.Module):
    """(N, 64, 16, 16) features -> class logits (N, C, 16, 16), size (N, 2, 16, 16), offset (N, 2, 16, 16)."""

    def __init__(self, in_channels: int = 64, hidden: int = 64, num_classes: int = len(SHAPE_CLASSES)) -> None:
        super().__init__()
        # Not in-place: module backward hooks (used by some explainers) fail on in-place outputs.
        self.hidden = nn.Sequential(nn.Conv2d(in_channels, hidden, kernel_size=3, padding=1), nn.ReLU())
        self.heatmap = nn.Conv2d(hidden, num_classes, kernel_size=1)
        self.size = nn.Conv2d(hidden, 2, kernel_size=1)
        self.offset = nn.Conv2d(hidden, 2, kernel_size=1)
        assert self.heatmap.bias is not None
        nn.init.constant_(self.heatmap.bias, _HEATMAP_PRIOR_BIAS)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = self.hidden(x)
        return self.heatmap(h), self.size(h), self.offset(h)


class ShapesDetector(nn.Module):
    """CenterNet-style detector for 64x64 scenes: (N, 3, 64, 64) normalised input -> list of N detection dicts.

    Keeps at most `max_detections` peaks per image with score >= `score_thresh`, best first.
    """

    camserve_default_layer: ClassVar[str] = "head.hidden"

    def __init__(
        self, num_classes: int = len(SHAPE_CLASSES), *, score_thresh: float = 0.3, max_detections: int = 20
    ) -> None:
        super().__init__()
        if max_detections < 1:
            raise ValueError(f"`max_detections` must be at least 1, got {max_detections}")
        self.score_thresh = score_thresh
        self.max_detections = max_detections
        # No full-resolution layer: the smallest shape is 14 px, and 64x64 maps would double the training time.
        self.backbone = nn.Sequential(
            _conv_block(3, 16, stride=2),  # (N, 16, 32, 32)
            _conv_block(16, 32),  # (N, 32, 32, 32)
            _conv_block(32, 64, stride=2),  # (N, 64, 16, 16)
            _conv_block(64, 64),  # (N, 64, 16, 16)
            _conv_block(64, 64),  # (N, 64, 16, 16)
            _conv_block(64, 64),  # (N, 64, 16, 16)
        )
        self.head = DetectionHead(64, 64, num_classes)

    def raw(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(N, 3, H, W) -> class logits (N, C, H/4, W/4), size and offset (N, 2, H/4, W/4)."""
        # As in ShapesNet: removing each image's background colour lets training start on shapes at once.
        x = x - x.mean(dim=(2, 3), keepdim=True)
        out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] = self.head(self.backbone(x))
        return out

    def forward(self, x: torch.Tensor) -> Detections:
        """(N, 3, H, W) normalised float -> N dicts of boxes (K, 4), labels (K,) and scores (K,)."""
        return self.decode(*self.raw(x), image_size=(x.shape[-2], x.shape[-1]))

    def decode(
        self, logits: torch.Tensor, size: torch.Tensor, offset: torch.Tensor, image_size: tuple[int, int]
    ) -> Detections:
        """Peaks of the class heatmaps as boxes in input pixels, clipped to `image_size` (H, W)."""
        heat = torch.sigmoid(logits)
        n, c, h, w = heat.shape
        # Choose on detached values (a 3x3 max-pool is CenterNet's NMS); read scores and boxes from live ones.
        peaks = heat.detach()
        peaks = peaks * (peaks == F.max_pool2d(peaks, 3, stride=1, padding=1))
        top_scores, top_index = peaks.flatten(1).topk(min(self.max_detections, c * h * w), dim=1)
        # Every image's detections in one set of gathers, split per image at the end: a loop over images
        # put ~30 autograd nodes per image in the graph, and an explanation's backward walked them all
        # (most of its time for 8 images). Kept peaks are a prefix of each image's sorted top-k.
        kept = top_scores >= self.score_thresh
        image = torch.arange(n, device=heat.device)[:, None].expand_as(kept)[kept]
        chosen = top_index[kept]
        labels = chosen // (h * w)
        cell = chosen % (h * w)
        scores = heat.flatten(1)[image, chosen]
        off = offset.flatten(2)[image, :, cell].T  # (2, M)
        wh = size.flatten(2)[image, :, cell].T * _SIZE_UNIT
        cx = ((cell % w).to(off.dtype) + off[0]) * STRIDE
        cy = ((cell // w).to(off.dtype) + off[1]) * STRIDE
        boxes = torch.stack([cx - wh[0] / 2, cy - wh[1] / 2, cx + wh[0] / 2, cy + wh[1] / 2], dim=1)
        boxes = torchvision.ops.clip_boxes_to_image(boxes, image_size).float()
        counts = kept.sum(dim=1).tolist()
        return [{"boxes": b, "labels": lab.long(), "scores": sc.float()} for b, lab, sc in
                zip(torch.split(boxes, counts), torch.split(labels, counts), torch.split(scores, counts), strict=True)]


def _targets(scenes: list[MultiScene]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-scene padded ground truth: labels (N, 3) int64 (-1 = none), boxes (N, 3, 4) float32, valid (N, 3)."""
    labels = np.full((len(scenes), MAX_SHAPES), -1, dtype=np.int64)
    boxes = np.zeros((len(scenes), MAX_SHAPES, 4), dtype=np.float32)
    for i, scene in enumerate(scenes):
        k = len(scene.labels)
        labels[i, :k] = scene.labels
        boxes[i, :k] = scene.boxes
    return labels, boxes, labels >= 0


def _loss(
    model: ShapesDetector, x: torch.Tensor, labels: torch.Tensor, boxes: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    """CenterNet's loss: focal loss on Gaussian-splatted centres + L1 on size and offset at the centres.

    labels (B, 3), boxes (B, 3, 4), valid (B, 3) as `_targets` gives them.
    """
    logits, size, offset = model.raw(x)
    b, c, h, w = logits.shape
    batch = torch.arange(b).unsqueeze(1).expand_as(labels)[valid]
    label = labels[valid]
    box = boxes[valid]  # (M, 4)
    centre = (box[:, :2] + box[:, 2:]) / 2 / STRIDE  # (M, 2) in grid units
    cell = centre.floor().long().clamp(0, w - 1)
    wh = box[:, 2:] - box[:, :2]
    # A Gaussian about a third of the box wide (in grid cells): neighbours of the centre are penalised less.
    sigma = (wh.mean(dim=1) / STRIDE / 6).clamp(min=0.5)
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    d2 = (xs[None] - cell[:, 0, None, None]) ** 2 + (ys[None] - cell[:, 1, None, None]) ** 2
    splats = torch.exp(-d2.float() / (2 * sigma[:, None, None] ** 2)).flatten(1)  # (M, h*w)
    rows = (batch * c + label)[:, None].expand_as(splats)
    target = torch.zeros(b * c, h * w).scatter_reduce_(0, rows, splats, "amax").view(b, c, h, w)

    positive = target == 1.0
    log_p = F.logsigmoid(logits)
    log_not_p = F.logsigmoid(-logits)
    p = torch.sigmoid(logits)
    pos_loss = (log_p * (1 - p) ** 2)[positive].sum()
    neg_loss = (log_not_p * p**2 * (1 - target) ** 4)[~positive].sum()
    num_pos = max(int(positive.sum()), 1)
    focal = -(pos_loss + neg_loss) / num_pos

    at = (batch, slice(None), cell[:, 1], cell[:, 0])
    size_loss = F.l1_loss(size[at], wh / _SIZE_UNIT, reduction="sum") / num_pos
    offset_loss = F.l1_loss(offset[at], centre - cell.float(), reduction="sum") / num_pos
    return focal + size_loss + offset_loss


def predict(model: ShapesDetector, images: np.ndarray) -> Detections:
    """Detections for uint8 images (N, 64, 64, 3), computed in batches without grad, on the CPU."""
    device = next(model.parameters()).device
    results: Detections = []
    with torch.inference_mode():
        for start in range(0, len(images), _EVAL_BATCH_SIZE):
            out = model(to_input(images[start : start + _EVAL_BATCH_SIZE]).to(device))
            results.extend({key: value.cpu() for key, value in d.items()} for d in out)
    return results


def _voc_ap(recall: np.ndarray, precision: np.ndarray) -> float:
    """Area under the precision envelope over all recall points (PASCAL VOC 2010+ "all-point" AP)."""
    r = np.concatenate([[0.0], recall, [1.0]])
    p = np.concatenate([[0.0], precision, [0.0]])
    p = np.maximum.accumulate(p[::-1])[::-1]
    steps = np.nonzero(r[1:] != r[:-1])[0]
    return float(((r[steps + 1] - r[steps]) * p[steps + 1]).sum())


def average_precision(detections: Detections, scenes: list[MultiScene], iou_threshold: float = 0.5) -> float:
    """Mean over the classes present of VOC all-point AP at IoU >= `iou_threshold`.

    Detections are matched greedily, best score first, to unmatched ground-truth boxes of the same class.
    """
    per_class: list[float] = []
    for cls in range(len(SHAPE_CLASSES)):
        n_gt = sum(int((s.labels == cls).sum()) for s in scenes)
        if n_gt == 0:
            continue
        scored: list[tuple[float, bool]] = []
        for det, scene in zip(detections, scenes, strict=True):
            gt = torch.as_tensor(scene.boxes[scene.labels == cls], dtype=torch.float32)
            keep = det["labels"] == cls
            boxes, scores = det["boxes"][keep], det["scores"][keep]
            order = scores.argsort(descending=True)
            taken = torch.zeros(len(gt), dtype=torch.bool)
            ious = torchvision.ops.box_iou(boxes[order], gt) if len(gt) else torch.zeros(len(order), 0)
            for row, j in enumerate(order.tolist()):
                iou = ious[row].masked_fill(taken, -1.0)
                hit = len(gt) > 0 and float(iou.max()) >= iou_threshold
                if hit:
                    taken[int(iou.argmax())] = True
                scored.append((float(scores[j]), hit))
        scored.sort(key=lambda item: -item[0])
        hits = np.array([hit for _, hit in scored], dtype=np.float64)
        tp = np.cumsum(hits)
        fp = np.cumsum(1.0 - hits)
        recall = tp / n_gt
        precision = tp / np.maximum(tp + fp, 1e-9)
        per_class.append(_voc_ap(recall, precision) if len(scored) else 0.0)
    return float(np.mean(per_class)) if per_class else 0.0


def average_precision_50(model: ShapesDetector, n: int, seed: int) -> float:
    """mAP at IoU 0.5 (VOC all-point interpolation, mean over the 5 classes) on `n` fresh scenes from `seed`."""
    scenes = make_multi_scenes(n, seed)
    was_training = model.training
    model.eval()
    try:
        return average_precision(predict(model, stack_images(scenes)), scenes)
    finally:
        model.train(was_training)


def _checkpoint(model: ShapesDetector, seed: int) -> dict[str, object]:
    """The serialisable checkpoint dict: contiguous weights plus preprocessing metadata."""
    state = {key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()}
    return {
        "state_dict": state,
        "labels": list(SHAPE_CLASSES),
        "input_size": INPUT_SIZE,
        "mean": MEAN,
        "std": STD,
        "seed": seed,
        "score_thresh": model.score_thresh,
        "max_detections": model.max_detections,
    }


def train_shapes_detect(
    out: Path,
    seed: int = 0,
    *,
    log: Callable[[str], None] = print,
    n_train: int = _TRAIN_SCENES,
    epochs: int = _EPOCHS,
) -> dict[str, float]:
    """Train ShapesDetector on `n_train` multi-shape scenes from `seed`, save it to `out`, return metrics."""
    if n_train < 1 or epochs < 1:
        raise ValueError(f"n_train and epochs must be positive, got {n_train} and {epochs}")
    started = time.perf_counter()
    torch.manual_seed(seed)
    scenes = make_multi_scenes(n_train, seed)
    images = stack_images(scenes)
    labels, boxes, valid = (torch.from_numpy(a) for a in _targets(scenes))
    del scenes
    log(f"generated {n_train} training scenes in {time.perf_counter() - started:.1f}s")

    model = ShapesDetector().to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=_LR, weight_decay=_WEIGHT_DECAY)
    total_steps = epochs * -(-n_train // _BATCH_SIZE)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=_LR, total_steps=max(1, total_steps))
    generator = torch.Generator().manual_seed(seed)
    train_loss = float("nan")
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(n_train, generator=generator)
        total = 0.0
        for start in range(0, n_train, _BATCH_SIZE):
            idx = order[start : start + _BATCH_SIZE]
            # channels_last roughly halves conv time on CPU for these networks.
            x = to_input(images[idx.numpy()]).to(memory_format=torch.channels_last)
            loss = _loss(model, x, labels[idx], boxes[idx], valid[idx])
            optimizer.zero_grad(set_to_none=True)
            torch.autograd.backward(loss)
            optimizer.step()
            scheduler.step()
            total += float(loss.detach()) * len(idx)
            step = start // _BATCH_SIZE + 1
            if step % 50 == 0:
                log(f"  step {step}: loss {float(loss.detach()):.4f} ({time.perf_counter() - started:.0f}s)")
        train_loss = total / n_train
        log(f"epoch {epoch + 1}/{epochs}: loss {train_loss:.4f} ({time.perf_counter() - started:.0f}s)")

    model = model.to(memory_format=torch.contiguous_format).eval()
    val_ap50 = average_precision_50(model, _VAL_SCENES, seed + _VAL_SEED_OFFSET)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(_checkpoint(model, seed), out)
    seconds = time.perf_counter() - started
    log(f"val AP50 {val_ap50:.4f}; saved {out} after {seconds:.0f}s")
    return {
        "train_loss": train_loss,
        "val_ap50": val_ap50,
        "seconds": seconds,
        "epochs": float(epochs),
        "n_train": float(n_train),
        "parameters": float(sum(p.numel() for p in model.parameters())),
    }


def load_shapes_detect(
    path: Path | None = None, map_location: str | torch.device = "cpu"
) -> tuple[ShapesDetector, list[str]]:
    """Load a checkpoint written by `train_shapes_detect`; returns the model in eval mode and its labels."""
    checkpoint = torch.load(path or DEFAULT_WEIGHTS, map_location=map_location, weights_only=True)
    if not isinstance(checkpoint, dict) or not {"state_dict", "labels", "input_size"} <= set(checkpoint):
        from service.sources import describe

        raise ValueError(f"{Path(path or DEFAULT_WEIGHTS).name!r} holds {describe(checkpoint)}; expected a "
                         "shapes-detect checkpoint (a dict with state_dict, labels and input_size, as "
                         "`camserve train-shapes-detect` writes)")
    labels = [str(label) for label in checkpoint["labels"]]
    if int(checkpoint["input_size"]) != INPUT_SIZE:
        raise ValueError(f"checkpoint input_size {checkpoint['input_size']} != {INPUT_SIZE}")
    model = ShapesDetector(
        num_classes=len(labels),
        score_thresh=float(checkpoint.get("score_thresh", 0.3)),
        max_detections=int(checkpoint.get("max_detections", 20)),
    )
    model.load_state_dict(checkpoint["state_dict"])
    model.to(map_location)
    model.eval()
    return model, labels
