"""The built-in "shapes-seg" segmenter: a tiny U-Net trained on multi-shape scenes.

Encoder 16 -> 32 -> 64 channels at 64, 32 and 16 px; the decoder upsamples back with additive skips
from the encoder and ends in a 1x1 conv to 6 classes: (N, 3, 64, 64) normalised input -> (N, 6, 64, 64)
logits, class 0 = background and 1..5 = SHAPE_CLASSES (`SEG_CLASSES`). The default layer to explain is
`dec2`, the 32x32 decoder block.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from service.models.multiscenes import SEG_CLASSES, make_multi_scenes, stack_images
from service.models.scenes import SCENE_SIZE
from service.models.shapes import MEAN, STD, _conv_block, to_input

INPUT_SIZE = SCENE_SIZE
DEFAULT_WEIGHTS = Path(__file__).with_name("shapes_seg.pt")

_TRAIN_SCENES = 10_000
_EPOCHS = 3
_BATCH_SIZE = 64
_EVAL_BATCH_SIZE = 256
_LR = 3e-3
_WEIGHT_DECAY = 1e-4
_VAL_SCENES = 500
_VAL_SEED_OFFSET = 7_919


def _dilated_block(in_channels: int, out_channels: int, dilation: int) -> nn.Sequential:
    """3x3 conv with `dilation` + BatchNorm + ReLU, size-preserving: (N, in, H, W) -> (N, out, H, W)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
    )


class ShapesSegmenter(nn.Module):
    """Tiny U-Net for 64x64 scenes: (N, 3, 64, 64) normalised input -> (N, 6, 64, 64) class logits."""

    camserve_default_layer: ClassVar[str] = "dec2"

    def __init__(self, num_classes: int = len(SEG_CLASSES)) -> None:
        super().__init__()
        self.enc1 = _conv_block(3, 16)  # (N, 16, 64, 64)
        self.enc2 = _conv_block(16, 32, stride=2)  # (N, 32, 32, 32)
        # Dilated: a pixel's class depends on its whole shape (up to 24 px), so the receptive field must exceed it.
        self.bottleneck = nn.Sequential(  # (N, 64, 16, 16)
            _conv_block(32, 64, stride=2),
            _dilated_block(64, 64, dilation=2),
            _dilated_block(64, 64, dilation=2),
        )
        self.up2 = nn.Conv2d(64, 32, kernel_size=1)
        self.dec2 = _conv_block(32, 32)  # (N, 32, 32, 32)
        self.up1 = nn.Conv2d(32, 16, kernel_size=1)
        self.dec1 = _conv_block(16, 16)  # (N, 16, 64, 64)
        self.classifier = nn.Conv2d(16, num_classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) normalised float, H and W multiples of 4 -> (N, num_classes, H, W) logits."""
        # As in ShapesNet: removing each image's background colour lets training start on shapes at once.
        x = x - x.mean(dim=(2, 3), keepdim=True)
        e1 = self.enc1(x)
        e2 = self.enc2(e1)
        b = self.bottleneck(e2)
        d2 = self.dec2(e2 + F.interpolate(self.up2(b), scale_factor=2.0, mode="bilinear", align_corners=False))
        d1 = self.dec1(e1 + F.interpolate(self.up1(d2), scale_factor=2.0, mode="bilinear", align_corners=False))
        logits: torch.Tensor = self.classifier(d1)
        return logits


def predict(model: nn.Module, images: np.ndarray) -> np.ndarray:
    """Predicted class maps (N, 64, 64) uint8 for uint8 images (N, 64, 64, 3), in batches without grad."""
    device = next(model.parameters()).device
    maps: list[np.ndarray] = []
    with torch.inference_mode():
        for start in range(0, len(images), _EVAL_BATCH_SIZE):
            logits = model(to_input(images[start : start + _EVAL_BATCH_SIZE]).to(device))
            maps.append(logits.argmax(dim=1).to(torch.uint8).cpu().numpy())
    return np.concatenate(maps) if maps else np.empty((0, INPUT_SIZE, INPUT_SIZE), dtype=np.uint8)


def iou_per_class(predicted: np.ndarray, truth: np.ndarray, num_classes: int = len(SEG_CLASSES)) -> np.ndarray:
    """IoU (num_classes,) float64 of predicted vs true class maps (N, H, W), pooled over all pixels; NaN if absent."""
    confusion = np.bincount(
        truth.astype(np.int64).ravel() * num_classes + predicted.astype(np.int64).ravel(),
        minlength=num_classes * num_classes,
    ).reshape(num_classes, num_classes)
    tp = np.diag(confusion).astype(np.float64)
    union = confusion.sum(axis=0) + confusion.sum(axis=1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / union, np.nan)


def mean_iou(model: nn.Module, n: int, seed: int) -> float:
    """Mean IoU over all 6 classes (background included) on `n` fresh scenes from `seed`."""
    scenes = make_multi_scenes(n, seed)
    was_training = model.training
    model.eval()
    try:
        predicted = predict(model, stack_images(scenes))
    finally:
        model.train(was_training)
    return float(np.nanmean(iou_per_class(predicted, np.stack([s.class_map for s in scenes]))))


def _checkpoint(model: ShapesSegmenter, seed: int) -> dict[str, object]:
    """The serialisable checkpoint dict: contiguous weights plus preprocessing metadata."""
    state = {key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()}
    return {
        "state_dict": state,
        "labels": list(SEG_CLASSES),
        "input_size": INPUT_SIZE,
        "mean": MEAN,
        "std": STD,
        "seed": seed,
    }


def train_shapes_seg(
    out: Path,
    seed: int = 0,
    *,
    log: Callable[[str], None] = print,
    n_train: int = _TRAIN_SCENES,
    epochs: int = _EPOCHS,
) -> dict[str, float]:
    """Train ShapesSegmenter on `n_train` multi-shape scenes from `seed`, save it to `out`, return metrics."""
    if n_train < 1 or epochs < 1:
        raise ValueError(f"n_train and epochs must be positive, got {n_train} and {epochs}")
    started = time.perf_counter()
    torch.manual_seed(seed)
    scenes = make_multi_scenes(n_train, seed)
    images = stack_images(scenes)
    class_maps = torch.from_numpy(np.stack([s.class_map for s in scenes]))
    del scenes
    log(f"generated {n_train} training scenes in {time.perf_counter() - started:.1f}s")

    model = ShapesSegmenter().to(memory_format=torch.channels_last)
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
            loss = F.cross_entropy(model(x), class_maps[idx].long())
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
    val_miou = mean_iou(model, _VAL_SCENES, seed + _VAL_SEED_OFFSET)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(_checkpoint(model, seed), out)
    seconds = time.perf_counter() - started
    log(f"val mIoU {val_miou:.4f}; saved {out} after {seconds:.0f}s")
    return {
        "train_loss": train_loss,
        "val_miou": val_miou,
        "seconds": seconds,
        "epochs": float(epochs),
        "n_train": float(n_train),
        "parameters": float(sum(p.numel() for p in model.parameters())),
    }


def load_shapes_seg(
    path: Path | None = None, map_location: str | torch.device = "cpu"
) -> tuple[ShapesSegmenter, list[str]]:
    """Load a checkpoint written by `train_shapes_seg`; returns the model in eval mode and its labels."""
    checkpoint = torch.load(path or DEFAULT_WEIGHTS, map_location=map_location, weights_only=True)
    if not isinstance(checkpoint, dict) or not {"state_dict", "labels", "input_size"} <= set(checkpoint):
        from service.sources import describe

        raise ValueError(f"{Path(path or DEFAULT_WEIGHTS).name!r} holds {describe(checkpoint)}; expected a "
                         "shapes-seg checkpoint (a dict with state_dict, labels and input_size, as "
                         "`camserve train-shapes-seg` writes)")
    labels = [str(label) for label in checkpoint["labels"]]
    if int(checkpoint["input_size"]) != INPUT_SIZE:
        raise ValueError(f"checkpoint input_size {checkpoint['input_size']} != {INPUT_SIZE}")
    model = ShapesSegmenter(num_classes=len(labels))
    model.load_state_dict(checkpoint["state_dict"])
    model.to(map_location)
    model.eval()
    return model, labels
