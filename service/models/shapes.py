"""The built-in "shapes" demo classifier: a small CNN trained on synthetic scenes.

The network ends in global average pooling over a 16x16 feature grid followed by one linear layer,
so Grad-CAM at `model.features` (the served default layer, whose output is that grid) gives a usefully
fine map for 64x64 inputs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from service.models.scenes import SCENE_SIZE, SHAPE_CLASSES, make_scenes

INPUT_SIZE = SCENE_SIZE
MEAN = (0.5, 0.5, 0.5)
STD = (0.25, 0.25, 0.25)
DEFAULT_WEIGHTS = Path(__file__).with_name("shapes.pt")

_TRAIN_SCENES = 16_000
_VAL_SCENES = 2_000
_EPOCHS = 3
_BATCH_SIZE = 128
_EVAL_BATCH_SIZE = 256
_LR = 2e-3
_WEIGHT_DECAY = 1e-4
# Keeps the validation stream disjoint from the training stream for the same seed.
_VAL_SEED_OFFSET = 7_919


def _conv_block(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    """3x3 conv + BatchNorm + ReLU: (N, in, H, W) -> (N, out, H/stride, W/stride)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        # Not in-place: module backward hooks (used by some explainers, e.g. Captum) fail on in-place outputs.
        nn.ReLU(),
    )


class ShapesNet(nn.Module):
    """Small CNN for 64x64 scenes: (N, 3, 64, 64) normalised input -> (N, 5) logits.

    `forward` first subtracts each image's per-channel spatial mean (parameter-free), then runs
    `features`, a sequence of conv blocks ending at a (N, 64, 16, 16) map; its last child is the
    Grad-CAM target layer. Global average pooling then feeds the linear `classifier` (64 -> 5).
    """

    def __init__(self, num_classes: int = len(SHAPE_CLASSES)) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _conv_block(3, 16),  # (N, 16, 64, 64)
            _conv_block(16, 32, stride=2),  # (N, 32, 32, 32)
            _conv_block(32, 32),  # (N, 32, 32, 32)
            _conv_block(32, 64, stride=2),  # (N, 64, 16, 16)
            _conv_block(64, 64),  # (N, 64, 16, 16)
            _conv_block(64, 64),  # (N, 64, 16, 16), Grad-CAM target
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, 64, 64) normalised float -> (N, num_classes) logits."""
        # The random background colour dominates every image; removing each image's per-channel mean
        # takes it out of the signal, which lets training start learning shapes from the first steps
        # instead of idling on a long plateau at chance level.
        x = x - x.mean(dim=(2, 3), keepdim=True)
        pooled = self.pool(self.features(x))
        logits: torch.Tensor = self.classifier(torch.flatten(pooled, 1))
        return logits


def to_input(images: np.ndarray) -> torch.Tensor:
    """uint8 RGB images (N, H, W, 3) -> normalised float32 tensor (N, 3, H, W)."""
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected images of shape (N, H, W, 3), got {images.shape}")
    if images.dtype != np.uint8:
        raise ValueError(f"expected uint8 images, got {images.dtype}")
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(MEAN, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(STD, dtype=torch.float32).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous()


def _predict(model: nn.Module, images: np.ndarray) -> np.ndarray:
    """Class indices (N,) int64 for uint8 images (N, 64, 64, 3), computed in batches without grad."""
    device = next(model.parameters()).device
    preds: list[np.ndarray] = []
    with torch.inference_mode():
        for start in range(0, len(images), _EVAL_BATCH_SIZE):
            logits = model(to_input(images[start : start + _EVAL_BATCH_SIZE]).to(device))
            preds.append(logits.argmax(dim=1).cpu().numpy())
    return np.concatenate(preds) if preds else np.empty(0, dtype=np.int64)


def _accuracy(model: nn.Module, images: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of (N, 64, 64, 3) images whose predicted class equals labels (N,); restores train/eval mode."""
    was_training = model.training
    model.eval()
    try:
        return float((_predict(model, images) == labels).mean())
    finally:
        model.train(was_training)


def evaluate(model: nn.Module, n: int, seed: int) -> float:
    """Accuracy of `model` on `n` fresh scenes generated from `seed`."""
    images, labels, _ = make_scenes(n, seed)
    return _accuracy(model, images, labels)


def pointing_game(model: nn.Module, n: int, seed: int, margin: int = 2) -> float:
    """Share of `n` fresh scenes where the true class's Grad-CAM peaks inside the shape's box.

    The map is taken at `model.features` (the served default layer), upsampled bilinearly to the
    64x64 scene, and a hit is an arg-max inside the bounding box widened by `margin` pixels.
    """
    from service.cam import CamEngine, CamQuery
    from service.preprocess import to_input_size

    images, labels, boxes = make_scenes(n, seed)
    hits = 0
    with CamEngine(model.eval(), to_input(images[:1])) as engine:
        for start in range(0, n, _EVAL_BATCH_SIZE):
            chunk = slice(start, start + _EVAL_BATCH_SIZE)
            out = engine.explain(to_input(images[chunk]), [CamQuery(classes=(int(c),)) for c in labels[chunk]])
            for cam, (x0, y0, x1, y1) in zip(out.cams, boxes[chunk], strict=True):
                assert cam is not None
                heat = to_input_size(cam.maps, (SCENE_SIZE, SCENE_SIZE))[0]
                y, x = divmod(int(heat.argmax()), SCENE_SIZE)
                hits += x0 - margin <= x < x1 + margin and y0 - margin <= y < y1 + margin
    return hits / n


def _train_epoch(
    model: nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    generator: torch.Generator,
) -> float:
    """One shuffled pass over uint8 images (N, 64, 64, 3) / labels (N,); returns the mean loss."""
    model.train()
    order = torch.randperm(len(images), generator=generator).numpy()
    total_loss = 0.0
    for start in range(0, len(order), _BATCH_SIZE):
        idx = order[start : start + _BATCH_SIZE]
        # channels_last roughly halves conv time on CPU for this network.
        x = to_input(images[idx]).to(memory_format=torch.channels_last)
        y = torch.from_numpy(labels[idx])
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        torch.autograd.backward(loss)
        optimizer.step()
        scheduler.step()
        total_loss += float(loss.detach()) * len(idx)
    return total_loss / len(order)


def _checkpoint(model: ShapesNet, seed: int) -> dict[str, object]:
    """The serialisable checkpoint dict: contiguous weights plus preprocessing metadata."""
    state = {key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()}
    return {
        "state_dict": state,
        "labels": list(SHAPE_CLASSES),
        "input_size": INPUT_SIZE,
        "mean": MEAN,
        "std": STD,
        "seed": seed,
    }


def train_shapes(
    out: Path,
    seed: int = 0,
    *,
    log: Callable[[str], None] = print,
    n_train: int = _TRAIN_SCENES,
    epochs: int = _EPOCHS,
) -> dict[str, float]:
    """Train ShapesNet on `n_train` scenes from `seed`, save the checkpoint to `out`, return metrics."""
    if n_train < 1 or epochs < 1:
        raise ValueError(f"n_train and epochs must be positive, got {n_train} and {epochs}")
    started = time.perf_counter()
    torch.manual_seed(seed)
    images, labels, _ = make_scenes(n_train, seed)
    val_images, val_labels, _ = make_scenes(_VAL_SCENES, seed + _VAL_SEED_OFFSET)
    log(f"generated {n_train} training scenes in {time.perf_counter() - started:.1f}s")

    model = ShapesNet().to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=_LR, weight_decay=_WEIGHT_DECAY)
    total_steps = epochs * -(-n_train // _BATCH_SIZE)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total_steps))
    generator = torch.Generator().manual_seed(seed)
    train_loss = float("nan")
    for epoch in range(epochs):
        train_loss = _train_epoch(model, images, labels, optimizer, scheduler, generator)
        log(f"epoch {epoch + 1}/{epochs}: loss {train_loss:.4f} ({time.perf_counter() - started:.0f}s)")

    model = model.to(memory_format=torch.contiguous_format)
    val_accuracy = _accuracy(model, val_images, val_labels)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(_checkpoint(model, seed), out)
    seconds = time.perf_counter() - started
    log(f"val accuracy {val_accuracy:.4f}; saved {out} after {seconds:.0f}s")
    return {
        "train_loss": train_loss,
        "val_accuracy": val_accuracy,
        "seconds": seconds,
        "epochs": float(epochs),
        "n_train": float(n_train),
        "parameters": float(sum(p.numel() for p in model.parameters())),
    }


def load_shapes(path: Path | None = None, map_location: str | torch.device = "cpu") -> tuple[ShapesNet, list[str]]:
    """Load a checkpoint written by `train_shapes`; returns the model in eval mode and its labels."""
    checkpoint = torch.load(path or DEFAULT_WEIGHTS, map_location=map_location, weights_only=True)
    if not isinstance(checkpoint, dict) or not {"state_dict", "labels", "input_size"} <= set(checkpoint):
        from service.sources import describe

        raise ValueError(f"{Path(path or DEFAULT_WEIGHTS).name!r} holds {describe(checkpoint)}; expected a shapes "
                         "checkpoint (a dict with state_dict, labels and input_size, as `camserve train-shapes` "
                         "writes)")
    labels = [str(label) for label in checkpoint["labels"]]
    if int(checkpoint["input_size"]) != INPUT_SIZE:
        raise ValueError(f"checkpoint input_size {checkpoint['input_size']} != {INPUT_SIZE}")
    model = ShapesNet(num_classes=len(labels))
    model.load_state_dict(checkpoint["state_dict"])
    model.to(map_location)
    model.eval()
    return model, labels
